//! Where a consumer's time goes over QUIC: `quic_loopback`'s consumer (**default** config, a
//! group of its own per run, 20,000 messages, two tokio worker threads) with every request
//! logged as it goes out and as its answer comes back, and the time each fetch answer's first
//! record reached the application. Run with
//! `cargo run --release -p rustmq-consumer-benches --bin timeline [-- RUNS]`.
//!
//! A fetch answered at `t` whose first record is delivered long after `t` means the
//! application was still busy with the previous answer (the consumer's own work bounds it);
//! delivered shortly after `t`, with the application idle before, means it waited for the
//! fetch (the fetch pipeline bounds it).
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::time::Instant;

use rustmq_consumer_benches::transport::{default_consumer, loopback, ms, print_log, Logged};
use rustmq_consumer_benches::GROUP;

/// Messages per run, as in `quic_loopback`.
const MESSAGES: usize = 20_000;

fn main() -> Result<(), Box<dyn Error>> {
    let runs: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 3,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let loopback = loopback(&rt, MESSAGES)?;
    for run in 0..runs {
        let (delivered, log) = rt.block_on(async {
            let inner = rustmq_consumer_tokio::quic_transport(loopback.client_config())?;
            inner.connect().await?;
            let t0 = Instant::now();
            let (transport, log) = Logged::new(inner, t0);
            let consumer = default_consumer(transport, format!("{GROUP}-timeline-{run}")).await?;
            // When each offset was delivered, to look up the answers' first records.
            let mut delivered = vec![0.0; MESSAGES];
            for _ in 0..MESSAGES {
                let delivery = consumer.receive().await?.ok_or("closed early")?;
                let offset = usize::try_from(delivery.offset())?;
                if let Some(at) = delivered.get_mut(offset) {
                    *at = ms(t0);
                }
                delivery.ack().await?;
            }
            let done = ms(t0);
            consumer.close().await?;
            println!("run {run}: {MESSAGES} messages in {done:.3} ms");
            Ok::<_, Box<dyn Error>>((delivered, log))
        })?;
        print_log(&log, |_, offset| {
            delivered.get(usize::try_from(offset).ok()?).copied()
        });
    }
    rt.block_on(loopback.stop());
    Ok(())
}
