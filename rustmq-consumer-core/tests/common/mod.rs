//! A tiny in-test broker and a pump that drives a `ConsumerMachine` against it.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rustmq_consumer_core::protocol::*;
use rustmq_consumer_core::*;

/// What the harness does with a transmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer at once from the mini broker.
    Answer,
    /// Keep it pending until the test answers it.
    Hold,
    /// Fail it with a transport error at once.
    Fail,
}

pub struct Harness {
    pub m: ConsumerMachine,
    pub now: Instant,
    pub logs: BTreeMap<(String, u32), Vec<Record>>,
    pub committed: BTreeMap<u32, u64>,
    pub sent: Vec<Request>,
    pub pending: VecDeque<Transmit>,
    pub events: Vec<Event>,
    pub mode: Mode,
}

impl Harness {
    pub fn new(config: ConsumerConfig) -> Self {
        Self::new_with(config, BTreeMap::new(), BTreeMap::new())
    }

    /// A consumer starting against existing broker state.
    pub fn new_with(
        config: ConsumerConfig,
        logs: BTreeMap<(String, u32), Vec<Record>>,
        committed: BTreeMap<u32, u64>,
    ) -> Self {
        let now = Instant::now();
        let m = ConsumerMachine::new(config, now).unwrap();
        let mut h = Self {
            m,
            now,
            logs,
            committed,
            sent: Vec::new(),
            pending: VecDeque::new(),
            events: Vec::new(),
            mode: Mode::Answer,
        };
        h.pump();
        h
    }

    pub fn config(topic: &str) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(topic, "g");
        c.partitions = vec![0];
        c.empty_fetch_backoff_min = Duration::from_millis(10);
        c.empty_fetch_backoff_max = Duration::from_millis(100);
        c
    }

    pub fn produce(&mut self, partition: u32, n: usize) {
        let topic = self.m.config().topic.clone();
        let log = self.logs.entry((topic, partition)).or_default();
        for _ in 0..n {
            let i = log.len();
            log.push(Record::from_value(format!("m{i}")));
        }
        self.pump();
    }

    pub fn answer(&mut self, request: &Request) -> Result<Response, TransportError> {
        Ok(match request {
            Request::Fetch(f) => {
                let log = self
                    .logs
                    .get(&(f.topic.clone(), f.partition_id))
                    .cloned()
                    .unwrap_or_default();
                let start = usize::try_from(f.fetch_offset)
                    .unwrap_or(usize::MAX)
                    .min(log.len());
                let mut records = Vec::new();
                let mut bytes = 0;
                for r in &log[start..] {
                    if !records.is_empty() && bytes + r.encoded_len() > f.max_bytes as usize {
                        break;
                    }
                    bytes += r.encoded_len();
                    records.push(r.clone());
                }
                FetchResponse {
                    records,
                    high_watermark: log.len() as u64,
                    error_code: 0,
                    error_message: None,
                }
                .into()
            }
            Request::FetchOffset(r) => FetchOffsetResponse {
                offsets: r
                    .topic_partitions
                    .iter()
                    .filter_map(|tp| self.committed.get(&tp.partition).map(|o| (tp.clone(), *o)))
                    .collect(),
                error_code: 0,
            }
            .into(),
            Request::CommitOffset(r) => {
                for (tp, o) in &r.offsets {
                    self.committed.insert(tp.partition, *o);
                }
                CommitOffsetResponse { error_code: 0 }.into()
            }
            Request::Produce(p) => {
                let log = self
                    .logs
                    .entry((p.topic.clone(), p.partition_id))
                    .or_default();
                let offset = log.len() as u64;
                log.extend(p.records.iter().cloned());
                ProduceResponse {
                    offset,
                    error_code: 0,
                    error_message: None,
                }
                .into()
            }
            other => {
                return Err(TransportError::Malformed(format!(
                    "unexpected {:?}",
                    other.kind()
                )))
            }
        })
    }

    /// Drains outputs, answering transmits per `mode`, until quiet.
    pub fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.m.poll_transmit() {
                progressed = true;
                self.sent.push(t.request.clone());
                match self.mode {
                    Mode::Answer => {
                        let r = self.answer(&t.request);
                        self.m.handle_response(self.now, t.id, r);
                    }
                    Mode::Hold => self.pending.push_back(t),
                    Mode::Fail => self.m.handle_response(
                        self.now,
                        t.id,
                        Err(TransportError::ConnectionLost("test".into())),
                    ),
                }
            }
            while let Some(e) = self.m.poll_event() {
                progressed = true;
                self.events.push(e);
            }
            if !progressed {
                break;
            }
        }
    }

    /// Answers the oldest held transmit from the mini broker.
    pub fn answer_pending(&mut self) -> Option<Request> {
        let t = self.pending.pop_front()?;
        let r = self.answer(&t.request);
        self.m.handle_response(self.now, t.id, r);
        self.pump();
        Some(t.request)
    }

    /// Answers every held transmit (and those they cause, when `mode` is `Answer`).
    pub fn answer_all_pending(&mut self) {
        while self.answer_pending().is_some() {}
    }

    /// Moves time forward to `now + d`, firing every timer on the way.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        let mut guard = 0;
        while let Some((at, _)) = self.m.poll_timeout() {
            if at > target {
                break;
            }
            self.now = self.now.max(at);
            self.m.handle_timeout(self.now);
            self.pump();
            guard += 1;
            assert!(guard < 100_000, "timer loop does not progress");
        }
        self.now = target;
        self.m.handle_timeout(self.now);
        self.pump();
    }

    /// Takes the deliveries seen so far.
    pub fn deliveries(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Deliver(d) => {
                out.push(d.clone());
                false
            }
            _ => true,
        });
        out
    }

    pub fn ack(&mut self, tag: DeliveryTag) {
        self.m.ack(self.now, tag).unwrap();
        self.pump();
    }

    pub fn nack(&mut self, tag: DeliveryTag, delay: Option<Duration>) {
        self.m.nack(self.now, tag, delay).unwrap();
        self.pump();
    }

    pub fn commits_sent(&self) -> Vec<&CommitOffsetRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::CommitOffset(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    pub fn fetches_sent(&self) -> Vec<&FetchRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::Fetch(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    pub fn produces_sent(&self) -> Vec<&ProduceRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::Produce(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }
}
