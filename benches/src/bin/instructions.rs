//! Fixed workloads for counting instructions with callgrind, which counts the same for the
//! same binary and inputs whatever else the machine is doing (criterion's times on a shared VM
//! move by tens of percent between runs). Build with debug info, then count:
//!
//! ```text
//! CARGO_PROFILE_RELEASE_DEBUG=1 cargo build --release -p rustmq-consumer-benches --bin instructions
//! valgrind --tool=callgrind --toggle-collect='*measured*' target/release/instructions acks-shuffled
//! valgrind --tool=callgrind target/release/instructions end-to-end
//! ```
//!
//! Workloads (each prints how many messages it ran, to divide the count by):
//! - `acks-in-order`, `acks-shuffled`: 3 x 10,000 `ConsumerMachine::ack`s, one per input, in
//!   `core_ack_path`'s orders; only `measured_acks` is counted (`--toggle-collect`);
//! - `end-to-end`: the tokio consumer over `SimTransport` (current-thread runtime), 20,000
//!   messages received and acked one by one, twice; count the whole program (the broker and
//!   its records are built in it too);
//! - `channel`: `end_to_end`'s baseline, 20,000 records over a bounded channel between two
//!   tasks, twice; count the whole program.
//!
//! The QUIC workloads are in `bin/instructions_quic`: a second caller of `receive` and `ack`
//! in this program would change what the compiler inlines into `end-to-end`, and with it the
//! counts this program has reported since it was written.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::time::Instant;

use rustmq_consumer_benches::core::{delivered, shuffled, wide_config};
use rustmq_consumer_benches::transport::broker_with;
use rustmq_consumer_benches::{fetch_bytes_for, records, GROUP, TOPIC};
use rustmq_consumer_core::{ConsumerMachine, DeliveryTag};
use rustmq_consumer_testkit::SimTransport;
use rustmq_consumer_tokio::{ConsumerBuilder, ConsumerConfig, TokioRuntime};

/// Acks per round of the ack workloads, as in `core_ack_path`.
const ACKS: usize = 10_000;
/// Rounds of the ack workloads.
const ACK_ROUNDS: usize = 3;
/// Messages per run of the end-to-end and channel workloads, as in `end_to_end`.
const MESSAGES: usize = 20_000;
/// Runs of the end-to-end and channel workloads.
const RUNS: usize = 2;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let workload = std::env::args().nth(1).unwrap_or_default();
    let messages = match workload.as_str() {
        "acks-in-order" => acks(false)?,
        "acks-shuffled" => acks(true)?,
        "end-to-end" => end_to_end()?,
        "channel" => channel()?,
        other => {
            return Err(format!(
                "unknown workload {other:?}: acks-in-order, acks-shuffled, end-to-end or channel"
            )
            .into())
        }
    };
    println!("{workload}: {messages} messages");
    Ok(())
}

fn acks(shuffle: bool) -> Result<usize> {
    let now = Instant::now();
    let order: Vec<usize> = if shuffle {
        shuffled(ACKS, 0x5eed)
    } else {
        (0..ACKS).collect()
    };
    for _ in 0..ACK_ROUNDS {
        let (mut machine, tags) = delivered(wide_config(ACKS), ACKS, now);
        measured_acks(&mut machine, now, &tags, &order)?;
        if machine.settle_watermark(0) != Some(ACKS as u64) {
            return Err("not every ack settled".into());
        }
    }
    Ok(ACKS * ACK_ROUNDS)
}

/// The counted part of the ack workloads.
#[inline(never)]
fn measured_acks(
    machine: &mut ConsumerMachine,
    now: Instant,
    tags: &[DeliveryTag],
    order: &[usize],
) -> Result<()> {
    for &i in order {
        machine.ack(now, tags[i])?;
    }
    Ok(())
}

fn end_to_end() -> Result<usize> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    for _ in 0..RUNS {
        let broker = broker_with(MESSAGES);
        rt.block_on(async move {
            let mut config = ConsumerConfig::new(TOPIC, GROUP);
            config.partitions = vec![0];
            config.fetch_max_bytes = fetch_bytes_for(config.fetch_size);
            let consumer = ConsumerBuilder::with_runtime(TokioRuntime)
                .config(config)
                .client(SimTransport::new(broker, TokioRuntime))
                .build()
                .await?;
            for _ in 0..MESSAGES {
                let delivery = consumer.receive().await?.ok_or("closed early")?;
                delivery.ack().await?;
            }
            consumer.close().await?;
            Ok::<_, Box<dyn Error>>(())
        })?;
    }
    Ok(MESSAGES * RUNS)
}

fn channel() -> Result<usize> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let capacity = ConsumerConfig::new(TOPIC, GROUP).max_unacked;
    for _ in 0..RUNS {
        rt.block_on(async {
            let batch = records(MESSAGES);
            let (tx, rx) = async_channel::bounded(capacity);
            tokio::spawn(async move {
                for record in batch {
                    if tx.send(record).await.is_err() {
                        break;
                    }
                }
            });
            for _ in 0..MESSAGES {
                std::hint::black_box(rx.recv().await?);
            }
            Ok::<_, Box<dyn Error>>(())
        })?;
    }
    Ok(MESSAGES * RUNS)
}
