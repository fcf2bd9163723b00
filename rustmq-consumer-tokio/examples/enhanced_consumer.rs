//! An enhanced consumer against an embedded broker that speaks RustMQ's wire protocol over QUIC
//! on loopback, or against a real RustMQ broker.
//!
//! By default it produces 10,000 messages (some of them poison) into the embedded broker,
//! consumes them in a consumer group with retries and a dead-letter topic, shows live progress
//! on one line and ends with a summary.
//!
//! ```text
//! cargo run --example enhanced_consumer                    # on tokio, over QUIC
//! cargo run --example enhanced_consumer -- --runtime smol  # on smol, over QUIC
//! cargo run --example enhanced_consumer -- --in-memory     # no network: an in-memory transport
//! # a real broker (it shows a throwaway self-signed certificate: the opt-in is explicit)
//! cargo run --example enhanced_consumer -- --broker 127.0.0.1:9092 --accept-any-certificate \
//!     --topic orders --group billing
//! cargo run --example enhanced_consumer -- --broker HOST:PORT --ca ca.pem --server-name NAME
//! ```
//!
//! Against a real broker it consumes until nothing arrives for `--idle-secs` (default 5),
//! acking every message whose value does not start with `poison`.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustmq_consumer_core::quic::{quinn, QuicConfig, QuicTransport, RootCerts, TlsMode};
use rustmq_consumer_core::{
    timeout, ConsumerBuilder, ConsumerConfig, ConsumerError, Health, Metrics, Runtime,
};
use rustmq_consumer_testkit::{LoopbackBroker, SharedBroker, SimBroker, SimTransport};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const DEAD_LETTERS: &str = "dead_letter_queue";
const MESSAGES: u64 = 10_000;
const MAX_RETRIES: u32 = 3;

/// Where the messages come from.
enum Source {
    /// The embedded broker over QUIC on 127.0.0.1.
    Embedded,
    /// The embedded broker through an in-memory transport.
    InMemory,
    /// A real RustMQ broker.
    Remote(Box<Remote>),
}

struct Remote {
    config: QuicConfig,
    topic: String,
    group: String,
    idle: Duration,
}

/// The value following `flag` on the command line.
fn arg(flag: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != flag).nth(1)
}

fn flag(flag: &str) -> bool {
    std::env::args().any(|a| a == flag)
}

fn fail(message: impl std::fmt::Display) -> ! {
    println!("{message}");
    std::process::exit(2);
}

fn source() -> Source {
    if flag("--in-memory") {
        return Source::InMemory;
    }
    let Some(addr) = arg("--broker") else {
        return Source::Embedded;
    };
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()));
    let addr: SocketAddr = resolved.unwrap_or_else(|e| {
        fail(format!(
            "--broker {addr}: {e} (expected HOST:PORT, e.g. 127.0.0.1:9092)"
        ))
    });
    // Today's broker's certificate is for `localhost`.
    let server_name = arg("--server-name").unwrap_or_else(|| "localhost".to_owned());
    let tls = if flag("--accept-any-certificate") {
        TlsMode::DangerousAcceptAnyCertificate
    } else if let Some(path) = arg("--ca") {
        let pem = std::fs::read(&path).unwrap_or_else(|e| fail(format!("--ca {path}: {e}")));
        let roots = RootCerts::from_pem(&pem).unwrap_or_else(|e| fail(format!("--ca {path}: {e}")));
        TlsMode::Verify { roots }
    } else {
        fail(
            "--broker needs --ca FILE.pem (verify the broker) or --accept-any-certificate \
             (today's broker presents a throwaway self-signed certificate)",
        )
    };
    let idle = arg("--idle-secs")
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| fail(format!("--idle-secs {s}: {e}")))
        })
        .unwrap_or(5);
    Source::Remote(Box::new(Remote {
        config: QuicConfig::new(addr, server_name).with_tls(tls),
        topic: arg("--topic").unwrap_or_else(|| TOPIC.to_owned()),
        group: arg("--group").unwrap_or_else(|| GROUP.to_owned()),
        idle: Duration::from_secs(idle),
    }))
}

fn main() {
    let smol = arg("--runtime").is_some_and(|r| r == "smol");
    let source = source();
    let broker = embedded_broker();
    let result = if smol {
        println!("runtime: smol");
        let quic: Arc<dyn quinn::Runtime> = Arc::new(quinn::SmolRuntime);
        smol::block_on(run(
            rustmq_consumer_smol::SmolRuntime,
            quic,
            broker.clone(),
            source,
        ))
    } else {
        println!("runtime: tokio");
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let quic: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
                rt.block_on(run(
                    rustmq_consumer_tokio::TokioRuntime,
                    quic,
                    broker.clone(),
                    source,
                ))
            }
            Err(error) => {
                println!("cannot start tokio: {error}");
                std::process::exit(1);
            }
        }
    };
    match result {
        Ok(summary) => summary.print(&broker),
        Err(error) => {
            println!("\nconsumer failed: {error}");
            std::process::exit(1);
        }
    }
}

/// A broker with the topic, 10,000 messages (every 97th one poison) and the dead-letter topic.
fn embedded_broker() -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    broker.create_topic(DEAD_LETTERS, 1);
    broker.ensure_group(GROUP);
    let values = (0..MESSAGES).map(|i| {
        if i % 97 == 42 {
            format!("poison-{i}")
        } else {
            format!("order-{i}")
        }
    });
    if let Err(error) = broker.produce_values(TOPIC, 0, values) {
        println!("cannot produce: {error}");
        std::process::exit(1);
    }
    SharedBroker::new(broker)
}

struct Summary {
    elapsed: Duration,
    metrics: Metrics,
    health: Health,
    /// Whether the embedded broker was used (its topics can be inspected).
    embedded: bool,
}

impl Summary {
    fn print(&self, broker: &SharedBroker) {
        let m = &self.metrics;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        println!("\n\nsummary");
        println!("  elapsed          {:.2} s", self.elapsed.as_secs_f64());
        println!("  throughput       {:.0} messages/s", m.acked as f64 / secs);
        println!("  received         {}", m.received);
        println!("  delivered        {}", m.delivered);
        println!("  acked            {}", m.acked);
        println!("  retried          {}", m.retried);
        println!("  dead-lettered    {}", m.dead_lettered);
        println!(
            "  commits          {} (largest batch {})",
            m.commits_sent, m.max_batch
        );
        if self.embedded {
            let broker = broker.lock();
            let committed = broker.committed(
                GROUP,
                &rustmq_consumer_core::protocol::TopicPartition::new(TOPIC, 0),
            );
            println!(
                "  dead-letter topic {} records in {DEAD_LETTERS}",
                broker.records(DEAD_LETTERS, 0).len()
            );
            println!("  committed offset {committed:?} of {MESSAGES}");
        }
        println!("  final health     {:?}", self.health);
    }
}

async fn run<R: Runtime + Clone + Default>(
    runtime: R,
    quic: Arc<dyn quinn::Runtime>,
    broker: SharedBroker,
    source: Source,
) -> Result<Summary, ConsumerError> {
    let (topic, group, idle) = match &source {
        Source::Remote(r) => (r.topic.clone(), r.group.clone(), Some(r.idle)),
        _ => (TOPIC.to_owned(), GROUP.to_owned(), None),
    };
    let mut config = ConsumerConfig::new(topic.clone(), group.clone());
    config.fetch_size = 500;
    config.max_unacked = 1000;
    config.ack_batch_size = 500;
    config.ack_batch_timeout = Duration::from_millis(50);
    config.max_retry_attempts = MAX_RETRIES;
    config.retry_backoff_base = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(20);
    config.empty_fetch_backoff_max = Duration::from_millis(50);
    config.dead_letter_queue = Some(DEAD_LETTERS.to_owned());

    // The embedded broker serves the wire protocol on 127.0.0.1 until it is dropped.
    let mut _server = None;
    let builder = ConsumerBuilder::<R>::new()
        .topic(topic)
        .consumer_group(group)
        .config(config);
    let quic_config = match source {
        Source::InMemory => None,
        Source::Remote(r) => {
            println!("transport: QUIC to the broker at {}", r.config.server_addr);
            Some(r.config)
        }
        Source::Embedded => {
            let server = LoopbackBroker::start(broker.clone(), quic.clone())
                .unwrap_or_else(|e| fail(format!("cannot start the embedded broker: {e}")));
            println!(
                "transport: QUIC to the embedded broker at {}",
                server.addr()
            );
            let config = server.client_config();
            _server = Some(server);
            Some(config)
        }
    };
    let embedded = idle.is_none();
    let builder = match quic_config {
        None => {
            println!("transport: in memory");
            builder.client(SimTransport::new(broker, runtime.clone()))
        }
        // `rustmq_consumer_tokio::quic_transport(config)` builds the same on tokio.
        Some(config) => builder.client(
            QuicTransport::new(config, quic)
                .unwrap_or_else(|e| fail(format!("bad QUIC configuration: {e}"))),
        ),
    };
    // The same builder on either runtime: `rustmq_consumer_tokio::ConsumerBuilder::new()` or
    // `rustmq_consumer_smol::ConsumerBuilder::new()`.
    let consumer = builder.build().await?;

    let start = Instant::now();
    let mut last_report = start;
    let mut finished = 0;
    let mut last_delivery = start;
    while !embedded || finished < MESSAGES {
        let received = match idle {
            Some(idle) => match timeout(&runtime, idle, consumer.receive()).await {
                Some(received) => received?,
                None => break, // nothing for `idle`: done
            },
            None => consumer.receive().await?,
        };
        let Some(delivery) = received else {
            break;
        };
        last_delivery = Instant::now();
        let value = String::from_utf8_lossy(delivery.value()).into_owned();
        // The embedded run also fails every 13th message once, to show retries.
        let transient_failure = embedded && delivery.offset() % 13 == 5 && delivery.attempt() == 1;
        if value.starts_with("poison") {
            let last = delivery.attempt() > MAX_RETRIES;
            delivery.nack().await?;
            if last {
                finished += 1;
            }
        } else if transient_failure {
            delivery.nack().await?;
        } else {
            delivery.ack().await?;
            finished += 1;
        }
        if last_report.elapsed() >= Duration::from_millis(100) {
            last_report = Instant::now();
            progress(&consumer, start).await;
        }
    }
    progress(&consumer, start).await;
    consumer.close().await?;
    Ok(Summary {
        // Up to the last message, not the idle wait that ended a run against a real broker.
        elapsed: last_delivery.duration_since(start),
        metrics: consumer.metrics().await,
        health: consumer.health().await,
        embedded,
    })
}

async fn progress(consumer: &rustmq_consumer_core::Consumer, start: Instant) {
    let m = consumer.metrics().await;
    let lag: u64 = consumer
        .get_lag()
        .await
        .map(|l| l.values().sum())
        .unwrap_or(0);
    let breaker = match consumer.health().await {
        Health::Healthy => "closed",
        Health::Degraded => "half-open",
        Health::Unhealthy => "open",
        _ => "n/a",
    };
    let rate = m.acked as f64 / start.elapsed().as_secs_f64().max(1e-9);
    print!(
        "\r{rate:>8.0} msg/s | acked {:>6} | retried {:>5} | dead-lettered {:>4} | lag {:>6} | breaker {breaker:<9}",
        m.acked, m.retried, m.dead_lettered, lag
    );
    let _ = std::io::stdout().flush();
}
