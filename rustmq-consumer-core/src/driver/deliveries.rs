//! Deliveries on their way from the machine to the application (the driver's backlog, the
//! inbox's takeable queue), each with the ack gate's generation when the machine emitted it.
//!
//! The generation changes only with a seek, a rebalance or the close, so it is kept per run
//! of messages, not per message, and a run the machine emits goes in whole: by swapping
//! buffers when the queue is empty ([`ConsumerMachine::poll_deliveries`]), not message by
//! message.
//!
//! [`ConsumerMachine::poll_deliveries`]: crate::ConsumerMachine::poll_deliveries

use std::collections::VecDeque;

use super::task::Stamped;
use crate::event::Message;

#[derive(Debug, Default)]
pub(crate) struct Deliveries {
    messages: VecDeque<Message>,
    /// `(generation, count)` of consecutive messages, oldest first; the counts add up to
    /// `messages.len()`.
    runs: VecDeque<(u64, usize)>,
}

impl Deliveries {
    fn extend_run(&mut self, generation: u64, n: usize) {
        if n == 0 {
            return;
        }
        match self.runs.back_mut() {
            Some((g, count)) if *g == generation => *count += n,
            _ => self.runs.push_back((generation, n)),
        }
    }

    pub(crate) fn push_back(&mut self, stamped: Stamped) {
        self.messages.push_back(stamped.delivery);
        self.extend_run(stamped.generation, 1);
    }

    /// Appends what `take` moves to the back of the messages, all of `generation`.
    pub(crate) fn append_with(
        &mut self,
        generation: u64,
        take: impl FnOnce(&mut VecDeque<Message>) -> usize,
    ) {
        let n = take(&mut self.messages);
        self.extend_run(generation, n);
    }

    #[inline]
    pub(crate) fn pop_front(&mut self) -> Option<Stamped> {
        let delivery = self.messages.pop_front()?;
        let generation = match self.runs.front_mut() {
            Some((generation, count)) => {
                let generation = *generation;
                *count -= 1;
                if *count == 0 {
                    self.runs.pop_front();
                }
                generation
            }
            // Not reached (the counts add up); a generation never current sends its ack
            // the slow way, through the machine.
            None => u64::MAX,
        };
        Some(Stamped {
            delivery,
            generation,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.messages.clear();
        self.runs.clear();
    }

    /// Takes everything, oldest first.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Stamped> + '_ {
        std::iter::from_fn(|| self.pop_front())
    }

    /// Takes the deliveries of `partitions`, oldest first, keeping the others in order.
    pub(crate) fn take_partitions(&mut self, partitions: &[u32]) -> Vec<Stamped> {
        let mut taken = Vec::new();
        if !self
            .messages
            .iter()
            .any(|m| partitions.contains(&m.tag.partition))
        {
            return taken;
        }
        let mut kept = Self::default();
        for stamped in self.drain() {
            if partitions.contains(&stamped.delivery.tag.partition) {
                taken.push(stamped);
            } else {
                kept.push_back(stamped);
            }
        }
        *self = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DeliveryTag;
    use crate::protocol::Record;

    fn message(partition: u32, offset: u64) -> Message {
        Message {
            tag: DeliveryTag {
                partition,
                offset,
                epoch: 1,
                attempt: 1,
            },
            record: Record::default(),
        }
    }

    fn stamped(partition: u32, offset: u64, generation: u64) -> Stamped {
        Stamped {
            delivery: message(partition, offset),
            generation,
        }
    }

    fn out(d: &mut Deliveries) -> Vec<(u32, u64, u64)> {
        d.drain()
            .map(|s| {
                (
                    s.delivery.tag.partition,
                    s.delivery.tag.offset,
                    s.generation,
                )
            })
            .collect()
    }

    #[test]
    fn each_delivery_keeps_the_generation_it_came_with() {
        let mut d = Deliveries::default();
        d.push_back(stamped(0, 0, 3));
        d.append_with(3, |into| {
            into.push_back(message(0, 1));
            1
        });
        d.append_with(4, |into| {
            into.extend([message(1, 0), message(0, 2)]);
            2
        });
        d.append_with(5, |_| 0);
        d.push_back(stamped(1, 1, 4));
        assert_eq!(d.len(), 5);
        assert_eq!(d.runs.len(), 2, "a run per change of generation");
        assert_eq!(
            out(&mut d),
            [(0, 0, 3), (0, 1, 3), (1, 0, 4), (0, 2, 4), (1, 1, 4)]
        );
        assert!(d.is_empty() && d.runs.is_empty());
    }

    #[test]
    fn taking_partitions_keeps_the_rest_and_their_generations_in_order() {
        let mut d = Deliveries::default();
        for (p, o, g) in [(0, 0, 1), (1, 0, 1), (0, 1, 2), (1, 1, 2), (0, 2, 2)] {
            d.push_back(stamped(p, o, g));
        }
        assert!(d.take_partitions(&[7]).is_empty());
        let taken: Vec<(u64, u64)> = d
            .take_partitions(&[1])
            .iter()
            .map(|s| (s.delivery.tag.offset, s.generation))
            .collect();
        assert_eq!(taken, [(0, 1), (1, 2)]);
        assert_eq!(out(&mut d), [(0, 0, 1), (0, 1, 2), (0, 2, 2)]);
        d.push_back(stamped(0, 3, 2));
        d.clear();
        assert!(d.pop_front().is_none() && d.runs.is_empty());
    }
}
