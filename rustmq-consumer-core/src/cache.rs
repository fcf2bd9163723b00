//! The message cache: a sans-IO LRU bounded by entries and bytes, with one time to live, kept
//! as an index over the settle windows' slots.
//!
//! Redeliveries are served from here; a message the cache lost is re-fetched by the caller.
//! A cached record lives in its offset's unsettled slot, in that slot's [`CacheCell`]: settling
//! the offset drops the record with the slot, and no map per message is kept. [`MessageCache`]
//! holds the bounds, the counters and two queues of `(sequence number, key)` items:
//!
//! - the expiry queue, in insertion order (every entry shares one TTL, measured from
//!   insertion), whose front is the next entry to expire;
//! - the LRU queue, in order of use (an insertion or a [`get`](MessageCache::get) pushes the
//!   entry again at the back), whose front is the next entry to evict.
//!
//! Both use lazy deletion: an item is live while the slot of its key exists and its cell holds
//! the entry with the item's sequence number; any other item is stale and skipped. Every entry
//! has exactly one live item in each queue, so a queue as long as the entry count has no stale
//! item. The expiry queue's front is always live; each queue is compacted when it exceeds
//! twice the live entry count, so both stay within `2 * len()` whatever the pattern of
//! inserts, uses and removals. Settling the oldest entry (in-order acks) pops both fronts
//! without looking a slot up. Every operation is O(1) amortised plus the caller's slot lookup.
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

/// What one unsettled slot holds of the cache: its record, if cached. Only the cache fills or
/// empties it, so its accounting stays exact; a slot dropped with a record still cached must
/// give the cell to [`MessageCache::release`] first.
#[derive(Debug, Default)]
pub(crate) struct CacheCell(Option<Cached>);

/// One cached message.
#[derive(Debug)]
struct Cached {
    /// The message.
    record: Record,
    /// When it was inserted; it expires at `inserted + ttl`.
    inserted: Instant,
    /// Matches exactly one item of the expiry queue.
    seq: u64,
    /// Matches exactly one item of the LRU queue (its last use).
    used: u64,
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
    /// Entries held: cells holding a record.
    len: usize,
    /// Sum of the entries' costs.
    bytes: usize,
    /// `(inserted, seq, key)` in insertion order; an item is live when `key`'s cell holds the
    /// entry of `seq`. Invariant after every call but [`release`](Self::release): the front is
    /// live, and `len <= 2 * self.len`.
    expiry: VecDeque<(Instant, u64, CacheKey)>,
    /// `(used, key)` in order of use, least recently used first; an item is live when `key`'s
    /// cell holds an entry last used as `used`. Invariant after every call but `release`:
    /// `len <= 2 * self.len`.
    lru: VecDeque<(u64, CacheKey)>,
    /// Next sequence number (insertions and uses share it).
    next_seq: u64,
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
            expiry: VecDeque::new(),
            lru: VecDeque::new(),
            next_seq: 0,
            stats: CacheStats::default(),
        }
    }

    /// Caches `record` in the slot of `key` as the most recently used entry, replacing what
    /// that slot had cached (its time to live restarts). Expired entries are dropped first
    /// (counted as expirations), then least recently used entries are evicted until both
    /// bounds hold, each counted. A record that cannot fit alone (or any record when
    /// `max_entries` is 0) is not stored and counts as one eviction. Returns the number
    /// evicted. Without a slot for `key` nothing is stored (and 0 returned).
    #[inline]
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
        if let Some(old) = cell.0.take() {
            self.len -= 1;
            self.bytes -= old.cost;
        }
        let cost = record.encoded_len().saturating_add(ENTRY_OVERHEAD);
        if self.max_entries == 0 || cost > self.max_bytes {
            trace!(
                partition = key.0,
                offset = key.1,
                cost,
                max_bytes = self.max_bytes,
                "record too large to cache"
            );
            self.stats.evictions += 1;
            self.tidy(slots);
            return 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        cell.0 = Some(Cached {
            record,
            inserted: now,
            seq,
            used: seq,
            cost,
        });
        self.len += 1;
        self.bytes += cost;
        self.expiry.push_back((now, seq, key));
        self.lru.push_back((seq, key));
        // The new entry is at the back of the LRU queue and fits alone, so eviction stops
        // before it.
        let evicted = self.evict(slots, "cache eviction");
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
        let expired = cell
            .0
            .as_ref()
            .is_some_and(|entry| self.is_expired(entry.inserted, now));
        if expired {
            if let Some(entry) = cell.0.take() {
                self.len -= 1;
                self.bytes -= entry.cost;
            }
            self.stats.expirations += 1;
            self.stats.misses += 1;
            self.tidy(slots);
            return None;
        }
        let used = self.next_seq;
        let record = cell.0.as_mut().map(|entry| {
            entry.used = used;
            entry.record.clone()
        });
        self.next_seq += 1;
        self.lru.push_back((used, key));
        self.stats.hits += 1;
        self.tidy(slots);
        record
    }

    /// Read-only lookup of the record a slot's cell holds: no LRU touch, no stats. `None`
    /// when nothing is cached there or it expired.
    pub(crate) fn peek<'a>(&self, now: Instant, cell: &'a CacheCell) -> Option<&'a Record> {
        cell.0
            .as_ref()
            .filter(|entry| !self.is_expired(entry.inserted, now))
            .map(|entry| &entry.record)
    }

    /// The slot holding `cell` is settled or dropped: its record leaves the cache (not an
    /// eviction). Returns whether one was cached. When the entry is the oldest one (settling
    /// in order), its queue items are popped without a lookup; any others are left stale, so
    /// call [`tidy`](Self::tidy) once the slots are updated and before the next
    /// [`poll_timeout`](Self::poll_timeout).
    #[inline]
    pub(crate) fn release(&mut self, cell: &mut CacheCell) -> bool {
        let Some(entry) = &cell.0 else {
            return false;
        };
        let (seq, used, cost) = (entry.seq, entry.used, entry.cost);
        // Dropped in place, not moved out.
        cell.0 = None;
        self.len -= 1;
        self.bytes -= cost;
        if self.expiry.front().is_some_and(|&(_, s, _)| s == seq) {
            self.expiry.pop_front();
        }
        if self.lru.front().is_some_and(|&(u, _)| u == used) {
            self.lru.pop_front();
        }
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
        self.expiry
            .front()
            .and_then(|&(inserted, _, _)| inserted.checked_add(self.ttl))
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

    /// Restores the queue invariants after [`release`](Self::release): a live front of the
    /// expiry queue, and at most twice the live entry count in each queue. Nothing is looked
    /// up when no item is stale.
    #[inline]
    pub(crate) fn tidy(&mut self, slots: &mut impl CacheSlots) {
        // Every entry has exactly one live item per queue, so equal lengths mean no stale item.
        if self.expiry.len() != self.len || self.lru.len() != self.len {
            self.drop_stale(slots);
        }
    }

    /// [`tidy`](Self::tidy) when some item is stale.
    #[cold]
    fn drop_stale(&mut self, slots: &mut impl CacheSlots) {
        if self.expiry.len() != self.len {
            while let Some(&(_, seq, key)) = self.expiry.front() {
                if inserted_as(slots, key, seq) {
                    break;
                }
                self.expiry.pop_front();
            }
            if self.expiry.len() > 2 * self.len {
                self.expiry
                    .retain(|&(_, seq, key)| inserted_as(slots, key, seq));
            }
        }
        if self.lru.len() != self.len {
            while let Some(&(used, key)) = self.lru.front() {
                if used_as(slots, key, used) {
                    break;
                }
                self.lru.pop_front();
            }
            if self.lru.len() > 2 * self.len {
                self.lru.retain(|&(used, key)| used_as(slots, key, used));
            }
        }
    }

    /// Whether an entry inserted at `inserted` has expired at `now`.
    fn is_expired(&self, inserted: Instant, now: Instant) -> bool {
        inserted
            .checked_add(self.ttl)
            .is_some_and(|deadline| now >= deadline)
    }

    /// Drops every expired entry from the front of the expiry queue.
    #[inline]
    fn expire(&mut self, now: Instant, slots: &mut impl CacheSlots) {
        if self
            .expiry
            .front()
            .is_some_and(|&(inserted, _, _)| self.is_expired(inserted, now))
        {
            self.expire_due(now, slots);
        }
    }

    /// [`expire`](Self::expire) when the front item is due.
    #[cold]
    fn expire_due(&mut self, now: Instant, slots: &mut impl CacheSlots) {
        while let Some(&(inserted, seq, key)) = self.expiry.front() {
            if !self.is_expired(inserted, now) {
                break;
            }
            self.expiry.pop_front();
            // A stale item (the slot is gone, or holds a later entry) expires nothing.
            let Some(entry) = slots
                .cell(key)
                .and_then(|cell| cell.0.take_if(|entry| entry.seq == seq))
            else {
                continue;
            };
            self.len -= 1;
            self.bytes -= entry.cost;
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
            let Some((used, key)) = self.lru.pop_front() else {
                break;
            };
            // A stale item (the slot is gone, or its entry was used since) evicts nothing.
            let Some(entry) = slots
                .cell(key)
                .and_then(|cell| cell.0.take_if(|entry| entry.used == used))
            else {
                continue;
            };
            self.len -= 1;
            self.bytes -= entry.cost;
            evicted += 1;
            trace!(partition = key.0, offset = key.1, "{why}");
        }
        self.stats.evictions += evicted as u64;
        evicted
    }

    /// Length of the expiry queue, stale items included.
    #[cfg(test)]
    fn expiry_len(&self) -> usize {
        self.expiry.len()
    }

    /// Length of the LRU queue, stale items included.
    #[cfg(test)]
    fn lru_len(&self) -> usize {
        self.lru.len()
    }

    /// Keys of the live entries, least recently used first.
    #[cfg(test)]
    fn lru_keys(&self, slots: &mut impl CacheSlots) -> Vec<CacheKey> {
        self.lru
            .iter()
            .filter(|&&(used, key)| used_as(slots, key, used))
            .map(|&(_, key)| key)
            .collect()
    }
}

/// Whether `key`'s slot holds the entry inserted as `seq` (its expiry item is live).
fn inserted_as(slots: &mut impl CacheSlots, key: CacheKey, seq: u64) -> bool {
    slots
        .cell(key)
        .and_then(|cell| cell.0.as_ref())
        .is_some_and(|entry| entry.seq == seq)
}

/// Whether `key`'s slot holds an entry last used as `used` (its LRU item is live).
fn used_as(slots: &mut impl CacheSlots, key: CacheKey, used: u64) -> bool {
    slots
        .cell(key)
        .and_then(|cell| cell.0.as_ref())
        .is_some_and(|entry| entry.used == used)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::unwrap_used)]
// tests build their base instant once, and may unwrap
mod tests;
