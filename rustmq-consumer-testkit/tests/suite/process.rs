//! `Consumer::process` scenarios: per-key order under random handler latencies, the
//! concurrency bound, nacks, and a hot key's bounded memory.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use rustmq_consumer_core::process::OrderBy;
use rustmq_consumer_core::protocol::Record;
use rustmq_consumer_core::{sleep, Outcome, ProcessOptions, ProcessSummary, Runtime};
use rustmq_consumer_testkit::SharedBroker;

use super::{broker, committed, fast_config, splitmix, start, within, TOPIC};

/// Produces `per_partition` records to each of `partitions` partitions; `key_of(i)` gives the
/// `i`-th record's key (counting over all partitions).
fn produce_keyed(
    broker: &SharedBroker,
    partitions: u32,
    per_partition: u64,
    mut key_of: impl FnMut(u64) -> Option<String>,
) {
    let mut i = 0;
    for partition in 0..partitions {
        let records = (0..per_partition)
            .map(|offset| {
                let key = key_of(i);
                i += 1;
                Record {
                    key: key.map(Bytes::from),
                    ..Record::from_value(format!("p{partition}-{offset}"))
                }
            })
            .collect();
        broker
            .lock()
            .produce(TOPIC, partition, records)
            .expect("topic exists");
    }
}

/// What must not overlap: a key, or a partition.
type Lane = (Option<Bytes>, Option<u32>);

/// What the handlers saw, checked as they run.
#[derive(Default)]
struct Tracker {
    /// Lanes running now.
    running: HashSet<Lane>,
    /// Per lane and partition, the next first-attempt offset allowed (at least).
    next_offset: HashMap<(Lane, u32), u64>,
    current: usize,
    peak: usize,
    acked: u64,
    violations: Vec<String>,
}

/// The lane a delivery belongs to under `order`: what must not overlap.
fn lane(order: OrderBy, partition: u32, key: &Option<Bytes>) -> Option<Lane> {
    match (order, key) {
        (OrderBy::Unordered, _) => None,
        (OrderBy::Key, Some(key)) => Some((Some(key.clone()), None)),
        _ => Some((None, Some(partition))),
    }
}

/// Runs `process` until `expected` deliveries were acked, with handlers sleeping a seeded
/// 0..`max_latency_ms` ms and nacking the first attempt of offsets `nack` picks; checks every
/// lane's exclusivity and first-attempt offset order as the handlers run.
async fn run<R: Runtime + Clone>(
    rt: &R,
    broker: &SharedBroker,
    options: ProcessOptions,
    order: OrderBy,
    expected: u64,
    max_latency_ms: u64,
    nack: impl Fn(u64) -> bool,
) -> (Tracker, ProcessSummary) {
    let consumer = start(rt, broker, fast_config()).await;
    let tracker = RefCell::new(Tracker::default());
    let (all_done, done) = async_channel::bounded::<()>(1);
    let summary = within(
        rt,
        consumer.process_until(
            options,
            |delivery| {
                let (partition, offset, attempt) =
                    (delivery.partition(), delivery.offset(), delivery.attempt());
                let lane = lane(order, partition, &delivery.record().key);
                let mut seed = u64::from(partition) << 32 ^ offset ^ u64::from(attempt) << 48;
                let latency = Duration::from_micros(splitmix(&mut seed) % (max_latency_ms * 1000));
                let tracker = &tracker;
                let all_done = all_done.clone();
                let nack = nack(offset) && attempt == 1;
                async move {
                    {
                        let mut guard = tracker.borrow_mut();
                        let t = &mut *guard;
                        t.current += 1;
                        t.peak = t.peak.max(t.current);
                        if let Some(lane) = &lane {
                            if !t.running.insert(lane.clone()) {
                                t.violations
                                    .push(format!("{lane:?} overlapped at {partition}/{offset}"));
                            }
                            if attempt == 1 {
                                let next =
                                    t.next_offset.entry((lane.clone(), partition)).or_insert(0);
                                if offset < *next {
                                    t.violations.push(format!(
                                        "{lane:?} ran {partition}/{offset} after {}",
                                        *next - 1
                                    ));
                                }
                                *next = offset + 1;
                            }
                        }
                    }
                    sleep(rt, latency).await;
                    let mut t = tracker.borrow_mut();
                    t.current -= 1;
                    if let Some(lane) = &lane {
                        t.running.remove(lane);
                    }
                    if nack {
                        return Outcome::Nack(None);
                    }
                    t.acked += 1;
                    if t.acked == expected {
                        let _ = all_done.try_send(());
                    }
                    Outcome::Ack
                }
            },
            async {
                let _ = done.recv().await;
            },
        ),
    )
    .await
    .expect("processing ends without a permanent error");
    within(rt, consumer.close()).await.expect("close");
    (tracker.into_inner(), summary)
}

/// Same key never overlaps and runs in offset order, different keys run in parallel, under
/// random handler latencies; everything is acked and committed.
pub async fn process_in_key_order<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 0);
    let mut seed = 7;
    produce_keyed(&broker, 2, 300, |_| {
        Some(format!("k{}", splitmix(&mut seed) % 12))
    });
    let options = ProcessOptions::new(8);
    let (tracker, summary) = run(&rt, &broker, options, OrderBy::Key, 600, 3, |_| false).await;
    assert!(tracker.violations.is_empty(), "{:?}", tracker.violations);
    assert!(tracker.peak <= 8, "{} handlers at once", tracker.peak);
    assert!(tracker.peak > 1, "different keys never ran in parallel");
    assert_eq!((summary.acked, summary.refused), (600, 0));
    assert!(summary.peak_running <= 8);
    assert_eq!(committed(&broker, 0), Some(300));
    assert_eq!(committed(&broker, 1), Some(300));
}

/// Keyless records are ordered by partition; `Partition` order caps parallelism at the
/// partition count; `Unordered` fills `concurrency` and never exceeds it.
pub async fn process_concurrency_bound<R: Runtime + Clone>(rt: R) {
    for (order, concurrency, bound) in [
        (OrderBy::Key, 8, 3),
        (OrderBy::Partition, 8, 3),
        (OrderBy::Unordered, 4, 4),
    ] {
        let broker = broker(3, 0);
        produce_keyed(&broker, 3, 60, |_| None);
        let options = ProcessOptions::new(concurrency).order_by(order);
        let (tracker, summary) = run(&rt, &broker, options, order, 180, 2, |_| false).await;
        assert!(
            tracker.violations.is_empty(),
            "{order:?}: {:?}",
            tracker.violations
        );
        assert!(tracker.peak <= bound, "{order:?}: {} at once", tracker.peak);
        assert!(tracker.peak > 1, "{order:?}: never in parallel");
        assert_eq!(summary.acked, 180);
        for partition in 0..3 {
            assert_eq!(committed(&broker, partition), Some(60), "{order:?}");
        }
    }
}

/// Nacked deliveries come back and are acked; first attempts keep their key's order and the
/// commit covers everything.
pub async fn process_nacks<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 0);
    produce_keyed(&broker, 1, 200, |i| Some(format!("k{}", i % 5)));
    let options = ProcessOptions::new(4);
    let (tracker, summary) = run(&rt, &broker, options, OrderBy::Key, 200, 2, |offset| {
        offset % 9 == 0
    })
    .await;
    assert!(tracker.violations.is_empty(), "{:?}", tracker.violations);
    assert_eq!((summary.acked, summary.nacked), (200, 23));
    assert_eq!(committed(&broker, 0), Some(200));
}

/// One key holding 90% of the messages: its queue stays at its bound (intake stops), the
/// total waiting stays at its bound, and everything still gets through in order.
pub async fn process_hot_key_bounded<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 0);
    let mut seed = 11;
    produce_keyed(&broker, 2, 200, |_| {
        let draw = splitmix(&mut seed) % 100;
        Some(if draw < 90 {
            "hot".to_owned()
        } else {
            format!("k{draw}")
        })
    });
    let options = ProcessOptions::new(16)
        .max_waiting_per_key(8)
        .max_waiting(24);
    let (tracker, summary) = run(&rt, &broker, options, OrderBy::Key, 400, 1, |_| false).await;
    assert!(tracker.violations.is_empty(), "{:?}", tracker.violations);
    assert!(
        summary.peak_waiting <= 24,
        "{} waiting",
        summary.peak_waiting
    );
    assert_eq!(summary.acked, 400);
    assert_eq!(committed(&broker, 0), Some(200));
    assert_eq!(committed(&broker, 1), Some(200));
}

/// A seek from inside a handler: queued deliveries past it go stale and are dropped (or their
/// settles refused), the partition is read again from the new position, and the commit ends
/// at the end of the partition.
pub async fn process_through_a_seek<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 0);
    produce_keyed(&broker, 1, 100, |i| Some(format!("k{}", i % 6)));
    let consumer = start(&rt, &broker, fast_config()).await;
    let sought = RefCell::new(false);
    let (finished, done) = async_channel::bounded::<()>(1);
    let summary = within(
        &rt,
        consumer.process_until(
            ProcessOptions::new(4),
            |delivery| {
                let offset = delivery.offset();
                let (consumer, sought, finished) = (&consumer, &sought, finished.clone());
                let after_seek = *sought.borrow();
                async move {
                    if offset == 60 && !*sought.borrow() {
                        consumer.seek(0, 30).await.expect("seek");
                        *sought.borrow_mut() = true;
                    }
                    if offset == 99 && after_seek {
                        let _ = finished.try_send(());
                    }
                    Outcome::Ack
                }
            },
            async {
                let _ = done.recv().await;
            },
        ),
    )
    .await
    .expect("processing ends");
    within(&rt, consumer.close()).await.expect("close");
    assert!(*sought.borrow());
    assert!(
        summary.dropped_stale + summary.refused > 0,
        "nothing past the seek was outstanding: {summary:?}"
    );
    assert_eq!(committed(&broker, 0), Some(100));
}

/// A close from another handle while handlers run: the close waits for the running (and
/// already queued) handlers, whose acks are all accepted, and the commit covers exactly what
/// they acked; then the run ends.
pub async fn process_then_close<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 0);
    produce_keyed(&broker, 1, 200, |i| Some(format!("k{}", i % 7)));
    let consumer = start(&rt, &broker, fast_config()).await;
    let handled = std::cell::Cell::new(0u64);
    let (enough, wait_enough) = async_channel::bounded::<()>(1);
    let processing = consumer.process(ProcessOptions::new(4), |_| {
        let (rt, handled, enough) = (&rt, &handled, enough.clone());
        async move {
            sleep(rt, Duration::from_millis(2)).await;
            handled.set(handled.get() + 1);
            if handled.get() == 20 {
                let _ = enough.try_send(());
            }
            Outcome::Ack
        }
    });
    let closing = async {
        wait_enough.recv().await.expect("20 handled");
        consumer.close().await
    };
    let (summary, closed) = within(&rt, futures_lite::future::zip(processing, closing)).await;
    closed.expect("close");
    let summary = summary.expect("processing ends when the consumer closes");
    assert!(summary.acked >= 20, "{summary:?}");
    assert_eq!(summary.refused, 0, "{summary:?}");
    assert_eq!(summary.acked, handled.get());
    assert_eq!(committed(&broker, 0), Some(summary.acked));
}
