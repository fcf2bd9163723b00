//! The message cache: a sans-IO LRU bounded by entries and bytes, with one time to live.
//!
//! Redeliveries are served from here; a message the cache lost is re-fetched by the caller.
//! The LRU order lives in a [`LinkedHashMap`] (front = least recently used). Expiry order is
//! insertion order (every entry shares one TTL, measured from insertion), kept in a side deque
//! with lazy deletion: an item whose sequence number no longer matches its key's entry is stale
//! and skipped. The deque's front is always live, and it is compacted when it exceeds twice the
//! live entry count, so its length stays at most `2 * len()` whatever the pattern of inserts
//! and removals. Every operation is O(1) amortised except [`MessageCache::remove_partition`].
//!
//! Time enters as `now`; it must not go backwards between calls.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use rustc_hash::FxBuildHasher;
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

/// One cached message.
#[derive(Debug, Clone)]
struct Entry {
    /// The message.
    record: Record,
    /// When it was inserted; it expires at `inserted + ttl`.
    inserted: Instant,
    /// Matches exactly one item of the expiry deque.
    seq: u64,
    /// Bytes charged against `max_bytes`.
    cost: usize,
}

/// An LRU + TTL cache of fetched messages, keyed by `(partition, offset)`.
#[derive(Debug)]
pub(crate) struct MessageCache {
    /// Most entries held at once.
    max_entries: usize,
    /// Most bytes (encoded length + overhead) held at once.
    max_bytes: usize,
    /// Time to live from insertion.
    ttl: Duration,
    /// The entries, least recently used first.
    /// Keys are `(partition, offset)` pairs the consumer assigns itself, so a fast
    /// non-keyed hasher is safe.
    map: LinkedHashMap<CacheKey, Entry, FxBuildHasher>,
    /// `(inserted, seq, key)` in insertion order; items whose `seq` differs from the entry's
    /// are stale. Invariant after every call: the front is live, and `len <= 2 * map.len()`.
    expiry: VecDeque<(Instant, u64, CacheKey)>,
    /// Next entry sequence number.
    next_seq: u64,
    /// Sum of the entries' costs.
    bytes: usize,
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
            map: LinkedHashMap::with_hasher(FxBuildHasher),
            expiry: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            stats: CacheStats::default(),
        }
    }

    /// Inserts `record` as the most recently used entry, replacing any entry of `key` (its
    /// time to live restarts). Expired entries are dropped first (counted as expirations),
    /// then least recently used entries are evicted until both bounds hold, each counted.
    /// A record that cannot fit alone (or any record when `max_entries` is 0) is not stored
    /// and counts as one eviction. Returns the number evicted.
    pub(crate) fn insert(&mut self, now: Instant, key: CacheKey, record: Record) -> usize {
        self.expire(now);
        if let Some(old) = self.map.remove(&key) {
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
            self.tidy();
            return 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.insert(
            key,
            Entry {
                record,
                inserted: now,
                seq,
                cost,
            },
        );
        self.bytes += cost;
        self.expiry.push_back((now, seq, key));
        let mut evicted = 0;
        while self.map.len() > self.max_entries || self.bytes > self.max_bytes {
            // The new entry is at the back and fits alone, so the loop stops before it.
            let Some((old_key, old)) = self.map.pop_front() else {
                break;
            };
            self.bytes -= old.cost;
            evicted += 1;
            trace!(partition = old_key.0, offset = old_key.1, "cache eviction");
        }
        self.stats.evictions += evicted as u64;
        self.tidy();
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
    ) -> usize {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        self.ttl = ttl;
        self.expire(now);
        let mut evicted = 0;
        while self.map.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((key, old)) = self.map.pop_front() else {
                break;
            };
            self.bytes -= old.cost;
            evicted += 1;
            trace!(
                partition = key.0,
                offset = key.1,
                "cache eviction: bounds lowered"
            );
        }
        self.stats.evictions += evicted as u64;
        self.tidy();
        evicted
    }

    /// A hit marks the entry most recently used and returns a clone of its record. An
    /// expired entry is removed (counted in `expirations`) and misses.
    pub(crate) fn get(&mut self, now: Instant, key: CacheKey) -> Option<Record> {
        let expired = match self.map.get(&key) {
            None => {
                self.stats.misses += 1;
                return None;
            }
            Some(entry) => self.is_expired(entry.inserted, now),
        };
        if expired {
            self.drop_entry(key);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            self.tidy();
            return None;
        }
        match self.map.to_back(&key) {
            Some(entry) => {
                self.stats.hits += 1;
                Some(entry.record.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Read-only lookup: no LRU touch, no stats. `None` when missing or expired.
    pub(crate) fn peek(&self, now: Instant, key: CacheKey) -> Option<&Record> {
        self.map
            .get(&key)
            .filter(|entry| !self.is_expired(entry.inserted, now))
            .map(|entry| &entry.record)
    }

    /// Removes a settled message (not an eviction). Returns whether it was cached.
    pub(crate) fn remove(&mut self, key: CacheKey) -> bool {
        let Some(entry) = self.map.remove(&key) else {
            return false;
        };
        self.bytes -= entry.cost;
        // Settling in order removes the oldest entry: its expiry item is the front, known
        // stale without a lookup.
        if self
            .expiry
            .front()
            .is_some_and(|&(_, seq, _)| seq == entry.seq)
        {
            self.expiry.pop_front();
        }
        self.tidy();
        true
    }

    /// Removes every entry of `partition` (revoke, seek); not counted as evictions. O(n).
    pub(crate) fn remove_partition(&mut self, partition: u32) {
        let mut freed = 0;
        self.map.retain(|key, entry| {
            let keep = key.0 != partition;
            if !keep {
                freed += entry.cost;
            }
            keep
        });
        self.bytes -= freed;
        self.expiry.retain(|&(_, _, key)| key.0 != partition);
        self.tidy();
    }

    /// Drops expired entries (counted in `expirations`). Spurious calls are no-ops.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        self.tidy();
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
        self.map.len()
    }

    /// Whether nothing is held.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held: the sum of `record.encoded_len() + 16` over the entries.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counters since construction.
    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether an entry inserted at `inserted` has expired at `now`.
    fn is_expired(&self, inserted: Instant, now: Instant) -> bool {
        inserted
            .checked_add(self.ttl)
            .is_some_and(|deadline| now >= deadline)
    }

    /// Removes `key`'s entry, leaving its expiry item stale. Returns whether it existed.
    fn drop_entry(&mut self, key: CacheKey) -> bool {
        match self.map.remove(&key) {
            Some(entry) => {
                self.bytes -= entry.cost;
                true
            }
            None => false,
        }
    }

    /// Drops every expired entry from the front of the expiry deque.
    fn expire(&mut self, now: Instant) {
        while let Some(&(inserted, seq, key)) = self.expiry.front() {
            if !self.is_expired(inserted, now) {
                break;
            }
            self.expiry.pop_front();
            if self.is_live(seq, key) {
                self.drop_entry(key);
                self.stats.expirations += 1;
                trace!(partition = key.0, offset = key.1, "cache expiration");
            }
        }
    }

    /// Whether the expiry item `(seq, key)` belongs to a cached entry.
    fn is_live(&self, seq: u64, key: CacheKey) -> bool {
        self.map.get(&key).is_some_and(|entry| entry.seq == seq)
    }

    /// Restores the deque invariants: a live front, and at most twice the live entry count.
    fn tidy(&mut self) {
        // Every entry has exactly one live item, so equal lengths mean no stale item at all.
        if self.expiry.len() == self.map.len() {
            return;
        }
        while let Some(&(_, seq, key)) = self.expiry.front() {
            if self.is_live(seq, key) {
                break;
            }
            self.expiry.pop_front();
        }
        if self.expiry.len() > 2 * self.map.len() {
            let map = &self.map;
            self.expiry
                .retain(|&(_, seq, key)| map.get(&key).is_some_and(|entry| entry.seq == seq));
        }
    }

    /// Length of the expiry deque, stale items included.
    #[cfg(test)]
    fn expiry_len(&self) -> usize {
        self.expiry.len()
    }

    /// Keys, least recently used first.
    #[cfg(test)]
    fn lru_keys(&self) -> Vec<CacheKey> {
        self.map.keys().copied().collect()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::unwrap_used)]
// tests build their base instant once, and may unwrap
mod tests;
