//! The driver conformance suite, written once as generic async fns over any [`Runtime`].
//!
//! `conformance.rs` runs every scenario unchanged on tokio (paused clock), smol (real clock)
//! and the testkit's virtual runtime. Timings are short so the real-clock run is quick; no
//! assertion depends on how long anything took.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{future, StreamExt};
use rustmq_consumer_core::driver::Delivery;
use rustmq_consumer_core::protocol::TopicPartition;
use rustmq_consumer_core::{
    sleep, timeout, AsyncTimer, ConfigError, ConfigUpdateError, Consumer, ConsumerBuilder,
    ConsumerConfig, ConsumerError, Event, Health, Runtime, UsageError,
};
use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport};

mod listener;
pub use listener::{
    assign_hook_seeks_before_the_first_delivery, event_stream_is_bounded_and_never_blocks,
    failing_hook_is_reported_and_the_consumer_goes_on, revoke_hook_acks_are_in_the_revoke_commit,
};
mod process;
pub use process::{
    process_concurrency_bound, process_hot_key_bounded, process_in_key_order, process_nacks,
    process_then_close, process_through_a_seek,
};

pub const TOPIC: &str = "orders";
pub const GROUP: &str = "billing";
pub const DLQ: &str = "dead_letter_queue";

/// Longest any single step may take before the test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

/// A config whose every timer is a few milliseconds, so real-clock runs are quick.
pub fn fast_config() -> ConsumerConfig {
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.fetch_size = 20;
    config.max_unacked = 64;
    config.ack_batch_size = 10;
    config.ack_batch_timeout = Duration::from_millis(5);
    config.retry_backoff_base = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(4);
    config.empty_fetch_backoff_min = Duration::from_millis(1);
    config.empty_fetch_backoff_max = Duration::from_millis(5);
    config.request_timeout = Duration::from_secs(5);
    config.drain_timeout = Duration::from_secs(5);
    config.recovery_timeout = Duration::from_millis(50);
    config
}

/// A broker with `TOPIC` (`partitions` partitions, `messages` values `m<i>` in partition 0),
/// and the dead-letter topic; no group until a consumer joins it.
pub fn broker(partitions: u32, messages: usize) -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, partitions);
    broker.create_topic(DLQ, 1);
    if messages > 0 {
        broker
            .produce_values(TOPIC, 0, (0..messages).map(|i| format!("m{i}")))
            .expect("topic exists");
    }
    SharedBroker::new(broker)
}

pub async fn start<R: Runtime + Clone>(
    rt: &R,
    broker: &SharedBroker,
    config: ConsumerConfig,
) -> Consumer {
    ConsumerBuilder::with_runtime(rt.clone())
        .topic(TOPIC)
        .consumer_group(GROUP)
        .config(config)
        .client(SimTransport::new(broker.clone(), rt.clone()))
        .build()
        .await
        .expect("valid consumer")
}

/// As [`start`], every request answered `latency` after it was sent.
pub async fn start_slow<R: Runtime + Clone>(
    rt: &R,
    broker: &SharedBroker,
    config: ConsumerConfig,
    latency: Duration,
) -> Consumer {
    ConsumerBuilder::with_runtime(rt.clone())
        .config(config)
        .client(SimTransport::new(broker.clone(), rt.clone()).with_latency(latency))
        .build()
        .await
        .expect("valid consumer")
}

/// Waits for `future`, failing the test after `GUARD` on the runtime's clock.
pub async fn within<R: Runtime, F: Future>(rt: &R, future: F) -> F::Output {
    timeout(rt, GUARD, future)
        .await
        .expect("step did not finish in time")
}

pub async fn next<R: Runtime>(rt: &R, consumer: &Consumer) -> Delivery {
    within(rt, consumer.receive())
        .await
        .expect("receive")
        .expect("a delivery")
}

/// The next delivery if one comes within `wait` on the runtime's clock.
pub async fn maybe_next<R: Runtime>(
    rt: &R,
    consumer: &Consumer,
    wait: Duration,
) -> Option<Delivery> {
    timeout(rt, wait, consumer.receive())
        .await
        .map(|r| r.expect("receive").expect("open consumer"))
}

pub fn committed(broker: &SharedBroker, partition: u32) -> Option<u64> {
    broker
        .lock()
        .committed(GROUP, &TopicPartition::new(TOPIC, partition))
}

fn value(delivery: &Delivery) -> String {
    String::from_utf8_lossy(delivery.value()).into_owned()
}

// ------------------------------------------------------------------ scenarios

/// Every message arrives once, in order, with its topic, offset and first attempt.
pub async fn receive<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 50);
    let consumer = start(&rt, &broker, fast_config()).await;
    assert_eq!(consumer.assigned_partitions().await, vec![0]);
    for i in 0..50u64 {
        let d = next(&rt, &consumer).await;
        assert_eq!((d.partition(), d.offset(), d.attempt()), (0, i, 1));
        assert_eq!(d.topic(), TOPIC);
        assert_eq!(value(&d), format!("m{i}"));
        assert_eq!(d.record(), d.message());
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(50));
    assert!(consumer.receive().await.expect("receive").is_none());
    assert_eq!(consumer.metrics().await.acked, 50);
}

/// Regression: with many partitions, more inputs are ready at once than the driver handles
/// per wake-up, and the driver used to take the first one past its batch from its source and
/// drop it (a fetch answer lost: its partition stalled until the request timed out).
pub async fn many_partitions<R: Runtime + Clone>(rt: R) {
    const PARTITIONS: u32 = 300;
    const PER_PARTITION: usize = 4;
    let broker = broker(PARTITIONS, 0);
    for p in 0..PARTITIONS {
        broker
            .lock()
            .produce_values(TOPIC, p, (0..PER_PARTITION).map(|i| format!("p{p}-m{i}")))
            .expect("topic exists");
    }
    let mut config = fast_config();
    config.partitions = (0..PARTITIONS).collect();
    config.fetch_size = 1000;
    config.max_unacked = 1000;
    // Drained partitions poll for more: keep that slow, or on a real clock a debug build
    // spends its time on empty fetches.
    config.empty_fetch_backoff_min = Duration::from_millis(100);
    config.empty_fetch_backoff_max = Duration::from_secs(1);
    let consumer = start(&rt, &broker, config).await;
    let mut next_offset = vec![0u64; PARTITIONS as usize];
    for _ in 0..PARTITIONS as usize * PER_PARTITION {
        let d = next(&rt, &consumer).await;
        let expected = &mut next_offset[d.partition() as usize];
        assert_eq!(
            d.offset(),
            *expected,
            "partition {} out of order",
            d.partition()
        );
        *expected += 1;
        d.ack().await.expect("ack");
    }
    assert_eq!(consumer.metrics().await.requests_failed, 0);
    within(&rt, consumer.close()).await.expect("close");
    for p in 0..PARTITIONS {
        assert_eq!(
            committed(&broker, p),
            Some(PER_PARTITION as u64),
            "partition {p}"
        );
    }
}

/// Out-of-order acks never commit past a gap; filling it commits everything.
pub async fn out_of_order_acks<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 10);
    let mut config = fast_config();
    config.enable_auto_commit = false;
    let consumer = start(&rt, &broker, config).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(next(&rt, &consumer).await);
    }
    let first = held.remove(0);
    assert_eq!(first.offset(), 0);
    for d in held.into_iter().rev() {
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.commit()).await.expect("commit");
    assert!(
        committed(&broker, 0).unwrap_or(0) == 0,
        "committed past the gap at 0"
    );
    first.ack().await.expect("ack");
    within(&rt, consumer.commit()).await.expect("commit");
    assert_eq!(committed(&broker, 0), Some(10));
    within(&rt, consumer.close()).await.expect("close");
}

/// A nacked message comes back with the next attempt number and its value, and can then be
/// acked; so does one whose handle was dropped unsettled. Its record went back to the
/// consumer with the nack (or the drop), so the redelivery comes from the cache, not from
/// the broker again.
pub async fn nack_and_retry<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 4);
    let consumer = start(&rt, &broker, fast_config()).await;
    let mut attempts: BTreeMap<u64, Vec<(u32, String)>> = BTreeMap::new();
    let mut acked = 0;
    while acked < 4 {
        let d = next(&rt, &consumer).await;
        attempts
            .entry(d.offset())
            .or_default()
            .push((d.attempt(), value(&d)));
        match (d.offset(), d.attempt()) {
            (0, 1) => d.nack().await.expect("nack"),
            (1, 1) => d
                .nack_with_delay(Duration::from_millis(3))
                .await
                .expect("nack with delay"),
            (3, 1) => drop(d),
            (2, 1) => {
                // The ack is queued at the call: its future, dropped unpolled, loses nothing
                // (no redelivery below).
                drop(d.ack());
                acked += 1;
            }
            _ => {
                d.ack().await.expect("ack");
                acked += 1;
            }
        }
    }
    let tried = |offset: u64, n: u32| -> Vec<(u32, String)> {
        (1..=n).map(|a| (a, format!("m{offset}"))).collect()
    };
    assert_eq!(attempts[&0], tried(0, 2));
    assert_eq!(attempts[&1], tried(1, 2));
    assert_eq!(attempts[&2], tried(2, 1));
    assert_eq!(attempts[&3], tried(3, 2));
    let m = within(&rt, consumer.metrics()).await;
    assert_eq!(
        (m.retried, m.refetches, m.cache_hits),
        (3, 0, 3),
        "every retry from the cache: {m:?}"
    );
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(4));
    let metrics = consumer.metrics().await;
    assert_eq!((metrics.nacked, metrics.retried, metrics.acked), (3, 3, 4));
}

/// A `Duration::MAX` retry delay, or a configured timeout too long for an `Instant`, means
/// never: the consumer goes on (it used to panic in its driver on `Instant + Duration`).
pub async fn durations_too_long_for_an_instant<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 2);
    let mut config = fast_config();
    config.ack_batch_timeout = Duration::MAX;
    config.request_timeout = Duration::MAX;
    config.drain_timeout = Duration::MAX;
    let consumer = start(&rt, &broker, config).await;
    let first = next(&rt, &consumer).await;
    assert_eq!(first.offset(), 0);
    first.nack_with_delay(Duration::MAX).await.expect("nack");
    let second = next(&rt, &consumer).await;
    assert_eq!((second.offset(), second.attempt()), (1, 1));
    second.ack().await.expect("ack");
    assert!(
        maybe_next(&rt, &consumer, Duration::from_millis(50))
            .await
            .is_none(),
        "no redelivery of offset 0"
    );
    assert_eq!(timeout(&rt, Duration::MAX, async { 7 }).await, Some(7));
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), None, "offset 0 never settled");
}

/// A rejected message and a message out of retries both land in the dead-letter topic, and
/// their offsets settle.
pub async fn reject_to_dead_letter<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 5);
    let mut config = fast_config();
    config.dead_letter_queue = Some(DLQ.to_owned());
    config.max_retry_attempts = 2;
    let consumer = start(&rt, &broker, config).await;
    let mut deliveries_of_3 = 0;
    let mut done = 0;
    while done < 5 {
        let d = next(&rt, &consumer).await;
        match d.offset() {
            1 => {
                d.reject("unparseable").await.expect("reject");
                done += 1;
            }
            3 => {
                deliveries_of_3 += 1;
                let last = d.attempt() == 3;
                d.nack().await.expect("nack");
                if last {
                    done += 1;
                }
            }
            _ => {
                d.ack().await.expect("ack");
                done += 1;
            }
        }
    }
    assert_eq!(deliveries_of_3, 3, "delivered max_retry_attempts + 1 times");
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(5));
    let dead: Vec<String> = broker
        .lock()
        .records(DLQ, 0)
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(dead, vec!["m1".to_owned(), "m3".to_owned()]);
    assert_eq!(consumer.metrics().await.dead_lettered, 2);
}

/// A live update takes effect at the next input: a lowered retry limit dead-letters the next
/// nack of a message past it; a fixed setting and an invalid value are refused, changing
/// nothing; after close every update is refused.
pub async fn update_config<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 3);
    let mut config = fast_config();
    config.dead_letter_queue = Some(DLQ.to_owned());
    config.max_retry_attempts = 5;
    let consumer = start(&rt, &broker, config).await;
    let mut done = 0;
    let mut attempts_of_0 = Vec::new();
    while done < 3 {
        let d = next(&rt, &consumer).await;
        if d.offset() != 0 {
            d.ack().await.expect("ack");
            done += 1;
            continue;
        }
        attempts_of_0.push(d.attempt());
        if d.attempt() == 2 {
            let now = within(&rt, consumer.update_config(|c| c.max_retry_attempts = 1))
                .await
                .expect("a live setting");
            assert_eq!(now.max_retry_attempts, 1);
            done += 1;
        }
        d.nack().await.expect("nack");
    }
    let refused = consumer
        .update_config(|c| c.topic = "elsewhere".into())
        .await;
    assert_eq!(
        refused,
        Err(ConsumerError::ConfigUpdate(ConfigUpdateError::Fixed(
            "topic"
        )))
    );
    let refused = consumer.update_config(|c| c.fetch_size = 0).await;
    assert_eq!(
        refused,
        Err(ConsumerError::ConfigUpdate(ConfigUpdateError::Invalid(
            ConfigError::Zero("fetch_size")
        )))
    );
    // A panicking edit panics in the caller; the consumer goes on unchanged.
    let edit = consumer.update_config(|c| {
        c.fetch_size = 1;
        panic!("a bug in the edit");
    });
    let panicked = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(edit));
    assert!(
        panicked.await.is_err(),
        "the edit's panic reaches the caller"
    );
    let config = consumer.config().await.expect("running");
    assert_eq!((config.max_retry_attempts, config.fetch_size), (1, 20));
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(
        attempts_of_0,
        [1, 2],
        "the second nack is past the new limit"
    );
    assert_eq!(broker.lock().records(DLQ, 0).len(), 1);
    assert_eq!(committed(&broker, 0), Some(3));
    let late = consumer.update_config(|c| c.max_retry_attempts = 3).await;
    assert_eq!(
        late,
        Err(ConsumerError::ConfigUpdate(ConfigUpdateError::Closed))
    );
}

/// A paused partition delivers nothing until resumed.
pub async fn pause_resume<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 0);
    let consumer = start(&rt, &broker, fast_config()).await;
    consumer.pause_partitions(&[0]).await.expect("pause");
    assert_eq!(
        consumer.pause_partitions(&[7]).await,
        Err(ConsumerError::Usage(UsageError::UnknownPartition(7)))
    );
    broker
        .lock()
        .produce_values(TOPIC, 0, (0..10).map(|i| format!("m{i}")))
        .expect("partition 0 exists");
    let early = maybe_next(&rt, &consumer, Duration::from_millis(200)).await;
    assert!(early.is_none(), "paused partition delivered {early:?}");
    consumer.resume_partitions(&[0]).await.expect("resume");
    for i in 0..10 {
        let d = next(&rt, &consumer).await;
        assert_eq!(
            (d.partition(), d.offset(), value(&d)),
            (0, i, format!("m{i}"))
        );
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(10));
}

/// Pause takes effect at once for the application: deliveries already queued for it when
/// `pause_partitions` returns stay held (not by `receive`, `receive_many` or the stream) and
/// come after the resume, in order, each exactly once.
pub async fn pause_holds_queued_deliveries<R: Runtime + Clone>(rt: R) {
    use futures_lite::StreamExt;

    const EACH: u64 = 30;
    let broker = broker(2, EACH as usize);
    broker
        .lock()
        .produce_values(TOPIC, 1, (0..EACH).map(|i| format!("p1-{i}")))
        .expect("partition 1 exists");
    let mut config = fast_config();
    config.partitions = vec![0, 1];
    config.fetch_size = 100;
    config.max_unacked = 100;
    let consumer = start(&rt, &broker, config).await;
    let first = next(&rt, &consumer).await;
    let mut seen = vec![(first.partition(), first.offset())];
    first.ack().await.expect("ack");
    // Wait (bounded) until the machine has handed out every message: all of them are queued
    // for the application when it pauses.
    let mut waits = 0;
    while consumer.metrics().await.delivered < 2 * EACH {
        waits += 1;
        assert!(waits <= 1_000, "not every message was delivered in time");
        sleep(&rt, Duration::from_millis(1)).await;
    }
    let paused = if seen[0].0 == 0 { 0 } else { 1 };
    let flowing = 1 - paused;
    let queued = consumer.metrics().await.in_flight_deliveries;
    assert_eq!(
        queued,
        2 * EACH - 1,
        "queued for the application at the pause"
    );
    consumer.pause_partitions([paused]).await.expect("pause");

    // Everything of the other partition, through each way of receiving, and nothing paused.
    let mut during = Vec::new();
    for _ in 0..10 {
        during.push(next(&rt, &consumer).await);
    }
    while during.len() < 20 {
        let batch = within(&rt, consumer.receive_many(20 - during.len()))
            .await
            .expect("receive_many");
        assert!(!batch.is_empty(), "receive_many ended early");
        during.extend(batch);
    }
    let mut stream = consumer.stream();
    while during.len() < EACH as usize {
        during.push(
            within(&rt, stream.next())
                .await
                .expect("a delivery")
                .expect("no outage"),
        );
    }
    let quiet = Duration::from_millis(100);
    let extra = maybe_next(&rt, &consumer, quiet).await;
    assert!(extra.is_none(), "delivered while paused: {extra:?}");
    let extra = timeout(&rt, quiet, consumer.receive_many(10)).await;
    assert!(extra.is_none(), "receive_many while paused: {extra:?}");
    let extra = timeout(&rt, quiet, stream.next()).await;
    assert!(extra.is_none(), "stream while paused: {extra:?}");
    let from_paused = during.iter().filter(|d| d.partition() == paused).count();
    assert_eq!(from_paused, 0, "deliveries of the paused partition");
    for d in during {
        seen.push((d.partition(), d.offset()));
        d.ack().await.expect("ack");
    }

    // Resumed: what it held comes, in order; paused again half-way, it holds the rest again.
    consumer
        .resume_partitions(vec![paused])
        .await
        .expect("resume");
    for _ in 0..10 {
        let d = next(&rt, &consumer).await;
        seen.push((d.partition(), d.offset()));
        d.ack().await.expect("ack");
    }
    consumer.pause_partitions(&[paused]).await.expect("pause");
    let extra = maybe_next(&rt, &consumer, quiet).await;
    assert!(extra.is_none(), "delivered while paused again: {extra:?}");
    consumer.resume_partitions(&[paused]).await.expect("resume");
    while seen.len() < 2 * EACH as usize {
        let d = next(&rt, &consumer).await;
        seen.push((d.partition(), d.offset()));
        d.ack().await.expect("ack");
    }
    let extra = maybe_next(&rt, &consumer, quiet).await;
    assert!(extra.is_none(), "delivered twice: {extra:?}");
    for p in [paused, flowing] {
        let offsets: Vec<u64> = seen.iter().filter(|s| s.0 == p).map(|s| s.1).collect();
        assert_eq!(offsets, (0..EACH).collect::<Vec<_>>(), "partition {p}");
    }
    let metrics = consumer.metrics().await;
    assert_eq!((metrics.delivered, metrics.retried), (2 * EACH, 0));
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(
        (committed(&broker, 0), committed(&broker, 1)),
        (Some(EACH), Some(EACH))
    );
}

/// Each partition delivers its own records, and pausing one leaves the other flowing.
pub async fn two_partitions<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 10);
    let mut config = fast_config();
    config.partitions = vec![0, 1];
    let consumer = start(&rt, &broker, config).await;
    consumer.pause_partitions(&[1]).await.expect("pause");
    broker
        .lock()
        .produce_values(TOPIC, 1, (0..10).map(|i| format!("p1-{i}")))
        .expect("partition 1 exists");
    for i in 0..10 {
        let d = next(&rt, &consumer).await;
        assert_eq!(
            (d.partition(), d.offset(), value(&d)),
            (0, i, format!("m{i}"))
        );
        d.ack().await.expect("ack");
    }
    consumer.resume_partitions(&[1]).await.expect("resume");
    for i in 0..10 {
        let d = next(&rt, &consumer).await;
        assert_eq!(
            (d.partition(), d.offset(), value(&d)),
            (1, i, format!("p1-{i}"))
        );
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(
        (committed(&broker, 0), committed(&broker, 1)),
        (Some(10), Some(10))
    );
}

/// Seek moves the position; deliveries from before it are stale: a held one cannot be acked,
/// queued ones are never handed out.
pub async fn seek<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 20);
    let consumer = start(&rt, &broker, fast_config()).await;
    for i in 0..5 {
        let d = next(&rt, &consumer).await;
        assert_eq!(d.offset(), i);
        d.ack().await.expect("ack");
    }
    let held = next(&rt, &consumer).await;
    assert_eq!(held.offset(), 5);
    let old_epoch = held.tag().epoch;
    consumer.seek(0, 15).await.expect("seek");
    assert_eq!(
        held.ack().await,
        Err(ConsumerError::Usage(UsageError::StaleDelivery {
            partition: 0,
            offset: 5
        }))
    );
    let mut stale = 0;
    let mut fresh = Vec::new();
    while fresh.len() < 5 {
        let d = next(&rt, &consumer).await;
        if d.tag().epoch == old_epoch {
            // Delivered before the seek, still queued: refused.
            assert!(matches!(
                d.ack().await,
                Err(ConsumerError::Usage(UsageError::StaleDelivery { .. }))
            ));
            stale += 1;
        } else {
            fresh.push(d.offset());
            d.ack().await.expect("ack");
        }
    }
    // Deliveries queued before the seek went stale: dropped before the application took them.
    assert_eq!(stale, 0, "stale deliveries handed out");
    assert_eq!(fresh, vec![15, 16, 17, 18, 19]);
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(20));
    assert!(consumer.seek(0, 0).await.is_err(), "seek after close");
}

/// Lag is the high watermark minus the committed offset.
pub async fn lag<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 30);
    let mut config = fast_config();
    config.enable_auto_commit = false;
    let consumer = start(&rt, &broker, config).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let d = next(&rt, &consumer).await;
        held.push(d);
    }
    for d in held {
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.commit()).await.expect("commit");
    let by_partition = consumer.get_lag().await.expect("lag");
    assert_eq!(by_partition, [(0, 20)].into_iter().collect());
    let lag = consumer.lag_details().await;
    assert_eq!(lag.len(), 1);
    let p0 = lag[0];
    assert_eq!(p0.partition, 0);
    assert_eq!(p0.high_watermark, Some(30));
    assert_eq!(p0.committed, Some(10));
    assert_eq!(p0.lag, 20);
    assert!(p0.position >= 10 && p0.position <= 30);
    assert_eq!(p0.position_lag, 30 - p0.position);
    within(&rt, consumer.close()).await.expect("close");
}

/// `commit()` stores every settled offset; a failed commit is reported, then retried.
pub async fn commit<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 10);
    let mut config = fast_config();
    config.enable_auto_commit = false;
    let consumer = start(&rt, &broker, config).await;
    for _ in 0..6 {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    assert_eq!(
        committed(&broker, 0),
        None,
        "nothing committed before commit()"
    );
    broker.lock().fail_next_commits(1);
    let failed = within(&rt, consumer.commit()).await;
    match failed {
        Err(ConsumerError::Uncommitted { offsets, .. }) => {
            assert_eq!(offsets, [(0, 6)], "names what the broker did not store")
        }
        other => panic!("{other:?}"),
    }
    within(&rt, consumer.commit()).await.expect("commit");
    assert_eq!(committed(&broker, 0), Some(6));
    within(&rt, consumer.close()).await.expect("close");
}

/// Close commits every ack made before it, hands back dropped deliveries, is idempotent,
/// and refuses later acks.
pub async fn close<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 100);
    let mut config = fast_config();
    config.max_unacked = 100;
    config.fetch_size = 100;
    // `late` stays outstanding: the drain phase waits this long for it.
    config.drain_timeout = Duration::from_millis(300);
    config.ack_batch_size = 1000;
    config.ack_batch_timeout = Duration::from_secs(3600);
    let consumer = start(&rt, &broker, config).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(next(&rt, &consumer).await);
    }
    let late = held.pop().expect("100 deliveries");
    let rest = held.split_off(60);
    // Acks in a scrambled order: 59, 0, 58, 1, ...
    let mut order = Vec::new();
    while let Some(last) = held.pop() {
        order.push(last);
        if !held.is_empty() {
            order.push(held.remove(0));
        }
    }
    for d in order {
        d.ack().await.expect("ack");
    }
    drop(rest); // counted as nacks: redelivered to the next member
    let closer = consumer.clone();
    within(&rt, closer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(60));
    within(&rt, consumer.close())
        .await
        .expect("close is idempotent");
    assert_eq!(
        late.ack().await,
        Err(ConsumerError::Usage(UsageError::Closed))
    );
    assert!(consumer.receive().await.expect("receive").is_none());
    assert_eq!(consumer.health().await, Health::Closed);
    let metrics = consumer.metrics().await;
    assert_eq!(metrics.acked, 60);
    assert!(metrics.nacked >= 39, "{metrics:?}");
}

/// A manual assignment on a broker that knows no group yet: the consumer creates the group
/// itself (join and leave), and the broker stores exactly what was settled.
pub async fn manual_commits_create_the_group<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 10);
    assert_eq!(broker.lock().generation(GROUP), None, "no group before");
    let mut config = fast_config();
    config.partitions = vec![0, 1];
    config.enable_auto_commit = false;
    let consumer = start(&rt, &broker, config).await;
    for _ in 0..7 {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    within(&rt, consumer.commit()).await.expect("commit");
    assert_eq!(committed(&broker, 0), Some(7), "what was settled");
    assert_eq!(committed(&broker, 1), None, "nothing settled there");
    for _ in 7..10 {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(10));
    let broker = broker.lock();
    assert!(
        broker.generation(GROUP).is_some(),
        "the consumer created it"
    );
    assert!(broker.members(GROUP).is_empty(), "and left it at once");
}

/// Every commit refused: `commit()` and `close()` fail, naming the offsets the broker did not
/// store, instead of reporting success.
pub async fn close_names_uncommitted_offsets<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 10);
    let mut config = fast_config();
    config.partitions = vec![0];
    config.enable_auto_commit = false;
    config.drain_timeout = Duration::from_millis(200);
    let consumer = start(&rt, &broker, config).await;
    for _ in 0..6 {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    broker.lock().fail_next_commits(u32::MAX);
    let expected = vec![(0, 6)];
    match within(&rt, consumer.commit()).await {
        Err(ConsumerError::Uncommitted { offsets, .. }) => assert_eq!(offsets, expected),
        other => panic!("commit: {other:?}"),
    }
    match within(&rt, consumer.close()).await {
        Err(error @ ConsumerError::Uncommitted { .. }) => {
            assert_eq!(
                error.to_string(),
                "offsets not committed (partition 0 at 6): closed before the final commit was confirmed"
            );
            let ConsumerError::Uncommitted { offsets, .. } = error else {
                unreachable!()
            };
            assert_eq!(offsets, expected);
        }
        other => panic!("close: {other:?}"),
    }
    assert_eq!(committed(&broker, 0), None, "the broker stored nothing");
}

/// The deliveries stream yields the same messages as `receive`.
pub async fn stream<R: Runtime + Clone>(rt: R) {
    use futures_lite::StreamExt;
    let broker = broker(1, 20);
    let consumer = start(&rt, &broker, fast_config()).await;
    let mut stream = consumer.stream();
    let mut offsets = Vec::new();
    while offsets.len() < 20 {
        let d = within(&rt, stream.next())
            .await
            .expect("open stream")
            .expect("a delivery, no error");
        offsets.push(d.offset());
        d.ack().await.expect("ack");
    }
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
    within(&rt, consumer.close()).await.expect("close");
    assert!(
        within(&rt, stream.next()).await.is_none(),
        "stream ends after close"
    );
    assert_eq!(committed(&broker, 0), Some(20));
}

/// `receive_many` takes what is waiting (at least one, at most `max`); `ack_all` settles a
/// batch with one call, refusing the stale deliveries in it with the machine's own error.
pub async fn batches<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 60);
    let consumer = start(&rt, &broker, fast_config()).await;
    assert!(consumer
        .receive_many(0)
        .await
        .expect("receive_many")
        .is_empty());
    let mut offsets = Vec::new();
    while offsets.len() < 40 {
        let max = (40 - offsets.len()).min(8);
        let batch = within(&rt, consumer.receive_many(max))
            .await
            .expect("receive_many");
        assert!(!batch.is_empty() && batch.len() <= max, "{}", batch.len());
        offsets.extend(batch.iter().map(Delivery::offset));
        within(&rt, consumer.ack_all(batch)).await.expect("ack_all");
    }
    assert_eq!(offsets, (0..40).collect::<Vec<_>>());

    // Held across a seek: stale. The batch still acks its fresh deliveries.
    let held = vec![next(&rt, &consumer).await, next(&rt, &consumer).await];
    assert_eq!(held[0].offset(), 40);
    let old_epoch = held[0].tag().epoch;
    consumer.seek(0, 50).await.expect("seek");
    let mut batch = held;
    let mut fresh = 0;
    while fresh < 10 {
        let d = next(&rt, &consumer).await;
        if d.tag().epoch != old_epoch {
            assert_eq!(d.offset(), 50 + fresh);
            fresh += 1;
        }
        batch.push(d);
    }
    assert_eq!(
        within(&rt, consumer.ack_all(batch)).await,
        Err(ConsumerError::Usage(UsageError::StaleDelivery {
            partition: 0,
            offset: 40
        }))
    );
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(60));
    assert_eq!(consumer.metrics().await.acked, 50);
    assert!(consumer
        .receive_many(5)
        .await
        .expect("receive_many")
        .is_empty());
}

/// A delivery held across a rebalance that revoked its partition is stale: its ack is refused
/// (never a silent `Ok`), and acks of deliveries made after the rebalance are accepted. If the
/// rebalance gave the partition back instead (which member gets it depends on the join order,
/// and real clocks race), the held delivery is still this member's and its ack is accepted.
pub async fn stale_after_rebalance<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 40);
    let mut config = fast_config();
    config.session_timeout = Duration::from_secs(3);
    config.heartbeat_interval = Some(Duration::from_millis(5));
    config.rebalance_drain_timeout = Duration::from_millis(20);
    config.max_unacked = 1;
    let first = start(&rt, &broker, config.clone()).await;
    let held = next(&rt, &first).await;
    assert_eq!((held.partition(), held.offset()), (0, 0));
    let mut events = first.events();
    let mut second_config = config;
    second_config.consumer_id = Some("second".to_owned());
    second_config.seed ^= 1;
    let second = start(&rt, &broker, second_config).await;
    // Wait until the first consumer has been through the revoke and rejoined.
    let start_generation = broker.lock().generation(GROUP);
    within(&rt, async {
        loop {
            let generation = broker.lock().generation(GROUP);
            if generation != start_generation && broker.lock().members(GROUP).len() == 2 {
                break;
            }
            sleep(&rt, Duration::from_millis(5)).await;
        }
    })
    .await;
    sleep(&rt, Duration::from_millis(50)).await;
    let mut moved = false;
    while let Some(Some(notice)) = future::poll_once(events.next()).await {
        moved |=
            matches!(&notice.event, Event::Revoked(tps) if tps.iter().any(|tp| tp.partition == 0));
    }
    let expected = if moved {
        Err(ConsumerError::Usage(UsageError::StaleDelivery {
            partition: 0,
            offset: 0,
        }))
    } else {
        Ok(())
    };
    assert_eq!(held.ack().await, expected, "partition 0 moved: {moved}");
    within(&rt, second.close()).await.expect("close");
    // Alone again: everything left is delivered to the first consumer and acked.
    let mut acked = 0;
    while committed(&broker, 0).unwrap_or(0) + committed(&broker, 1).unwrap_or(0) < 40 {
        match maybe_next(&rt, &first, Duration::from_millis(50)).await {
            Some(d) => {
                d.ack().await.expect("ack after the rebalance");
                acked += 1;
            }
            None => within(&rt, first.commit()).await.expect("commit"),
        }
        assert!(acked <= 40, "acked {acked}");
    }
    within(&rt, first.close()).await.expect("close");
}

/// A rebalance that gives a paused partition back keeps its pause and the deliveries queued
/// for the application (issue 12 item 5): nothing of it comes until the resume, then every
/// offset once, in order, and every ack is accepted. (One that moves to another member loses
/// both: `tests/group.rs` covers the stale side.)
pub async fn paused_through_a_rebalance<R: Runtime + Clone>(rt: R) {
    let broker = broker(2, 40);
    let mut config = fast_config();
    config.session_timeout = Duration::from_secs(3);
    config.heartbeat_interval = Some(Duration::from_millis(5));
    config.rebalance_drain_timeout = Duration::from_millis(20);
    config.fetch_size = 100;
    config.max_unacked = 100;
    let first = start(&rt, &broker, config.clone()).await;
    let d = next(&rt, &first).await;
    assert_eq!((d.partition(), d.offset()), (0, 0));
    d.ack().await.expect("ack");
    within(&rt, first.commit()).await.expect("commit");
    let mut waits = 0;
    while first.metrics().await.delivered < 40 {
        waits += 1;
        assert!(waits <= 1_000, "not every message was delivered in time");
        sleep(&rt, Duration::from_millis(1)).await;
    }
    first.pause_partitions([0]).await.expect("pause");
    let mut events = first.events();
    let mut second_config = config;
    second_config.consumer_id = Some("second".to_owned());
    second_config.seed ^= 1;
    let second = start(&rt, &broker, second_config).await;
    let start_generation = broker.lock().generation(GROUP);
    within(&rt, async {
        loop {
            let generation = broker.lock().generation(GROUP);
            if generation != start_generation && broker.lock().members(GROUP).len() == 2 {
                break;
            }
            sleep(&rt, Duration::from_millis(5)).await;
        }
    })
    .await;
    within(&rt, second.close()).await.expect("close");
    // Alone again, with both partitions.
    within(&rt, async {
        while broker.lock().members(GROUP).len() != 1 || first.assigned_partitions().await != [0, 1]
        {
            sleep(&rt, Duration::from_millis(5)).await;
        }
    })
    .await;
    // Which member the coordinator gives partition 0 in between depends on the join order
    // (real clocks race): if it went to the second member, it was revoked, with its pause.
    let mut moved = false;
    while let Some(Some(notice)) = future::poll_once(events.next()).await {
        moved |=
            matches!(&notice.event, Event::Revoked(tps) if tps.iter().any(|tp| tp.partition == 0));
    }
    let early = maybe_next(&rt, &first, Duration::from_millis(200)).await;
    assert!(
        moved || early.is_none(),
        "still paused after the rebalance, yet delivered {early:?}"
    );
    first.resume_partitions([0]).await.expect("resume");
    let mut offsets = Vec::new();
    if let Some(d) = early {
        offsets.push(d.offset());
        d.ack().await.expect("ack");
    }
    while committed(&broker, 0).unwrap_or(0) < 40 {
        match maybe_next(&rt, &first, Duration::from_millis(50)).await {
            Some(d) => {
                offsets.push(d.offset());
                d.ack()
                    .await
                    .expect("a delivery held through the rebalance is accepted");
            }
            None => within(&rt, first.commit()).await.expect("commit"),
        }
        assert!(offsets.len() <= 39, "delivered {offsets:?}");
    }
    assert_eq!(offsets, (1..40).collect::<Vec<_>>());
    within(&rt, first.close()).await.expect("close");
}

/// A runtime that counts what is spawned through it.
#[derive(Debug, Clone)]
pub struct Counting<R> {
    inner: R,
    spawned: Arc<AtomicU64>,
}

impl<R: Runtime> Runtime for Counting<R> {
    fn now(&self) -> Instant {
        self.inner.now()
    }
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        self.inner.new_timer(deadline)
    }
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.spawned.fetch_add(1, Ordering::SeqCst);
        self.inner.spawn(future);
    }
}

/// One task per consumer, however many messages, acks and requests flow.
pub async fn one_driver_task<R: Runtime + Clone>(rt: R) {
    let rt = Counting {
        inner: rt,
        spawned: Arc::new(AtomicU64::new(0)),
    };
    let broker = broker(1, 500);
    let consumer = start(&rt, &broker, fast_config()).await;
    let mut acked = 0;
    while acked < 500 {
        let d = next(&rt, &consumer).await;
        if d.offset() % 7 == 3 && d.attempt() == 1 {
            d.nack().await.expect("nack");
        } else {
            d.ack().await.expect("ack");
            acked += 1;
            if acked % 100 == 0 {
                within(&rt, consumer.commit()).await.expect("commit");
            }
        }
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(500));
    let metrics = consumer.metrics().await;
    assert!(
        metrics.fetches > 1 && metrics.commits_sent > 1,
        "{metrics:?}"
    );
    assert_eq!(metrics.retried, 71);
    assert_eq!(rt.spawned.load(Ordering::SeqCst), 1);
}

/// The application may hold more deliveries than one fetch brings (`max_unacked` >
/// `fetch_size`): fetching must go on without any ack.
pub async fn holding_more_than_fetch_size<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 50);
    let mut config = fast_config();
    config.fetch_size = 10;
    config.max_unacked = 50;
    let consumer = start(&rt, &broker, config).await;
    let mut held = Vec::new();
    for i in 0..50 {
        let d = next(&rt, &consumer).await;
        assert_eq!(d.offset(), i);
        held.push(d);
    }
    for d in held {
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(50));
}

/// When the application stops settling, deliveries stop at `max_unacked`.
pub async fn bounded_when_not_acking<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 1000);
    let mut config = fast_config();
    config.max_unacked = 8;
    config.fetch_size = 16;
    let consumer = start(&rt, &broker, config).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(next(&rt, &consumer).await);
    }
    let extra = maybe_next(&rt, &consumer, Duration::from_millis(200)).await;
    assert!(extra.is_none(), "delivered past max_unacked: {extra:?}");
    let metrics = consumer.metrics().await;
    assert_eq!((metrics.delivered, metrics.in_flight_deliveries), (8, 8));
    assert!(
        metrics.buffered <= 16 && metrics.received < 100,
        "{metrics:?}"
    );
    for d in held {
        d.ack().await.expect("ack");
    }
    let d = next(&rt, &consumer).await;
    assert_eq!(d.offset(), 8);
    d.ack().await.expect("ack");
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(9));
}

/// Missing settings and bad configs are refused by `build()` with a clear error.
pub async fn bad_input<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 0);
    let transport = || SimTransport::new(broker.clone(), rt.clone());
    let no_topic = ConsumerBuilder::with_runtime(rt.clone())
        .consumer_group(GROUP)
        .client(transport())
        .build()
        .await;
    let no_topic = no_topic.err();
    assert_eq!(
        no_topic,
        Some(ConsumerError::Config(ConfigError::MissingTopic))
    );
    assert_eq!(
        no_topic.map(|e| e.to_string()).as_deref(),
        Some("invalid configuration: no topic given")
    );
    let no_group = ConsumerBuilder::with_runtime(rt.clone())
        .topic(TOPIC)
        .client(transport())
        .build()
        .await;
    assert_eq!(
        no_group.err(),
        Some(ConsumerError::Config(ConfigError::MissingGroup))
    );
    // The topic and the group may come from the config instead of the builder...
    let from_config = ConsumerBuilder::with_runtime(rt.clone())
        .config(fast_config())
        .client(transport())
        .build()
        .await
        .expect("topic and group from the config");
    assert_eq!(from_config.topic(), TOPIC);
    within(&rt, from_config.close()).await.expect("close");
    // ...but not two different ones, in either order.
    let twice = ConsumerBuilder::with_runtime(rt.clone())
        .topic("payments")
        .config(fast_config())
        .client(transport())
        .build()
        .await;
    assert_eq!(
        twice.err(),
        Some(ConsumerError::Config(ConfigError::Conflicting("topic")))
    );
    let twice = ConsumerBuilder::with_runtime(rt.clone())
        .config(fast_config())
        .consumer_group("audit")
        .client(transport())
        .build()
        .await;
    assert_eq!(
        twice.err().map(|e| e.to_string()).as_deref(),
        Some("invalid configuration: consumer group given twice with different values")
    );
    let no_transport = ConsumerBuilder::with_runtime(rt.clone())
        .topic(TOPIC)
        .consumer_group(GROUP)
        .build()
        .await;
    assert_eq!(no_transport.err(), Some(ConsumerError::MissingTransport));
    let mut bad = fast_config();
    bad.max_unacked = 0;
    let bad_config = ConsumerBuilder::with_runtime(rt.clone())
        .config(bad)
        .transport(transport())
        .build()
        .await;
    let error = bad_config.err();
    assert_eq!(
        error,
        Some(ConsumerError::Config(ConfigError::Zero("max_unacked")))
    );
    assert_eq!(
        error.map(|e| e.to_string()).as_deref(),
        Some("invalid configuration: max_unacked must be greater than zero")
    );
    // Queues are sized by it: `usize::MAX` used to panic in `build()` (capacity overflow).
    let mut huge = fast_config();
    huge.max_unacked = usize::MAX;
    let huge = ConsumerBuilder::with_runtime(rt.clone())
        .config(huge)
        .transport(transport())
        .build()
        .await;
    assert_eq!(
        huge.err(),
        Some(ConsumerError::Config(ConfigError::TooLarge("max_unacked")))
    );
}

/// `close_with_timeout` returns in time even when the close cannot finish, naming the settled
/// offsets the broker did not store.
pub async fn close_with_timeout<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 10);
    let mut config = fast_config();
    config.drain_timeout = Duration::from_secs(3600);
    let consumer = start(&rt, &broker, config).await;
    // The broker stores no commit: what is acked stays uncommitted.
    broker.lock().fail_next_commits(1_000_000);
    for _ in 0..3 {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    let held = next(&rt, &consumer).await;
    let result = within(&rt, consumer.close_with_timeout(Duration::from_millis(50))).await;
    match &result {
        Err(ConsumerError::CloseTimedOut { offsets, .. }) => {
            assert_eq!(offsets, &[(0, 3)], "names what the broker did not store")
        }
        other => panic!("expected CloseTimedOut, got {other:?}"),
    }
    assert_eq!(
        result.err().map(|e| e.to_string()).as_deref(),
        Some("close timed out; offsets not committed (partition 0 at 3)")
    );
    assert_eq!(committed(&broker, 0), None, "nothing was committed");
    assert!(consumer.receive().await.expect("receive").is_none());
    assert_eq!(
        held.ack().await,
        Err(ConsumerError::Usage(UsageError::Closed))
    );
}

// ------------------------------------------------------------------ differential

/// What the application saw of one seeded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Every delivery in arrival order: (offset, attempt, what the application did).
    pub ordered: Vec<(u64, u32, &'static str)>,
    /// The same, per message: the attempts and outcomes of each offset in order.
    pub per_message: BTreeMap<u64, Vec<(u32, &'static str)>>,
    /// Values in the dead-letter topic, in order.
    pub dead_letters: Vec<String>,
    /// Committed offset after close.
    pub committed: Option<u64>,
    /// (acked, nacked, rejected, retried, dead_lettered) after close.
    pub counters: (u64, u64, u64, u64, u64),
}

impl Trace {
    /// The run without the interleaving of messages (arrival order, dead-letter order),
    /// which depends on the clock.
    pub fn canonical(&self) -> Self {
        let mut dead_letters = self.dead_letters.clone();
        dead_letters.sort();
        Self {
            ordered: Vec::new(),
            dead_letters,
            ..self.clone()
        }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the application does with each message of a seeded scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Ack,
    RetryOnce,
    Poison,
    Reject,
}

/// A seeded scenario: message count and per-message behaviour and the consumer's seed all come
/// from `seed`.
pub async fn scripted<R: Runtime + Clone>(rt: R, seed: u64) -> Trace {
    let mut state = seed;
    let messages = 40 + splitmix(&mut state) % 60;
    let plans: Vec<Plan> = (0..messages)
        .map(|_| match splitmix(&mut state) % 10 {
            0 => Plan::Reject,
            1 => Plan::Poison,
            2 | 3 => Plan::RetryOnce,
            _ => Plan::Ack,
        })
        .collect();
    let broker = broker(1, messages as usize);
    let mut config = fast_config();
    config.seed = splitmix(&mut state);
    config.dead_letter_queue = Some(DLQ.to_owned());
    config.max_retry_attempts = 2;
    let consumer = start(&rt, &broker, config).await;
    let mut ordered = Vec::new();
    let mut finished = 0;
    while finished < messages {
        let d = next(&rt, &consumer).await;
        let (offset, attempt) = (d.offset(), d.attempt());
        let plan = plans[offset as usize];
        let outcome = match plan {
            Plan::Ack => "ack",
            Plan::RetryOnce if attempt > 1 => "ack",
            Plan::RetryOnce | Plan::Poison => "nack",
            Plan::Reject => "reject",
        };
        match outcome {
            "ack" => d.ack().await.expect("ack"),
            "nack" => d.nack().await.expect("nack"),
            _ => d.reject("seeded poison").await.expect("reject"),
        }
        if outcome != "nack" || attempt == 3 {
            finished += 1;
        }
        ordered.push((offset, attempt, outcome));
    }
    within(&rt, consumer.close()).await.expect("close");
    let mut per_message: BTreeMap<u64, Vec<(u32, &'static str)>> = BTreeMap::new();
    for &(offset, attempt, outcome) in &ordered {
        per_message
            .entry(offset)
            .or_default()
            .push((attempt, outcome));
    }
    let dead_letters = broker
        .lock()
        .records(DLQ, 0)
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    let m = consumer.metrics().await;
    let poison = plans
        .iter()
        .filter(|p| matches!(p, Plan::Poison | Plan::Reject))
        .count() as u64;
    assert_eq!(m.dead_lettered, poison);
    assert_eq!(committed(&broker, 0), Some(messages));
    Trace {
        ordered,
        per_message,
        dead_letters,
        committed: committed(&broker, 0),
        counters: (m.acked, m.nacked, m.rejected, m.retried, m.dead_lettered),
    }
}

/// A runtime whose timers count how often the driver resets them and how often one is polled
/// with a waker other than the last (which makes a reactor's timer register again: on smol,
/// a syscall).
#[derive(Debug, Clone)]
struct CountingRuntime<R> {
    inner: R,
    resets: Arc<AtomicU64>,
    new_wakers: Arc<AtomicU64>,
}

#[derive(Debug)]
struct CountingTimer {
    inner: Pin<Box<dyn AsyncTimer>>,
    waker: Option<std::task::Waker>,
    resets: Arc<AtomicU64>,
    new_wakers: Arc<AtomicU64>,
}

impl<R: Runtime + Clone> Runtime for CountingRuntime<R> {
    fn now(&self) -> Instant {
        self.inner.now()
    }
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(CountingTimer {
            inner: self.inner.new_timer(deadline),
            waker: None,
            resets: Arc::clone(&self.resets),
            new_wakers: Arc::clone(&self.new_wakers),
        })
    }
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.inner.spawn(future);
    }
}

impl AsyncTimer for CountingTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().reset(deadline);
    }
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.new_wakers.fetch_add(1, Ordering::Relaxed);
            self.waker = Some(cx.waker().clone());
        }
        self.inner.as_mut().poll(cx)
    }
}

/// An ack queued while a fetch is in flight wakes no one (the answer will wake the driver,
/// which applies every queued ack first), yet reaches the machine in time: the driver looks at
/// the queued acks within a quarter of `ack_batch_timeout`, so a consumer that acks and then
/// waits for nothing commits long before the slow fetch answers.
pub async fn acks_during_a_slow_fetch_commit_in_time<R: Runtime + Clone>(rt: R) {
    const LATENCY: Duration = Duration::from_millis(200);
    let broker = broker(1, 50);
    let mut config = fast_config();
    config.ack_batch_timeout = Duration::from_millis(10);
    config.ack_batch_min_interval = Duration::ZERO;
    let consumer = start_slow(&rt, &broker, config, LATENCY).await;
    let first = next(&rt, &consumer).await;
    let delivered = rt.now();
    first.ack().await.expect("ack");
    // The next fetch answers `LATENCY` after it went out (when `first` was delivered): an ack
    // applied only then would reach the broker in a commit after 2 x `LATENCY` (the commit's
    // own trip). Applied within 2.5 ms, it is there after `LATENCY` and about 13 ms.
    sleep(&rt, LATENCY + Duration::from_millis(150)).await;
    assert_eq!(
        committed(&broker, 0),
        Some(1),
        "{:?} after the delivery",
        rt.now() - delivered
    );
    within(&rt, consumer.close()).await.expect("close");
}

/// Acks too few to wake the driver while a fetch is in flight wake it once the application
/// waits for a delivery they hold back: with `max_unacked` outstanding, the next buffered
/// message comes at once, not when the fetch answers.
pub async fn waiting_for_a_delivery_hands_over_the_acks<R: Runtime + Clone>(rt: R) {
    const LATENCY: Duration = Duration::from_millis(200);
    let broker = broker(1, 500);
    let mut config = fast_config();
    config.fetch_size = 100;
    // About 11 records a fetch (the broker's 350 a record): room for the next one in flight.
    config.fetch_max_bytes = 4_000;
    config.max_unacked = 8;
    config.ack_batch_timeout = Duration::from_secs(3600);
    let consumer = start_slow(&rt, &broker, config, LATENCY).await;
    let first = next(&rt, &consumer).await;
    first.ack().await.expect("ack");
    let mut held = Vec::new();
    for _ in 1..8 {
        held.push(next(&rt, &consumer).await);
    }
    let asked = rt.now();
    let ninth = next(&rt, &consumer).await;
    assert_eq!(ninth.offset(), 8);
    assert!(
        rt.now() - asked < LATENCY / 2,
        "waited {:?} for a buffered message",
        rt.now() - asked
    );
    consumer.ack_all(held).await.expect("acks");
    ninth.ack().await.expect("ack");
    within(&rt, consumer.close()).await.expect("close");
}

/// A steady stream of deliveries does not keep resetting the driver's timer, nor polling it
/// with a waker other than the task's: its deadlines (each request's) move later, a timer
/// armed earlier fires as a spurious timeout instead, and the look between inputs reads the
/// clock. (Before: 18 to 68 polls with a new waker for these 5,000 messages.)
pub async fn a_steady_stream_leaves_the_timer_alone<R: Runtime + Clone>(rt: R) {
    const MESSAGES: usize = 5_000;
    let counting = CountingRuntime {
        inner: rt.clone(),
        resets: Arc::default(),
        new_wakers: Arc::default(),
    };
    let broker = broker(1, MESSAGES);
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.partitions = vec![0];
    let consumer = start(&counting, &broker, config).await;
    for _ in 0..MESSAGES {
        within(&rt, next(&rt, &consumer).await.ack())
            .await
            .expect("ack");
    }
    let (resets, new_wakers) = (
        counting.resets.load(Ordering::Relaxed),
        counting.new_wakers.load(Ordering::Relaxed),
    );
    let fetches = within(&rt, consumer.metrics()).await.fetches;
    within(&rt, consumer.close()).await.expect("close");
    assert!(
        resets <= 8 && new_wakers <= 8,
        "{fetches} fetches for {MESSAGES} messages: {resets} timer resets, \
         {new_wakers} polls with a new waker"
    );
}
