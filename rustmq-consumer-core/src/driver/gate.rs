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
//! current, queues the tag in `pending` and returns `Ok` at once (waking the driver when the
//! queue was empty). Otherwise it falls back to the command and its reply, so every refusal is
//! still the machine's own `UsageError`.
//!
//! Why an `Ok` from the gate is the truth: the driver holds the lock whenever it touches the
//! machine, and before feeding the machine any input it applies every pending ack. So a queued
//! ack reaches the machine before anything that could have made it stale, and the generation an
//! ack is checked against is never behind the machine. (The lock is held for one input and its
//! outputs, never across an `.await`; the machine itself stays owned by the driver task.)
//!
//! Bounded: `pending` holds at most one ack per outstanding delivery, and the machine never has
//! more than `max_unacked` outstanding; the gate refuses (slow path) past that capacity anyway.

// Driver glue beside the sans-IO machine, not part of it (like `quic`): one `std::sync::Mutex`
// guards the gate's few fields, held by the driver for one batch of inputs and by an ack for a
// push, never across an `.await`. The machine itself is still owned by value, lock-free.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

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
    /// Per partition, the generation its last seek or revoke moved the gate to: a delivery of
    /// it stamped earlier is certainly stale (`Consumer::process` drops its queued work).
    invalidated: HashMap<u32, u64>,
    capacity: usize,
}

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
                invalidated: HashMap::new(),
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
    pub(crate) fn try_ack(&self, tag: DeliveryTag, generation: u64) -> bool {
        let mut state = self.lock();
        if !state.accepts(generation) {
            return false;
        }
        let was_empty = state.pending.is_empty();
        state.pending.push(tag);
        drop(state);
        if was_empty {
            self.wake_driver();
        }
        true
    }

    /// Queues every ack of `stamped` that the machine is certain to accept, under one lock;
    /// returns the rest, for the slow path.
    pub(crate) fn try_ack_many<T>(
        &self,
        stamped: impl IntoIterator<Item = (DeliveryTag, u64, T)>,
    ) -> Vec<T> {
        let mut refused = Vec::new();
        let mut state = self.lock();
        let was_empty = state.pending.is_empty();
        for (tag, generation, item) in stamped {
            if state.accepts(generation) {
                state.pending.push(tag);
            } else {
                refused.push(item);
            }
        }
        let queued = !state.pending.is_empty();
        drop(state);
        if was_empty && queued {
            self.wake_driver();
        }
        refused
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

    fn accepts(&self, generation: u64) -> bool {
        self.open && self.generation == generation && self.pending.len() < self.capacity
    }
}
