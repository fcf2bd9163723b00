//! The machine's events, in the order they happened, with the deliveries kept apart so that
//! a driver can take a run of them at once ([`ConsumerMachine::poll_deliveries`]): a buffer
//! swapped, not each message moved.
//!
//! [`ConsumerMachine::poll_deliveries`]: super::ConsumerMachine::poll_deliveries

use std::collections::VecDeque;

use crate::event::{Event, Message};

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Every event but the deliveries, each with how many deliveries came before it (since
    /// the event before).
    events: VecDeque<(usize, Event)>,
    deliveries: VecDeque<Message>,
    /// Deliveries after the last of `events`.
    trailing: usize,
}

impl Outbox {
    pub(crate) fn push_back(&mut self, event: Event) {
        match event {
            Event::Deliver(message) => self.deliver(message),
            other => {
                self.events.push_back((self.trailing, other));
                self.trailing = 0;
            }
        }
    }

    pub(crate) fn deliver(&mut self, message: Message) {
        self.deliveries.push_back(message);
        self.trailing += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<Event> {
        let before = match self.events.front_mut() {
            Some((0, _)) => return self.events.pop_front().map(|(_, event)| event),
            Some((before, _)) => before,
            None => &mut self.trailing,
        };
        let message = self.deliveries.pop_front()?;
        *before -= 1;
        Some(Event::Deliver(message))
    }

    /// Moves the deliveries that come before the next other event to the back of `into`;
    /// returns how many.
    pub(crate) fn take_deliveries(&mut self, into: &mut VecDeque<Message>) -> usize {
        let before = match self.events.front_mut() {
            Some((before, _)) => before,
            None => &mut self.trailing,
        };
        let n = std::mem::take(before);
        if n == self.deliveries.len() && into.is_empty() {
            std::mem::swap(into, &mut self.deliveries);
        } else {
            into.extend(self.deliveries.drain(..n));
        }
        n
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.events.len() + self.deliveries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DeliveryTag;
    use crate::protocol::Record;

    fn message(offset: u64) -> Message {
        Message {
            tag: DeliveryTag {
                partition: 0,
                offset,
                epoch: 1,
                attempt: 1,
            },
            record: Record::default(),
        }
    }

    fn offset(event: &Event) -> Option<u64> {
        match event {
            Event::Deliver(m) => Some(m.tag.offset),
            _ => None,
        }
    }

    fn sample() -> Outbox {
        let mut outbox = Outbox::default();
        outbox.deliver(message(0));
        outbox.deliver(message(1));
        outbox.push_back(Event::Closed);
        outbox.push_back(Event::Deliver(message(2)));
        outbox
    }

    #[test]
    fn events_come_out_in_the_order_they_went_in() {
        let mut outbox = sample();
        assert_eq!(outbox.len(), 4);
        let order: Vec<Option<u64>> = std::iter::from_fn(|| outbox.pop_front())
            .map(|e| offset(&e))
            .collect();
        assert_eq!(order, [Some(0), Some(1), None, Some(2)]);
        assert_eq!(outbox.len(), 0);
    }

    #[test]
    fn deliveries_are_taken_a_run_at_a_time() {
        let mut outbox = sample();
        let mut into = VecDeque::new();
        assert_eq!(outbox.take_deliveries(&mut into), 2);
        assert_eq!(outbox.take_deliveries(&mut into), 0, "an event comes next");
        assert!(matches!(outbox.pop_front(), Some(Event::Closed)));
        assert_eq!(outbox.take_deliveries(&mut into), 1);
        let offsets: Vec<u64> = into.iter().map(|m| m.tag.offset).collect();
        assert_eq!(offsets, [0, 1, 2]);
        assert!(outbox.pop_front().is_none());
        // Mixed with single pops, the count stays right.
        outbox.deliver(message(3));
        outbox.deliver(message(4));
        assert_eq!(outbox.pop_front().as_ref().and_then(offset), Some(3));
        into.clear();
        assert_eq!(outbox.take_deliveries(&mut into), 1);
        assert_eq!(into[0].tag.offset, 4);
    }
}
