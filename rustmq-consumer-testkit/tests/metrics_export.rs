//! The metrics export (feature `metrics`, enabled by this crate's dev-dependencies): what a
//! recorder receives is the consumer's own `metrics()` snapshot, and the gauges, failures and
//! histograms say what happened.
//!
//! One recorder serves the whole binary (`metrics` has one global recorder), and the debugging
//! recorder's snapshot takes what it reports (counters and gauges are swapped to zero): every
//! test reads through [`recorded`], which adds each snapshot into totals kept here and filters
//! them by the test's own topic. The export only ever adds to gauges, so a gauge's total is its
//! value.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use rustmq_consumer_core::telemetry as names;
use rustmq_consumer_core::{
    timeout, Consumer, ConsumerBuilder, ConsumerConfig, ConsumerError, Metrics, Runtime,
    TransportError,
};
use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport, Switch, VirtualRuntime};

/// Labels of one series, sorted, as `key=value`.
type Labels = Vec<String>;

#[derive(Default)]
struct Totals {
    counters: BTreeMap<(String, Labels), u64>,
    gauges: BTreeMap<(String, Labels), f64>,
    histograms: BTreeMap<(String, Labels), Vec<f64>>,
}

fn recorder() -> &'static (Snapshotter, Mutex<Totals>) {
    static RECORDER: OnceLock<(Snapshotter, Mutex<Totals>)> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .unwrap_or_else(|_| panic!("another recorder is installed"));
        (snapshotter, Mutex::new(Totals::default()))
    })
}

/// Everything recorded so far for `topic`: (name, other labels) to value.
struct Recorded {
    counters: BTreeMap<(String, Labels), u64>,
    gauges: BTreeMap<(String, Labels), f64>,
    histograms: BTreeMap<(String, Labels), Vec<f64>>,
}

impl Recorded {
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }

    fn gauge(&self, name: &str, labels: &[&str]) -> f64 {
        let labels: Labels = labels.iter().map(|l| l.to_string()).collect();
        self.gauges
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn histogram(&self, name: &str) -> &[f64] {
        self.histograms
            .iter()
            .find(|((n, _), _)| n == name)
            .map_or(&[], |(_, v)| v.as_slice())
    }
}

fn recorded(topic: &str, group: &str) -> Recorded {
    let (snapshotter, totals) = recorder();
    let mut totals = totals.lock().expect("totals lock");
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        let mut labels: Labels = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let id = (name, labels);
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(v)) => {
                *totals.counters.entry(id).or_default() += v
            }
            (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                *totals.gauges.entry(id).or_default() += v.into_inner()
            }
            (MetricKind::Histogram, DebugValue::Histogram(v)) => totals
                .histograms
                .entry(id)
                .or_default()
                .extend(v.into_iter().map(|v| v.into_inner())),
            other => panic!("unexpected value {other:?}"),
        }
    }
    let ours = |labels: &Labels| {
        labels.contains(&format!("topic={topic}")) && labels.contains(&format!("group={group}"))
    };
    let strip = |(name, labels): &(String, Labels)| {
        let rest = labels
            .iter()
            .filter(|l| !l.starts_with("topic=") && !l.starts_with("group="))
            .cloned()
            .collect();
        (name.clone(), rest)
    };
    Recorded {
        counters: totals
            .counters
            .iter()
            .filter(|((_, l), _)| ours(l))
            .map(|(k, v)| (strip(k), *v))
            .collect(),
        gauges: totals
            .gauges
            .iter()
            .filter(|((_, l), _)| ours(l))
            .map(|(k, v)| (strip(k), *v))
            .collect(),
        histograms: totals
            .histograms
            .iter()
            .filter(|((_, l), _)| ours(l))
            .map(|(k, v)| (strip(k), v.clone()))
            .collect(),
    }
}

/// Every counter of the snapshot, by its exported name.
fn counters(m: &Metrics) -> Vec<(&'static str, u64)> {
    vec![
        (names::RECEIVED, m.received),
        (names::DELIVERED, m.delivered),
        (names::ACKED, m.acked),
        (names::NACKED, m.nacked),
        (names::RETRIED, m.retried),
        (names::REJECTED, m.rejected),
        (names::DEAD_LETTERED, m.dead_lettered),
        (names::DISCARDED, m.discarded),
        (names::COMMITS, m.commits_sent),
        (names::COMMIT_FAILURES, m.commits_failed),
        (names::COMMITTED_SETTLEMENTS, m.committed_settlements),
        (names::REQUEST_FAILURES, m.requests_failed),
        (names::FETCHES, m.fetches),
        (names::REFETCHES, m.refetches),
        (names::CACHE_HITS, m.cache_hits),
        (names::CACHE_MISSES, m.cache_misses),
        (names::CACHE_EVICTIONS, m.cache_evictions),
        (names::BREAKER_TRANSITIONS, m.breaker_transitions),
    ]
}

const PARTITIONS: u32 = 4;
const MESSAGES: u64 = 10_000;
const DLQ: &str = "dlq";

fn broker(topic: &str) -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(topic, PARTITIONS);
    broker.create_topic(DLQ, 1);
    let per_partition = MESSAGES / u64::from(PARTITIONS);
    for p in 0..PARTITIONS {
        broker
            .produce_values(topic, p, (0..per_partition).map(|i| format!("p{p}-m{i}")))
            .expect("topic exists");
    }
    SharedBroker::new(broker)
}

fn config(topic: &str, group: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(topic, group);
    config.max_retry_attempts = 2;
    config.retry_backoff_base = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(4);
    config.dead_letter_queue = Some(DLQ.into());
    config.empty_fetch_backoff_min = Duration::from_millis(1);
    config.empty_fetch_backoff_max = Duration::from_millis(10);
    // A small cache: some retries miss it and are fetched again.
    config.cache_max_entries = Some(200);
    config
}

/// Settles one delivery: every 50th offset is always nacked (dead-lettered once its retries
/// are spent), every 97th is rejected (dead-lettered at once), every 7th is nacked on its
/// first attempt and acked on its retry, the rest are acked.
async fn settle(delivery: rustmq_consumer_core::driver::Delivery) {
    let offset = delivery.offset();
    let result = if offset % 50 == 0 {
        delivery.nack().await
    } else if offset % 97 == 5 {
        delivery.reject("malformed").await
    } else if offset % 7 == 0 && delivery.attempt() == 1 {
        delivery.nack().await
    } else {
        delivery.ack().await
    };
    result.expect("settle");
}

/// Receives and settles until every message is acked or dead-lettered; the broker fails a few
/// commits and fetches on the way.
async fn consume_all<R: Runtime>(rt: &R, consumer: &Consumer, broker: &SharedBroker) {
    let mut deliveries = 0u64;
    let mut idle = 0;
    let mut errors = 0;
    loop {
        match timeout(rt, Duration::from_millis(500), consumer.receive()).await {
            Some(Err(error)) => {
                // The failed fetches stall a partition until its next fetch: not fatal.
                errors += 1;
                assert!(errors < 10, "too many errors, the last: {error}");
            }
            Some(Ok(delivery)) => {
                let delivery = delivery.expect("open consumer");
                settle(delivery).await;
                deliveries += 1;
                assert!(
                    deliveries < 3 * MESSAGES,
                    "more deliveries than retries explain"
                );
                if deliveries == 1_000 {
                    let lag = check_gauges(consumer, consumer.topic(), GROUP).await;
                    assert!(lag > 0, "messages left to consume");
                }
                if deliveries == 3_000 {
                    let mut broker = broker.lock();
                    broker.fail_next_commits(2);
                    broker.fail_next_fetches(3);
                }
            }
            None => {
                let m = consumer.metrics().await;
                if m.acked + m.dead_lettered == MESSAGES {
                    return;
                }
                idle += 1;
                assert!(idle < 100, "stuck: {m:?}");
            }
        }
    }
}

/// The gauges equal the consumer's own view (`health_report` makes the driver look at the
/// lag now); returns the total lag.
async fn check_gauges(consumer: &Consumer, topic: &str, group: &str) -> u64 {
    consumer.health_report().await;
    let m = consumer.metrics().await;
    let lags = consumer.lag_details().await;
    let seen = recorded(topic, group);
    assert_eq!(seen.gauge(names::BREAKER_STATE, &["state=closed"]), 1.0);
    assert_eq!(seen.gauge(names::BREAKER_STATE, &["state=open"]), 0.0);
    assert_eq!(
        seen.gauge(names::IN_FLIGHT_DELIVERIES, &[]),
        m.in_flight_deliveries as f64
    );
    assert_eq!(seen.gauge(names::BUFFERED, &[]), m.buffered as f64);
    assert_eq!(seen.gauge(names::CACHED, &[]), m.cached as f64);
    assert_eq!(lags.len(), PARTITIONS as usize);
    for lag in &lags {
        let label = format!("partition={}", lag.partition);
        assert_eq!(seen.gauge(names::LAG, &[&label]), lag.lag as f64, "{label}");
    }
    lags.iter().map(|l| l.lag).sum()
}

const GROUP: &str = "export-billing";

#[test]
fn every_counter_matches_the_consumers_snapshot() {
    let (topic, group) = ("export-orders", GROUP);
    recorder();
    let rt = VirtualRuntime::new();
    let broker = broker(topic);
    rt.block_on(async {
        let consumer = ConsumerBuilder::with_runtime(rt.clone())
            .config(config(topic, group))
            .client(
                SimTransport::new(broker.clone(), rt.clone())
                    .with_latency(Duration::from_millis(2)),
            )
            .build()
            .await
            .expect("valid consumer");
        consume_all(&rt, &consumer, &broker).await;

        check_gauges(&consumer, topic, group).await;

        consumer.close().await.expect("close commits everything");
        let m = consumer.metrics().await;
        let seen = recorded(topic, group);

        // The run had what the export must count.
        assert_eq!(m.acked + m.dead_lettered, MESSAGES);
        assert!(m.retried > 1_000 && m.nacked > 1_000, "{m:?}");
        assert!(m.dead_lettered > 100 && m.rejected > 50, "{m:?}");
        assert!(m.commits_failed >= 2 && m.requests_failed >= 5, "{m:?}");
        assert!(m.refetches > 0 || m.cache_misses > 0, "{m:?}");

        assert_counters_match(&m, &seen);
        // Failures by request kind and error.
        let failures = |request: &str| {
            seen.counters
                .iter()
                .filter(|((n, l), _)| {
                    n == names::REQUEST_FAILURES && l.contains(&format!("request={request}"))
                })
                .map(|(_, v)| *v)
                .sum::<u64>()
        };
        assert_eq!(failures("commit_offset"), 2);
        assert_eq!(failures("fetch"), 3);
        assert!(seen
            .counters
            .keys()
            .any(|(n, l)| n == names::REQUEST_FAILURES && l.contains(&"error=error_code".into())));

        // Histograms: one latency per answered fetch and commit, records and settlements
        // adding up to what was received and committed.
        let fetch_latency = seen.histogram(names::FETCH_LATENCY);
        let answered = fetch_latency.len() as u64;
        assert!(
            answered <= m.fetches + m.refetches && answered + 4 >= m.fetches,
            "{answered} fetch latencies for {m:?}"
        );
        assert!(
            fetch_latency.iter().all(|&s| s >= 0.002),
            "latency on the runtime's clock"
        );
        let records: f64 = seen.histogram(names::RECORDS_PER_FETCH).iter().sum();
        assert!(records >= m.received as f64, "{records} records for {m:?}");
        let commits = seen.histogram(names::COMMIT_LATENCY);
        assert_eq!(
            commits.len() as u64,
            m.commits_sent,
            "every commit answered"
        );
        let settled: f64 = seen.histogram(names::SETTLEMENTS_PER_COMMIT).iter().sum();
        assert_eq!(settled, m.committed_settlements as f64);
        assert_eq!(
            seen.histogram(names::SETTLEMENTS_PER_COMMIT).len() as u64,
            m.commits_sent - m.commits_failed
        );

        assert_gauges_zero(&seen);
    });
}

fn assert_counters_match(m: &Metrics, seen: &Recorded) {
    for (name, value) in counters(m) {
        assert_eq!(seen.counter(name), value, "{name}");
    }
}

/// Closed: every gauge gave its share back.
fn assert_gauges_zero(seen: &Recorded) {
    assert!(!seen.gauges.is_empty());
    for (name, labels) in seen.gauges.keys() {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert_eq!(seen.gauge(name, &labels), 0.0, "{name} {labels:?}");
    }
}

/// The broker goes away for ten seconds: the breaker opens (its state gauge says so), request
/// failures are counted as transport failures, transitions match the snapshot; after the
/// outage everything is consumed and every counter still matches.
#[test]
fn an_outage_moves_the_breaker_gauge_and_counts_failures() {
    let (topic, group) = ("export-outage", "export-outage-billing");
    recorder();
    let rt = VirtualRuntime::new();
    let mut sim = SimBroker::new();
    sim.create_topic(topic, 1);
    sim.produce_values(topic, 0, (0..200).map(|i| format!("m{i}")))
        .expect("topic exists");
    let broker = SharedBroker::new(sim);
    let lost = TransportError::ConnectionLost("reset".into());
    let switch = Switch::new(&broker, rt.clone(), lost);
    rt.block_on(async {
        let consumer = ConsumerBuilder::with_runtime(rt.clone())
            .config(ConsumerConfig::new(topic, group))
            .client(switch.clone())
            .build()
            .await
            .expect("valid consumer");
        let mut acked = 0;
        let receive = || async {
            timeout(&rt, Duration::from_secs(60), consumer.receive())
                .await
                .expect("in time")
        };
        while acked < 100 {
            if let Ok(Some(delivery)) = receive().await {
                delivery.ack().await.expect("ack");
                acked += 1;
            }
        }
        switch.set_down(true);
        rustmq_consumer_core::sleep(&rt, Duration::from_secs(10)).await;
        consumer.health_report().await;
        let m = consumer.metrics().await;
        let seen = recorded(topic, group);
        assert!(m.breaker_transitions >= 1, "{m:?}");
        assert_eq!(
            seen.counter(names::BREAKER_TRANSITIONS),
            m.breaker_transitions
        );
        assert_eq!(seen.gauge(names::BREAKER_STATE, &["state=closed"]), 0.0);
        let open = seen.gauge(names::BREAKER_STATE, &["state=open"])
            + seen.gauge(names::BREAKER_STATE, &["state=half_open"]);
        assert_eq!(open, 1.0);
        let transport_failures: u64 = seen
            .counters
            .iter()
            .filter(|((n, l), _)| {
                n == names::REQUEST_FAILURES && l.contains(&"error=transport".into())
            })
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(transport_failures, m.requests_failed);

        switch.set_down(false);
        while acked < 200 {
            if let Ok(Some(delivery)) = receive().await {
                delivery.ack().await.expect("ack");
                acked += 1;
            }
        }
        consumer.close().await.expect("close");
        let m = consumer.metrics().await;
        let seen = recorded(topic, group);
        assert_counters_match(&m, &seen);
        assert_gauges_zero(&seen);
    });
}

#[test]
fn a_request_cut_in_transit_is_counted_apart_and_its_stall_reported() {
    // Over a network the broker reads one packet of a request: a dead-letter record over one
    // packet is cut every time, counted as `error=cut`, and its partition reported stalled.
    recorder();
    let (topic, group) = ("metrics-cut", "metrics-cut-group");
    let mut sim = SimBroker::new();
    sim.create_topic(topic, 1);
    sim.create_topic(DLQ, 1);
    let poison = format!("poison-{}", "x".repeat(3_000));
    sim.produce_values(topic, 0, ["a".to_owned(), poison, "b".to_owned()])
        .expect("topic exists");
    sim.set_split_reads(true);
    let broker = SharedBroker::new(sim);
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let mut config = config(topic, group);
        config.partitions = vec![0];
        let consumer = ConsumerBuilder::with_runtime(rt.clone())
            .config(config)
            .client(SimTransport::new(broker.clone(), rt.clone()))
            .build()
            .await
            .expect("valid consumer");
        let mut stalled = None;
        for _ in 0..100 {
            match timeout(&rt, Duration::from_millis(500), consumer.receive()).await {
                Some(Ok(Some(d))) if d.value().starts_with(b"poison") => {
                    d.reject("poison").await.expect("reject");
                }
                Some(Ok(Some(d))) => d.ack().await.expect("ack"),
                Some(Err(error @ ConsumerError::Stalled { .. })) => {
                    stalled = Some(error);
                    break;
                }
                Some(other) => panic!("unexpected: {other:?}"),
                None => {}
            }
        }
        let stalled = stalled.expect("the stall is reported");
        assert!(stalled.to_string().contains("cut in transit"), "{stalled}");
        let seen = recorded(topic, group);
        let failures = |label: &str| {
            seen.counters
                .iter()
                .filter(|((n, l), _)| n == names::REQUEST_FAILURES && l.contains(&label.into()))
                .map(|(_, v)| *v)
                .sum::<u64>()
        };
        assert!(failures("error=cut") >= 3, "{:?}", seen.counters);
        assert_eq!(failures("error=cut"), failures("request=produce"));
        assert_eq!(failures("error=transport"), 0);
        // Packets arriving together again: the record gets through, and the consumer closes
        // with everything committed.
        broker.lock().set_split_reads(false);
        consumer.close().await.expect("close commits everything");
        assert_eq!(broker.lock().records(DLQ, 0).len(), 1);
    });
}
