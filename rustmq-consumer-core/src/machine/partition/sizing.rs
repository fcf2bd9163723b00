//! Fetch sizing in the broker's own unit.
//!
//! A broker does not count a fetch's `max_bytes` in wire bytes: the real one charges each
//! record a fixed in-memory footprint (about 350 bytes) plus its payload, another may count
//! something else. [`FetchSizer`] learns what a record costs in whatever unit the broker
//! counts from its answers (bytes asked against records returned), and keeps the records' wire
//! size apart, for the prefetch byte budget.
//!
//! What one answer of `k >= 1` records to `max_bytes` asked says about the cost `c` of a
//! record (records of about equal cost assumed; the broker always returns the first record,
//! and stops at the first one that does not fit):
//!
//! - more records were available (the answer ended below the high watermark): record `k + 1`
//!   did not fit, so `c > max_bytes / (k + 1)`; and for `k >= 2` the first `k` fitted, so
//!   `c <= max_bytes / k`. `k == 1` says only that the cost is above `max_bytes / 2`.
//! - the answer ended at the high watermark: only `c <= max_bytes / k`, for `k >= 2`.
//!
//! Answers narrow the interval; an answer that contradicts it (record sizes changed) starts it
//! afresh. Fetches are sized at the interval's upper end, which brings back at least the
//! records asked for; with only a lower bound known the estimate doubles it (grow fast), and
//! with only an upper bound it stays at or below the wire size (a byte-counting broker charges
//! about that; one with an overhead answers with fewer records, which gives a lower bound).

use crate::config::ConsumerConfig;

/// The estimates that size fetches.
#[derive(Debug, Clone)]
pub(crate) struct FetchSizer {
    /// A record costs more than this many broker units (0: no lower bound known).
    above: u64,
    /// A record costs at most this many broker units (`u64::MAX`: no upper bound known).
    at_most: u64,
    /// Estimated encoded (wire) size of a record: a moving average over the records fetches
    /// put in the buffer, for the prefetch byte budget.
    wire: usize,
    /// Whether `wire` was measured (before that it is a guess).
    wire_measured: bool,
}

/// What a fetch of one partition may use, in the buffer's own terms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Records the prefetch buffer still takes (`fetch_size` minus buffered and reserved).
    pub(crate) records: usize,
    /// Offsets the partition's unsettled span still takes.
    pub(crate) span: u64,
    /// Wire bytes the prefetch byte budget still takes (before the reservations).
    pub(crate) bytes: usize,
    /// Records reserved by the fetches in flight.
    pub(crate) reserved: usize,
    /// Records buffered, all partitions.
    pub(crate) buffered: usize,
    /// Records the broker holds past the fetch offset, as of the partition's last answer
    /// (`None` before its first): a fetch reserves no more than that (and at least one, to
    /// see new ones), so many small partitions do not hold the buffer for records that are
    /// not there.
    pub(crate) available: Option<u64>,
    /// Before the partition's first answer (`available` unknown): the records its first fetch
    /// may reserve, the buffer shared among the assigned partitions. Reserving a full fetch
    /// each, a few partitions would hold the whole buffer for records they may not have, and
    /// the others' first fetches would wait for their answers; shared, every partition's
    /// first fetch goes out at once, and the next ones are sized from what the answers teach.
    pub(crate) first_share: Option<usize>,
}

/// One fetch, sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Planned {
    /// `max_bytes` on the wire, in the broker's unit.
    pub(crate) max_bytes: u32,
    /// Records it is expected to bring back: the slots of the buffer it reserves.
    pub(crate) records: usize,
}

impl FetchSizer {
    pub(crate) fn new(config: &ConsumerConfig) -> Self {
        Self {
            above: 0,
            at_most: u64::MAX,
            // Until a fetch says otherwise: `fetch_max_bytes` spread over `fetch_size` records.
            wire: (config.fetch_max_bytes as usize / config.fetch_size.max(1)).max(1),
            wire_measured: false,
        }
    }

    /// Whether answers bounded a record's cost from both sides: a fetch then sized at the
    /// upper bound brings back at least the records it reserved (while record sizes hold and
    /// the partition has them), so where it ends is known before its answer.
    pub(crate) fn knows_cost(&self) -> bool {
        self.above > 0 && self.at_most != u64::MAX
    }

    /// Estimated cost of a record in the broker's unit (at least 1).
    pub(crate) fn cost(&self) -> u64 {
        let wire = self.wire as u64;
        let cost = match (self.above, self.at_most) {
            (0, u64::MAX) => wire,
            (0, at_most) => at_most.min(wire),
            (above, u64::MAX) => above.saturating_mul(2).max(wire),
            (_, at_most) => at_most,
        };
        cost.max(1)
    }

    /// Sizes the next fetch of a partition: `None` when the room left is not worth a fetch.
    /// A full fetch (what one fetch can bring with the buffer drained) always is; so is half
    /// of one while fewer records than a full fetch are buffered (the application may run dry
    /// before a smaller fetch's round trip ends), and any room once nothing is buffered or on
    /// its way (while fetches in flight hold reservations, their answers fill the buffer and
    /// free room for a fetch worth its round trip).
    pub(crate) fn plan(&self, room: Room, config: &ConsumerConfig) -> Option<Planned> {
        let cost = self.cost();
        let wire = self.wire.max(1);
        let span = usize::try_from(room.span).unwrap_or(usize::MAX);
        // Records one fetch of `fetch_max_bytes` brings back.
        let full = usize::try_from(u64::from(config.fetch_max_bytes) / cost)
            .unwrap_or(usize::MAX)
            .max(1);
        let by_bytes = (room.bytes / wire).saturating_sub(room.reserved);
        let idle = room.buffered == 0 && room.reserved == 0;
        let available = room.available.map_or(usize::MAX, |n| {
            usize::try_from(n).unwrap_or(usize::MAX).max(1)
        });
        // What this fetch may reserve at most: what the partition holds, or its share of a
        // first round.
        let limit = available.min(room.first_share.map_or(usize::MAX, |s| s.max(1)));
        let mut records = room.records.min(span).min(by_bytes).min(full);
        if records == 0 && idle && room.records > 0 && span > 0 {
            // Nothing buffered or coming: one record, whatever its size (the broker sends at
            // least one).
            records = 1;
        }
        if records == 0 {
            return None;
        }
        let max_unsettled =
            usize::try_from(config.max_unsettled_per_partition).unwrap_or(usize::MAX);
        let capacity = config
            .fetch_size
            .min(max_unsettled)
            .min(config.prefetch_bytes / wire)
            .min(full)
            .max(1);
        // Everything the partition has (or its whole first share) is worth a round trip:
        // waiting would not grow it.
        let up_to_limit = records >= limit;
        records = records.min(limit);
        let worthwhile = records >= capacity
            || (records >= capacity.div_ceil(2) && room.buffered < capacity)
            || up_to_limit
            || idle;
        if !worthwhile {
            return None; // wait for deliveries to free room for a fetch worth its round trip
        }
        let max_bytes = u64::try_from(records)
            .unwrap_or(u64::MAX)
            .saturating_mul(cost)
            .clamp(1, u64::from(config.fetch_max_bytes));
        Some(Planned {
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            records,
        })
    }

    /// A fetch asked for `max_bytes` and `returned` records came back; `more` when the
    /// partition held records past them (the answer ended below the high watermark).
    pub(crate) fn learn(&mut self, max_bytes: u32, returned: usize, more: bool) {
        let Ok(k) = u64::try_from(returned) else {
            return;
        };
        if k == 0 {
            return;
        }
        let max = u64::from(max_bytes);
        let above = if more { max / (k + 1) } else { 0 };
        let at_most = if k >= 2 { max / k } else { u64::MAX };
        if above == 0 && at_most == u64::MAX {
            return;
        }
        let (lo, hi) = (self.above.max(above), self.at_most.min(at_most));
        if lo < hi {
            (self.above, self.at_most) = (lo, hi);
        } else {
            // Contradicts what earlier answers said: the records changed size; start over.
            (self.above, self.at_most) = (above, at_most);
        }
    }

    /// `taken` records of `bytes` wire bytes in all went into the buffer.
    pub(crate) fn taken(&mut self, taken: usize, bytes: usize) {
        if taken == 0 {
            return;
        }
        let average = bytes / taken;
        self.wire = if self.wire_measured {
            (3 * self.wire + average) / 4
        } else {
            average
        }
        .max(1);
        self.wire_measured = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsumerConfig {
        ConsumerConfig::new("t", "g")
    }

    /// What a broker charging `cost` per record returns to `max_bytes`, `available` records
    /// from the position.
    fn answer(max_bytes: u32, cost: u64, available: usize) -> usize {
        let fit = usize::try_from(u64::from(max_bytes) / cost).unwrap_or(usize::MAX);
        fit.max(1).min(available)
    }

    fn room(records: usize) -> Room {
        Room {
            records,
            span: u64::MAX,
            bytes: usize::MAX,
            reserved: 0,
            buffered: 0,
            available: None,
            first_share: None,
        }
    }

    /// Fetches with `want` records of room against a broker charging `cost`, until an answer
    /// brings back what the room and `fetch_max_bytes` allow (within 2%: sized at the upper
    /// end of the cost interval, a fetch may ask for a record less than would fit); returns
    /// how many fetches that took.
    fn fetches_to_converge(sizer: &mut FetchSizer, cost: u64, wire: usize, want: usize) -> usize {
        let c = config();
        for fetch in 1..=10 {
            let plan = sizer.plan(room(want), &c).expect("room for a fetch");
            let got = answer(plan.max_bytes, cost, usize::MAX);
            let expected = want.min((u64::from(c.fetch_max_bytes) / cost).max(1) as usize);
            let slack = expected / 50;
            if got >= expected - slack && got <= expected + slack {
                return fetch;
            }
            sizer.learn(plan.max_bytes, got, true);
            sizer.taken(got.min(want), got.min(want) * wire);
        }
        panic!("no convergence in 10 fetches (cost {cost}, wire {wire})");
    }

    #[test]
    fn converges_to_the_broker_unit_within_a_few_fetches() {
        // (broker cost per record, wire size): overhead 350 with small and large payloads,
        // overhead 0 (a byte-counting broker), records larger than one fetch.
        for (cost, wire) in [
            (382, 57),
            (350 + 10_000, 10_025),
            (32, 57),
            (10_000, 10_025),
            (2 << 20, 2 << 20),
        ] {
            let mut sizer = FetchSizer::new(&config());
            let n = fetches_to_converge(&mut sizer, cost, wire, 1_000);
            assert!(n <= 3, "cost {cost}: {n} fetches to converge");
        }
    }

    #[test]
    fn a_single_record_answer_grows_the_estimate_fast() {
        let mut sizer = FetchSizer::new(&config());
        sizer.taken(10, 100);
        assert_eq!(sizer.cost(), 10, "the wire size until the broker says more");
        sizer.learn(100, 1, true);
        assert!(
            sizer.cost() >= 100,
            "more than 50 per record: {}",
            sizer.cost()
        );
    }

    #[test]
    fn answers_at_the_high_watermark_only_bound_the_cost_from_above() {
        let mut sizer = FetchSizer::new(&config());
        sizer.taken(10, 500);
        sizer.learn(1 << 20, 100, false);
        assert_eq!(sizer.cost(), 50, "at most 10,485, so the wire size stands");
        sizer.learn(1_000, 10, true);
        assert_eq!(sizer.cost(), 100, "(90, 100]: sized at the upper end");
    }

    #[test]
    fn a_contradicting_answer_starts_the_estimate_afresh() {
        let mut sizer = FetchSizer::new(&config());
        sizer.learn(10_000, 100, true); // (99, 100]
        assert_eq!(sizer.cost(), 100);
        sizer.learn(10_000, 20, true); // (476, 500]: records grew
        assert_eq!(sizer.cost(), 500);
    }

    #[test]
    fn a_small_room_waits_unless_the_buffer_runs_low() {
        let c = config();
        let mut sizer = FetchSizer::new(&c);
        sizer.taken(1, 50);
        sizer.learn(10_000, 100, true);
        let capacity = c
            .fetch_size
            .min(c.max_unsettled_per_partition as usize)
            .min((c.fetch_max_bytes / 100) as usize);
        let busy = |records, buffered| Room {
            buffered,
            ..room(records)
        };
        let half = capacity.div_ceil(2);
        assert_eq!(sizer.plan(busy(half - 1, 1), &c), None);
        assert!(
            sizer.plan(busy(half, 1), &c).is_some(),
            "runs low: half will do"
        );
        assert_eq!(sizer.plan(busy(half, capacity), &c), None, "no hurry");
        assert!(sizer.plan(busy(capacity, capacity), &c).is_some());
        let small = sizer
            .plan(room(3), &c)
            .expect("idle: any room is worth a fetch");
        assert_eq!((small.records, small.max_bytes), (3, 300));
    }

    #[test]
    fn a_first_fetch_reserves_its_share_and_goes_while_others_are_buffered() {
        let c = config();
        let sizer = FetchSizer::new(&c);
        let first = |records| Room {
            first_share: Some(10),
            buffered: 500,
            reserved: 100,
            ..room(records)
        };
        let plan = sizer
            .plan(first(5_000), &c)
            .expect("its whole share is worth a round trip");
        assert_eq!(plan.records, 10, "its share, not a full fetch");
        assert_eq!(sizer.plan(first(4), &c), None, "less than its share: wait");
    }

    #[test]
    fn nothing_buffered_is_not_idle_while_fetches_in_flight_hold_reservations() {
        let c = config();
        let mut sizer = FetchSizer::new(&c);
        sizer.taken(1, 50);
        sizer.learn(10_000, 100, true);
        let drained = |reserved| Room {
            reserved,
            available: Some(198),
            ..room(13)
        };
        assert_eq!(
            sizer.plan(drained(5_000), &c),
            None,
            "the answers in flight free room for more than 13"
        );
        let plan = sizer
            .plan(drained(0), &c)
            .expect("nothing buffered or coming: any room will do");
        assert_eq!(plan.records, 13);
    }

    #[test]
    fn reserved_records_count_against_the_byte_budget() {
        let mut c = config();
        c.prefetch_bytes = 10_000; // 100 records of 100 bytes: a fetch of 50 is worthwhile
        let mut sizer = FetchSizer::new(&c);
        sizer.taken(1, 100);
        let plan = sizer
            .plan(
                Room {
                    bytes: 10_000,
                    reserved: 40,
                    ..room(1_000)
                },
                &c,
            )
            .expect("room for 60 records");
        assert_eq!(plan.records, 60);
    }
}
