//! The inbox: deliveries the driver has handed over and the application has not taken yet,
//! held per partition while the partition is paused.
//!
//! A pause must take effect at once for the application: deliveries the machine emitted before
//! the pause, still queued here, must not come out of `receive()`, `receive_many()` or the
//! stream until the resume, and then in order. A plain channel cannot hold some of its items
//! back, so the queue is this: one FIFO of takeable deliveries plus, per paused partition, the
//! deliveries it holds. The driver pauses and resumes it (after the machine accepted the
//! command, before replying), so when `pause_partitions` returns nothing of those partitions
//! can be taken.
//!
//! Bounded: the driver pushes only while fewer than `capacity` (`max_unacked`) deliveries are
//! queued, held ones included, and otherwise waits for room. The machine never has more than
//! `max_unacked` deliveries outstanding; stale ones (after a seek or a revoke) are discarded
//! here by the driver rather than handed out.

// Driver glue beside the sans-IO machine, like `gate`: one `std::sync::Mutex`, held for a few
// queue operations, never across an `.await`.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use event_listener::{Event, EventListener};

use super::deliveries::Deliveries;
use super::task::Stamped;

/// Shared by the driver (pushes, pauses, discards) and the consumer handles (take).
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Notified when a delivery becomes takeable or the inbox closes.
    readable: Event,
    /// Notified when room frees up while the inbox was full.
    writable: Event,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Takeable deliveries, in the order the machine emitted them.
    ready: Deliveries,
    /// One entry per paused partition: what it holds, oldest first.
    held: HashMap<u32, VecDeque<Stamped>>,
    /// Deliveries in `ready` and `held`.
    len: usize,
    closed: bool,
}

/// What a non-blocking take found.
pub(crate) enum Take {
    Delivery(Stamped),
    Empty,
    Closed,
}

fn partition(stamped: &Stamped) -> u32 {
    stamped.delivery.tag.partition
}

impl Inbox {
    /// An inbox for at most `capacity` queued deliveries.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            readable: Event::new(),
            writable: Event::new(),
            capacity,
        }
    }

    /// A panic while the lock was held cannot leave the queues inconsistent with the count
    /// in a way that matters for safety (the count only bounds pushes), so a poisoned lock is
    /// used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ------------------------------------------------------------------ the driver's side

    /// Moves deliveries from the front of `backlog` while there is room; returns a listener
    /// for room when some are left (already re-checked: wait on it), `None` when all went in.
    /// Once closed, the backlog is dropped.
    pub(crate) fn push(&self, backlog: &mut Deliveries) -> Option<EventListener> {
        if self.try_push(backlog) {
            return None;
        }
        let listener = self.writable.listen();
        // Room may have freed up between the first try and the listener.
        if self.try_push(backlog) {
            return None;
        }
        Some(listener)
    }

    /// True once the backlog is empty.
    fn try_push(&self, backlog: &mut Deliveries) -> bool {
        let mut state = self.lock();
        if state.closed {
            backlog.clear();
            return true;
        }
        let mut takeable = false;
        if state.ready.is_empty()
            && state.held.is_empty()
            && backlog.len() <= self.capacity.saturating_sub(state.len)
        {
            // The common case (the application keeps up, nothing paused): the whole backlog
            // becomes the takeable queue, without moving each delivery.
            std::mem::swap(&mut state.ready, backlog);
            state.len += state.ready.len();
            takeable = !state.ready.is_empty();
        }
        while state.len < self.capacity {
            let Some(stamped) = backlog.pop_front() else {
                break;
            };
            state.len += 1;
            match state.held.get_mut(&partition(&stamped)) {
                Some(held) => held.push_back(stamped),
                None => {
                    state.ready.push_back(stamped);
                    takeable = true;
                }
            }
        }
        drop(state);
        if takeable {
            self.readable.notify(usize::MAX);
        }
        backlog.is_empty()
    }

    /// Holds every queued and future delivery of `partitions` until `resume`.
    pub(crate) fn pause(&self, partitions: &[u32]) {
        let mut state = self.lock();
        let state = &mut *state;
        for &p in partitions {
            state.held.entry(p).or_default();
        }
        let paused: Vec<u32> = state.held.keys().copied().collect();
        // Paused partitions hold nothing newer than what was ready: order kept.
        for stamped in state.ready.take_partitions(&paused) {
            if let Some(held) = state.held.get_mut(&partition(&stamped)) {
                held.push_back(stamped);
            }
        }
    }

    /// Releases what `partitions` held, in order, behind what is already takeable.
    pub(crate) fn resume(&self, partitions: &[u32]) {
        let mut state = self.lock();
        let mut takeable = false;
        for p in partitions {
            if let Some(held) = state.held.remove(p) {
                takeable |= !held.is_empty();
                for stamped in held {
                    state.ready.push_back(stamped);
                }
            }
        }
        drop(state);
        if takeable {
            self.readable.notify(usize::MAX);
        }
    }

    /// Drops the queued deliveries of `partitions`, which went stale (sought or revoked);
    /// `unpause` also forgets their pause (revoked: the machine forgot it too). Returns how many
    /// were dropped.
    pub(crate) fn discard(&self, partitions: &[u32], unpause: bool) -> usize {
        let mut state = self.lock();
        let state = &mut *state;
        let before = state.len;
        drop(state.ready.take_partitions(partitions));
        for p in partitions {
            if unpause {
                state.held.remove(p);
            } else if let Some(held) = state.held.get_mut(p) {
                held.clear();
            }
        }
        state.len = state.ready.len() + state.held.values().map(VecDeque::len).sum::<usize>();
        let dropped = before - state.len;
        if dropped > 0 && before >= self.capacity {
            self.writable.notify(usize::MAX);
        }
        dropped
    }

    /// Takes the queued deliveries of `partitions`, held ones included (a revoke hook's
    /// partitions hand them back), keeping their pause.
    pub(crate) fn take_partitions(&self, partitions: &[u32]) -> Vec<Stamped> {
        let mut state = self.lock();
        let state = &mut *state;
        let before = state.len;
        let mut taken = state.ready.take_partitions(partitions);
        for p in partitions {
            if let Some(held) = state.held.get_mut(p) {
                taken.extend(held.drain(..));
            }
        }
        state.len -= taken.len();
        if !taken.is_empty() && before >= self.capacity {
            self.writable.notify(usize::MAX);
        }
        taken
    }

    /// Takes every queued delivery, held ones included (the close hands them back).
    pub(crate) fn take_all(&self) -> Vec<Stamped> {
        let mut state = self.lock();
        let state = &mut *state;
        state.len = 0;
        let mut all: Vec<Stamped> = state.ready.drain().collect();
        for held in state.held.values_mut() {
            all.extend(held.drain(..));
        }
        all
    }

    /// No more deliveries: takers get `None` once it is empty, which this makes it.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.ready.clear();
        state.held.clear();
        state.len = 0;
        drop(state);
        self.readable.notify(usize::MAX);
        self.writable.notify(usize::MAX);
    }

    // ------------------------------------------------------------------ the application's side

    /// The next takeable delivery, without waiting.
    pub(crate) fn try_take(&self) -> Take {
        if let Some(stamped) = self.try_pop() {
            return Take::Delivery(stamped);
        }
        // A push in between is seen by the caller's next look (after it listens).
        if self.lock().closed {
            Take::Closed
        } else {
            Take::Empty
        }
    }

    /// The next takeable delivery, without waiting: [`try_take`](Self::try_take) when only a
    /// delivery matters (the receive fast path).
    #[inline]
    pub(crate) fn try_pop(&self) -> Option<Stamped> {
        let mut state = self.lock();
        let stamped = state.ready.pop_front()?;
        let was_full = state.len >= self.capacity;
        state.len -= 1;
        drop(state);
        if was_full {
            self.writable.notify(1);
        }
        Some(stamped)
    }

    /// Up to `max` takeable deliveries appended to `out`, without waiting, under one lock.
    pub(crate) fn take_many(&self, max: usize, out: &mut Vec<Stamped>) {
        let mut state = self.lock();
        let n = max.min(state.ready.len());
        if n == 0 {
            return;
        }
        let was_full = state.len >= self.capacity;
        state.len -= n;
        out.extend(state.ready.drain().take(n));
        drop(state);
        if was_full {
            self.writable.notify(1);
        }
    }

    /// The next takeable delivery; `None` once closed.
    pub(crate) async fn take(&self) -> Option<Stamped> {
        loop {
            match self.try_take() {
                Take::Delivery(stamped) => return Some(stamped),
                Take::Closed => return None,
                Take::Empty => {}
            }
            let listener = self.readable.listen();
            match self.try_take() {
                Take::Delivery(stamped) => return Some(stamped),
                Take::Closed => return None,
                Take::Empty => listener.await,
            }
        }
    }

    /// A listener for takeable deliveries (the stream's wait).
    pub(crate) fn listen(&self) -> EventListener {
        self.readable.listen()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    use super::*;
    use crate::event::Message;
    use crate::protocol::Record;
    use crate::DeliveryTag;

    fn stamped(partition: u32, offset: u64) -> Stamped {
        Stamped {
            delivery: Message {
                tag: DeliveryTag {
                    partition,
                    offset,
                    epoch: 0,
                    attempt: 1,
                },
                record: Record::from_value(&b"v"[..]),
            },
            generation: 0,
        }
    }

    fn backlog(items: &[(u32, u64)]) -> Deliveries {
        let mut backlog = Deliveries::default();
        for &(p, o) in items {
            backlog.push_back(stamped(p, o));
        }
        backlog
    }

    fn take_all_ready(inbox: &Inbox) -> Vec<(u32, u64)> {
        let mut taken = Vec::new();
        while let Take::Delivery(s) = inbox.try_take() {
            taken.push((s.delivery.tag.partition, s.delivery.tag.offset));
        }
        taken
    }

    #[test]
    fn a_backlog_that_fits_an_empty_inbox_goes_in_whole_and_in_order() {
        let inbox = Inbox::new(4);
        let mut b = backlog(&[(0, 0), (1, 0), (0, 1)]);
        assert!(inbox.push(&mut b).is_none());
        assert!(b.is_empty());
        let mut more = backlog(&[(1, 1), (0, 2)]);
        assert!(inbox.push(&mut more).is_some(), "one over capacity waits");
        assert_eq!(more.len(), 1);
        assert_eq!(take_all_ready(&inbox), vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert!(inbox.push(&mut more).is_none());
        assert_eq!(take_all_ready(&inbox), vec![(0, 2)]);
    }

    #[test]
    fn a_paused_partition_holds_what_is_pushed_whole_or_not() {
        let inbox = Inbox::new(8);
        inbox.pause(&[1]);
        let mut b = backlog(&[(0, 0), (1, 0), (0, 1)]);
        assert!(inbox.push(&mut b).is_none());
        assert_eq!(take_all_ready(&inbox), vec![(0, 0), (0, 1)]);
        inbox.resume(&[1]);
        assert_eq!(take_all_ready(&inbox), vec![(1, 0)]);
    }
}
