//! An enhanced consumer against an embedded, in-process simulated broker.
//!
//! Produces 10,000 messages (some of them poison), consumes them with retries and a
//! dead-letter topic, shows live progress on one line and ends with a summary.
//!
//! ```text
//! cargo run --example enhanced_consumer                    # on tokio
//! cargo run --example enhanced_consumer -- --runtime smol  # on smol
//! ```
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, Instant};

use rustmq_consumer_core::{
    ConsumerBuilder, ConsumerConfig, ConsumerError, Health, Metrics, Runtime,
};
use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const DEAD_LETTERS: &str = "dead_letter_queue";
const MESSAGES: u64 = 10_000;
const MAX_RETRIES: u32 = 3;

fn main() {
    let smol = std::env::args()
        .skip_while(|a| a != "--runtime")
        .nth(1)
        .is_some_and(|r| r == "smol");
    let broker = embedded_broker();
    let result = if smol {
        println!("runtime: smol");
        smol::block_on(run(rustmq_consumer_smol::SmolRuntime, broker.clone()))
    } else {
        println!("runtime: tokio");
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run(rustmq_consumer_tokio::TokioRuntime, broker.clone())),
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
}

impl Summary {
    fn print(&self, broker: &SharedBroker) {
        let m = &self.metrics;
        let broker = broker.lock();
        let committed = broker.committed(
            GROUP,
            &rustmq_consumer_core::protocol::TopicPartition::new(TOPIC, 0),
        );
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
            "  dead-letter topic {} records in {DEAD_LETTERS}",
            broker.records(DEAD_LETTERS, 0).len()
        );
        println!(
            "  commits          {} (largest batch {})",
            m.commits_sent, m.max_batch
        );
        println!("  committed offset {committed:?} of {MESSAGES}");
        println!("  final health     {:?}", self.health);
    }
}

async fn run<R: Runtime + Clone + Default>(
    runtime: R,
    broker: SharedBroker,
) -> Result<Summary, ConsumerError> {
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.fetch_size = 500;
    config.max_unacked = 1000;
    config.ack_batch_size = 500;
    config.ack_batch_timeout = Duration::from_millis(50);
    config.max_retry_attempts = MAX_RETRIES;
    config.retry_backoff_base = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(20);
    config.empty_fetch_backoff_max = Duration::from_millis(50);
    config.dead_letter_queue = Some(DEAD_LETTERS.to_owned());

    // The same builder on either runtime: `rustmq_consumer_tokio::ConsumerBuilder::new()` or
    // `rustmq_consumer_smol::ConsumerBuilder::new()`.
    let consumer = ConsumerBuilder::<R>::new()
        .topic(TOPIC)
        .consumer_group(GROUP)
        .config(config)
        .client(SimTransport::new(broker, runtime))
        .build()
        .await?;

    let start = Instant::now();
    let mut last_report = start;
    let mut finished = 0;
    while finished < MESSAGES {
        let Some(delivery) = consumer.receive().await? else {
            break;
        };
        let value = String::from_utf8_lossy(delivery.value()).into_owned();
        let transient_failure = delivery.offset() % 13 == 5 && delivery.attempt() == 1;
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
        elapsed: start.elapsed(),
        metrics: consumer.metrics().await,
        health: consumer.health().await,
    })
}

async fn progress(consumer: &rustmq_consumer_core::Consumer, start: Instant) {
    let m = consumer.metrics().await;
    let lag: u64 = consumer.get_lag().await.iter().map(|p| p.lag).sum();
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
