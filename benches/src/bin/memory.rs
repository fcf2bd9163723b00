//! Resident-memory check: one consumer on tokio (current-thread runtime) reads 100 thousand,
//! then 10 million small messages through the public API (receive, ack) over a `SimTransport`
//! whose broker holds only one chunk of the log at a time, and prints `VmRSS` at both points.
//!
//! Target: flat within 20%. Run with
//! `cargo run --release -p rustmq-consumer-benches --bin memory [-- TOTAL]`.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use rustmq_consumer_benches::transport::ChunkedSimTransport;
use rustmq_consumer_benches::{vm_rss_kib, GROUP, TOPIC};
use rustmq_consumer_testkit::{SharedBroker, SimTransport};
use rustmq_consumer_tokio::{ConsumerBuilder, ConsumerConfig, TokioRuntime};

const FIRST: u64 = 100_000;
const CHUNK: u64 = 10_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 10_000_000,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let transport = ChunkedSimTransport::new(
            SimTransport::new(SharedBroker::default(), TokioRuntime),
            CHUNK,
            total,
        );
        let mut config = ConsumerConfig::new(TOPIC, GROUP);
        config.partitions = vec![0];
        if std::env::var_os("MEMORY_DEFAULT_FETCH_BYTES").is_none() {
            // One `fetch_size` of these small records, in the broker's units.
            config.fetch_max_bytes = rustmq_consumer_benches::fetch_bytes_for(config.fetch_size);
        }
        let consumer = ConsumerBuilder::new()
            .config(config)
            .client(transport)
            .build()
            .await?;
        let start = Instant::now();
        let mut rss_first = None;
        for n in 1..=total {
            let delivery = consumer.receive().await?.ok_or("consumer closed early")?;
            delivery.ack().await?;
            if n == FIRST.min(total) {
                let rss = vm_rss_kib().ok_or("no VmRSS in /proc/self/status")?;
                println!("after {n:>10} messages: VmRSS {rss} KiB");
                rss_first = Some(rss);
            }
        }
        consumer.commit().await?;
        let rss = vm_rss_kib().ok_or("no VmRSS in /proc/self/status")?;
        let elapsed = start.elapsed();
        println!("after {total:>10} messages: VmRSS {rss} KiB");
        let metrics = consumer.metrics().await;
        println!(
            "consumed {total} in {elapsed:.2?} ({:.0} msg/s); cached {} entries, buffered {}, commits sent {}",
            total as f64 / elapsed.as_secs_f64(),
            metrics.cached,
            metrics.buffered,
            metrics.commits_sent
        );
        if let Some(first) = rss_first {
            let growth = (rss as f64 - first as f64) / first as f64 * 100.0;
            let verdict = if growth.abs() <= 20.0 { "met" } else { "MISSED" };
            println!("growth {growth:+.1}% (target: within 20%): {verdict}");
        }
        consumer.close().await?;
        Ok(())
    })
}
