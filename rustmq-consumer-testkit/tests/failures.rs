//! What a user meets on a bad day: an unreachable broker, a refused certificate, an outage
//! shorter than `recovery_timeout`, and many consumers built with the default config.
//!
//! The simulated scenarios run on the virtual runtime, so every duration they assert is
//! simulated time, exact and repeatable. The QUIC scenarios use real UDP on 127.0.0.1 and assert
//! only what happened, never how long it took.

#[macro_use]
mod runtimes;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_lite::StreamExt;
use runtimes::init_tracing;
use rustmq_consumer_core::protocol::{Request, Response, TopicPartition};
use rustmq_consumer_core::quic::{QuicConfig, QuicTransport};
use rustmq_consumer_core::{
    timeout, BreakerState, Consumer, ConsumerBuilder, ConsumerConfig, ConsumerError, Health,
    HealthIssue, Runtime, StallReason, Transport, TransportError,
};
use rustmq_consumer_testkit::{
    LoopbackBroker, SharedBroker, SimBroker, SimTransport, Switch, VirtualRuntime,
    LOOPBACK_SERVER_NAME,
};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
/// Longest any single step may take before the test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(120);

/// A broker with `TOPIC` (one partition holding `messages` values `m<i>`); no group until a
/// consumer joins it.
fn broker(messages: u64) -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    produce(&mut broker, 0..messages);
    SharedBroker::new(broker)
}

fn produce(broker: &mut SimBroker, offsets: std::ops::Range<u64>) {
    broker
        .produce_values(TOPIC, 0, offsets.map(|i| format!("m{i}")))
        .expect("topic exists");
}

fn committed(broker: &SharedBroker) -> Option<u64> {
    broker
        .lock()
        .committed(GROUP, &TopicPartition::new(TOPIC, 0))
}

async fn within<R: Runtime, F: Future>(rt: &R, future: F) -> F::Output {
    timeout(rt, GUARD, future)
        .await
        .expect("step did not finish in time")
}

fn builder<R: Runtime + Clone>(
    rt: &R,
    config: ConsumerConfig,
    transport: impl Transport,
) -> ConsumerBuilder<R> {
    ConsumerBuilder::with_runtime(rt.clone())
        .config(config)
        .client(transport)
}

async fn start<R: Runtime + Clone>(
    rt: &R,
    config: ConsumerConfig,
    transport: impl Transport,
) -> Consumer {
    within(rt, builder(rt, config, transport).build())
        .await
        .expect("consumer starts")
}

/// The default configuration, with a fixed seed so the simulated run replays exactly.
fn default_config(seed: u64) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.seed = seed;
    config
}

/// A broker that never answers (packets dropped on the way).
struct Silent;

#[async_trait]
impl Transport for Silent {
    async fn request(&self, _: Request) -> Result<Response, TransportError> {
        futures_lite::future::pending().await
    }
}

fn refused() -> TransportError {
    TransportError::Connect("connection refused".to_owned())
}

// ------------------------------------------------------------------ errors reach the app

/// Nothing listens: `receive()` returns a typed, non-fatal error with the cause at the first
/// refused request, once for the outage; `health_report()` says why; the consumer goes on and
/// delivers once the broker is up.
#[test]
fn refused_connection_is_reported_once_and_the_consumer_carries_on() {
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let broker = broker(3);
        let switch = Switch::new(&broker, rt.clone(), refused());
        switch.set_down(true);
        let config = default_config(1);
        let request_timeout = config.request_timeout;
        let start_at = rt.now();
        let consumer = start(&rt, config, switch.clone()).await;

        let error = within(&rt, consumer.receive())
            .await
            .expect_err("the outage is reported");
        assert!(
            rt.now() - start_at <= request_timeout,
            "reported after {:?}",
            rt.now() - start_at
        );
        let ConsumerError::Unreachable {
            cause,
            ever_connected,
        } = &error
        else {
            panic!("not an outage: {error}");
        };
        assert_eq!(cause, &refused());
        assert!(!ever_connected);
        assert!(!error.is_permanent());
        assert_eq!(
            error.to_string(),
            "broker unreachable: cannot connect: connection refused"
        );
        let report = consumer.health_report().await;
        assert_eq!(report.health, Health::Unhealthy);
        assert_eq!(report.cause, Some(error.clone()));

        // Once per outage: a minute of refusals later, nothing more was reported.
        let quiet = timeout(&rt, Duration::from_secs(60), consumer.receive()).await;
        assert!(quiet.is_none(), "reported twice: {quiet:?}");
        assert!(consumer.metrics().await.requests_failed > 1);

        // The report says since when: the outage from the first refusal, the breaker from its
        // last transition (it probes now and then); not ready, but alive: a restart cannot
        // bring the broker back.
        let report = consumer.health_report().await;
        let Some(&HealthIssue::Unreachable { since, elapsed, .. }) = report.issues.first() else {
            panic!("the outage first: {:?}", report.issues);
        };
        assert!(since - start_at <= request_timeout && elapsed >= Duration::from_secs(60));
        let breaker = report.issues.iter().find_map(|issue| match issue {
            HealthIssue::Breaker {
                state,
                since: opened,
                ..
            } => Some((*state, *opened)),
            _ => None,
        });
        let Some((state, opened)) = breaker else {
            panic!("the breaker: {:?}", report.issues);
        };
        assert_ne!(state, BreakerState::Closed);
        assert!(opened >= since && opened <= rt.now());
        let readiness = consumer.readiness().await;
        assert!(!readiness.passed && readiness.status_code() == 503);
        assert!(
            readiness
                .to_string()
                .starts_with("broker unreachable for 6"),
            "{readiness}"
        );
        assert!(consumer.liveness().await.passed);

        switch.set_down(false);
        for offset in 0..3 {
            let delivery = within(&rt, consumer.receive())
                .await
                .expect("no error once the broker answers")
                .expect("open");
            assert_eq!(delivery.offset(), offset);
            delivery.ack().await.expect("ack");
        }
        assert_eq!(consumer.health_report().await.cause, None);
        let mut ready = consumer.readiness().await;
        for _ in 0..100 {
            if ready.passed {
                break;
            }
            rt.sleep(Duration::from_millis(100)).await;
            ready = consumer.readiness().await;
        }
        assert!(ready.passed, "ready once the broker answers: {ready}");
        within(&rt, consumer.close()).await.expect("close");
        assert_eq!(committed(&broker), Some(3));
    });
}

/// A broker that never answers is reported as a deadline, within `request_timeout`.
#[test]
fn silent_broker_is_reported_within_the_request_timeout() {
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let config = default_config(2);
        let request_timeout = config.request_timeout;
        let start_at = rt.now();
        let consumer = start(&rt, config, Silent).await;
        let error = within(&rt, consumer.receive())
            .await
            .expect_err("the outage is reported");
        assert_eq!(
            rt.now() - start_at,
            request_timeout,
            "at the first deadline"
        );
        assert!(
            matches!(
                &error,
                ConsumerError::Unreachable {
                    cause: TransportError::TimedOut,
                    ever_connected: false
                }
            ),
            "{error}"
        );
        assert_eq!(consumer.health().await, Health::Unhealthy);
    });
}

/// A refused certificate is permanent and said at once (the first request), by the stream
/// too, which goes on after it.
#[test]
fn refused_certificate_is_permanent_and_said_at_once() {
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let broker = broker(1);
        let tls = TransportError::Tls("invalid peer certificate: UnknownIssuer".to_owned());
        let switch = Switch::new(&broker, rt.clone(), tls.clone());
        switch.set_down(true);
        let start_at = rt.now();
        let consumer = start(&rt, default_config(3), switch.clone()).await;
        let mut stream = consumer.stream();
        let error = within(&rt, stream.next())
            .await
            .expect("open stream")
            .expect_err("the refusal is reported");
        assert_eq!(rt.now(), start_at, "at once");
        assert!(error.is_permanent(), "{error}");
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
        assert_eq!(
            consumer.health_report().await.cause,
            Some(ConsumerError::Unreachable {
                cause: tls,
                ever_connected: false
            })
        );

        // The certificate is replaced: the stream carries on.
        switch.set_down(false);
        let delivery = within(&rt, stream.next())
            .await
            .expect("open stream")
            .expect("a delivery");
        assert_eq!(delivery.offset(), 0);
        delivery.ack().await.expect("ack");
        within(&rt, consumer.close()).await.expect("close");
    });
}

/// `fail_fast(true)`: `build()` fails with the cause when the broker cannot be reached, and
/// succeeds once it answers.
#[test]
fn fail_fast_build_checks_the_connection() {
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let broker = broker(1);
        let switch = Switch::new(&broker, rt.clone(), refused());
        switch.set_down(true);
        let built = within(
            &rt,
            builder(&rt, default_config(4), switch.clone())
                .fail_fast(true)
                .build(),
        )
        .await;
        let Err(error) = built else {
            panic!("built against a refusing broker");
        };
        assert_eq!(
            error,
            ConsumerError::Unreachable {
                cause: refused(),
                ever_connected: false
            }
        );
        // The abandoned consumer's driver stopped: only this test's task is left.
        for _ in 0..100 {
            if rt.live_tasks() == 0 {
                break;
            }
            rt.sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(rt.live_tasks(), 0, "the failed consumer's driver stopped");

        let silent = within(
            &rt,
            builder(&rt, default_config(5), Silent)
                .fail_fast(true)
                .build(),
        )
        .await;
        assert!(
            matches!(
                silent,
                Err(ConsumerError::Unreachable {
                    cause: TransportError::TimedOut,
                    ..
                })
            ),
            "{silent:?}"
        );

        switch.set_down(false);
        let consumer = within(
            &rt,
            builder(&rt, default_config(6), switch.clone())
                .fail_fast(true)
                .build(),
        )
        .await
        .expect("the broker answers");
        let delivery = within(&rt, consumer.receive())
            .await
            .expect("receive")
            .expect("open");
        delivery.ack().await.expect("ack");
        within(&rt, consumer.close()).await.expect("close");
    });
}

// ------------------------------------------------------------------ a failing partition

/// One of three partitions answers every fetch with error code 1 (the real broker after
/// compaction merged its segments), commits work: `receive()` reports the stall once and
/// delivers everything of the other two, `health_report()` says which partition, the breaker
/// stays closed, and `close()` returns at once. The consumer once stalled silently, the
/// breaker opened for everything, and the close took 30 to 50 s.
#[test]
fn a_failing_partition_is_reported_and_the_others_go_on() {
    const MESSAGES: u64 = 200;
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let mut sim = SimBroker::new();
        sim.create_topic(TOPIC, 3);
        for p in 0..3 {
            sim.produce_values(TOPIC, p, (0..MESSAGES).map(|i| format!("p{p}-m{i}")))
                .expect("topic exists");
        }
        sim.set_partition_failing(TOPIC, 1, true);
        let broker = SharedBroker::new(sim);
        let consumer = start(
            &rt,
            default_config(3),
            SimTransport::new(broker.clone(), rt.clone()),
        )
        .await;
        let mut received = [0u64; 3];
        let mut stalls = Vec::new();
        while received[0] + received[2] < 2 * MESSAGES {
            match within(&rt, consumer.receive()).await {
                Ok(Some(d)) => {
                    received[d.partition() as usize] += 1;
                    d.ack().await.expect("ack");
                }
                Ok(None) => panic!("closed"),
                Err(error) => stalls.push(error),
            }
        }
        // A minute more: the stall is not reported again, whatever the retries.
        if let Some(more) = timeout(&rt, Duration::from_secs(60), consumer.receive()).await {
            stalls.push(more.expect_err("nothing left to deliver"));
        }
        assert_eq!(received, [MESSAGES, 0, MESSAGES]);
        let [ConsumerError::Stalled {
            partition: 1,
            offset: 0,
            ..
        }] = stalls.as_slice()
        else {
            panic!("one stall of partition 1: {stalls:?}");
        };
        assert_eq!(
            stalls[0].to_string(),
            "partition 1 stalled at offset 0: fetches fail: error code 1 from Fetch"
        );
        let report = consumer.health_report().await;
        assert_eq!(report.health, Health::Degraded);
        assert_eq!(report.cause.as_ref(), Some(&stalls[0]));
        // Since when, and why; not ready, alive.
        let [HealthIssue::Stalled {
            partition: 1,
            offset: 0,
            reason: StallReason::FetchFailing { .. },
            elapsed,
            ..
        }] = report.issues.as_slice()
        else {
            panic!("the stall alone: {:?}", report.issues);
        };
        assert!(*elapsed >= Duration::from_secs(60), "{elapsed:?}");
        assert!(!report.readiness().passed && report.liveness().passed);
        assert_eq!(consumer.metrics().await.breaker_transitions, 0);
        for p in [0, 2] {
            let tp = TopicPartition::new(TOPIC, p);
            let mut done = false;
            for _ in 0..300 {
                done = broker.lock().committed(GROUP, &tp) == Some(MESSAGES);
                if done {
                    break;
                }
                rt.sleep(Duration::from_millis(10)).await;
            }
            assert!(done, "partition {p} committed");
        }
        let asked = rt.now();
        within(&rt, consumer.close()).await.expect("close");
        assert!(
            rt.now() - asked < Duration::from_secs(1),
            "close took {:?}",
            rt.now() - asked
        );
    });
}

// ------------------------------------------------------------------ quick recovery

/// The broker stops for `outage` (every request refused, as the QUIC transport does while it
/// cannot reconnect) and comes back having lost its groups and commits, as the real broker
/// does. Returns how long after the restart deliveries resumed (simulated time), having
/// checked that receive() reported the outage once and that nothing was lost.
fn outage_recovery(seed: u64, outage: Duration) -> Duration {
    const BEFORE: u64 = 200;
    const DURING: u64 = 50;
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let broker = broker(BEFORE);
        let switch = Switch::new(&broker, rt.clone(), refused());
        let config = default_config(seed);
        assert_eq!(config.recovery_timeout, Duration::from_secs(60));
        let consumer = start(&rt, config, switch.clone()).await;
        let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
        let ack =
            |acked: &mut BTreeMap<u64, u32>, offset: u64| *acked.entry(offset).or_default() += 1;
        while acked.len() < BEFORE as usize {
            let d = within(&rt, consumer.receive())
                .await
                .expect("receive")
                .expect("open");
            ack(&mut acked, d.offset());
            d.ack().await.expect("ack");
        }

        switch.set_down(true);
        let stopped_at = rt.now();
        produce(&mut broker.lock(), BEFORE..BEFORE + DURING);
        // The operator: restarts the broker after the outage.
        let operator = {
            let (rt, broker, switch) = (rt.clone(), broker.clone(), switch.clone());
            async move {
                rt.sleep(outage).await;
                broker.lock().restart();
                switch.set_down(false);
                rt.now()
            }
        };
        let application = async {
            let mut outages = 0;
            let mut first_after = None;
            while acked.len() < (BEFORE + DURING) as usize {
                match within(&rt, consumer.receive()).await {
                    Ok(Some(d)) => {
                        first_after.get_or_insert(rt.now());
                        ack(&mut acked, d.offset());
                        d.ack().await.expect("ack");
                    }
                    Ok(None) => panic!("closed"),
                    Err(ConsumerError::Unreachable {
                        cause,
                        ever_connected,
                    }) => {
                        assert_eq!(cause, refused());
                        assert!(ever_connected);
                        outages += 1;
                    }
                    Err(other) => panic!("receive failed: {other}"),
                }
            }
            (outages, first_after.expect("deliveries resumed"))
        };
        let (restarted_at, (outages, resumed_at)) =
            futures_lite::future::zip(operator, application).await;
        assert_eq!(restarted_at - stopped_at, outage);
        assert_eq!(outages, 1, "reported once");
        for _ in 0..1000 {
            if committed(&broker) == Some(BEFORE + DURING) {
                break;
            }
            rt.sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(committed(&broker), Some(BEFORE + DURING), "all committed");
        within(&rt, consumer.close()).await.expect("close");
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (0..BEFORE + DURING).collect::<Vec<_>>(),
            "nothing lost"
        );
        assert!(acked.values().all(|n| *n == 1), "nothing twice");
        resumed_at - restarted_at
    })
}

/// With the default config (`recovery_timeout` 60 s), deliveries resume within 2 s of the
/// broker's return after an outage of about 5 s, wherever the seed and the outage's length put
/// the last failed probe.
#[test]
fn five_second_outage_costs_seconds_not_a_minute() {
    init_tracing();
    let outages = [4_500, 5_000, 5_300, 5_600, 5_900].map(Duration::from_millis);
    let recoveries: Vec<Duration> = (0..4)
        .flat_map(|seed| outages.map(|outage| outage_recovery(seed, outage)))
        .collect();
    assert!(
        recoveries.iter().all(|r| *r <= Duration::from_secs(2)),
        "deliveries resumed this long after the restart: {recoveries:?}"
    );
}

// ------------------------------------------------------------------ identity

/// Builds a consumer of a fresh one-message broker, nacks the message and returns the
/// consumer's id and the retry delay it chose (simulated time from nack to redelivery).
async fn retry_delay(rt: &VirtualRuntime, config: ConsumerConfig) -> (String, Duration) {
    let consumer = start(rt, config, SimTransport::new(broker(1), rt.clone())).await;
    let first = within(rt, consumer.receive())
        .await
        .expect("receive")
        .expect("open");
    let nacked_at = rt.now();
    first.nack().await.expect("nack");
    let again = within(rt, consumer.receive())
        .await
        .expect("receive")
        .expect("open");
    assert_eq!((again.offset(), again.attempt()), (0, 2));
    let delay = rt.now() - nacked_at;
    again.ack().await.expect("ack");
    within(rt, consumer.close()).await.expect("close");
    (consumer.consumer_id().to_owned(), delay)
}

/// Two consumers built with the default config have different ids and different retry
/// delays (their jitter seeds come from OS entropy); the same explicit seed replays the same
/// delay.
#[test]
fn default_consumers_have_unique_ids_and_uncorrelated_jitter() {
    init_tracing();
    let rt = VirtualRuntime::new();
    rt.block_on(async {
        let defaults = || ConsumerConfig::new(TOPIC, GROUP);
        let (id_a, delay_a) = retry_delay(&rt, defaults()).await;
        let (id_b, delay_b) = retry_delay(&rt, defaults()).await;
        assert_ne!(id_a, id_b);
        assert!(id_a.starts_with("consumer-"), "{id_a}");
        assert_ne!(delay_a, delay_b, "correlated retry delays");
        let ceiling = defaults().retry_backoff_base;
        assert!(delay_a <= ceiling && delay_b <= ceiling);

        let (_, seeded_a) = retry_delay(&rt, default_config(42)).await;
        let (_, seeded_b) = retry_delay(&rt, default_config(42)).await;
        assert_eq!(seeded_a, seeded_b, "an explicit seed replays");
    });
}

/// Records every span opened: its name and fields, as `name field=value ...`.
#[derive(Clone, Default)]
struct SpanLog(Arc<std::sync::Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanLog {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = attrs.metadata().name().to_owned();
        attrs.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                line.push_str(&format!(" {}={value:?}", field.name()));
            },
        );
        self.0.lock().expect("not poisoned").push(line);
    }
}

/// The consumer's logs carry its id, group and topic, and within a group assignment the member
/// id and generation: two default consumers can be told apart.
#[test]
fn spans_carry_the_correlation_ids() {
    use tracing_subscriber::layer::SubscriberExt;
    let log = SpanLog::default();
    let subscriber = tracing_subscriber::registry().with(log.clone());
    let ids = tracing::subscriber::with_default(subscriber, || {
        let rt = VirtualRuntime::new();
        rt.block_on(async {
            let mut ids = Vec::new();
            for _ in 0..2 {
                let config = ConsumerConfig::new(TOPIC, GROUP);
                let consumer = start(&rt, config, SimTransport::new(broker(1), rt.clone())).await;
                let delivery = within(&rt, consumer.receive())
                    .await
                    .expect("receive")
                    .expect("open");
                delivery.ack().await.expect("ack");
                within(&rt, consumer.close()).await.expect("close");
                ids.push(consumer.consumer_id().to_owned());
            }
            ids
        })
    });
    let spans = log.0.lock().expect("not poisoned").clone();
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let consumer = format!("consumer consumer_id={id} group={GROUP} topic={TOPIC}");
        assert!(
            spans.contains(&consumer),
            "no span {consumer:?} in {spans:?}"
        );
    }
    let members: Vec<&String> = spans.iter().filter(|s| s.starts_with("member ")).collect();
    assert_eq!(members.len(), 2, "one per assignment: {spans:?}");
    assert!(
        members
            .iter()
            .all(|m| m.contains("member_id=") && m.contains("generation=")),
        "{members:?}"
    );
    // (Each consumer has its own broker here, which hands out the same first member id.)
}

// ------------------------------------------------------------------ over QUIC

/// A UDP port on 127.0.0.1 where nothing listens.
fn closed_port() -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

/// Nothing listens on the port: the consumer's `receive()` says it cannot connect, then keeps
/// waiting.
async fn quic_unreachable_broker<R: Runtime + Clone>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let config = QuicConfig::new(closed_port(), LOOPBACK_SERVER_NAME)
        .with_connect_timeout(Duration::from_secs(1));
    let transport = QuicTransport::new(config, quic).expect("valid config");
    let consumer = start(&rt, default_config(8), transport.clone()).await;
    let error = within(&rt, consumer.receive())
        .await
        .expect_err("the outage is reported");
    assert!(
        matches!(
            &error,
            ConsumerError::Unreachable {
                cause: TransportError::Connect(_),
                ever_connected: false
            }
        ),
        "{error}"
    );
    assert!(!error.is_permanent());
    assert!(error.to_string().contains("no answer"), "{error}");
    assert!(consumer.health_report().await.cause.is_some());
    consumer
        .close_with_timeout(Duration::from_millis(100))
        .await
        .ok();
    transport.close();
}

/// The loopback broker's certificate is not trusted (default web PKI roots): a fail-fast
/// build says so at once, permanently, with rustls' reason; without fail-fast `receive()` does.
async fn quic_untrusted_certificate<R: Runtime + Clone>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let loopback = LoopbackBroker::start(broker(1), quic.clone()).expect("start");
    let untrusting = || {
        QuicTransport::new(
            QuicConfig::new(loopback.addr(), LOOPBACK_SERVER_NAME),
            quic.clone(),
        )
        .expect("valid config")
    };
    let transport = untrusting();
    let built = within(
        &rt,
        builder(&rt, default_config(9), transport.clone())
            .fail_fast(true)
            .build(),
    )
    .await;
    let Err(error) = built else {
        panic!("untrusted certificate accepted");
    };
    assert!(error.is_permanent(), "{error}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    transport.close();

    let transport = untrusting();
    let consumer = start(&rt, default_config(10), transport.clone()).await;
    let error = within(&rt, consumer.receive())
        .await
        .expect_err("the refusal is reported");
    assert!(error.is_permanent(), "{error}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    consumer
        .close_with_timeout(Duration::from_millis(100))
        .await
        .ok();
    transport.close();
    assert_eq!(loopback.connections_accepted(), 0);
    loopback.stop().await;
}

/// Over QUIC with every default (consumer and transport): the loopback broker stops for 5 s of
/// real time and comes back having lost its groups and commits. Nothing is lost and
/// `receive()` reported the outage. How long deliveries took to resume after the restart is
/// logged (`RUST_LOG=failures=info`), not asserted: it is real time on a shared machine (the
/// simulated scenario above asserts the bound).
async fn quic_five_second_outage<R: Runtime + Clone>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    const BEFORE: u64 = 100;
    const DURING: u64 = 50;
    let shared = broker(BEFORE);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let transport = QuicTransport::new(loopback.client_config(), quic).expect("valid config");
    let consumer = start(&rt, default_config(11), transport.clone()).await;
    let mut acked = BTreeMap::new();
    let mut outages = 0;
    let mut receive = async |acked: &mut BTreeMap<u64, u32>| -> Instant {
        for _ in 0..100 {
            match within(&rt, consumer.receive()).await {
                Ok(Some(d)) => {
                    *acked.entry(d.offset()).or_default() += 1;
                    d.ack().await.expect("ack");
                    return Instant::now();
                }
                Ok(None) => panic!("closed"),
                Err(ConsumerError::Unreachable { ever_connected, .. }) => {
                    assert!(ever_connected);
                    outages += 1;
                }
                Err(other) => panic!("receive failed: {other}"),
            }
        }
        panic!("100 outages reported and no delivery");
    };
    while acked.len() < BEFORE as usize {
        receive(&mut acked).await;
    }
    within(&rt, loopback.stop()).await;
    {
        let mut broker = shared.lock();
        broker.restart();
        produce(&mut broker, BEFORE..BEFORE + DURING);
    }
    rustmq_consumer_core::sleep(&rt, Duration::from_secs(5)).await;
    within(&rt, loopback.restart()).await.expect("restart");
    let restarted_at = Instant::now();
    let resumed_at = receive(&mut acked).await;
    while acked.len() < (BEFORE + DURING) as usize {
        receive(&mut acked).await;
    }
    tracing::info!(
        recovery_ms = (resumed_at - restarted_at).as_millis() as u64,
        "deliveries resumed after the restart"
    );
    assert!(outages >= 1, "receive() reported the outage");
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (0..BEFORE + DURING).collect::<Vec<_>>(),
        "nothing lost"
    );
    assert!(acked.values().all(|n| *n == 1), "nothing twice");
    // The restarted broker lost the group: commits wait for the next heartbeat's rejoin
    // (`broker_restart_mid_stream_loses_nothing` in quic.rs covers it). A close before that
    // rejoin has its final commit refused (16), and says which offsets the broker lacks.
    match within(&rt, consumer.close()).await {
        Ok(()) => {}
        Err(ConsumerError::Uncommitted { offsets, .. }) => {
            assert_eq!(offsets, [(0, BEFORE + DURING)]);
        }
        Err(other) => panic!("close: {other}"),
    }
    transport.close();
    loopback.stop().await;
}

on_both_runtimes!(
    quic_unreachable_broker,
    quic_untrusted_certificate,
    quic_five_second_outage
);
