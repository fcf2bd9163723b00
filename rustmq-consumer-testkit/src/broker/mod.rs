//! A sans-IO model of the RustMQ broker: partition storage, the group coordinator and its
//! session reaper, with exactly the semantics of `PROTOCOL.md`.
//!
//! Nothing here reads a clock, sleeps or touches a socket: time enters as `now` on
//! [`SimBroker::handle`] and [`SimBroker::handle_timeout`], member ids come from a seeded PRNG,
//! and every map is a `BTreeMap`, so the same inputs always give the same outputs.
//!
//! # Codemap
//!
//! - `mod.rs`: [`SimBroker`] itself, its clock and reaper constants, [`BrokerError`], and
//!   [`SimBroker::handle`], which routes each request to its handler and logs it.
//! - `storage`: topics and their append-only logs, produce, fetch with the real broker's
//!   `max_bytes` accounting ([`DEFAULT_RECORD_OVERHEAD`]), injected storage failures of fetches.
//! - `cold`: the cold tier ([`SimBroker::tier_to_cold`]): fetches from a cold segment end at
//!   its end and are cached per (partition, `fetch_offset`); [`ColdReads`] counts misses and
//!   hits, and a miss owes [`SimBroker::cold_read_latency`] ([`SimBroker::take_answer_delay`]).
//! - `group`: the group coordinator: [`GroupState`], JoinGroup, heartbeats, commits and their
//!   injected failures, FetchOffset, LeaveGroup, the session reaper and the group queries.
//! - `request_log`: what the broker handled and accepted, for invariant checks
//!   ([`RequestLogEntry`], [`CommitRecord`]).

mod cold;
mod group;
mod request_log;
mod storage;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rustmq_consumer_core::codec::request_frame_len;
use rustmq_consumer_core::protocol::{
    error_code, BrokerInfo, FindCoordinatorResponse, MetadataResponse, Record, Request, Response,
    TopicPartition, CUT_IN_TRANSIT, MAX_REQUEST_FRAME,
};
use rustmq_consumer_core::TransportError;
use tracing::debug;

pub use cold::ColdReads;
use cold::ColdTier;
use group::Group;
pub use group::GroupState;
pub use request_log::{CommitRecord, Outcome, RequestLogEntry};
pub use storage::DEFAULT_RECORD_OVERHEAD;

/// Request bytes one QUIC packet always carries: the smallest datagram QUIC allows (1,200
/// bytes) less a short header with a 20-byte connection id and a 4-byte packet number (25),
/// the AEAD tag (16) and a STREAM frame header (11). See [`SimBroker::set_split_reads`].
pub const PACKET_PAYLOAD: usize = 1_148;

/// Bytes of a STREAM frame's header: each stream's piece of a packet has one.
const STREAM_FRAME_HEADER: usize = 11;

/// What one packet carries of STREAM frames, headers included.
const PACKET_ROOM: usize = PACKET_PAYLOAD + STREAM_FRAME_HEADER;

/// Packs a request frame of `size` bytes into packets behind `fill` bytes of the frames sent
/// with it, as QUIC packs several streams' frames into one packet: whether the frame
/// straddles two packets (its first packet does not hold it all), and the fill of its last
/// packet.
fn pack(fill: usize, size: usize) -> (bool, usize) {
    // A packet with no room for a header and a byte is sent as it is.
    let fill = if fill + STREAM_FRAME_HEADER < PACKET_ROOM {
        fill
    } else {
        0
    };
    let first = PACKET_ROOM - fill - STREAM_FRAME_HEADER;
    if size <= first {
        return (false, fill + STREAM_FRAME_HEADER + size);
    }
    // The rest goes in the next packets, a header each; the last holds 1 to PACKET_PAYLOAD.
    let rest = (size - first - 1) % PACKET_PAYLOAD + 1;
    (true, STREAM_FRAME_HEADER + rest)
}

/// How often the session reaper runs (the real broker's reaper interval).
pub const REAPER_INTERVAL: Duration = Duration::from_secs(1);

/// The broker clock's reading, in milliseconds since the Unix epoch, at the first instant the
/// broker sees. Produced records are stamped with this plus the simulated time elapsed since.
pub const CLOCK_BASE_MS: i64 = 1_700_000_000_000;

/// A request the broker refused with its error frame (`0xFF`, then `Error: <message>`).
/// The string is the text after `Error: `, e.g. `Partition not found: t:0`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// A deterministic, single-node RustMQ broker.
///
/// Feed it requests with [`handle`](Self::handle) and drive its session reaper with
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout). Between
/// inputs, inspect it with the query methods; [`commit_log`](Self::commit_log) and
/// [`request_log`](Self::request_log) record what it accepted, for invariant checks.
///
/// Modelled on the real broker (PROTOCOL.md):
/// - storage: one append-only log per partition; offsets start at 0 and are contiguous;
/// - fetch: `max_bytes` is counted in the real broker's units, not wire bytes: each record
///   costs [`fetch_cost`](Self::fetch_cost) (a fixed overhead, [`DEFAULT_RECORD_OVERHEAD`]
///   unless [`with_record_overhead`](Self::with_record_overhead) sets it, plus value, key and
///   header key and value bytes); records are taken while the running total stays within
///   `max_bytes`, and the first record is always taken;
/// - cold tier: none unless [`tier_to_cold`](Self::tier_to_cold) moves a partition's records
///   there; a Fetch from a cold offset ends at its segment's end and its answer is cached per
///   (partition, `fetch_offset`); [`cold_reads`](Self::cold_reads) counts segment downloads
///   (misses) and cached answers (hits), and each miss owes
///   [`cold_read_latency`](Self::cold_read_latency) (none unless set), which the transport
///   pays ([`take_answer_delay`](Self::take_answer_delay));
/// - coordinator: a group exists only once a JoinGroup created it (CommitOffset, FetchOffset,
///   ConsumerHeartbeat and LeaveGroup answer 16 before that) and is never deleted; groups are
///   Empty, Stable or PreparingRebalance; every JoinGroup recomputes a round-robin assignment
///   and makes the group Stable; a leave or an eviction bumps the generation while members
///   remain; the last member leaving makes the group Empty and keeps its generation and its
///   commits; CommitOffset checks the generation, never membership;
/// - [`restart`](Self::restart) keeps topics and records (each in its tier) and loses every
///   group and commit, and the cold answer cache.
#[derive(Debug, Clone)]
pub struct SimBroker {
    broker: BrokerInfo,
    topics: BTreeMap<String, Vec<Vec<Record>>>,
    partition_counts: BTreeMap<String, u32>,
    groups: BTreeMap<String, Group>,
    rng: u64,
    epoch: Option<Instant>,
    last_now: Option<Instant>,
    next_reap: Option<Instant>,
    failing_commits: u32,
    failing_fetches: u32,
    failing_partitions: BTreeSet<TopicPartition>,
    record_overhead: u32,
    split_reads: bool,
    /// While split reads are on: the instant of the last frame sent, and how full it left
    /// its last packet (the frames sent at one instant share packets).
    packing: Option<(Instant, usize)>,
    cold: ColdTier,
    commit_log: Vec<CommitRecord>,
    request_log: Vec<RequestLogEntry>,
}

impl Default for SimBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl SimBroker {
    /// A broker with no topics and no groups; member ids from seed 0.
    pub fn new() -> Self {
        Self::with_seed(0)
    }

    /// A broker whose generated member ids derive from `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            broker: BrokerInfo {
                id: "broker-1".to_owned(),
                host: "127.0.0.1".to_owned(),
                port_quic: 9092,
                port_rpc: 9093,
                rack_id: "default".to_owned(),
            },
            topics: BTreeMap::new(),
            partition_counts: BTreeMap::new(),
            groups: BTreeMap::new(),
            rng: seed,
            epoch: None,
            last_now: None,
            next_reap: None,
            failing_commits: 0,
            failing_fetches: 0,
            failing_partitions: BTreeSet::new(),
            record_overhead: DEFAULT_RECORD_OVERHEAD,
            split_reads: false,
            packing: None,
            cold: ColdTier::default(),
            commit_log: Vec::new(),
            request_log: Vec::new(),
        }
    }

    /// The broker Metadata and FindCoordinator describe.
    pub fn broker_info(&self) -> &BrokerInfo {
        &self.broker
    }

    /// Replaces the broker Metadata and FindCoordinator describe (e.g. a loopback address).
    pub fn set_broker_info(&mut self, info: BrokerInfo) {
        self.broker = info;
    }

    /// What a transport to this broker gets for `request`: [`send`](Self::send), then
    /// [`serve`](Self::serve). The simulated transports that answer at once send through
    /// here.
    pub fn transmit(&mut self, now: Instant, request: Request) -> Result<Response, TransportError> {
        self.send(now, &request)?;
        self.serve(now, request)
    }

    /// The sending half of [`transmit`](Self::transmit), at the instant the request leaves:
    /// refused before it is sent when its frame is over the [`MAX_REQUEST_FRAME`] bytes the
    /// real broker reads of a request ([`TransportError::RequestTooLarge`], as the QUIC
    /// transport refuses it; the real broker would truncate it); cut while
    /// [`set_split_reads`](Self::set_split_reads) is on and its frame does not fit the packet
    /// it starts in (the real broker's error frame, as [`TransportError::Broker`]). `Ok`: it
    /// arrives whole, for [`serve`](Self::serve). A simulation with a latency calls the two
    /// halves apart, so that the requests sent together share packets.
    pub fn send(&mut self, now: Instant, request: &Request) -> Result<(), TransportError> {
        let size = request_frame_len(request);
        if size > MAX_REQUEST_FRAME {
            debug!(kind = ?request.kind(), size, "request frame too large: not sent");
            return Err(TransportError::RequestTooLarge(size));
        }
        if self.split_reads {
            let fill = match self.packing {
                Some((at, fill)) if at == now => fill,
                _ => 0,
            };
            let (straddles, fill) = pack(fill, size);
            self.packing = Some((now, fill));
            if straddles {
                debug!(kind = ?request.kind(), size, "request frame over two packets: read in part");
                return Err(TransportError::Broker(CUT_IN_TRANSIT.to_owned()));
            }
        }
        Ok(())
    }

    /// The receiving half of [`transmit`](Self::transmit), for a request that
    /// [`send`](Self::send) let through: [`handle`](Self::handle)'s answer, its error frame
    /// as [`TransportError::Broker`].
    pub fn serve(&mut self, now: Instant, request: Request) -> Result<Response, TransportError> {
        self.handle(now, request)
            .map_err(|error| TransportError::Broker(error.0))
    }

    /// While `on`, [`send`](Self::send) reads a request as the real broker does when
    /// its packets arrive apart, as over a network: its one read gets the first packet only,
    /// so a frame that does not fit the packet it starts in fails to decode, with the real
    /// broker's error frame (PROTOCOL.md; measured through a relay spacing packets 300 µs
    /// apart). A frame over [`PACKET_PAYLOAD`] bytes never fits; and the frames sent at one
    /// instant share packets, as QUIC packs several streams' frames into one, so a smaller
    /// frame sent with others can straddle two (the real broker cut 17 to 33 one-packet
    /// requests while 1,000 partitions started). Off by default, as on loopback, where a
    /// request's packets arrive together.
    pub fn set_split_reads(&mut self, on: bool) {
        self.split_reads = on;
        self.packing = None;
    }

    /// Handles one request like the real broker: a typed response, or the error frame's text.
    pub fn handle(&mut self, now: Instant, request: Request) -> Result<Response, BrokerError> {
        self.observe(now);
        self.cold.new_answer();
        let mut entry = RequestLogEntry {
            at: now,
            kind: request.kind(),
            group: None,
            member: None,
            generation: None,
            partition: None,
            outcome: Outcome::Response { error_code: None },
        };
        let result = match request {
            Request::Produce(req) => {
                entry.partition = Some(TopicPartition::new(req.topic.clone(), req.partition_id));
                self.handle_produce(req).map(Response::from)
            }
            Request::Fetch(req) => {
                entry.partition = Some(TopicPartition::new(req.topic.clone(), req.partition_id));
                Ok(self.handle_fetch(req).into())
            }
            Request::Metadata(_) => Ok(MetadataResponse {
                brokers: vec![self.broker.clone()],
                topics_metadata: Vec::new(),
            }
            .into()),
            Request::FindCoordinator(req) => {
                entry.group = Some(req.group_id);
                Ok(FindCoordinatorResponse {
                    coordinator_broker_id: self.broker.id.clone(),
                    coordinator_host: self.broker.host.clone(),
                    coordinator_port: self.broker.port_quic,
                    error_code: error_code::NONE,
                }
                .into())
            }
            Request::JoinGroup(req) => {
                entry.group = Some(req.group_id.clone());
                let resp = self.handle_join(now, req);
                entry.member = Some(resp.member_id.clone());
                entry.generation = Some(resp.generation_id);
                Ok(resp.into())
            }
            Request::ConsumerHeartbeat(req) => {
                entry.group = Some(req.group_id.clone());
                entry.member = Some(req.member_id.clone());
                entry.generation = Some(req.generation_id);
                Ok(self.handle_heartbeat(now, &req).into())
            }
            Request::CommitOffset(req) => {
                entry.group = Some(req.group_id.clone());
                entry.member = Some(req.member_id.clone());
                entry.generation = Some(req.generation_id);
                Ok(self.handle_commit(now, req).into())
            }
            Request::FetchOffset(req) => {
                entry.group = Some(req.group_id.clone());
                Ok(self.handle_fetch_offset(req).into())
            }
            Request::LeaveGroup(req) => {
                entry.group = Some(req.group_id.clone());
                entry.member = Some(req.member_id.clone());
                Ok(self.handle_leave(&req).into())
            }
            other => Err(BrokerError(format!(
                "Unsupported request type: {:?}",
                other.kind()
            ))),
        };
        entry.outcome = match &result {
            Ok(resp) => Outcome::Response {
                error_code: response_error_code(resp),
            },
            Err(err) => Outcome::ErrorFrame {
                message: err.0.clone(),
            },
        };
        self.request_log.push(entry);
        self.reschedule(now);
        result
    }

    /// Crash and restart: topics and records survive; every group, member and committed offset
    /// is lost (observed on the real broker). The logs and fault settings are kept: they belong
    /// to the test, not to the broker.
    ///
    /// Cold tier: records stay in the tier they were in and the cold answer cache is lost (it
    /// lives in the broker's memory; this loss is assumed, not measured); the
    /// [`cold_reads`](Self::cold_reads) counts are kept. The real broker also moves its hot
    /// records to the cold tier on a restart: this restart does not, so that a restart changes
    /// no fetch answer of a test that never asked for a cold tier; call
    /// [`tier_to_cold`](Self::tier_to_cold) after it to reproduce that.
    pub fn restart(&mut self) {
        self.groups.clear();
        self.next_reap = None;
        self.cold.restart();
        debug!("broker restarted");
    }

    /// Records the latest instant seen; the first one fixes the clock base and reaper phase.
    fn observe(&mut self, now: Instant) {
        if self.epoch.is_none() {
            self.epoch = Some(now);
        }
        self.last_now = Some(self.last_now.map_or(now, |last| last.max(now)));
    }

    fn clock_ms(&self) -> i64 {
        let elapsed = match (self.epoch, self.last_now) {
            (Some(epoch), Some(last)) => last.saturating_duration_since(epoch),
            _ => Duration::ZERO,
        };
        CLOCK_BASE_MS.saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }
}

fn response_error_code(response: &Response) -> Option<u32> {
    match response {
        Response::Produce(r) => Some(r.error_code),
        Response::Fetch(r) => Some(r.error_code),
        Response::FindCoordinator(r) => Some(r.error_code),
        Response::JoinGroup(r) => Some(r.error_code),
        Response::ConsumerHeartbeat(r) => Some(r.error_code),
        Response::CommitOffset(r) => Some(r.error_code),
        Response::FetchOffset(r) => Some(r.error_code),
        Response::LeaveGroup(r) => Some(r.error_code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_sent_together_share_packets_and_straddle_them() {
        // Alone, a frame of one packet's payload fits; one byte more straddles.
        assert_eq!(pack(0, PACKET_PAYLOAD), (false, PACKET_ROOM));
        assert!(pack(0, PACKET_PAYLOAD + 1).0);
        // Behind a full packet, the next frame starts a packet of its own.
        assert_eq!(pack(PACKET_ROOM, 100), (false, STREAM_FRAME_HEADER + 100));
        // Two 600-byte frames: the second does not fit behind the first.
        let (cut, fill) = pack(0, 600);
        assert_eq!((cut, fill), (false, 611));
        let (cut, fill) = pack(fill, 600);
        assert!(cut);
        // Its first piece took 1,159 - 611 - 11 = 537 bytes: 63 go on, behind a header.
        assert_eq!(fill, STREAM_FRAME_HEADER + 63);
        // A frame over several packets ends in its last one.
        let (cut, fill) = pack(0, 3 * PACKET_PAYLOAD + 7);
        assert!(cut);
        assert_eq!(fill, STREAM_FRAME_HEADER + 7);
    }
}
