//! The assigned partitions: each one's settle window, buffers, start phase and fetch backoff;
//! together, the prefetch budget, the turns partitions take, deliveries and the retry schedule.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use tracing::trace;

use crate::backoff::{later, Jitter};
use crate::cache::{CacheCell, MessageCache};
use crate::config::ConsumerConfig;
use crate::error::UsageError;
use crate::event::{DeliveryTag, DiscardReason, Message, Metrics, PartitionLag};
use crate::protocol::Record;
use crate::window::Window;

use super::outbox::Outbox;

mod buffer;
mod cached;
mod fetch;
mod flights;
mod index;
mod parked;
mod retry;
mod sizing;
#[cfg(test)]
mod tests;

use buffer::Buffered;
use flights::Flights;
use index::{FetchTurn, Indexed};
pub(crate) use parked::Handback;
use parked::Parked;
use sizing::FetchSizer;

/// Acks of one partition under one epoch, settled one by one and accounted for once
/// ([`Partitions::begin_run`]).
#[derive(Debug)]
pub(crate) struct AckRun {
    idx: usize,
    partition: u32,
    epoch: u64,
    was_full: bool,
    settled: usize,
    advanced: u64,
}

impl AckRun {
    /// Whether `tag` belongs to this run: same partition, same epoch.
    pub(crate) fn takes(&self, tag: DeliveryTag) -> bool {
        tag.partition == self.partition && tag.epoch == self.epoch
    }
}

#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) id: u32,
    pub(crate) epoch: u64,
    pub(crate) phase: Phase,
    pub(crate) paused: bool,
    /// Being given back in a rebalance: no fetches, no deliveries.
    pub(crate) revoking: bool,
    /// Settle window: base = lowest unsettled offset, end = next offset to fetch.
    pub(crate) window: Window<Unsettled>,
    /// Fetched, not yet delivered.
    buffered: Buffered,
    /// Due retries with their record, waiting for delivery credit.
    redeliver: VecDeque<(u64, Record)>,
    /// Offsets whose record the cache lost: fetched again one by one.
    refetch: VecDeque<u64>,
    /// A request that fetches from it is in flight: its fetches (`flights`), or the
    /// FetchOffset or Latest lookup that places it.
    pub(crate) fetch_in_flight: bool,
    /// Its fetches in flight, as sized, with their reservations and early answers.
    flights: Flights,
    refetch_in_flight: bool,
    /// No fetch before this (empty fetch or failure backoff).
    pub(crate) fetch_not_before: Option<Instant>,
    /// A fetch took nothing because its first record (this many bytes) did not fit the
    /// prefetch byte budget: no fetch until deliveries free room for it.
    byte_blocked: Option<usize>,
    empty_fetches: u32,
    fetch_failures: u32,
    high_watermark: Option<u64>,
    /// Last offset the broker confirmed.
    pub(crate) committed: Option<u64>,
    /// Offset in the commit in flight.
    pub(crate) commit_in_flight: Option<u64>,
    /// Where consumption started without a commit: nothing to commit until the watermark moves.
    pub(crate) start: Option<u64>,
    pub(crate) stalled: bool,
    /// Its fetches fail with errors that name it: a stall reported once, until a fetch
    /// succeeds.
    fetch_failing: bool,
    /// Queued in `Partitions::dirty`: the indexes do not reflect this partition yet.
    dirty: bool,
    /// What `Partitions::backoffs` holds for this partition.
    indexed_backoff: Option<Instant>,
    /// Whether `Partitions::fetches_in_flight` counts this partition.
    counted_in_flight: bool,
    /// Whether it is in `Partitions::fetch_candidates`, or out of it until its fetch state
    /// differs from the one its last visit found it waiting on.
    fetch_turn: FetchTurn,
    /// Which of the membership indexes hold it (what `refresh` last put there).
    indexed: Indexed,
}

/// How far a partition got in finding where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the committed offset (FetchOffset).
    Starting,
    /// No commit and the start position is Latest: waiting for the high watermark.
    Latest,
    Active,
}

/// One unsettled offset of a settle window: its state, and its record while the message cache
/// holds it (from its delivery until it is settled, evicted or expired; `Partitions::cache`
/// is the index over these cells).
#[derive(Debug)]
pub(crate) struct Unsettled {
    pub(crate) state: Slot,
    pub(crate) cached: CacheCell,
}

impl Unsettled {
    /// An offset in `state`, its record not cached.
    pub(crate) fn new(state: Slot) -> Self {
        Self {
            state,
            cached: CacheCell::default(),
        }
    }
}

/// The state of one unsettled offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Fetched, in `Partition::buffered`.
    Buffered,
    /// With the application.
    Delivered { attempt: u32, since: Instant },
    /// Nacked; its retry is scheduled.
    Waiting { attempt: u32 },
    /// Retry due; in `Partition::redeliver` (or being fetched again) for delivery `attempt`.
    Ready { attempt: u32 },
    /// Lost from the cache; being fetched again, then `then`.
    Refetching { attempt: u32, then: AfterRefetch },
    /// In the dead-letter outbox.
    DeadLetter { attempt: u32 },
    /// Cannot be dead-lettered; the partition is stalled here.
    Stuck,
}

/// What happens to a message fetched again because the cache lost it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRefetch {
    Redeliver,
    DeadLetter,
}

/// What a single-offset fetch of a lost message brought back for the coordinator to finish.
#[derive(Debug)]
pub(crate) enum Refetched {
    /// Nothing to do (stale, redelivery queued, or the slot moved on).
    Done,
    /// The broker no longer has it: discard it.
    Gone { attempt: u32 },
    /// Back for the dead-letter topic.
    DeadLetter {
        attempt: u32,
        reason: DiscardReason,
        record: Record,
    },
}

impl Partition {
    fn new(id: u32, epoch: u64) -> Self {
        Self {
            id,
            epoch,
            phase: Phase::Starting,
            paused: false,
            revoking: false,
            window: Window::new(0),
            buffered: Buffered::default(),
            redeliver: VecDeque::new(),
            refetch: VecDeque::new(),
            fetch_in_flight: false,
            flights: Flights::default(),
            refetch_in_flight: false,
            fetch_not_before: None,
            byte_blocked: None,
            empty_fetches: 0,
            fetch_failures: 0,
            high_watermark: None,
            committed: None,
            commit_in_flight: None,
            start: None,
            stalled: false,
            fetch_failing: false,
            dirty: false,
            indexed_backoff: None,
            counted_in_flight: false,
            fetch_turn: FetchTurn::Candidate,
            indexed: Indexed::default(),
        }
    }

    /// Something to hand out: buffered messages or due retries, and not held back.
    fn deliverable(&self) -> bool {
        !self.paused && !self.revoking && (!self.buffered.is_empty() || !self.redeliver.is_empty())
    }

    /// May send a refetch or a Latest lookup, which go even when the prefetch buffer is full.
    fn has_lookup(&self) -> bool {
        !self.refetch.is_empty() || self.phase == Phase::Latest
    }

    /// Deliveries of this partition the application holds.
    pub(crate) fn delivered(&self) -> usize {
        self.window
            .iter()
            .filter(|(_, u)| matches!(u.state, Slot::Delivered { .. }))
            .count()
    }

    /// The state of an unsettled offset; `None` if settled or outside the window.
    #[inline]
    pub(crate) fn slot(&self, offset: u64) -> Option<Slot> {
        self.window.get(offset).map(|u| u.state)
    }

    /// Checks that `tag` (of this partition, its epoch already checked) names the delivery
    /// outstanding at its offset.
    #[inline]
    fn check_delivered(&self, tag: DeliveryTag) -> Result<(), UsageError> {
        let (partition, offset) = (tag.partition, tag.offset);
        if offset >= self.window.end() {
            return Err(UsageError::UnknownDelivery { partition, offset });
        }
        match self.slot(offset) {
            Some(Slot::Delivered { attempt, .. }) if attempt == tag.attempt => Ok(()),
            Some(Slot::Delivered { .. }) => Err(UsageError::StaleDelivery { partition, offset }),
            Some(Slot::Buffered) => Err(UsageError::UnknownDelivery { partition, offset }),
            _ => Err(UsageError::NotOutstanding { partition, offset }),
        }
    }

    /// Gives the cache back every record this partition's window holds, before the window is
    /// dropped or reset (the caller tidies the cache afterwards).
    fn release_cached(&mut self, cache: &mut MessageCache) {
        for u in self.window.iter_mut() {
            cache.release(&mut u.cached);
        }
    }

    /// Forgets the window and restarts it at `base`, its cached records released.
    fn reset_window(&mut self, base: u64, cache: &mut MessageCache) {
        self.release_cached(cache);
        self.window.reset(base);
    }

    /// Forgets what it was about to redeliver, refetch or fetch, and its fetch backoff (the
    /// requests in flight are answered stale; `Partitions::release_buffer` gave back what its
    /// fetches in flight reserved).
    fn stop_fetching(&mut self) {
        debug_assert!(self.flights.is_empty(), "reservations not given back");
        self.redeliver.clear();
        self.refetch.clear();
        self.fetch_in_flight = false;
        self.refetch_in_flight = false;
        self.fetch_not_before = None;
        self.byte_blocked = None;
        self.empty_fetches = 0;
    }

    /// Fetches `offset` again (its record is not cached), then dead-letters it.
    pub(crate) fn refetch_to_dead_letter(&mut self, offset: u64, attempt: u32) {
        self.set(
            offset,
            Slot::Refetching {
                attempt,
                then: AfterRefetch::DeadLetter,
            },
        );
        self.refetch.push_back(offset);
    }

    /// Updates an unsettled offset's state; nothing if it is settled or outside the window.
    pub(crate) fn set(&mut self, offset: u64, slot: Slot) {
        if let Some(u) = self.window.get_mut(offset) {
            u.state = slot;
        }
    }

    /// The offset to commit, if the watermark moved past what was committed or is in flight.
    pub(crate) fn commit_target(&self) -> Option<u64> {
        if self.phase != Phase::Active {
            return None;
        }
        let base = self.window.base();
        let last = self.commit_in_flight.or(self.committed).or(self.start);
        (last != Some(base)).then_some(base)
    }

    /// A fetch failed: no fetch (or refetch) before the backoff passes.
    fn fetch_failed(&mut self, now: Instant, jitter: &mut Jitter) {
        self.fetch_failures = self.fetch_failures.saturating_add(1);
        self.fetch_in_flight = false;
        self.fetch_not_before = Some(later(now, jitter.after_failures(self.fetch_failures)));
    }

    fn lag(&self, now: Instant) -> PartitionLag {
        let position = self.window.end();
        let hw = self.high_watermark;
        let from = self.committed.unwrap_or(self.window.base());
        PartitionLag {
            partition: self.id,
            high_watermark: hw,
            committed: self.committed,
            position,
            lag: hw.map_or(0, |h| h.saturating_sub(from)),
            position_lag: hw.map_or(0, |h| h.saturating_sub(position)),
            oldest_unsettled_age: self.window.iter().find_map(|(_, u)| match u.state {
                Slot::Delivered { since, .. } => Some(now.saturating_duration_since(since)),
                _ => None,
            }),
        }
    }
}

/// Every assigned partition (sorted by id) and what they share.
#[derive(Debug)]
pub(crate) struct Partitions {
    list: Vec<Partition>,
    /// `positions[id]` is the list index of partition `id` plus one (0: not in the list), so
    /// an ack finds its partition without a search; empty while the ids are too sparse for a
    /// table (then [`index`](Self::index) searches the sorted list). Rebuilt whenever the list
    /// changes (`list_changed`).
    positions: Vec<u32>,
    next_epoch: u64,
    /// Deliveries outstanding with the application.
    pub(crate) unacked: usize,
    /// Fetched messages not yet delivered, all partitions.
    pub(crate) buffered: usize,
    buffered_bytes: usize,
    /// The partition id from which fetches go next time (partitions take turns).
    fetch_turn: u32,
    /// The partition id from which messages are delivered next (round-robin for fairness).
    delivery_turn: u32,
    /// A delivery round's turns, partition ids in turn order: scratch space of
    /// [`deliver`](Self::deliver), kept to reuse its allocation.
    round: Vec<u32>,
    /// Buffer slots reserved by the fetches in flight (the records each may bring back), so
    /// concurrent fetches of several partitions never bring back more than the buffer takes.
    fetch_reserved: usize,
    /// Sizes fetches in the broker's unit, learned from its answers.
    sizer: FetchSizer,
    /// `max_unsettled_per_partition` of the config.
    max_unsettled: u64,
    /// Partitions changed since the indexes below were brought up to date (`refresh`); every
    /// mutable access marks its partition. `all_dirty`: every partition.
    dirty: Vec<u32>,
    all_dirty: bool,
    /// Partitions with something to deliver (exact after `refresh`).
    deliverable: BTreeSet<u32>,
    /// Partitions that may have a fetch, refetch or Latest lookup to send. Only a visit that
    /// finds a partition waiting on its own state (in flight, backoff, paused...) removes it
    /// (parks it, see [`FetchTurn`]); a change of that state puts it back.
    fetch_candidates: BTreeSet<u32>,
    /// Partitions that may have a refetch or Latest lookup to send: the only ones visited once
    /// the prefetch buffer is full.
    lookups: BTreeSet<u32>,
    /// Partitions waiting for buffer room for a record of this many bytes.
    byte_waiting: BTreeSet<(usize, u32)>,
    /// Every partition's fetch backoff: (not before, partition) (exact after `refresh`).
    backoffs: BTreeSet<(Instant, u32)>,
    /// Starting partitions due a FetchOffset (exact after `refresh`).
    starting_due: BTreeSet<u32>,
    /// Partitions whose watermark is to commit (exact after `refresh`).
    uncommitted: BTreeSet<u32>,
    /// Partitions with a fetch (or FetchOffset, Latest lookup) in flight.
    fetches_in_flight: usize,
    /// Retry schedule: (due, partition id, offset).
    retries: BTreeSet<(Instant, u32, u64)>,
    /// Reasons of poison messages being fetched again for the dead-letter path.
    refetch_reasons: BTreeMap<(u32, u64), DiscardReason>,
    /// Where this member's revoked partitions stood, so a reassignment after the broker lost
    /// its commits (a restart) does not fall back to the start position.
    known_positions: BTreeMap<u32, u64>,
    /// Partitions given back in a rebalance, until the next assignment (`parked.rs`).
    parked: Parked,
    /// The message cache: an index over the records the windows' slots hold (assigned and
    /// parked partitions alike), which redeliveries come from.
    cache: MessageCache,
}

impl Partitions {
    pub(crate) fn new(config: &ConsumerConfig) -> Self {
        let mut set = Self {
            list: Vec::new(),
            positions: Vec::new(),
            next_epoch: 1,
            unacked: 0,
            buffered: 0,
            buffered_bytes: 0,
            fetch_turn: 0,
            delivery_turn: 0,
            round: Vec::new(),
            dirty: Vec::new(),
            all_dirty: false,
            deliverable: BTreeSet::new(),
            fetch_candidates: BTreeSet::new(),
            lookups: BTreeSet::new(),
            byte_waiting: BTreeSet::new(),
            backoffs: BTreeSet::new(),
            starting_due: BTreeSet::new(),
            uncommitted: BTreeSet::new(),
            fetches_in_flight: 0,
            fetch_reserved: 0,
            sizer: FetchSizer::new(config),
            max_unsettled: config.max_unsettled_per_partition,
            retries: BTreeSet::new(),
            refetch_reasons: BTreeMap::new(),
            known_positions: BTreeMap::new(),
            parked: Parked::default(),
            cache: MessageCache::new(
                config.cache_entries(),
                config.cache_max_bytes,
                config.cache_ttl,
            ),
        };
        let mut ids = config.partitions.clone();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            set.add(id);
        }
        set
    }

    /// The fetch bounds changed (a live configuration update): every partition is a fetch
    /// candidate again, since one set aside under the old bounds (a full settle span, a
    /// fetch not worth its round trip) may fetch under the new ones.
    pub(crate) fn bounds_changed(&mut self, config: &ConsumerConfig) {
        self.max_unsettled = config.max_unsettled_per_partition;
        for p in &mut self.list {
            p.fetch_turn = FetchTurn::Candidate;
            self.fetch_candidates.insert(p.id);
        }
        self.all_dirty = true;
    }

    /// Starts consuming `id` (no-op if it is assigned already), where it stood if it is
    /// parked.
    pub(crate) fn add(&mut self, id: u32) {
        if self.index(id).is_none() && !self.unpark(id) {
            let p = Partition::new(id, self.next_epoch);
            self.next_epoch += 1;
            let at = self.list.partition_point(|q| q.id < id);
            self.list.insert(at, p);
            self.inserted(at);
            self.fetch_candidates.insert(id);
            self.mark(at);
        }
    }

    /// Where partition `id` is in the list, if assigned.
    #[inline]
    pub(crate) fn index(&self, id: u32) -> Option<usize> {
        if self.positions.is_empty() {
            return self.list.binary_search_by_key(&id, |p| p.id).ok();
        }
        let at = usize::try_from(id).ok()?;
        let position = *self.positions.get(at)?;
        usize::try_from(position).ok()?.checked_sub(1)
    }

    /// Updates `positions` after a partition was inserted at `at`: appended (an assignment adds
    /// its ids in ascending order) to a table in use, it extends the table; otherwise the
    /// positions behind it moved, and the table is rebuilt.
    fn inserted(&mut self, at: usize) {
        let len = self.list.len();
        let id = self.list[at].id as usize;
        if at + 1 == len && !self.positions.is_empty() && id < 4 * len + 1_024 {
            if self.positions.len() <= id {
                self.positions.resize(id + 1, 0);
            }
            // `len` <= `id + 1`, which fits the u32 ids.
            self.positions[id] = u32::try_from(len).unwrap_or(0);
        } else {
            self.list_changed();
        }
    }

    /// Rebuilds `positions` after a partition entered or left the list: a table as long as
    /// the highest id, when that is at most a few times the partition count (1,000 partitions
    /// `0..1000`: 4 KB).
    fn list_changed(&mut self) {
        self.positions.clear();
        let Some(last) = self.list.last() else {
            return;
        };
        let len = self.list.len();
        let Ok(highest) = usize::try_from(last.id) else {
            return;
        };
        if highest >= 4 * len + 1_024 {
            return;
        }
        self.positions.resize(highest + 1, 0);
        for (idx, p) in self.list.iter().enumerate() {
            // `idx` < `len` <= `highest + 1`, which fits the u32 ids.
            self.positions[p.id as usize] = u32::try_from(idx + 1).unwrap_or(0);
        }
    }

    pub(crate) fn at(&self, idx: usize) -> &Partition {
        &self.list[idx]
    }

    pub(crate) fn at_mut(&mut self, idx: usize) -> &mut Partition {
        self.mark(idx);
        &mut self.list[idx]
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Partition> {
        self.index(id).map(|idx| &self.list[idx])
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut Partition> {
        let idx = self.index(id)?;
        Some(self.at_mut(idx))
    }

    /// The partition `id` if it is still under `epoch`.
    pub(crate) fn live(&self, id: u32, epoch: u64) -> bool {
        self.get(id).is_some_and(|p| p.epoch == epoch)
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Partition> {
        self.all_dirty = true;
        self.list.iter_mut()
    }

    pub(crate) fn ids(&self) -> Vec<u32> {
        self.list.iter().map(|p| p.id).collect()
    }

    /// Every active partition whose settle watermark the broker has not confirmed (the
    /// watermark moved past the last confirmed commit, or past the start when none was), with
    /// that watermark. A watermark of 0 needs no commit: nothing lies below it.
    pub(crate) fn uncommitted(&self) -> Vec<(u32, u64)> {
        self.list
            .iter()
            .filter(|p| p.phase == Phase::Active)
            .filter(|p| p.committed.or(p.start).unwrap_or(0) != p.window.base())
            .map(|p| (p.id, p.window.base()))
            .collect()
    }

    /// The broker lost every commit (it no longer knows the group): every position is
    /// committed again.
    pub(crate) fn forget_commits(&mut self) {
        // Through `iter_mut`, which marks every partition for the indexes' refresh.
        for p in self.iter_mut() {
            p.committed = None;
            p.start = None;
        }
    }

    pub(crate) fn any_stalled(&self) -> bool {
        self.list.iter().any(|p| p.stalled || p.fetch_failing)
    }

    pub(crate) fn lag(&self, now: Instant) -> Vec<PartitionLag> {
        self.list.iter().map(|p| p.lag(now)).collect()
    }

    /// A message held for delivery (buffered or awaiting a retry).
    pub(crate) fn held(&self, id: u32, offset: u64) -> Option<&Record> {
        let p = self.get(id)?;
        p.buffered.get(offset).or_else(|| {
            p.redeliver
                .iter()
                .find(|(o, _)| *o == offset)
                .map(|(_, r)| r)
        })
    }

    /// Validates that `tag` names a delivery outstanding with the application.
    #[inline(always)]
    pub(crate) fn outstanding(&self, tag: DeliveryTag) -> Result<usize, UsageError> {
        let (partition, offset) = (tag.partition, tag.offset);
        let Some(idx) = self.index(partition) else {
            return Err(if tag.epoch != 0 && tag.epoch < self.next_epoch {
                UsageError::StaleDelivery { partition, offset }
            } else {
                UsageError::UnknownPartition(partition)
            });
        };
        let p = &self.list[idx];
        // A restored partition's window spans several epochs (`parked.rs`).
        if tag.epoch < self.parked.since(partition, p.epoch) || tag.epoch > p.epoch {
            return Err(UsageError::StaleDelivery { partition, offset });
        }
        p.check_delivered(tag).map(|()| idx)
    }

    /// Sets `paused` on every listed partition (assigned or parked), or on none if one is
    /// neither.
    pub(crate) fn set_paused(&mut self, ids: &[u32], paused: bool) -> Result<(), UsageError> {
        if let Some(&id) = ids
            .iter()
            .find(|&&id| self.index(id).is_none() && !self.is_parked(id))
        {
            return Err(UsageError::UnknownPartition(id));
        }
        for &id in ids {
            match self.index(id) {
                Some(idx) => self.at_mut(idx).paused = paused,
                None => self.set_parked_paused(id, paused),
            }
        }
        Ok(())
    }

    /// Marks an offset settled, its cached record dropped with its slot; returns how far the
    /// watermark advanced.
    #[inline(always)]
    pub(crate) fn settle(&mut self, idx: usize, offset: u64) -> u64 {
        let cache = &mut self.cache;
        let p = &mut self.list[idx];
        let was_full = p.window.span() >= self.max_unsettled;
        let advanced = p
            .window
            .settle_with(offset, |u| _ = cache.release(&mut u.cached));
        self.mark_settled(idx, advanced, was_full);
        self.tidy_cache();
        advanced
    }

    /// The application acked, nacked or rejected a delivery: one less outstanding.
    pub(crate) fn delivery_ended(&mut self) {
        self.unacked -= 1;
    }

    /// Starts a run of acks of the partition at `idx` under `tag`'s epoch: `tag` was checked
    /// ([`outstanding`](Self::outstanding)) and is the run's first; settle it and the run's
    /// next ones with [`settle_in_run`](Self::settle_in_run), then [`end_run`](Self::end_run).
    pub(crate) fn begin_run(&self, idx: usize, tag: DeliveryTag) -> AckRun {
        let p = &self.list[idx];
        AckRun {
            idx,
            partition: tag.partition,
            epoch: tag.epoch,
            was_full: p.window.span() >= self.max_unsettled,
            settled: 0,
            advanced: 0,
        }
    }

    /// Settles the acked delivery `tag` as part of `run`: checked as
    /// [`outstanding`](Self::outstanding) checks it (its partition and epoch are the run's, so
    /// only its slot is left to check), settled as [`settle`](Self::settle) settles it, the
    /// bookkeeping left to [`end_run`](Self::end_run). A refused ack changes nothing.
    #[inline]
    pub(crate) fn settle_in_run(
        &mut self,
        run: &mut AckRun,
        tag: DeliveryTag,
    ) -> Result<(), UsageError> {
        debug_assert!(run.takes(tag));
        let cache = &mut self.cache;
        let p = &mut self.list[run.idx];
        p.check_delivered(tag)?;
        run.advanced += p
            .window
            .settle_with(tag.offset, |u| _ = cache.release(&mut u.cached));
        run.settled += 1;
        Ok(())
    }

    /// Ends `run`: the settled deliveries are no longer outstanding, the partition's indexes
    /// and the cache catch up once for all of them. Returns how many settled and how far the
    /// watermark advanced.
    pub(crate) fn end_run(&mut self, run: AckRun) -> (usize, u64) {
        self.unacked -= run.settled;
        // The window only shrinks while settling, so it went below full during the run if
        // and only if it was full before and is not after.
        self.mark_settled(run.idx, run.advanced, run.was_full);
        self.tidy_cache();
        (run.settled, run.advanced)
    }

    /// Gives the shared buffer back what the partition at `idx` holds in it: its fetched,
    /// undelivered records and the reservation of its fetch in flight.
    fn release_buffer(&mut self, idx: usize) {
        let p = &mut self.list[idx];
        self.buffered -= p.buffered.len();
        self.buffered_bytes -= p.buffered.bytes();
        p.buffered.clear();
        self.fetch_reserved -= p.flights.clear();
    }

    /// Forgets everything about a partition's position (its cached records too) and restarts
    /// it at `offset` under a new epoch. The caller forgets the partition's dead letters.
    pub(crate) fn restart(&mut self, idx: usize, offset: u64) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.mark(idx);
        self.unacked -= self.list[idx].delivered();
        self.release_buffer(idx);
        let p = &mut self.list[idx];
        let id = p.id;
        p.epoch = epoch;
        p.reset_window(offset, &mut self.cache);
        p.stop_fetching();
        p.stalled = false;
        p.fetch_failing = false;
        self.retries.retain(|&(_, pid, _)| pid != id);
        self.refetch_reasons.retain(|&(pid, _), _| pid != id);
        self.parked.forget(id);
        self.tidy_cache();
    }

    /// Closing: undelivered messages stay unsettled, so the next member reads them again.
    pub(crate) fn drop_undelivered(&mut self) {
        self.all_dirty = true;
        self.retries.clear();
        for p in &mut self.list {
            p.buffered.clear();
            p.redeliver.clear();
            p.refetch.clear();
        }
        self.buffered = 0;
        self.buffered_bytes = 0;
    }

    /// A rebalance: stop fetching and delivering every partition. Undelivered messages and
    /// pending retries stay unsettled: the next owner reads them.
    pub(crate) fn start_revoke(&mut self) {
        self.all_dirty = true;
        self.retries.clear();
        self.refetch_reasons.clear();
        for p in &mut self.list {
            p.revoking = true;
            p.redeliver.clear();
            p.refetch.clear();
            self.buffered -= p.buffered.len();
            self.buffered_bytes -= p.buffered.bytes();
            p.buffered.clear();
        }
    }

    /// Lets every partition go: parks each one that can be (`parked.rs`), and forgets the
    /// others (their cached messages too), remembering where each stood; returns the ids of
    /// those. The caller forgets their dead letters.
    pub(crate) fn revoke_all(&mut self) -> Vec<u32> {
        let (mut parked, mut ids) = (Vec::new(), Vec::new());
        for idx in 0..self.list.len() {
            let (id, base) = (self.list[idx].id, self.list[idx].window.base());
            if self.park(idx) {
                parked.push(id);
                continue;
            }
            ids.push(id);
            self.known_positions.insert(id, base);
            self.restart(idx, base);
        }
        self.take_parked(&parked);
        self.dirty.clear();
        self.all_dirty = false;
        self.deliverable.clear();
        self.fetch_candidates.clear();
        self.lookups.clear();
        self.byte_waiting.clear();
        self.backoffs.clear();
        self.starting_due.clear();
        self.uncommitted.clear();
        self.fetches_in_flight = 0;
        ids
    }

    // ---------------------------------------------------------------- delivering

    /// Hands out messages while the application has credit: due retries first, then fresh
    /// messages, round-robin over unpaused partitions.
    #[inline]
    pub(crate) fn deliver(
        &mut self,
        now: Instant,
        max_unacked: usize,
        metrics: &mut Metrics,
        events: &mut Outbox,
    ) {
        self.refresh();
        // Nothing to hand out, or no credit: the common case after an ack.
        if self.unacked < max_unacked && !self.deliverable.is_empty() {
            self.deliver_turns(now, max_unacked, metrics, events);
        }
    }

    /// [`deliver`](Self::deliver) when a partition has something to deliver and there is
    /// credit.
    fn deliver_turns(
        &mut self,
        now: Instant,
        max_unacked: usize,
        metrics: &mut Metrics,
        events: &mut Outbox,
    ) {
        // Partitions take turns in id order from `delivery_turn`, one message a turn, among
        // those that have something to deliver. Only the partition delivering can leave the
        // set meanwhile (nothing here makes another one deliverable), so a round's turns are
        // listed once, not searched turn by turn.
        while self.unacked < max_unacked && !self.deliverable.is_empty() {
            if self.deliverable.len() == 1 {
                // One partition to deliver from (the common case) takes every turn at once.
                let turns = max_unacked - self.unacked;
                if let Some(&id) = self.deliverable.first() {
                    self.delivery_turn = id.checked_add(1).unwrap_or(0);
                    self.take_turns(id, now, turns, metrics, events);
                }
                continue;
            }
            let mut round = std::mem::take(&mut self.round);
            round.clear();
            let turn = self.delivery_turn;
            round.extend(
                self.deliverable
                    .range(turn..)
                    .chain(self.deliverable.range(..turn)),
            );
            for &id in &round {
                if self.unacked >= max_unacked {
                    break;
                }
                self.delivery_turn = id.checked_add(1).unwrap_or(0);
                self.take_turns(id, now, 1, metrics, events);
            }
            self.round = round;
        }
    }

    /// Takes `turns` turns of partition `id`, which then leaves the deliverable set if it has
    /// nothing more to deliver (or is no longer assigned).
    fn take_turns(
        &mut self,
        id: u32,
        now: Instant,
        turns: usize,
        metrics: &mut Metrics,
        events: &mut Outbox,
    ) {
        let Some(idx) = self.index(id) else {
            self.deliverable.remove(&id);
            return;
        };
        self.deliver_from(idx, now, turns, metrics, events);
        let p = &mut self.list[idx];
        if !p.deliverable() {
            p.indexed.deliverable = false;
            self.deliverable.remove(&id);
        }
    }

    /// Takes `turns` delivery turns of the partition at `idx`: each delivers its next due
    /// retry, or else its next buffered message (a retry no longer due uses the turn up).
    fn deliver_from(
        &mut self,
        idx: usize,
        now: Instant,
        mut turns: usize,
        metrics: &mut Metrics,
        events: &mut Outbox,
    ) {
        while turns > 0 {
            let p = &mut self.list[idx];
            if p.redeliver.is_empty() {
                // No retry first: a run of buffered records, each moved once into the outbox.
                let (id, epoch) = (p.id, p.epoch);
                let window = &mut p.window;
                let mut bytes = 0;
                let n = p.buffered.pop_run(turns, |offset, record| {
                    bytes += record.encoded_len();
                    // To the application, not to the cache: see the retry below.
                    if let Some(u) = window.get_mut(offset) {
                        u.state = Slot::Delivered {
                            attempt: 1,
                            since: now,
                        };
                    }
                    let tag = DeliveryTag {
                        partition: id,
                        offset,
                        epoch,
                        attempt: 1,
                    };
                    events.deliver(Message { tag, record });
                });
                if n == 0 {
                    break;
                }
                trace!(partition = id, count = n, "deliver");
                self.buffered -= n;
                self.buffered_bytes -= bytes;
                self.unacked += n;
                metrics.delivered += n as u64;
                turns -= n;
                continue;
            }
            turns -= 1;
            // A retry first: due (`Ready`), or no longer (settled or restarted since), which uses
            // the turn up.
            let Some((offset, record)) = p.redeliver.pop_front() else {
                break; // not reached: just looked at
            };
            let Some(Slot::Ready { attempt }) = p.slot(offset) else {
                continue;
            };
            metrics.retried += 1;
            let tag = DeliveryTag {
                partition: p.id,
                offset,
                epoch: p.epoch,
                attempt,
            };
            // The record goes to the application, not to the cache: it comes back with a nack,
            // a reject or a dropped handle (`ConsumerMachine::give_back`), and is cached then
            // for its redelivery or dead letter. An ack, the common case, so costs no copy.
            p.set(
                offset,
                Slot::Delivered {
                    attempt,
                    since: now,
                },
            );
            self.unacked += 1;
            metrics.delivered += 1;
            trace!(partition = tag.partition, offset, attempt, "deliver");
            events.deliver(Message { tag, record });
        }
    }
}
