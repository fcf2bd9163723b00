//! The message cache: a sans-IO LRU bounded by entries and bytes, with one time to live, that
//! the settle windows' slots point into.
//!
//! Redeliveries and dead letters are served from here; a message the cache lost is re-fetched
//! by the caller. What it holds are the records the application gave back with a nack, a
//! reject or a dropped handle (`ConsumerMachine::give_back`): a delivery is not copied in, so
//! the common path, delivered then acked, never touches it.
//! [`MessageCache`] holds the bounds, the counters and two queues:
//!
//! - the entry queue, in insertion order, which holds the entries themselves (record, key,
//!   insertion time); every entry shares one TTL, measured from insertion, so its front is
//!   the next entry to expire;
//! - the LRU queue of keys, in order of use (an insertion or a [`get`](MessageCache::get)
//!   pushes the key again at the back), whose front is the next entry to evict.
//!
//! An offset's unsettled slot finds its record through its [`CacheCell`], the position of its
//! entry in the entry queue: settling the offset releases the entry, and no map per message
//! is kept. The records are not kept in the slots themselves: a window holds a slot for every
//! offset it fetched, most of them not delivered yet, and a cell of one position keeps each
//! slot a few words wide; the entry queue holds only what is cached, and in the common order
//! (settled as delivered) its memory is reused from the front.
//!
//! Every entry has exactly one live item in each queue and knows where: its cell keeps its
//! position in the entry queue, the entry its key's position in the LRU queue (positions are
//! counted from the first item a queue ever held, so popping the front moves nothing). An
//! entry that leaves (settled, replaced, expired, evicted) or is used again empties its item
//! in place, so no item is ever looked up to learn whether it is still live. Empty items at a
//! queue's front are popped; a queue is compacted when it exceeds twice the live entry count,
//! and only then are the live items' slots looked up (to store their new
//! positions). Both queues so stay within `2 * len()` whatever the pattern of inserts, uses
//! and removals. Settling the oldest entry (in-order acks) pops both fronts. Every operation
//! is O(1) amortised plus the caller's slot lookup.
//!
//! The cache reaches the slots through [`CacheSlots`]; time enters as `now`, which must not go
//! backwards between calls.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::trace;

use crate::protocol::Record;

/// Identifies a cached message: `(partition, offset)`.
pub(crate) type CacheKey = (u32, u64);

/// Bookkeeping bytes charged per entry on top of the record's encoded length.
const ENTRY_OVERHEAD: usize = 16;

/// Counters since construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    /// `get` calls that found a live entry.
    pub hits: u64,
    /// `get` calls that found nothing or an expired entry.
    pub misses: u64,
    /// Entries dropped to keep within the bounds, and records too large to store.
    pub evictions: u64,
    /// Entries dropped because their time to live passed.
    pub expirations: u64,
}

/// What one unsettled slot holds of the cache: the position of its record's entry in the entry
/// queue, if cached. Only the cache fills or empties it, so its accounting stays exact; a slot
/// dropped with a record still cached must give the cell to [`MessageCache::release`] first.
#[derive(Debug, Default)]
pub(crate) struct CacheCell(Option<u64>);

/// One cached message.
#[derive(Debug)]
struct Cached {
    /// The message.
    record: Record,
    /// Whose it is.
    key: CacheKey,
    /// When it was inserted; it expires at `inserted + ttl`.
    inserted: Instant,
    /// Position of its key in the LRU queue (its last use).
    lru_at: u64,
    /// Bytes charged against `max_bytes`.
    cost: usize,
}

impl CacheCell {
    /// Whether a record is cached here (expired or not).
    pub(crate) fn is_cached(&self) -> bool {
        self.0.is_some()
    }
}

/// Where the cache finds the slot of a key.
pub(crate) trait CacheSlots {
    /// The cache cell of the unsettled slot `key`; `None` when there is no such slot.
    fn cell(&mut self, key: CacheKey) -> Option<&mut CacheCell>;
}

/// An LRU + TTL index of fetched messages kept in their slots, keyed by `(partition, offset)`.
#[derive(Debug)]
pub(crate) struct MessageCache {
    /// Most entries held at once.
    max_entries: usize,
    /// Most bytes (encoded length + overhead) held at once.
    max_bytes: usize,
    /// Time to live from insertion.
    ttl: Duration,
    /// Entries held: cells holding a position.
    len: usize,
    /// Sum of the entries' costs.
    bytes: usize,
    /// The entries in insertion order, `None` where the entry left. Invariant after every
    /// call but [`release`](Self::release): the front is live, and `len <= 2 * self.len`.
    entries: Queue<Cached>,
    /// The key of each entry in order of use, least recently used first, `None` where the
    /// entry left or was used again. Invariant after every call but `release`: the front is
    /// live, and `len <= 2 * self.len`.
    lru: Queue<CacheKey>,
    /// Counters.
    stats: CacheStats,
}

impl MessageCache {
    /// An empty cache holding at most `max_entries` entries and `max_bytes` bytes, each for
    /// `ttl` after its insertion.
    pub(crate) fn new(max_entries: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            max_entries,
            max_bytes,
            ttl,
            len: 0,
            bytes: 0,
            entries: Queue::default(),
            lru: Queue::default(),
            stats: CacheStats::default(),
        }
    }

    /// Caches `record` in the slot of `key` as the most recently used entry, replacing what
    /// that slot had cached (its time to live restarts). Expired entries are dropped first
    /// (counted as expirations), then least recently used entries are evicted until both
    /// bounds hold, each counted. A record that cannot fit alone (or any record when
    /// `max_entries` is 0) is not stored and counts as one eviction. Returns the number
    /// evicted. Without a slot for `key` nothing is stored (and 0 returned).
    ///
    /// The deliveries take the three steps apart ([`expire`](Self::expire),
    /// [`fill`](Self::fill), [`after_fill`](Self::after_fill)) to look their slot up once,
    /// for its state and its cell; the tests drive them together, as here.
    #[cfg(test)]
    pub(crate) fn insert(
        &mut self,
        now: Instant,
        key: CacheKey,
        record: Record,
        slots: &mut impl CacheSlots,
    ) -> usize {
        self.expire(now, slots);
        let Some(cell) = slots.cell(key) else {
            trace!(
                partition = key.0,
                offset = key.1,
                "no slot to cache the record in"
            );
            return 0;
        };
        let encoded_len = record.encoded_len();
        let stored = self.fill(now, key, record, encoded_len, cell);
        self.after_fill(stored, slots)
    }

    /// The middle of [`insert`](Self::insert), for a caller that holds the slot's cell: after
    /// [`expire`](Self::expire), before [`after_fill`](Self::after_fill). Caches `record` in
    /// `cell` (the slot of `key`) as the most recently used entry, replacing what it held;
    /// returns whether it was stored (false: too large to cache). `encoded_len` is the
    /// record's [`Record::encoded_len`], which the caller has at hand.
    #[inline]
    pub(crate) fn fill(
        &mut self,
        now: Instant,
        key: CacheKey,
        record: Record,
        encoded_len: usize,
        cell: &mut CacheCell,
    ) -> bool {
        debug_assert_eq!(encoded_len, record.encoded_len());
        // What the cell held before leaves the cache.
        self.release(cell);
        let cost = encoded_len.saturating_add(ENTRY_OVERHEAD);
        if self.max_entries == 0 || cost > self.max_bytes {
            trace!(
                partition = key.0,
                offset = key.1,
                cost,
                max_bytes = self.max_bytes,
                "record too large to cache"
            );
            self.stats.evictions += 1;
            return false;
        }
        cell.0 = Some(self.entries.push_back(Cached {
            record,
            key,
            inserted: now,
            lru_at: self.lru.push_back(key),
            cost,
        }));
        self.len += 1;
        self.bytes += cost;
        true
    }

    /// The end of [`insert`](Self::insert), once the cell is let go: evicts what the bounds
    /// no longer hold (a stored entry is the most recently used and fits alone, so eviction
    /// stops before it) and tidies. Returns the number evicted, 1 for a record not `stored`.
    #[inline]
    pub(crate) fn after_fill(&mut self, stored: bool, slots: &mut impl CacheSlots) -> usize {
        let evicted = if stored {
            self.evict(slots, "cache eviction")
        } else {
            1
        };
        self.tidy(slots);
        evicted
    }

    /// New bounds (a live configuration update): expired entries under the new time to live
    /// are dropped (counted as expirations), then least recently used entries are evicted
    /// (counted as evictions) until both bounds hold. Returns the number evicted.
    pub(crate) fn set_bounds(
        &mut self,
        now: Instant,
        max_entries: usize,
        max_bytes: usize,
        ttl: Duration,
        slots: &mut impl CacheSlots,
    ) -> usize {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        self.ttl = ttl;
        self.expire(now, slots);
        let evicted = self.evict(slots, "cache eviction: bounds lowered");
        self.tidy(slots);
        evicted
    }

    /// A hit marks the entry most recently used and returns a clone of its record. An
    /// expired entry is dropped (counted in `expirations`) and misses.
    pub(crate) fn get(
        &mut self,
        now: Instant,
        key: CacheKey,
        slots: &mut impl CacheSlots,
    ) -> Option<Record> {
        let Some(cell) = slots.cell(key).filter(|cell| cell.is_cached()) else {
            self.stats.misses += 1;
            return None;
        };
        let live = cell.0.and_then(|at| self.entries.get(at));
        if live.is_none_or(|entry| self.is_expired(entry.inserted, now)) {
            self.release(cell);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            self.tidy(slots);
            return None;
        }
        let lru = &mut self.lru;
        let record = cell.0.and_then(|at| self.entries.get_mut(at)).map(|entry| {
            lru.vacate(entry.lru_at);
            entry.lru_at = lru.push_back(key);
            entry.record.clone()
        });
        self.stats.hits += 1;
        self.tidy(slots);
        record
    }

    /// Read-only lookup of the record a slot's cell holds: no LRU touch, no stats. `None`
    /// when nothing is cached there or it expired.
    pub(crate) fn peek(&self, now: Instant, cell: &CacheCell) -> Option<&Record> {
        cell.0
            .and_then(|at| self.entries.get(at))
            .filter(|entry| !self.is_expired(entry.inserted, now))
            .map(|entry| &entry.record)
    }

    /// The slot holding `cell` is settled or dropped: its record leaves the cache (not an
    /// eviction). Returns whether one was cached. Its queue items are emptied in place (popped
    /// when they are the fronts, as when settling in order), so call [`tidy`](Self::tidy)
    /// once the slots are updated and before the next [`poll_timeout`](Self::poll_timeout).
    #[inline(always)]
    pub(crate) fn release(&mut self, cell: &mut CacheCell) -> bool {
        match cell.0.take() {
            Some(at) => self.forget(at),
            None => false,
        }
    }

    /// Drops the entry at `at`, whose cell let go of it: empties its
    /// items in both queues, takes it off the counts. False when there is no such entry.
    #[inline]
    fn forget(&mut self, at: u64) -> bool {
        let Some(entry) = self.entries.get(at) else {
            return false;
        };
        let (lru_at, cost) = (entry.lru_at, entry.cost);
        self.len -= 1;
        self.bytes -= cost;
        self.entries.vacate(at);
        self.lru.vacate(lru_at);
        true
    }

    /// Drops expired entries (counted in `expirations`). Spurious calls are no-ops.
    pub(crate) fn handle_timeout(&mut self, now: Instant, slots: &mut impl CacheSlots) {
        self.expire(now, slots);
        self.tidy(slots);
    }

    /// When the oldest entry expires (the time to live of the earliest insertion still
    /// cached). `None` when empty, or when that is beyond what `Instant` can hold.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.entries
            .front()
            .and_then(|entry| entry.inserted.checked_add(self.ttl))
    }

    /// Entries held (expired ones not yet dropped included).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held: the sum of `record.encoded_len() + 16` over the entries.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counters since construction.
    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Restores the queue invariants after [`release`](Self::release): live fronts, and at
    /// most twice the live entry count in each queue. Slots are looked up only to compact a
    /// queue.
    #[inline]
    pub(crate) fn tidy(&mut self, slots: &mut impl CacheSlots) {
        // Every entry has exactly one live item per queue, so equal lengths mean no empty item.
        if self.entries.len() != self.len || self.lru.len() != self.len {
            self.drop_vacant(slots);
        }
    }

    /// [`tidy`](Self::tidy) when some item is empty.
    #[cold]
    fn drop_vacant(&mut self, slots: &mut impl CacheSlots) {
        // Entries first: the cells then name the entries' new positions, where the LRU
        // queue's positions are stored.
        self.entries.tidy(self.len, |at, entry| {
            if let Some(cell) = slots.cell(entry.key) {
                cell.0 = Some(at);
            }
        });
        let entries = &mut self.entries;
        self.lru.tidy(self.len, |at, &key| {
            let cached = slots.cell(key).and_then(|cell| cell.0);
            if let Some(entry) = cached.and_then(|at| entries.get_mut(at)) {
                entry.lru_at = at;
            }
        });
    }

    /// Whether an entry inserted at `inserted` has expired at `now`.
    fn is_expired(&self, inserted: Instant, now: Instant) -> bool {
        inserted
            .checked_add(self.ttl)
            .is_some_and(|deadline| now >= deadline)
    }

    /// Drops every expired entry from the front of the entry queue (the start of
    /// [`insert`](Self::insert)).
    #[inline]
    pub(crate) fn expire(&mut self, now: Instant, slots: &mut impl CacheSlots) {
        if self
            .entries
            .front()
            .is_some_and(|entry| self.is_expired(entry.inserted, now))
        {
            self.expire_due(now, slots);
        }
    }

    /// [`expire`](Self::expire) when the front item is due.
    #[cold]
    fn expire_due(&mut self, now: Instant, slots: &mut impl CacheSlots) {
        loop {
            self.entries.pop_vacant();
            let Some(entry) = self.entries.front() else {
                break;
            };
            if !self.is_expired(entry.inserted, now) {
                break;
            }
            let key = entry.key;
            // Its slot lets go of it (unless the slot was dropped unreleased: the entry goes
            // all the same).
            if let Some(cell) = slots.cell(key) {
                debug_assert_eq!(cell.0, Some(self.entries.head), "the front's cell");
                cell.0 = None;
            }
            self.forget(self.entries.head);
            self.stats.expirations += 1;
            trace!(partition = key.0, offset = key.1, "cache expiration");
        }
    }

    /// Evicts least recently used entries until both bounds hold; counts and returns them.
    #[inline]
    fn evict(&mut self, slots: &mut impl CacheSlots, why: &'static str) -> usize {
        if self.len > self.max_entries || self.bytes > self.max_bytes {
            self.evict_over(slots, why)
        } else {
            0
        }
    }

    /// [`evict`](Self::evict) when a bound is exceeded.
    #[cold]
    fn evict_over(&mut self, slots: &mut impl CacheSlots, why: &'static str) -> usize {
        let mut evicted = 0;
        while self.len > self.max_entries || self.bytes > self.max_bytes {
            self.lru.pop_vacant();
            let Some(&key) = self.lru.front() else {
                break;
            };
            // A live item: its slot holds its entry (unless a slot was dropped unreleased).
            let Some(at) = slots.cell(key).and_then(|cell| cell.0.take()) else {
                self.lru.pop_front();
                continue;
            };
            debug_assert_eq!(
                self.entries.get(at).map(|entry| entry.lru_at),
                Some(self.lru.head),
                "the front's entry"
            );
            self.forget(at);
            evicted += 1;
            trace!(partition = key.0, offset = key.1, "{why}");
        }
        self.stats.evictions += evicted as u64;
        evicted
    }

    /// Length of the entry queue, empty items included.
    #[cfg(test)]
    fn expiry_len(&self) -> usize {
        self.entries.len()
    }

    /// Length of the LRU queue, empty items included.
    #[cfg(test)]
    fn lru_len(&self) -> usize {
        self.lru.len()
    }

    /// Keys of the live entries, least recently used first.
    #[cfg(test)]
    fn lru_keys(&self) -> Vec<CacheKey> {
        self.lru.items.iter().flatten().copied().collect()
    }
}

/// A FIFO of items that can be emptied in place, addressed by position: the number of items
/// pushed before it, less those compacted away. Positions stay put when the front is popped.
#[derive(Debug)]
struct Queue<T> {
    /// `None` where the item was emptied.
    items: VecDeque<Option<T>>,
    /// Position of `items[0]`.
    head: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            head: 0,
        }
    }
}

impl<T> Queue<T> {
    /// Items held, empty ones included.
    fn len(&self) -> usize {
        self.items.len()
    }

    /// The front item, `None` when the front is empty or the queue is.
    fn front(&self) -> Option<&T> {
        self.items.front().and_then(Option::as_ref)
    }

    /// The item at position `at`, `None` when it is empty or outside the queue.
    #[inline]
    fn get(&self, at: u64) -> Option<&T> {
        let i = usize::try_from(at.checked_sub(self.head)?).ok()?;
        self.items.get(i)?.as_ref()
    }

    /// [`get`](Self::get), mutably.
    #[inline]
    fn get_mut(&mut self, at: u64) -> Option<&mut T> {
        let i = usize::try_from(at.checked_sub(self.head)?).ok()?;
        self.items.get_mut(i)?.as_mut()
    }

    /// Appends `item`; returns its position.
    #[inline(always)]
    fn push_back(&mut self, item: T) -> u64 {
        self.items.push_back(Some(item));
        self.head + self.items.len() as u64 - 1
    }

    /// Drops the front item.
    #[inline]
    fn pop_front(&mut self) {
        if self.items.pop_front().is_some() {
            self.head += 1;
        }
    }

    /// Empties the item at `at`; pops it when it is the front.
    #[inline]
    fn vacate(&mut self, at: u64) {
        if at == self.head {
            self.pop_front();
        } else {
            self.vacate_inside(at);
        }
    }

    /// [`vacate`](Self::vacate) behind the front.
    fn vacate_inside(&mut self, at: u64) {
        let idx = at
            .checked_sub(self.head)
            .and_then(|i| usize::try_from(i).ok());
        if let Some(item) = idx.and_then(|i| self.items.get_mut(i)) {
            *item = None;
        }
    }

    /// Pops the empty items at the front.
    fn pop_vacant(&mut self) {
        while self.items.front().is_some_and(Option::is_none) {
            self.pop_front();
        }
    }

    /// Pops the empty items at the front, and drops every empty item once the queue holds
    /// over twice `live` items; `moved(position, item)` is then told each live item's new
    /// position.
    fn tidy(&mut self, live: usize, mut moved: impl FnMut(u64, &T)) {
        self.pop_vacant();
        if self.items.len() <= 2 * live {
            return;
        }
        let items = self.items.make_contiguous();
        let mut kept = 0;
        for i in 0..items.len() {
            if let Some(item) = &items[i] {
                moved(self.head + kept as u64, item);
                items.swap(kept, i);
                kept += 1;
            }
        }
        self.items.truncate(kept);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::unwrap_used)]
// tests build their base instant once, and may unwrap
mod tests;
