//! A proptest state-machine test of the core against a small reference model.
//!
//! Random operation sequences drive one `ConsumerMachine`: answers to any pending request in
//! any order (success, error code, error frame, connection loss, never), acks, nacks and
//! rejects of any outstanding delivery in any order, pauses, resumes, seeks, on-demand
//! commits, time jumps, produces and close. After every operation the reference model's
//! settle watermark must equal the machine's exactly, and every invariant of the testkit's
//! `Checker` must hold. Cases run: `PROPTEST_CASES` (default 256), printed at the end.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use rustmq_consumer_core::protocol::{Request, Response};
use rustmq_consumer_core::{
    dead_letter_headers, ConsumerConfig, ConsumerMachine, DeliveryTag, Event, RequestId,
    TransportError, UsageError,
};
use rustmq_consumer_testkit::*;

#[derive(Debug, Clone)]
enum How {
    Ok,
    ErrorCode,
    ErrorFrame,
    ConnectionLost,
    Never,
}

#[derive(Debug, Clone)]
enum Op {
    Answer(usize, How),
    Ack(usize),
    Nack(usize, Option<u16>),
    Reject(usize),
    Pause(u32),
    Resume(u32),
    Seek(u32, u64),
    Advance(u16),
    Wake,
    Commit,
    Produce(u32, u8),
    Close,
}

fn op() -> impl Strategy<Value = Op> {
    let how = prop_oneof![
        6 => Just(How::Ok),
        1 => Just(How::ErrorCode),
        1 => Just(How::ErrorFrame),
        1 => Just(How::ConnectionLost),
        1 => Just(How::Never),
    ];
    prop_oneof![
        12 => (any::<usize>(), how).prop_map(|(i, h)| Op::Answer(i, h)),
        6 => any::<usize>().prop_map(Op::Ack),
        2 => (any::<usize>(), proptest::option::of(0u16..200)).prop_map(|(i, d)| Op::Nack(i, d)),
        1 => any::<usize>().prop_map(Op::Reject),
        1 => (0u32..3).prop_map(Op::Pause),
        1 => (0u32..3).prop_map(Op::Resume),
        1 => (0u32..3, 0u64..12).prop_map(|(p, o)| Op::Seek(p, o)),
        2 => (0u16..3000).prop_map(Op::Advance),
        3 => Just(Op::Wake),
        1 => Just(Op::Commit),
        2 => (0u32..3, 1u8..6).prop_map(|(p, n)| Op::Produce(p, n)),
        1 => Just(Op::Close),
    ]
}

fn config() -> impl Strategy<Value = ConsumerConfig> {
    (
        1u32..=3,
        0u32..3,
        any::<bool>(),
        1usize..5,
        1usize..6,
        1usize..4,
        prop_oneof![Just(Some(1)), Just(Some(3)), Just(None)],
        1u32..4,
        1u32..3,
        any::<u64>(),
    )
        .prop_map(
            |(parts, retries, dlq, unacked, fetch, batch, cache, threshold, probes, seed)| {
                let mut c = ConsumerConfig::new(TOPIC, GROUP);
                c.partitions = (0..parts).collect();
                c.max_retry_attempts = retries;
                c.dead_letter_queue = dlq.then(|| DEAD_LETTER_TOPIC.to_owned());
                c.max_unacked = unacked;
                c.fetch_size = fetch;
                c.ack_batch_size = batch;
                c.cache_max_entries = cache;
                c.failure_threshold = threshold;
                c.half_open_max_probes = probes;
                c.request_timeout = Duration::from_millis(500);
                c.recovery_timeout = Duration::from_millis(300);
                c.half_open_max_wait = Duration::from_millis(800);
                c.retry_backoff_base = Duration::from_millis(5);
                c.retry_backoff_max = Duration::from_millis(200);
                c.ack_batch_timeout = Duration::from_millis(50);
                c.drain_timeout = Duration::from_millis(300);
                c.seed = seed;
                c
            },
        )
}

/// The reference model of one partition in the current seek generation.
#[derive(Debug, Default)]
struct Part {
    start: u64,
    delivered: BTreeSet<u64>,
    settled: BTreeSet<u64>,
    generation: u64,
}

impl Part {
    /// Lowest unsettled offset: the lowest delivered and unsettled one, or the first never
    /// delivered (fresh deliveries are in offset order).
    fn low(&self) -> u64 {
        let first_never = self.delivered.last().map_or(self.start, |o| o + 1);
        self.delivered
            .iter()
            .find(|o| !self.settled.contains(o))
            .copied()
            .unwrap_or(first_never)
            .min(first_never)
    }
}

struct Pending {
    id: RequestId,
    request: Request,
    generations: Vec<u64>,
    bound: BTreeMap<u32, u64>,
}

struct World {
    m: ConsumerMachine,
    b: SimBroker,
    checker: Checker,
    now: Instant,
    start: Instant,
    step: u64,
    parts: Vec<Part>,
    pending: Vec<Pending>,
    outstanding: Vec<DeliveryTag>,
    paused: BTreeSet<u32>,
    closing: bool,
}

type R = Result<(), TestCaseError>;

/// Answers `finish` gives at one instant before it calls the machine a runaway.
const ANSWERS_AT_ONE_INSTANT: usize = 10_000;

impl World {
    fn new(config: ConsumerConfig) -> Result<Self, TestCaseError> {
        let now = Instant::now();
        let mut b = SimBroker::new();
        b.create_topic(TOPIC, config.partitions.len() as u32);
        if let Some(dlq) = &config.dead_letter_queue {
            b.create_topic(dlq, 1);
        }
        let checker = Checker::new(&config);
        let parts = config.partitions.iter().map(|_| Part::default()).collect();
        let m = ConsumerMachine::new(config, now).unwrap();
        let mut w = Self {
            m,
            b,
            checker,
            now,
            start: now,
            step: 0,
            parts,
            pending: Vec::new(),
            outstanding: Vec::new(),
            paused: BTreeSet::new(),
            closing: false,
        };
        w.drain(None)?;
        Ok(w)
    }

    fn v(r: Result<(), Violation>) -> R {
        r.map_err(|v| TestCaseError::fail(v.to_string()))
    }

    /// Drains outputs after an input; `answered` is the request whose answer was the input.
    fn drain(&mut self, answered: Option<&Pending>) -> R {
        self.step += 1;
        self.checker
            .set_step(self.step, self.now.duration_since(self.start));
        let transmits = transmits(&mut self.m);
        let events = events(&mut self.m);
        let breaker = self.m.breaker_state();
        self.checker.on_events_of_input(&events);
        for t in transmits {
            Self::v(self.checker.on_transmit(t.id, &t.request, breaker))?;
            let bound = match &t.request {
                Request::CommitOffset(c) => {
                    let offsets: Vec<(u32, u64)> =
                        c.offsets.iter().map(|(tp, o)| (tp.partition, *o)).collect();
                    self.checker
                        .on_commit_sent(&offsets)
                        .map_err(|v| TestCaseError::fail(v.to_string()))?
                }
                _ => BTreeMap::new(),
            };
            self.pending.push(Pending {
                id: t.id,
                request: t.request,
                generations: self.parts.iter().map(|p| p.generation).collect(),
                bound,
            });
        }
        for e in &events {
            let b = &self.b;
            Self::v(
                self.checker
                    .on_event(e, |p, o| b.records(TOPIC, p).get(o as usize)),
            )?;
            match e {
                Event::Deliver(d) => {
                    let p = &mut self.parts[d.tag.partition as usize];
                    p.delivered.insert(d.tag.offset);
                    self.outstanding.push(d.tag);
                }
                Event::Discarded {
                    partition, offset, ..
                } => {
                    let p = &mut self.parts[*partition as usize];
                    if *offset >= p.start {
                        p.settled.insert(*offset);
                    }
                }
                Event::DeadLettered {
                    partition, offset, ..
                } => {
                    // Only a produce sent in the current generation settles (the machine
                    // ignores confirmations of entries from before a seek).
                    let gen_then = answered.map(|a| a.generations[*partition as usize]);
                    let p = &mut self.parts[*partition as usize];
                    if gen_then == Some(p.generation) && *offset >= p.start {
                        p.settled.insert(*offset);
                    }
                }
                _ => {}
            }
        }
        let m = &self.m;
        Self::v(
            self.checker
                .check_state(&m.metrics(), |p| m.settle_watermark(p)),
        )?;
        for (i, p) in self.parts.iter().enumerate() {
            let w = self.m.settle_watermark(i as u32);
            prop_assert_eq!(
                w,
                Some(p.low()),
                "partition {}: machine watermark vs model (step {})",
                i,
                self.step
            );
        }
        Ok(())
    }

    fn answer(&mut self, i: usize, how: How) -> R {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = self.pending.remove(i % self.pending.len());
        let result = match how {
            How::Never => return Ok(()),
            How::ConnectionLost => Err(TransportError::ConnectionLost("model".into())),
            How::ErrorFrame => Err(TransportError::Broker("Error: model".into())),
            How::ErrorCode | How::Ok => {
                if matches!(how, How::ErrorCode) {
                    match pending.request {
                        Request::Fetch(_) => self.b.fail_next_fetches(1),
                        Request::CommitOffset(_) => self.b.fail_next_commits(1),
                        _ => {}
                    }
                }
                let r = self.b.handle(self.now, pending.request.clone());
                self.b.fail_next_fetches(0);
                self.b.fail_next_commits(0);
                match (&pending.request, &r) {
                    (Request::Produce(req), Ok(Response::Produce(resp)))
                        if resp.error_code == 0 =>
                    {
                        for rec in &req.records {
                            let h = |k| {
                                rec.header(k)
                                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                            };
                            let p = h(dead_letter_headers::ORIGINAL_PARTITION).unwrap();
                            let o = h(dead_letter_headers::ORIGINAL_OFFSET).unwrap();
                            self.checker.dead_letter_stored(p as u32, o);
                        }
                    }
                    (Request::CommitOffset(req), Ok(Response::CommitOffset(resp)))
                        if resp.error_code == 0 =>
                    {
                        let offsets: Vec<(u32, u64)> = req
                            .offsets
                            .iter()
                            .map(|(tp, o)| (tp.partition, *o))
                            .collect();
                        Self::v(self.checker.on_commit_accepted(&offsets, &pending.bound))?;
                    }
                    _ => {}
                }
                r.map_err(|e| TransportError::Broker(e.0))
            }
        };
        self.checker.on_resolved(pending.id);
        self.m.handle_response(self.now, pending.id, result);
        self.drain(Some(&pending))
    }

    fn settle(&mut self, i: usize, what: u8, delay: Option<u16>) -> R {
        if self.outstanding.is_empty() {
            return Ok(());
        }
        let tag = self.outstanding.remove(i % self.outstanding.len());
        let generation = self.parts[tag.partition as usize].generation;
        let r = match what {
            0 => {
                self.checker
                    .side_effect(tag.partition, tag.offset, generation);
                self.m.ack(self.now, tag)
            }
            1 => self.m.nack(
                self.now,
                tag,
                delay.map(|d| Duration::from_millis(d.into())),
            ),
            _ => self.m.reject(self.now, tag, "model says no"),
        };
        match r {
            Ok(()) => {
                if what == 0 {
                    self.parts[tag.partition as usize]
                        .settled
                        .insert(tag.offset);
                }
                self.checker
                    .handed_back(tag.partition, tag.offset, generation);
                self.drain(None)
            }
            Err(UsageError::Closed) if self.m.is_closed() => Ok(()),
            Err(e) => Err(TestCaseError::fail(format!("{tag:?} refused: {e}"))),
        }
    }

    fn apply(&mut self, op: Op) -> R {
        let parts = self.parts.len() as u32;
        match op {
            Op::Answer(i, how) => self.answer(i, how),
            Op::Ack(i) => self.settle(i, 0, None),
            Op::Nack(i, d) => self.settle(i, 1, d),
            Op::Reject(i) => self.settle(i, 2, None),
            Op::Pause(p) | Op::Resume(p) if p >= parts || self.closing => Ok(()),
            Op::Pause(p) => {
                self.paused.insert(p);
                self.checker.set_paused(p, true);
                self.m.pause(self.now, &[p]).unwrap();
                self.drain(None)
            }
            Op::Resume(p) => {
                self.paused.remove(&p);
                self.checker.set_paused(p, false);
                self.m.resume(self.now, &[p]).unwrap();
                self.drain(None)
            }
            Op::Seek(p, _) if p >= parts || self.closing => Ok(()),
            Op::Seek(p, o) => {
                self.checker.seek(p, o);
                let part = &mut self.parts[p as usize];
                part.generation += 1;
                part.start = o;
                part.delivered.clear();
                part.settled.clear();
                self.outstanding.retain(|t| t.partition != p);
                self.m.seek(self.now, p, o).unwrap();
                self.drain(None)
            }
            Op::Advance(ms) => {
                self.now += Duration::from_millis(ms.into());
                self.m.handle_timeout(self.now);
                self.drain(None)
            }
            Op::Wake => {
                if let Some((at, _)) = self.m.poll_timeout() {
                    self.now = self.now.max(at);
                }
                self.m.handle_timeout(self.now);
                self.drain(None)
            }
            Op::Commit => match self.m.commit(self.now) {
                Ok(_) => self.drain(None),
                Err(UsageError::Closed) => Ok(()),
                Err(e) => Err(TestCaseError::fail(format!("commit refused: {e}"))),
            },
            Op::Produce(p, n) => {
                if p < parts {
                    let values: Vec<String> = (0..n).map(|i| format!("v{p}-{i}")).collect();
                    self.b.produce_values(TOPIC, p, values).unwrap();
                }
                Ok(())
            }
            Op::Close => {
                self.closing = true;
                self.m.close(self.now);
                self.drain(None)
            }
        }
    }

    /// Closes, answering everything and letting time pass; Closed must come within bounds.
    fn finish(&mut self) -> R {
        self.closing = true;
        self.m.close(self.now);
        self.drain(None)?;
        for _ in 0..200 {
            if self.checker.closed() {
                break;
            }
            for _ in 0..ANSWERS_AT_ONE_INSTANT {
                if self.pending.is_empty() {
                    break;
                }
                self.answer(0, How::Ok)?;
            }
            prop_assert!(
                self.pending.is_empty(),
                "requests still pending after ANSWERS_AT_ONE_INSTANT = {} answers at one instant",
                ANSWERS_AT_ONE_INSTANT
            );
            if !self.outstanding.is_empty() {
                self.settle(0, 0, None)?;
                continue;
            }
            self.apply(Op::Wake)?;
        }
        prop_assert!(self.checker.closed(), "no Closed after close");
        prop_assert!(self.m.is_closed());
        Ok(())
    }
}

#[test]
fn machine_matches_the_reference_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..Config::default()
    });
    let ran = std::cell::Cell::new(0u64);
    let ops_total = std::cell::Cell::new(0u64);
    let strategy = (config(), proptest::collection::vec(op(), 1..200));
    let result = runner.run(&strategy, |(config, ops)| {
        ran.set(ran.get() + 1);
        ops_total.set(ops_total.get() + ops.len() as u64);
        let mut w = World::new(config)?;
        for op in ops {
            w.apply(op)?;
        }
        w.finish()
    });
    let (ran, ops_total) = (ran.get(), ops_total.get());
    println!("reference model: {ran} cases run ({cases} required), {ops_total} operations");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(ran >= u64::from(cases));
}

/// The minimal sequence proptest found (its seed is in `proptest-regressions/model.txt`, replayed first by every run): after a
/// seek, a commit that fails, and close, the final commit's request deadline and the
/// FinalCommit phase deadline pass; the machine reports `Closed` and then still transmits a
/// CommitOffset.
#[test]
fn commit_sent_after_closed() {
    let mut c = ConsumerConfig::new(TOPIC, GROUP);
    c.partitions = vec![0, 1, 2];
    c.max_retry_attempts = 0;
    c.dead_letter_queue = None;
    c.max_unacked = 1;
    c.fetch_size = 1;
    c.ack_batch_size = 1;
    c.cache_max_entries = Some(1);
    c.failure_threshold = 2;
    c.half_open_max_probes = 1;
    c.request_timeout = Duration::from_millis(500);
    c.recovery_timeout = Duration::from_millis(300);
    c.half_open_max_wait = Duration::from_millis(800);
    c.retry_backoff_base = Duration::from_millis(5);
    c.retry_backoff_max = Duration::from_millis(200);
    c.ack_batch_timeout = Duration::from_millis(50);
    c.drain_timeout = Duration::from_millis(300);
    c.seed = 0;
    let ops = [
        Op::Answer(0, How::ErrorFrame),
        Op::Advance(0),
        Op::Answer(0, How::Ok),
        Op::Advance(1),
        Op::Ack(0),
        Op::Seek(0, 0),
        Op::Wake,
        Op::Wake,
        Op::Advance(4),
        Op::Wake,
        Op::Answer(11383399316353564520, How::ErrorCode),
        Op::Advance(1),
        Op::Wake,
        Op::Answer(0, How::Ok),
        Op::Close,
        Op::Advance(500),
        Op::Advance(300),
    ];
    let mut w = World::new(c).unwrap();
    for op in ops {
        if let Err(e) = w.apply(op.clone()) {
            panic!("after {op:?}: {e}");
        }
    }
}
