//! The QUIC loopback workloads for callgrind (see `bin/instructions`): `quic_loopback`'s
//! consumer (**default** config, a group of its own per run) and its raw loop of 1 MiB
//! fetches, 20,000 messages twice, over QUIC on 127.0.0.1 against the embedded
//! `LoopbackBroker`, on a current-thread runtime. Count the whole program:
//!
//! ```text
//! CARGO_PROFILE_RELEASE_DEBUG=1 cargo build --release -p rustmq-consumer-benches --bin instructions_quic
//! valgrind --tool=callgrind target/release/instructions_quic consumer    # and `raw`
//! ```
//!
//! The broker, QUIC and the decoding are in both: the difference is the consumer's own work.
//! Unlike the in-memory workloads, the counts move by about 2% between runs (how packets and
//! wake-ups fall depends on timing).
#![allow(clippy::print_stdout)]

use std::error::Error;

use rustmq_consumer_benches::transport::{
    default_consumer, loopback, raw_fetch_loop, RAW_FETCH_MAX_BYTES,
};
use rustmq_consumer_benches::GROUP;

/// Messages per run, as in `quic_loopback`.
const MESSAGES: usize = 20_000;
/// Runs.
const RUNS: usize = 2;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let workload = std::env::args().nth(1).unwrap_or_default();
    let raw = match workload.as_str() {
        "consumer" => false,
        "raw" => true,
        other => return Err(format!("unknown workload {other:?}: consumer or raw").into()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loopback = loopback(&rt, MESSAGES)?;
    for run in 0..RUNS {
        rt.block_on(async {
            let transport = rustmq_consumer_tokio::quic_transport(loopback.client_config())?;
            transport.connect().await?;
            if raw {
                raw_fetch_loop(&transport, MESSAGES, RAW_FETCH_MAX_BYTES).await;
                return Ok::<_, Box<dyn Error>>(());
            }
            let consumer = default_consumer(transport, format!("{GROUP}-quic-{run}")).await?;
            for _ in 0..MESSAGES {
                let delivery = consumer.receive().await?.ok_or("closed early")?;
                delivery.ack().await?;
            }
            consumer.close().await?;
            Ok(())
        })?;
    }
    rt.block_on(loopback.stop());
    println!("{workload}: {} messages", MESSAGES * RUNS);
    Ok(())
}
