//! Invariants of a consumer, checked from what is observable: the machine's queries, its
//! events and transmits, and what the broker accepted.
//!
//! The [`Checker`] keeps the *application's* truth per partition: which offsets had their side
//! effect done (acked after processing, confirmed in the dead-letter topic by the broker, or
//! discarded with an event), and which deliveries are outstanding. Every check compares the
//! consumer against that truth; a broken one is a [`Violation`] naming the invariant.
//!
//! In a group session (no manual assignment) it also learns ownership from the machine's
//! `Assigned` and `Revoked` events and the JoinGroup answers they follow: side effects stay
//! done across rebalances (at least once), deliveries of a revoked assignment go stale, and
//! commits, leaves and stale acks are checked against what the consumer owns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rustmq_consumer_core::protocol::{Record, Request, TopicPartition};
use rustmq_consumer_core::{
    BreakerState, ClosePhase, ConsumerConfig, DeliveryTag, DiscardReason, Event, Metrics,
    RequestId, Transmit, UsageError,
};

use crate::broker::SimBroker;

/// Names of the invariants, as they appear in a [`Violation`].
pub mod names {
    /// The settle watermark never passes an offset whose side effect is not done.
    pub const SETTLE_AFTER_SIDE_EFFECT: &str = "settle-after-side-effect";
    /// A commit request never carries an offset past one whose side effect is not done.
    pub const COMMIT_AFTER_SIDE_EFFECT: &str = "commit-after-side-effect";
    /// The broker never stores an offset past one whose side effect was not done when the
    /// commit was sent.
    pub const BROKER_COMMIT_AFTER_SIDE_EFFECT: &str = "broker-commit-after-side-effect";
    /// `Event::Committed` only reports offsets the broker accepted.
    pub const COMMITTED_MEANS_ACCEPTED: &str = "committed-means-accepted";
    /// A message is delivered at most `max_retry_attempts + 1` times.
    pub const ATTEMPTS_BOUNDED: &str = "attempts-bounded";
    /// A message is never delivered again while a delivery of it is outstanding.
    pub const NO_CONCURRENT_DELIVERY: &str = "no-concurrent-delivery";
    /// A delivered record is the broker's record at that offset.
    pub const DELIVERY_MATCHES_LOG: &str = "delivery-matches-log";
    /// A paused partition delivers nothing.
    pub const PAUSE_HOLDS: &str = "pause-holds";
    /// The cache stays within its entry and byte bounds.
    pub const CACHE_BOUNDED: &str = "cache-bounded";
    /// Buffered messages stay within `fetch_size`.
    pub const PREFETCH_BOUNDED: &str = "prefetch-bounded";
    /// Outstanding deliveries stay within `max_unacked` and match the application's count.
    pub const DELIVERIES_BOUNDED: &str = "deliveries-bounded";
    /// Nothing is sent while the circuit is open.
    pub const BREAKER_OPEN_SILENCE: &str = "breaker-open-silence";
    /// At most `half_open_max_probes` probes are in flight while half-open.
    pub const HALF_OPEN_PROBES: &str = "half-open-probes";
    /// `Event::DeadLettered` only after the broker confirmed the produce.
    pub const DEAD_LETTER_CONFIRMED: &str = "dead-letter-confirmed";
    /// A dead-lettered record carries the original record and the documented headers.
    pub const DEAD_LETTER_CONTENT: &str = "dead-letter-content";
    /// Poison messages are discarded only when no dead-letter topic is configured.
    pub const DISCARD_ONLY_WITHOUT_DLQ: &str = "discard-only-without-dlq";
    /// The application's commands are refused only for the documented reasons.
    pub const COMMAND_ACCEPTED: &str = "command-accepted";
    /// After the faults heal, everything is settled and committed within a bounded time.
    pub const LIVENESS: &str = "liveness";
    /// Close ends with `Event::Closed` within its bound, phases in order, silence after.
    pub const CLOSE: &str = "close";
    /// A fetch that returned records is not repeated at the same offset over and over (the
    /// consumer took none of them and did not back off).
    pub const NO_FETCH_SPIN: &str = "no-fetch-spin";
    /// The same seed gives the same trace.
    pub const DETERMINISM: &str = "determinism";
    /// The LeaveGroup goes out only after the close's final commit was answered, or after its
    /// deadline passed (reported with `CommitFailed`): commit before leave.
    pub const COMMIT_BEFORE_LEAVE: &str = "commit-before-leave";
    /// An ack, nack or reject of a delivery of a partition revoked since (`Revoked`: lost to
    /// another member or let go at the close, not merely given back in a rebalance) or sought
    /// since is refused as `StaleDelivery` and moves no watermark. (Deliveries of a partition a
    /// rebalance gives back stay valid: a refusal of them breaks `command-accepted`.)
    pub const STALE_ACK_REFUSED: &str = "stale-ack-refused";
    /// A commit names only partitions the consumer owns, under the generation and member id
    /// of the join that assigned them.
    pub const COMMIT_OWNED: &str = "commit-owned";
    /// In a group session (no seeks), an accepted commit never moves the broker's offset of a
    /// partition backwards (a restart that lost it aside).
    pub const BROKER_COMMIT_MONOTONIC: &str = "broker-commit-monotonic";
    /// Under concurrent processing, two deliveries of one key (or, ordered by partition, of
    /// one partition) never run at once, and a key's first attempts of a partition run in
    /// offset order (until a seek or a revoke starts the partition over).
    pub const KEY_ORDER: &str = "key-order";
    /// In a group session, deliveries come only from partitions the consumer owns.
    pub const DELIVER_ONLY_OWNED: &str = "deliver-only-owned";
}

use names::*;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant ([`names`]).
    pub invariant: &'static str,
    /// The simulation step (input to the machine) after which it was found.
    pub step: u64,
    /// Simulated time since the start.
    pub at: Duration,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant `{}` broken at step {} (t={:?}): {}",
            self.invariant, self.step, self.at, self.detail
        )
    }
}

impl std::error::Error for Violation {}

/// The application's truth about one partition.
#[derive(Debug, Default, Clone)]
struct Truth {
    /// Offsets below are not owed in this generation (the start, or a seek).
    floor: u64,
    /// Offsets at or above `low` whose side effect is done.
    done: BTreeSet<u64>,
    /// Lowest offset at or above `floor` whose side effect is not done.
    low: u64,
    /// Outstanding deliveries: offset -> attempt.
    outstanding: BTreeMap<u64, u32>,
    /// Bumped by every seek and every revoke: deliveries of an older one are stale.
    generation: u64,
    paused: bool,
}

impl Truth {
    fn mark_done(&mut self, offset: u64) {
        if offset < self.low {
            return;
        }
        self.done.insert(offset);
        while self.done.remove(&self.low) {
            self.low += 1;
        }
    }
}

/// Checks a consumer's invariants step by step. Feed it everything that happens; every
/// method returns the first [`Violation`] it finds.
#[derive(Debug)]
pub struct Checker {
    /// `max_retry_attempts + 1` in force.
    max_attempts: u32,
    /// The highest `max_attempts` of any configuration in force so far.
    max_attempts_ever: u32,
    /// Per message handed back: the highest `max_attempts` in force at one of its hand-backs.
    /// A nack redelivers under the limit in force at the nack, so a live update that lowers
    /// it still lets a retry scheduled before it be delivered once (and dead-lettered after).
    attempts_allowed: BTreeMap<(u32, u64), u32>,
    cache_entries: u64,
    cache_bytes: u64,
    /// The prefetch bound in force: `fetch_size`, or after a live update lowered it, what
    /// was buffered then, until the buffer drained to `fetch_size_target`.
    fetch_size: std::cell::Cell<u64>,
    fetch_size_target: u64,
    max_unacked: u64,
    max_probes: u32,
    dead_letter: bool,
    partitions: BTreeMap<u32, Truth>,
    /// (partition, offset) pairs the broker accepted in a commit.
    accepted: BTreeSet<(u32, u64)>,
    /// (partition, offset) pairs the broker confirmed in the dead-letter topic.
    dead_lettered: BTreeSet<(u32, u64)>,
    breaker: BreakerState,
    /// Probes sent while half-open and not resolved yet, with the half-open phase they were
    /// sent in.
    probes: BTreeMap<RequestId, u64>,
    /// Half-open phases entered so far.
    half_open_phase: u64,
    /// Per partition: the offset of the last fetch answered with records, and how many times
    /// in a row the same fetch was sent again after such an answer.
    fetch_spin: BTreeMap<u32, (u64, u32)>,
    closed: bool,
    step: u64,
    at: Duration,
    /// Group-session mode (no manual assignment): ownership comes from `Assigned`/`Revoked`.
    group: bool,
    /// Partitions the consumer owns now.
    owned: BTreeSet<u32>,
    /// The generation and member id the owned partitions were assigned under (group mode).
    owned_generation: u64,
    member: String,
    /// A JoinGroup answer handed to the machine in the current input, adopted on `Assigned`.
    pending_join: Option<(u64, String)>,
    /// CommitOffset requests of the machine not resolved yet.
    commits_in_flight: BTreeSet<RequestId>,
    /// The last close phase the machine reported.
    close_phase: Option<ClosePhase>,
    /// The final commit's deadline passed (a `CommitFailed` during `FinalCommit`).
    final_commit_expired: bool,
    /// A `CommitFailed` was reported since the close started.
    close_commit_failed: bool,
    /// A LeaveGroup was sent.
    leave_sent: bool,
    /// Acks, nacks and rejects of stale deliveries the machine refused.
    stale_refused: u64,
    /// Deliveries of offsets whose side effect was already done (at least once: a rebalance
    /// or a restart hands them out again).
    duplicates: u64,
    /// Assignments (`Assigned` events) and revocations seen.
    assignments: u64,
    revocations: u64,
    /// Concurrent processing: lanes (keys or partitions) running now.
    running_lanes: BTreeSet<String>,
    /// Concurrent processing: per lane and partition, the generation and the lowest offset
    /// the next first attempt may have.
    lane_next: BTreeMap<(String, u32), (u64, u64)>,
}

impl Checker {
    /// A checker for a consumer with `config`, whose partitions start at offset 0.
    pub fn new(config: &ConsumerConfig) -> Self {
        Self {
            max_attempts: config.max_retry_attempts.saturating_add(1),
            max_attempts_ever: config.max_retry_attempts.saturating_add(1),
            attempts_allowed: BTreeMap::new(),
            cache_entries: config.cache_entries() as u64,
            cache_bytes: config.cache_max_bytes as u64,
            fetch_size: std::cell::Cell::new(config.fetch_size as u64),
            fetch_size_target: config.fetch_size as u64,
            max_unacked: config.max_unacked as u64,
            max_probes: config.half_open_max_probes,
            dead_letter: config.dead_letter_queue.is_some(),
            partitions: config
                .partitions
                .iter()
                .map(|&p| (p, Truth::default()))
                .collect(),
            accepted: BTreeSet::new(),
            dead_lettered: BTreeSet::new(),
            breaker: BreakerState::Closed,
            probes: BTreeMap::new(),
            half_open_phase: 0,
            fetch_spin: BTreeMap::new(),
            closed: false,
            step: 0,
            at: Duration::ZERO,
            group: config.partitions.is_empty(),
            owned: config.partitions.iter().copied().collect(),
            owned_generation: 0,
            member: String::new(),
            pending_join: None,
            commits_in_flight: BTreeSet::new(),
            close_phase: None,
            final_commit_expired: false,
            close_commit_failed: false,
            leave_sent: false,
            stale_refused: 0,
            duplicates: 0,
            assignments: 0,
            revocations: 0,
            running_lanes: BTreeSet::new(),
            lane_next: BTreeMap::new(),
        }
    }

    /// Tracks the application's truth for partitions `0..partitions` of the topic (group
    /// mode: the consumer may be assigned any of them; side effects done under one assignment
    /// stay done across rebalances).
    pub fn track_partitions(&mut self, partitions: u32) {
        for p in 0..partitions {
            self.partitions.entry(p).or_default();
        }
    }

    /// True in group-session mode.
    pub fn is_group(&self) -> bool {
        self.group
    }

    /// Partitions the consumer owns now.
    pub fn owned(&self) -> &BTreeSet<u32> {
        &self.owned
    }

    /// The generation the owned partitions were assigned under.
    pub fn owned_generation(&self) -> u64 {
        self.owned_generation
    }

    /// The member id the consumer joined with (empty before a join, and in manual mode).
    pub fn member(&self) -> &str {
        &self.member
    }

    /// CommitOffset requests of the machine not resolved yet.
    pub fn commits_in_flight(&self) -> usize {
        self.commits_in_flight.len()
    }

    /// Stale acks, nacks and rejects the machine refused.
    pub fn stale_refused(&self) -> u64 {
        self.stale_refused
    }

    /// Deliveries of offsets already processed (duplicates, allowed: at least once).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// `Assigned` and `Revoked` events seen.
    pub fn rebalances(&self) -> (u64, u64) {
        (self.assignments, self.revocations)
    }

    /// A successful JoinGroup answer (`generation`, `member`) is about to be handed to the
    /// machine; an `Assigned` event in the same input adopts it. Call
    /// [`Checker::end_of_input`] after the input.
    pub fn on_join_answer(&mut self, generation: u64, member: &str) {
        self.pending_join = Some((generation, member.to_owned()));
    }

    /// Forgets what the current input did not use (a late JoinGroup answer the machine ignored).
    pub fn end_of_input(&mut self) {
        self.pending_join = None;
    }

    /// True when a delivery of `generation` on `partition` is stale: the partition was revoked
    /// or sought since.
    pub fn is_stale(&self, partition: u32, generation: u64) -> bool {
        self.generation(partition) != generation
    }

    /// The application handed back a *stale* delivery (its partition was revoked or sought
    /// since): the machine must refuse it as [`UsageError::StaleDelivery`], and the settle
    /// watermark (`before`, `after` the command) must not move.
    pub fn on_stale_handback(
        &mut self,
        partition: u32,
        offset: u64,
        result: Result<(), &UsageError>,
        before: Option<u64>,
        after: Option<u64>,
    ) -> Result<(), Violation> {
        match result {
            Err(UsageError::StaleDelivery { .. }) if before == after => {
                self.stale_refused += 1;
                Ok(())
            }
            Err(UsageError::StaleDelivery { .. }) => self.fail(
                STALE_ACK_REFUSED,
                format!("refused stale delivery of partition {partition} offset {offset} moved the watermark from {before:?} to {after:?}"),
            ),
            Ok(()) => self.fail(
                STALE_ACK_REFUSED,
                format!("delivery of partition {partition} offset {offset} from a revoked assignment (or before a seek) was accepted (watermark {before:?} -> {after:?})"),
            ),
            Err(e) => self.fail(
                STALE_ACK_REFUSED,
                format!("stale delivery of partition {partition} offset {offset} refused for the wrong reason: {e}"),
            ),
        }
    }

    /// Checks that a LeaveGroup about to be sent comes after the final commit: the close
    /// reached `LeavingGroup`, no commit is unanswered unless the final commit's deadline
    /// passed, and every settled offset is committed (`uncommitted` lists the owned partitions
    /// whose settle watermark the broker has not confirmed) unless a `CommitFailed` said why.
    /// A manual assignment's LeaveGroup follows the join that learned its generation: none of
    /// this applies.
    pub fn on_leave_sent(&mut self, uncommitted: &[u32]) -> Result<(), Violation> {
        if !self.group {
            return Ok(());
        }
        self.check_leave(uncommitted)?;
        self.leave_sent = true;
        Ok(())
    }

    fn check_leave(&self, uncommitted: &[u32]) -> Result<(), Violation> {
        if !uncommitted.is_empty() && !self.close_commit_failed {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent with the settled offsets of partitions {uncommitted:?} uncommitted and no CommitFailed reported (close phase {:?})",
                    self.close_phase
                ),
            );
        }
        if self.close_phase != Some(ClosePhase::LeavingGroup) {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent in close phase {:?}, before the final commit was done",
                    self.close_phase
                ),
            );
        }
        if !self.commits_in_flight.is_empty() && !self.final_commit_expired {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent while commit {:?} is unanswered and the final commit's deadline has not passed",
                    self.commits_in_flight
                ),
            );
        }
        Ok(())
    }

    /// Checks that a commit names only owned partitions and, in group mode, goes under the
    /// generation and member id that assigned them. (A manual assignment commits under the
    /// generation it learned by joining and leaving; the broker refuses any other, and an
    /// orphan member of a join whose answer was lost bumps it: liveness covers it.)
    pub fn check_commit_owner(
        &self,
        offsets: &[(u32, u64)],
        generation: u64,
        member: &str,
    ) -> Result<(), Violation> {
        for &(p, o) in offsets {
            if !self.owned.contains(&p) {
                return self.fail(
                    COMMIT_OWNED,
                    format!(
                        "commit of partition {p} at {o} while the consumer owns {:?}",
                        self.owned
                    ),
                );
            }
        }
        // The machine forgets its member id when the broker answers 25 or 16, before the
        // revoke commit: an empty id is tolerated (the broker does not check membership).
        let member_ok = member == self.member || member.is_empty();
        if self.group && !offsets.is_empty() && (generation != self.owned_generation || !member_ok)
        {
            return self.fail(
                COMMIT_OWNED,
                format!(
                    "commit {offsets:?} under generation {generation} member {member:?}; the partitions were assigned under generation {} member {:?}",
                    self.owned_generation, self.member
                ),
            );
        }
        Ok(())
    }

    /// Group mode: checks that an accepted commit does not move the broker's offset of a
    /// partition backwards; `previous` gives what the broker held before it.
    pub fn check_commit_monotonic(
        &self,
        offsets: &[(u32, u64)],
        previous: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), Violation> {
        if !self.group {
            return Ok(());
        }
        for &(p, o) in offsets {
            if let Some(prev) = previous(p).filter(|&prev| o < prev) {
                return self.fail(
                    BROKER_COMMIT_MONOTONIC,
                    format!("broker's offset of partition {p} moved back from {prev} to {o}"),
                );
            }
        }
        Ok(())
    }

    /// A fetch of `partition` at `offset` was answered; `records` came back.
    pub fn on_fetch_answer(&mut self, partition: u32, offset: u64, records: usize) {
        if records == 0 {
            self.fetch_spin.remove(&partition);
        } else {
            let e = self.fetch_spin.entry(partition).or_insert((offset, 0));
            if e.0 != offset {
                *e = (offset, 0);
            }
        }
    }

    /// Sets the step counter and simulated time reported in violations.
    pub fn set_step(&mut self, step: u64, at: Duration) {
        self.step = step;
        self.at = at;
    }

    fn violation(&self, invariant: &'static str, detail: String) -> Violation {
        Violation {
            invariant,
            step: self.step,
            at: self.at,
            detail,
        }
    }

    fn fail<T>(&self, invariant: &'static str, detail: String) -> Result<T, Violation> {
        Err(self.violation(invariant, detail))
    }

    /// The lowest offset of `partition` whose side effect is not done.
    pub fn lowest_unsettled(&self, partition: u32) -> Option<u64> {
        self.partitions.get(&partition).map(|t| t.low)
    }

    /// The generation of `partition` (bumped by every seek and revoke).
    pub fn generation(&self, partition: u32) -> u64 {
        self.partitions.get(&partition).map_or(0, |t| t.generation)
    }

    /// Deliveries outstanding with the application, all partitions.
    pub fn outstanding(&self) -> u64 {
        self.partitions
            .values()
            .map(|t| t.outstanding.len() as u64)
            .sum()
    }

    /// True once `Event::Closed` was seen.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Offsets the broker confirmed in the dead-letter topic.
    pub fn dead_lettered(&self) -> &BTreeSet<(u32, u64)> {
        &self.dead_lettered
    }

    /// The application did the side effect of delivery `offset` of `generation` (before
    /// acking it). Side effects of a previous generation do not count.
    pub fn side_effect(&mut self, partition: u32, offset: u64, generation: u64) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            if t.generation == generation {
                t.mark_done(offset);
            }
        }
    }

    /// A live configuration update: the machine accepted `config` (its `metrics` right after
    /// it). The bounds follow it: the cache's at once (the machine evicts down to them), the
    /// prefetch buffer's once what was buffered past a lowered `fetch_size` is delivered, the
    /// attempts' from the next nack of each message, the probes' at the next probe.
    pub fn on_config_update(&mut self, config: &ConsumerConfig, metrics: &Metrics) {
        let max_attempts = config.max_retry_attempts.saturating_add(1);
        self.max_attempts = max_attempts;
        self.max_attempts_ever = self.max_attempts_ever.max(max_attempts);
        self.cache_entries = config.cache_entries() as u64;
        self.cache_bytes = config.cache_max_bytes as u64;
        self.fetch_size_target = config.fetch_size as u64;
        self.fetch_size
            .set(self.fetch_size_target.max(metrics.buffered));
        self.max_probes = config.half_open_max_probes;
    }

    /// The attempts a message may have been delivered (and may be dead-lettered or discarded
    /// after): the limit in force, or the higher one of a nack before a live update lowered it.
    fn attempts_bound(&self, partition: u32, offset: u64) -> u32 {
        self.attempts_allowed
            .get(&(partition, offset))
            .map_or(self.max_attempts, |&a| a.max(self.max_attempts))
    }

    /// The application handed a delivery back (ack, nack, reject or drop accepted).
    pub fn handed_back(&mut self, partition: u32, offset: u64, generation: u64) {
        let allowed = self
            .attempts_allowed
            .entry((partition, offset))
            .or_default();
        *allowed = (*allowed).max(self.max_attempts);
        if let Some(t) = self.partitions.get_mut(&partition) {
            if t.generation == generation {
                t.outstanding.remove(&offset);
            }
        }
    }

    /// The application sought `partition` to `offset`: outstanding deliveries go stale and
    /// nothing below `offset` is owed any more; everything from `offset` is owed again.
    pub fn seek(&mut self, partition: u32, offset: u64) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            t.generation += 1;
            t.floor = offset;
            t.low = offset;
            t.done.clear();
            t.outstanding.clear();
        }
    }

    /// The application paused or resumed `partition`.
    pub fn set_paused(&mut self, partition: u32, paused: bool) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            t.paused = paused;
        }
    }

    /// The broker stored `record` in the dead-letter topic: its original offset's side effect
    /// is done.
    pub fn dead_letter_stored(&mut self, partition: u32, offset: u64) {
        self.dead_lettered.insert((partition, offset));
        if let Some(t) = self.partitions.get_mut(&partition) {
            if offset >= t.floor {
                t.mark_done(offset);
            }
        }
    }

    /// Checks a commit request about to be sent; returns the bound (lowest unsettled offset
    /// per partition now) to check the broker's acceptance against later.
    pub fn on_commit_sent(&self, offsets: &[(u32, u64)]) -> Result<BTreeMap<u32, u64>, Violation> {
        let mut bound = BTreeMap::new();
        for &(p, o) in offsets {
            let low = self.lowest_unsettled(p).unwrap_or(0);
            if o > low {
                return self.fail(
                    COMMIT_AFTER_SIDE_EFFECT,
                    format!(
                        "commit of partition {p} at {o} sent while offset {low} is not processed"
                    ),
                );
            }
            bound.insert(p, low);
        }
        Ok(bound)
    }

    /// The broker accepted a commit whose request was checked with `bound`.
    pub fn on_commit_accepted(
        &mut self,
        offsets: &[(u32, u64)],
        bound: &BTreeMap<u32, u64>,
    ) -> Result<(), Violation> {
        for &(p, o) in offsets {
            self.accepted.insert((p, o));
            let low = bound.get(&p).copied().unwrap_or(0);
            if o > low {
                return self.fail(
                    BROKER_COMMIT_AFTER_SIDE_EFFECT,
                    format!(
                        "broker stored partition {p} at {o}; offset {low} was unprocessed when it was sent"
                    ),
                );
            }
        }
        Ok(())
    }

    /// A request the machine transmitted, with the breaker's state after the input that
    /// produced it (call [`Checker::on_events_of_input`] for that input first).
    pub fn on_transmit(
        &mut self,
        id: RequestId,
        request: &Request,
        breaker: BreakerState,
    ) -> Result<(), Violation> {
        if self.closed {
            return self.fail(CLOSE, format!("{:?} sent after Closed", request.kind()));
        }
        if let Request::CommitOffset(_) = request {
            if self.leave_sent {
                return self.fail(
                    COMMIT_BEFORE_LEAVE,
                    "CommitOffset sent after the LeaveGroup".to_owned(),
                );
            }
            self.commits_in_flight.insert(id);
        }
        if let Request::Fetch(f) = request {
            let spins = match self.fetch_spin.get_mut(&f.partition_id) {
                Some(e) if f.max_bytes > 1 && e.0 == f.fetch_offset => {
                    e.1 += 1;
                    e.1
                }
                Some(_) if f.max_bytes > 1 => {
                    self.fetch_spin.remove(&f.partition_id);
                    0
                }
                _ => 0,
            };
            if spins > 50 {
                return self.fail(
                    NO_FETCH_SPIN,
                    format!(
                        "fetch of partition {} at {} sent {spins} times in a row although each answer had records",
                        f.partition_id, f.fetch_offset
                    ),
                );
            }
        }
        match breaker {
            BreakerState::Open => {
                return self.fail(
                    BREAKER_OPEN_SILENCE,
                    format!("{:?} sent while the circuit is open", request.kind()),
                );
            }
            BreakerState::HalfOpen => {
                let phase = self.half_open_phase;
                self.probes.insert(id, phase);
                let current = self.probes.values().filter(|&&p| p == phase).count();
                let total = self.probes.len();
                let max = self.max_probes as usize;
                if total > max {
                    return self.fail(
                        HALF_OPEN_PROBES,
                        format!(
                            "{total} probes in flight while half-open ({current} of this phase, max {max}): {:?}",
                            self.probes
                        ),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A request's fate reached the machine (an answer, a failure, or its deadline).
    pub fn on_resolved(&mut self, id: RequestId) {
        self.probes.remove(&id);
        self.commits_in_flight.remove(&id);
    }

    /// Applies the side effects an input's events report before its transmits are checked:
    /// a discard is its own side effect, and happens in the same input as the commit it
    /// allows. Call once per input with all of its events, before [`Checker::on_transmit`].
    pub fn on_events_of_input(&mut self, events: &[Event]) {
        for e in events {
            match e {
                Event::Closing(phase) => self.close_phase = Some(*phase),
                Event::CommitFailed { .. } if self.close_phase.is_some() => {
                    self.close_commit_failed = true;
                    if self.close_phase == Some(ClosePhase::FinalCommit) {
                        self.final_commit_expired = true;
                    }
                }
                Event::RequestFailed { id, .. } => {
                    self.commits_in_flight.remove(id);
                }
                Event::Assigned(tps) if self.group => {
                    self.assignments += 1;
                    if let Some((generation, member)) = self.pending_join.take() {
                        self.owned_generation = generation;
                        self.member = member;
                    }
                    self.owned.extend(tps.iter().map(|tp| tp.partition));
                }
                Event::Revoked(tps) if self.group => {
                    self.revocations += 1;
                    for tp in tps {
                        self.owned.remove(&tp.partition);
                        if let Some(t) = self.partitions.get_mut(&tp.partition) {
                            // Deliveries the application still holds are stale from here on
                            // (a rebalance that gives the partition back says no `Revoked`:
                            // they stay valid); side effects done so far stay done.
                            t.generation += 1;
                            t.outstanding.clear();
                            t.paused = false;
                        }
                    }
                }
                _ => {}
            }
            if let Event::BreakerChanged {
                to: BreakerState::HalfOpen,
                ..
            } = e
            {
                self.half_open_phase += 1;
            }
            if let Event::Discarded {
                partition, offset, ..
            } = e
            {
                if let Some(t) = self.partitions.get_mut(partition) {
                    if *offset >= t.floor {
                        t.mark_done(*offset);
                    }
                }
            }
        }
    }

    /// An event the machine emitted. `log` gives the broker's record at an offset, to check
    /// deliveries against.
    pub fn on_event<'a>(
        &mut self,
        event: &Event,
        log: impl Fn(u32, u64) -> Option<&'a Record>,
    ) -> Result<(), Violation> {
        match event {
            Event::Deliver(d) => {
                let (p, o, attempt) = (d.tag.partition, d.tag.offset, d.tag.attempt);
                let max = self.attempts_bound(p, o);
                if attempt > max || attempt == 0 {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!(
                            "partition {p} offset {o} delivered with attempt {attempt} (max {max})"
                        ),
                    );
                }
                match log(p, o) {
                    Some(r) if r.value == d.record.value && r.key == d.record.key => {}
                    other => {
                        return self.fail(
                            DELIVERY_MATCHES_LOG,
                            format!(
                                "partition {p} offset {o}: delivered {:?}, broker has {:?}",
                                d.record.value,
                                other.map(|r| &r.value)
                            ),
                        )
                    }
                }
                if !self.owned.contains(&p) {
                    return self.fail(
                        DELIVER_ONLY_OWNED,
                        format!(
                            "partition {p} offset {o} delivered while the consumer owns {:?}",
                            self.owned
                        ),
                    );
                }
                let Some(t) = self.partitions.get_mut(&p) else {
                    return self.fail(
                        DELIVERY_MATCHES_LOG,
                        format!("delivery from unassigned partition {p}"),
                    );
                };
                if t.paused {
                    return self.fail(
                        PAUSE_HOLDS,
                        format!("partition {p} offset {o} delivered while paused"),
                    );
                }
                if o < t.low || t.done.contains(&o) {
                    self.duplicates += 1;
                }
                if let Some(prev) = t.outstanding.insert(o, attempt) {
                    return self.fail(
                        NO_CONCURRENT_DELIVERY,
                        format!("partition {p} offset {o} delivered (attempt {attempt}) while attempt {prev} is outstanding"),
                    );
                }
            }
            Event::DeadLettered {
                partition,
                offset,
                attempts,
            } => {
                if *attempts > self.attempts_bound(*partition, *offset) {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!("partition {partition} offset {offset} dead-lettered after {attempts} attempts"),
                    );
                }
                if !self.dead_lettered.contains(&(*partition, *offset)) {
                    return self.fail(
                        DEAD_LETTER_CONFIRMED,
                        format!("partition {partition} offset {offset} reported dead-lettered, the broker has no such record"),
                    );
                }
            }
            Event::Discarded {
                partition,
                offset,
                attempts,
                reason,
            } => {
                if *attempts > self.attempts_bound(*partition, *offset) {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!("partition {partition} offset {offset} discarded after {attempts} attempts"),
                    );
                }
                if self.dead_letter && *reason != DiscardReason::NoLongerOnBroker {
                    return self.fail(
                        DISCARD_ONLY_WITHOUT_DLQ,
                        format!("partition {partition} offset {offset} discarded ({reason}) although a dead-letter topic is configured"),
                    );
                }
            }
            Event::Committed { offsets, .. } => {
                for &(p, o) in offsets {
                    if !self.accepted.contains(&(p, o)) {
                        return self.fail(
                            COMMITTED_MEANS_ACCEPTED,
                            format!("Committed reports partition {p} at {o}, which the broker never accepted"),
                        );
                    }
                }
            }
            Event::RequestFailed { id, .. } => self.on_resolved(*id),
            Event::BreakerChanged { to, .. } => self.breaker = *to,
            Event::Closed => self.closed = true,
            _ => {}
        }
        Ok(())
    }

    /// Checks the machine's state after a step: watermarks against the application's truth,
    /// and every bound.
    pub fn check_state(
        &self,
        metrics: &Metrics,
        watermark: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), Violation> {
        for (&p, t) in &self.partitions {
            let Some(w) = watermark(p) else { continue };
            if w > t.low {
                return self.fail(
                    SETTLE_AFTER_SIDE_EFFECT,
                    format!(
                        "partition {p}: settle watermark {w} passed unprocessed offset {}",
                        t.low
                    ),
                );
            }
        }
        if metrics.cached > self.cache_entries || metrics.cached_bytes > self.cache_bytes {
            return self.fail(
                CACHE_BOUNDED,
                format!(
                    "cache holds {} entries / {} bytes (bounds {} / {})",
                    metrics.cached, metrics.cached_bytes, self.cache_entries, self.cache_bytes
                ),
            );
        }
        if metrics.buffered <= self.fetch_size_target {
            // Drained to a lowered bound: it holds from here on.
            self.fetch_size.set(self.fetch_size_target);
        }
        if metrics.buffered > self.fetch_size.get() {
            return self.fail(
                PREFETCH_BOUNDED,
                format!(
                    "{} messages buffered (fetch_size {})",
                    metrics.buffered,
                    self.fetch_size.get()
                ),
            );
        }
        let outstanding = self.outstanding();
        if metrics.in_flight_deliveries > self.max_unacked
            || (!self.closed && metrics.in_flight_deliveries != outstanding)
        {
            return self.fail(
                DELIVERIES_BOUNDED,
                format!(
                    "machine counts {} outstanding deliveries, application holds {outstanding} (max_unacked {})",
                    metrics.in_flight_deliveries, self.max_unacked
                ),
            );
        }
        Ok(())
    }

    /// Reports a command the machine refused for a reason the application did not expect.
    pub fn command_refused(&self, detail: String) -> Violation {
        self.violation(COMMAND_ACCEPTED, detail)
    }

    /// Concurrent processing started a delivery in `lane` (a key, or a partition): no other
    /// delivery of the lane may be running, and a first attempt must not come before an
    /// offset of its partition the lane already started in this generation.
    pub fn lane_started(
        &mut self,
        lane: &str,
        tag: DeliveryTag,
        generation: u64,
    ) -> Result<(), Violation> {
        if !self.running_lanes.insert(lane.to_owned()) {
            return self.fail(
                KEY_ORDER,
                format!("{lane}: {tag:?} started while another delivery of it runs"),
            );
        }
        if tag.attempt == 1 {
            let next = self
                .lane_next
                .entry((lane.to_owned(), tag.partition))
                .or_insert((generation, 0));
            if next.0 == generation && tag.offset < next.1 {
                let last = next.1 - 1;
                return self.fail(
                    KEY_ORDER,
                    format!("{lane}: {tag:?} started after offset {last} of its partition"),
                );
            }
            *next = (generation, tag.offset + 1);
        }
        Ok(())
    }

    /// Concurrent processing finished a delivery of `lane`.
    pub fn lane_finished(&mut self, lane: &str) {
        self.running_lanes.remove(lane);
    }

    /// A violation of `invariant` at the current step (for checks made by the simulation).
    pub fn broken(&self, invariant: &'static str, detail: String) -> Violation {
        self.violation(invariant, detail)
    }
}

// ------------------------------------------------------------------------------------------
// End-of-run checks: what must hold once the machine reported `Closed`.

impl Checker {
    /// End of run: the close went through every phase in order (`LeavingGroup` only in a
    /// group session).
    pub fn check_close_phases(&self, phases: &[ClosePhase]) -> Result<(), Violation> {
        let mut expected = vec![
            ClosePhase::Draining,
            ClosePhase::FlushingDeadLetters,
            ClosePhase::FinalCommit,
            ClosePhase::Closed,
        ];
        if self.group {
            expected.insert(3, ClosePhase::LeavingGroup);
        }
        if phases != expected {
            return Err(self.broken(CLOSE, format!("close phases {phases:?}")));
        }
        Ok(())
    }

    /// End of run: `late`, the machine's first transmit after a timeout long after `Closed`,
    /// is none (nothing more is sent after Closed, whatever time passes).
    pub fn check_silent_after_close(&self, late: Option<&Transmit>) -> Result<(), Violation> {
        match late {
            Some(t) => Err(self.broken(CLOSE, format!("{:?} sent after Closed", t.request.kind()))),
            None => Ok(()),
        }
    }

    /// End of run: every dead-lettered offset is in `config`'s dead-letter topic on `broker`,
    /// with the original value and the documented headers.
    pub fn check_dead_letters(
        &self,
        broker: &SimBroker,
        config: &ConsumerConfig,
    ) -> Result<(), Violation> {
        let Some(dlq) = &config.dead_letter_queue else {
            return Ok(());
        };
        use rustmq_consumer_core::dead_letter_headers::*;
        let (topic, group) = (config.topic.as_str(), config.consumer_group.as_str());
        let text = |r: &Record, k: &str| {
            r.header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let mut found = BTreeSet::new();
        for r in broker.records(dlq, 0) {
            let bad = |what: String| Err(self.broken(DEAD_LETTER_CONTENT, what));
            let (Ok(p), Ok(o)) = (
                text(r, ORIGINAL_PARTITION).parse::<u32>(),
                text(r, ORIGINAL_OFFSET).parse::<u64>(),
            ) else {
                return bad(format!(
                    "dead letter without partition/offset headers: {r:?}"
                ));
            };
            let attempts = text(r, ATTEMPTS).parse::<u32>().unwrap_or(0);
            let original = broker.records(topic, p).get(o as usize);
            if text(r, ORIGINAL_TOPIC) != topic
                || text(r, CONSUMER_GROUP) != group
                || r.header(LAST_REASON).is_none()
                || attempts == 0
                || attempts > self.max_attempts_ever
                || original.map(|x| &x.value) != Some(&r.value)
            {
                return bad(format!("dead letter of p{p}@{o} is wrong: {r:?}"));
            }
            found.insert((p, o));
        }
        for key in self.dead_lettered() {
            if !found.contains(key) {
                return Err(self.broken(
                    DEAD_LETTER_CONTENT,
                    format!("confirmed dead letter {key:?} missing from the topic"),
                ));
            }
        }
        Ok(())
    }

    /// End of a group session: the final commit reached `broker` (each of `partitions` at its
    /// high watermark, unless a restart (`crashed`) lost commits the consumer had confirmed),
    /// and the consumer left the group, unless its circuit was open through the whole leave
    /// phase (nothing goes out while it is open: the group then rebalances after the session
    /// timeout).
    pub fn check_group_after_close(
        &self,
        broker: &SimBroker,
        config: &ConsumerConfig,
        partitions: u32,
        crashed: bool,
    ) -> Result<(), Violation> {
        let (topic, group) = (config.topic.as_str(), config.consumer_group.as_str());
        for p in 0..partitions {
            let hw = broker.high_watermark(topic, p).unwrap_or(0);
            let committed = broker.committed(group, &TopicPartition::new(topic, p));
            if !(committed == Some(hw) || (committed.is_none() && (hw == 0 || crashed))) {
                return Err(self.broken(
                    LIVENESS,
                    format!("closed with partition {p} committed at {committed:?} on the broker, high watermark {hw}"),
                ));
            }
        }
        let members = broker.members(group);
        let barred = !self.leave_sent && self.breaker == BreakerState::Open;
        if !members.is_empty() && !barred {
            return Err(self.broken(
                CLOSE,
                format!("closed, yet the group still has members {members:?}"),
            ));
        }
        Ok(())
    }
}
