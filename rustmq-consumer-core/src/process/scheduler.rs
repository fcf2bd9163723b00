//! Which deliveries may start now: the sans-IO half of concurrent processing.
//!
//! Deliveries are sorted into *lanes*: one per key (`OrderBy::Key`), one per partition
//! (`OrderBy::Partition`, and keyless records under `OrderBy::Key`), or none at all
//! (`OrderBy::Unordered`). A lane runs one delivery at a time, in the order it was pushed
//! (offset order within a partition); different lanes run side by side, at most `concurrency`
//! in all. A lane's waiting queue is bounded, and so is the total: [`Scheduler::has_room`]
//! says whether the caller may push another delivery, which is the caller's backpressure.
//!
//! A delivery that will be redelivered (a nack) can *hold* its lane: nothing else of the lane
//! starts until the redelivery of that partition and offset is pushed, which then goes first.
//! [`Scheduler::drop_partition`] (a revoke or a seek) drops a partition's queued work and
//! releases its holds. When the scheduler is full while nothing runs and only held lanes
//! wait, the redeliveries could never be pushed: the holds are released (the retries then run
//! after the lane's waiting deliveries rather than never).
//!
//! No clock, no I/O: the caller pushes, starts and finishes.

use std::collections::VecDeque;

use bytes::Bytes;
use rustc_hash::FxHashMap;

/// How deliveries may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OrderBy {
    /// Any delivery may run beside any other.
    Unordered,
    /// Deliveries with the same key never overlap and run in offset order; different keys run
    /// in parallel; records without a key are ordered by partition. A key is one lane across
    /// partitions (its deliveries of different partitions never overlap either).
    #[default]
    Key,
    /// Deliveries of one partition never overlap and run in offset order.
    Partition,
}

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deliveries running at once (at least 1).
    pub concurrency: usize,
    /// Deliveries waiting in one lane (at least 1).
    pub max_waiting_per_lane: usize,
    /// Deliveries waiting in all (at least 1).
    pub max_waiting: usize,
}

/// What a lane is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Key(Bytes),
    Partition(u32),
}

#[derive(Debug)]
struct Waiting<T> {
    partition: u32,
    offset: u64,
    item: T,
}

#[derive(Debug)]
struct LaneState<T> {
    running: bool,
    /// Waiting for the redelivery of this partition and offset.
    held: Option<(u32, u64)>,
    /// Set while the lane is in the ready queue.
    queued_ready: bool,
    waiting: VecDeque<Waiting<T>>,
}

impl<T> LaneState<T> {
    fn new() -> Self {
        Self {
            running: false,
            held: None,
            queued_ready: false,
            waiting: VecDeque::new(),
        }
    }

    fn startable(&self) -> bool {
        !self.running && self.held.is_none() && !self.waiting.is_empty()
    }

    fn idle(&self) -> bool {
        !self.running && self.held.is_none() && self.waiting.is_empty()
    }
}

/// A started delivery's claim on its lane; give it back with [`Scheduler::finish`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a started delivery's lane stays busy until it is finished"]
pub struct Ticket {
    lane: Option<Lane>,
    partition: u32,
    offset: u64,
}

impl Ticket {
    /// Partition of the started delivery.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Offset of the started delivery.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// How a started delivery ended, as the lane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Done (acked, rejected, or its settle refused): the lane moves on.
    Done,
    /// It will be redelivered: the lane waits for that redelivery before anything else.
    Redeliver,
}

/// The scheduler. `T` is whatever the caller runs (a delivery handle, an id in tests).
#[derive(Debug)]
pub struct Scheduler<T> {
    ordering: OrderBy,
    limits: Limits,
    lanes: FxHashMap<Lane, LaneState<T>>,
    /// Lanes that may start, first come first served (each at most once).
    ready: VecDeque<Lane>,
    /// `OrderBy::Unordered`'s one queue.
    free: VecDeque<Waiting<T>>,
    running: usize,
    waiting: usize,
    /// Lanes whose waiting queue is at `max_waiting_per_lane`.
    full_lanes: usize,
}

impl<T> Scheduler<T> {
    /// An empty scheduler; limits below 1 count as 1.
    pub fn new(ordering: OrderBy, limits: Limits) -> Self {
        let limits = Limits {
            concurrency: limits.concurrency.max(1),
            max_waiting_per_lane: limits.max_waiting_per_lane.max(1),
            max_waiting: limits.max_waiting.max(1),
        };
        Self {
            ordering,
            limits,
            lanes: FxHashMap::default(),
            ready: VecDeque::new(),
            free: VecDeque::new(),
            running: 0,
            waiting: 0,
            full_lanes: 0,
        }
    }

    /// Deliveries running.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Deliveries waiting to start.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Lanes with state (running, held or waiting): what memory the scheduler holds.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// True when nothing runs or waits.
    pub fn is_idle(&self) -> bool {
        self.running == 0 && self.waiting == 0
    }

    /// Whether another delivery may be pushed: below the total bound and no lane full (the
    /// next delivery's lane is unknown until it is taken).
    pub fn has_room(&self) -> bool {
        self.waiting < self.limits.max_waiting && self.full_lanes == 0
    }

    /// Queues a delivery; gives it back when there is no room (see [`Scheduler::has_room`]).
    /// A redelivery that its lane holds for goes first in the lane and releases the hold.
    pub fn push(
        &mut self,
        partition: u32,
        offset: u64,
        key: Option<&Bytes>,
        item: T,
    ) -> Result<(), T> {
        if !self.has_room() {
            return Err(item);
        }
        let waiting = Waiting {
            partition,
            offset,
            item,
        };
        self.waiting += 1;
        let Some(lane) = self.lane_of(partition, key) else {
            self.free.push_back(waiting);
            return Ok(());
        };
        let per_lane = self.limits.max_waiting_per_lane;
        let state = self
            .lanes
            .entry(lane.clone())
            .or_insert_with(LaneState::new);
        if state.held == Some((partition, offset)) {
            state.held = None;
            state.waiting.push_front(waiting);
        } else {
            state.waiting.push_back(waiting);
        }
        if state.waiting.len() == per_lane {
            self.full_lanes += 1;
        }
        self.mark_ready(lane);
        Ok(())
    }

    /// The next delivery that may start now, if any: below `concurrency`, its lane idle.
    pub fn start(&mut self) -> Option<(Ticket, T)> {
        if self.running >= self.limits.concurrency {
            return None;
        }
        if let Some(waiting) = self.free.pop_front() {
            self.waiting -= 1;
            self.running += 1;
            let ticket = Ticket {
                lane: None,
                partition: waiting.partition,
                offset: waiting.offset,
            };
            return Some((ticket, waiting.item));
        }
        while let Some(lane) = self.ready.pop_front() {
            let per_lane = self.limits.max_waiting_per_lane;
            let Some(state) = self.lanes.get_mut(&lane) else {
                continue;
            };
            state.queued_ready = false;
            if !state.startable() {
                continue;
            }
            let was_full = state.waiting.len() == per_lane;
            let Some(waiting) = state.waiting.pop_front() else {
                continue;
            };
            state.running = true;
            if was_full {
                self.full_lanes -= 1;
            }
            self.waiting -= 1;
            self.running += 1;
            let ticket = Ticket {
                lane: Some(lane),
                partition: waiting.partition,
                offset: waiting.offset,
            };
            return Some((ticket, waiting.item));
        }
        if self.running == 0 && !self.has_room() && self.release_all() {
            return self.start();
        }
        None
    }

    /// Releases every hold; true if there was one. Called when nothing runs, nothing may
    /// start and nothing more may be pushed: the held-for redeliveries cannot come in, so
    /// waiting for them would never end (their order is given up instead).
    fn release_all(&mut self) -> bool {
        let any = self.lanes.values().any(|state| state.held.is_some());
        if any {
            tracing::debug!("holds released: the scheduler is full");
            self.release_holds(|_, _| true);
        }
        any
    }

    /// A started delivery ended. [`Finish::Redeliver`] holds its lane for the redelivery
    /// (only in the ordered modes; nothing to hold for otherwise).
    pub fn finish(&mut self, ticket: Ticket, finish: Finish) {
        self.running -= 1;
        let Some(lane) = ticket.lane else {
            return;
        };
        let Some(state) = self.lanes.get_mut(&lane) else {
            return;
        };
        state.running = false;
        if finish == Finish::Redeliver {
            state.held = Some((ticket.partition, ticket.offset));
        }
        if state.idle() {
            self.lanes.remove(&lane);
        } else {
            self.mark_ready(lane);
        }
    }

    /// Drops `partition`'s queued work (its deliveries went stale: a revoke or a seek) and
    /// releases the holds waiting for its redeliveries. Returns the dropped items.
    pub fn drop_partition(&mut self, partition: u32) -> Vec<T> {
        let dropped = self.drop_waiting(|p, _, _| p == partition);
        self.release_holds(|p, _| p == partition);
        dropped
    }

    /// Drops the waiting deliveries `stale(partition, offset, item)` picks (deliveries the
    /// consumer no longer accepts settles for). Returns them, in no particular order.
    pub fn drop_waiting(&mut self, mut stale: impl FnMut(u32, u64, &T) -> bool) -> Vec<T> {
        let mut dropped = Vec::new();
        let mut split = |queue: &mut VecDeque<Waiting<T>>| {
            if !queue.iter().any(|w| stale(w.partition, w.offset, &w.item)) {
                return;
            }
            let mut kept = VecDeque::with_capacity(queue.len());
            for waiting in queue.drain(..) {
                if stale(waiting.partition, waiting.offset, &waiting.item) {
                    dropped.push(waiting.item);
                } else {
                    kept.push_back(waiting);
                }
            }
            *queue = kept;
        };
        split(&mut self.free);
        let per_lane = self.limits.max_waiting_per_lane;
        let mut full_lanes = 0;
        self.lanes.retain(|_, state| {
            split(&mut state.waiting);
            if state.waiting.len() == per_lane {
                full_lanes += 1;
            }
            !state.idle()
        });
        self.full_lanes = full_lanes;
        self.waiting -= dropped.len();
        dropped
    }

    /// Releases the holds `void(partition, offset)` picks: their redeliveries will not come
    /// (the partition was revoked or sought).
    pub fn release_holds(&mut self, mut void: impl FnMut(u32, u64) -> bool) {
        let mut released = Vec::new();
        self.lanes.retain(|lane, state| {
            if let Some((partition, offset)) = state.held {
                if void(partition, offset) {
                    state.held = None;
                    released.push(lane.clone());
                }
            }
            !state.idle()
        });
        for lane in released {
            self.mark_ready(lane);
        }
    }

    fn lane_of(&self, partition: u32, key: Option<&Bytes>) -> Option<Lane> {
        match (self.ordering, key) {
            (OrderBy::Unordered, _) => None,
            (OrderBy::Key, Some(key)) => Some(Lane::Key(key.clone())),
            (OrderBy::Key, None) | (OrderBy::Partition, _) => Some(Lane::Partition(partition)),
        }
    }

    fn mark_ready(&mut self, lane: Lane) {
        if let Some(state) = self.lanes.get_mut(&lane) {
            if state.startable() && !state.queued_ready {
                state.queued_ready = true;
                self.ready.push_back(lane);
            }
        }
    }
}

#[cfg(test)]
mod tests;
