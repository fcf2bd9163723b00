use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

/// One input to the scheduler, drawn by proptest.
#[derive(Debug, Clone)]
enum Step {
    /// Push the next delivery of `partition` with key `key` (`None`: keyless).
    Push { partition: u32, key: Option<u8> },
    /// Start whatever may start.
    Start,
    /// Finish the `index`-th running delivery (modulo), redelivering it or not.
    Finish { index: usize, redeliver: bool },
    /// Revoke or seek a partition.
    Drop { partition: u32 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3u32, proptest::option::weighted(0.8, 0..4u8))
            .prop_map(|(partition, key)| Step::Push { partition, key }),
        4 => Just(Step::Start),
        3 => (any::<usize>(), proptest::bool::weighted(0.2))
            .prop_map(|(index, redeliver)| Step::Finish { index, redeliver }),
        1 => (0..3u32).prop_map(|partition| Step::Drop { partition }),
    ]
}

fn order_by() -> impl Strategy<Value = OrderBy> {
    prop_oneof![
        Just(OrderBy::Unordered),
        Just(OrderBy::Key),
        Just(OrderBy::Partition)
    ]
}

/// A delivery as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Item {
    partition: u32,
    offset: u64,
    key: Option<u8>,
    /// A redelivery (after a nack).
    retry: bool,
}

fn key_bytes(key: Option<u8>) -> Option<Bytes> {
    key.map(|k| Bytes::from(vec![k]))
}

/// A lane as the model sees it: a key, or a partition.
type ModelLane = (Option<u8>, Option<u32>);

/// The lane the model expects for an item.
fn lane(order: OrderBy, item: &Item) -> Option<ModelLane> {
    match (order, item.key) {
        (OrderBy::Unordered, _) => None,
        (OrderBy::Key, Some(key)) => Some((Some(key), None)),
        _ => Some((None, Some(item.partition))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Never two deliveries of one lane at once, each lane in push order (offset order),
    /// never more than `concurrency` running, never more waiting than the bounds, and every
    /// pushed delivery that was not dropped eventually starts.
    #[test]
    fn lanes_are_exclusive_ordered_and_bounded(
        order in order_by(),
        concurrency in 1..6usize,
        per_lane in 1..5usize,
        total in 1..12usize,
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        let limits = Limits { concurrency, max_waiting_per_lane: per_lane, max_waiting: total };
        let mut scheduler: Scheduler<Item> = Scheduler::new(order, limits);
        let mut next_offset: BTreeMap<u32, u64> = BTreeMap::new();
        let mut running: Vec<(Ticket, Item)> = Vec::new();
        // Per lane: the last started offset per partition (first attempts only).
        let mut last_started: HashMap<(ModelLane, u32), u64> = HashMap::new();
        // Redeliveries owed to the scheduler (a nack), pushed back later by `Push` steps.
        let mut redeliveries: Vec<Item> = Vec::new();
        let mut pushed = 0usize;
        let mut started = 0usize;
        let mut dropped = 0usize;

        let check_start = |last_started: &mut HashMap<(ModelLane, u32), u64>, item: &Item, ticket: &Ticket, running: &[(Ticket, Item)]| {
            prop_assert_eq!((ticket.partition(), ticket.offset()), (item.partition, item.offset));
            if let Some(l) = lane(order, item) {
                for (_, other) in running {
                    prop_assert_ne!(lane(order, other), Some(l), "two of one lane at once");
                }
                // First attempts run in offset order (a redelivery normally runs before the
                // lane moves on, but a full scheduler may give its hold up).
                if !item.retry {
                    let last = last_started.entry((l, item.partition)).or_insert(0);
                    prop_assert!(item.offset >= *last, "lane out of offset order");
                    *last = item.offset + 1;
                }
            }
            Ok(())
        };

        for step in steps {
            match step {
                Step::Push { partition, key } => {
                    if !scheduler.has_room() {
                        let item = Item { partition: 0, offset: 0, key: None, retry: false };
                        prop_assert!(scheduler.push(0, 0, None, item).is_err());
                        continue;
                    }
                    // A redelivery of this partition comes first, as the consumer would send it.
                    let item = match redeliveries.iter().position(|r| r.partition == partition) {
                        Some(i) => redeliveries.remove(i),
                        None => {
                            let offset = next_offset.entry(partition).or_insert(0);
                            let item = Item { partition, offset: *offset, key, retry: false };
                            *offset += 1;
                            item
                        }
                    };
                    prop_assert!(scheduler
                        .push(item.partition, item.offset, key_bytes(item.key).as_ref(), item)
                        .is_ok());
                    pushed += 1;
                }
                Step::Start => {
                    while let Some((ticket, item)) = scheduler.start() {
                        check_start(&mut last_started, &item, &ticket, &running)?;
                        running.push((ticket, item));
                        started += 1;
                    }
                }
                Step::Finish { index, redeliver } => {
                    if running.is_empty() {
                        continue;
                    }
                    let (ticket, item) = running.remove(index % running.len());
                    if redeliver {
                        scheduler.finish(ticket, Finish::Redeliver);
                        redeliveries.push(Item { retry: true, ..item });
                    } else {
                        scheduler.finish(ticket, Finish::Done);
                    }
                }
                Step::Drop { partition } => {
                    let gone = scheduler.drop_partition(partition);
                    prop_assert!(gone.iter().all(|item| item.partition == partition));
                    dropped += gone.len();
                    redeliveries.retain(|r| r.partition != partition);
                    // After a seek the partition starts over from a new position.
                    next_offset.insert(partition, next_offset.get(&partition).copied().unwrap_or(0) + 100);
                    last_started.retain(|(_, p), _| *p != partition);
                }
            }
            prop_assert!(scheduler.running() <= concurrency);
            prop_assert_eq!(scheduler.running(), running.len());
            prop_assert!(scheduler.waiting() <= total);
            prop_assert_eq!(scheduler.waiting(), pushed - started - dropped);
            // Memory: lanes only for what runs, waits or is held.
            prop_assert!(scheduler.lanes() <= running.len() + scheduler.waiting() + redeliveries.len());
        }

        // Drain as the consumer would: finish everything, push the redeliveries owed.
        let mut rounds = 0;
        loop {
            rounds += 1;
            prop_assert!(rounds < 10_000, "drain did not end");
            for (ticket, _) in running.drain(..) {
                scheduler.finish(ticket, Finish::Done);
            }
            while let Some((ticket, item)) = scheduler.start() {
                started += 1;
                running.push((ticket, item));
            }
            if !running.is_empty() {
                continue;
            }
            match redeliveries.pop() {
                Some(item) => {
                    prop_assert!(scheduler.has_room(), "stuck: full, idle and still held");
                    prop_assert!(scheduler
                        .push(item.partition, item.offset, key_bytes(item.key).as_ref(), item)
                        .is_ok());
                    pushed += 1;
                }
                None => break,
            }
        }
        prop_assert_eq!(pushed, started + dropped);
        prop_assert!(scheduler.is_idle());
        prop_assert_eq!(scheduler.lanes(), 0);
    }
}

fn limits(concurrency: usize, per_lane: usize, total: usize) -> Limits {
    Limits {
        concurrency,
        max_waiting_per_lane: per_lane,
        max_waiting: total,
    }
}

#[test]
fn different_keys_run_in_parallel_same_key_waits() {
    let mut s = Scheduler::new(OrderBy::Key, limits(8, 4, 16));
    let a = Bytes::from_static(b"a");
    let b = Bytes::from_static(b"b");
    s.push(0, 0, Some(&a), "a0").expect("room");
    s.push(0, 1, Some(&a), "a1").expect("room");
    s.push(0, 2, Some(&b), "b2").expect("room");
    let (t0, first) = s.start().expect("a0 starts");
    let (t2, second) = s.start().expect("b2 starts beside it");
    assert_eq!((first, second), ("a0", "b2"));
    assert!(s.start().is_none(), "a1 waits for a0");
    s.finish(t0, Finish::Done);
    let (t1, third) = s.start().expect("a1 starts after a0");
    assert_eq!(third, "a1");
    s.finish(t1, Finish::Done);
    s.finish(t2, Finish::Done);
    assert!(s.is_idle());
    assert_eq!(s.lanes(), 0);
}

#[test]
fn a_hot_lane_stops_intake_at_its_bound() {
    let mut s = Scheduler::new(OrderBy::Key, limits(4, 3, 100));
    let hot = Bytes::from_static(b"hot");
    for offset in 0..3 {
        s.push(0, offset, Some(&hot), offset).expect("room");
    }
    assert!(!s.has_room(), "a full lane stops intake");
    assert_eq!(s.push(0, 3, Some(&hot), 3), Err(3));
    let (ticket, _) = s.start().expect("one starts");
    assert!(s.has_room(), "room again once one left the lane's queue");
    s.finish(ticket, Finish::Done);
}

#[test]
fn a_redelivery_goes_first_in_its_held_lane() {
    let mut s = Scheduler::new(OrderBy::Key, limits(4, 4, 16));
    let k = Bytes::from_static(b"k");
    s.push(0, 0, Some(&k), "first").expect("room");
    let (ticket, _) = s.start().expect("starts");
    s.push(0, 1, Some(&k), "second").expect("room");
    s.finish(ticket, Finish::Redeliver);
    assert!(s.start().is_none(), "held for the redelivery");
    s.push(0, 0, Some(&k), "first again").expect("room");
    let (ticket, item) = s.start().expect("the redelivery starts");
    assert_eq!(item, "first again");
    s.finish(ticket, Finish::Done);
    assert_eq!(s.start().map(|(_, item)| item), Some("second"));
}

#[test]
fn drop_partition_drops_queued_work_and_releases_holds() {
    let mut s = Scheduler::new(OrderBy::Key, limits(1, 4, 16));
    let k = Bytes::from_static(b"k");
    s.push(0, 0, Some(&k), 0).expect("room");
    s.push(1, 0, None, 10).expect("room");
    s.push(0, 1, Some(&k), 1).expect("room");
    let (ticket, item) = s.start().expect("starts");
    assert_eq!(item, 0);
    s.finish(ticket, Finish::Redeliver);
    assert_eq!(s.drop_partition(0), vec![1]);
    assert_eq!(s.waiting(), 1);
    let (ticket, item) = s.start().expect("partition 1 still runs");
    assert_eq!(item, 10);
    s.finish(ticket, Finish::Done);
    assert!(s.is_idle());
    assert_eq!(s.lanes(), 0, "the released hold left no lane behind");
}

#[test]
fn a_full_scheduler_with_only_held_lanes_gives_up_the_holds() {
    let mut s = Scheduler::new(OrderBy::Partition, limits(2, 2, 2));
    s.push(0, 0, None, 0).expect("room");
    let (ticket, _) = s.start().expect("starts");
    s.finish(ticket, Finish::Redeliver);
    s.push(0, 1, None, 1).expect("room");
    s.push(0, 2, None, 2).expect("room");
    assert!(!s.has_room());
    // The redelivery of offset 0 cannot be pushed: the hold is given up.
    assert_eq!(s.start().map(|(_, item)| item), Some(1));
}
