//! The consumer state machine: [`ConsumerMachine`], a coordinator over sub-machines that
//! own their state and logic and never call back into it.
//!
//! - [`partition`]: the assigned partitions (settle windows, buffers, start phase, fetch
//!   sizing, the intake of fetch answers, fetch backoff, deliveries, the retry schedule);
//! - [`commit`]: the committer (what is due, the request, its answer and failure, fencing);
//! - [`dead_letter`]: the dead-letter outbox (records, headers, answers, retries, the stall of
//!   a record cut in transit again and again);
//! - [`group`]: the group session (coordinator, join, heartbeats, revoke, fencing);
//! - [`manual`]: a manual assignment's group generation (join and leave to learn it);
//! - [`close`]: the close's phases;
//! - [`live_config`]: a configuration update while running (`update_config`);
//! - [`requests`]: requests in flight and the owner each answer goes to;
//! - [`timers`]: the one table of named deadlines `poll_timeout` and `handle_timeout` read.
//!
//! The coordinator routes inputs to the sub-machine that owns them and carries what one
//! sub-machine's outcome means for another (a settlement moves the committer, a rejected
//! commit revokes the assignment).
//!
//! The coordinator's own code: this file (fields, the public API, assignment and revoke),
//! `answers` (routing each answer), `settle` (the application's verdicts on its deliveries)
//! and `work` (the step that ends every input).

use std::collections::VecDeque;
use std::time::Instant;

use tracing::{debug, trace};

use crate::backoff::{later, Jitter};
use crate::breaker::Breaker;
use crate::config::{ConfigError, ConsumerConfig};
use crate::error::{TransportError, UsageError};
use crate::event::*;
use crate::protocol::{Record, Response, TopicPartition};

mod answers;
mod close;
mod commit;
mod dead_letter;
mod group;
mod live_config;
mod manual;
mod outbox;
mod partition;
mod requests;
mod settle;
mod timers;
mod work;

use close::Close;
use commit::Committer;
pub use dead_letter::dead_letter_headers;
use dead_letter::DeadLetters;
use group::GroupSession;
use manual::ManualGeneration;
use outbox::Outbox;
use partition::Partitions;
use requests::Requests;
use timers::{Timer, TimerTable};

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
    /// Retry delays (failed requests, nacks), from the config's seed.
    jitter: Jitter,
    partitions: Partitions,
    requests: Requests,
    events: Outbox,
    breaker: Breaker,
    committer: Committer,
    dead_letters: DeadLetters,
    /// The group session; `None` for a manual assignment.
    group: Option<GroupSession>,
    /// The generation a manual assignment commits under; `None` in a group session.
    manual: Option<ManualGeneration>,
    close: Option<Close>,
    metrics: Metrics,
    /// Revokes wait for [`rebalance_listener_done`](Self::rebalance_listener_done).
    hold_revokes: bool,
    /// The current revoke waits for the rebalance listener.
    revoke_held: bool,
}

impl ConsumerMachine {
    /// Validates `config` and starts: asks the broker for committed offsets of every assigned
    /// partition. Drain the outputs afterwards.
    pub fn new(config: ConsumerConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut machine = Self {
            jitter: Jitter::new(
                config.seed,
                config.retry_backoff_base,
                config.retry_backoff_max,
            ),
            breaker: Breaker::new(
                config.failure_threshold,
                config.recovery_timeout,
                config.half_open_max_probes,
                config.half_open_max_wait,
            ),
            partitions: Partitions::new(&config),
            requests: Requests::new(config.request_timeout),
            events: Outbox::default(),
            committer: Committer::default(),
            dead_letters: DeadLetters::default(),
            group: config
                .uses_group_session()
                .then(|| GroupSession::new(now, config.heartbeat(), config.session_timeout)),
            manual: (!config.uses_group_session()).then(ManualGeneration::default),
            close: None,
            metrics: Metrics::default(),
            hold_revokes: false,
            revoke_held: false,
            config,
        };
        if machine.group.is_none() {
            let assigned = machine.topic_partitions(machine.partitions.ids());
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
        let Some(flight) = self.requests.answered(id) else {
            trace!(
                request = id.0,
                "ignoring response to an unknown or expired request"
            );
            return;
        };
        let fetched = matches!(result, Ok(Response::Fetch(_)));
        self.finish_request(now, id, flight, result.map_err(RequestError::from));
        if fetched {
            // The next fetch goes out before this answer is delivered, so the broker works
            // on it while the application takes the deliveries (the work step below sends
            // again what the delivery's freed room allows).
            self.send_work(now);
        }
        self.poll_work(now);
    }

    /// Fires every deadline that is due. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in Timer::ALL {
            if self.deadline(timer).is_some_and(|at| at <= now) {
                self.on_timer(now, timer);
            }
        }
        self.poll_work(now);
    }

    // -------------------------------------------------------------- commands

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
            .partitions
            .index(partition)
            .ok_or(UsageError::UnknownPartition(partition))?;
        self.restart_partition(idx, offset);
        self.partitions.at_mut(idx).phase = partition::Phase::Active;
        debug!(topic = %self.config.topic, partition, offset, "seek");
        self.committer.moved(now, 1);
        self.poll_work(now);
        Ok(())
    }

    /// Commits every settled offset now. Returns a ticket: an [`Event::Committed`] or
    /// [`Event::CommitFailed`] whose `ticket` is at least this one answers it.
    pub fn commit(&mut self, now: Instant) -> Result<u64, UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        let ticket = self.committer.ticket();
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
        // Partitions given back in a rebalance will not come back now.
        let mut lost = self.partitions.drop_parked(&[]);
        lost.extend(self.partitions.drop_restoring());
        self.revoked(lost);
        self.close = Some(Close::enter(
            ClosePhase::Draining,
            now,
            self.config.drain_timeout,
        ));
        self.events.push_back(Event::Closing(ClosePhase::Draining));
        // Undelivered messages stay unsettled: the next member reads them again.
        self.partitions.drop_undelivered();
        self.advance_close(now, false);
        self.poll_work(now);
    }

    /// From now on every revoke waits, after [`Event::Revoking`], until
    /// [`rebalance_listener_done`](Self::rebalance_listener_done) (or `rebalance_drain_timeout`)
    /// before its commit: the application's rebalance listener runs in between, and may still
    /// settle deliveries of the revoked partitions.
    pub fn hold_revokes(&mut self) {
        self.hold_revokes = true;
    }

    /// The rebalance listener returned from the revoke announced by the last
    /// [`Event::Revoking`]: the revoke commit may go once the partitions are drained.
    /// Nothing happens when no revoke waits for it.
    pub fn rebalance_listener_done(&mut self, now: Instant) {
        self.revoke_held = false;
        self.poll_work(now);
    }

    // --------------------------------------------------------------- outputs

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.requests.poll_transmit()
    }

    /// The next event for the application or the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Moves the deliveries that [`poll_event`](Self::poll_event) would return before its
    /// next other event to the back of `into`, and returns how many: the same messages in the
    /// same order, taken at once (when `into` is empty, by swapping buffers rather than moving
    /// each message). Call `poll_event` for the event that follows them.
    pub fn poll_deliveries(&mut self, into: &mut VecDeque<Message>) -> usize {
        self.events.take_deliveries(into)
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, Reason)> {
        TimerTable::read(|timer| self.deadline(timer))
            .next()
            .map(|(at, timer)| (at, timer.reason()))
    }

    // --------------------------------------------------------------- queries

    /// Partitions of the subscribed topic this consumer owns.
    pub fn assigned_partitions(&self) -> Vec<u32> {
        self.partitions.ids()
    }

    /// Lag of every assigned partition.
    pub fn lag(&self, now: Instant) -> Vec<PartitionLag> {
        self.partitions.lag(now)
    }

    /// A snapshot of every counter and gauge.
    pub fn metrics(&self) -> Metrics {
        let cache = self.partitions.cache().stats();
        Metrics {
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_evictions: cache.evictions + cache.expirations,
            breaker_transitions: self.breaker.transitions(),
            in_flight_requests: self.requests.len() as u64,
            in_flight_deliveries: self.partitions.unacked as u64,
            buffered: self.partitions.buffered as u64,
            cached: self.partitions.cache().len() as u64,
            cached_bytes: self.partitions.cache().bytes() as u64,
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
            _ if self.partitions.any_stalled() || self.dead_letters.cut_stalled() => {
                Health::Degraded
            }
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

    /// A message this consumer still holds: buffered, or given back and cached for a retry or
    /// a dead letter. A delivery the application holds is not here (it has the record).
    pub fn find_message_by_offset(
        &self,
        now: Instant,
        partition: u32,
        offset: u64,
    ) -> Option<&Record> {
        self.partitions.index(partition)?;
        self.partitions
            .held(partition, offset)
            .or_else(|| self.partitions.cached_peek(now, partition, offset))
    }

    /// The settle watermark (lowest unsettled offset) of a partition; `None` while one given
    /// back in a rebalance waits to learn whether it resumes there (its FetchOffset).
    pub fn settle_watermark(&self, partition: u32) -> Option<u64> {
        if self.partitions.is_restoring(partition) {
            return None;
        }
        Some(self.partitions.get(partition)?.window.base())
    }

    /// Whether an assigned partition is paused (`None`: not assigned).
    pub fn is_paused(&self, partition: u32) -> Option<bool> {
        Some(self.partitions.get(partition)?.paused)
    }

    /// The offset the broker last confirmed for a partition.
    pub fn committed_offset(&self, partition: u32) -> Option<u64> {
        self.partitions.get(partition)?.committed
    }

    /// Settled offsets the broker has not confirmed storing: each assigned partition (and its
    /// settle watermark, the offset to commit) whose watermark moved past the last commit the
    /// broker confirmed, whether or not a commit of it is in flight. Empty when the broker
    /// holds every settlement.
    pub fn uncommitted_offsets(&self) -> Vec<(u32, u64)> {
        self.partitions.uncommitted()
    }

    // ------------------------------------------------------------ partitions

    fn topic_partitions(&self, ids: Vec<u32>) -> Vec<TopicPartition> {
        ids.into_iter()
            .map(|id| TopicPartition::new(self.config.topic.clone(), id))
            .collect()
    }

    fn check_open(&self) -> Result<(), UsageError> {
        match self.close {
            Some(_) => Err(UsageError::Closed),
            None => Ok(()),
        }
    }

    fn set_paused(
        &mut self,
        now: Instant,
        partitions: &[u32],
        paused: bool,
    ) -> Result<(), UsageError> {
        self.check_open()?;
        self.partitions.set_paused(partitions, paused)?;
        self.poll_work(now);
        Ok(())
    }

    /// Restarts a partition at `offset` under a new epoch, forgetting its cached messages and
    /// dead letters.
    fn restart_partition(&mut self, idx: usize, offset: u64) {
        let id = self.partitions.at(idx).id;
        self.partitions.restart(idx, offset);
        self.dead_letters.forget_partition(id);
    }

    /// The coordinator assigned partitions: consume those of our topic.
    fn assign(&mut self, assigned: Vec<TopicPartition>) {
        let (ours, others): (Vec<_>, Vec<_>) = assigned
            .into_iter()
            .partition(|tp| tp.topic == self.config.topic);
        if !others.is_empty() {
            debug!(?others, "ignoring partitions of topics not subscribed");
            self.events.push_back(Event::AssignmentIgnored(others));
        }
        let mut ids: Vec<u32> = ours.iter().map(|tp| tp.partition).collect();
        ids.sort_unstable();
        ids.dedup();
        // Parked partitions not given back are lost; those given back resume (`add`).
        let lost = self.partitions.drop_parked(&ids);
        self.revoked(lost);
        for &id in &ids {
            self.partitions.add(id);
        }
        let assigned = self.topic_partitions(ids);
        self.events.push_back(Event::Assigned(assigned));
    }

    /// The broker evicted this member: every partition is lost, none parked.
    fn lose_assignment(&mut self) {
        self.finish_revoke();
        let lost = self.partitions.drop_parked(&[]);
        self.revoked(lost);
    }

    /// Partitions this member lost (the partitions forgot their cached messages): their dead
    /// letters are forgotten, and the application told (their outstanding deliveries are
    /// stale).
    fn revoked(&mut self, ids: Vec<u32>) {
        for &id in &ids {
            self.dead_letters.forget_partition(id);
        }
        if !ids.is_empty() {
            let revoked = self.topic_partitions(ids);
            debug!(group = %self.config.consumer_group, ?revoked, "revoked");
            self.events.push_back(Event::Revoked(revoked));
        }
    }

    /// Partitions given back that started over at a commit another member made meanwhile:
    /// their old deliveries are stale, which `Revoked` says; `Assigned` says they are still
    /// this member's.
    fn restarted(&mut self) {
        for id in self.partitions.take_restarted() {
            debug!(group = %self.config.consumer_group, partition = id, "given back, but another member committed past this one: starting over at its commit");
            self.revoked(vec![id]);
            let assigned = self.topic_partitions(vec![id]);
            self.events.push_back(Event::Assigned(assigned));
        }
    }

    /// Eager rebalance: stop fetching and delivering every partition, drain, commit, rejoin.
    fn start_rebalance(&mut self, now: Instant, forget_member: bool) {
        if self.close.is_some() {
            return;
        }
        // Fenced (the generation already moved), no revoke commit can go: a long drain would
        // only have the application process deliveries the next owner reads again from the
        // last commit. It drains for one ack batch timeout at most (a revoke hook still gets
        // the whole drain timeout); the partitions are parked, so deliveries of one given
        // back stay valid.
        let generation = self.group.as_ref().map(|g| g.generation);
        let drain = if self.committer.fenced(generation) && !self.hold_revokes {
            self.config
                .rebalance_drain_timeout
                .min(self.config.ack_batch_timeout)
        } else {
            self.config.rebalance_drain_timeout
        };
        let Some(g) = &mut self.group else { return };
        let deadline = later(now, drain);
        if g.start_revoke(deadline, forget_member) {
            self.partitions.start_revoke();
            self.revoke_held = self.hold_revokes;
            let revoking = self.topic_partitions(self.partitions.ids());
            self.events.push_back(Event::Revoking(revoking));
        }
    }

    /// Lets every partition go (after the revoke commit, or fenced without one) and rejoins.
    /// Partitions are parked until the next assignment says whether they come back; those
    /// that cannot be (something on the dead-letter path), or any while closing, are revoked
    /// now.
    fn finish_revoke(&mut self) {
        self.revoke_held = false;
        let mut ids = self.partitions.revoke_all();
        if self.close.is_some() {
            ids.extend(self.partitions.drop_parked(&[]));
        }
        self.revoked(ids);
        self.committer.forget();
        if let Some(g) = &mut self.group {
            g.revoked();
        }
    }
}
