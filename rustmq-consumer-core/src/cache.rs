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
#[allow(clippy::disallowed_methods, clippy::unwrap_used)] // tests build their base instant once, and may unwrap
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A record whose value is `len` bytes of `fill`.
    fn rec(len: usize, fill: u8) -> Record {
        Record::from_value(vec![fill; len])
    }

    /// Bytes charged for `rec(len, _)`.
    fn cost(len: usize) -> usize {
        rec(len, 0).encoded_len() + ENTRY_OVERHEAD
    }

    fn roomy() -> MessageCache {
        MessageCache::new(100, 1 << 20, TTL)
    }

    #[test]
    fn cost_is_encoded_length_plus_overhead() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(10, 1));
        c.insert(t0, (0, 1), rec(0, 1));
        assert_eq!(
            c.bytes(),
            rec(10, 1).encoded_len() + rec(0, 1).encoded_len() + 32
        );
        assert_eq!(c.len(), 2);
        assert!(!c.is_empty());
    }

    #[test]
    fn get_hits_and_misses() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (1, 5), rec(3, 7));
        assert_eq!(c.get(t0, (1, 5)), Some(rec(3, 7)));
        assert_eq!(c.get(t0, (1, 6)), None);
        assert_eq!(c.get(t0, (2, 5)), None);
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 1,
                misses: 2,
                evictions: 0,
                expirations: 0
            }
        );
    }

    #[test]
    fn lru_order_follows_touches() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(3, 1 << 20, TTL);
        for o in 0..3 {
            c.insert(t0, (0, o), rec(1, o as u8));
        }
        assert!(c.get(t0, (0, 0)).is_some());
        assert_eq!(c.lru_keys(), vec![(0, 1), (0, 2), (0, 0)]);
        assert_eq!(c.insert(t0, (0, 3), rec(1, 3)), 1);
        assert_eq!(c.peek(t0, (0, 1)), None, "least recently used went first");
        assert_eq!(c.peek(t0, (0, 0)), Some(&rec(1, 0)));
        // peek does not touch: (0, 2) is still the oldest.
        assert!(c.peek(t0, (0, 2)).is_some());
        assert_eq!(c.insert(t0, (0, 4), rec(1, 4)), 1);
        assert_eq!(c.lru_keys(), vec![(0, 0), (0, 3), (0, 4)]);
    }

    #[test]
    fn replacing_moves_to_most_recent_and_updates_bytes() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(2, 1 << 20, TTL);
        c.insert(t0, (0, 0), rec(10, 0));
        c.insert(t0, (0, 1), rec(10, 1));
        assert_eq!(
            c.insert(t0, (0, 0), rec(50, 9)),
            0,
            "a replacement evicts nothing"
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.bytes(), cost(10) + cost(50));
        assert_eq!(c.lru_keys(), vec![(0, 1), (0, 0)]);
        assert_eq!(c.peek(t0, (0, 0)), Some(&rec(50, 9)));
        assert_eq!(c.stats().evictions, 0);
    }

    #[test]
    fn entry_bound_evicts_least_recently_used() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(2, 1 << 20, TTL);
        assert_eq!(c.insert(t0, (0, 0), rec(1, 0)), 0);
        assert_eq!(c.insert(t0, (1, 0), rec(1, 0)), 0);
        assert_eq!(c.insert(t0, (2, 0), rec(1, 0)), 1);
        assert_eq!(c.len(), 2);
        assert_eq!(c.bytes(), 2 * cost(1));
        assert_eq!(c.lru_keys(), vec![(1, 0), (2, 0)]);
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn byte_bound_evicts_until_it_fits() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(100, 3 * cost(10), TTL);
        for o in 0..3 {
            assert_eq!(c.insert(t0, (0, o), rec(10, 0)), 0);
        }
        assert_eq!(c.bytes(), 3 * cost(10));
        // Costs more than one small entry and no more than two.
        let big = 40;
        assert!(cost(big) > cost(10) && cost(big) <= 2 * cost(10));
        assert_eq!(c.insert(t0, (0, 9), rec(big, 0)), 2);
        assert_eq!(c.lru_keys(), vec![(0, 2), (0, 9)]);
        assert_eq!(c.bytes(), cost(10) + cost(big));
        assert!(c.bytes() <= 3 * cost(10));
        assert_eq!(c.stats().evictions, 2);
    }

    #[test]
    fn oversized_record_is_not_stored_but_counted() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(10, cost(100), TTL);
        assert_eq!(
            c.insert(t0, (0, 1), rec(100, 0)),
            0,
            "exactly max_bytes fits"
        );
        assert_eq!(c.bytes(), cost(100));
        assert!(c.remove((0, 1)));
        c.insert(t0, (0, 0), rec(5, 0));
        assert_eq!(c.insert(t0, (0, 1), rec(101, 0)), 1);
        assert_eq!(c.peek(t0, (0, 1)), None);
        assert_eq!(c.peek(t0, (0, 0)), Some(&rec(5, 0)), "nothing else evicted");
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), cost(5));
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn oversized_replacement_drops_the_old_entry() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(10, cost(100), TTL);
        c.insert(t0, (0, 0), rec(5, 0));
        assert_eq!(c.insert(t0, (0, 0), rec(200, 0)), 1);
        assert_eq!(c.peek(t0, (0, 0)), None, "never serve a superseded record");
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn zero_entries_stores_nothing() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(0, 1 << 20, TTL);
        assert_eq!(c.insert(t0, (0, 0), rec(1, 0)), 1);
        assert!(c.is_empty());
        assert_eq!(c.get(t0, (0, 0)), None);
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn get_expires_at_the_ttl() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(4, 0));
        assert!(c.get(t0 + TTL - ms(1), (0, 0)).is_some(), "still live");
        assert_eq!(
            c.get(t0 + TTL, (0, 0)),
            None,
            "the touch did not extend the ttl"
        );
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 1,
                misses: 1,
                evictions: 0,
                expirations: 1
            }
        );
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn peek_hides_expired_entries_without_side_effects() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(4, 0));
        c.insert(t0, (0, 1), rec(4, 1));
        assert_eq!(c.peek(t0 + TTL - ms(1), (0, 0)), Some(&rec(4, 0)));
        assert_eq!(c.peek(t0 + TTL, (0, 0)), None);
        assert_eq!(c.peek(t0, (9, 9)), None);
        assert_eq!(c.len(), 2, "peek removes nothing");
        assert_eq!(c.lru_keys(), vec![(0, 0), (0, 1)], "peek touches nothing");
        assert_eq!(c.stats(), CacheStats::default());
    }

    #[test]
    fn handle_timeout_drops_expired_in_insertion_order() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(1, 0));
        c.insert(t0 + ms(10), (0, 1), rec(1, 1));
        c.insert(t0 + ms(20), (0, 2), rec(1, 2));
        assert!(
            c.get(t0 + ms(20), (0, 0)).is_some(),
            "a touch does not delay expiry"
        );
        assert_eq!(c.poll_timeout(), Some(t0 + TTL));
        c.handle_timeout(t0 + TTL + ms(10));
        assert_eq!(c.lru_keys(), vec![(0, 2)]);
        assert_eq!(c.bytes(), cost(1));
        assert_eq!(c.stats().expirations, 2);
        assert_eq!(c.stats().evictions, 0);
        assert_eq!(c.poll_timeout(), Some(t0 + ms(20) + TTL));
    }

    #[test]
    fn spurious_timeouts_are_no_ops() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.handle_timeout(t0);
        c.insert(t0, (0, 0), rec(1, 0));
        c.handle_timeout(t0);
        c.handle_timeout(t0 + TTL - ms(1));
        assert_eq!(c.len(), 1);
        assert_eq!(c.stats(), CacheStats::default());
        assert_eq!(c.poll_timeout(), Some(t0 + TTL));
    }

    #[test]
    fn poll_timeout_tracks_the_oldest_live_insertion() {
        let t0 = Instant::now();
        let mut c = roomy();
        assert_eq!(c.poll_timeout(), None);
        c.insert(t0, (0, 0), rec(1, 0));
        c.insert(t0 + ms(5), (0, 1), rec(1, 0));
        c.insert(t0 + ms(9), (1, 0), rec(1, 0));
        assert_eq!(c.poll_timeout(), Some(t0 + TTL));
        c.remove((0, 0));
        assert_eq!(c.poll_timeout(), Some(t0 + ms(5) + TTL));
        c.insert(t0 + ms(12), (0, 1), rec(1, 0));
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + ms(9) + TTL),
            "replacing restarts the ttl"
        );
        c.remove_partition(1);
        assert_eq!(c.poll_timeout(), Some(t0 + ms(12) + TTL));
        c.remove((0, 1));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn insert_drops_expired_entries_before_evicting_live_ones() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(2, 1 << 20, TTL);
        c.insert(t0, (0, 0), rec(1, 0));
        c.insert(t0 + ms(100), (0, 1), rec(1, 1));
        assert_eq!(c.insert(t0 + TTL, (0, 2), rec(1, 2)), 0);
        assert_eq!(c.lru_keys(), vec![(0, 1), (0, 2)]);
        assert_eq!(c.stats().expirations, 1);
        assert_eq!(c.stats().evictions, 0);
    }

    #[test]
    fn remove_is_not_an_eviction() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(8, 0));
        c.insert(t0, (0, 1), rec(8, 1));
        assert!(c.remove((0, 0)));
        assert!(!c.remove((0, 0)), "already gone");
        assert!(!c.remove((3, 3)));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), cost(8));
        assert_eq!(c.stats(), CacheStats::default());
        assert_eq!(c.get(t0, (0, 0)), None);
    }

    #[test]
    fn remove_partition_drops_only_that_partition() {
        let t0 = Instant::now();
        let mut c = roomy();
        for p in 0..3 {
            for o in 0..4 {
                c.insert(t0, (p, o), rec(p as usize + 1, 0));
            }
        }
        c.remove_partition(1);
        c.remove_partition(7);
        assert_eq!(c.len(), 8);
        assert_eq!(c.bytes(), 4 * cost(1) + 4 * cost(3));
        assert!(c.lru_keys().iter().all(|&(p, _)| p != 1));
        assert_eq!(c.peek(t0, (1, 2)), None);
        assert_eq!(c.peek(t0, (2, 2)), Some(&rec(3, 0)));
        assert_eq!(c.stats(), CacheStats::default(), "not evictions");
        assert!(c.expiry_len() <= 2 * c.len());
    }

    #[test]
    fn expiry_deque_stays_bounded_under_churn_at_one_instant() {
        let t0 = Instant::now();
        let mut c = roomy();
        c.insert(t0, (0, 0), rec(1, 0));
        for i in 0..1000u64 {
            c.insert(t0, (0, 1), rec(1, 1));
            c.insert(t0, (0, 1), rec(1, 2));
            c.remove((0, 1));
            c.insert(t0, (1, i), rec(1, 0));
            c.remove((1, i));
            assert!(
                c.expiry_len() <= 2 * c.len(),
                "after {i}: {}",
                c.expiry_len()
            );
        }
        assert_eq!(c.len(), 1);
        c.handle_timeout(t0 + TTL);
        assert_eq!((c.len(), c.expiry_len()), (0, 0));
        assert_eq!(c.stats().expirations, 1);
    }

    #[test]
    fn huge_ttl_never_expires() {
        let t0 = Instant::now();
        let mut c = MessageCache::new(4, 1 << 20, Duration::MAX);
        c.insert(t0, (0, 0), rec(1, 0));
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(t0 + Duration::from_secs(1_000_000));
        assert!(c.get(t0 + Duration::from_secs(1_000_000), (0, 0)).is_some());
    }

    /// A reference model: entries in LRU order (front = least recently used).
    struct Model {
        max_entries: usize,
        max_bytes: usize,
        ttl: Duration,
        entries: Vec<(CacheKey, Instant, Record)>,
        stats: CacheStats,
    }

    impl Model {
        fn expired(&self, inserted: Instant, now: Instant) -> bool {
            now >= inserted + self.ttl
        }

        fn expire(&mut self, now: Instant) {
            let before = self.entries.len();
            let ttl = self.ttl;
            self.entries.retain(|(_, at, _)| now < *at + ttl);
            self.stats.expirations += (before - self.entries.len()) as u64;
        }

        fn cost(r: &Record) -> usize {
            r.encoded_len() + ENTRY_OVERHEAD
        }

        fn bytes(&self) -> usize {
            self.entries.iter().map(|(_, _, r)| Self::cost(r)).sum()
        }

        fn insert(&mut self, now: Instant, key: CacheKey, record: Record) -> usize {
            self.expire(now);
            self.entries.retain(|(k, _, _)| *k != key);
            if self.max_entries == 0 || Self::cost(&record) > self.max_bytes {
                self.stats.evictions += 1;
                return 1;
            }
            self.entries.push((key, now, record));
            let mut evicted = 0;
            while self.entries.len() > self.max_entries || self.bytes() > self.max_bytes {
                self.entries.remove(0);
                evicted += 1;
            }
            self.stats.evictions += evicted as u64;
            evicted
        }

        fn get(&mut self, now: Instant, key: CacheKey) -> Option<Record> {
            let Some(i) = self.entries.iter().position(|(k, _, _)| *k == key) else {
                self.stats.misses += 1;
                return None;
            };
            let entry = self.entries.remove(i);
            if self.expired(entry.1, now) {
                self.stats.expirations += 1;
                self.stats.misses += 1;
                return None;
            }
            self.stats.hits += 1;
            let record = entry.2.clone();
            self.entries.push(entry);
            Some(record)
        }

        fn peek(&self, now: Instant, key: CacheKey) -> Option<&Record> {
            self.entries
                .iter()
                .find(|(k, at, _)| *k == key && !self.expired(*at, now))
                .map(|(_, _, r)| r)
        }

        fn remove(&mut self, key: CacheKey) -> bool {
            let before = self.entries.len();
            self.entries.retain(|(k, _, _)| *k != key);
            self.entries.len() != before
        }

        fn poll_timeout(&self) -> Option<Instant> {
            self.entries.iter().map(|(_, at, _)| *at + self.ttl).min()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(CacheKey, usize, u8),
        Get(CacheKey),
        Peek(CacheKey),
        Remove(CacheKey),
        RemovePartition(u32),
        Advance(u64),
        Timeout,
    }

    fn key() -> impl Strategy<Value = CacheKey> {
        (0u32..3, 0u64..6)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (key(), 0usize..120, any::<u8>()).prop_map(|(k, n, f)| Op::Insert(k, n, f)),
            3 => key().prop_map(Op::Get),
            1 => key().prop_map(Op::Peek),
            2 => key().prop_map(Op::Remove),
            1 => (0u32..3).prop_map(Op::RemovePartition),
            2 => (0u64..30).prop_map(Op::Advance),
            1 => Just(Op::Timeout),
        ]
    }

    proptest! {
        #[test]
        fn matches_the_reference_model(
            max_entries in 0usize..7,
            max_bytes in 0usize..500,
            ttl_ms in 0u64..80,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let ttl = ms(ttl_ms);
            let mut now = Instant::now();
            let mut cache = MessageCache::new(max_entries, max_bytes, ttl);
            let mut model = Model {
                max_entries,
                max_bytes,
                ttl,
                entries: Vec::new(),
                stats: CacheStats::default(),
            };
            for op in ops {
                match op {
                    Op::Insert(k, n, f) => {
                        prop_assert_eq!(cache.insert(now, k, rec(n, f)), model.insert(now, k, rec(n, f)));
                    }
                    Op::Get(k) => prop_assert_eq!(cache.get(now, k), model.get(now, k)),
                    Op::Peek(k) => prop_assert_eq!(cache.peek(now, k), model.peek(now, k)),
                    Op::Remove(k) => prop_assert_eq!(cache.remove(k), model.remove(k)),
                    Op::RemovePartition(p) => {
                        cache.remove_partition(p);
                        model.entries.retain(|((q, _), _, _)| *q != p);
                    }
                    Op::Advance(d) => now += ms(d),
                    Op::Timeout => {
                        cache.handle_timeout(now);
                        model.expire(now);
                    }
                }
                let model_keys: Vec<CacheKey> = model.entries.iter().map(|(k, _, _)| *k).collect();
                prop_assert_eq!(cache.lru_keys(), model_keys);
                prop_assert_eq!(cache.len(), model.entries.len());
                prop_assert_eq!(cache.bytes(), model.bytes());
                prop_assert_eq!(cache.stats(), model.stats);
                prop_assert_eq!(cache.poll_timeout(), model.poll_timeout());
                prop_assert!(cache.len() <= max_entries);
                prop_assert!(cache.bytes() <= max_bytes);
                prop_assert!(cache.expiry_len() <= 2 * cache.len());
            }
        }
    }
}
