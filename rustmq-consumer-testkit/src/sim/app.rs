//! The application under simulation: what it decides for each delivery ([`Handler`],
//! [`ModelApp`] on [`AppBehaviour`]), and how the loop carries those decisions out on the
//! machine.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rustmq_consumer_core::process::{Finish, Limits, OrderBy, Scheduler, Ticket};
use rustmq_consumer_core::{Message, UsageError};
use tracing::debug;

use super::{Item, Mutation, Phase, Simulation, Work};
use crate::faults::SimRng;
use crate::invariants::Violation;

/// What the application does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Process it (the side effect), then ack.
    Ack,
    /// Hand it back for a retry, after the policy's backoff or an explicit delay.
    Nack(Option<Duration>),
    /// Send it to the dead-letter path with this reason.
    Reject(String),
    /// Forget the handle (the driver turns this into a nack).
    Drop,
}

/// An [`Action`] and when the application takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// Processing time before doing it.
    pub after: Duration,
}

impl Decision {
    /// `action` after `after`.
    pub fn new(action: Action, after: Duration) -> Self {
        Self { action, after }
    }
}

/// The application under simulation: decides what to do with each delivery.
///
/// Any `FnMut(&Message, &mut SimRng) -> Decision` is a handler, so a user can test their
/// own handler logic under faults with a seed.
pub trait Handler {
    /// Decides the fate of one delivery. `rng` is the simulation's seeded application stream.
    fn handle(&mut self, delivery: &Message, rng: &mut SimRng) -> Decision;
}

impl<F: FnMut(&Message, &mut SimRng) -> Decision> Handler for F {
    fn handle(&mut self, delivery: &Message, rng: &mut SimRng) -> Decision {
        self(delivery, rng)
    }
}

/// The application model's knobs: how it acks, nacks, rejects and drops, how slow it is, and
/// how often it pauses, seeks and commits on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct AppBehaviour {
    /// Fraction of messages that are poison: always nacked or rejected.
    pub poison_rate: f64,
    /// Probability that a poison delivery is rejected rather than nacked.
    pub poison_reject_rate: f64,
    /// Probability that an ordinary delivery is nacked.
    pub nack_rate: f64,
    /// Probability that a nack carries an explicit delay.
    pub nack_delay_rate: f64,
    /// Largest explicit nack delay.
    pub nack_delay_max: Duration,
    /// Probability that an ordinary delivery is rejected.
    pub reject_rate: f64,
    /// Probability that a delivery's handle is dropped.
    pub drop_rate: f64,
    /// Smallest processing time.
    pub delay_min: Duration,
    /// Largest ordinary processing time.
    pub delay_max: Duration,
    /// Probability of a slow delivery.
    pub slow_rate: f64,
    /// Largest processing time of a slow delivery.
    pub slow_max: Duration,
    /// Expected pauses per simulated second (before heal).
    pub pause_per_sec: f64,
    /// Longest pause.
    pub pause_max: Duration,
    /// Expected seeks per simulated second (before heal).
    pub seek_per_sec: f64,
    /// Expected on-demand commits per simulated second.
    pub commit_per_sec: f64,
}

impl AppBehaviour {
    /// A well-behaved application: acks everything within `delay`.
    pub fn well_behaved(delay: Duration) -> Self {
        Self {
            poison_rate: 0.0,
            poison_reject_rate: 0.0,
            nack_rate: 0.0,
            nack_delay_rate: 0.0,
            nack_delay_max: Duration::ZERO,
            reject_rate: 0.0,
            drop_rate: 0.0,
            delay_min: Duration::ZERO,
            delay_max: delay,
            slow_rate: 0.0,
            slow_max: delay,
            pause_per_sec: 0.0,
            pause_max: Duration::ZERO,
            seek_per_sec: 0.0,
            commit_per_sec: 0.0,
        }
    }

    /// Swarm-style: each misbehaviour on or off by a coin flip, with a random rate.
    pub fn from_rng(rng: &mut SimRng) -> Self {
        let on = |rng: &mut SimRng, p: f64, lo: f64, hi: f64| {
            if rng.chance(p) {
                lo + (hi - lo) * (rng.range(0, 1000) as f64 / 1000.0)
            } else {
                0.0
            }
        };
        let delay_min = rng.millis(0, 2);
        let delay_max = delay_min + rng.millis(0, 50);
        Self {
            poison_rate: on(rng, 0.7, 0.01, 0.1),
            poison_reject_rate: on(rng, 0.5, 0.2, 1.0),
            nack_rate: on(rng, 0.5, 0.01, 0.2),
            nack_delay_rate: on(rng, 0.5, 0.1, 0.9),
            nack_delay_max: rng.millis(1, 300),
            reject_rate: on(rng, 0.3, 0.005, 0.05),
            drop_rate: on(rng, 0.3, 0.005, 0.05),
            delay_min,
            delay_max,
            slow_rate: on(rng, 0.4, 0.01, 0.1),
            slow_max: delay_max + rng.millis(0, 2_000),
            pause_per_sec: on(rng, 0.3, 0.1, 2.0),
            pause_max: rng.millis(1, 1_000),
            seek_per_sec: on(rng, 0.2, 0.05, 0.5),
            commit_per_sec: on(rng, 0.3, 0.2, 5.0),
        }
    }

    /// True when the offset is poison under this behaviour and `seed`.
    pub fn is_poison(&self, seed: u64, partition: u32, offset: u64) -> bool {
        let mut rng = SimRng::new(seed ^ (u64::from(partition) << 40) ^ offset);
        rng.chance(self.poison_rate)
    }
}

/// Concurrent processing as `Consumer::process` does it: deliveries go through the core's
/// [`Scheduler`] (lanes per key or partition, bounded queues, holds for redeliveries) before
/// the handler's processing time starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessModel {
    /// Which deliveries may overlap.
    pub order_by: OrderBy,
    /// The scheduler's bounds.
    pub limits: Limits,
    /// Distinct keys: a message's key is drawn from this many by its partition and offset.
    pub keys: u64,
}

impl ProcessModel {
    /// About half the seeds process concurrently: a small key set, small bounds.
    pub fn from_rng(rng: &mut SimRng) -> Option<Self> {
        if !rng.chance(0.5) {
            return None;
        }
        let order_by = rng.pick(&[
            OrderBy::Key,
            OrderBy::Key,
            OrderBy::Partition,
            OrderBy::Unordered,
        ]);
        Some(Self {
            order_by,
            limits: Limits {
                concurrency: rng.range_usize(1, 16),
                max_waiting_per_lane: rng.range_usize(1, 8),
                max_waiting: rng.range_usize(1, 32),
            },
            keys: rng.range(1, 8),
        })
    }

    /// The key of a message: the record's own, or one of `keys` drawn by its position.
    pub fn key_of(&self, d: &Message) -> Bytes {
        if let Some(key) = &d.record.key {
            return key.clone();
        }
        let mut rng = SimRng::new((u64::from(d.tag.partition) << 40) ^ d.tag.offset ^ 0x006b_6579);
        Bytes::from(format!("k{}", rng.range(0, self.keys - 1)))
    }

    /// The lane a delivery runs in, as the checker names it (`None`: unordered).
    fn lane(&self, partition: u32, key: &Bytes) -> Option<String> {
        match self.order_by {
            OrderBy::Key => Some(format!("key {}", String::from_utf8_lossy(key))),
            OrderBy::Partition => Some(format!("partition {partition}")),
            _ => None,
        }
    }
}

/// The scheduler between deliveries and the application, and what waits in front of it.
#[derive(Debug)]
pub(super) struct ProcessState {
    model: ProcessModel,
    scheduler: Scheduler<u64>,
    /// Work delivered but not pushed yet (the driver's inbox while the scheduler is full).
    inbox: VecDeque<u64>,
    /// Started work: its ticket and lane.
    started: BTreeMap<u64, (Ticket, Option<String>)>,
    /// Holds for redeliveries: (partition, offset) -> the generation of the nacked delivery.
    holds: BTreeMap<(u32, u64), u64>,
    max_retry_attempts: u32,
}

impl ProcessState {
    /// The state for `model`; the total bound leaves room for a redelivery under
    /// `max_unacked`, as `Consumer::process` does.
    pub(super) fn new(model: &ProcessModel, max_unacked: usize, max_retry_attempts: u32) -> Self {
        let mut limits = model.limits;
        limits.max_waiting = limits.max_waiting.min(max_unacked.saturating_sub(1)).max(1);
        Self {
            scheduler: Scheduler::new(model.order_by, limits),
            model: model.clone(),
            inbox: VecDeque::new(),
            started: BTreeMap::new(),
            holds: BTreeMap::new(),
            max_retry_attempts,
        }
    }
}

impl ProcessState {
    /// A live configuration update changed the retry limit: a nack from now on redelivers
    /// under the new one (as the driver's nack reply says).
    pub(super) fn set_max_retry_attempts(&mut self, max_retry_attempts: u32) {
        self.max_retry_attempts = max_retry_attempts;
    }
}

/// The application model driven by [`AppBehaviour`]; the default [`Handler`].
#[derive(Debug, Clone)]
pub struct ModelApp {
    behaviour: AppBehaviour,
    seed: u64,
}

impl ModelApp {
    /// The model for `behaviour`; `seed` decides which messages are poison.
    pub fn new(behaviour: AppBehaviour, seed: u64) -> Self {
        Self { behaviour, seed }
    }
}

impl Handler for ModelApp {
    fn handle(&mut self, d: &Message, rng: &mut SimRng) -> Decision {
        let b = &self.behaviour;
        let ms = |x: Duration| x.as_millis() as u64;
        let after = if rng.chance(b.slow_rate) {
            rng.millis(ms(b.delay_min), ms(b.slow_max))
        } else {
            rng.millis(ms(b.delay_min), ms(b.delay_max))
        };
        let nack = |rng: &mut SimRng| {
            if rng.chance(b.nack_delay_rate) {
                Action::Nack(Some(rng.millis(0, ms(b.nack_delay_max))))
            } else {
                Action::Nack(None)
            }
        };
        let action = if b.is_poison(self.seed, d.tag.partition, d.tag.offset) {
            if rng.chance(b.poison_reject_rate) {
                Action::Reject(format!("poison at {}", d.tag.offset))
            } else {
                nack(rng)
            }
        } else if rng.chance(b.drop_rate) {
            Action::Drop
        } else if rng.chance(b.reject_rate) {
            Action::Reject("handler refused".to_owned())
        } else if rng.chance(b.nack_rate) {
            nack(rng)
        } else {
            Action::Ack
        };
        Decision::new(action, after)
    }
}

impl<H: Handler> Simulation<H> {
    pub(super) fn command_result(
        &mut self,
        r: Result<(), UsageError>,
        what: &str,
    ) -> Result<(), Violation> {
        match r {
            Ok(()) => self.after_input(),
            Err(UsageError::Closed) if self.phase == Phase::Closing => Ok(()),
            Err(e) => Err(self.checker.command_refused(format!("{what} refused: {e}"))),
        }
    }

    pub(super) fn app_done(&mut self, key: u64) -> Result<(), Violation> {
        let Some(started) = self.process.as_mut().and_then(|ps| ps.started.remove(&key)) else {
            return self.settle_work(key);
        };
        let redelivery = self.work.get(&key).and_then(|w| {
            let nack = matches!(w.action, Action::Nack(_) | Action::Drop);
            (nack && !self.checker.is_stale(w.tag.partition, w.generation))
                .then_some((w.tag, w.generation))
        });
        self.settle_work(key)?;
        let (ticket, lane) = started;
        if let Some(lane) = &lane {
            self.checker.lane_finished(lane);
        }
        let open = self.machine.as_ref().is_some_and(|m| !m.is_closed());
        let Some(ps) = &mut self.process else {
            return Ok(());
        };
        let finish = match redelivery {
            // The nack was accepted (a refusal is a violation already): a redelivery comes
            // unless attempts ran out.
            Some((tag, generation)) if open && tag.attempt <= ps.max_retry_attempts => {
                ps.holds.insert((tag.partition, tag.offset), generation);
                Finish::Redeliver
            }
            _ => Finish::Done,
        };
        ps.scheduler.finish(ticket, finish);
        self.pump_process()
    }

    /// Moves work from the inbox into the scheduler while it has room, drops stale work and
    /// void holds, and starts whatever may start (its processing time begins now).
    fn pump_process(&mut self) -> Result<(), Violation> {
        let Some(ps) = &mut self.process else {
            return Ok(());
        };
        let (work, checker) = (&mut self.work, &self.checker);
        let stale = |w: &Work| checker.is_stale(w.tag.partition, w.generation);
        let dropped = ps
            .scheduler
            .drop_waiting(|_, _, key| work.get(key).is_none_or(stale));
        ps.inbox
            .retain(|key| work.get(key).is_some_and(|w| !stale(w)));
        let holds = &mut ps.holds;
        ps.scheduler.release_holds(|partition, offset| {
            let void = holds
                .get(&(partition, offset))
                .is_none_or(|&generation| checker.is_stale(partition, generation));
            if void {
                holds.remove(&(partition, offset));
            }
            void
        });
        for key in dropped {
            work.remove(&key);
        }
        while ps.scheduler.has_room() {
            let Some(key) = ps.inbox.pop_front() else {
                break;
            };
            let Some(w) = work.get(&key) else {
                continue;
            };
            let (partition, offset) = (w.tag.partition, w.tag.offset);
            ps.holds.remove(&(partition, offset));
            let pushed = ps
                .scheduler
                .push(partition, offset, w.lane_key.as_ref(), key);
            debug_assert!(pushed.is_ok(), "room was checked");
        }
        let mut starts = Vec::new();
        while let Some((ticket, key)) = ps.scheduler.start() {
            let Some(w) = work.get(&key) else {
                ps.scheduler.finish(ticket, Finish::Done);
                continue;
            };
            let lane = w
                .lane_key
                .as_ref()
                .and_then(|k| ps.model.lane(w.tag.partition, k));
            starts.push((key, w.tag, w.generation, w.after, lane.clone()));
            ps.started.insert(key, (ticket, lane));
        }
        for (key, tag, generation, after, lane) in starts {
            if let Some(lane) = &lane {
                self.checker.lane_started(lane, tag, generation)?;
            }
            self.schedule(after, Item::AppDone(key));
        }
        Ok(())
    }

    /// Settles one piece of work as its action says, and checks the answer.
    fn settle_work(&mut self, key: u64) -> Result<(), Violation> {
        let Some(w) = self.work.get(&key) else {
            return Ok(());
        };
        let (tag, generation, action) = (w.tag, w.generation, w.action.clone());
        let honest_ack = self.mutation != Mutation::AckBeforeSideEffect;
        let removed = if action != Action::Ack || honest_ack {
            self.work.remove(&key)
        } else {
            None
        };
        if action == Action::Ack && honest_ack {
            // The side effect first, then the ack.
            self.checker
                .side_effect(tag.partition, tag.offset, generation);
        }
        self.trace("app", &(&action, tag));
        let now = self.now;
        let stale = self.checker.is_stale(tag.partition, generation);
        let before = self
            .machine
            .as_ref()
            .and_then(|m| m.settle_watermark(tag.partition));
        if action != Action::Ack {
            if let Some(w) = removed {
                let record = w.record;
                self.machine().give_back(now, Message { tag, record });
            }
        }
        let r = match &action {
            Action::Ack => self.machine().ack(now, tag),
            Action::Nack(delay) => self.machine().nack(now, tag, *delay),
            Action::Reject(reason) => self.machine().reject(now, tag, reason),
            Action::Drop => {
                debug!(
                    partition = tag.partition,
                    offset = tag.offset,
                    "handle dropped: nack"
                );
                self.machine().nack(now, tag, None)
            }
        };
        let closed = self.machine.as_ref().is_some_and(|m| m.is_closed());
        if stale && !(closed && r == Err(UsageError::Closed)) {
            let after = self
                .machine
                .as_ref()
                .and_then(|m| m.settle_watermark(tag.partition));
            self.checker.on_stale_handback(
                tag.partition,
                tag.offset,
                r.as_ref().map(|_| ()),
                before,
                after,
            )?;
            return Ok(());
        }
        match r {
            Ok(()) => {
                if matches!(action, Action::Ack) {
                    self.report.acked += 1;
                }
                self.checker
                    .handed_back(tag.partition, tag.offset, generation);
                self.after_input()
            }
            Err(UsageError::Closed) if self.machine.as_ref().is_some_and(|m| m.is_closed()) => {
                Ok(())
            }
            Err(e) => Err(self
                .checker
                .command_refused(format!("{action:?} of {tag:?} refused: {e}"))),
        }
    }

    pub(super) fn on_deliver(&mut self, d: Message) -> Result<(), Violation> {
        let generation = self.checker.generation(d.tag.partition);
        let decision = self.handler.handle(&d, &mut self.app_rng);
        self.trace("decide", &decision);
        let key = self.next_work;
        self.next_work += 1;
        let ack = decision.action == Action::Ack;
        let lane_key = self.process.as_ref().map(|ps| ps.model.key_of(&d));
        self.work.insert(
            key,
            Work {
                tag: d.tag,
                generation,
                action: decision.action,
                after: decision.after,
                lane_key,
                record: d.record,
            },
        );
        if let Some(ps) = &mut self.process {
            ps.inbox.push_back(key);
            return self.pump_process();
        }
        match self.mutation {
            Mutation::AckBeforeSideEffect if ack => {
                self.schedule(Duration::ZERO, Item::AppDone(key));
                self.schedule(decision.after, Item::SideEffect(key));
            }
            Mutation::CommitAtDelivery => {
                self.schedule(decision.after, Item::AppDone(key));
                self.rogue_commit(d.tag.partition, d.tag.offset + 1)?;
            }
            _ => self.schedule(decision.after, Item::AppDone(key)),
        }
        Ok(())
    }
}
