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

    /// Takes up to `max` records of the oldest answer, in order, each with its offset, into
    /// `take`; returns how many it took (none when nothing is buffered).
    #[inline]
    pub(crate) fn pop_run(&mut self, max: usize, mut take: impl FnMut(u64, Record)) -> usize {
        let Some(run) = self.runs.front_mut() else {
            return 0;
        };
        let first = run.next;
        let mut n = 0;
        for record in run.records.by_ref().take(max) {
            take(first + n as u64, record);
            n += 1;
        }
        run.next += n as u64;
        if run.records.len() == 0 {
            self.runs.pop_front();
        }
        n
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
        let mut out = Vec::new();
        while b.pop_run(usize::MAX, |o, r| out.push((o, r.value[0]))) > 0 {}
        assert_eq!(out, [(10, 1), (11, 2), (12, 3)]);
        assert!(b.is_empty());
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_run_is_taken_from_the_oldest_answer_up_to_its_end() {
        let mut b = Buffered::default();
        b.push(10, run(&[1, 2, 3]));
        b.push(13, run(&[4]));
        let mut out = Vec::new();
        assert_eq!(b.pop_run(2, |o, r| out.push((o, r.value[0]))), 2);
        assert_eq!(
            b.pop_run(5, |o, r| out.push((o, r.value[0]))),
            1,
            "to its answer's end"
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b.pop_run(5, |o, r| out.push((o, r.value[0]))), 1);
        assert_eq!(b.pop_run(5, |_, _| unreachable!()), 0);
        assert_eq!(out, [(10, 1), (11, 2), (12, 3), (13, 4)]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_partly_taken_run_is_found_from_its_next_offset() {
        let mut b = Buffered::default();
        b.push(0, run(&[1, 2, 3]));
        assert_eq!(b.pop_run(1, |o, _| assert_eq!(o, 0)), 1);
        assert!(b.get(0).is_none(), "delivered: no longer buffered");
        assert_eq!(b.get(1).map(|r| r.value[0]), Some(2));
        assert_eq!(b.get(2).map(|r| r.value[0]), Some(3));
        assert_eq!(b.bytes(), 2 * Record::from_value(vec![0]).encoded_len());
        b.clear();
        assert!(b.is_empty() && b.pop_run(1, |_, _| unreachable!()) == 0);
    }
}
