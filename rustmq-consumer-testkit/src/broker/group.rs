//! The group coordinator: [`GroupState`], the groups and their members, JoinGroup with its
//! round-robin assignment, heartbeats, CommitOffset (with its injected storage failures),
//! FetchOffset and LeaveGroup, the session reaper that evicts silent members, the seeded member
//! ids, and the queries on groups.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rustmq_consumer_core::protocol::{
    error_code, CommitOffsetRequest, CommitOffsetResponse, ConsumerHeartbeatRequest,
    ConsumerHeartbeatResponse, FetchOffsetRequest, FetchOffsetResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, TopicPartition,
};
use tracing::{debug, trace, warn};

use super::{CommitRecord, SimBroker, REAPER_INTERVAL};

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

#[derive(Debug, Clone)]
struct Member {
    topics: Vec<String>,
    session_timeout: Duration,
    last_heartbeat: Instant,
}

#[derive(Debug, Clone)]
pub(super) struct Group {
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

impl SimBroker {
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

    /// The next `n` CommitOffset requests that pass the group and generation checks fail with
    /// error code 1 (storage failure) and store nothing.
    pub fn fail_next_commits(&mut self, n: u32) {
        self.failing_commits = n;
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

    /// Schedules the next reaper check if any group has members and none is scheduled;
    /// clears it when no group has members.
    pub(super) fn reschedule(&mut self, now: Instant) {
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

    pub(super) fn handle_join(&mut self, now: Instant, req: JoinGroupRequest) -> JoinGroupResponse {
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

    pub(super) fn handle_heartbeat(
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

    pub(super) fn handle_commit(
        &mut self,
        now: Instant,
        req: CommitOffsetRequest,
    ) -> CommitOffsetResponse {
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

    pub(super) fn handle_fetch_offset(&self, req: FetchOffsetRequest) -> FetchOffsetResponse {
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

    pub(super) fn handle_leave(&mut self, req: &LeaveGroupRequest) -> LeaveGroupResponse {
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
