//! A partition's fetches in flight: at most two. The second goes out **ahead**, from a little
//! before the offset the first is expected to end at (a 32nd of its records), so the broker
//! prepares the next answer while the last one travels and is delivered. Answers are taken in
//! offset order: one that lands before the fetch in front of it is held until that one is in.
//! An answer whose fetch asked past where the one before it ended (that one came back short,
//! or failed) is past a gap: dropped when it lands, and no fetch goes out until it has (the
//! bound holds); one that overlaps it is taken from where it ended. The overlap is what keeps
//! gaps rare: records vary in size, so an answer brings a few records more or fewer than its
//! reservation, and asked from the exact end every short one would cost the fetch ahead of it.

use std::collections::VecDeque;

use super::sizing::Planned;
use crate::protocol::Record;

/// The fetches in flight of one partition, oldest (lowest offset) first.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    /// At most [`Flights::MAX`].
    queue: VecDeque<Flight>,
}

/// One fetch in flight.
#[derive(Debug)]
pub(crate) struct Flight {
    /// The offset it asked from.
    pub(crate) offset: u64,
    /// As sized: its `max_bytes`, and the buffer slots it reserves until its answer is taken.
    pub(crate) planned: Planned,
    /// It went out when buffer room for a record that did not fit came free.
    pub(crate) released: bool,
    /// Its answer, landed while the fetch in front of it was still in flight.
    pub(crate) landed: Option<Landed>,
}

/// A successful fetch answer, as kept until its turn.
#[derive(Debug)]
pub(crate) struct Landed {
    pub(crate) records: Vec<Record>,
    pub(crate) high_watermark: u64,
}

impl Flights {
    /// Fetches of one partition in flight at once.
    pub(crate) const MAX: usize = 2;

    /// A fetch ahead overlaps the one in flight by `1 / AHEAD_OVERLAP` of its reserved
    /// records: enough for the sums of varying record sizes over an answer (a record costs
    /// the real broker 350 units plus its payload), a few duplicates skipped in return.
    pub(crate) const AHEAD_OVERLAP: usize = 32;

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Buffer slots the fetches in flight reserve.
    pub(crate) fn reserved(&self) -> usize {
        self.queue.iter().map(|f| f.planned.records).sum()
    }

    /// Where a fetch ahead would ask from: [`Self::AHEAD_OVERLAP`] of its records before the
    /// offset the one fetch in flight is expected to end at (at least one record before it).
    /// `None` unless exactly one is in flight, asking from `position` (the partition's next
    /// offset to fetch) or before it, and reserving more than one record.
    pub(crate) fn ahead_from(&self, position: u64) -> Option<u64> {
        match self.queue.as_slices() {
            ([only], []) if only.offset <= position && only.planned.records > 1 => {
                let records = only.planned.records;
                let short = records - records.div_ceil(Self::AHEAD_OVERLAP);
                only.offset.checked_add(u64::try_from(short).ok()?)
            }
            _ => None,
        }
    }

    pub(crate) fn push(&mut self, flight: Flight) {
        debug_assert!(self.queue.len() < Self::MAX, "too many fetches in flight");
        self.queue.push_back(flight);
    }

    /// The position of the fetch in flight that asked from `offset`.
    pub(crate) fn position(&self, offset: u64) -> Option<usize> {
        self.queue.iter().position(|f| f.offset == offset)
    }

    pub(crate) fn get(&self, position: usize) -> Option<&Flight> {
        self.queue.get(position)
    }

    /// Forgets the fetch at `position` (it failed).
    pub(crate) fn remove(&mut self, position: usize) -> Option<Flight> {
        self.queue.remove(position)
    }

    /// Keeps the answer of the fetch at `position` for its turn.
    pub(crate) fn land(&mut self, position: usize, landed: Landed) {
        if let Some(f) = self.queue.get_mut(position) {
            f.landed = Some(landed);
        }
    }

    /// Takes the oldest fetch with its answer, if that one landed: the next to take.
    pub(crate) fn pop_landed(&mut self) -> Option<(Flight, Landed)> {
        self.queue.front()?.landed.as_ref()?;
        let mut flight = self.queue.pop_front()?;
        let landed = flight.landed.take()?;
        Some((flight, landed))
    }

    /// Forgets every fetch (their answers, when they come, are stale); returns the buffer
    /// slots they reserved.
    pub(crate) fn clear(&mut self) -> usize {
        self.queue.drain(..).map(|f| f.planned.records).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight(offset: u64, records: usize) -> Flight {
        Flight {
            offset,
            planned: Planned {
                max_bytes: 1_000,
                records,
            },
            released: false,
            landed: None,
        }
    }

    fn landed(n: usize) -> Landed {
        Landed {
            records: (0..n).map(|_| Record::from_value(vec![0])).collect(),
            high_watermark: 100,
        }
    }

    #[test]
    fn a_fetch_ahead_asks_from_where_the_one_in_flight_ends() {
        let mut f = Flights::default();
        assert_eq!(
            f.ahead_from(10),
            None,
            "none in flight: a first fetch, not one ahead"
        );
        f.push(flight(10, 5));
        assert_eq!(
            f.ahead_from(10),
            Some(14),
            "one record of overlap, at least"
        );
        assert_eq!(
            f.ahead_from(12),
            Some(14),
            "overlapping what came before it"
        );
        assert_eq!(
            f.ahead_from(9),
            None,
            "past a gap: its answer will be dropped"
        );
        f.push(flight(14, 7));
        assert_eq!(f.ahead_from(10), None, "two in flight: no third");
        assert_eq!((f.len(), f.reserved()), (2, 12));
        assert_eq!(f.position(14), Some(1));
        assert_eq!(f.position(12), None);

        let mut f = Flights::default();
        f.push(flight(0, 3_200));
        assert_eq!(
            f.ahead_from(0),
            Some(3_100),
            "a 32nd of the records before its end"
        );
        let mut f = Flights::default();
        f.push(flight(7, 1));
        assert_eq!(
            f.ahead_from(7),
            None,
            "one record: ahead of it would be the same fetch"
        );
    }

    #[test]
    fn answers_are_taken_oldest_first() {
        let mut f = Flights::default();
        f.push(flight(0, 5));
        f.push(flight(5, 5));
        f.land(1, landed(5));
        assert!(
            f.pop_landed().is_none(),
            "the one ahead waits for the first"
        );
        f.land(0, landed(4));
        let (first, answer) = f.pop_landed().expect("the first landed");
        assert_eq!((first.offset, answer.records.len()), (0, 4));
        let (second, _) = f.pop_landed().expect("then the one ahead");
        assert_eq!(second.offset, 5);
        assert!(f.is_empty() && f.pop_landed().is_none());
    }

    #[test]
    fn forgetting_fetches_gives_back_their_reservations() {
        let mut f = Flights::default();
        f.push(flight(0, 5));
        f.push(flight(5, 6));
        assert_eq!(f.remove(0).map(|x| x.offset), Some(0));
        assert_eq!((f.len(), f.reserved()), (1, 6));
        assert_eq!(f.clear(), 6);
        assert!(f.is_empty());
        assert_eq!(f.clear(), 0);
    }
}
