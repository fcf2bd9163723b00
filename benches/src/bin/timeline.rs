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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use rustmq_consumer_benches::transport::{default_consumer, loopback};
use rustmq_consumer_benches::GROUP;
use rustmq_consumer_core::protocol::{Request, Response};
use rustmq_consumer_core::{Transport, TransportError};

/// Messages per run, as in `quic_loopback`.
const MESSAGES: usize = 20_000;

/// Milliseconds since `t0`.
fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// What the log keeps of one request.
struct Sent {
    at: f64,
    answered: f64,
    what: String,
    /// For a Fetch: its offset and the records it brought back.
    fetch: Option<(u64, usize)>,
}

/// A transport that logs each request around `inner`.
struct Logged<T> {
    inner: T,
    t0: Instant,
    log: Arc<Mutex<Vec<Sent>>>,
}

#[async_trait]
impl<T: Transport> Transport for Logged<T> {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        let what = match &request {
            Request::Fetch(f) => format!("Fetch from {} max_bytes {}", f.fetch_offset, f.max_bytes),
            other => format!("{:?}", other.kind()),
        };
        let offset = match &request {
            Request::Fetch(f) => Some(f.fetch_offset),
            _ => None,
        };
        let at = ms(self.t0);
        let answer = self.inner.request(request).await;
        let records = match &answer {
            Ok(Response::Fetch(f)) => f.records.len(),
            _ => 0,
        };
        let sent = Sent {
            at,
            answered: ms(self.t0),
            what,
            fetch: offset.map(|o| (o, records)),
        };
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sent);
        answer
    }
}

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
        let log = Arc::new(Mutex::new(Vec::new()));
        let delivered = rt.block_on(async {
            let inner = rustmq_consumer_tokio::quic_transport(loopback.client_config())?;
            inner.connect().await?;
            let t0 = Instant::now();
            let transport = Logged {
                inner,
                t0,
                log: Arc::clone(&log),
            };
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
            Ok::<_, Box<dyn Error>>(delivered)
        })?;
        let log = log.lock().unwrap_or_else(PoisonError::into_inner);
        for sent in log.iter() {
            let first = sent
                .fetch
                .filter(|&(_, records)| records > 0)
                .and_then(|(offset, _)| delivered.get(usize::try_from(offset).ok()?))
                .map(|at| format!("; first record delivered at {at:.3} ms"))
                .unwrap_or_default();
            let records = sent
                .fetch
                .map(|(_, records)| format!(": {records} records"))
                .unwrap_or_default();
            println!(
                "  {:>8.3} -> {:>8.3} ms  {}{records}{first}",
                sent.at, sent.answered, sent.what
            );
        }
    }
    rt.block_on(loopback.stop());
    Ok(())
}
