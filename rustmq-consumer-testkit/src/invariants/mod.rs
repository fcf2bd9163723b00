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
//!
//! # Codemap
//!
//! - `mod.rs`: the invariants' [`names`], [`Violation`], the application's truth per
//!   partition, the [`Checker`]'s state, its constructor and its queries.
//! - `delivery`: side effects, hand-backs, seeks and pauses; each event checked (deliveries
//!   against the log, attempts, dead letters and discards, `Committed`); the state's bounds
//!   after every step; the order of concurrent processing's lanes.
//! - `requests`: an input's events applied before its transmits; each transmit checked
//!   (silence after `Closed` and while the circuit is open, half-open probes, fetch spin);
//!   commits sent and accepted against the side effects done.
//! - `group`: the group session: ownership learnt from JoinGroup answers, stale hand-backs,
//!   commit owners and a monotonic broker offset, commit before leave.
//! - `close`: the end-of-run checks, once the machine reported `Closed`.

mod close;
mod delivery;
mod group;
mod requests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rustmq_consumer_core::{BreakerState, ClosePhase, ConsumerConfig, RequestId};

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

    /// Reports a command the machine refused for a reason the application did not expect.
    pub fn command_refused(&self, detail: String) -> Violation {
        self.violation(COMMAND_ACCEPTED, detail)
    }

    /// A violation of `invariant` at the current step (for checks made by the simulation).
    pub fn broken(&self, invariant: &'static str, detail: String) -> Violation {
        self.violation(invariant, detail)
    }
}
