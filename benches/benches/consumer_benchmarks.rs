//! Criterion benchmarks of the RustMQ consumer.
//!
//! Each group sets our consumer beside its baseline, measured in the same run; the targets
//! are ratios between the two. Benchmarks report, they never assert timings. Groups:
//!
//! - `core_ack_path`: settle + watermark through `ConsumerMachine::ack`, in and out of order, and
//!   in bursts through `ConsumerMachine::ack_many` (the driver's path);
//! - `core_cycle`: fetch ingest, delivery, ack and the batched commit, beside a `VecDeque`;
//! - `core_subsystems`: nack + redelivery from the cache, cache-miss refetch, breaker cycles;
//! - `end_to_end`: the public `Consumer` on tokio and smol over a zero-latency `SimTransport`,
//!   beside a bare bounded channel between two tasks;
//! - `ack_throughput_vs_old_design`: acks against a 0.25 ms round trip, beside the old design
//!   (a task per message, one CommitOffset per ack);
//! - `partitions`: the public `Consumer` on tokio over a zero-latency `SimTransport`, the
//!   default config with 1, 10, 100 and 1,000 partitions assigned by hand, the same messages
//!   spread over them; every run asserts that no request failed (no request timed out).
//! - `quic_loopback`: the public `Consumer` with the default `ConsumerConfig` over QUIC on
//!   127.0.0.1 against the embedded `LoopbackBroker` (which counts `max_bytes` like the real
//!   broker), beside a raw loop of 1 MiB Fetch requests on the same kind of connection, each
//!   reader a task on the runtime's two workers; the ratio is printed after the group;
//! - `remote_broker`: the public `Consumer` with the default `ConsumerConfig` against a broker
//!   [`REMOTE_RTT`] away (the simulated broker behind a `DelayedTransport`, every request
//!   answered a round trip after it was sent), beside the raw loop of 1 MiB fetches over the
//!   same transport; the ratio is printed after the group;
//! - `process`: `Consumer::process` with a handler that waits 1 ms (simulated I/O) on
//!   messages over 1,000 keys, at concurrency 1, 8 and 64 in key order, beside the sequential
//!   `receive`/sleep/`ack` loop; the rates and ratios are printed after the group.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rustmq_consumer_benches::core::{
    commit_ok, delivered, failure, fetch_response, group_answer, next_fetch, shuffled, start,
    wide_config,
};
use rustmq_consumer_benches::transport::{
    broker_spread, broker_with, channel_floor, loopback, raw_fetch_loop, DelayedTransport,
    RAW_FETCH_MAX_BYTES,
};
use rustmq_consumer_benches::{fetch_bytes_for, records, GROUP, TOPIC};
use rustmq_consumer_core::process::OrderBy;
use rustmq_consumer_core::protocol::{CommitOffsetRequest, Request, TopicPartition};
use rustmq_consumer_core::{
    BreakerState, Consumer, ConsumerConfig, Event, Outcome, ProcessOptions, Runtime, Transport,
};
use rustmq_consumer_testkit::{take_deliveries, SimTransport};
use rustmq_consumer_tokio::TokioRuntime;

/// Deliveries acked per `core_ack_path` iteration.
const ACK_N: usize = 10_000;
/// Messages per fetch and per commit in `core_cycle` (the default `ack_batch_size`).
const CYCLE_BATCH: usize = 100;
/// Messages per iteration of the nack and refetch cycles.
const RETRY_N: usize = 1_000;
/// Messages consumed per `end_to_end` iteration.
const E2E_N: usize = 20_000;
/// Messages consumed per `partitions` iteration, spread over the partitions.
const PARTITIONS_N: usize = 200_000;
/// How long a `partitions` run waits for a message before it fails as stalled.
const STALL: Duration = Duration::from_secs(30);
/// Partition counts of the `partitions` group.
const PARTITION_COUNTS: [u32; 4] = [1, 10, 100, 1_000];
/// Acks per `ConsumerMachine::ack_many` call in `core_ack_path/ack_many_in_order`.
const ACK_BURST: usize = 64;

/// Messages consumed per `quic_loopback` iteration: the 200,000 of the run against the real
/// broker that the group stands for, so the one-time costs (the group join, the first fetch
/// on a fresh connection) weigh as they do there. (At 20,000 they are about a third of the
/// consumer's time.)
const QUIC_N: usize = 200_000;
/// Messages consumed per `remote_broker` iteration.
const REMOTE_N: usize = 100_000;
/// `remote_broker`'s round trip: a broker in another zone of the same region.
const REMOTE_RTT: Duration = Duration::from_millis(2);
/// Messages acked per iteration by our consumer in `ack_throughput_vs_old_design`.
const ACK_RTT_N: usize = 10_000;
/// Messages acked per iteration by the old design (about a quarter of a second each).
const OLD_N: usize = 1_000;
/// Messages per `process` iteration at concurrency 8 and 64.
const PROCESS_N: usize = 10_000;
/// Messages per `process` iteration at concurrency 1 and in the sequential loop (a 1 ms
/// handler makes 10,000 take ten seconds).
const PROCESS_SLOW_N: usize = 1_000;
/// Distinct keys of the `process` messages.
const PROCESS_KEYS: usize = 1_000;
/// The `process` handler's simulated I/O.
const HANDLER_WAIT: Duration = Duration::from_millis(1);

/// The measured commit round trip of a real RustMQ broker on loopback.
const RTT: Duration = Duration::from_micros(250);
/// Commits the old design had in flight at once. Its SDK serialised them behind the client's
/// lock; 2 is generous (a higher baseline), and puts its ceiling (2 / RTT = 8,000/s before
/// overheads) just above the old document's 5,000 acks/s.
const OLD_MAX_IN_FLIGHT: usize = 2;

// ------------------------------------------------------------------------- core

fn core_ack_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("core_ack_path");
    g.throughput(Throughput::Elements(ACK_N as u64));
    let now = Instant::now();
    let setup = || delivered(wide_config(ACK_N), ACK_N, now);
    g.bench_function("in_order", |b| {
        b.iter_batched(
            setup,
            |(mut m, tags)| {
                for tag in tags {
                    m.ack(now, tag).unwrap();
                }
                debug_assert_eq!(m.settle_watermark(0), Some(ACK_N as u64));
                m
            },
            BatchSize::LargeInput,
        )
    });
    // The driver's path: the acks queued in its gate since its last wake-up, as one input.
    g.bench_function("ack_many_in_order", |b| {
        b.iter_batched(
            setup,
            |(mut m, tags)| {
                for burst in tags.chunks(ACK_BURST) {
                    let refused = m.ack_many(now, burst.iter().copied());
                    debug_assert!(refused.is_empty());
                }
                debug_assert_eq!(m.settle_watermark(0), Some(ACK_N as u64));
                m
            },
            BatchSize::LargeInput,
        )
    });
    let order = shuffled(ACK_N, 0x5eed);
    g.bench_function("out_of_order", |b| {
        b.iter_batched(
            setup,
            |(mut m, tags)| {
                for &i in &order {
                    m.ack(now, tags[i]).unwrap();
                }
                debug_assert_eq!(m.settle_watermark(0), Some(ACK_N as u64));
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// One steady-state cycle of `CYCLE_BATCH` messages: answer the pending fetch with a batch,
/// take the deliveries, ack each in order, answer the commit the batch triggers. `machine`
/// acks with one `ack` per input; `machine_ack_many` applies the acks as the driver does, in
/// bursts of [`ACK_BURST`] (what its gate queued since it last woke), one input each.
fn core_cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("core_cycle");
    g.throughput(Throughput::Elements(CYCLE_BATCH as u64));
    let batch = records(CYCLE_BATCH);
    let now = Instant::now();

    for burst in [1, ACK_BURST] {
        let mut config = ConsumerConfig::new(TOPIC, GROUP);
        config.partitions = vec![0];
        config.fetch_size = CYCLE_BATCH;
        config.ack_batch_size = CYCLE_BATCH;
        // `now` stands still: without this only the first batch would commit.
        config.ack_batch_min_interval = Duration::ZERO;
        let (mut m, first) = start(config, now);
        let mut tags = Vec::with_capacity(CYCLE_BATCH);
        let mut committed = 0u64;
        let mut pending = Some(first);
        let name = if burst == 1 {
            "machine"
        } else {
            "machine_ack_many"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let (id, offset) = pending
                    .take()
                    .or_else(|| next_fetch(&mut m, now))
                    .expect("a fetch is pending");
                m.handle_response(now, id, Ok(fetch_response(offset, batch.clone())));
                tags.clear();
                take_deliveries(&mut m, &mut tags);
                if burst == 1 {
                    for &tag in &tags {
                        m.ack(now, tag).unwrap();
                    }
                } else {
                    for acks in tags.chunks(burst) {
                        let refused = m.ack_many(now, acks.iter().copied());
                        debug_assert!(refused.is_empty());
                    }
                }
                // Answer the commit this batch triggered; keep the next fetch for the next round.
                while let Some(t) = m.poll_transmit() {
                    match t.request {
                        Request::CommitOffset(_) => {
                            m.handle_response(now, t.id, Ok(commit_ok()));
                            committed += 1;
                        }
                        Request::Fetch(f) => pending = Some((t.id, f.fetch_offset)),
                        other => match group_answer(&other) {
                            Some(answer) => m.handle_response(now, t.id, Ok(answer)),
                            None => panic!("unexpected {:?}", other.kind()),
                        },
                    }
                }
                while m.poll_event().is_some() {}
            })
        });
        black_box(committed);
    }

    let mut queue = std::collections::VecDeque::with_capacity(CYCLE_BATCH);
    g.bench_function("vecdeque_push_pop", |b| {
        b.iter(|| {
            for r in batch.iter().cloned() {
                queue.push_back(r);
            }
            while let Some(r) = queue.pop_front() {
                black_box(r);
            }
        })
    });
    g.finish();
}

fn core_subsystems(c: &mut Criterion) {
    let mut g = c.benchmark_group("core_subsystems");
    let now = Instant::now();

    // nack with no delay, the retry fires, the message comes back from the cache, ack.
    g.throughput(Throughput::Elements(RETRY_N as u64));
    g.bench_function("nack_redeliver_from_cache", |b| {
        b.iter_batched(
            || delivered(wide_config(RETRY_N), RETRY_N, now),
            |(mut m, tags)| {
                for tag in tags {
                    m.nack(now, tag, Some(Duration::ZERO)).unwrap();
                }
                m.handle_timeout(now);
                let mut again = Vec::with_capacity(RETRY_N);
                take_deliveries(&mut m, &mut again);
                debug_assert_eq!(again.len(), RETRY_N);
                for tag in again {
                    m.ack(now, tag).unwrap();
                }
                m
            },
            BatchSize::LargeInput,
        )
    });

    // Same, with a one-entry cache: every retry misses and is fetched again, one by one.
    g.bench_function("nack_cache_miss_refetch", |b| {
        let mut config = wide_config(RETRY_N);
        config.cache_max_entries = Some(1);
        let one = records(1);
        b.iter_batched(
            || delivered(config.clone(), RETRY_N, now),
            |(mut m, tags)| {
                for tag in tags {
                    m.nack(now, tag, Some(Duration::ZERO)).unwrap();
                }
                m.handle_timeout(now);
                let mut again = Vec::with_capacity(RETRY_N);
                while let Some((id, offset)) = next_fetch(&mut m, now) {
                    m.handle_response(now, id, Ok(fetch_response(offset, one.clone())));
                    take_deliveries(&mut m, &mut again);
                }
                debug_assert_eq!(again.len(), RETRY_N);
                for tag in again {
                    m.ack(now, tag).unwrap();
                }
                m
            },
            BatchSize::LargeInput,
        )
    });

    // Closed -> Open (failed fetches) -> HalfOpen (recovery timeout) -> Closed (probe).
    g.throughput(Throughput::Elements(1));
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.partitions = vec![0];
    config.failure_threshold = 3;
    config.half_open_max_probes = 1;
    config.recovery_timeout = Duration::from_millis(1);
    config.retry_backoff_base = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(1);
    config.empty_fetch_backoff_min = Duration::from_millis(1);
    config.empty_fetch_backoff_max = Duration::from_millis(1);
    let mut clock = now;
    let (mut m, (id, _)) = start(config, clock);
    m.handle_response(clock, id, failure());
    g.bench_function("breaker_open_close_cycle", |b| {
        b.iter(|| {
            let mut transitions = 0;
            while transitions < 3 {
                let state = m.breaker_state();
                match m.poll_transmit() {
                    Some(t) if state == BreakerState::Closed => {
                        m.handle_response(clock, t.id, failure())
                    }
                    Some(t) => m.handle_response(clock, t.id, Ok(fetch_response(0, Vec::new()))),
                    None => {
                        clock = m.poll_timeout().expect("a timer is armed").0;
                        m.handle_timeout(clock);
                    }
                }
                while let Some(e) = m.poll_event() {
                    if let Event::BreakerChanged { .. } = e {
                        transitions += 1;
                    }
                }
            }
        })
    });
    g.finish();
}

// --------------------------------------------------------------------- drivers

/// Defaults, on a manually assigned partition 0, except `fetch_max_bytes`: sized to one
/// `fetch_size` of our messages in the broker's units ([`fetch_bytes_for`]).
fn e2e_config() -> ConsumerConfig {
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.partitions = vec![0];
    config.fetch_max_bytes = fetch_bytes_for(config.fetch_size);
    config
}

/// A consumer of `config` over `transport` on `runtime`.
async fn build(
    runtime: impl Runtime,
    transport: impl Transport,
    config: ConsumerConfig,
) -> Consumer {
    rustmq_consumer_core::ConsumerBuilder::with_runtime(runtime)
        .config(config)
        .client(transport)
        .build()
        .await
        .unwrap()
}

/// Consumes `n` messages through the public API: receive, ack, until `n` are acked.
async fn consume(consumer: &Consumer, n: usize) {
    for _ in 0..n {
        let d = consumer.receive().await.unwrap().unwrap();
        d.ack().await.unwrap();
    }
}

/// Consumes `n` messages with the batch calls: `receive_many` what is waiting, `ack_all` it.
async fn consume_batched(consumer: &Consumer, n: usize) {
    let mut acked = 0;
    while acked < n {
        let batch = consumer.receive_many(n - acked).await.unwrap();
        assert!(!batch.is_empty(), "consumer closed early");
        acked += batch.len();
        consumer.ack_all(batch).await.unwrap();
    }
}

/// The baseline: `n` messages between two tasks over a bounded channel of the same capacity
/// as the consumer's delivery channel (`max_unacked`).
async fn channel_loop<S>(spawn: S, n: usize, capacity: usize)
where
    S: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
{
    let batch = records(n);
    let (tx, rx) = async_channel::bounded(capacity);
    spawn(Box::pin(async move {
        for r in batch {
            tx.send(r).await.unwrap();
        }
    }));
    for _ in 0..n {
        black_box(rx.recv().await.unwrap());
    }
}

/// Times `$consume` (`consume` or `consume_batched`) of `E2E_N` messages through
/// `$adapter`'s consumer on `$runtime`; `|$fut| $block_on` runs one iteration's future to completion.
macro_rules! e2e_bench {
    ($g:expr, $name:expr, |$fut:ident| $block_on:expr, $adapter:ident :: $runtime:ident, $consume:ident) => {
        $g.bench_function($name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let broker = broker_with(E2E_N);
                    let $fut = async move {
                        let transport = SimTransport::new(broker, $adapter::$runtime);
                        let start = Instant::now();
                        let consumer = build($adapter::$runtime, transport, e2e_config()).await;
                        $consume(&consumer, E2E_N).await;
                        let elapsed = start.elapsed();
                        consumer.close().await.unwrap();
                        elapsed
                    };
                    total += $block_on;
                }
                total
            })
        });
    };
}

fn end_to_end(c: &mut Criterion) {
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Elements(E2E_N as u64));
    g.sample_size(10);
    let capacity = e2e_config().max_unacked;

    // Everything on one thread per runtime: tokio's current-thread runtime, and smol's global
    // executor (one thread by default) with the application loop spawned onto it too.
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    e2e_bench!(
        g,
        "tokio_consumer",
        |fut| tokio_rt.block_on(fut),
        rustmq_consumer_tokio::TokioRuntime,
        consume
    );
    e2e_bench!(
        g,
        "tokio_consumer_batched",
        |fut| tokio_rt.block_on(fut),
        rustmq_consumer_tokio::TokioRuntime,
        consume_batched
    );
    g.bench_function("tokio_channel_baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += tokio_rt.block_on(async {
                    let start = Instant::now();
                    channel_loop(|f| drop(tokio::spawn(f)), E2E_N, capacity).await;
                    start.elapsed()
                });
            }
            total
        })
    });
    e2e_bench!(
        g,
        "smol_consumer",
        |fut| smol::block_on(smol::spawn(fut)),
        rustmq_consumer_smol::SmolRuntime,
        consume
    );
    e2e_bench!(
        g,
        "smol_consumer_batched",
        |fut| smol::block_on(smol::spawn(fut)),
        rustmq_consumer_smol::SmolRuntime,
        consume_batched
    );
    g.bench_function("smol_channel_baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += smol::block_on(smol::spawn(async move {
                    let start = Instant::now();
                    channel_loop(|f| smol::spawn(f).detach(), E2E_N, capacity).await;
                    start.elapsed()
                }));
            }
            total
        })
    });
    g.finish();
}

fn partitions(c: &mut Criterion) {
    let mut g = c.benchmark_group("partitions");
    g.throughput(Throughput::Elements(PARTITIONS_N as u64));
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for count in PARTITION_COUNTS {
        g.bench_function(format!("tokio_{count}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let broker = broker_spread(PARTITIONS_N, count);
                    total += rt.block_on(async move {
                        let transport = SimTransport::new(broker, TokioRuntime);
                        let mut config = ConsumerConfig::new(TOPIC, GROUP);
                        config.partitions = (0..count).collect();
                        let start = Instant::now();
                        let consumer = build(TokioRuntime, transport, config).await;
                        for acked in 0..PARTITIONS_N {
                            let received = tokio::time::timeout(STALL, consumer.receive()).await;
                            let Ok(Ok(Some(d))) = received else {
                                panic!(
                                    "{count} partitions: stalled after {acked} acks: {received:?}"
                                );
                            };
                            d.ack().await.unwrap();
                        }
                        let elapsed = start.elapsed();
                        let metrics = consumer.metrics().await;
                        // An in-memory broker answers at once: no request may fail or time out.
                        assert_eq!(
                            metrics.requests_failed, 0,
                            "{count} partitions: requests failed: {metrics:?}"
                        );
                        consumer.close().await.unwrap();
                        elapsed
                    });
                }
                total
            })
        });
    }
    g.finish();
}

/// A transport to a fresh broker holding `n` messages that answers after [`RTT`].
fn delayed(n: usize) -> DelayedTransport {
    DelayedTransport::new(
        SimTransport::new(broker_with(n), rustmq_consumer_smol::SmolRuntime),
        RTT,
    )
}

/// The old design: for every message, a task that sends its own CommitOffset and awaits the
/// round trip; at most [`OLD_MAX_IN_FLIGHT`] commits in flight.
async fn old_design(transport: Arc<DelayedTransport>, n: usize) {
    let limit = Arc::new(tokio::sync::Semaphore::new(OLD_MAX_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(n);
    for offset in 0..n as u64 {
        let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
        let transport = Arc::clone(&transport);
        tasks.push(tokio::spawn(async move {
            let request = CommitOffsetRequest {
                group_id: GROUP.to_owned(),
                member_id: String::new(),
                generation_id: 0,
                offsets: [(TopicPartition::new(TOPIC, 0), offset + 1)].into(),
            };
            transport.request(request.into()).await.unwrap();
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn ack_throughput_vs_old_design(c: &mut Criterion) {
    let mut g = c.benchmark_group("ack_throughput_vs_old_design");
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    // The round trip the delay line really gives (sleep overshoot included), for the report.
    let probe = Arc::new(delayed(0));
    let rtt = rt.block_on(async {
        let start = Instant::now();
        for _ in 0..200 {
            probe
                .request(
                    rustmq_consumer_core::protocol::FetchOffsetRequest {
                        group_id: GROUP.into(),
                        topic_partitions: Vec::new(),
                    }
                    .into(),
                )
                .await
                .unwrap();
        }
        start.elapsed() / 200
    });
    eprintln!("ack_throughput_vs_old_design: effective round trip {rtt:?} (nominal {RTT:?})");

    g.throughput(Throughput::Elements(OLD_N as u64));
    g.bench_function("old_design_task_per_ack", |b| {
        let transport = Arc::new(delayed(0));
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let start = Instant::now();
                    old_design(Arc::clone(&transport), OLD_N).await;
                    start.elapsed()
                });
            }
            total
        })
    });

    // Ours, deliveries in hand: ack every one, then `commit()` waits for the broker's answer.
    g.throughput(Throughput::Elements(ACK_RTT_N as u64));
    g.bench_function("ours_batched_acks", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = delayed(ACK_RTT_N);
                total += rt.block_on(async {
                    let mut config = e2e_config();
                    // One fetch brings every message: on this core a fully delivered buffer
                    // is only refilled on the next input (fixed on main), and holding every
                    // delivery unacked gives it none.
                    config.max_unacked = ACK_RTT_N;
                    config.fetch_size = ACK_RTT_N;
                    config.fetch_max_bytes *= u32::try_from(ACK_RTT_N / 100).unwrap();
                    let consumer = rustmq_consumer_tokio::ConsumerBuilder::new()
                        .config(config)
                        .client(transport)
                        .build()
                        .await
                        .unwrap();
                    let mut in_hand = Vec::with_capacity(ACK_RTT_N);
                    for _ in 0..ACK_RTT_N {
                        in_hand.push(consumer.receive().await.unwrap().unwrap());
                    }
                    let start = Instant::now();
                    for d in in_hand {
                        d.ack().await.unwrap();
                    }
                    consumer.commit().await.unwrap();
                    let elapsed = start.elapsed();
                    consumer.close().await.unwrap();
                    elapsed
                });
            }
            total
        })
    });

    // Ours, the whole path: every fetch and commit pays the round trip too.
    g.bench_function("ours_consume_and_ack", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = delayed(ACK_RTT_N);
                total += rt.block_on(async {
                    let mut config = e2e_config();
                    config.fetch_size = 1_000;
                    config.fetch_max_bytes *= 10;
                    let start = Instant::now();
                    let consumer = build(TokioRuntime, transport, config).await;
                    consume(&consumer, ACK_RTT_N).await;
                    consumer.commit().await.unwrap();
                    let elapsed = start.elapsed();
                    consumer.close().await.unwrap();
                    elapsed
                });
            }
            total
        })
    });
    g.finish();
}

// ------------------------------------------------------------------------ quic

/// Every timed iteration of one `quic_loopback` function (warm-up included), for the ratio
/// printed after the group: criterion reports each function alone.
#[derive(Default)]
struct Tally {
    elapsed: Duration,
    messages: u64,
}

impl Tally {
    fn add(&mut self, elapsed: Duration, messages: usize) -> Duration {
        self.elapsed += elapsed;
        self.messages += messages as u64;
        elapsed
    }

    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Runs `reader` as a task on `rt`'s workers and waits for it: the readers share the two
/// workers with the server, the client's QUIC endpoint and the consumer's driver, as a
/// consumer spawned as a task does (`bin/quic_runs` with `MAIN_THREAD=1` measures them on the
/// calling thread, a third thread, as the body of `#[tokio::main]` runs).
fn on_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    reader: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(rt.spawn(reader)).unwrap()
}

/// The consumer as a new user builds it, **default** `ConsumerConfig` (only topic and group
/// set: it joins the group, which the broker creates, and starts at the earliest offset),
/// beside a raw loop of 1 MiB fetches, both against the simulated broker's real `max_bytes`
/// accounting. Each consumer iteration uses a group of its own, so it starts from offset 0.
/// Every reader runs as a task on the runtime's two workers ([`on_worker`]).
fn quic_loopback(c: &mut Criterion) {
    let mut g = c.benchmark_group("quic_loopback");
    g.throughput(Throughput::Elements(QUIC_N as u64));
    g.sample_size(10);
    // Two worker threads: the machine's two cores, shared by the server, the client's QUIC
    // endpoint, the consumer's driver and the application loop.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let loopback = loopback(&rt, QUIC_N).unwrap();
    let connect = || {
        rt.block_on(async {
            let transport =
                rustmq_consumer_tokio::quic_transport(loopback.client_config()).unwrap();
            transport.connect().await.unwrap();
            transport
        })
    };

    let mut raw = Tally::default();
    g.bench_function("raw_fetch_loop", |b| {
        let transport = Arc::new(connect());
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = Arc::clone(&transport);
                let elapsed = on_worker(&rt, async move {
                    let start = Instant::now();
                    raw_fetch_loop(&*transport, QUIC_N, RAW_FETCH_MAX_BYTES).await;
                    start.elapsed()
                });
                total += raw.add(elapsed, QUIC_N);
            }
            total
        })
    });

    let mut floor = Tally::default();
    let capacity = ConsumerConfig::new(TOPIC, GROUP).max_unacked;
    g.bench_function("channel_floor", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = connect();
                let elapsed = on_worker(&rt, async move {
                    let start = Instant::now();
                    channel_floor(transport, QUIC_N, RAW_FETCH_MAX_BYTES, capacity).await;
                    start.elapsed()
                });
                total += floor.add(elapsed, QUIC_N);
            }
            total
        })
    });

    let mut run = 0u64;
    let mut tallies = Vec::new();
    for batched in [false, true] {
        let name = if batched {
            "consumer_batched"
        } else {
            "consumer"
        };
        let mut tally = Tally::default();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let transport = connect();
                    run += 1;
                    let config = ConsumerConfig::new(TOPIC, format!("{GROUP}-quic-{run}"));
                    let elapsed = on_worker(&rt, async move {
                        let start = Instant::now();
                        let consumer = build(TokioRuntime, transport, config).await;
                        if batched {
                            consume_batched(&consumer, QUIC_N).await;
                        } else {
                            consume(&consumer, QUIC_N).await;
                        }
                        let elapsed = start.elapsed();
                        consumer.close().await.unwrap();
                        elapsed
                    });
                    total += tally.add(elapsed, QUIC_N);
                }
                total
            })
        });
        tallies.push((name, tally));
    }
    g.finish();
    rt.block_on(loopback.stop());

    eprintln!(
        "quic_loopback: raw_fetch_loop (1 MiB fetches) {:.0} msg/s",
        raw.rate()
    );
    eprintln!(
        "quic_loopback: channel_floor {:.0} msg/s = {:.3}x raw_fetch_loop",
        floor.rate(),
        floor.rate() / raw.rate()
    );
    for (name, tally) in &tallies {
        eprintln!(
            "quic_loopback: {name} (default config) {:.0} msg/s = {:.3}x raw_fetch_loop, {:.3}x channel_floor",
            tally.rate(),
            tally.rate() / raw.rate(),
            tally.rate() / floor.rate()
        );
    }
}

// ---------------------------------------------------------------- remote broker

/// The consumer as a new user builds it (**default** `ConsumerConfig`) against a broker
/// [`REMOTE_RTT`] away, beside a raw loop of 1 MiB fetches, one in flight, over the same
/// transport. Here the round trip, not the CPU, bounds a fetch: the consumer keeps a second
/// fetch in flight ahead of the first, the raw loop waits for each answer.
fn remote_broker(c: &mut Criterion) {
    let mut g = c.benchmark_group("remote_broker");
    g.throughput(Throughput::Elements(REMOTE_N as u64));
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let remote = || {
        DelayedTransport::new(
            SimTransport::new(broker_with(REMOTE_N), rustmq_consumer_smol::SmolRuntime),
            REMOTE_RTT,
        )
    };
    let mut raw = Tally::default();
    g.bench_function("raw_fetch_loop", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = remote();
                total += rt.block_on(async {
                    let start = Instant::now();
                    raw_fetch_loop(&transport, REMOTE_N, RAW_FETCH_MAX_BYTES).await;
                    raw.add(start.elapsed(), REMOTE_N)
                });
            }
            total
        })
    });
    let mut ours = Tally::default();
    g.bench_function("consumer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let transport = remote();
                total += rt.block_on(async {
                    let start = Instant::now();
                    let consumer =
                        build(TokioRuntime, transport, ConsumerConfig::new(TOPIC, GROUP)).await;
                    consume(&consumer, REMOTE_N).await;
                    let elapsed = start.elapsed();
                    consumer.close().await.unwrap();
                    ours.add(elapsed, REMOTE_N)
                });
            }
            total
        })
    });
    g.finish();
    eprintln!(
        "remote_broker: raw_fetch_loop (1 MiB fetches, {REMOTE_RTT:?} round trip) {:.0} msg/s",
        raw.rate()
    );
    eprintln!(
        "remote_broker: consumer (default config) {:.0} msg/s = {:.3}x raw_fetch_loop",
        ours.rate(),
        ours.rate() / raw.rate()
    );
}

// ---------------------------------------------------------------------- process

/// A broker holding `n` messages in one partition, keyed over [`PROCESS_KEYS`] keys.
fn keyed_broker(n: usize) -> rustmq_consumer_testkit::SharedBroker {
    let mut b = rustmq_consumer_testkit::SimBroker::new();
    b.create_topic(TOPIC, 1);
    let batch = records(n)
        .into_iter()
        .enumerate()
        .map(|(i, mut record)| {
            record.key = Some(bytes::Bytes::from(format!("key-{}", i % PROCESS_KEYS)));
            record
        })
        .collect();
    b.produce(TOPIC, 0, batch).unwrap();
    rustmq_consumer_testkit::SharedBroker::new(b)
}

/// `n` messages through `Consumer::process` at `concurrency`, each handler waiting
/// [`HANDLER_WAIT`] on tokio's clock; the time from the first pull to the last ack.
async fn process_run(consumer: &Consumer, n: usize, concurrency: usize) -> Duration {
    let handled = std::cell::Cell::new(0);
    let (all_done, done) = async_channel::bounded::<()>(1);
    let start = Instant::now();
    let summary = consumer
        .process_until(
            ProcessOptions::new(concurrency).order_by(OrderBy::Key),
            |_| {
                let (handled, all_done) = (&handled, all_done.clone());
                async move {
                    rustmq_consumer_core::sleep(&TokioRuntime, HANDLER_WAIT).await;
                    handled.set(handled.get() + 1);
                    if handled.get() == n {
                        let _ = all_done.try_send(());
                    }
                    Outcome::Ack
                }
            },
            async {
                let _ = done.recv().await;
            },
        )
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(summary.acked, n as u64);
    elapsed
}

/// The sequential loop: receive, wait [`HANDLER_WAIT`], ack, `n` times.
async fn sequential_run(consumer: &Consumer, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let d = consumer.receive().await.unwrap().unwrap();
        rustmq_consumer_core::sleep(&TokioRuntime, HANDLER_WAIT).await;
        d.ack().await.unwrap();
    }
    start.elapsed()
}

fn process(c: &mut Criterion) {
    let mut g = c.benchmark_group("process");
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // `None`: the sequential loop.
    let runs: [(&str, Option<usize>, usize); 4] = [
        ("sequential_receive_ack", None, PROCESS_SLOW_N),
        ("concurrency_1", Some(1), PROCESS_SLOW_N),
        ("concurrency_8", Some(8), PROCESS_N),
        ("concurrency_64", Some(64), PROCESS_N),
    ];
    let mut tallies = Vec::new();
    for (name, concurrency, n) in runs {
        g.throughput(Throughput::Elements(n as u64));
        let mut tally = Tally::default();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let broker = keyed_broker(n);
                    let elapsed = rt.block_on(async {
                        let transport = SimTransport::new(broker, TokioRuntime);
                        let consumer = build(TokioRuntime, transport, e2e_config()).await;
                        let elapsed = match concurrency {
                            Some(concurrency) => process_run(&consumer, n, concurrency).await,
                            None => sequential_run(&consumer, n).await,
                        };
                        consumer.close().await.unwrap();
                        elapsed
                    });
                    total += tally.add(elapsed, n);
                }
                total
            })
        });
        tallies.push((name, tally));
    }
    g.finish();
    let sequential = tallies[0].1.rate();
    for (name, tally) in &tallies {
        eprintln!(
            "process: {name} {:.0} msg/s = {:.1}x sequential_receive_ack",
            tally.rate(),
            tally.rate() / sequential
        );
    }
}

criterion_group!(
    benches,
    core_ack_path,
    core_cycle,
    core_subsystems,
    end_to_end,
    ack_throughput_vs_old_design,
    partitions,
    quic_loopback,
    remote_broker,
    process
);
criterion_main!(benches);
