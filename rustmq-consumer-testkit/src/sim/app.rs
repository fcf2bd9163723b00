//! The application under simulation: what it decides for each delivery ([`Handler`],
//! [`ModelApp`] on [`AppBehaviour`]), and how the loop carries those decisions out on the
//! machine.

use std::time::Duration;

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
        let Some(w) = self.work.get(&key) else {
            return Ok(());
        };
        let (tag, generation, action) = (w.tag, w.generation, w.action.clone());
        let honest_ack = self.mutation != Mutation::AckBeforeSideEffect;
        if action != Action::Ack || honest_ack {
            self.work.remove(&key);
        }
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
        self.work.insert(
            key,
            Work {
                tag: d.tag,
                generation,
                action: decision.action,
            },
        );
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
