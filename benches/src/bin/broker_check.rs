//! The speed check of issue 11 against a RustMQ broker you run: 200,000 small records
//! (`msg-<offset>`) in partition 0 of topic [`TOPIC`], then, in turns, the raw loop of 1 MiB
//! fetches, the channel floor (the same fetches, each record handed to the application
//! through a bounded channel), and the tokio consumer with the **default** `ConsumerConfig`
//! (topic and group only) acking every delivery. Each is timed; the consumer's deliveries are
//! checked, every offset exactly once with its value.
//!
//! ```text
//! cargo run --release -p rustmq-consumer-benches --bin broker_check -- 127.0.0.1:9092 [RUNS] [PARTITIONS]
//! ```
//!
//! With `PARTITIONS` above 1 the 200,000 records are spread over partitions `0..PARTITIONS`
//! (`msg-<offset>` in each), the raw loop reads them one partition after another, there is
//! no channel floor, and the consumer assigns itself every partition (default config
//! otherwise): the real broker's coordinator assigns one partition per topic.
//!
//! The records are produced when the partitions are empty (the real broker serves only the
//! partitions registered with it); a partition holding anything else is refused. The
//! broker's certificate is accepted whatever it is (today's broker presents a throwaway
//! self-signed one): point this only at a broker you run. The consumer's time includes
//! connecting and joining its group; the loops connect before their clocks start.
//!
//! With `TIMELINE=1` the consumer's transport is [`Logged`]: after each run, every request
//! it sent, when its answer came back, and when each fetch answer's first record reached the
//! application.
//!
//! Run the broker with a write cache that holds the records (`[cache] write_cache_size_bytes`
//! of 512 MiB) to compare the readers on records in its memory, where a tailing consumer reads:
//! with the stock 64 MiB the first ~148,600 records move to its cold tier within seconds.
//!
//! With `CONSUMER_FIRST=1` each run reads with the consumer before the loops: against a broker
//! that tiered the records to its cold tier, whose answers are cached per fetch offset (see
//! PROTOCOL.md), the first reader of an offset pays the cold read and the next one does not;
//! the loops repeat their offsets run after run, so only the first run is a fair comparison
//! either way.
//!
//! The check runs as a task on the runtime's workers, as `quic_loopback` runs its readers;
//! with `MAIN_THREAD=1` it runs on the calling thread instead (`block_on`, as the body of
//! `#[tokio::main]` does).
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use rustmq_consumer_benches::transport::{
    channel_floor, fetch_request, ms, print_log, raw_fetch_loop, raw_fetch_partitions, run_reader,
    Logged, RAW_FETCH_MAX_BYTES,
};
use rustmq_consumer_benches::{GROUP, TOPIC};
use rustmq_consumer_core::protocol::{AcknowledgmentLevel, ProduceRequest, Record, Response};
use rustmq_consumer_tokio::{
    quic_transport, ConsumerBuilder, ConsumerConfig, Metrics, QuicConfig, QuicTransport, TlsMode,
    Transport,
};

/// Records in the partition, as in the issue.
const RECORDS: u64 = 200_000;
/// Records per Produce request: 25 short records are under 1 KiB, one QUIC packet. The real
/// broker reads a request with one `read()`, which can return a frame of several packets
/// only in part (seen once in thousands: a 7 KiB Produce answered "Serialization error").
const PRODUCE_BATCH: u64 = 25;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// One run's rates (records a second): the raw loop, the channel floor (one partition only),
/// the consumer.
type Row = (f64, Option<f64>, f64);

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .ok_or("usage: broker_check HOST:PORT [RUNS] [PARTITIONS]")?
        .parse()?;
    let runs: usize = args.next().map_or(Ok(3), |runs| runs.parse())?;
    let partitions: u32 = args.next().map_or(Ok(1), |p| p.parse())?;
    if partitions == 0 || RECORDS % u64::from(partitions) != 0 {
        return Err(format!("PARTITIONS must divide {RECORDS}").into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    run_reader(&rt, check(addr, runs, partitions))?
}

async fn check(addr: SocketAddr, runs: usize, partitions: u32) -> Result<()> {
    let each = RECORDS / u64::from(partitions);
    for partition in 0..partitions {
        produce(addr, partition, each).await?;
    }
    let n = RECORDS as usize;
    let capacity = ConsumerConfig::new(TOPIC, GROUP).max_unacked;
    let mut rows = Vec::new();
    let consumer_first = std::env::var_os("CONSUMER_FIRST").is_some();
    for run in 1..=runs {
        let group = format!("{GROUP}-check-{}-{run}", std::process::id());
        let mut consumer_run = None;
        if consumer_first {
            consumer_run = Some(consumer_check(addr, &group, partitions).await?);
        }
        let raw_transport = connected(addr).await?;
        let start = Instant::now();
        if partitions == 1 {
            raw_fetch_loop(&raw_transport, n, RAW_FETCH_MAX_BYTES).await;
        } else {
            raw_fetch_partitions(&raw_transport, partitions, each, RAW_FETCH_MAX_BYTES).await;
        }
        let raw = rate(start);

        // The floor is a one-partition baseline.
        let floor = if partitions == 1 {
            let floor_transport = connected(addr).await?;
            let start = Instant::now();
            channel_floor(floor_transport, n, RAW_FETCH_MAX_BYTES, capacity).await;
            Some(rate(start))
        } else {
            None
        };

        let (consumer, metrics) = match consumer_run {
            Some(done) => done,
            None => consumer_check(addr, &group, partitions).await?,
        };
        let floor_part = floor.map_or_else(String::new, |floor| {
            format!(
                ", channel floor {floor:.0}/s ({:.3}x raw; the consumer {:.3}x of it)",
                floor / raw,
                consumer / floor
            )
        });
        println!(
            "run {run}: raw loop {raw:.0}/s{floor_part}, consumer {consumer:.0}/s ({:.3}x raw), \
             every offset exactly once; {} fetches, {} commits, {} failed requests, {} breaker \
             transitions",
            consumer / raw,
            metrics.fetches,
            metrics.commits_sent,
            metrics.requests_failed,
            metrics.breaker_transitions
        );
        rows.push((raw, floor, consumer));
    }
    let ratios = |f: fn(&Row) -> Option<f64>| {
        let mut r: Vec<f64> = rows.iter().filter_map(f).collect();
        r.sort_by(f64::total_cmp);
        r
    };
    let consumer = ratios(|&(raw, _, consumer)| Some(consumer / raw));
    let floor = ratios(|&(raw, floor, _)| floor.map(|floor| floor / raw));
    if let (Some(first), Some(last)) = (consumer.first(), consumer.last()) {
        let median = |r: &[f64]| r[r.len() / 2];
        let floor = if floor.is_empty() {
            String::new()
        } else {
            format!("; channel floor / raw loop: median {:.3}x", median(&floor))
        };
        println!(
            "consumer / raw loop: {first:.3}x-{last:.3}x, median {:.3}x{floor}",
            median(&consumer)
        );
    }
    Ok(())
}

/// The consumer's run of [`consume`] in `group`; with `TIMELINE` set, over a [`Logged`]
/// transport whose log is printed after.
async fn consumer_check(addr: SocketAddr, group: &str, partitions: u32) -> Result<(f64, Metrics)> {
    if std::env::var_os("TIMELINE").is_none() {
        return consume(transport(addr)?, group, partitions, |_| {}).await;
    }
    let t0 = Instant::now();
    // To line the log up with a packet capture.
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    println!("  t0 at unix time {:.6} s", unix.as_secs_f64());
    let (logged, log) = Logged::new(transport(addr)?, t0);
    let mut delivered = vec![0.0; RECORDS as usize];
    let run = consume(logged, group, partitions, |i| delivered[i] = ms(t0)).await?;
    let each = usize::try_from(RECORDS / u64::from(partitions))?;
    print_log(&log, |partition, offset| {
        let i = usize::try_from(partition).ok()? * each + usize::try_from(offset).ok()?;
        delivered.get(i).copied()
    });
    Ok(run)
}

/// Messages a second since `start`.
fn rate(start: Instant) -> f64 {
    RECORDS as f64 / start.elapsed().as_secs_f64()
}

/// A transport to the broker, accepting its certificate whatever it is.
fn transport(addr: SocketAddr) -> Result<QuicTransport> {
    let config =
        QuicConfig::new(addr, "localhost").with_tls(TlsMode::DangerousAcceptAnyCertificate);
    Ok(quic_transport(config)?)
}

/// A transport to the broker, connected (by a one-record fetch) before any clock starts.
async fn connected(addr: SocketAddr) -> Result<QuicTransport> {
    let transport = transport(addr)?;
    high_watermark(&transport, 0).await?;
    Ok(transport)
}

/// The high watermark of `partition`, from a one-record fetch.
async fn high_watermark(transport: &QuicTransport, partition: u32) -> Result<u64> {
    match transport.request(fetch_request(partition, 0, 1)).await? {
        Response::Fetch(f) if f.error_code == 0 => Ok(f.high_watermark),
        Response::Fetch(f) => Err(format!(
            "fetch from {TOPIC}:{partition} failed with error code {} ({:?}): is the partition \
             registered?",
            f.error_code, f.error_message
        )
        .into()),
        other => Err(format!("a {:?} answer to a fetch", other.kind()).into()),
    }
}

/// Produces `each` records into an empty `partition`; accepts one that holds exactly them.
async fn produce(addr: SocketAddr, partition: u32, each: u64) -> Result<()> {
    let transport = transport(addr)?;
    match high_watermark(&transport, partition).await? {
        0 => {}
        held if held == each => return Ok(()),
        other => {
            return Err(format!(
                "{TOPIC}:{partition} holds {other} records, not 0 or {each}: use a fresh \
                 partition"
            )
            .into())
        }
    }
    let start = Instant::now();
    for first in (0..each).step_by(PRODUCE_BATCH as usize) {
        let records = (first..(first + PRODUCE_BATCH).min(each))
            .map(|offset| Record::from_value(Bytes::from(format!("msg-{offset}"))))
            .collect();
        let request = ProduceRequest {
            topic: TOPIC.to_owned(),
            partition_id: partition,
            records,
            acks: AcknowledgmentLevel::Leader,
            timeout_ms: 5_000,
        };
        match transport.request(request.into()).await? {
            Response::Produce(p) if p.error_code == 0 && p.offset == first => {}
            other => return Err(format!("produce at {first}: {other:?}").into()),
        }
    }
    println!(
        "produced {each} records into {TOPIC}:{partition} in {:.2?}",
        start.elapsed()
    );
    Ok(())
}

/// The consumer over `transport`, default config, in a group of its own (with several
/// partitions, all of them assigned by hand): the rate from `build()` to the last ack, after
/// checking every offset arrived once with its value. `delivered(i)` is called as record `i`
/// (partition-major) arrives.
async fn consume(
    transport: impl Transport,
    group: &str,
    partitions: u32,
    mut delivered: impl FnMut(usize),
) -> Result<(f64, Metrics)> {
    let each = RECORDS / u64::from(partitions);
    let mut seen = vec![false; RECORDS as usize];
    let mut config = ConsumerConfig::new(TOPIC, group);
    if partitions > 1 {
        config.partitions = (0..partitions).collect();
    }
    let start = Instant::now();
    let consumer = ConsumerBuilder::new()
        .config(config)
        .client(transport)
        .build()
        .await?;
    for _ in 0..RECORDS {
        let delivery = consumer
            .receive()
            .await?
            .ok_or("the consumer closed early")?;
        let (partition, offset) = (delivery.partition(), delivery.offset());
        let index = (partition < partitions && offset < each)
            .then(|| usize::try_from(u64::from(partition) * each + offset).ok())
            .flatten();
        let first = index
            .and_then(|i| seen.get_mut(i))
            .map(|seen| !std::mem::replace(seen, true));
        if let Some(i) = index {
            delivered(i);
        }
        if first != Some(true) || *delivery.value() != format!("msg-{offset}").as_bytes() {
            return Err(
                format!("{partition}:{offset} delivered twice, out of range or changed").into(),
            );
        }
        delivery.ack().await?;
    }
    let rate = rate(start);
    // After close: the final commit counted too.
    consumer.close().await?;
    Ok((rate, consumer.metrics().await))
}
