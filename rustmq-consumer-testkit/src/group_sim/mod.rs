//! A simulation of one consumer group: several `ConsumerMachine`s, each a member of the same
//! group on one [`SimBroker`](crate::SimBroker), joining, leaving, crashing and pausing on a
//! virtual clock, with group-wide invariants checked after every step.
//!
//! Each member is a [`Pump`] whose peer ([`tap`]) answers from the shared broker at once and
//! notes each JoinGroup answer. The loop jumps from instant to instant (the next planned
//! event, machine deadline, broker reaper tick, paused member waking up or application
//! action), runs the broker's reaper and the due timers, then steps every member in turn until
//! none has anything more to say, processing each member's events as they come out: the
//! application acks every delivery (some after a while, some nacked once first).
//!
//! The invariants ([`group_names`]):
//! 1. no partition is delivered by a member while another member holds it under the same
//!    generation, and a member delivers only what the coordinator gave it in the generation it
//!    holds (checked at every delivery);
//! 2. after heal, every produced message is acked by some member within the scenario's
//!    liveness budget;
//! 3. the broker's committed offset of a partition never passes the lowest offset nobody has
//!    acked (checked at every commit the broker accepts);
//!
//! and every member that closes reaches `Closed` within its bound. Duplicates (a message
//! delivered again after someone acked it) are counted, not failed: delivery is at least once.
//!
//! The broker bumps the generation at every join, like the real one, so a group of several
//! members keeps rebalancing: every member that rejoins fences the others. The invariants hold
//! all the same, and the messages get settled between rebalances.
//!
//! # Codemap
//!
//! - `scenario`: [`GroupScenario`] from one seed: members and their fates, partitions,
//!   messages, heal time.
//! - `tap`: each member's peer, and the [`GroupMutation`]s (deliberately wrong members).
//! - `checker`: the invariants.
//! - `runner`: one seed, many seeds on threads, reports and replay commands.

mod checker;
mod runner;
mod scenario;
mod tap;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rustmq_consumer_core::{Event, Message};

use crate::broker::SimBroker;
use crate::faults::SimRng;
use crate::invariants::Violation;
use crate::pump::Pump;
use crate::sim::{Failure, SimKind};
use crate::transport::SharedBroker;
use checker::{Found, GroupChecker};
use tap::Tap;

pub use checker::group_names;
pub use runner::{run_group_seed, run_group_seeds, GroupReport, GroupSummary};
pub use scenario::{
    Burst, GroupScenario, MemberFate, MemberPlan, GROUP_ID, GROUP_TOPIC, MAX_PARTITIONS,
};
pub use tap::GroupMutation;

/// Instants one run may visit before it is called a runaway.
const MAX_INSTANTS: u64 = 2_000_000;

/// Where a member is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Not started yet.
    Waiting,
    /// Driven.
    Running,
    /// Not driven until then.
    Paused { until: Instant },
    /// `close` was called then; driven until `Closed`.
    Closing { since: Instant },
    /// Closed and dropped.
    Closed,
    /// Dropped without a close.
    Crashed,
}

/// What the application does with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Ack,
    Nack,
}

#[derive(Debug)]
struct Slot {
    plan: MemberPlan,
    life: Life,
    pump: Option<Pump<Tap>>,
    /// JoinGroup answers whose `Assigned` event has not come out yet, oldest first.
    joins: VecDeque<tap::JoinSeen>,
    /// Deliveries the application holds, by when it settles them.
    held: BTreeMap<(Instant, u64), (Message, Decision)>,
}

impl Slot {
    fn driven(&self) -> bool {
        matches!(self.life, Life::Running | Life::Closing { .. })
    }
}

/// Something planned at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planned {
    Join(usize),
    Leave(usize),
    Crash(usize),
    Pause { slot: usize, until: Duration },
    Burst(u64),
    Heal,
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before heal: members come and go.
    Faulty,
    /// After heal, until every message is acked.
    Healed,
    /// Every message acked: every member still running closes.
    Finishing,
}

/// One run of a [`GroupScenario`].
#[derive(Debug)]
pub struct GroupSimulation {
    scenario: GroupScenario,
    mutation: GroupMutation,
    broker: SharedBroker,
    start: Instant,
    now: Instant,
    slots: Vec<Slot>,
    plan: BTreeMap<(Duration, u64), Planned>,
    seq: u64,
    checker: GroupChecker,
    app_rng: SimRng,
    produce_rng: SimRng,
    member_rng: SimRng,
    commits_seen: usize,
    stage: Stage,
    steps: u64,
    report: GroupReport,
    trace: Option<(usize, VecDeque<String>)>,
}

impl GroupSimulation {
    /// A run of `scenario` with real members.
    pub fn new(scenario: GroupScenario) -> Self {
        let mut rng = SimRng::new(scenario.seed ^ 0x67_726f_7570); // "group"
        let broker = SimBroker::with_seed(scenario.seed);
        let start = Instant::now();
        let checker = GroupChecker::new(GROUP_TOPIC, scenario.partitions);
        let slots = scenario
            .members
            .iter()
            .map(|plan| Slot {
                plan: plan.clone(),
                life: Life::Waiting,
                pump: None,
                joins: VecDeque::new(),
                held: BTreeMap::new(),
            })
            .collect();
        let report = GroupReport {
            seed: scenario.seed,
            members: scenario.members.len() as u64,
            partitions: u64::from(scenario.partitions),
            ..GroupReport::default()
        };
        Self {
            mutation: GroupMutation::None,
            broker: SharedBroker::new(broker),
            start,
            now: start,
            slots,
            plan: BTreeMap::new(),
            seq: 0,
            checker,
            app_rng: rng.fork(1),
            produce_rng: rng.fork(2),
            member_rng: rng.fork(3),
            commits_seen: 0,
            stage: Stage::Faulty,
            steps: 0,
            report,
            trace: None,
            scenario,
        }
    }

    /// Every member runs `mutation` instead of the real thing.
    #[must_use]
    pub fn with_mutation(mut self, mutation: GroupMutation) -> Self {
        self.mutation = mutation;
        self
    }

    /// Keeps the last `lines` trace lines for the failure report.
    #[must_use]
    pub fn keep_trace(mut self, lines: usize) -> Self {
        self.trace = Some((lines, VecDeque::new()));
        self
    }

    /// Runs to the end: every message acked after heal and every member closed, or the first
    /// violation.
    pub fn run(mut self) -> Result<GroupReport, Failure> {
        match self.run_inner() {
            Ok(()) => {
                self.report.simulated = self.now - self.start;
                self.report.steps = self.steps;
                self.report.duplicates = self.checker.duplicates;
                self.report.commits = self.checker.commits;
                self.report.generation = self.broker.lock().generation(GROUP_ID).unwrap_or(0);
                Ok(self.report)
            }
            Err((invariant, detail)) => Err(Failure {
                kind: SimKind::Group,
                seed: self.scenario.seed,
                violation: Violation {
                    invariant,
                    step: self.steps,
                    at: self.now - self.start,
                    detail,
                },
                trace_tail: self.trace.take().map(|(_, t)| t.into()).unwrap_or_default(),
            }),
        }
    }

    fn run_inner(&mut self) -> Result<(), Found> {
        self.set_up();
        for _ in 0..MAX_INSTANTS {
            let next = self.next_instant();
            let deadline = self.liveness_deadline();
            match next {
                Some(at) if deadline.is_none_or(|d| at <= d) => self.now = self.now.max(at),
                _ => {
                    if let Some(d) = deadline {
                        self.now = self.now.max(d);
                    }
                    return Err(self.liveness_failure());
                }
            }
            self.run_planned();
            self.wake_paused();
            self.broker.lock().handle_timeout(self.now);
            self.fire_timers();
            self.run_app();
            self.drive()?;
            self.check_closes()?;
            if self.stage == Stage::Healed && self.checker.all_settled() {
                self.report.settled_after_heal =
                    (self.now - self.start).saturating_sub(self.scenario.heal_at);
                self.trace_line(|| "every message acked: closing every member".to_owned());
                self.stage = Stage::Finishing;
                for i in 0..self.slots.len() {
                    if self.slots[i].life == Life::Running {
                        self.close(i);
                    }
                }
                self.drive()?;
                self.check_closes()?;
            }
            if self.stage == Stage::Finishing && self.slots.iter().all(|s| !s.driven()) {
                return Ok(());
            }
        }
        Err((
            group_names::BOUNDED,
            format!("more than {MAX_INSTANTS} instants"),
        ))
    }

    /// The topic, its first messages, and the plan.
    fn set_up(&mut self) {
        self.broker
            .lock()
            .create_topic(GROUP_TOPIC, self.scenario.partitions);
        for (p, &count) in self.scenario.initial.clone().iter().enumerate() {
            self.produce(p as u32, count);
        }
        for (i, m) in self.scenario.members.clone().iter().enumerate() {
            self.schedule(m.join_at, Planned::Join(i));
            match m.fate {
                MemberFate::Stays => {}
                MemberFate::Leaves(at) => self.schedule(at, Planned::Leave(i)),
                MemberFate::Crashes(at) => self.schedule(at, Planned::Crash(i)),
                MemberFate::Silent(from, until) => {
                    self.schedule(from, Planned::Pause { slot: i, until });
                }
            }
        }
        for b in self.scenario.bursts.clone() {
            self.schedule(b.at, Planned::Burst(b.messages));
        }
        self.schedule(self.scenario.heal_at, Planned::Heal);
    }

    fn schedule(&mut self, at: Duration, what: Planned) {
        self.seq += 1;
        self.plan.insert((at, self.seq), what);
    }

    fn produce(&mut self, partition: u32, count: u64) {
        if count == 0 {
            return;
        }
        let values = (0..count).map(|i| format!("p{partition}-{i}").into_bytes());
        self.broker
            .lock()
            .produce_values(GROUP_TOPIC, partition, values.collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("group sim: produce to partition {partition}: {e}"));
        self.checker.produced(partition, count);
        self.report.produced += count;
    }

    fn liveness_deadline(&self) -> Option<Instant> {
        (self.stage == Stage::Healed)
            .then(|| self.start + self.scenario.heal_at + self.scenario.liveness_budget)
    }

    fn liveness_failure(&self) -> Found {
        let lives: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{i}:{:?}", s.life))
            .collect();
        let (invariant, missing) = match self.checker.first_unsettled() {
            Some((p, offset, produced)) => (
                group_names::SETTLED_AFTER_HEAL,
                format!("partition {p}: offset {offset} of {produced} not acked by anyone"),
            ),
            // Everything was acked: a closing member has nothing left to wake it.
            None => (group_names::CLOSE, "members still closing".to_owned()),
        };
        (
            invariant,
            format!(
                "{:?} after heal (budget {:?}): {missing}; members {}",
                (self.now - self.start).saturating_sub(self.scenario.heal_at),
                self.scenario.liveness_budget,
                lives.join(" ")
            ),
        )
    }

    /// The earliest of: the next planned event, a driven member's deadline or held delivery, a
    /// paused member waking up, the broker's reaper.
    fn next_instant(&self) -> Option<Instant> {
        let planned = self.plan.keys().next().map(|(at, _)| self.start + *at);
        let members = self.slots.iter().filter_map(|s| match s.life {
            Life::Paused { until } => Some(until),
            _ if s.driven() => {
                let machine = s.pump.as_ref().and_then(|p| p.m.poll_timeout());
                let app = s.held.keys().next().map(|(at, _)| *at);
                machine.map(|(at, _)| at).into_iter().chain(app).min()
            }
            _ => None,
        });
        let reaper = self.broker.lock().poll_timeout();
        planned.into_iter().chain(members).chain(reaper).min()
    }

    fn run_planned(&mut self) {
        let elapsed = self.now - self.start;
        while let Some(entry) = self.plan.first_entry() {
            if entry.key().0 > elapsed {
                break;
            }
            let what = entry.remove();
            self.trace_line(|| format!("plan: {what:?}"));
            match what {
                Planned::Join(i) => self.join(i),
                Planned::Leave(i) if self.slots[i].life == Life::Running => self.close(i),
                Planned::Crash(i) if self.slots[i].driven() => self.crash(i),
                Planned::Pause { slot, until } if self.slots[slot].life == Life::Running => {
                    let until = self.start + until.min(self.scenario.heal_at);
                    self.slots[slot].life = Life::Paused { until };
                    self.report.pauses += 1;
                }
                Planned::Burst(messages) => {
                    let mut per = vec![0u64; self.scenario.partitions as usize];
                    for _ in 0..messages {
                        let p = self
                            .produce_rng
                            .range_usize(0, self.scenario.partitions as usize - 1);
                        per[p] += 1;
                    }
                    for (p, count) in per.into_iter().enumerate() {
                        self.produce(p as u32, count);
                    }
                }
                Planned::Heal => self.heal(),
                Planned::Leave(_) | Planned::Crash(_) | Planned::Pause { .. } => {}
            }
        }
    }

    fn join(&mut self, i: usize) {
        let tap = Tap::new(self.broker.clone(), GROUP_TOPIC, self.mutation);
        let pump = Pump::new(tap, self.slots[i].plan.config.clone(), self.now);
        let slot = &mut self.slots[i];
        slot.pump = Some(pump);
        slot.life = Life::Running;
    }

    fn close(&mut self, i: usize) {
        let now = self.now;
        let slot = &mut self.slots[i];
        if let Some(p) = slot.pump.as_mut() {
            p.m.close(now);
            slot.life = Life::Closing { since: now };
            self.report.closes += 1;
        }
    }

    fn crash(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.pump = None;
        slot.held.clear();
        slot.joins.clear();
        slot.life = Life::Crashed;
        self.checker.gone(i);
        self.report.crashes += 1;
    }

    /// Faults stop: paused members wake up; if nobody is left running, a new member joins.
    fn heal(&mut self) {
        self.stage = Stage::Healed;
        let now = self.now;
        for s in &mut self.slots {
            if let Life::Paused { .. } = s.life {
                s.life = Life::Paused { until: now };
            }
        }
        self.wake_paused();
        let running = self
            .slots
            .iter()
            .any(|s| matches!(s.life, Life::Running | Life::Waiting));
        if !running {
            let index = self.slots.len();
            let heal = self.scenario.heal_at;
            let mut plan =
                GroupScenario::member(&mut self.member_rng, self.scenario.seed, index, heal, heal);
            plan.fate = MemberFate::Stays;
            self.slots.push(Slot {
                plan,
                life: Life::Waiting,
                pump: None,
                joins: VecDeque::new(),
                held: BTreeMap::new(),
            });
            self.report.members += 1;
            self.report.late_joiners += 1;
            self.join(index);
        }
    }

    fn wake_paused(&mut self) {
        let now = self.now;
        for s in &mut self.slots {
            if let Life::Paused { until } = s.life {
                if until <= now {
                    s.life = Life::Running;
                }
            }
        }
    }

    /// Fires the timers of every driven member whose deadline has come.
    fn fire_timers(&mut self) {
        let now = self.now;
        for s in &mut self.slots {
            if !s.driven() {
                continue;
            }
            let Some(p) = s.pump.as_mut() else { continue };
            p.now = now;
            if p.m.poll_timeout().is_some_and(|(at, _)| at <= now) {
                p.m.handle_timeout(now);
                self.steps += 1;
            }
        }
    }

    /// The application settles the deliveries it held until now.
    fn run_app(&mut self) {
        for i in 0..self.slots.len() {
            if !self.slots[i].driven() {
                continue;
            }
            while let Some(entry) = self.slots[i].held.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (message, decision) = entry.remove();
                self.settle(i, message, decision);
            }
        }
    }

    /// Hands one delivery back to member `i`'s machine.
    fn settle(&mut self, i: usize, message: Message, decision: Decision) {
        let (now, tag) = (self.now, message.tag);
        let Some(p) = self.slots[i].pump.as_mut() else {
            return;
        };
        self.steps += 1;
        let result = match decision {
            Decision::Ack => p.m.ack(now, tag),
            Decision::Nack => {
                p.m.give_back(now, message);
                p.m.nack(now, tag, None)
            }
        };
        match (result, decision) {
            (Ok(()), Decision::Ack) => {
                self.report.acked += 1;
                self.checker.settled(tag.partition, tag.offset);
            }
            (Ok(()), Decision::Nack) => self.report.nacked += 1,
            (Err(_), _) => self.report.refused += 1,
        }
    }

    /// Steps every driven member in turn, processing what each says, until none says more.
    fn drive(&mut self) -> Result<(), Found> {
        let mut budgets: Vec<usize> = self
            .slots
            .iter()
            .map(|s| s.pump.as_ref().map_or(0, |p| p.limits.outputs))
            .collect();
        loop {
            let mut progressed = false;
            for (i, budget) in budgets.iter_mut().enumerate() {
                if !self.slots[i].driven() {
                    continue;
                }
                let Some(p) = self.slots[i].pump.as_mut() else {
                    continue;
                };
                if !p.step(budget) {
                    continue;
                }
                progressed = true;
                self.steps += 1;
                self.after_step(i)?;
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// What member `i` did in its last step: its JoinGroup answers, its events, and every
    /// commit the broker accepted meanwhile.
    fn after_step(&mut self, i: usize) -> Result<(), Found> {
        let slot = &mut self.slots[i];
        let Some(p) = slot.pump.as_mut() else {
            return Ok(());
        };
        slot.joins.extend(p.broker.joins.drain(..));
        // The checker reads the broker's logs, not what the pump kept: keep memory flat.
        p.sent.clear();
        let events = p.take_events();
        self.check_commits()?;
        for e in events {
            self.on_event(i, e)?;
        }
        Ok(())
    }

    fn check_commits(&mut self) -> Result<(), Found> {
        let b = self.broker.lock();
        let log = b.commit_log();
        for commit in &log[self.commits_seen..] {
            if let Some(found) = self.checker.commit_accepted(commit) {
                return Err(found);
            }
        }
        self.commits_seen = log.len();
        Ok(())
    }

    fn on_event(&mut self, i: usize, e: Event) -> Result<(), Found> {
        match e {
            Event::Deliver(message) => {
                let tag = message.tag;
                self.report.delivered += 1;
                if let Some(found) = self.checker.delivered(i, tag.partition, tag.offset) {
                    return Err(found);
                }
                let decision = if tag.attempt == 1 && self.app_rng.chance(self.scenario.nack_rate) {
                    Decision::Nack
                } else {
                    Decision::Ack
                };
                if self.app_rng.chance(self.scenario.defer_rate) {
                    let max = self.scenario.defer_max.as_millis() as u64;
                    let at = self.now + self.app_rng.millis(0, max);
                    self.seq += 1;
                    self.slots[i]
                        .held
                        .insert((at, self.seq), (message, decision));
                } else {
                    self.settle(i, message, decision);
                }
            }
            Event::Assigned(partitions) => {
                self.report.assignments += 1;
                if let Some(join) = self.slots[i].joins.pop_front() {
                    self.trace_line(|| {
                        format!(
                            "member {i} ({}) joined generation {}: granted {:?}",
                            join.member_id, join.generation, join.granted
                        )
                    });
                    self.checker.joined(i, join.generation, &join.granted);
                }
                self.checker.assigned(i, &partitions);
            }
            Event::Revoked(partitions) => {
                self.report.revocations += 1;
                self.trace_line(|| format!("member {i} revoked {} partitions", partitions.len()));
                self.checker.revoked(i, &partitions);
            }
            Event::DeadLettered {
                partition, offset, ..
            }
            | Event::Discarded {
                partition, offset, ..
            } => self.checker.settled(partition, offset),
            Event::Committed { offsets, .. } => {
                self.trace_line(|| format!("member {i} committed {offsets:?}"));
            }
            Event::Closed => {
                self.trace_line(|| format!("member {i} closed"));
                let slot = &mut self.slots[i];
                slot.life = Life::Closed;
                slot.pump = None;
                slot.held.clear();
                self.checker.gone(i);
            }
            _ => {}
        }
        Ok(())
    }

    /// Every closing member reaches `Closed` within its bound: each close phase is bounded by
    /// the drain timeout, and no answer here takes longer than a request timeout.
    fn check_closes(&self) -> Result<(), Found> {
        for (i, s) in self.slots.iter().enumerate() {
            if let Life::Closing { since } = s.life {
                let c = &s.plan.config;
                let bound = c.drain_timeout * 4 + c.request_timeout * 2;
                if self.now > since + bound {
                    return Err((
                        group_names::CLOSE,
                        format!(
                            "member {i} closing since {:?}, not closed after {bound:?} (phase {:?})",
                            since - self.start,
                            s.pump.as_ref().and_then(|p| p.m.close_phase())
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn trace_line(&mut self, line: impl FnOnce() -> String) {
        if let Some((keep, tail)) = &mut self.trace {
            if tail.len() == *keep {
                tail.pop_front();
            }
            let at = self.now - self.start;
            tail.push_back(format!("{at:?} {}", line()));
        }
    }
}
