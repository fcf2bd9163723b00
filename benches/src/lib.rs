//! Helpers shared by the criterion benchmarks (`benches/consumer_benchmarks.rs`) and the
//! resident-memory check (`src/bin/memory.rs`).
//!
//! - [`core`]: drive a `ConsumerMachine` by hand with canned broker answers (no I/O, a fixed
//!   `now`). Deliveries are taken with the testkit's `take_deliveries`; the request loops
//!   stay here, specialised: they answer canned responses without cloning or recording
//!   requests, which the testkit's `Pump` does for every transmit.
//! - [`transport`]: transports for the driver benchmarks: [`transport::DelayedTransport`]
//!   (a fixed round trip in front of any transport, timed by a delay-line thread) and
//!   [`transport::ChunkedSimTransport`] (a `SimTransport` whose broker only ever holds one
//!   bounded chunk of the log, for the memory check).
//! - [`vm_rss_kib`]: the process's resident memory.

use bytes::Bytes;
use rustmq_consumer_core::protocol::Record;

/// The topic every benchmark consumes.
pub const TOPIC: &str = "bench";
/// The consumer group every benchmark commits to.
pub const GROUP: &str = "bench-group";
/// The payload of every message: small, like a typical event.
pub const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef";

/// `n` records with [`PAYLOAD`] as value (the payload bytes are shared, not copied).
pub fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|_| Record::from_value(Bytes::from_static(PAYLOAD)))
        .collect()
}

/// A Fetch `max_bytes` that brings `n` records of [`PAYLOAD`] from the simulated broker,
/// which counts it in the real broker's units (a per-record overhead plus the payload), not
/// in wire bytes.
pub fn fetch_bytes_for(n: usize) -> u32 {
    let cost = rustmq_consumer_testkit::SimBroker::new().fetch_cost(&records(1)[0]);
    u32::try_from(n.saturating_mul(cost)).unwrap_or(u32::MAX)
}

/// Resident memory of this process in KiB (`VmRSS` of `/proc/self/status`), if readable.
pub fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub mod core {
    //! Driving a [`ConsumerMachine`] by hand: canned answers, a fixed clock, no I/O.

    use std::time::{Duration, Instant};

    use rustmq_consumer_core::protocol::{
        CommitOffsetResponse, FetchOffsetResponse, FetchResponse, JoinGroupResponse,
        LeaveGroupResponse, Record, Request, Response,
    };
    use rustmq_consumer_core::{
        ConsumerConfig, ConsumerMachine, DeliveryTag, RequestId, TransportError,
    };
    use rustmq_consumer_testkit::take_deliveries;

    use super::{GROUP, TOPIC};

    /// A manually assigned partition 0 where `n` messages can be outstanding at once, the cache
    /// holds all of them, and no commit or fetch happens on its own while `n` are delivered:
    /// the setting of the ack-path benchmarks.
    pub fn wide_config(n: usize) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(TOPIC, GROUP);
        c.partitions = vec![0];
        c.fetch_size = n;
        c.max_unacked = n;
        c.max_unsettled_per_partition = n as u64;
        c.fetch_max_bytes = u32::MAX;
        c.prefetch_bytes = usize::MAX / 2;
        c.ack_batch_size = usize::MAX;
        c.ack_batch_timeout = Duration::from_secs(24 * 3600);
        c.cache_max_entries = Some(n);
        c.cache_max_bytes = usize::MAX / 2;
        c
    }

    /// Answers the start-up FetchOffset with "nothing committed" (so consumption starts at 0);
    /// returns the machine and the id and offset of its first Fetch, to be answered.
    pub fn start(config: ConsumerConfig, now: Instant) -> (ConsumerMachine, (RequestId, u64)) {
        let mut m = ConsumerMachine::new(config, now).expect("valid benchmark config");
        while let Some(t) = m.poll_transmit() {
            match t.request {
                Request::FetchOffset(_) => m.handle_response(
                    now,
                    t.id,
                    Ok(FetchOffsetResponse {
                        offsets: Default::default(),
                        error_code: 0,
                    }
                    .into()),
                ),
                Request::Fetch(f) => {
                    while m.poll_event().is_some() {}
                    return (m, (t.id, f.fetch_offset));
                }
                other => panic!("unexpected start-up request {:?}", other.kind()),
            }
        }
        panic!("the machine never fetched")
    }

    /// The answer to a fetch at `offset` carrying `records`.
    pub fn fetch_response(offset: u64, records: Vec<Record>) -> Response {
        let high_watermark = offset + records.len() as u64;
        FetchResponse {
            records,
            high_watermark,
            error_code: 0,
            error_message: None,
        }
        .into()
    }

    /// A successful commit answer.
    pub fn commit_ok() -> Response {
        CommitOffsetResponse { error_code: 0 }.into()
    }

    /// The answer to the JoinGroup or LeaveGroup a manual assignment sends to learn its
    /// group's generation before its first commit (generation 1, alone in the group).
    pub fn group_answer(request: &Request) -> Option<Response> {
        match request {
            Request::JoinGroup(_) => Some(
                JoinGroupResponse {
                    generation_id: 1,
                    member_id: "bench".to_owned(),
                    leader_id: "bench".to_owned(),
                    assigned_partitions: Default::default(),
                    error_code: 0,
                }
                .into(),
            ),
            Request::LeaveGroup(_) => Some(LeaveGroupResponse { error_code: 0 }.into()),
            _ => None,
        }
    }

    /// Drains `poll_transmit`: answers commits at once, and returns the id and offset of the
    /// first fetch it finds (later transmits stay queued).
    pub fn next_fetch(m: &mut ConsumerMachine, now: Instant) -> Option<(RequestId, u64)> {
        while let Some(t) = m.poll_transmit() {
            match t.request {
                Request::Fetch(f) => return Some((t.id, f.fetch_offset)),
                Request::CommitOffset(_) => m.handle_response(now, t.id, Ok(commit_ok())),
                other => match group_answer(&other) {
                    Some(answer) => m.handle_response(now, t.id, Ok(answer)),
                    None => panic!("unexpected request {:?}", other.kind()),
                },
            }
        }
        None
    }

    /// A machine on [`wide_config`]`(n)` with `n` messages fetched and delivered; returns it
    /// and the tags of the deliveries, lowest offset first.
    pub fn delivered(
        config: ConsumerConfig,
        n: usize,
        now: Instant,
    ) -> (ConsumerMachine, Vec<DeliveryTag>) {
        let (mut m, (id, offset)) = start(config, now);
        m.handle_response(now, id, Ok(fetch_response(offset, super::records(n))));
        let mut tags = Vec::with_capacity(n);
        take_deliveries(&mut m, &mut tags);
        assert_eq!(tags.len(), n, "every message delivered");
        (m, tags)
    }

    /// A transport failure, to feed the breaker.
    pub fn failure() -> Result<Response, TransportError> {
        Err(TransportError::ConnectionLost("benchmark".into()))
    }

    /// A deterministic permutation of `0..n` (xorshift Fisher-Yates).
    pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (x % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

pub mod transport {
    //! Transports for the driver benchmarks.

    use std::sync::mpsc;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::thread;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use rustmq_consumer_core::protocol::{FetchRequest, Record, Request, Response};
    use rustmq_consumer_core::{Transport, TransportError};
    use rustmq_consumer_testkit::{
        LoopbackBroker, LoopbackError, SharedBroker, SimBroker, SimTransport,
    };

    use super::{PAYLOAD, TOPIC};

    /// `quic_loopback`'s broker: [`broker_with`]`(messages)` served over QUIC on 127.0.0.1
    /// by the embedded [`LoopbackBroker`], started on `rt`.
    ///
    /// # Errors
    ///
    /// When the loopback server cannot start.
    pub fn loopback(
        rt: &tokio::runtime::Runtime,
        messages: usize,
    ) -> Result<LoopbackBroker, LoopbackError> {
        let quic: std::sync::Arc<dyn rustmq_consumer_core::quic::quinn::Runtime> =
            std::sync::Arc::new(rustmq_consumer_core::quic::quinn::TokioRuntime);
        rt.block_on(async { LoopbackBroker::start(broker_with(messages), quic) })
    }

    /// The consumer the QUIC workloads measure: on tokio, over `transport`, with the
    /// **default** `ConsumerConfig` (only the topic and `group` set; a group of its own per
    /// run starts at the earliest offset).
    ///
    /// # Errors
    ///
    /// As [`rustmq_consumer_core::ConsumerBuilder::build`].
    pub async fn default_consumer(
        transport: impl Transport,
        group: String,
    ) -> Result<rustmq_consumer_core::Consumer, rustmq_consumer_core::ConsumerError> {
        rustmq_consumer_tokio::ConsumerBuilder::with_runtime(rustmq_consumer_tokio::TokioRuntime)
            .config(rustmq_consumer_core::ConsumerConfig::new(TOPIC, group))
            .client(transport)
            .build()
            .await
    }

    /// Runs `work` on `rt` as the `bin/` checks run their readers: as a task on the runtime's
    /// workers (as `quic_loopback` runs its readers), or, with `MAIN_THREAD` set in the
    /// environment, on the calling thread (`block_on`, as the body of `#[tokio::main]` runs: a
    /// thread beside the workers).
    ///
    /// # Errors
    ///
    /// When the task panicked.
    pub fn run_reader<T: Send + 'static>(
        rt: &tokio::runtime::Runtime,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        if std::env::var_os("MAIN_THREAD").is_some() {
            Ok(rt.block_on(work))
        } else {
            rt.block_on(rt.spawn(work))
        }
    }

    /// Milliseconds since `t0`, the unit of a [`Logged`] timeline.
    pub fn ms(t0: Instant) -> f64 {
        t0.elapsed().as_secs_f64() * 1e3
    }

    /// What a [`Logged`] transport keeps of one request.
    pub struct Sent {
        /// When it went out, ms since the log's `t0`.
        pub at: f64,
        /// When its answer (or error) came back.
        pub answered: f64,
        /// The request, in short.
        pub what: String,
        /// For a Fetch: its partition, its offset and the records it brought back.
        pub fetch: Option<(u32, u64, usize)>,
    }

    /// The requests a [`Logged`] transport saw, in the order their answers came back.
    pub type RequestLog = Arc<Mutex<Vec<Sent>>>;

    /// A transport that logs each request around `inner`: when it went out, when its answer
    /// came back, and, for a Fetch, the records it brought.
    pub struct Logged<T> {
        inner: T,
        t0: Instant,
        log: RequestLog,
    }

    impl<T> Logged<T> {
        /// `inner`, logged in ms since `t0`; the log to read when the run is over.
        pub fn new(inner: T, t0: Instant) -> (Self, RequestLog) {
            let log = RequestLog::default();
            let logged = Self {
                inner,
                t0,
                log: Arc::clone(&log),
            };
            (logged, log)
        }
    }

    #[async_trait]
    impl<T: Transport> Transport for Logged<T> {
        async fn request(&self, request: Request) -> Result<Response, TransportError> {
            let (what, fetch) = match &request {
                Request::Fetch(f) => (
                    format!(
                        "Fetch {}:{} max_bytes {}",
                        f.partition_id, f.fetch_offset, f.max_bytes
                    ),
                    Some((f.partition_id, f.fetch_offset)),
                ),
                other => (format!("{:?}", other.kind()), None),
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
                fetch: fetch.map(|(partition, offset)| (partition, offset, records)),
            };
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(sent);
            answer
        }
    }

    /// Prints `log`, one line a request, with when each fetch answer's first record reached
    /// the application (`delivered(partition, offset)`, ms since the log's `t0`).
    pub fn print_log(log: &RequestLog, delivered: impl Fn(u32, u64) -> Option<f64>) {
        let log = log.lock().unwrap_or_else(PoisonError::into_inner);
        for sent in log.iter() {
            let first = sent
                .fetch
                .filter(|&(_, _, records)| records > 0)
                .and_then(|(partition, offset, _)| delivered(partition, offset))
                .map(|at| format!("; first record delivered at {at:.3} ms"))
                .unwrap_or_default();
            let records = sent
                .fetch
                .map(|(_, _, records)| format!(": {records} records"))
                .unwrap_or_default();
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "  {:>8.3} -> {:>8.3} ms  {}{records}{first}",
                    sent.at, sent.answered, sent.what
                );
            }
        }
    }

    /// `max_bytes` of the raw loop's fetches: 1 MiB, what a hand-written client would ask
    /// for. The broker counts it in its own units (about 380 per record of [`PAYLOAD`]), so
    /// each answer carries about 2,700 records.
    pub const RAW_FETCH_MAX_BYTES: u32 = 1 << 20;

    /// The raw loop, the `quic_loopback` baseline: Fetch requests one after another at
    /// advancing offsets of partition 0 of [`TOPIC`], counting records until `n` arrived.
    ///
    /// # Panics
    ///
    /// On a failed or empty fetch.
    pub async fn raw_fetch_loop(transport: &dyn Transport, n: usize, max_bytes: u32) {
        let mut received = 0usize;
        while received < n {
            let records = fetch_at(transport, 0, received as u64, max_bytes).await;
            for record in &records {
                std::hint::black_box(record);
            }
            received += records.len();
        }
    }

    /// The least a consumer can do beyond the raw loop: the same fetches, each record handed
    /// to the application (this future) through a bounded channel of `capacity` (the
    /// default `max_unacked`), the fetching on a task of its own that asks for the next
    /// answer once the last one is in the channel. The second `quic_loopback` baseline: what
    /// handing every message to another task costs, whatever the consumer does besides.
    ///
    /// # Panics
    ///
    /// On a failed or empty fetch.
    pub async fn channel_floor<T: Transport + 'static>(
        transport: T,
        n: usize,
        max_bytes: u32,
        capacity: usize,
    ) {
        let (tx, rx) = async_channel::bounded(capacity);
        let fetcher = tokio::spawn(async move {
            let mut fetched = 0usize;
            while fetched < n {
                let records = fetch_at(&transport, 0, fetched as u64, max_bytes).await;
                fetched += records.len();
                for record in records {
                    if tx.send(record).await.is_err() {
                        return;
                    }
                }
            }
        });
        for _ in 0..n {
            std::hint::black_box(rx.recv().await.expect("the fetcher stopped early"));
        }
        fetcher.await.expect("the fetcher panicked");
    }

    /// The raw loop over `partitions` partitions of [`TOPIC`], `each` records in each: every
    /// partition read to `each` in turn, one fetch in flight, as a simple client would.
    ///
    /// # Panics
    ///
    /// On a failed or empty fetch.
    pub async fn raw_fetch_partitions(
        transport: &dyn Transport,
        partitions: u32,
        each: u64,
        max_bytes: u32,
    ) {
        for partition in 0..partitions {
            let mut received = 0;
            while received < each {
                let records = fetch_at(transport, partition, received, max_bytes).await;
                received += records.len() as u64;
            }
        }
    }

    /// A Fetch of `partition` of [`TOPIC`] at `offset`, as the loops send it.
    pub fn fetch_request(partition: u32, offset: u64, max_bytes: u32) -> Request {
        FetchRequest {
            topic: TOPIC.to_owned(),
            partition_id: partition,
            fetch_offset: offset,
            max_bytes,
            timeout_ms: 1_000,
        }
        .into()
    }

    /// One Fetch of `partition` of [`TOPIC`] at `offset`: its records (never none).
    async fn fetch_at(
        transport: &dyn Transport,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Vec<Record> {
        let request = fetch_request(partition, offset, max_bytes);
        let Ok(Response::Fetch(fetched)) = transport.request(request).await else {
            panic!("fetch of {partition} at {offset} failed");
        };
        assert!(
            !fetched.records.is_empty(),
            "empty fetch of {partition} at {offset}"
        );
        fetched.records
    }

    type Job = (
        Instant,
        Request,
        async_channel::Sender<Result<Response, TransportError>>,
    );

    /// Answers every request `delay` after it was sent, through `inner`.
    ///
    /// A runtime timer would not do: tokio's timer wheel has a 1 ms resolution, which would
    /// quadruple a 0.25 ms round trip. Instead one delay-line thread takes requests in send
    /// order (so their due times never decrease), sleeps until each is due, then answers it
    /// from `inner` (which must answer without waiting, like a zero-latency `SimTransport`).
    /// Works under any runtime: the answer comes back on an `async-channel`.
    pub struct DelayedTransport {
        jobs: Mutex<mpsc::Sender<Job>>,
        delay: Duration,
    }

    impl std::fmt::Debug for DelayedTransport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DelayedTransport")
                .field("delay", &self.delay)
                .finish_non_exhaustive()
        }
    }

    impl DelayedTransport {
        /// `inner` answering `delay` after each request. The delay-line thread ends when the
        /// transport is dropped.
        pub fn new(inner: impl Transport, delay: Duration) -> Self {
            let (tx, rx) = mpsc::channel::<Job>();
            thread::Builder::new()
                .name("delay-line".into())
                .spawn(move || {
                    for (due, request, reply) in rx {
                        let now = Instant::now();
                        if due > now {
                            thread::sleep(due - now);
                        }
                        let answer = futures_lite::future::block_on(inner.request(request));
                        let _ = reply.try_send(answer);
                    }
                })
                .expect("spawn the delay-line thread");
            Self {
                jobs: Mutex::new(tx),
                delay,
            }
        }
    }

    #[async_trait]
    impl Transport for DelayedTransport {
        async fn request(&self, request: Request) -> Result<Response, TransportError> {
            let (reply, answer) = async_channel::bounded(1);
            let due = Instant::now() + self.delay;
            self.jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send((due, request, reply))
                .map_err(|_| TransportError::ConnectionLost("delay line stopped".into()))?;
            answer
                .recv()
                .await
                .map_err(|_| TransportError::ConnectionLost("delay line stopped".into()))?
        }
    }

    /// A fresh simulated broker holding `messages` of [`PAYLOAD`] on partition 0 of [`TOPIC`]; a
    /// manually assigned consumer creates its group itself.
    pub fn broker_with(messages: usize) -> SharedBroker {
        let mut b = SimBroker::new();
        b.create_topic(TOPIC, 1);
        b.produce_values(
            TOPIC,
            0,
            (0..messages).map(|_| bytes::Bytes::from_static(PAYLOAD)),
        )
        .expect("topic exists");
        SharedBroker::new(b)
    }

    /// A fresh simulated broker holding `messages` of [`PAYLOAD`] spread round-robin over
    /// `partitions` partitions of [`TOPIC`]; a manually assigned consumer creates its group
    /// itself.
    pub fn broker_spread(messages: usize, partitions: u32) -> SharedBroker {
        let mut b = SimBroker::new();
        b.create_topic(TOPIC, partitions);
        let per = messages / partitions as usize;
        let extra = messages % partitions as usize;
        for p in 0..partitions {
            let n = per + usize::from((p as usize) < extra);
            b.produce_values(TOPIC, p, (0..n).map(|_| bytes::Bytes::from_static(PAYLOAD)))
                .expect("topic exists");
        }
        SharedBroker::new(b)
    }

    struct Chunk {
        /// Offset of the chunk's first message in the logical log.
        base: u64,
        len: u64,
        produced: u64,
    }

    /// A [`SimTransport`] over a broker that only ever holds one chunk of the log: a log of
    /// `total` messages of [`TOPIC`]/0 is produced lazily, `chunk` at a time, and a chunk is
    /// dropped (the broker replaced by a fresh one with the next chunk) once the consumer
    /// fetches past it. Offsets are shifted on the way in and out, so the consumer sees one
    /// contiguous log. This stands in for broker-side retention, which `SimBroker` does not
    /// model, so the memory check measures the consumer and not the broker's storage.
    pub struct ChunkedSimTransport {
        inner: SimTransport,
        chunk: u64,
        total: u64,
        state: Mutex<Chunk>,
    }

    impl std::fmt::Debug for ChunkedSimTransport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ChunkedSimTransport")
                .field("chunk", &self.chunk)
                .field("total", &self.total)
                .finish_non_exhaustive()
        }
    }

    impl ChunkedSimTransport {
        /// A log of `total` messages served `chunk` at a time, over `inner`'s broker.
        pub fn new(inner: SimTransport, chunk: u64, total: u64) -> Self {
            let this = Self {
                inner,
                chunk,
                total,
                state: Mutex::new(Chunk {
                    base: 0,
                    len: 0,
                    produced: 0,
                }),
            };
            this.refill(&mut this.state.lock().unwrap_or_else(PoisonError::into_inner));
            this
        }

        /// Replaces the broker's log with the next chunk.
        fn refill(&self, s: &mut Chunk) {
            s.base += s.len;
            s.len = self.chunk.min(self.total - s.produced);
            s.produced += s.len;
            let mut b = SimBroker::new();
            b.create_topic(TOPIC, 1);
            b.produce_values(
                TOPIC,
                0,
                (0..s.len).map(|_| bytes::Bytes::from_static(PAYLOAD)),
            )
            .expect("topic exists");
            *self.inner.broker().lock() = b;
        }
    }

    #[async_trait]
    impl Transport for ChunkedSimTransport {
        async fn request(&self, request: Request) -> Result<Response, TransportError> {
            let Request::Fetch(mut fetch) = request else {
                return self.inner.request(request).await;
            };
            let base = {
                let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                while fetch.fetch_offset >= s.base + s.len && s.produced < self.total {
                    self.refill(&mut s);
                }
                s.base
            };
            // Below the chunk: gone from the broker (a refetch of a dropped message).
            fetch.fetch_offset = fetch.fetch_offset.checked_sub(base).unwrap_or(u64::MAX);
            let response = self.inner.request(Request::Fetch(fetch)).await?;
            Ok(match response {
                Response::Fetch(mut f) => {
                    f.high_watermark += base;
                    Response::Fetch(f)
                }
                other => other,
            })
        }
    }
}
