//! The ack gate: acks the driver is certain to accept, settled without a round trip.
//!
//! An ack used to be a command with a reply channel: two task switches and a fresh channel per
//! message, which capped the whole consumer at a few hundred thousand messages a second. Yet
//! the state machine refuses the ack of a delivery handle for only three reasons: the
//! partition was sought or revoked since (lost to another member: a partition given back in a
//! rebalance keeps accepting its acks), or the consumer is closed. The
//! driver knows when any of those can have happened, so it keeps a *generation* here and bumps
//! it whenever they might have (a seek, an `Assigned` or `Revoked` event, the close), and stamps
//! every delivery with the generation current when the machine emitted it.
//!
//! `Delivery::ack` then takes the gate's lock and, if the gate is open and the stamp is still
//! current, queues the tag in `pending` and returns `Ok` at once. Otherwise it falls back to
//! the command and its reply, so every refusal is still the machine's own `UsageError`.
//!
//! Waking the driver is the expensive part of an ack (on another thread, a syscall), so acks
//! wake it in batches: the driver sets `kick_at` at the end of every round, 1 (the first
//! queued ack wakes it) when nothing else will, and a quarter of `max_unacked` while a request
//! is in flight, whose answer wakes it anyway (every round applies the queued acks first; the
//! driver also looks at least every quarter of `ack_batch_timeout` then, so a commit is not
//! held up by a slow answer). An application about to wait for a delivery wakes it whatever
//! is queued ([`AckGate::kick_if_pending`]): its acks free the credit for the next ones.
//!
//! Why an `Ok` from the gate is the truth: the driver holds the lock whenever it feeds the
//! machine, and before feeding the machine any input it applies every pending ack. So a queued
//! ack reaches the machine before anything that could have made it stale, and the generation an
//! ack is checked against is never behind the machine. (The lock is held for one input and its
//! outputs, not while an answer is read and decoded nor while deliveries go to the inbox, and
//! never across an `.await`; the machine itself stays owned by the driver task.)
//!
//! Bounded: `pending` holds at most one ack per outstanding delivery, and the machine never has
//! more than `max_unacked` outstanding; the gate refuses (slow path) past that capacity anyway.

// Driver glue beside the sans-IO machine, not part of it (like `quic`): one `std::sync::Mutex`
// guards the gate's few fields, held by the driver for one batch of inputs and by an ack for a
// push, never across an `.await`. The machine itself is still owned by value, lock-free.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_channel::{Receiver, Sender};

use crate::event::DeliveryTag;

/// Shared between a consumer's handles and its driver task.
#[derive(Debug)]
pub(crate) struct AckGate {
    state: Mutex<GateState>,
    /// Capacity one: a token means "pending acks to apply".
    kick: Sender<()>,
}

/// What the lock protects.
#[derive(Debug)]
pub(crate) struct GateState {
    /// Bumped by the driver whenever outstanding deliveries may have gone stale.
    pub(crate) generation: u64,
    /// False once the machine is closed or the driver has stopped.
    pub(crate) open: bool,
    /// Acks accepted by the gate, not yet applied to the machine.
    pub(crate) pending: Vec<DeliveryTag>,
    /// How many queued acks wake the driver (see the module docs); set by the driver.
    pub(crate) kick_at: usize,
    /// Per partition, the generation its last seek or revoke moved the gate to: a delivery of
    /// it stamped earlier is certainly stale (`Consumer::process` drops its queued work).
    invalidated: HashMap<u32, u64>,
    /// The group member id deliveries are made under, from the generation it took effect
    /// (oldest first, at most [`MEMBERS_KEPT`]); none before a group assignment, and in a
    /// manual one. Read only for a delivery's span, when tracing records it.
    members: VecDeque<(u64, Arc<str>)>,
    capacity: usize,
}

/// Member ids remembered: a delivery waiting in the inbox through more joins than this, each
/// under a new member id, has its span name the oldest one kept.
const MEMBERS_KEPT: usize = 16;

impl AckGate {
    /// A gate for a consumer with at most `capacity` outstanding deliveries; the receiver is
    /// the driver's wake-up.
    pub(crate) fn new(capacity: usize) -> (Self, Receiver<()>) {
        let (kick, kicked) = async_channel::bounded(1);
        let gate = Self {
            state: Mutex::new(GateState {
                generation: 0,
                open: true,
                pending: Vec::with_capacity(capacity),
                kick_at: 1,
                invalidated: HashMap::new(),
                members: VecDeque::new(),
                capacity,
            }),
            kick,
        };
        (gate, kicked)
    }

    /// Locks the gate. A panic while it was held cannot leave it inconsistent (every update is
    /// a single push, drain or assignment), so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the ack of a delivery stamped `generation` if the machine is certain to accept
    /// it; false means the caller must ask the driver.
    #[inline]
    pub(crate) fn try_ack(&self, tag: DeliveryTag, generation: u64) -> bool {
        let mut state = self.lock();
        if !state.accepts(generation) {
            return false;
        }
        state.pending.push(tag);
        let kick = state.pending.len() == state.kick_at;
        drop(state);
        if kick {
            self.wake_driver();
        }
        true
    }

    /// Queues every ack of `stamped` (tag, generation, settled flag) that the machine is
    /// certain to accept, under one lock, and sets its flag; the others are left for the
    /// slow path.
    pub(crate) fn try_ack_each<'a>(
        &self,
        stamped: impl IntoIterator<Item = (DeliveryTag, u64, &'a mut bool)>,
    ) {
        let mut state = self.lock();
        let before = state.pending.len();
        for (tag, generation, settled) in stamped {
            if state.accepts(generation) {
                state.pending.push(tag);
                *settled = true;
            }
        }
        let kick = before < state.kick_at && state.pending.len() >= state.kick_at;
        drop(state);
        if kick {
            self.wake_driver();
        }
    }

    /// Wakes the driver if acks are queued: the application is about to wait for a
    /// delivery, which those acks may be holding back (they free the machine's credit).
    pub(crate) fn kick_if_pending(&self) {
        let pending = !self.lock().pending.is_empty();
        if pending {
            self.wake_driver();
        }
    }

    /// True when a delivery of `partition` stamped `generation` can no longer be settled: its
    /// partition was sought or revoked since, or the consumer is closed. False says nothing.
    pub(crate) fn known_stale(&self, partition: u32, generation: u64) -> bool {
        let state = self.lock();
        !state.open
            || state
                .invalidated
                .get(&partition)
                .is_some_and(|&since| since > generation)
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The group member id deliveries stamped `generation` were made under; `None` outside a
    /// group assignment.
    pub(crate) fn member_at(&self, generation: u64) -> Option<Arc<str>> {
        let state = self.lock();
        let mut members = state.members.iter().rev();
        let found = members
            .clone()
            .find(|(since, _)| *since <= generation)
            .or_else(|| members.next_back());
        found.map(|(_, member)| Arc::clone(member))
    }

    fn wake_driver(&self) {
        // Full: a token is already there and the driver will apply this ack with the others.
        // Closed: the driver is gone, and it closed the gate before that under the lock, so
        // this ack could not have been queued.
        let _ = self.kick.try_send(());
    }
}

impl GateState {
    /// Records that every delivery of `partitions` stamped before now is stale (called by the
    /// driver after bumping the generation for a seek or a revoke).
    pub(crate) fn invalidate(&mut self, partitions: &[u32]) {
        for &partition in partitions {
            self.invalidated.insert(partition, self.generation);
        }
    }

    /// Deliveries from the current generation on are made under group member `member_id`.
    pub(crate) fn joined_as(&mut self, member_id: &str) {
        if self
            .members
            .back()
            .is_some_and(|(_, member)| **member == *member_id)
        {
            return;
        }
        if self.members.len() == MEMBERS_KEPT {
            self.members.pop_front();
        }
        self.members
            .push_back((self.generation, Arc::from(member_id)));
    }

    /// Acks queued at most (`max_unacked`).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn accepts(&self, generation: u64) -> bool {
        self.open && self.generation == generation && self.pending.len() < self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(offset: u64) -> DeliveryTag {
        DeliveryTag {
            partition: 0,
            offset,
            epoch: 0,
            attempt: 1,
        }
    }

    /// With nothing else to wake the driver the first queued ack does; while an answer will,
    /// acks wake it once `kick_at` are queued; an application about to wait wakes it for any.
    #[test]
    fn acks_wake_the_driver_at_kick_at_or_before_a_wait() {
        let (gate, kicked) = AckGate::new(8);
        assert!(gate.try_ack(tag(0), 0));
        assert!(
            kicked.try_recv().is_ok(),
            "the first ack wakes an idle driver"
        );
        gate.lock().pending.clear();
        gate.lock().kick_at = 3;
        assert!(gate.try_ack(tag(1), 0) && gate.try_ack(tag(2), 0));
        assert!(
            kicked.try_recv().is_err(),
            "two of three: the answer will wake it"
        );
        assert!(gate.try_ack(tag(3), 0));
        assert!(kicked.try_recv().is_ok(), "the third wakes it");
        gate.lock().pending.clear();
        assert!(gate.try_ack(tag(4), 0));
        gate.kick_if_pending();
        assert!(kicked.try_recv().is_ok(), "about to wait: woken for one");
        gate.lock().pending.clear();
        gate.kick_if_pending();
        assert!(kicked.try_recv().is_err(), "nothing queued: not woken");
        let mut settled = [false; 4];
        let batch = settled
            .iter_mut()
            .enumerate()
            .map(|(i, settled)| (tag(10 + i as u64), 0, settled));
        gate.try_ack_each(batch);
        assert!(settled.iter().all(|&s| s), "all queued");
        assert!(
            kicked.try_recv().is_ok(),
            "a batch crossing kick_at wakes it"
        );
        assert!(
            !gate.try_ack(tag(20), 1),
            "a stale stamp takes the slow path"
        );
    }

    /// A delivery's span names the member id in force at its generation: the latest join at
    /// or before it, the oldest kept for one older than every join remembered.
    #[test]
    fn the_member_of_a_generation_is_the_one_joined_at_or_before_it() {
        let (gate, _kicked) = AckGate::new(8);
        assert_eq!(gate.member_at(0), None, "no group assignment: none");
        let join = |generation: u64, member: &str| {
            let mut state = gate.lock();
            state.generation = generation;
            state.joined_as(member);
        };
        join(2, "a");
        join(3, "a"); // the same member again: nothing new
        join(5, "b");
        let at = |generation| gate.member_at(generation).map(|m| m.to_string());
        assert_eq!(at(2).as_deref(), Some("a"));
        assert_eq!(at(4).as_deref(), Some("a"));
        assert_eq!(at(5).as_deref(), Some("b"));
        assert_eq!(at(9).as_deref(), Some("b"));
        assert_eq!(
            at(1).as_deref(),
            Some("a"),
            "older than every join: the oldest"
        );
        for generation in 10..10 + MEMBERS_KEPT as u64 {
            join(generation, &format!("m{generation}"));
        }
        assert_eq!(gate.lock().members.len(), MEMBERS_KEPT, "bounded");
        assert_eq!(at(5).as_deref(), Some("m10"), "forgotten: the oldest kept");
        assert_eq!(at(12).as_deref(), Some("m12"));
    }
}
