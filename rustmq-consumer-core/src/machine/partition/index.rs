//! The partitions' indexes and their upkeep: every mutable access marks its partition, and
//! `refresh` brings the sets that spare each input a walk over every partition (deliverable,
//! fetch candidates, lookups, backoffs, starting due, uncommitted, fetches in flight) up to date
//! with the partitions marked since. A partition leaves the fetch candidates only set aside on
//! the state a fetch visit found it waiting on, and comes back when that state changes.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{Partition, Partitions, Phase};

/// A partition's place among the fetch candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FetchTurn {
    /// In `Partitions::fetch_candidates`: visited by the next fetch pass.
    Candidate,
    /// Out of it: its last visit found it waiting on its own state, this one. Only a change
    /// of this state puts it back (an ack, for one, changes none of it unless it frees the
    /// settle span of a full window).
    SetAside(FetchState),
}

/// What a fetch visit of a partition reads from the partition itself (beside the buffer room
/// all partitions share) to decide that it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FetchState {
    backoff: bool,
    refetch_due: bool,
    in_flight: bool,
    /// Its fetches in flight (a second may go out ahead of the first).
    flights: usize,
    paused: bool,
    revoking: bool,
    phase: Phase,
    /// The unsettled span is at `max_unsettled_per_partition`.
    span_full: bool,
    byte_blocked: bool,
}

/// Which membership indexes of `Partitions` hold a partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Indexed {
    pub(super) deliverable: bool,
    starting_due: bool,
    uncommitted: bool,
}

impl Partition {
    /// Its own state as a fetch visit reads it.
    pub(super) fn fetch_state(&self, max_unsettled: u64) -> FetchState {
        FetchState {
            backoff: self.fetch_not_before.is_some(),
            refetch_due: !self.refetch_in_flight && !self.refetch.is_empty(),
            in_flight: self.fetch_in_flight,
            flights: self.flights.len(),
            paused: self.paused,
            revoking: self.revoking,
            phase: self.phase,
            span_full: self.window.span() >= max_unsettled,
            byte_blocked: self.byte_blocked.is_some(),
        }
    }
}

impl Partitions {
    /// The breaker closed an outage's open interval: partitions backing off after failed
    /// fetches may fetch again at once.
    pub(crate) fn end_failure_backoff(&mut self) {
        self.refresh();
        let backoffs: Vec<(Instant, u32)> = self.backoffs.iter().copied().collect();
        for (_, id) in backoffs {
            if let Some(p) = self.get_mut(id).filter(|p| p.fetch_failures > 0) {
                p.fetch_not_before = None;
            }
        }
    }

    /// The earliest fetch backoff of a partition that would fetch once it passes.
    pub(crate) fn next_fetch_backoff(&self) -> Option<Instant> {
        let waits = |p: &Partition| !p.fetch_in_flight && !p.paused && !p.revoking;
        if self.all_dirty {
            return self
                .list
                .iter()
                .filter(|p| waits(p))
                .filter_map(|p| p.fetch_not_before)
                .min();
        }
        // The index holds every partition not changed since; the changed ones are looked at.
        let indexed = self.backoffs.iter().find_map(|&(at, id)| {
            let p = self.get(id)?;
            (p.fetch_not_before == Some(at) && waits(p)).then_some(at)
        });
        let changed = self
            .dirty
            .iter()
            .filter_map(|&id| self.get(id))
            .filter(|p| waits(p))
            .filter_map(|p| p.fetch_not_before)
            .min();
        indexed.into_iter().chain(changed).min()
    }

    /// Ends every fetch backoff that passed by `now`.
    pub(crate) fn fetch_backoffs_due(&mut self, now: Instant) {
        self.refresh();
        while let Some(&(at, id)) = self.backoffs.first() {
            if at > now {
                break;
            }
            self.backoffs.pop_first();
            if let Some(p) = self.get_mut(id) {
                p.fetch_not_before = None;
                p.indexed_backoff = None;
            }
        }
    }

    /// Queues the partition at `idx` for `refresh`.
    pub(super) fn mark(&mut self, idx: usize) {
        let p = &mut self.list[idx];
        if !p.dirty {
            p.dirty = true;
            self.dirty.push(p.id);
        }
    }

    /// A settle moved the watermark of the partition at `idx` by `advanced` (`was_full`: its
    /// settle span was full before). Only a moved watermark changes what the indexes hold of a
    /// partition: it joins the uncommitted set (a member stays one: the watermark only moves
    /// further past the last commit), and a full span may open up for a set-aside fetch. Most
    /// acks change neither and leave the partition out of the next refresh.
    #[inline]
    pub(super) fn mark_settled(&mut self, idx: usize, advanced: u64, was_full: bool) {
        let p = &self.list[idx];
        if advanced > 0
            && (!p.indexed.uncommitted || (was_full && p.window.span() < self.max_unsettled))
        {
            self.mark(idx);
        }
    }

    /// Brings the indexes up to date with the partitions changed since the last refresh.
    #[inline]
    pub(crate) fn refresh(&mut self) {
        if self.all_dirty || !self.dirty.is_empty() {
            self.reindex_dirty();
        }
    }

    /// [`refresh`](Self::refresh) when some partition changed.
    fn reindex_dirty(&mut self) {
        if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            for idx in 0..self.list.len() {
                self.reindex(idx);
            }
            return;
        }
        while let Some(id) = self.dirty.pop() {
            if let Some(idx) = self.index(id) {
                self.reindex(idx);
            }
        }
    }

    fn reindex(&mut self, idx: usize) {
        let p = &mut self.list[idx];
        let id = p.id;
        p.dirty = false;
        if p.counted_in_flight != p.fetch_in_flight {
            p.counted_in_flight = p.fetch_in_flight;
            if p.fetch_in_flight {
                self.fetches_in_flight += 1;
            } else {
                self.fetches_in_flight -= 1;
            }
        }
        if p.indexed_backoff != p.fetch_not_before {
            if let Some(at) = p.indexed_backoff {
                self.backoffs.remove(&(at, id));
            }
            if let Some(at) = p.fetch_not_before {
                self.backoffs.insert((at, id));
            }
            p.indexed_backoff = p.fetch_not_before;
        }
        let now = Indexed {
            deliverable: p.deliverable(),
            starting_due: p.phase == Phase::Starting
                && !p.fetch_in_flight
                && p.fetch_not_before.is_none(),
            uncommitted: p.commit_target().is_some(),
        };
        let was = std::mem::replace(&mut p.indexed, now);
        // Only the memberships that changed touch their set.
        let set = |set: &mut BTreeSet<u32>, was: bool, member: bool| {
            if member && !was {
                set.insert(id);
            } else if was && !member {
                set.remove(&id);
            }
        };
        set(&mut self.deliverable, was.deliverable, now.deliverable);
        set(&mut self.starting_due, was.starting_due, now.starting_due);
        set(&mut self.uncommitted, was.uncommitted, now.uncommitted);
        if let FetchTurn::SetAside(waiting) = p.fetch_turn {
            if waiting != p.fetch_state(self.max_unsettled) {
                p.fetch_turn = FetchTurn::Candidate;
                self.fetch_candidates.insert(id);
            }
        }
        if p.has_lookup() {
            self.lookups.insert(id);
        }
    }

    /// Whether any partition's watermark moved past what was committed or is in flight.
    pub(crate) fn has_uncommitted(&self) -> bool {
        if self.all_dirty {
            return self.list.iter().any(|p| p.commit_target().is_some());
        }
        // The index holds every partition not changed since; the changed ones are looked at.
        self.uncommitted
            .iter()
            .chain(&self.dirty)
            .any(|&id| self.get(id).is_some_and(|p| p.commit_target().is_some()))
    }

    /// Every partition's offset to commit, by partition id.
    pub(crate) fn commit_targets(&self) -> Vec<(u32, u64)> {
        let target = |p: &Partition| p.commit_target().map(|o| (p.id, o));
        if self.all_dirty {
            return self.list.iter().filter_map(target).collect();
        }
        let ids: BTreeSet<u32> = self
            .uncommitted
            .iter()
            .chain(&self.dirty)
            .copied()
            .collect();
        ids.into_iter()
            .filter_map(|id| self.get(id).and_then(target))
            .collect()
    }
}
