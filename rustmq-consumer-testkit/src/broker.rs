//! A sans-IO model of the RustMQ broker: partition storage, the group coordinator and its
//! session reaper, with exactly the semantics of `PROTOCOL.md`.
//!
//! Nothing here reads a clock, sleeps or touches a socket: time enters as `now` on
//! [`SimBroker::handle`] and [`SimBroker::handle_timeout`], member ids come from a seeded PRNG,
//! and every map is a `BTreeMap`, so the same inputs always give the same outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustmq_consumer_core::protocol::{
    error_code, BrokerInfo, CommitOffsetRequest, CommitOffsetResponse, ConsumerHeartbeatRequest,
    ConsumerHeartbeatResponse, FetchOffsetRequest, FetchOffsetResponse, FetchRequest,
    FetchResponse, FindCoordinatorResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, MetadataResponse, ProduceRequest, ProduceResponse, Record, Request,
    RequestKind, Response, TopicPartition,
};
use tracing::{debug, trace, warn};

/// How often the session reaper runs (the real broker's reaper interval).
pub const REAPER_INTERVAL: Duration = Duration::from_secs(1);

/// What the simulated broker charges a record for its fixed footprint when it fills a Fetch's
/// `max_bytes`, unless [`SimBroker::with_record_overhead`] says otherwise: the real broker
/// counts each record as the size of its in-memory log-record struct (about 350 bytes on
/// 64-bit) plus its payload, see [`SimBroker::fetch_cost`].
pub const DEFAULT_RECORD_OVERHEAD: u32 = 350;

/// The broker clock's reading, in milliseconds since the Unix epoch, at the first instant the
/// broker sees. Produced records are stamped with this plus the simulated time elapsed since.
pub const CLOCK_BASE_MS: i64 = 1_700_000_000_000;

/// A request the broker refused with its error frame (`0xFF`, then `Error: <message>`).
/// The string is the text after `Error: `, e.g. `Partition not found: t:0`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// The coordinator's state of one consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupState {
    /// No members (a new group, or every member left or was evicted).
    Empty,
    /// Every member has the current generation's assignment.
    Stable,
    /// A member left or was evicted: the generation moved on, the assignment is cleared and
    /// heartbeats answer 27 until someone joins.
    PreparingRebalance,
}

/// How the broker answered one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A typed response; `error_code` is `None` for responses that carry none (Metadata).
    Response {
        /// The response's error code, if its type has one.
        error_code: Option<u32>,
    },
    /// The error frame.
    ErrorFrame {
        /// The text after `Error: `.
        message: String,
    },
}

/// One request the broker handled, as [`SimBroker::request_log`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLogEntry {
    /// When it was handled.
    pub at: Instant,
    /// Its type.
    pub kind: RequestKind,
    /// The group it names, if any.
    pub group: Option<String>,
    /// The member it names; for JoinGroup the id the member ends up with.
    pub member: Option<String>,
    /// The generation it carries; for JoinGroup the generation it was given.
    pub generation: Option<u64>,
    /// The partition of a Produce or Fetch.
    pub partition: Option<TopicPartition>,
    /// How the broker answered.
    pub outcome: Outcome,
}

/// One CommitOffset the broker accepted (error code 0), as [`SimBroker::commit_log`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    /// Index of the CommitOffset request in [`SimBroker::request_log`], to order commits
    /// against other requests handled at the same instant.
    pub seq: usize,
    /// When it was accepted.
    pub at: Instant,
    /// Group.
    pub group: String,
    /// The member id the request carried (the broker does not check membership).
    pub member: String,
    /// The generation the request carried (equal to the group's at that moment).
    pub generation: u64,
    /// The offsets stored, verbatim.
    pub offsets: BTreeMap<TopicPartition, u64>,
    /// The partitions the group's current assignment gave that member when the commit was
    /// accepted, or `None` when the id was not a member of the group.
    pub member_assignment: Option<Vec<TopicPartition>>,
}

#[derive(Debug, Clone)]
struct Member {
    topics: Vec<String>,
    session_timeout: Duration,
    last_heartbeat: Instant,
}

#[derive(Debug, Clone)]
struct Group {
    state: GroupState,
    generation: u64,
    members: BTreeMap<String, Member>,
    assignment: BTreeMap<String, Vec<TopicPartition>>,
    committed: BTreeMap<TopicPartition, u64>,
}

impl Group {
    fn new() -> Self {
        Self {
            state: GroupState::Empty,
            generation: 0,
            members: BTreeMap::new(),
            assignment: BTreeMap::new(),
            committed: BTreeMap::new(),
        }
    }

    /// After a member left or was evicted: rebalance if anyone remains, else become Empty.
    fn after_departure(&mut self) {
        self.assignment.clear();
        if self.members.is_empty() {
            self.state = GroupState::Empty;
        } else {
            self.state = GroupState::PreparingRebalance;
            self.generation += 1;
        }
    }
}

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
/// - coordinator: a group exists only once a JoinGroup created it (CommitOffset, FetchOffset,
///   ConsumerHeartbeat and LeaveGroup answer 16 before that) and is never deleted; groups are
///   Empty, Stable or PreparingRebalance; every JoinGroup recomputes a round-robin assignment
///   and makes the group Stable; a leave or an eviction bumps the generation while members
///   remain; the last member leaving makes the group Empty and keeps its generation and its
///   commits; CommitOffset checks the generation, never membership;
/// - [`restart`](Self::restart) keeps topics and records and loses every group and commit.
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
            commit_log: Vec::new(),
            request_log: Vec::new(),
        }
    }

    /// The same broker charging `overhead` bytes per record, instead of
    /// [`DEFAULT_RECORD_OVERHEAD`], when it fills a Fetch's `max_bytes`
    /// (see [`fetch_cost`](Self::fetch_cost)). 0 counts payload bytes only.
    #[must_use]
    pub fn with_record_overhead(mut self, overhead: u32) -> Self {
        self.record_overhead = overhead;
        self
    }

    /// The fixed per-record overhead a Fetch's `max_bytes` is charged.
    pub fn record_overhead(&self) -> u32 {
        self.record_overhead
    }

    /// What `record` counts against a Fetch's `max_bytes`, in the real broker's units: the
    /// per-record overhead plus the value, the key and every header's key and value bytes
    /// (length prefixes, the timestamp and the option tag are not counted).
    pub fn fetch_cost(&self, record: &Record) -> usize {
        let key = record.key.as_ref().map_or(0, Bytes::len);
        let headers: usize = record
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum();
        usize::try_from(self.record_overhead)
            .unwrap_or(usize::MAX)
            .saturating_add(record.value.len())
            .saturating_add(key)
            .saturating_add(headers)
    }

    /// The broker Metadata and FindCoordinator describe.
    pub fn broker_info(&self) -> &BrokerInfo {
        &self.broker
    }

    /// Replaces the broker Metadata and FindCoordinator describe (e.g. a loopback address).
    pub fn set_broker_info(&mut self, info: BrokerInfo) {
        self.broker = info;
    }

    /// Creates `topic` with `partitions` partitions (an existing topic only grows) and sets the
    /// coordinator's partition count for it to `partitions`.
    pub fn create_topic(&mut self, topic: &str, partitions: u32) {
        let logs = self.topics.entry(topic.to_owned()).or_default();
        let wanted = usize::try_from(partitions).unwrap_or(usize::MAX);
        if logs.len() < wanted {
            logs.resize_with(wanted, Vec::new);
        }
        self.partition_counts.insert(topic.to_owned(), partitions);
        debug!(topic, partitions, "topic created");
    }

    /// Sets (`Some`) or removes (`None`) the coordinator's partition count for `topic` without
    /// touching storage. The real broker's table is usually empty, so every topic counts as one
    /// partition in assignments; `None` models that.
    pub fn set_coordinator_partition_count(&mut self, topic: &str, partitions: Option<u32>) {
        match partitions {
            Some(count) => {
                self.partition_counts.insert(topic.to_owned(), count);
            }
            None => {
                self.partition_counts.remove(topic);
            }
        }
    }

    /// Appends records (the same path as a Produce request, but not logged as a request) and
    /// returns the offset of the first. An unknown topic or partition is an error.
    pub fn produce(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, BrokerError> {
        let timestamp = self.clock_ms();
        let log = self
            .topics
            .get_mut(topic)
            .and_then(|logs| logs.get_mut(usize::try_from(partition).ok()?))
            .ok_or_else(|| BrokerError(format!("Partition not found: {topic}:{partition}")))?;
        let first = log.len() as u64;
        let count = records.len();
        log.extend(records.into_iter().map(|mut record| {
            record.timestamp = timestamp;
            record
        }));
        trace!(topic, partition, first, count, "records appended");
        Ok(first)
    }

    /// Appends one record per value (no key, no headers); returns the offset of the first.
    pub fn produce_values(
        &mut self,
        topic: &str,
        partition: u32,
        values: impl IntoIterator<Item = impl Into<Bytes>>,
    ) -> Result<u64, BrokerError> {
        let records = values.into_iter().map(Record::from_value).collect();
        self.produce(topic, partition, records)
    }

    /// The next `n` CommitOffset requests that pass the group and generation checks fail with
    /// error code 1 (storage failure) and store nothing.
    pub fn fail_next_commits(&mut self, n: u32) {
        self.failing_commits = n;
    }

    /// The next `n` Fetch requests fail like a failed read on the real broker: error code 1
    /// (storage failure), no records and a high watermark of 0.
    pub fn fail_next_fetches(&mut self, n: u32) {
        self.failing_fetches = n;
    }

    /// While `failing`, every Fetch of `topic`:`partition` fails like the real broker's reads
    /// after compaction merged that partition's segments: error code 1, "Failed to fetch
    /// records", no records and a high watermark of 0. Other partitions and commits work.
    pub fn set_partition_failing(&mut self, topic: &str, partition: u32, failing: bool) {
        let tp = TopicPartition::new(topic, partition);
        if failing {
            self.failing_partitions.insert(tp);
        } else {
            self.failing_partitions.remove(&tp);
        }
    }

    /// Handles one request like the real broker: a typed response, or the error frame's text.
    pub fn handle(&mut self, now: Instant, request: Request) -> Result<Response, BrokerError> {
        self.observe(now);
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

    /// Runs the session reaper if a check is due (`now >= poll_timeout()`), otherwise does
    /// nothing. The reaper evicts every member silent for longer than its session timeout; a
    /// group with members left then rebalances (generation + 1, assignment cleared), a group
    /// with none becomes Empty.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.observe(now);
        let Some(due) = self.next_reap else {
            return;
        };
        if now < due {
            return;
        }
        for (group_id, group) in &mut self.groups {
            if group.state == GroupState::Empty {
                continue;
            }
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    now.saturating_duration_since(m.last_heartbeat) > m.session_timeout
                })
                .map(|(id, _)| id.clone())
                .collect();
            if expired.is_empty() {
                continue;
            }
            for member in &expired {
                group.members.remove(member);
                warn!(group = %group_id, member = %member, "evicting silent member");
            }
            group.after_departure();
            debug!(
                group = %group_id,
                generation = group.generation,
                state = ?group.state,
                "group changed after eviction"
            );
        }
        self.next_reap = None;
        self.reschedule(now);
    }

    /// When the next reaper check is due: a whole number of [`REAPER_INTERVAL`]s after the first
    /// instant the broker saw, while any group has members; `None` otherwise.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_reap
    }

    /// Crash and restart: topics and records survive; every group, member and committed offset
    /// is lost (observed on the real broker). The logs and fault settings are kept: they belong
    /// to the test, not to the broker.
    pub fn restart(&mut self) {
        self.groups.clear();
        self.next_reap = None;
        debug!("broker restarted");
    }

    /// The records of a partition in offset order; empty if unknown.
    pub fn records(&self, topic: &str, partition: u32) -> &[Record] {
        self.log(topic, partition).unwrap_or(&[])
    }

    /// The next offset to be written to a partition, or `None` if unknown.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.log(topic, partition).map(|log| log.len() as u64)
    }

    /// How many partitions `topic` has in storage, or `None` if unknown.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.topics
            .get(topic)
            .map(|logs| u32::try_from(logs.len()).unwrap_or(u32::MAX))
    }

    /// The offset `group` committed for `tp`, if any.
    pub fn committed(&self, group: &str, tp: &TopicPartition) -> Option<u64> {
        self.groups.get(group)?.committed.get(tp).copied()
    }

    /// The group's generation, or `None` if the group does not exist.
    pub fn generation(&self, group: &str) -> Option<u64> {
        self.groups.get(group).map(|g| g.generation)
    }

    /// The group's state, or `None` if the group does not exist.
    pub fn group_state(&self, group: &str) -> Option<GroupState> {
        self.groups.get(group).map(|g| g.state)
    }

    /// The group's member ids, sorted; empty if the group does not exist.
    pub fn members(&self, group: &str) -> Vec<String> {
        self.groups
            .get(group)
            .map(|g| g.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The group's current assignment (members given nothing are absent, as on the wire);
    /// empty if the group does not exist or is rebalancing.
    pub fn assignment(&self, group: &str) -> BTreeMap<String, Vec<TopicPartition>> {
        self.groups
            .get(group)
            .map(|g| g.assignment.clone())
            .unwrap_or_default()
    }

    /// Every CommitOffset the broker accepted, in order.
    pub fn commit_log(&self) -> &[CommitRecord] {
        &self.commit_log
    }

    /// Every request handled, in order.
    pub fn request_log(&self) -> &[RequestLogEntry] {
        &self.request_log
    }

    fn log(&self, topic: &str, partition: u32) -> Option<&[Record]> {
        self.topics
            .get(topic)?
            .get(usize::try_from(partition).ok()?)
            .map(Vec::as_slice)
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

    /// Schedules the next reaper check if any group has members and none is scheduled;
    /// clears it when no group has members.
    fn reschedule(&mut self, now: Instant) {
        let busy = self.groups.values().any(|g| !g.members.is_empty());
        if !busy {
            self.next_reap = None;
        } else if self.next_reap.is_none() {
            let epoch = self.epoch.unwrap_or(now);
            let ticks =
                now.saturating_duration_since(epoch).as_nanos() / REAPER_INTERVAL.as_nanos();
            let offset = u64::try_from(ticks + 1)
                .ok()
                .and_then(|t| REAPER_INTERVAL.checked_mul(u32::try_from(t).ok()?))
                .unwrap_or(REAPER_INTERVAL);
            self.next_reap = Some(epoch.checked_add(offset).unwrap_or(now + REAPER_INTERVAL));
        }
    }

    /// splitmix64.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A fresh UUID-shaped member id, unique among current members of every group.
    fn next_member_id(&mut self) -> String {
        loop {
            let a = self.next_random();
            let b = self.next_random();
            let id = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xfff,
                ((b >> 48) & 0x3fff) | 0x8000,
                b & 0xffff_ffff_ffff
            );
            if !self.groups.values().any(|g| g.members.contains_key(&id)) {
                return id;
            }
        }
    }

    fn handle_produce(&mut self, req: ProduceRequest) -> Result<ProduceResponse, BrokerError> {
        let offset = self.produce(&req.topic, req.partition_id, req.records)?;
        Ok(ProduceResponse {
            offset,
            error_code: error_code::NONE,
            error_message: None,
        })
    }

    fn handle_fetch(&mut self, req: FetchRequest) -> FetchResponse {
        let failing_partition = self
            .failing_partitions
            .contains(&TopicPartition::new(req.topic.clone(), req.partition_id));
        if failing_partition || self.failing_fetches > 0 {
            if !failing_partition {
                self.failing_fetches -= 1;
            }
            debug!(topic = %req.topic, partition = req.partition_id, "injected fetch failure");
            // As the real broker answers a failed read: no watermark either.
            return FetchResponse {
                records: Vec::new(),
                high_watermark: 0,
                error_code: error_code::STORAGE,
                error_message: Some("Failed to fetch records".to_owned()),
            };
        }
        let log = self.log(&req.topic, req.partition_id);
        let high_watermark = log.map_or(0, |log| log.len() as u64);
        let mut records = Vec::new();
        let start = usize::try_from(req.fetch_offset).ok();
        if let (Some(log), Some(start)) = (log, start) {
            let budget = usize::try_from(req.max_bytes).unwrap_or(usize::MAX);
            let mut used = 0usize;
            for record in log.iter().skip(start) {
                let cost = self.fetch_cost(record);
                if !records.is_empty() && used.saturating_add(cost) > budget {
                    break;
                }
                used = used.saturating_add(cost);
                records.push(record.clone());
            }
        }
        trace!(
            topic = %req.topic,
            partition = req.partition_id,
            offset = req.fetch_offset,
            count = records.len(),
            high_watermark,
            "fetch"
        );
        FetchResponse {
            records,
            high_watermark,
            error_code: error_code::NONE,
            error_message: None,
        }
    }

    fn handle_join(&mut self, now: Instant, req: JoinGroupRequest) -> JoinGroupResponse {
        let member_id = if req.member_id.is_empty() {
            self.next_member_id()
        } else {
            req.member_id
        };
        let group = self
            .groups
            .entry(req.group_id.clone())
            .or_insert_with(Group::new);
        if matches!(group.state, GroupState::Empty | GroupState::Stable) {
            group.generation += 1;
        }
        group.members.insert(
            member_id.clone(),
            Member {
                topics: req.topics,
                session_timeout: Duration::from_millis(u64::from(req.session_timeout_ms)),
                last_heartbeat: now,
            },
        );

        let topics: BTreeSet<&String> = group.members.values().flat_map(|m| &m.topics).collect();
        let partitions: Vec<TopicPartition> = topics
            .into_iter()
            .flat_map(|topic| {
                let count = self.partition_counts.get(topic).copied().unwrap_or(1);
                (0..count).map(move |p| TopicPartition::new(topic.clone(), p))
            })
            .collect();
        let ids: Vec<&String> = group.members.keys().collect();
        let mut assignment: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
        for (i, tp) in partitions.into_iter().enumerate() {
            assignment
                .entry(ids[i % ids.len()].clone())
                .or_default()
                .push(tp);
        }
        let leader_id = ids.first().map(|id| (*id).clone()).unwrap_or_default();

        group.assignment = assignment.clone();
        group.state = GroupState::Stable;
        debug!(
            group = %req.group_id,
            member = %member_id,
            generation = group.generation,
            members = group.members.len(),
            "member joined"
        );
        JoinGroupResponse {
            generation_id: group.generation,
            member_id,
            leader_id,
            assigned_partitions: assignment,
            error_code: error_code::NONE,
        }
    }

    fn handle_heartbeat(
        &mut self,
        now: Instant,
        req: &ConsumerHeartbeatRequest,
    ) -> ConsumerHeartbeatResponse {
        let code = match self.groups.get_mut(&req.group_id) {
            None => error_code::UNKNOWN_GROUP,
            Some(g) if g.state == GroupState::PreparingRebalance => {
                error_code::REBALANCE_IN_PROGRESS
            }
            Some(g) if g.generation != req.generation_id => error_code::ILLEGAL_GENERATION,
            Some(g) => match g.members.get_mut(&req.member_id) {
                Some(member) => {
                    member.last_heartbeat = now;
                    error_code::NONE
                }
                None => error_code::UNKNOWN_MEMBER,
            },
        };
        trace!(group = %req.group_id, member = %req.member_id, code, "heartbeat");
        ConsumerHeartbeatResponse { error_code: code }
    }

    fn handle_commit(&mut self, now: Instant, req: CommitOffsetRequest) -> CommitOffsetResponse {
        let Some(group) = self.groups.get_mut(&req.group_id) else {
            return CommitOffsetResponse {
                error_code: error_code::UNKNOWN_GROUP,
            };
        };
        if group.generation != req.generation_id {
            return CommitOffsetResponse {
                error_code: error_code::ILLEGAL_GENERATION,
            };
        }
        if self.failing_commits > 0 {
            self.failing_commits -= 1;
            debug!(group = %req.group_id, member = %req.member_id, "injected commit failure");
            return CommitOffsetResponse {
                error_code: error_code::STORAGE,
            };
        }
        let member_assignment = group.members.contains_key(&req.member_id).then(|| {
            group
                .assignment
                .get(&req.member_id)
                .cloned()
                .unwrap_or_default()
        });
        group
            .committed
            .extend(req.offsets.iter().map(|(tp, off)| (tp.clone(), *off)));
        debug!(
            group = %req.group_id,
            member = %req.member_id,
            generation = req.generation_id,
            partitions = req.offsets.len(),
            "offsets committed"
        );
        self.commit_log.push(CommitRecord {
            seq: self.request_log.len(),
            at: now,
            group: req.group_id,
            member: req.member_id,
            generation: req.generation_id,
            offsets: req.offsets,
            member_assignment,
        });
        CommitOffsetResponse {
            error_code: error_code::NONE,
        }
    }

    fn handle_fetch_offset(&self, req: FetchOffsetRequest) -> FetchOffsetResponse {
        match self.groups.get(&req.group_id) {
            None => FetchOffsetResponse {
                offsets: BTreeMap::new(),
                error_code: error_code::UNKNOWN_GROUP,
            },
            Some(group) => FetchOffsetResponse {
                offsets: req
                    .topic_partitions
                    .into_iter()
                    .filter_map(|tp| {
                        let offset = group.committed.get(&tp).copied()?;
                        Some((tp, offset))
                    })
                    .collect(),
                error_code: error_code::NONE,
            },
        }
    }

    fn handle_leave(&mut self, req: &LeaveGroupRequest) -> LeaveGroupResponse {
        let Some(group) = self.groups.get_mut(&req.group_id) else {
            return LeaveGroupResponse {
                error_code: error_code::UNKNOWN_GROUP,
            };
        };
        group.members.remove(&req.member_id);
        group.after_departure();
        debug!(
            group = %req.group_id,
            member = %req.member_id,
            generation = group.generation,
            state = ?group.state,
            "member left"
        );
        LeaveGroupResponse {
            error_code: error_code::NONE,
        }
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
