//! Health for orchestrators: a partition without progress fails liveness and says since when,
//! a paused partition is not judged, a closed consumer fails both probes. Outages, the breaker
//! and stalls are in `failures.rs`.
//!
//! Each scenario is a generic async fn run on the virtual runtime and on tokio's paused clock,
//! polling the probes once a simulated second as an orchestrator would.

#[macro_use]
mod virtual_and_tokio;

use std::time::{Duration, Instant};

use rustmq_consumer_core::driver::Delivery;
use rustmq_consumer_core::{
    timeout, Consumer, ConsumerBuilder, ConsumerConfig, HealthIssue, Probe, Runtime,
};
use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const MESSAGES: u64 = 50;
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest any single step may take before the test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

async fn start<R: Runtime + Clone>(rt: &R) -> Consumer {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    broker
        .produce_values(TOPIC, 0, (0..MESSAGES).map(|i| format!("m{i}")))
        .expect("topic exists");
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.empty_fetch_backoff_max = Duration::from_millis(50);
    let consumer = ConsumerBuilder::with_runtime(rt.clone())
        .config(config)
        .client(SimTransport::new(SharedBroker::new(broker), rt.clone()))
        .progress_timeout(PROGRESS_TIMEOUT)
        .build();
    timeout(rt, GUARD, consumer)
        .await
        .expect("in time")
        .expect("valid consumer")
}

async fn next<R: Runtime>(rt: &R, consumer: &Consumer) -> Delivery {
    timeout(rt, GUARD, consumer.receive())
        .await
        .expect("a delivery in time")
        .expect("receive")
        .expect("open")
}

/// Polls the liveness probe once a second for `seconds`; returns the first failing probe and
/// when it failed.
async fn poll_liveness<R: Runtime>(
    rt: &R,
    consumer: &Consumer,
    seconds: u32,
) -> Option<(Instant, Probe)> {
    for _ in 0..seconds {
        rt_sleep(rt, Duration::from_secs(1)).await;
        let probe = consumer.liveness().await;
        if !probe.passed {
            return Some((rt.now(), probe));
        }
    }
    None
}

async fn rt_sleep<R: Runtime>(rt: &R, duration: Duration) {
    rustmq_consumer_core::sleep(rt, duration).await;
}

/// The application holds its first delivery: the watermark stays at 0 with 50 messages past
/// it. Liveness passes until `progress_timeout`, then fails naming the partition, the offset
/// and since when; readiness fails with it. Settling brings both back.
pub async fn no_progress_fails_liveness<R: Runtime + Clone>(rt: R) {
    let consumer = start(&rt).await;
    let held = next(&rt, &consumer).await;
    let held_at = rt.now();
    assert!(consumer.readiness().await.passed);

    let (failed_at, probe) = poll_liveness(&rt, &consumer, 20)
        .await
        .expect("liveness fails within twice the progress timeout");
    let waited = failed_at - held_at;
    assert!(
        waited >= PROGRESS_TIMEOUT && waited <= PROGRESS_TIMEOUT + Duration::from_secs(2),
        "failed after {waited:?}"
    );
    let [HealthIssue::NoProgress {
        partition: 0,
        offset: 0,
        lag,
        since,
        elapsed,
        ..
    }] = probe.issues.as_slice()
    else {
        panic!("no progress of partition 0: {probe}");
    };
    assert_eq!(*lag, MESSAGES);
    assert!(*elapsed >= PROGRESS_TIMEOUT && *since <= held_at + Duration::from_secs(1));
    assert_eq!(probe.status_code(), 503);
    assert!(
        probe
            .to_string()
            .starts_with("partition 0 made no progress past offset 0 for 1"),
        "{probe}"
    );
    assert!(!consumer.readiness().await.passed);

    held.ack().await.expect("ack");
    for _ in 1..MESSAGES {
        next(&rt, &consumer).await.ack().await.expect("ack");
    }
    let (live, ready) = (consumer.liveness().await, consumer.readiness().await);
    assert!(live.passed && ready.passed, "{live} / {ready}");
    consumer.close().await.expect("close");
}

/// A paused partition makes no progress on purpose: it is not judged, however long it holds
/// an unsettled delivery; the clock starts again at the resume.
pub async fn paused_partition_is_not_judged<R: Runtime + Clone>(rt: R) {
    let consumer = start(&rt).await;
    let held = next(&rt, &consumer).await;
    consumer.pause_partitions([0]).await.expect("pause");
    assert!(
        poll_liveness(&rt, &consumer, 25).await.is_none(),
        "a paused partition failed liveness"
    );
    consumer.resume_partitions([0]).await.expect("resume");
    let resumed = rt.now();
    let (failed_at, _) = poll_liveness(&rt, &consumer, 20)
        .await
        .expect("judged again once resumed");
    assert!(failed_at - resumed >= PROGRESS_TIMEOUT);
    held.ack().await.expect("ack");
    consumer.close().await.expect("close");
}

/// Closing fails readiness; once closed, liveness fails too: the consumer does nothing more.
pub async fn closed_fails_both_probes<R: Runtime + Clone>(rt: R) {
    let consumer = start(&rt).await;
    next(&rt, &consumer).await.ack().await.expect("ack");
    assert!(consumer.liveness().await.passed && consumer.readiness().await.passed);
    consumer.close().await.expect("close");
    let (live, ready) = (consumer.liveness().await, consumer.readiness().await);
    assert_eq!(live.issues, [HealthIssue::Closed { stopped: true }]);
    assert!(!live.passed && !ready.passed);
    assert_eq!(ready.to_string(), "closed");
}

on_virtual_and_tokio!(
    no_progress_fails_liveness,
    paused_partition_is_not_judged,
    closed_fails_both_probes,
);
