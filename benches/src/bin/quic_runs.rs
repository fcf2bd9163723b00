//! `quic_loopback`'s three readers, one at a time, for `perf stat`: the raw loop of 1 MiB
//! fetches, the channel floor, or the consumer with the **default** config (a group of its
//! own per run), `RUNS` runs of `MESSAGES` messages each over QUIC on 127.0.0.1 against the
//! embedded `LoopbackBroker`, on two tokio worker threads as in the group. Prints the rate.
//! Run it as
//!
//! ```text
//! cargo build --release -p rustmq-consumer-benches --bin quic_runs
//! perf stat -e task-clock target/release/quic_runs consumer [RUNS] [MESSAGES]   # and raw, floor
//! ```
//!
//! CPU time a message is `task-clock` over `RUNS * MESSAGES` (the broker and QUIC included);
//! "CPUs utilized" is how much of the two cores the readers keep busy.
//!
//! Each reader runs as a task on the runtime's workers, as in the group; with `MAIN_THREAD=1`
//! it runs on the calling thread instead (`block_on`, as the body of `#[tokio::main]` does: a
//! third thread beside the two workers). With `WAITS=1` the consumer's application also times
//! each `receive` and prints the share of the time it waited for a delivery (two clock reads
//! a message, which slow it down).
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::time::{Duration, Instant};

use rustmq_consumer_benches::transport::{
    channel_floor, default_consumer, loopback, raw_fetch_loop, run_reader, RAW_FETCH_MAX_BYTES,
};
use rustmq_consumer_benches::{GROUP, TOPIC};
use rustmq_consumer_tokio::ConsumerConfig;

/// A `receive` that took longer than this waited for a delivery.
const WAITED: Duration = Duration::from_micros(5);

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let reader = args.next().unwrap_or_default();
    if !matches!(reader.as_str(), "raw" | "floor" | "consumer") {
        return Err(format!("unknown reader {reader:?}: raw, floor or consumer").into());
    }
    let runs: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let messages: usize = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let loopback = loopback(&rt, messages)?;
    let capacity = ConsumerConfig::new(TOPIC, GROUP).max_unacked;
    let timed = std::env::var_os("WAITS").is_some();
    let (mut total, mut waited) = (Duration::ZERO, Duration::ZERO);
    for run in 0..runs {
        let transport = rt.block_on(async {
            let transport = rustmq_consumer_tokio::quic_transport(loopback.client_config())?;
            transport.connect().await?;
            Ok::<_, Box<dyn Error>>(transport)
        })?;
        let reader = reader.clone();
        let work = async move {
            let start = Instant::now();
            let mut idle = Duration::ZERO;
            match reader.as_str() {
                "raw" => raw_fetch_loop(&transport, messages, RAW_FETCH_MAX_BYTES).await,
                "floor" => channel_floor(transport, messages, RAW_FETCH_MAX_BYTES, capacity).await,
                _ => {
                    let consumer =
                        default_consumer(transport, format!("{GROUP}-runs-{run}")).await?;
                    for _ in 0..messages {
                        let delivery = if timed {
                            let asked = Instant::now();
                            let delivery = consumer.receive().await?.ok_or("closed early")?;
                            let took = asked.elapsed();
                            if took > WAITED {
                                idle += took;
                            }
                            delivery
                        } else {
                            consumer.receive().await?.ok_or("closed early")?
                        };
                        delivery.ack().await?;
                    }
                    consumer.close().await?;
                }
            }
            Ok::<_, Box<dyn Error + Send + Sync>>((start.elapsed(), idle))
        };
        let (elapsed, idle) = run_reader(&rt, work)?.map_err(|e| e.to_string())?;
        total += elapsed;
        waited += idle;
    }
    rt.block_on(loopback.stop());
    let rate = (runs * messages) as f64 / total.as_secs_f64();
    println!("{reader}: {runs} runs of {messages}: {rate:.0} msg/s");
    if reader == "consumer" && timed {
        let share = waited.as_secs_f64() / total.as_secs_f64();
        println!(
            "the application waited for deliveries {:.0}% of the time",
            share * 100.0
        );
    }
    Ok(())
}
