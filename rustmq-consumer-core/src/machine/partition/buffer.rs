//! A partition's fetched, undelivered records, kept in the lists the fetch answers were
//! decoded into: a record is moved once, from its answer to its delivery, not first into a
//! buffer of its own.

use std::collections::VecDeque;
use std::vec;

use crate::protocol::Record;

/// Fetched records in offset order: a queue of answers' record lists, each with the offset of
/// its next record (an answer's records have consecutive offsets).
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    /// Never an empty run.
    runs: VecDeque<Run>,
}

#[derive(Debug)]
struct Run {
    /// The offset of the first record left in `records`.
    next: u64,
    records: vec::IntoIter<Record>,
}

impl Buffered {
    /// Buffers `records`, the first at offset `first`, after what is buffered (the caller
    /// keeps offsets consecutive across runs).
    pub(crate) fn push(&mut self, first: u64, records: Vec<Record>) {
        if !records.is_empty() {
            self.runs.push_back(Run {
                next: first,
                records: records.into_iter(),
            });
        }
    }

    /// The oldest record and its offset.
    pub(crate) fn front(&self) -> Option<(u64, &Record)> {
        let run = self.runs.front()?;
        Some((run.next, run.records.as_slice().first()?))
    }

    /// Takes the oldest record (the one [`front`](Self::front) shows).
    #[inline]
    pub(crate) fn pop_front(&mut self) -> Option<Record> {
        let run = self.runs.front_mut()?;
        let record = run.records.next()?;
        run.next += 1;
        if run.records.len() == 0 {
            self.runs.pop_front();
        }
        Some(record)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Records buffered.
    pub(crate) fn len(&self) -> usize {
        self.runs.iter().map(|run| run.records.len()).sum()
    }

    /// The buffered record at `offset`.
    pub(crate) fn get(&self, offset: u64) -> Option<&Record> {
        self.runs.iter().find_map(|run| {
            let at = usize::try_from(offset.checked_sub(run.next)?).ok()?;
            run.records.as_slice().get(at)
        })
    }

    /// The buffered records' encoded bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.runs
            .iter()
            .flat_map(|run| run.records.as_slice())
            .map(Record::encoded_len)
            .sum()
    }

    pub(crate) fn clear(&mut self) {
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: &[u8]) -> Vec<Record> {
        values
            .iter()
            .map(|&v| Record::from_value(vec![v]))
            .collect()
    }

    #[test]
    fn records_come_out_in_offset_order_across_runs() {
        let mut b = Buffered::default();
        b.push(10, run(&[1, 2]));
        b.push(12, Vec::new());
        b.push(12, run(&[3]));
        assert_eq!(b.len(), 3);
        assert_eq!(b.get(11).map(|r| r.value[0]), Some(2));
        assert_eq!(b.get(12).map(|r| r.value[0]), Some(3));
        assert!(b.get(9).is_none() && b.get(13).is_none());
        let out: Vec<(u64, u8)> = std::iter::from_fn(|| {
            let offset = b.front()?.0;
            b.pop_front().map(|r| (offset, r.value[0]))
        })
        .collect();
        assert_eq!(out, [(10, 1), (11, 2), (12, 3)]);
        assert!(b.is_empty());
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_partly_taken_run_is_found_from_its_next_offset() {
        let mut b = Buffered::default();
        b.push(0, run(&[1, 2, 3]));
        assert_eq!(b.front().map(|(o, _)| o), Some(0));
        assert!(b.pop_front().is_some());
        assert_eq!(b.front().map(|(o, r)| (o, r.value[0])), Some((1, 2)));
        assert!(b.get(0).is_none(), "delivered: no longer buffered");
        assert_eq!(b.get(2).map(|r| r.value[0]), Some(3));
        assert_eq!(b.bytes(), 2 * Record::from_value(vec![0]).encoded_len());
        b.clear();
        assert!(b.is_empty() && b.pop_front().is_none());
    }
}
