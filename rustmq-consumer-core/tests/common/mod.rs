//! A tiny in-test broker, and the testkit's pump driving a `ConsumerMachine` against it.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::Instant;

use rustmq_consumer_core::protocol::*;
use rustmq_consumer_core::*;
use rustmq_consumer_testkit::{fast_config, Peer, Pump};

/// One machine against a [`MiniBroker`], on a virtual clock.
pub type Harness = Pump<MiniBroker>;

/// A broker reduced to what the machine tests need: logs, committed offsets, produce, and a
/// group generation.
#[derive(Debug, Default)]
pub struct MiniBroker {
    pub logs: BTreeMap<(String, u32), Vec<Record>>,
    pub committed: BTreeMap<u32, u64>,
    /// The group's generation (`None`: the broker does not know the group). Only a join
    /// creates it and bumps it; commits are stored only under it (16 or 22 otherwise).
    pub generation: Option<u64>,
}

impl Peer for MiniBroker {
    fn answer(&mut self, _now: Instant, request: Request) -> Result<Response, TransportError> {
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
                let error_code = match self.generation {
                    None => error_code::UNKNOWN_GROUP,
                    Some(g) if g != r.generation_id => error_code::ILLEGAL_GENERATION,
                    Some(_) => {
                        for (tp, o) in &r.offsets {
                            self.committed.insert(tp.partition, *o);
                        }
                        0
                    }
                };
                CommitOffsetResponse { error_code }.into()
            }
            Request::JoinGroup(r) => {
                let generation = self.generation.map_or(1, |g| g + 1);
                self.generation = Some(generation);
                let member = format!("member-{generation}");
                let assigned = r
                    .topics
                    .iter()
                    .map(|t| TopicPartition::new(t.clone(), 0))
                    .collect();
                JoinGroupResponse {
                    generation_id: generation,
                    member_id: member.clone(),
                    leader_id: member.clone(),
                    assigned_partitions: [(member, assigned)].into_iter().collect(),
                    error_code: 0,
                }
                .into()
            }
            Request::LeaveGroup(_) => LeaveGroupResponse { error_code: 0 }.into(),
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
}

/// A started consumer on `config` against an empty broker.
pub fn harness(config: ConsumerConfig) -> Harness {
    harness_with(config, BTreeMap::new(), BTreeMap::new())
}

/// A started consumer on `config` against existing broker state.
pub fn harness_with(
    config: ConsumerConfig,
    logs: BTreeMap<(String, u32), Vec<Record>>,
    committed: BTreeMap<u32, u64>,
) -> Harness {
    // Stored commits mean someone joined the group once.
    let generation = (!committed.is_empty()).then_some(1);
    let broker = MiniBroker {
        logs,
        committed,
        generation,
    };
    let mut h = Pump::new(broker, config, Instant::now());
    h.drive();
    h
}

/// Partition 0 of `topic`, assigned by hand, with short empty-fetch backoffs.
pub fn config(topic: &str) -> ConsumerConfig {
    let mut c = fast_config(topic, "g");
    c.partitions = vec![0];
    c
}

/// What the machine tests add to the pump.
pub trait HarnessExt {
    /// Appends `n` messages `m<offset>` to `partition`, then drives.
    fn produce(&mut self, partition: u32, n: usize);
    /// The broker's answer to `request` now, leaving the machine alone.
    fn answer(&mut self, request: &Request) -> Result<Response, TransportError>;
    /// Takes the deliveries seen so far.
    fn deliveries(&mut self) -> Vec<Message>;
}

impl HarnessExt for Harness {
    fn produce(&mut self, partition: u32, n: usize) {
        let topic = self.m.config().topic.clone();
        let log = self.broker.logs.entry((topic, partition)).or_default();
        for _ in 0..n {
            let i = log.len();
            log.push(Record::from_value(format!("m{i}")));
        }
        self.drive();
    }

    fn answer(&mut self, request: &Request) -> Result<Response, TransportError> {
        self.broker.answer(self.now, request.clone())
    }

    fn deliveries(&mut self) -> Vec<Message> {
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
}
