//! The consumer state machine: [`ConsumerMachine`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxBuildHasher;
use tracing::{debug, trace, warn};

use crate::backoff::{self, Rng};
use crate::breaker::{Breaker, Permit};
use crate::cache::MessageCache;
use crate::config::{ConfigError, ConsumerConfig, StartPosition};
use crate::error::{TransportError, UsageError};
use crate::event::*;
use crate::frame;
use crate::group::{GroupSession, Phase as GroupPhase};
use crate::protocol::*;
use crate::window::Window;

/// The sans-IO RustMQ consumer.
///
/// It never reads a clock, sleeps, spawns or touches a socket: time enters as `now`, requests
/// leave through [`poll_transmit`](Self::poll_transmit) and their answers come back through
/// [`handle_response`](Self::handle_response).
///
/// # Polling order
///
/// After constructing it and after *every* input (`handle_response`, `handle_timeout`, or any
/// command such as [`ack`](Self::ack)), drain the outputs until each returns `None`:
///
/// 1. [`poll_transmit`](Self::poll_transmit): send each request (several may be in flight);
/// 2. [`poll_event`](Self::poll_event): deliveries and everything else the application sees;
/// 3. [`poll_timeout`](Self::poll_timeout): call `handle_timeout` no later than this instant.
///
/// # Panics
///
/// Never on input from the network or the application: malformed responses are failures and
/// misuse is a [`UsageError`]. A panic means a broken internal invariant (a bug).
#[derive(Debug)]
pub struct ConsumerMachine {
    config: ConsumerConfig,
    rng: Rng,
    /// Sorted by partition id.
    partitions: Vec<Partition>,
    next_epoch: u64,
    next_request: u64,
    in_flight: HashMap<RequestId, InFlight, FxBuildHasher>,
    /// Request deadlines, earliest first.
    deadlines: BTreeSet<(Instant, RequestId)>,
    /// Retry schedule: (due, partition id, offset).
    retries: BTreeSet<(Instant, u32, u64)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    breaker: Breaker,
    cache: MessageCache,
    commits: CommitState,
    dead_letters: DeadLetterOutbox,
    /// Deliveries outstanding with the application.
    unacked: usize,
    /// Fetched messages not yet delivered, all partitions.
    buffered: usize,
    buffered_bytes: usize,
    /// The partition whose fetch goes first next time (partitions take turns).
    fetch_cursor: usize,
    /// Estimated encoded size of a record (a moving average over the records fetches put in
    /// the buffer), to size fetches to what the buffer takes.
    record_bytes: usize,
    /// Round-robin cursor over partitions for fair delivery.
    cursor: usize,
    /// Reasons of poison messages being fetched again for the dead-letter path.
    refetch_reasons: BTreeMap<(u32, u64), String>,
    /// The group session; `None` for a manual assignment.
    group: Option<GroupSession>,
    /// Where this member's revoked partitions stood, so a reassignment after the broker lost
    /// its commits (a restart) does not fall back to the start position.
    known_positions: BTreeMap<u32, u64>,
    close: Option<Close>,
    metrics: Metrics,
}

#[derive(Debug)]
struct Partition {
    id: u32,
    epoch: u64,
    phase: PartitionPhase,
    paused: bool,
    /// Being given back in a rebalance: no fetches, no deliveries.
    revoking: bool,
    /// Settle window: base = lowest unsettled offset, end = next offset to fetch.
    window: Window<Slot>,
    /// Fetched, not yet delivered.
    buffered: VecDeque<(u64, Record)>,
    /// Due retries with their record, waiting for delivery credit.
    redeliver: VecDeque<(u64, Record)>,
    /// Offsets whose record the cache lost: fetched again one by one.
    refetch: VecDeque<u64>,
    fetch_in_flight: bool,
    refetch_in_flight: bool,
    /// No fetch before this (empty fetch or failure backoff).
    fetch_not_before: Option<Instant>,
    /// A fetch took nothing because its first record (this many bytes) did not fit the
    /// prefetch byte budget: no fetch until deliveries free room for it.
    byte_blocked: Option<usize>,
    empty_fetches: u32,
    fetch_failures: u32,
    high_watermark: Option<u64>,
    /// Last offset the broker confirmed.
    committed: Option<u64>,
    /// Offset in the commit in flight.
    commit_in_flight: Option<u64>,
    /// Where consumption started without a commit: nothing to commit until the watermark moves.
    start: Option<u64>,
    stalled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartitionPhase {
    /// Waiting for the committed offset (FetchOffset).
    Starting,
    /// No commit and the start position is Latest: waiting for the high watermark.
    Latest,
    Active,
}

/// The state of one unsettled offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Fetched, in `Partition::buffered`.
    Buffered,
    /// With the application.
    Delivered { attempt: u32, since: Instant },
    /// Nacked; its retry is scheduled.
    Waiting { attempt: u32 },
    /// Retry due; in `Partition::redeliver` (or being fetched again) for delivery `attempt`.
    Ready { attempt: u32 },
    /// Lost from the cache; being fetched again, then `then`.
    Refetching { attempt: u32, then: Then },
    /// In the dead-letter outbox.
    DeadLetter { attempt: u32 },
    /// Cannot be dead-lettered; the partition is stalled here.
    Stuck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Redeliver,
    DeadLetter,
}

#[derive(Debug)]
struct InFlight {
    permit: Permit,
    deadline: Instant,
    owner: Owner,
}

#[derive(Debug)]
enum Owner {
    FetchOffset,
    ResolveLatest {
        partition: u32,
        epoch: u64,
    },
    Fetch {
        partition: u32,
        epoch: u64,
        offset: u64,
    },
    Refetch {
        partition: u32,
        epoch: u64,
        offset: u64,
    },
    Commit {
        offsets: Vec<(u32, u64, u64)>,
        ticket: u64,
    },
    FindCoordinator,
    Join,
    Heartbeat {
        generation: u64,
    },
    Leave,
    DeadLetter {
        batch: Vec<DeadLetterEntry>,
    },
}

#[derive(Debug, Default)]
struct CommitState {
    in_flight: bool,
    /// A commit should be sent as soon as the breaker and the in-flight rule allow.
    wanted: bool,
    /// When the oldest uncommitted watermark advance happened (for `ack_batch_timeout`).
    dirty_since: Option<Instant>,
    /// Watermark advances since the last commit was sent.
    advanced: u64,
    /// Advances carried by the commit in flight.
    advanced_in_flight: u64,
    /// A commit was answered (either way) during the close's final-commit phase.
    answered_in_close: bool,
    next_ticket: u64,
    /// Highest ticket asked for by `commit()`.
    requested: u64,
    failures: u32,
    retry_at: Option<Instant>,
    /// The group generation the coordinator refused a commit under (code 22): nothing more
    /// is committed under it, since every such commit would be refused too. Cleared when the
    /// member joins again (a restarted broker may give the same number to a new generation).
    fenced_generation: Option<u64>,
}

#[derive(Debug, Default)]
struct DeadLetterOutbox {
    queue: VecDeque<DeadLetterEntry>,
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct DeadLetterEntry {
    partition: u32,
    epoch: u64,
    offset: u64,
    attempts: u32,
    reason: String,
    record: Record,
}

#[derive(Debug, Clone, Copy)]
struct Close {
    phase: ClosePhase,
    deadline: Instant,
}

/// Header names the dead-letter record carries.
pub mod dead_letter_headers {
    /// Topic the message came from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
    /// Deliveries it had.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Last reason given by the application.
    pub const LAST_REASON: &str = "x-last-reason";
    /// The consumer group.
    pub const CONSUMER_GROUP: &str = "x-consumer-group";
}

const MAX_FETCH_FAILURE_SHIFT: u32 = 16;

impl ConsumerMachine {
    /// Validates `config` and starts: asks the broker for committed offsets of every assigned
    /// partition. Drain the outputs afterwards.
    pub fn new(config: ConsumerConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut ids = config.partitions.clone();
        ids.sort_unstable();
        let mut next_epoch = 1;
        let partitions = ids
            .into_iter()
            .map(|id| {
                let p = Partition::new(id, next_epoch, 0);
                next_epoch += 1;
                p
            })
            .collect::<Vec<_>>();
        let mut machine = Self {
            rng: Rng::new(config.seed),
            breaker: Breaker::new(
                config.failure_threshold,
                config.recovery_timeout,
                config.half_open_max_probes,
                config.half_open_max_wait,
            ),
            cache: MessageCache::new(
                config.cache_entries(),
                config.cache_max_bytes,
                config.cache_ttl,
            ),
            partitions,
            next_epoch,
            next_request: 0,
            in_flight: HashMap::with_hasher(FxBuildHasher),
            deadlines: BTreeSet::new(),
            retries: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            commits: CommitState::default(),
            dead_letters: DeadLetterOutbox::default(),
            unacked: 0,
            buffered: 0,
            buffered_bytes: 0,
            fetch_cursor: 0,
            // Until a fetch says otherwise: `fetch_max_bytes` spread over `fetch_size` records.
            record_bytes: (config.fetch_max_bytes as usize / config.fetch_size.max(1)).max(1),
            cursor: 0,
            refetch_reasons: BTreeMap::new(),
            group: config
                .uses_group_session()
                .then(|| GroupSession::new(now, config.heartbeat(), config.session_timeout)),
            known_positions: BTreeMap::new(),
            close: None,
            metrics: Metrics::default(),
            config,
        };
        if machine.group.is_none() {
            let assigned = machine.topic_partitions(machine.partitions.iter().map(|p| p.id));
            machine.events.push_back(Event::Assigned(assigned));
        }
        machine.poll_work(now);
        Ok(machine)
    }

    /// The configuration in force.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    // ---------------------------------------------------------------- inputs

    /// Feeds the answer (or failure) of the request `id`. Answers to unknown or expired
    /// requests are ignored.
    pub fn handle_response(
        &mut self,
        now: Instant,
        id: RequestId,
        result: Result<Response, TransportError>,
    ) {
        let Some(flight) = self.in_flight.remove(&id) else {
            trace!(
                request = id.0,
                "ignoring response to an unknown or expired request"
            );
            return;
        };
        self.deadlines.remove(&(flight.deadline, id));
        let outcome = match result {
            Ok(response) => self.dispatch(now, flight.owner, response),
            Err(error) => {
                self.fail_owner(now, flight.owner);
                Err(error.to_string())
            }
        };
        match outcome {
            Ok(()) => self.breaker.on_success(now, flight.permit),
            Err(error) => {
                debug!(request = id.0, %error, "request failed");
                self.metrics.requests_failed += 1;
                self.breaker.on_failure(now, flight.permit);
                self.events.push_back(Event::RequestFailed { id, error });
            }
        }
        self.poll_work(now);
    }

    /// Fires every deadline that is due. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let was_open = self.breaker.state() == BreakerState::Open;
        self.breaker.handle_timeout(now);
        if was_open && self.breaker.state() == BreakerState::HalfOpen {
            // The breaker paced the outage: partitions backing off after failed fetches fetch
            // now, as probes, instead of waiting out a backoff grown during the outage.
            for p in self.partitions.iter_mut().filter(|p| p.fetch_failures > 0) {
                p.fetch_not_before = None;
            }
        }
        self.cache.handle_timeout(now);
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(flight) = self.in_flight.remove(&id) {
                debug!(request = id.0, "request deadline passed");
                self.metrics.requests_failed += 1;
                self.breaker.on_failure(now, flight.permit);
                self.fail_owner(now, flight.owner);
                self.events.push_back(Event::RequestFailed {
                    id,
                    error: TransportError::TimedOut.to_string(),
                });
            }
        }
        while let Some(&(at, partition, offset)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            self.retry_due(now, partition, offset);
        }
        for p in &mut self.partitions {
            if p.fetch_not_before.is_some_and(|t| t <= now) {
                p.fetch_not_before = None;
            }
        }
        if self
            .commits
            .dirty_since
            .is_some_and(|t| t + self.config.ack_batch_timeout <= now)
        {
            self.commits.dirty_since = None;
            self.commits.wanted = true;
        }
        if self.commits.retry_at.is_some_and(|t| t <= now) {
            self.commits.retry_at = None;
        }
        if let Some(g) = &mut self.group {
            if g.retry_at.is_some_and(|t| t <= now) {
                g.retry_at = None;
            }
        }
        if self.close.is_none()
            && self
                .group
                .as_ref()
                .and_then(|g| g.expires_at())
                .is_some_and(|t| t <= now)
        {
            // The broker has evicted us by now: the assignment is lost. Fence locally.
            warn!(group = %self.config.consumer_group, "session expired without a heartbeat; assignment lost");
            self.fence(now);
        }
        if self.dead_letters.retry_at.is_some_and(|t| t <= now) {
            self.dead_letters.retry_at = None;
        }
        if self
            .close
            .is_some_and(|c| c.deadline <= now && c.phase != ClosePhase::Closed)
        {
            self.advance_close(now, true);
        }
        self.poll_work(now);
    }

    // -------------------------------------------------------------- commands

    /// Settles a delivery: it will be committed once every lower offset is settled too.
    pub fn ack(&mut self, now: Instant, tag: DeliveryTag) -> Result<(), UsageError> {
        let idx = self.outstanding(tag)?;
        self.unacked -= 1;
        self.metrics.acked += 1;
        trace!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, "ack");
        self.settle(now, idx, tag.offset);
        self.poll_work(now);
        Ok(())
    }

    /// Hands a delivery back for a retry after `delay` (or the backoff policy when `None`).
    /// Past `max_retry_attempts` it goes to the dead-letter path instead.
    pub fn nack(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        delay: Option<Duration>,
    ) -> Result<(), UsageError> {
        let idx = self.outstanding(tag)?;
        self.unacked -= 1;
        self.metrics.nacked += 1;
        if tag.attempt > self.config.max_retry_attempts {
            let reason = format!("retries exhausted after {} attempts", tag.attempt);
            self.poison(now, idx, tag.offset, tag.attempt, reason);
        } else if self.close.is_some() {
            // Closing: no more deliveries. The offset stays unsettled, so it is redelivered to
            // the next consumer (at-least-once).
            self.partitions[idx].set(
                tag.offset,
                Slot::Waiting {
                    attempt: tag.attempt,
                },
            );
        } else {
            let delay = delay.unwrap_or_else(|| {
                backoff::full_jitter(
                    &mut self.rng,
                    self.config.retry_backoff_base,
                    self.config.retry_backoff_max,
                    tag.attempt,
                )
            });
            trace!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, ?delay, "nack: retry scheduled");
            self.partitions[idx].set(
                tag.offset,
                Slot::Waiting {
                    attempt: tag.attempt,
                },
            );
            self.retries
                .insert((now + delay, tag.partition, tag.offset));
        }
        self.poll_work(now);
        Ok(())
    }

    /// Sends a delivery straight to the dead-letter path (or discards it, with an event, when
    /// no dead-letter topic is configured).
    pub fn reject(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        reason: &str,
    ) -> Result<(), UsageError> {
        let idx = self.outstanding(tag)?;
        self.unacked -= 1;
        self.metrics.rejected += 1;
        self.poison(now, idx, tag.offset, tag.attempt, reason.to_owned());
        self.poll_work(now);
        Ok(())
    }

    /// Stops fetching and delivering these partitions; buffered messages are kept.
    pub fn pause(&mut self, now: Instant, partitions: &[u32]) -> Result<(), UsageError> {
        self.set_paused(now, partitions, true)
    }

    /// Resumes paused partitions, releasing their buffered messages first.
    pub fn resume(&mut self, now: Instant, partitions: &[u32]) -> Result<(), UsageError> {
        self.set_paused(now, partitions, false)
    }

    /// Restarts a partition at `offset`: buffered messages, pending retries and outstanding
    /// deliveries of the partition are dropped (their tags go stale), and the commit follows.
    pub fn seek(&mut self, now: Instant, partition: u32, offset: u64) -> Result<(), UsageError> {
        self.check_open()?;
        let idx = self
            .index(partition)
            .ok_or(UsageError::UnknownPartition(partition))?;
        self.reset_partition(idx, offset);
        let p = &mut self.partitions[idx];
        p.phase = PartitionPhase::Active;
        debug!(topic = %self.config.topic, partition, offset, "seek");
        self.commits.advanced += 1;
        self.commits.dirty_since.get_or_insert(now);
        self.poll_work(now);
        Ok(())
    }

    /// Commits every settled offset now. Returns a ticket: an [`Event::Committed`] or
    /// [`Event::CommitFailed`] whose `ticket` is at least this one answers it.
    pub fn commit(&mut self, now: Instant) -> Result<u64, UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        self.commits.next_ticket += 1;
        let ticket = self.commits.next_ticket;
        self.commits.requested = ticket;
        self.commits.wanted = true;
        self.commits.retry_at = None;
        self.poll_work(now);
        Ok(ticket)
    }

    /// Starts closing (idempotent): stop fetching, drain outstanding deliveries (bounded by
    /// `drain_timeout`), flush dead letters, final commit, then [`Event::Closed`].
    pub fn close(&mut self, now: Instant) {
        if self.close.is_some() {
            return;
        }
        debug!(topic = %self.config.topic, "closing");
        self.close = Some(Close {
            phase: ClosePhase::Draining,
            deadline: now + self.config.drain_timeout,
        });
        self.events.push_back(Event::Closing(ClosePhase::Draining));
        // Undelivered messages stay unsettled: the next member reads them again.
        self.retries.clear();
        for p in &mut self.partitions {
            p.buffered.clear();
            p.redeliver.clear();
            p.refetch.clear();
        }
        self.buffered = 0;
        self.buffered_bytes = 0;
        self.advance_close(now, false);
        self.poll_work(now);
    }

    // --------------------------------------------------------------- outputs

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application or the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, Reason)> {
        let mut best: Option<(Instant, Reason)> = None;
        let mut offer = |at: Option<Instant>, reason: Reason| {
            if let Some(at) = at {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, reason));
                }
            }
        };
        offer(self.deadlines.first().map(|d| d.0), Reason::RequestDeadline);
        if self.close.is_none() {
            offer(self.retries.first().map(|r| r.0), Reason::Retry);
        }
        if !self.commits.in_flight && !self.commits.wanted {
            offer(
                self.commits
                    .dirty_since
                    .map(|t| t + self.config.ack_batch_timeout),
                Reason::AckFlush,
            );
        }
        offer(self.commits.retry_at, Reason::CommitRetry);
        offer(self.dead_letters.retry_at, Reason::DeadLetterRetry);
        offer(self.breaker.poll_timeout(), Reason::Breaker);
        offer(self.cache.poll_timeout(), Reason::CacheTtl);
        if let Some(g) = &self.group {
            if !g.heartbeat_in_flight && self.close.is_none() {
                offer(
                    g.next_heartbeat.filter(|_| g.is_member()),
                    Reason::Heartbeat,
                );
            }
            offer(
                g.expires_at().filter(|_| self.close.is_none()),
                Reason::SessionExpiry,
            );
            offer(g.retry_at, Reason::GroupRetry);
            // The drain deadline matters only while no commit is in flight (its answer or
            // deadline moves the revoke on) and not once closing (the close drains instead).
            if let GroupPhase::Revoking {
                deadline,
                committing: false,
            } = g.phase
            {
                if !self.commits.in_flight && self.close.is_none() {
                    offer(Some(deadline), Reason::Rebalance);
                }
            }
        }
        if self.close.is_none() {
            for p in &self.partitions {
                if !p.fetch_in_flight && !p.paused && !p.revoking {
                    offer(p.fetch_not_before, Reason::FetchBackoff);
                }
            }
        }
        if let Some(c) = self.close.filter(|c| c.phase != ClosePhase::Closed) {
            offer(Some(c.deadline), Reason::Close);
        }
        best
    }

    // --------------------------------------------------------------- queries

    /// Partitions of the subscribed topic this consumer owns.
    pub fn assigned_partitions(&self) -> Vec<u32> {
        self.partitions.iter().map(|p| p.id).collect()
    }

    /// Lag of every assigned partition.
    pub fn lag(&self, now: Instant) -> Vec<PartitionLag> {
        self.partitions
            .iter()
            .map(|p| {
                let position = p.window.end();
                let hw = p.high_watermark;
                let committed = p.committed;
                let from = committed.unwrap_or(p.window.base());
                PartitionLag {
                    partition: p.id,
                    high_watermark: hw,
                    committed,
                    position,
                    lag: hw.map_or(0, |h| h.saturating_sub(from)),
                    position_lag: hw.map_or(0, |h| h.saturating_sub(position)),
                    oldest_unsettled_age: p.window.iter().find_map(|(_, s)| match s {
                        Slot::Delivered { since, .. } => {
                            Some(now.saturating_duration_since(*since))
                        }
                        _ => None,
                    }),
                }
            })
            .collect()
    }

    /// A snapshot of every counter and gauge.
    pub fn metrics(&self) -> Metrics {
        let cache = self.cache.stats();
        Metrics {
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_evictions: cache.evictions + cache.expirations,
            breaker_transitions: self.breaker.transitions(),
            in_flight_requests: self.in_flight.len() as u64,
            in_flight_deliveries: self.unacked as u64,
            buffered: self.buffered as u64,
            cached: self.cache.len() as u64,
            cached_bytes: self.cache.bytes() as u64,
            ..self.metrics
        }
    }

    /// Health derived from the breaker and from progress.
    pub fn health(&self) -> Health {
        if self.close.is_some() {
            return Health::Closed;
        }
        match self.breaker.state() {
            BreakerState::Open => Health::Unhealthy,
            BreakerState::HalfOpen => Health::Degraded,
            _ if self.partitions.iter().any(|p| p.stalled) => Health::Degraded,
            _ => Health::Healthy,
        }
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The close phase, once `close` was called.
    pub fn close_phase(&self) -> Option<ClosePhase> {
        self.close.map(|c| c.phase)
    }

    /// True once closing finished: nothing more will be sent.
    pub fn is_closed(&self) -> bool {
        self.close_phase() == Some(ClosePhase::Closed)
    }

    /// A message this consumer still holds (buffered, awaiting a retry, or cached).
    pub fn find_message_by_offset(
        &self,
        now: Instant,
        partition: u32,
        offset: u64,
    ) -> Option<&Record> {
        let p = &self.partitions[self.index(partition)?];
        p.buffered
            .iter()
            .chain(p.redeliver.iter())
            .find(|(o, _)| *o == offset)
            .map(|(_, r)| r)
            .or_else(|| self.cache.peek(now, (partition, offset)))
    }

    /// The settle watermark (lowest unsettled offset) of a partition.
    pub fn settle_watermark(&self, partition: u32) -> Option<u64> {
        Some(self.partitions[self.index(partition)?].window.base())
    }

    /// The offset the broker last confirmed for a partition.
    pub fn committed_offset(&self, partition: u32) -> Option<u64> {
        self.partitions[self.index(partition)?].committed
    }

    // -------------------------------------------------------------- internals

    fn index(&self, partition: u32) -> Option<usize> {
        self.partitions
            .binary_search_by_key(&partition, |p| p.id)
            .ok()
    }

    fn check_open(&self) -> Result<(), UsageError> {
        match self.close {
            Some(_) => Err(UsageError::Closed),
            None => Ok(()),
        }
    }

    /// Validates that `tag` names a delivery outstanding with the application.
    fn outstanding(&self, tag: DeliveryTag) -> Result<usize, UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        let (partition, offset) = (tag.partition, tag.offset);
        let Some(idx) = self.index(partition) else {
            return Err(if tag.epoch != 0 && tag.epoch < self.next_epoch {
                UsageError::StaleDelivery { partition, offset }
            } else {
                UsageError::UnknownPartition(partition)
            });
        };
        let p = &self.partitions[idx];
        if tag.epoch != p.epoch {
            return Err(UsageError::StaleDelivery { partition, offset });
        }
        if offset >= p.window.end() {
            return Err(UsageError::UnknownDelivery { partition, offset });
        }
        match p.window.get(offset) {
            Some(Slot::Delivered { attempt, .. }) if *attempt == tag.attempt => Ok(idx),
            Some(Slot::Delivered { .. }) => Err(UsageError::StaleDelivery { partition, offset }),
            Some(Slot::Buffered) => Err(UsageError::UnknownDelivery { partition, offset }),
            _ => Err(UsageError::NotOutstanding { partition, offset }),
        }
    }

    fn set_paused(
        &mut self,
        now: Instant,
        partitions: &[u32],
        paused: bool,
    ) -> Result<(), UsageError> {
        self.check_open()?;
        let idxs = partitions
            .iter()
            .map(|&id| self.index(id).ok_or(UsageError::UnknownPartition(id)))
            .collect::<Result<Vec<_>, _>>()?;
        for idx in idxs {
            self.partitions[idx].paused = paused;
        }
        self.poll_work(now);
        Ok(())
    }

    /// Marks an offset settled and lets the watermark advance.
    fn settle(&mut self, now: Instant, idx: usize, offset: u64) {
        let id = self.partitions[idx].id;
        self.cache.remove((id, offset));
        let advanced = self.partitions[idx].window.settle(offset);
        if advanced > 0 {
            self.commits.advanced += advanced;
            self.commits.dirty_since.get_or_insert(now);
            if self.config.enable_auto_commit
                && self.commits.advanced >= self.config.ack_batch_size as u64
            {
                self.commits.wanted = true;
            }
        }
    }

    /// A message exhausted its retries or was rejected.
    fn poison(&mut self, now: Instant, idx: usize, offset: u64, attempt: u32, reason: String) {
        let id = self.partitions[idx].id;
        if self.config.dead_letter_queue.is_none() {
            warn!(topic = %self.config.topic, partition = id, offset, attempt, %reason, "discarding poison message: no dead-letter topic");
            self.metrics.discarded += 1;
            self.settle(now, idx, offset);
            self.events.push_back(Event::Discarded {
                partition: id,
                offset,
                attempts: attempt,
                reason,
            });
            return;
        }
        match self.cache.get(now, (id, offset)) {
            Some(record) => self.enqueue_dead_letter(idx, offset, attempt, reason, record),
            None => {
                // The cache lost it: fetch it again, then dead-letter it.
                let p = &mut self.partitions[idx];
                p.set(
                    offset,
                    Slot::Refetching {
                        attempt,
                        then: Then::DeadLetter,
                    },
                );
                p.refetch.push_back(offset);
                self.refetch_reasons.insert((id, offset), reason);
            }
        }
    }

    fn enqueue_dead_letter(
        &mut self,
        idx: usize,
        offset: u64,
        attempts: u32,
        reason: String,
        record: Record,
    ) {
        let p = &mut self.partitions[idx];
        p.set(offset, Slot::DeadLetter { attempt: attempts });
        self.dead_letters.queue.push_back(DeadLetterEntry {
            partition: p.id,
            epoch: p.epoch,
            offset,
            attempts,
            reason,
            record,
        });
    }

    /// A nacked message's retry is due: redeliver it from the cache, or fetch it again.
    fn retry_due(&mut self, now: Instant, partition: u32, offset: u64) {
        let Some(idx) = self.index(partition) else {
            return;
        };
        let Some(&Slot::Waiting { attempt }) = self.partitions[idx].window.get(offset) else {
            return;
        };
        let next = attempt + 1;
        match self.cache.get(now, (partition, offset)) {
            Some(record) => {
                let p = &mut self.partitions[idx];
                p.set(offset, Slot::Ready { attempt: next });
                p.redeliver.push_back((offset, record));
            }
            None => {
                trace!(topic = %self.config.topic, partition, offset, "retry: cache lost the message, fetching it again");
                let p = &mut self.partitions[idx];
                p.set(
                    offset,
                    Slot::Refetching {
                        attempt: next,
                        then: Then::Redeliver,
                    },
                );
                p.refetch.push_back(offset);
            }
        }
    }

    /// Forgets everything about a partition's current position and restarts it at `offset`
    /// under a new epoch.
    fn reset_partition(&mut self, idx: usize, offset: u64) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let p = &mut self.partitions[idx];
        let id = p.id;
        let outstanding = p
            .window
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Delivered { .. }))
            .count();
        self.unacked -= outstanding;
        self.buffered -= p.buffered.len();
        self.buffered_bytes -= p
            .buffered
            .iter()
            .map(|(_, r)| r.encoded_len())
            .sum::<usize>();
        p.epoch = epoch;
        p.window.reset(offset);
        p.buffered.clear();
        p.redeliver.clear();
        p.refetch.clear();
        p.fetch_in_flight = false;
        p.refetch_in_flight = false;
        p.fetch_not_before = None;
        p.byte_blocked = None;
        p.empty_fetches = 0;
        p.stalled = false;
        self.retries.retain(|&(_, pid, _)| pid != id);
        self.refetch_reasons.retain(|&(pid, _), _| pid != id);
        self.dead_letters.queue.retain(|e| e.partition != id);
        self.cache.remove_partition(id);
    }

    // ----------------------------------------------------------- responses

    /// Routes a response to its owner. `Err` is a failure for the breaker.
    fn dispatch(&mut self, now: Instant, owner: Owner, response: Response) -> Result<(), String> {
        match (owner, response) {
            (Owner::FetchOffset, Response::FetchOffset(r)) => self.on_fetch_offset(now, r),
            (Owner::ResolveLatest { partition, epoch }, Response::Fetch(r)) => {
                if r.error_code != error_code::NONE {
                    self.fail_owner(now, Owner::ResolveLatest { partition, epoch });
                    return Err(format!("fetch failed with error code {}", r.error_code));
                }
                if let Some(idx) = self.index(partition) {
                    let p = &mut self.partitions[idx];
                    if p.epoch == epoch && p.phase == PartitionPhase::Latest {
                        p.high_watermark = Some(r.high_watermark);
                        p.window.reset(r.high_watermark);
                        p.start = Some(r.high_watermark);
                        p.phase = PartitionPhase::Active;
                        p.fetch_in_flight = false;
                    }
                }
                Ok(())
            }
            (
                Owner::Fetch {
                    partition,
                    epoch,
                    offset,
                },
                Response::Fetch(r),
            ) => self.on_fetch(now, partition, epoch, offset, r),
            (
                Owner::Refetch {
                    partition,
                    epoch,
                    offset,
                },
                Response::Fetch(r),
            ) => self.on_refetch(now, partition, epoch, offset, r),
            (Owner::Commit { offsets, ticket }, Response::CommitOffset(r)) => {
                self.on_commit(now, offsets, ticket, r.error_code)
            }
            (Owner::DeadLetter { batch }, Response::Produce(r)) => {
                if r.error_code != error_code::NONE {
                    let error = format!(
                        "dead-letter produce failed with error code {}: {}",
                        r.error_code,
                        r.error_message.unwrap_or_default()
                    );
                    self.fail_owner(now, Owner::DeadLetter { batch });
                    return Err(error);
                }
                self.on_dead_lettered(now, batch);
                Ok(())
            }
            (Owner::FindCoordinator, Response::FindCoordinator(r)) => {
                self.on_find_coordinator(now, r.error_code)
            }
            (Owner::Join, Response::JoinGroup(r)) => self.on_join(now, r),
            (Owner::Heartbeat { generation }, Response::ConsumerHeartbeat(r)) => {
                self.on_heartbeat(now, generation, r.error_code);
                Ok(())
            }
            (Owner::Leave, Response::LeaveGroup(_)) => {
                // 16 (unknown group) and 0 both mean we are not a member any more.
                self.left();
                Ok(())
            }
            (owner, response) => {
                let error = format!("unexpected {:?} response", response.kind());
                self.fail_owner(now, owner);
                Err(error)
            }
        }
    }

    fn on_fetch_offset(&mut self, now: Instant, r: FetchOffsetResponse) -> Result<(), String> {
        // 16: the group has no state on the broker yet, so nothing was committed.
        if r.error_code != error_code::NONE && r.error_code != error_code::UNKNOWN_GROUP {
            self.fail_owner(now, Owner::FetchOffset);
            return Err(format!(
                "fetch offset failed with error code {}",
                r.error_code
            ));
        }
        let start = self.config.start_position;
        for idx in 0..self.partitions.len() {
            let p = &mut self.partitions[idx];
            if p.phase != PartitionPhase::Starting {
                continue;
            }
            let tp = TopicPartition::new(self.config.topic.clone(), p.id);
            p.fetch_in_flight = false;
            let known = self.known_positions.get(&p.id).copied();
            if let Some(&committed) = r.offsets.get(&tp) {
                // Everything below this member's own settle watermark was processed, even if
                // its commit was rejected in a rebalance: never go back behind it.
                let position = known.map_or(committed, |k| k.max(committed));
                p.committed = Some(committed);
                p.window.reset(position);
                p.phase = PartitionPhase::Active;
                if position != committed {
                    self.commits.advanced += 1;
                    self.commits.dirty_since.get_or_insert(now);
                }
                continue;
            }
            // The broker lost its commits (a restart) but this member was here: keep its place.
            if let Some(known) = known {
                // No `start` baseline: the position is committed again with the next batch.
                p.window.reset(known);
                p.phase = PartitionPhase::Active;
                self.commits.advanced += 1;
                self.commits.dirty_since.get_or_insert(now);
                continue;
            }
            match start {
                StartPosition::Earliest => {
                    p.window.reset(0);
                    p.start = Some(0);
                    p.phase = PartitionPhase::Active;
                }
                StartPosition::Offset(o) => {
                    p.window.reset(o);
                    p.start = Some(o);
                    p.phase = PartitionPhase::Active;
                }
                // Resolved by a one-record fetch that reports the high watermark.
                _ => p.phase = PartitionPhase::Latest,
            }
        }
        Ok(())
    }

    fn on_fetch(
        &mut self,
        now: Instant,
        partition: u32,
        epoch: u64,
        offset: u64,
        r: FetchResponse,
    ) -> Result<(), String> {
        let Some(idx) = self.index(partition) else {
            return Ok(());
        };
        if self.partitions[idx].epoch != epoch {
            trace!(
                partition,
                "ignoring a fetch from before a seek or reassignment"
            );
            return Ok(());
        }
        let p = &mut self.partitions[idx];
        p.fetch_in_flight = false;
        if r.error_code != error_code::NONE {
            self.fail_owner(
                now,
                Owner::Fetch {
                    partition,
                    epoch,
                    offset,
                },
            );
            return Err(format!("fetch failed with error code {}", r.error_code));
        }
        p.high_watermark = Some(r.high_watermark);
        p.fetch_failures = 0;
        if p.window.end() != offset || self.close.is_some() {
            return Ok(());
        }
        if r.records.is_empty() {
            // No long-poll on the broker: back off before asking again.
            let min = self.config.empty_fetch_backoff_min;
            p.fetch_not_before = Some(
                now + backoff::ceiling(
                    min,
                    self.config.empty_fetch_backoff_max,
                    p.empty_fetches + 1,
                ),
            );
            p.empty_fetches = p.empty_fetches.saturating_add(1);
            return Ok(());
        }
        p.empty_fetches = 0;
        let span_room = self
            .config
            .max_unsettled_per_partition
            .saturating_sub(p.window.span());
        let mut taken = 0u64;
        let (mut first_bytes, mut taken_bytes) = (0, 0);
        for record in r.records {
            let bytes = record.encoded_len();
            if taken == 0 {
                first_bytes = bytes; // only the first record is looked at while none is taken
            }
            let over_bytes =
                self.buffered_bytes + bytes > self.config.prefetch_bytes && self.buffered > 0;
            if taken >= span_room || self.buffered >= self.config.fetch_size || over_bytes {
                break; // the rest is fetched again later
            }
            let Some(next) = offset.checked_add(taken) else {
                break;
            };
            p.window.push(Slot::Buffered);
            p.buffered.push_back((next, record));
            self.buffered += 1;
            self.buffered_bytes += bytes;
            taken_bytes += bytes;
            taken += 1;
        }
        if taken == 0 {
            // Nothing fitted: wait for deliveries to free room rather than asking again now.
            p.byte_blocked = Some(first_bytes);
        } else {
            // The record size estimate that sizes the next fetches.
            let average = taken_bytes / taken as usize;
            self.record_bytes = if self.metrics.received == 0 {
                average
            } else {
                (3 * self.record_bytes + average) / 4
            }
            .max(1);
        }
        self.metrics.received += taken;
        Ok(())
    }

    fn on_refetch(
        &mut self,
        now: Instant,
        partition: u32,
        epoch: u64,
        offset: u64,
        r: FetchResponse,
    ) -> Result<(), String> {
        let Some(idx) = self.index(partition) else {
            return Ok(());
        };
        if self.partitions[idx].epoch != epoch {
            return Ok(());
        }
        self.partitions[idx].refetch_in_flight = false;
        if r.error_code != error_code::NONE {
            self.fail_owner(
                now,
                Owner::Refetch {
                    partition,
                    epoch,
                    offset,
                },
            );
            return Err(format!("fetch failed with error code {}", r.error_code));
        }
        let Some(&Slot::Refetching { attempt, then }) = self.partitions[idx].window.get(offset)
        else {
            return Ok(());
        };
        let Some(record) = r.records.into_iter().next() else {
            // The broker no longer has it: say so and settle rather than stall forever.
            let reason = "message no longer on the broker".to_owned();
            warn!(topic = %self.config.topic, partition, offset, attempt, "{reason}");
            self.refetch_reasons.remove(&(partition, offset));
            self.metrics.discarded += 1;
            self.settle(now, idx, offset);
            self.events.push_back(Event::Discarded {
                partition,
                offset,
                attempts: attempt,
                reason,
            });
            return Ok(());
        };
        match then {
            Then::Redeliver => {
                let p = &mut self.partitions[idx];
                p.set(offset, Slot::Ready { attempt });
                p.redeliver.push_back((offset, record));
            }
            Then::DeadLetter => {
                let reason = self
                    .refetch_reasons
                    .remove(&(partition, offset))
                    .unwrap_or_default();
                self.enqueue_dead_letter(idx, offset, attempt, reason, record);
            }
        }
        Ok(())
    }

    fn on_commit(
        &mut self,
        now: Instant,
        offsets: Vec<(u32, u64, u64)>,
        ticket: u64,
        code: u32,
    ) -> Result<(), String> {
        self.commits.in_flight = false;
        for &(id, epoch, _) in &offsets {
            if let Some(idx) = self.index(id) {
                let p = &mut self.partitions[idx];
                if p.epoch == epoch || p.commit_in_flight.is_some() {
                    p.commit_in_flight = None;
                }
            }
        }
        if code == error_code::UNKNOWN_GROUP && self.group.is_none() {
            // Manual assignment: a restarted broker forgets groups until a member joins again.
            // Retried with backoff; group state, not broker health, so the breaker ignores it.
            debug!(
                code,
                ticket, "commit to a group the broker does not know; retrying"
            );
            self.fail_owner(now, Owner::Commit { offsets, ticket });
            return Ok(());
        }
        if code == error_code::UNKNOWN_GROUP || code == error_code::ILLEGAL_GENERATION {
            // The group moved on: reported, never retried under this (or a newer) generation.
            // Group state, not broker health, so the breaker does not count it.
            warn!(code, ticket, "commit rejected by the group coordinator");
            self.commits.failures = self.commits.failures.saturating_add(1);
            self.metrics.commits_failed += 1;
            self.commits.advanced += std::mem::take(&mut self.commits.advanced_in_flight);
            self.commits.wanted = false;
            self.commits.dirty_since = None;
            self.events.push_back(Event::CommitFailed {
                ticket,
                error: format!("commit rejected with error code {code}"),
            });
            self.note_commit_answered(now, true);
            if code == error_code::ILLEGAL_GENERATION {
                self.commits.fenced_generation = self.group.as_ref().map(|g| g.generation);
                self.start_rebalance(now, false);
            }
            return Ok(());
        }
        if code != error_code::NONE {
            self.fail_owner(now, Owner::Commit { offsets, ticket });
            return Err(format!("commit failed with error code {code}"));
        }
        let mut confirmed = Vec::with_capacity(offsets.len());
        for (id, _, offset) in offsets {
            // What the broker holds now, even if a seek since then moved the partition on:
            // the next commit compares against it.
            if let Some(idx) = self.index(id) {
                self.partitions[idx].committed = Some(offset);
            }
            confirmed.push((id, offset));
        }
        self.metrics.committed_settlements += self.commits.advanced_in_flight;
        self.metrics.max_batch = self.metrics.max_batch.max(self.commits.advanced_in_flight);
        self.commits.advanced_in_flight = 0;
        self.commits.failures = 0;
        debug!(ticket, ?confirmed, "committed");
        self.events.push_back(Event::Committed {
            ticket,
            offsets: confirmed,
        });
        self.note_commit_answered(now, true);
        // A newer watermark or a newer ticket may be waiting.
        if self.commits.requested > ticket || self.dirty() {
            self.commits.wanted |= self.commits.requested > ticket
                || (self.config.enable_auto_commit
                    && self.commits.advanced >= self.config.ack_batch_size as u64)
                || self.close.is_some();
        }
        Ok(())
    }

    fn on_dead_lettered(&mut self, now: Instant, batch: Vec<DeadLetterEntry>) {
        self.dead_letters.in_flight = false;
        self.dead_letters.failures = 0;
        for e in batch {
            self.metrics.dead_lettered += 1;
            debug!(topic = %self.config.topic, partition = e.partition, offset = e.offset, attempt = e.attempts, "dead-lettered");
            if let Some(idx) = self.index(e.partition) {
                if self.partitions[idx].epoch == e.epoch {
                    self.settle(now, idx, e.offset);
                }
            }
            self.events.push_back(Event::DeadLettered {
                partition: e.partition,
                offset: e.offset,
                attempts: e.attempts,
            });
        }
    }

    /// A request failed (transport, deadline, error code): put its work back, with backoff.
    fn fail_owner(&mut self, now: Instant, owner: Owner) {
        match owner {
            Owner::FindCoordinator | Owner::Join => {
                if let Some(g) = &mut self.group {
                    g.request_in_flight = false;
                    g.failures = g.failures.saturating_add(1);
                }
                let failures = self.group.as_ref().map_or(1, |g| g.failures);
                let delay = self.fetch_retry_delay(failures);
                if let Some(g) = &mut self.group {
                    g.retry_at = Some(now + delay);
                }
            }
            Owner::Heartbeat { generation } => {
                if let Some(g) = self.group.as_mut().filter(|g| g.generation == generation) {
                    g.heartbeat_in_flight = false;
                    g.heartbeat_failed(now);
                }
            }
            Owner::Leave => self.left(),
            Owner::FetchOffset | Owner::ResolveLatest { .. } => {
                let phase = match owner {
                    Owner::FetchOffset => PartitionPhase::Starting,
                    _ => PartitionPhase::Latest,
                };
                for idx in 0..self.partitions.len() {
                    if self.partitions[idx].phase == phase {
                        let failures = self.partitions[idx].fetch_failures.saturating_add(1);
                        let delay = self.fetch_retry_delay(failures);
                        let p = &mut self.partitions[idx];
                        p.fetch_in_flight = false;
                        p.fetch_failures = failures;
                        p.fetch_not_before = Some(now + delay);
                    }
                }
            }
            Owner::Fetch {
                partition, epoch, ..
            } => {
                if let Some(idx) = self.index(partition) {
                    let delay_for = self.partitions[idx].fetch_failures.saturating_add(1);
                    let delay = self.fetch_retry_delay(delay_for);
                    let p = &mut self.partitions[idx];
                    if p.epoch == epoch {
                        p.fetch_in_flight = false;
                        p.fetch_failures = delay_for;
                        p.fetch_not_before = Some(now + delay);
                    }
                }
            }
            Owner::Refetch {
                partition,
                epoch,
                offset,
            } => {
                if let Some(idx) = self.index(partition) {
                    let p = &mut self.partitions[idx];
                    if p.epoch == epoch {
                        p.refetch_in_flight = false;
                        if matches!(p.window.get(offset), Some(Slot::Refetching { .. })) {
                            p.refetch.push_front(offset);
                        }
                        p.fetch_failures = p.fetch_failures.saturating_add(1);
                        let delay = self.fetch_retry_delay(self.partitions[idx].fetch_failures);
                        self.partitions[idx].fetch_not_before = Some(now + delay);
                    }
                }
            }
            Owner::Commit { ticket, offsets } => {
                // The broker may or may not have stored it (even if a seek since then moved
                // the partition on): forget what we believed it holds, so the next commit
                // states the watermark again whatever it is.
                for (id, _, _) in offsets {
                    if let Some(idx) = self.index(id) {
                        let p = &mut self.partitions[idx];
                        p.committed = None;
                        p.start = None;
                    }
                }
                self.commits.in_flight = false;
                self.commits.failures = self.commits.failures.saturating_add(1);
                self.metrics.commits_failed += 1;
                for p in &mut self.partitions {
                    p.commit_in_flight = None;
                }
                // Settled offsets stay settled; the next commit carries them again.
                self.commits.advanced += std::mem::take(&mut self.commits.advanced_in_flight);
                self.commits.wanted = self.dirty() || self.commits.requested > ticket;
                if self.commits.wanted {
                    self.commits.retry_at =
                        Some(now + self.fetch_retry_delay(self.commits.failures));
                }
                // Retried (with backoff) until the close deadline, not given up on.
                self.note_commit_answered(now, false);
                self.events.push_back(Event::CommitFailed {
                    ticket,
                    error: "the broker did not confirm the commit".to_owned(),
                });
            }
            Owner::DeadLetter { batch } => {
                self.dead_letters.in_flight = false;
                self.dead_letters.failures = self.dead_letters.failures.saturating_add(1);
                let delay = self.fetch_retry_delay(self.dead_letters.failures);
                self.dead_letters.retry_at = Some(now + delay);
                for e in batch.into_iter().rev() {
                    let live = self
                        .index(e.partition)
                        .is_some_and(|idx| self.partitions[idx].epoch == e.epoch);
                    if live {
                        self.dead_letters.queue.push_front(e);
                    }
                }
            }
        }
    }

    fn fetch_retry_delay(&mut self, failures: u32) -> Duration {
        backoff::full_jitter(
            &mut self.rng,
            self.config.retry_backoff_base,
            self.config.retry_backoff_max,
            failures.min(MAX_FETCH_FAILURE_SHIFT),
        )
    }

    fn dirty(&self) -> bool {
        self.partitions.iter().any(|p| p.commit_target().is_some())
    }

    // ---------------------------------------------------------------- work

    /// Sends whatever is due and allowed, delivers what credit allows, and reports breaker
    /// transitions. Runs at the end of every input.
    fn poll_work(&mut self, now: Instant) {
        // Deliver first: it frees prefetch room, which the fetches below then refill.
        self.deliver(now);
        self.send_work(now);
        if let Some(c) = self.close {
            if c.phase != ClosePhase::Closed {
                self.advance_close(now, false);
            }
        }
        while let Some((from, to)) = self.breaker.poll_transition() {
            debug!(?from, ?to, "circuit breaker");
            self.events.push_back(Event::BreakerChanged { from, to });
        }
    }

    fn send_work(&mut self, now: Instant) {
        // Closed is final: nothing more goes on the wire, not even a commit still wanted.
        if self.is_closed() || !self.drive_group(now) {
            return;
        }
        // Commits first: in half-open they are the most valuable probes.
        if self.commits.wanted
            && !self.commits.in_flight
            && self.commits.retry_at.is_none()
            && !self.commits_fenced()
            && !self.past_final_commit()
            && !self.send_commit(now)
        {
            return;
        }
        let dlq_due = !self.dead_letters.in_flight
            && self.dead_letters.retry_at.is_none()
            && !self.dead_letters.queue.is_empty();
        if dlq_due && !self.send_dead_letters(now) {
            return;
        }
        let fetch_offset_due = self.close.is_none()
            && self.partitions.iter().any(|p| {
                p.phase == PartitionPhase::Starting
                    && !p.fetch_in_flight
                    && p.fetch_not_before.is_none()
            });
        if fetch_offset_due {
            let Some(permit) = self.breaker.try_acquire() else {
                return;
            };
            let topic_partitions = self
                .partitions
                .iter_mut()
                .filter(|p| p.phase == PartitionPhase::Starting)
                .map(|p| {
                    p.fetch_in_flight = true;
                    TopicPartition::new(self.config.topic.clone(), p.id)
                })
                .collect();
            let request = FetchOffsetRequest {
                group_id: self.config.consumer_group.clone(),
                topic_partitions,
            };
            self.send(now, permit, Owner::FetchOffset, request.into());
        }
        if self.close.is_some() {
            return;
        }
        // Every fetch in flight reserves a slot of the prefetch buffer, so concurrent fetches
        // of several partitions never bring back more than the buffer takes (which would be
        // dropped and fetched again). When slots are scarce, partitions take turns.
        let mut reserved = self.partitions.iter().filter(|p| p.fetch_in_flight).count();
        let n = self.partitions.len();
        for k in 0..n {
            let idx = (self.fetch_cursor + k) % n;
            if !self.send_fetches(now, idx, &mut reserved) {
                return;
            }
        }
    }

    /// Sends the partition's refetch or fetch if due; a fetch sent takes one of the
    /// `reserved` slots. False when the breaker said no.
    fn send_fetches(&mut self, now: Instant, idx: usize, reserved: &mut usize) -> bool {
        let p = &self.partitions[idx];
        let (id, epoch) = (p.id, p.epoch);
        if p.fetch_not_before.is_some() {
            return true;
        }
        if !p.refetch_in_flight {
            if let Some(&offset) = p.refetch.front() {
                let Some(permit) = self.breaker.try_acquire() else {
                    return false;
                };
                let p = &mut self.partitions[idx];
                p.refetch.pop_front();
                p.refetch_in_flight = true;
                self.metrics.refetches += 1;
                let request = self.fetch_request(offset, 1);
                self.send(
                    now,
                    permit,
                    Owner::Refetch {
                        partition: id,
                        epoch,
                        offset,
                    },
                    request,
                );
            }
        }
        let p = &self.partitions[idx];
        if p.fetch_in_flight || p.paused || p.revoking {
            return true;
        }
        if p.phase == PartitionPhase::Starting {
            return true; // FetchOffset first
        }
        if p.phase == PartitionPhase::Latest {
            let Some(permit) = self.breaker.try_acquire() else {
                return false;
            };
            self.partitions[idx].fetch_in_flight = true;
            let request = self.fetch_request(0, 1);
            self.send(
                now,
                permit,
                Owner::ResolveLatest {
                    partition: id,
                    epoch,
                },
                request,
            );
            return true;
        }
        let flow_full = p.window.span() >= self.config.max_unsettled_per_partition
            || self.buffered + *reserved >= self.config.fetch_size
            || self.buffered_bytes >= self.config.prefetch_bytes
            || p.byte_blocked.is_some_and(|need| {
                self.buffered > 0 && self.buffered_bytes + need > self.config.prefetch_bytes
            });
        if flow_full {
            return true;
        }
        let Some(permit) = self.breaker.try_acquire() else {
            return false;
        };
        let offset = p.window.end();
        let room = self.config.prefetch_bytes - self.buffered_bytes;
        // Ask for about what the buffer can take (a quarter and one record of slack for
        // sizes that vary), not `fetch_max_bytes` of records that would be dropped.
        let slots = self
            .config
            .fetch_size
            .saturating_sub(self.buffered + *reserved)
            .max(1);
        let fits = slots.saturating_mul(self.record_bytes);
        let want = fits
            .saturating_add(fits / 4)
            .saturating_add(self.record_bytes);
        let max_bytes = u32::try_from(room.min(want))
            .unwrap_or(u32::MAX)
            .min(self.config.fetch_max_bytes)
            .max(1);
        self.partitions[idx].fetch_in_flight = true;
        self.partitions[idx].byte_blocked = None;
        *reserved += 1;
        self.fetch_cursor = idx + 1;
        self.metrics.fetches += 1;
        let request = self.fetch_request(offset, max_bytes);
        self.send(
            now,
            permit,
            Owner::Fetch {
                partition: id,
                epoch,
                offset,
            },
            request,
        );
        true
    }

    fn fetch_request(&self, offset: u64, max_bytes: u32) -> Request {
        FetchRequest {
            topic: self.config.topic.clone(),
            partition_id: 0,
            fetch_offset: offset,
            max_bytes,
            timeout_ms: u32::try_from(self.config.fetch_timeout.as_millis()).unwrap_or(u32::MAX),
        }
        .into()
    }

    /// Sends one commit of every partition whose watermark moved, split to fit one frame.
    /// False when the breaker said no.
    fn send_commit(&mut self, now: Instant) -> bool {
        let ticket = self.commits.requested;
        let targets: Vec<(usize, u64)> = self
            .partitions
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.commit_target().map(|o| (i, o)))
            .collect();
        if targets.is_empty() {
            self.commits.wanted = false;
            self.commits.dirty_since = None;
            self.commits.advanced = 0;
            if ticket > 0
                && self
                    .in_flight
                    .values()
                    .all(|f| !matches!(f.owner, Owner::Commit { .. }))
            {
                // Everything settled is already committed.
                self.events.push_back(Event::Committed {
                    ticket,
                    offsets: Vec::new(),
                });
                self.commits.requested = 0;
            }
            return true;
        }
        let Some(permit) = self.breaker.try_acquire() else {
            return false;
        };
        let member = self.group.as_ref().map_or("", |g| g.member_id.as_str());
        let base = frame::commit_base_len(&self.config.consumer_group, member);
        let mut size = base;
        let mut offsets = BTreeMap::new();
        let mut owned = Vec::new();
        for (idx, offset) in targets {
            let entry = frame::commit_entry_len(&self.config.topic);
            if size + entry > MAX_REQUEST_FRAME && !offsets.is_empty() {
                break; // the rest goes in the next commit
            }
            size += entry;
            let p = &mut self.partitions[idx];
            p.commit_in_flight = Some(offset);
            offsets.insert(TopicPartition::new(self.config.topic.clone(), p.id), offset);
            owned.push((p.id, p.epoch, offset));
        }
        let all_sent = self.partitions.iter().all(|p| p.commit_target().is_none());
        self.commits.in_flight = true;
        self.commits.wanted = !all_sent;
        self.commits.dirty_since = None;
        self.commits.advanced_in_flight = std::mem::take(&mut self.commits.advanced);
        self.metrics.commits_sent += 1;
        let (member_id, generation_id) = match &self.group {
            Some(g) => (g.member_id.clone(), g.generation),
            None => (String::new(), self.config.manual_generation),
        };
        let request = CommitOffsetRequest {
            group_id: self.config.consumer_group.clone(),
            member_id,
            generation_id,
            offsets,
        };
        self.send(
            now,
            permit,
            Owner::Commit {
                offsets: owned,
                ticket,
            },
            request.into(),
        );
        true
    }

    /// Sends the next batch of dead letters (one produce in flight). False when the breaker said no.
    fn send_dead_letters(&mut self, now: Instant) -> bool {
        let Some(topic) = self.config.dead_letter_queue.clone() else {
            return true;
        };
        let base = frame::produce_base_len(&topic);
        // Too large for any request: stall the partition there, visibly.
        while let Some(front) = self.dead_letters.queue.front() {
            let size = base + self.dead_letter_record(front).encoded_len();
            if size <= MAX_REQUEST_FRAME {
                break;
            }
            let e = self.dead_letters.queue.pop_front().expect("front exists");
            warn!(topic = %self.config.topic, partition = e.partition, offset = e.offset, size, "poison message too large for a dead-letter request; partition stalled");
            if let Some(idx) = self.index(e.partition) {
                let p = &mut self.partitions[idx];
                p.set(e.offset, Slot::Stuck);
                p.stalled = true;
            }
            self.events.push_back(Event::Stalled {
                partition: e.partition,
                offset: e.offset,
                reason: StallReason::DeadLetterTooLarge { size },
            });
        }
        if self.dead_letters.queue.is_empty() {
            return true;
        }
        let Some(permit) = self.breaker.try_acquire() else {
            return false;
        };
        let mut size = base;
        let mut batch = Vec::new();
        let mut records = Vec::new();
        while let Some(front) = self.dead_letters.queue.front() {
            let record = self.dead_letter_record(front);
            let len = record.encoded_len();
            if size + len > MAX_REQUEST_FRAME {
                break;
            }
            size += len;
            records.push(record);
            batch.push(self.dead_letters.queue.pop_front().expect("front exists"));
        }
        self.dead_letters.in_flight = true;
        let request = ProduceRequest {
            topic,
            partition_id: self.config.dead_letter_partition,
            records,
            acks: AcknowledgmentLevel::Leader,
            timeout_ms: u32::try_from(self.config.request_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        self.send(now, permit, Owner::DeadLetter { batch }, request.into());
        true
    }

    fn dead_letter_record(&self, e: &DeadLetterEntry) -> Record {
        use dead_letter_headers::*;
        let mut record = e.record.clone();
        let text = |s: String| Bytes::from(s.into_bytes());
        record.headers.extend([
            Header::new(ORIGINAL_TOPIC, text(self.config.topic.clone())),
            Header::new(ORIGINAL_PARTITION, text(e.partition.to_string())),
            Header::new(ORIGINAL_OFFSET, text(e.offset.to_string())),
            Header::new(ATTEMPTS, text(e.attempts.to_string())),
            Header::new(LAST_REASON, text(e.reason.clone())),
            Header::new(CONSUMER_GROUP, text(self.config.consumer_group.clone())),
        ]);
        record
    }

    fn send(&mut self, now: Instant, permit: Permit, owner: Owner, mut request: Request) {
        if let Request::Fetch(f) = &mut request {
            f.partition_id = match &owner {
                Owner::Fetch { partition, .. }
                | Owner::Refetch { partition, .. }
                | Owner::ResolveLatest { partition, .. } => *partition,
                _ => f.partition_id,
            };
        }
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let deadline = now + self.config.request_timeout;
        trace!(request = id.0, kind = ?request.kind(), "transmit");
        self.deadlines.insert((deadline, id));
        self.in_flight.insert(
            id,
            InFlight {
                permit,
                deadline,
                owner,
            },
        );
        self.transmits.push_back(Transmit { id, request });
    }

    /// Hands out messages while the application has credit: due retries first, then fresh
    /// messages, round-robin over unpaused partitions.
    fn deliver(&mut self, now: Instant) {
        if self.close.is_some() || self.partitions.is_empty() {
            return;
        }
        let n = self.partitions.len();
        let mut idle = 0;
        while self.unacked < self.config.max_unacked && idle < n {
            let idx = self.cursor % n;
            self.cursor = self.cursor.wrapping_add(1);
            let p = &mut self.partitions[idx];
            if p.paused || p.revoking {
                idle += 1;
                continue;
            }
            let (offset, record, attempt) = if let Some((offset, record)) = p.redeliver.pop_front()
            {
                let Some(Slot::Ready { attempt }) = p.window.get(offset).copied() else {
                    continue;
                };
                self.metrics.retried += 1;
                (offset, record, attempt)
            } else if let Some((offset, record)) = p.buffered.pop_front() {
                self.buffered -= 1;
                self.buffered_bytes -= record.encoded_len();
                (offset, record, 1)
            } else {
                idle += 1;
                continue;
            };
            idle = 0;
            let p = &mut self.partitions[idx];
            p.set(
                offset,
                Slot::Delivered {
                    attempt,
                    since: now,
                },
            );
            let tag = DeliveryTag {
                partition: p.id,
                offset,
                epoch: p.epoch,
                attempt,
            };
            self.cache.insert(now, (p.id, offset), record.clone());
            self.unacked += 1;
            self.metrics.delivered += 1;
            trace!(topic = %self.config.topic, partition = tag.partition, offset, attempt, "deliver");
            self.events
                .push_back(Event::Deliver(Delivery { tag, record }));
        }
    }

    /// Moves close through its phases; `expired` when the current phase's deadline passed.
    fn advance_close(&mut self, now: Instant, mut expired: bool) {
        while let Some(c) = self.close {
            let next = match c.phase {
                ClosePhase::Draining if self.unacked == 0 || expired => {
                    ClosePhase::FlushingDeadLetters
                }
                ClosePhase::FlushingDeadLetters
                    if (self.dead_letters.queue.is_empty() && !self.dead_letters.in_flight)
                        || expired =>
                {
                    self.commits.wanted = true;
                    self.commits.retry_at = None;
                    ClosePhase::FinalCommit
                }
                ClosePhase::FinalCommit
                    if !self.commits.in_flight
                        && (!self.dirty() || self.commits.answered_in_close) =>
                {
                    self.leave_or_close()
                }
                ClosePhase::FinalCommit if !self.commits.in_flight && self.commits_fenced() => {
                    self.events.push_back(Event::CommitFailed {
                        ticket: self.commits.requested,
                        error: "the coordinator refused this generation's commits".to_owned(),
                    });
                    self.leave_or_close()
                }
                ClosePhase::FinalCommit if expired => {
                    self.events.push_back(Event::CommitFailed {
                        ticket: self.commits.requested,
                        error: "closed before the final commit was confirmed".to_owned(),
                    });
                    self.leave_or_close()
                }
                ClosePhase::LeavingGroup
                    if expired
                        || self
                            .group
                            .as_ref()
                            .is_none_or(|g| g.phase == GroupPhase::Left) =>
                {
                    ClosePhase::Closed
                }
                _ => return,
            };
            debug!(phase = ?next, "close phase");
            self.close = Some(Close {
                phase: next,
                deadline: now + self.config.drain_timeout,
            });
            self.events.push_back(Event::Closing(next));
            match next {
                ClosePhase::FinalCommit | ClosePhase::LeavingGroup => self.send_work(now),
                ClosePhase::Closed => {
                    self.events.push_back(Event::Closed);
                    return;
                }
                _ => {}
            }
            // The next phase has a deadline of its own.
            expired = false;
        }
    }
}

impl ConsumerMachine {
    fn topic_partitions(&self, ids: impl Iterator<Item = u32>) -> Vec<TopicPartition> {
        ids.map(|id| TopicPartition::new(self.config.topic.clone(), id))
            .collect()
    }

    /// A commit was answered (confirmed, rejected or failed).
    /// Whether the close is past its final commit: leaving the group, or closed. Nothing is
    /// committed after the LeaveGroup.
    fn past_final_commit(&self) -> bool {
        matches!(
            self.close_phase(),
            Some(ClosePhase::LeavingGroup | ClosePhase::Closed)
        )
    }

    /// Whether the coordinator refused commits under the current generation.
    fn commits_fenced(&self) -> bool {
        let generation = self.group.as_ref().map(|g| g.generation);
        generation.is_some() && generation == self.commits.fenced_generation
    }

    /// A commit was answered; `final_answer` unless it failed in a way worth retrying.
    fn note_commit_answered(&mut self, now: Instant, final_answer: bool) {
        if final_answer && self.close_phase() == Some(ClosePhase::FinalCommit) {
            self.commits.answered_in_close = true;
        }
        let revoking = matches!(
            self.group.as_ref().map(|g| g.phase),
            Some(GroupPhase::Revoking {
                committing: true,
                ..
            })
        );
        if revoking {
            self.finish_revoke(now);
        }
    }

    /// Sends what the group session needs: heartbeats (also while revoking), the revoke
    /// commit, FindCoordinator, JoinGroup, LeaveGroup. False when the breaker said no.
    fn drive_group(&mut self, now: Instant) -> bool {
        let closing = self.close.is_some();
        let Some(g) = &self.group else { return true };
        let heartbeat_due = g.is_member()
            && !closing
            && !g.heartbeat_in_flight
            && g.next_heartbeat.is_some_and(|t| t <= now);
        if heartbeat_due {
            let Some(permit) = self.breaker.try_acquire() else {
                if let Some(g) = &mut self.group {
                    g.heartbeat_failed(now);
                }
                return false;
            };
            let Some(g) = &mut self.group else {
                return true;
            };
            g.heartbeat_in_flight = true;
            g.next_heartbeat = None;
            let generation = g.generation;
            let request = ConsumerHeartbeatRequest {
                group_id: self.config.consumer_group.clone(),
                member_id: g.member_id.clone(),
                generation_id: generation,
            };
            self.send(now, permit, Owner::Heartbeat { generation }, request.into());
        }
        if !closing && !self.drive_revoke(now) {
            return false;
        }
        let Some(g) = &self.group else { return true };
        if g.request_in_flight || g.retry_at.is_some() {
            return true;
        }
        let group_id = self.config.consumer_group.clone();
        let (owner, request): (Owner, Request) = match g.phase {
            GroupPhase::FindCoordinator if !closing => (
                Owner::FindCoordinator,
                FindCoordinatorRequest { group_id }.into(),
            ),
            GroupPhase::Join if !closing => (
                Owner::Join,
                JoinGroupRequest {
                    group_id,
                    member_id: g.member_id.clone(),
                    session_timeout_ms: u32::try_from(self.config.session_timeout.as_millis())
                        .unwrap_or(u32::MAX),
                    topics: vec![self.config.topic.clone()],
                }
                .into(),
            ),
            GroupPhase::Leaving => (
                Owner::Leave,
                LeaveGroupRequest {
                    group_id,
                    member_id: g.member_id.clone(),
                }
                .into(),
            ),
            _ => return true,
        };
        let Some(permit) = self.breaker.try_acquire() else {
            return false;
        };
        if let Some(g) = &mut self.group {
            g.request_in_flight = true;
        }
        self.send(now, permit, owner, request);
        true
    }

    /// Revoking: once drained (or at the deadline), one commit under the generation that
    /// owned the partitions, then let them go. False when the breaker said no.
    fn drive_revoke(&mut self, now: Instant) -> bool {
        let Some(GroupPhase::Revoking {
            deadline,
            committing: false,
        }) = self.group.as_ref().map(|g| g.phase)
        else {
            return true;
        };
        let drained =
            self.unacked == 0 && self.dead_letters.queue.is_empty() && !self.dead_letters.in_flight;
        if !(drained || now >= deadline) || self.commits.in_flight {
            return true;
        }
        if !self.dirty() || self.commits_fenced() {
            // Fenced: the coordinator refuses this generation's commits; the next owner
            // starts from the last commit (at-least-once).
            self.finish_revoke(now);
            return true;
        }
        if let Some(g) = &mut self.group {
            g.phase = GroupPhase::Revoking {
                deadline,
                committing: true,
            };
        }
        self.commits.retry_at = None;
        if self.send_commit(now) {
            return true;
        }
        self.events.push_back(Event::CommitFailed {
            ticket: self.commits.requested,
            error: "circuit open during a rebalance: settled offsets not committed".to_owned(),
        });
        self.finish_revoke(now);
        false
    }

    /// Eager rebalance: stop fetching and delivering every partition, drain, commit, rejoin.
    fn start_rebalance(&mut self, now: Instant, forget_member: bool) {
        if self.close.is_some() {
            return;
        }
        let Some(g) = &mut self.group else { return };
        if forget_member {
            g.forget_member();
        }
        if g.phase != GroupPhase::Stable {
            return;
        }
        debug!(group = %self.config.consumer_group, generation = g.generation, "rebalance: revoking the assignment");
        g.phase = GroupPhase::Revoking {
            deadline: now + self.config.rebalance_drain_timeout,
            committing: false,
        };
        // Undelivered messages and pending retries stay unsettled: the next owner reads them.
        self.retries.clear();
        self.refetch_reasons.clear();
        for p in &mut self.partitions {
            p.revoking = true;
            p.redeliver.clear();
            p.refetch.clear();
            for (_, r) in p.buffered.drain(..) {
                self.buffered -= 1;
                self.buffered_bytes -= r.encoded_len();
            }
        }
    }

    /// Lets every partition go (after the revoke commit, or fenced without one) and rejoins.
    fn finish_revoke(&mut self, _now: Instant) {
        let ids: Vec<u32> = self.partitions.iter().map(|p| p.id).collect();
        for idx in 0..self.partitions.len() {
            let (id, base) = (self.partitions[idx].id, self.partitions[idx].window.base());
            self.known_positions.insert(id, base);
            self.reset_partition(idx, base);
        }
        self.partitions.clear();
        self.commits.wanted = false;
        self.commits.dirty_since = None;
        self.commits.advanced = 0;
        self.commits.retry_at = None;
        if !ids.is_empty() {
            let revoked = self.topic_partitions(ids.into_iter());
            debug!(group = %self.config.consumer_group, ?revoked, "revoked");
            self.events.push_back(Event::Revoked(revoked));
        }
        if let Some(g) = &mut self.group {
            if g.is_member() {
                g.phase = GroupPhase::Join;
            }
        }
    }

    /// The session expired: the broker evicted us, so the assignment is lost. No commit.
    fn fence(&mut self, now: Instant) {
        self.finish_revoke(now);
        if let Some(g) = &mut self.group {
            g.forget_member();
            g.heartbeat_in_flight = false;
            g.next_heartbeat = None;
            g.phase = GroupPhase::Join;
        }
    }

    fn leave_or_close(&mut self) -> ClosePhase {
        match &mut self.group {
            Some(g) if g.is_member() && !g.member_id.is_empty() => {
                g.phase = GroupPhase::Leaving;
                ClosePhase::LeavingGroup
            }
            _ => ClosePhase::Closed,
        }
    }

    fn left(&mut self) {
        if let Some(g) = &mut self.group {
            g.request_in_flight = false;
            g.phase = GroupPhase::Left;
        }
    }

    fn on_find_coordinator(&mut self, now: Instant, code: u32) -> Result<(), String> {
        if code != error_code::NONE {
            self.fail_owner(now, Owner::FindCoordinator);
            return Err(format!("find coordinator failed with error code {code}"));
        }
        if let Some(g) = &mut self.group {
            g.request_in_flight = false;
            if g.phase == GroupPhase::FindCoordinator {
                g.phase = GroupPhase::Join;
            }
        }
        Ok(())
    }

    fn on_join(&mut self, now: Instant, r: JoinGroupResponse) -> Result<(), String> {
        if r.error_code != error_code::NONE {
            self.fail_owner(now, Owner::Join);
            return Err(format!(
                "join group failed with error code {}",
                r.error_code
            ));
        }
        let Some(g) = &mut self.group else {
            return Ok(());
        };
        g.request_in_flight = false;
        g.joined(now, r.member_id.clone(), r.generation_id);
        // A refusal fenced an earlier membership. Generation numbers are not unique over time
        // (a broker that lost the group counts from 1 again), so a new one equal to the
        // fenced one must not inherit the fence and skip every commit of its assignment.
        self.commits.fenced_generation = None;
        debug!(group = %self.config.consumer_group, member = %r.member_id, generation = r.generation_id, "joined");
        if self.close.is_some() {
            return Ok(()); // the close will leave
        }
        let mine = r
            .assigned_partitions
            .get(&r.member_id)
            .cloned()
            .unwrap_or_default();
        let (ours, others): (Vec<_>, Vec<_>) = mine
            .into_iter()
            .partition(|tp| tp.topic == self.config.topic);
        if !others.is_empty() {
            debug!(?others, "ignoring partitions of topics not subscribed");
            self.events.push_back(Event::AssignmentIgnored(others));
        }
        let mut ids: Vec<u32> = ours.iter().map(|tp| tp.partition).collect();
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            if self.index(id).is_none() {
                let p = Partition::new(id, self.next_epoch, 0);
                self.next_epoch += 1;
                let at = self.partitions.partition_point(|q| q.id < id);
                self.partitions.insert(at, p);
            }
        }
        let assigned = self.topic_partitions(ids.into_iter());
        self.events.push_back(Event::Assigned(assigned));
        Ok(())
    }

    fn on_heartbeat(&mut self, now: Instant, generation: u64, code: u32) {
        let Some(g) = self.group.as_mut().filter(|g| g.generation == generation) else {
            return; // an answer about an earlier generation
        };
        g.heartbeat_in_flight = false;
        match code {
            error_code::NONE => g.confirmed(now),
            error_code::REBALANCE_IN_PROGRESS | error_code::ILLEGAL_GENERATION => {
                g.heartbeat_failed(now);
                if code == error_code::ILLEGAL_GENERATION {
                    self.commits.fenced_generation = Some(generation);
                }
                self.start_rebalance(now, false);
            }
            error_code::UNKNOWN_MEMBER | error_code::UNKNOWN_GROUP => {
                g.heartbeat_failed(now);
                self.start_rebalance(now, true);
            }
            _ => g.heartbeat_failed(now),
        }
    }
}

impl Partition {
    fn new(id: u32, epoch: u64, offset: u64) -> Self {
        Self {
            id,
            epoch,
            phase: PartitionPhase::Starting,
            paused: false,
            revoking: false,
            window: Window::new(offset),
            buffered: VecDeque::new(),
            redeliver: VecDeque::new(),
            refetch: VecDeque::new(),
            fetch_in_flight: false,
            refetch_in_flight: false,
            fetch_not_before: None,
            byte_blocked: None,
            empty_fetches: 0,
            fetch_failures: 0,
            high_watermark: None,
            committed: None,
            commit_in_flight: None,
            start: None,
            stalled: false,
        }
    }

    /// Updates an unsettled slot; the caller checked it exists.
    fn set(&mut self, offset: u64, slot: Slot) {
        if let Some(s) = self.window.get_mut(offset) {
            *s = slot;
        }
    }

    /// The offset to commit, if the watermark moved past what was committed or is in flight.
    fn commit_target(&self) -> Option<u64> {
        if self.phase != PartitionPhase::Active {
            return None;
        }
        let base = self.window.base();
        let last = self.commit_in_flight.or(self.committed).or(self.start);
        (last != Some(base)).then_some(base)
    }
}
