//! The fetch candidates follow what an input changed: an ack leaves a waiting partition out of
//! the fetch pass, and the change it waits for puts it back.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Partitions, Phase, Slot, Unsettled};
use crate::breaker::Breaker;
use crate::config::ConsumerConfig;
use crate::event::Metrics;
use crate::machine::outbox::Outbox;
use crate::machine::requests::Requests;
use crate::protocol::Record;

struct Setup {
    now: Instant,
    config: ConsumerConfig,
    partitions: Partitions,
    breaker: Breaker,
    requests: Requests,
    metrics: Metrics,
}

/// Partition 0, active at offset 0, with `delivered` offsets out with the application.
#[allow(clippy::disallowed_methods)] // a test's clock: any instant does
fn setup(max_unsettled: u64, delivered: u64) -> Setup {
    let now = Instant::now();
    let mut config = ConsumerConfig::new("t", "g");
    config.partitions = vec![0];
    config.max_unsettled_per_partition = max_unsettled;
    let mut partitions = Partitions::new(&config);
    let p = partitions.at_mut(0);
    p.phase = Phase::Active;
    for _ in 0..delivered {
        p.window.push(Unsettled::new(Slot::Delivered {
            attempt: 1,
            since: now,
        }));
    }
    partitions.unacked = usize::try_from(delivered).unwrap_or(usize::MAX);
    partitions.refresh();
    Setup {
        now,
        breaker: Breaker::new(
            config.failure_threshold,
            config.recovery_timeout,
            config.half_open_max_probes,
            config.half_open_max_wait,
        ),
        requests: Requests::new(config.request_timeout),
        metrics: Metrics::default(),
        config,
        partitions,
    }
}

impl Setup {
    /// One fetch pass.
    fn send_fetches(&mut self) {
        assert!(self.partitions.send_fetches(
            self.now,
            &self.config,
            &mut self.breaker,
            &mut self.requests,
            &mut self.metrics,
        ));
        self.partitions.refresh();
    }

    fn ack(&mut self, offset: u64) {
        self.partitions.delivery_ended();
        self.partitions.settle(0, offset);
        self.partitions.refresh();
    }

    fn candidate(&self) -> bool {
        self.partitions.fetch_candidates.contains(&0)
    }
}

#[test]
fn an_ack_leaves_a_partition_with_a_fetch_in_flight_out_of_the_fetch_pass() {
    let mut s = setup(100, 3);
    s.send_fetches();
    assert!(s.partitions.at(0).fetch_in_flight, "the pass sends a fetch");
    assert!(!s.candidate(), "in flight: parked");
    s.ack(0);
    s.ack(2);
    assert!(!s.candidate(), "an ack frees no buffer room: still parked");
    s.partitions.at_mut(0).fetch_in_flight = false; // the answer
    s.partitions.refresh();
    assert!(s.candidate(), "the answer puts it back");
}

#[test]
fn only_an_ack_that_moves_a_full_window_makes_the_partition_a_candidate_again() {
    let mut s = setup(3, 3);
    s.send_fetches();
    assert!(
        !s.partitions.at(0).fetch_in_flight,
        "the window is full: no fetch"
    );
    assert!(!s.candidate(), "a full window sets it aside");
    s.ack(1);
    assert!(
        !s.candidate(),
        "the watermark did not move: the window is still full"
    );
    s.ack(0);
    assert!(s.candidate(), "the watermark moved: room in the window");
    s.send_fetches();
    assert!(
        s.partitions.at(0).fetch_in_flight,
        "and the next pass fetches"
    );
}

/// The cache is an index over the windows' slots: a delivery hands its record to the
/// application without a copy, a record given back is cached in its slot, and a settle or a
/// restart releases the records with the slots.
#[test]
fn records_given_back_live_in_their_slots_until_settled_or_restarted() {
    let mut s = setup(100, 0);
    let record = Record::from_value(vec![7u8; 10]);
    let p = s.partitions.at_mut(0);
    for _ in 0..3 {
        p.window.push(Unsettled::new(Slot::Buffered));
    }
    p.buffered.push(0, vec![record.clone(); 3]);
    s.partitions.buffered += 3;
    s.partitions.buffered_bytes += 3 * record.encoded_len();
    let mut events = Outbox::default();
    s.partitions.deliver(s.now, 10, &mut s.metrics, &mut events);
    assert_eq!(events.len(), 3);
    assert_eq!(s.partitions.cache().len(), 0, "delivered without a copy");
    assert!((0..3).all(|o| s
        .partitions
        .at(0)
        .window
        .get(o)
        .is_some_and(|u| !u.cached.is_cached())));

    let mut messages = VecDeque::new();
    assert_eq!(events.take_deliveries(&mut messages), 3);
    for m in &messages {
        assert!(s.partitions.cache_returned(s.now, m.clone()));
    }
    let cost = record.encoded_len() + 16;
    assert_eq!(s.partitions.cache().len(), 3);
    assert_eq!(s.partitions.cache().bytes(), 3 * cost);
    assert!((0..3).all(|o| s
        .partitions
        .at(0)
        .window
        .get(o)
        .is_some_and(|u| u.cached.is_cached())));
    assert!(
        s.partitions.cache_returned(s.now, messages[2].clone()),
        "given back twice: the second replaces the first"
    );
    let mut stale = messages[1].clone();
    stale.tag.attempt += 1;
    assert!(
        !s.partitions.cache_returned(s.now, stale),
        "not an outstanding delivery: not cached"
    );
    assert_eq!(s.partitions.cache().len(), 3);

    s.partitions.settle(0, 1);
    assert_eq!(s.partitions.cache().len(), 2, "settled out of order");
    assert_eq!(s.partitions.cached_peek(s.now, 0, 1), None);
    assert_eq!(s.partitions.cached_peek(s.now, 0, 2), Some(&record));
    assert_eq!(s.partitions.cached_get(s.now, 0, 0), Some(record.clone()));

    s.partitions.restart(0, 3);
    assert_eq!(
        (s.partitions.cache().len(), s.partitions.cache().bytes()),
        (0, 0),
        "the restart gave every record back"
    );
    assert_eq!(s.partitions.cache_deadline(), None, "no stale expiry left");
    assert_eq!(s.partitions.cache().stats().evictions, 0);
}

#[test]
fn a_window_slot_stays_small() {
    // Every fetched offset has a slot, most never delivered yet: the cached record lives in
    // the cache, and a slot only names its position there (it was 160 bytes with the record).
    assert!(
        std::mem::size_of::<Option<Unsettled>>() <= 40,
        "{} bytes",
        std::mem::size_of::<Option<Unsettled>>()
    );
}

/// `index` answers from the position table as the sorted list's search would, for dense ids
/// and for ids too sparse for a table, as partitions come, go and are parked.
#[test]
fn partitions_are_found_by_id_as_they_come_and_go() {
    let check = |set: &Partitions, ids: &[u32]| {
        for id in (0..1_100).chain([5_000, 100_000, u32::MAX]) {
            let searched = set.list.binary_search_by_key(&id, |p| p.id).ok();
            assert_eq!(set.index(id), searched, "partition {id}");
            assert_eq!(searched.is_some(), ids.contains(&id), "partition {id}");
        }
    };
    let mut config = ConsumerConfig::new("t", "g");
    config.partitions = vec![3, 1];
    let mut set = Partitions::new(&config);
    check(&set, &[1, 3]);
    assert!(!set.positions.is_empty(), "dense ids get a table");
    for id in [0, 7, 1_000] {
        set.add(id);
    }
    check(&set, &[0, 1, 3, 7, 1_000]);
    set.add(100_000);
    assert!(set.positions.is_empty(), "sparse ids are searched");
    check(&set, &[0, 1, 3, 7, 1_000, 100_000]);
    let idx = set.index(100_000).unwrap_or(usize::MAX);
    set.take_out(idx);
    check(&set, &[0, 1, 3, 7, 1_000]);
    assert!(!set.positions.is_empty(), "dense again");
    let ids = set.revoke_all();
    assert_eq!(ids.len() + set.parked.partitions.len(), 5);
    check(&set, &[]);
    set.add(7);
    check(&set, &[7]);
}
