//! The discrete-event loop: builds a run, then jumps from event to event (the machine's
//! `poll_timeout`, the broker's, and its own queue), dispatches each, drains the machine's
//! outputs after every input and checks the invariants; ends with the close and the
//! checker's end-of-run checks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Debug, Write as _};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustmq_consumer_core::protocol::{LeaveGroupRequest, Record, TopicPartition};
use rustmq_consumer_core::{
    BreakerState, ClosePhase, ConfigUpdateError, ConsumerMachine, Event, TransportError,
};

use super::phantom::PhantomState;
use super::{
    Failure, Handler, Item, ModelApp, Mutation, Phase, Scenario, SimKind, SimReport, Simulation,
    GROUP, MAX_STEPS, MAX_STEPS_AT_ONE_INSTANT, TOPIC,
};
use crate::broker::{GroupState, SimBroker};
use crate::faults::{FaultPlan, SimRng};
use crate::invariants::{names, Checker, Violation};

impl Simulation<ModelApp> {
    /// A run of `scenario` with its application model.
    pub fn new(scenario: Scenario) -> Self {
        let app = ModelApp::new(scenario.app.clone(), scenario.seed);
        Simulation::with_handler(scenario, app)
    }
}

impl<H: Handler> Simulation<H> {
    /// A run of `scenario` with a custom application.
    pub fn with_handler(scenario: Scenario, handler: H) -> Self {
        let mut rng = SimRng::new(scenario.seed ^ 0x51u64.rotate_left(56));
        let start = Instant::now();
        let checker = Checker::new(&scenario.config);
        let produced = vec![0; scenario.messages.len()];
        Self {
            handler,
            mutation: Mutation::None,
            start,
            now: start,
            broker: SimBroker::with_seed(scenario.seed),
            machine: None,
            checker,
            fault_rng: rng.fork(10),
            app_rng: rng.fork(11),
            value_rng: rng.fork(12),
            partition_fault_rng: rng.fork(13),
            listener_rng: rng.fork(14),
            queue: BTreeMap::new(),
            seq: 0,
            flights: BTreeMap::new(),
            work: BTreeMap::new(),
            next_work: 0,
            process: scenario.process.as_ref().map(|model| {
                let c = &scenario.config;
                super::app::ProcessState::new(model, c.max_unacked, c.max_retry_attempts)
            }),
            paused: BTreeSet::new(),
            produced,
            bursts_left: scenario.bursts,
            crashed: false,
            phase: Phase::Faulty,
            close_phases: Vec::new(),
            phantoms: scenario
                .faults
                .phantoms
                .iter()
                .map(|plan| PhantomState {
                    plan: plan.clone(),
                    member: String::new(),
                    generation: 0,
                    alive: false,
                })
                .collect(),
            report: SimReport {
                seed: scenario.seed,
                trace_hash: 0xcbf2_9ce4_8422_2325,
                ..SimReport::default()
            },
            scratch: String::new(),
            tail: std::collections::VecDeque::new(),
            tail_len: 0,
            scenario,
        }
    }

    /// Runs a deliberately wrong policy instead of the real one.
    pub fn with_mutation(mut self, mutation: Mutation) -> Self {
        self.mutation = mutation;
        // A mutant's application acts at delivery: no scheduler in between.
        if mutation != Mutation::None {
            self.process = None;
        }
        self
    }

    /// Keeps the last `lines` trace lines and attaches them to a [`Failure`].
    pub fn keep_trace(mut self, lines: usize) -> Self {
        self.tail_len = lines;
        self
    }

    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.now.saturating_duration_since(self.start)
    }

    pub(super) fn schedule(&mut self, after: Duration, item: Item) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), item);
    }

    fn schedule_poisson(&mut self, per_sec: f64, item: Item, before_heal: bool) {
        if let Some(d) = FaultPlan::next_event(&mut self.fault_rng, per_sec) {
            if !before_heal || self.elapsed() + d < self.scenario.faults.heal_at {
                self.schedule(d, item);
            }
        }
    }

    pub(super) fn trace(&mut self, kind: &str, what: &dyn Debug) {
        self.scratch.clear();
        let _ = write!(self.scratch, "{:?}|{kind}|{what:?}", self.elapsed());
        let mut h = self.report.trace_hash;
        for b in self.scratch.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.report.trace_hash = h;
        if self.tail_len > 0 {
            if self.tail.len() == self.tail_len {
                self.tail.pop_front();
            }
            self.tail
                .push_back(format!("#{} {}", self.report.steps, self.scratch));
        }
    }

    pub(super) fn machine(&mut self) -> &mut ConsumerMachine {
        self.machine
            .as_mut()
            .expect("the machine exists once run() started")
    }

    /// Runs the scenario to the end: faults, heal, liveness, close. Returns the report, or the
    /// first invariant that broke.
    pub fn run(mut self) -> Result<SimReport, Failure> {
        let seed = self.scenario.seed;
        self.run_inner().map_err(|violation| Failure {
            kind: SimKind::Single,
            seed,
            violation,
            trace_tail: self.tail.iter().cloned().collect(),
        })
    }

    fn run_inner(&mut self) -> Result<SimReport, Violation> {
        let cfg = self.scenario.config.clone();
        let partitions = self.scenario.messages.len() as u32;
        self.broker.create_topic(TOPIC, partitions);
        if let Some(dlq) = &cfg.dead_letter_queue {
            self.broker.create_topic(dlq, 1);
        }
        if self.scenario.is_group() {
            self.checker.track_partitions(partitions);
            for (i, p) in self.scenario.faults.phantoms.clone().iter().enumerate() {
                self.schedule(p.join_at, Item::PhantomJoin(i));
                self.schedule(p.leave_at, Item::PhantomEnd(i));
            }
        }
        if self.scenario.is_group() || self.scenario.faults.split_reads {
            self.broker
                .set_split_reads(self.scenario.faults.split_reads);
            self.schedule(self.scenario.faults.heal_at, Item::Heal);
        }
        self.schedule(Duration::ZERO, Item::Produce);
        let f = self.scenario.faults.clone();
        self.schedule_poisson(f.connection_loss_per_sec, Item::ConnectionLoss, true);
        self.schedule_poisson(f.crash_per_sec, Item::Crash, true);
        self.schedule_poisson(f.storage_failure_per_sec, Item::StorageFailure, true);
        let a = self.scenario.app.clone();
        self.schedule_poisson(a.pause_per_sec, Item::Pause, true);
        if !self.scenario.is_group() {
            // A seek is not durable across a rebalance (the next assignment starts at the
            // group's commit), so group sessions do not seek whatever the behaviour says.
            self.schedule_poisson(a.seek_per_sec, Item::Seek, true);
        }
        self.schedule_poisson(a.commit_per_sec, Item::CommitNow, false);
        for (i, (at, _)) in self.scenario.config_updates.clone().into_iter().enumerate() {
            self.schedule(at, Item::UpdateConfig(i));
        }

        let machine = ConsumerMachine::new(cfg.clone(), self.now).map_err(|e| Violation {
            invariant: names::COMMAND_ACCEPTED,
            step: 0,
            at: Duration::ZERO,
            detail: format!("scenario config rejected: {e}"),
        })?;
        self.machine = Some(machine);
        if self.scenario.listener_latency.is_some() {
            self.machine().hold_revokes();
        }
        self.after_input()?;

        let heal = f.heal_at;
        let liveness_deadline = heal + self.scenario.liveness_budget;
        let mut close_deadline = Duration::MAX;
        let mut same_instant = 0u64;
        loop {
            if self.phase == Phase::Faulty && self.elapsed() >= heal && self.bursts_left == 0 {
                self.phase = Phase::Liveness;
            }
            if self.phase == Phase::Liveness && self.settled_everything() {
                self.phase = Phase::Closing;
                // Under the most patient configuration the run had in force (a request sent
                // before the last update keeps its deadline).
                let most = |f: fn(&rustmq_consumer_core::ConsumerConfig) -> Duration| {
                    self.scenario.configs().map(f).max().unwrap_or_default()
                };
                close_deadline = self.elapsed()
                    + most(|c| c.drain_timeout) * 5
                    + most(|c| c.request_timeout) * 3
                    + Duration::from_secs(1);
                let now = self.now;
                self.trace("app", &"close");
                self.machine().close(now);
                self.after_input()?;
            }
            if self.phase == Phase::Closing && self.checker.closed() {
                return self.finish();
            }
            let machine_at = self.machine.as_ref().and_then(|m| m.poll_timeout());
            let queue_at = self.queue.keys().next().map(|k| k.0);
            let broker_at = self.broker.poll_timeout();
            let next = [machine_at.map(|m| m.0), queue_at, broker_at]
                .into_iter()
                .flatten()
                .min();
            let bound = match self.phase {
                Phase::Closing => close_deadline,
                _ => liveness_deadline,
            };
            let Some(next) = next.filter(|&t| t.saturating_duration_since(self.start) <= bound)
            else {
                return Err(self.stuck(next.is_none()));
            };
            if next <= self.now {
                same_instant += 1;
                if same_instant > MAX_STEPS_AT_ONE_INSTANT {
                    return Err(self.checker.broken(
                        names::LIVENESS,
                        format!(
                            "time stopped: {same_instant} wake-ups at one instant (machine timeout {:?}, broker {:?}, queue {:?})",
                            machine_at.map(|m| (m.0.saturating_duration_since(self.start), m.1)),
                            broker_at.map(|b| b.saturating_duration_since(self.start)),
                            self.queue.iter().next().map(|(k, v)| (k.0.saturating_duration_since(self.start), v))
                        ),
                    ));
                }
            } else {
                same_instant = 0;
            }
            if self.report.steps > MAX_STEPS {
                return Err(self.stuck(false));
            }
            self.now = self.now.max(next);
            if queue_at == Some(next) {
                let (_, item) = self.queue.pop_first().expect("queue_at came from it");
                self.dispatch(item)?;
            } else if machine_at.is_some_and(|m| m.0 == next) {
                let now = self.now;
                self.machine().handle_timeout(now);
                self.after_input()?;
            } else {
                let now = self.now;
                self.broker.handle_timeout(now);
            }
        }
    }

    fn stuck(&self, idle: bool) -> Violation {
        let why = if idle {
            "nothing left to happen"
        } else {
            "time bound passed"
        };
        let m = self.machine.as_ref().expect("running");
        let group = if self.scenario.is_group() {
            format!(
                "; group: members {:?} state {:?} generation {:?}, consumer {:?} owns {:?} (generation {}), machine assigned {:?}, phantoms alive {}",
                self.broker.members(GROUP),
                self.broker.group_state(GROUP),
                self.broker.generation(GROUP),
                self.checker.member(),
                self.checker.owned(),
                self.checker.owned_generation(),
                m.assigned_partitions(),
                self.phantoms.iter().filter(|p| p.alive).count()
            )
        } else {
            String::new()
        };
        let detail = if self.phase == Phase::Closing {
            format!("{why} while closing; phases {:?}", self.close_phases)
        } else {
            let parts: Vec<String> = (0..self.produced.len() as u32)
                .map(|p| {
                    let accepted: Vec<(Duration, u64)> = self
                        .broker
                        .commit_log()
                        .iter()
                        .filter_map(|c| {
                            let o = c.offsets.get(&TopicPartition::new(TOPIC, p))?;
                            Some((c.at.saturating_duration_since(self.start), *o))
                        })
                        .rev()
                        .take(3)
                        .collect();
                    format!(
                        "p{p}: hw {:?} app-low {:?} watermark {:?} committed {:?} broker {:?} (last accepted, newest first: {accepted:?})",
                        self.broker.high_watermark(TOPIC, p),
                        self.checker.lowest_unsettled(p),
                        m.settle_watermark(p),
                        m.committed_offset(p),
                        self.broker.committed(GROUP, &TopicPartition::new(TOPIC, p)),
                    )
                })
                .collect();
            format!(
                "{why} before everything settled ({}); breaker {:?}, metrics {:?}",
                parts.join("; "),
                m.breaker_state(),
                m.metrics()
            )
        };
        let detail = detail + &group;
        self.checker.broken(
            if self.phase == Phase::Closing {
                names::CLOSE
            } else {
                names::LIVENESS
            },
            detail,
        )
    }

    /// True when every produced message is settled by its side effect, and the machine's
    /// watermark and committed offset (and the broker's, unless a crash lost it) are at the
    /// high watermark.
    ///
    /// In a group session: every phantom is gone, the consumer is the group's only member of
    /// the broker's current (stable) generation and owns every partition, and everything is
    /// processed and settled. The commit is left to the close (commit before leave), and
    /// [`Self::finish`] checks the broker has it.
    fn settled_everything(&self) -> bool {
        let Some(m) = self.machine.as_ref() else {
            return false;
        };
        if self.scenario.is_group() {
            let all: Vec<u32> = (0..self.produced.len() as u32).collect();
            return !self.phantoms.iter().any(|p| p.alive)
                && self.broker.members(GROUP) == [self.checker.member()]
                && self.broker.group_state(GROUP) == Some(GroupState::Stable)
                && self.broker.generation(GROUP) == Some(self.checker.owned_generation())
                && m.assigned_partitions() == all
                && self.checker.outstanding() == 0
                // A commit sent before heal may still meet a fault (a lost answer opens the
                // circuit at its deadline) and hold the final commit past the close deadline.
                && self.checker.commits_in_flight() == 0
                // An open circuit (from a fault before heal) would hold the final commit past
                // the close deadline; wait for it to close like the manual swarm does.
                && m.breaker_state() == BreakerState::Closed
                && all.iter().all(|&p| {
                    let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
                    self.checker.lowest_unsettled(p) == Some(hw)
                        && m.settle_watermark(p) == Some(hw)
                });
        }
        (0..self.produced.len() as u32).all(|p| {
            let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
            let broker = self.broker.committed(GROUP, &TopicPartition::new(TOPIC, p));
            self.checker.lowest_unsettled(p) == Some(hw)
                && m.settle_watermark(p) == Some(hw)
                && m.committed_offset(p).unwrap_or(0) == hw
                && (broker == Some(hw) || (broker.is_none() && (hw == 0 || self.crashed)))
        })
    }

    fn finish(&mut self) -> Result<SimReport, Violation> {
        self.checker.check_close_phases(&self.close_phases)?;
        // Nothing more is sent after Closed, whatever time passes.
        let later = self.now + Duration::from_secs(3_600);
        self.machine().handle_timeout(later);
        let late = self.machine().poll_transmit();
        self.checker.check_silent_after_close(late.as_ref())?;
        let config = &self.scenario.config;
        self.checker.check_dead_letters(&self.broker, config)?;
        if self.scenario.is_group() {
            let partitions = self.produced.len() as u32;
            self.checker
                .check_group_after_close(&self.broker, config, partitions, self.crashed)?;
        }
        let (assignments, _) = self.checker.rebalances();
        self.report.assignments = assignments;
        self.report.stale_refused = self.checker.stale_refused();
        self.report.duplicates = self.checker.duplicates();
        self.report.group = self.scenario.is_group();
        let m = self.machine.as_ref().expect("running").metrics();
        self.report.delivered = m.delivered;
        self.report.acked = m.acked;
        self.report.dead_lettered = m.dead_lettered;
        self.report.discarded = m.discarded;
        self.report.produced = self.produced.iter().sum();
        self.report.simulated = self.elapsed();
        Ok(self.report)
    }

    fn dispatch(&mut self, item: Item) -> Result<(), Violation> {
        match item {
            Item::Produce => self.produce_burst(),
            Item::Arrive(id) => self.arrive(id)?,
            Item::Answer(id) => {
                if let Some(flight) = self.flights.remove(&id) {
                    let answer = flight
                        .answer
                        .unwrap_or_else(|| Err(TransportError::TimedOut));
                    self.deliver_answer(id, Some(&flight.request), answer)?;
                }
            }
            Item::AppDone(key) => self.app_done(key)?,
            Item::SideEffect(key) => {
                if let Some(w) = self.work.remove(&key) {
                    self.trace("side-effect", &w.tag);
                    self.checker
                        .side_effect(w.tag.partition, w.tag.offset, w.generation);
                    self.check_state()?;
                }
            }
            Item::ConnectionLoss => {
                self.report.faults += 1;
                self.trace("fault", &"connection lost");
                self.fail_all_in_flight("connection reset by the simulation")?;
                let rate = self.scenario.faults.connection_loss_per_sec;
                self.schedule_poisson(rate, Item::ConnectionLoss, true);
            }
            Item::Crash => {
                self.report.crashes += 1;
                self.crashed = true;
                self.trace("fault", &"broker crash");
                self.broker.restart();
                self.fail_all_in_flight("broker restarted")?;
                let rate = self.scenario.faults.crash_per_sec;
                self.schedule_poisson(rate, Item::Crash, true);
            }
            Item::StorageFailure => {
                let n = self
                    .fault_rng
                    .range(1, u64::from(self.scenario.faults.storage_failure_burst))
                    as u32;
                if self.fault_rng.chance(0.5) {
                    if self.partition_fault_rng.chance(0.25) {
                        // One partition's fetches fail until heal (the real broker's reads
                        // after compaction merged its segments); commits and the others work.
                        let last = self.produced.len() as u64 - 1;
                        let p = self.partition_fault_rng.range(0, last) as u32;
                        self.broker.set_partition_failing(TOPIC, p, true);
                        let heal = self.scenario.faults.heal_at.saturating_sub(self.elapsed());
                        self.schedule(heal, Item::PartitionHealed(p));
                        self.trace("fault", &("partition failing", p));
                    } else {
                        self.broker.fail_next_fetches(n);
                    }
                } else {
                    self.broker.fail_next_commits(n);
                }
                self.trace("fault", &("storage", n));
                let rate = self.scenario.faults.storage_failure_per_sec;
                self.schedule_poisson(rate, Item::StorageFailure, true);
            }
            Item::Pause => {
                let p = self.app_rng.range(0, self.produced.len() as u64 - 1) as u32;
                // In a group session only an owned partition can be paused.
                let owned = self.checker.owned().contains(&p);
                if self.phase == Phase::Faulty && !self.paused.contains(&p) && owned {
                    self.paused.insert(p);
                    self.checker.set_paused(p, true);
                    self.trace("app", &("pause", p));
                    let now = self.now;
                    let r = self.machine().pause(now, &[p]);
                    self.command_result(r, "pause")?;
                    let max = self.scenario.app.pause_max.as_millis() as u64;
                    let d = self.app_rng.millis(0, max);
                    self.schedule(d, Item::Resume(p));
                }
                let rate = self.scenario.app.pause_per_sec;
                self.schedule_poisson(rate, Item::Pause, true);
            }
            Item::Resume(p) => {
                // A revoke dropped the pause along with the partition.
                if self.phase != Phase::Closing && self.paused.contains(&p) {
                    self.paused.remove(&p);
                    self.checker.set_paused(p, false);
                    self.trace("app", &("resume", p));
                    let now = self.now;
                    let r = self.machine().resume(now, &[p]);
                    self.command_result(r, "resume")?;
                }
            }
            Item::Seek => {
                let p = self.app_rng.range(0, self.produced.len() as u64 - 1) as u32;
                let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
                let offset = self.app_rng.range(0, hw);
                if self.phase == Phase::Faulty {
                    self.report.seeks += 1;
                    self.checker.seek(p, offset);
                    self.trace("app", &("seek", p, offset));
                    let now = self.now;
                    let r = self.machine().seek(now, p, offset);
                    self.command_result(r, "seek")?;
                }
                let rate = self.scenario.app.seek_per_sec;
                self.schedule_poisson(rate, Item::Seek, true);
            }
            Item::PhantomJoin(i) => {
                self.phantoms[i].alive = true;
                self.phantom_join(i);
                let beat = self.phantoms[i].plan.heartbeat_interval();
                self.schedule(beat, Item::PhantomBeat(i));
            }
            Item::PhantomBeat(i) => self.phantom_beat(i),
            Item::PhantomEnd(i) => {
                let ph = &mut self.phantoms[i];
                ph.alive = false;
                let (silent, member) = (ph.plan.silent, ph.member.clone());
                self.report.faults += 1;
                if silent {
                    self.trace("phantom", &("silent", i, &member));
                } else {
                    self.trace("phantom", &("leave", i, &member));
                    let now = self.now;
                    let _ = self.broker.handle(
                        now,
                        LeaveGroupRequest {
                            group_id: GROUP.to_owned(),
                            member_id: member,
                        }
                        .into(),
                    );
                }
            }
            Item::Heal => {
                // Storage failures injected before heal and not used up end with the faults.
                self.broker.fail_next_commits(0);
                self.broker.fail_next_fetches(0);
                self.broker.set_split_reads(false);
            }
            Item::PartitionHealed(p) => self.broker.set_partition_failing(TOPIC, p, false),
            Item::ListenerReturned => {
                self.trace("app", &"revoke hook returned");
                self.report.hooks_returned += 1;
                let now = self.now;
                self.machine().rebalance_listener_done(now);
                self.after_input()?;
            }
            Item::UpdateConfig(i) => {
                let next = self.scenario.config_updates[i].1.clone();
                self.trace("app", &("update config", i));
                let now = self.now;
                match self.machine().update_config(now, next.clone()) {
                    Ok(()) => {}
                    // Scheduled past the point where the application closed the consumer
                    // (everything settled early): refused, as it must be.
                    Err(ConfigUpdateError::Closed) if self.phase == Phase::Closing => {
                        self.trace("app", &("update config refused: closing", i));
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(self
                            .checker
                            .command_refused(format!("config update {i} refused: {e}")));
                    }
                }
                self.report.config_updates += 1;
                let metrics = self.machine.as_ref().expect("running").metrics();
                self.checker.on_config_update(&next, &metrics);
                if let Some(ps) = &mut self.process {
                    ps.set_max_retry_attempts(next.max_retry_attempts);
                }
                self.after_input()?;
            }
            Item::CommitNow => {
                if self.phase != Phase::Closing {
                    self.trace("app", &"commit");
                    let now = self.now;
                    let r = self.machine().commit(now).map(|_| ());
                    self.command_result(r, "commit")?;
                    let rate = self.scenario.app.commit_per_sec;
                    self.schedule_poisson(rate, Item::CommitNow, false);
                }
            }
        }
        Ok(())
    }

    fn produce_burst(&mut self) {
        if self.bursts_left == 0 {
            return;
        }
        self.bursts_left -= 1;
        let last = self.bursts_left == 0;
        for (p, target) in self.scenario.messages.clone().into_iter().enumerate() {
            let share = if last {
                target - self.produced[p]
            } else {
                (target / u64::from(self.scenario.bursts)).min(target - self.produced[p])
            };
            if share == 0 {
                continue;
            }
            let (lo, hi) = self.scenario.value_size;
            let records: Vec<Record> = (0..share)
                .map(|i| {
                    let len = self.value_rng.range_usize(lo, hi);
                    let mut value = format!("p{p}-m{}-", self.produced[p] + i).into_bytes();
                    value.resize(len.max(value.len()), b'x');
                    let mut r = Record::from_value(Bytes::from(value));
                    if self.value_rng.chance(0.3) {
                        r.key = Some(Bytes::from(format!("k{}", i % 7)));
                    }
                    r
                })
                .collect();
            // The topic was created with these partitions: produce cannot fail.
            if self.broker.produce(TOPIC, p as u32, records).is_ok() {
                self.produced[p] += share;
            }
        }
        self.trace("produce", &self.produced.clone());
        if !last {
            let heal = self.scenario.faults.heal_at.as_millis() as u64;
            let d = self
                .fault_rng
                .millis(0, heal * 8 / 10 / u64::from(self.scenario.bursts));
            self.schedule(d, Item::Produce);
        }
    }

    fn check_state(&mut self) -> Result<(), Violation> {
        let m = self.machine.as_ref().expect("running");
        self.checker
            .check_state(&m.metrics(), |p| m.settle_watermark(p))
    }

    /// Drains the machine's outputs after an input and checks every invariant.
    pub(super) fn after_input(&mut self) -> Result<(), Violation> {
        self.report.steps += 1;
        let (step, at) = (self.report.steps, self.elapsed());
        self.checker.set_step(step, at);
        let mut transmits = Vec::new();
        let mut events = Vec::new();
        {
            let m = self.machine.as_mut().expect("running");
            while let Some(t) = m.poll_transmit() {
                transmits.push(t);
            }
            while let Some(e) = m.poll_event() {
                events.push(e);
            }
        }
        let breaker = self.machine.as_ref().expect("running").breaker_state();
        self.checker.on_events_of_input(&events);
        for t in transmits {
            self.trace("transmit", &(t.id, &t.request));
            self.report.requests += 1;
            self.checker.on_transmit(t.id, &t.request, breaker)?;
            self.send(t.id, t.request)?;
        }
        for e in events {
            self.trace("event", &e);
            {
                let broker = &self.broker;
                self.checker
                    .on_event(&e, |p, o| broker.records(TOPIC, p).get(o as usize))?;
            }
            match e {
                Event::Deliver(d) => self.on_deliver(d)?,
                Event::Revoking(_) => {
                    if let Some(max) = self.scenario.listener_latency {
                        let latency = self.listener_rng.millis(0, max.as_millis() as u64);
                        self.schedule(latency, Item::ListenerReturned);
                    }
                }
                Event::Revoked(tps) => {
                    for tp in tps {
                        self.paused.remove(&tp.partition);
                    }
                }
                Event::Closing(phase) => {
                    self.close_phases.push(phase);
                    if phase == ClosePhase::FinalCommit
                        && self.mutation == Mutation::LeaveBeforeFinalCommit
                        && self.scenario.is_group()
                    {
                        self.rogue_leave()?;
                    }
                }
                Event::Closed if self.close_phases.last() != Some(&ClosePhase::Closed) => {
                    self.close_phases.push(ClosePhase::Closed);
                }
                _ => {}
            }
        }
        self.checker.end_of_input();
        self.check_state()
    }
}
