//! Tests of the message cache.
use std::collections::BTreeMap;

use super::*;
use proptest::prelude::*;

/// The test's settle windows: one slot per key, created when a record is inserted there and
/// dropped when it is settled; counts the cache's lookups.
#[derive(Default)]
struct Slots {
    cells: BTreeMap<CacheKey, CacheCell>,
    lookups: usize,
}

impl CacheSlots for Slots {
    fn cell(&mut self, key: CacheKey) -> Option<&mut CacheCell> {
        self.lookups += 1;
        self.cells.get_mut(&key)
    }
}

/// The cache over its slots, driven the way the partitions drive it.
struct Harness {
    cache: MessageCache,
    slots: Slots,
}

impl Harness {
    fn new(max_entries: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            cache: MessageCache::new(max_entries, max_bytes, ttl),
            slots: Slots::default(),
        }
    }

    /// Delivers `record` at `key`: its slot exists from then on.
    fn insert(&mut self, now: Instant, key: CacheKey, record: Record) -> usize {
        self.slots.cells.entry(key).or_default();
        self.cache.insert(now, key, record, &mut self.slots)
    }

    fn get(&mut self, now: Instant, key: CacheKey) -> Option<Record> {
        self.cache.get(now, key, &mut self.slots)
    }

    fn peek(&self, now: Instant, key: CacheKey) -> Option<&Record> {
        self.cache.peek(now, self.slots.cells.get(&key)?)
    }

    /// Settles `key`: its slot goes, with its record. Returns whether one was cached.
    fn remove(&mut self, key: CacheKey) -> bool {
        let Some(mut cell) = self.slots.cells.remove(&key) else {
            return false;
        };
        let cached = self.cache.release(&mut cell);
        self.cache.tidy(&mut self.slots);
        cached
    }

    /// Drops every slot of `partition` (a revoke or a restart).
    fn remove_partition(&mut self, partition: u32) {
        let keys: Vec<CacheKey> = self
            .slots
            .cells
            .keys()
            .copied()
            .filter(|k| k.0 == partition)
            .collect();
        for key in keys {
            if let Some(mut cell) = self.slots.cells.remove(&key) {
                self.cache.release(&mut cell);
            }
        }
        self.cache.tidy(&mut self.slots);
    }

    fn set_bounds(
        &mut self,
        now: Instant,
        max_entries: usize,
        max_bytes: usize,
        ttl: Duration,
    ) -> usize {
        self.cache
            .set_bounds(now, max_entries, max_bytes, ttl, &mut self.slots)
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.cache.handle_timeout(now, &mut self.slots);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.cache.poll_timeout()
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn is_empty(&self) -> bool {
        self.cache.len() == 0
    }

    fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn expiry_len(&self) -> usize {
        self.cache.expiry_len()
    }

    fn lru_len(&self) -> usize {
        self.cache.lru_len()
    }

    fn lru_keys(&mut self) -> Vec<CacheKey> {
        self.cache.lru_keys()
    }

    /// Keys whose slot holds a record.
    fn cached_keys(&self) -> Vec<CacheKey> {
        let cells = self.slots.cells.iter();
        cells
            .filter(|(_, c)| c.is_cached())
            .map(|(k, _)| *k)
            .collect()
    }
}

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

fn roomy() -> Harness {
    Harness::new(100, 1 << 20, TTL)
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
    let mut c = Harness::new(3, 1 << 20, TTL);
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
    let mut c = Harness::new(2, 1 << 20, TTL);
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
    let mut c = Harness::new(2, 1 << 20, TTL);
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
    let mut c = Harness::new(100, 3 * cost(10), TTL);
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
    let mut c = Harness::new(10, cost(100), TTL);
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
    let mut c = Harness::new(10, cost(100), TTL);
    c.insert(t0, (0, 0), rec(5, 0));
    assert_eq!(c.insert(t0, (0, 0), rec(200, 0)), 1);
    assert_eq!(c.peek(t0, (0, 0)), None, "never serve a superseded record");
    assert_eq!((c.len(), c.bytes()), (0, 0));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn zero_entries_stores_nothing() {
    let t0 = Instant::now();
    let mut c = Harness::new(0, 1 << 20, TTL);
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
    let mut c = Harness::new(2, 1 << 20, TTL);
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
    let mut c = Harness::new(4, 1 << 20, Duration::MAX);
    c.insert(t0, (0, 0), rec(1, 0));
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(t0 + Duration::from_secs(1_000_000));
    assert!(c.get(t0 + Duration::from_secs(1_000_000), (0, 0)).is_some());
}

#[test]
fn settling_in_order_looks_no_slot_up() {
    let t0 = Instant::now();
    let mut c = roomy();
    for o in 0..50 {
        c.insert(t0 + ms(o), (0, o), rec(1, 0));
    }
    c.slots.lookups = 0;
    for o in 0..50 {
        assert!(c.remove((0, o)));
        assert_eq!(c.poll_timeout(), (o < 49).then(|| t0 + ms(o + 1) + TTL));
    }
    assert_eq!(
        c.slots.lookups, 0,
        "each settled entry was both queues' front"
    );
    assert_eq!(
        (c.len(), c.bytes(), c.expiry_len(), c.lru_len()),
        (0, 0, 0, 0)
    );
}

#[test]
fn a_new_slot_at_a_settled_key_starts_a_new_entry() {
    let t0 = Instant::now();
    let mut c = Harness::new(2, 1 << 20, TTL);
    c.insert(t0, (0, 0), rec(1, 0));
    c.insert(t0 + ms(1), (0, 1), rec(1, 1));
    // Settled out of order, then the partition restarts and (0, 0) is delivered anew.
    assert!(c.remove((0, 1)));
    assert!(c.remove((0, 0)));
    c.insert(t0 + ms(2), (0, 1), rec(1, 2));
    c.insert(t0 + ms(3), (0, 0), rec(1, 3));
    assert_eq!(c.lru_keys(), vec![(0, 1), (0, 0)]);
    assert_eq!(c.poll_timeout(), Some(t0 + ms(2) + TTL));
    assert_eq!(c.insert(t0 + ms(4), (1, 0), rec(1, 4)), 1);
    assert_eq!(
        c.cached_keys(),
        vec![(0, 0), (1, 0)],
        "(0, 1) was least recently used"
    );
    c.handle_timeout(t0 + ms(3) + TTL);
    assert_eq!(c.cached_keys(), vec![(1, 0)]);
    assert_eq!(c.stats().expirations, 1);
    assert_eq!(c.stats().evictions, 1);
}

#[test]
fn eviction_and_expiry_empty_the_slot_and_keep_it() {
    let t0 = Instant::now();
    let mut c = Harness::new(1, 1 << 20, TTL);
    c.insert(t0, (0, 0), rec(1, 0));
    c.insert(t0, (0, 1), rec(1, 1));
    assert!(!c.slots.cells[&(0, 0)].is_cached(), "evicted");
    c.handle_timeout(t0 + TTL);
    assert!(!c.slots.cells[&(0, 1)].is_cached(), "expired");
    assert_eq!(
        c.slots.cells.len(),
        2,
        "the slots stay: the offsets are unsettled"
    );
    assert_eq!(c.get(t0 + TTL, (0, 0)), None);
    assert_eq!(c.stats().misses, 1);
    assert!(!c.remove((0, 0)), "nothing cached to release");
    assert!(c.is_empty());
}

#[test]
fn lru_queue_stays_bounded_under_uses() {
    let t0 = Instant::now();
    let mut c = roomy();
    c.insert(t0, (0, 0), rec(1, 0));
    c.insert(t0, (0, 1), rec(1, 1));
    for i in 0..1000 {
        assert!(c.get(t0, (0, i % 2)).is_some());
        assert!(c.lru_len() <= 2 * c.len(), "after {i}: {}", c.lru_len());
        assert!(c.expiry_len() <= 2 * c.len());
    }
    assert_eq!(c.lru_keys(), vec![(0, 0), (0, 1)]);
    assert_eq!(c.stats().hits, 1000);
}

#[test]
fn lowered_bounds_expire_then_evict_the_least_recently_used() {
    let t0 = Instant::now();
    let mut c = roomy();
    for o in 0..4 {
        c.insert(t0 + ms(o), (0, o), rec(10, 0));
    }
    assert!(c.get(t0 + ms(5), (0, 1)).is_some());
    let ttl = ms(4);
    // Under the new time to live (0, 0) and (0, 1) expired; of (0, 2) and (0, 3), one fits.
    assert_eq!(c.set_bounds(t0 + ms(5), 1, 1 << 20, ttl), 1);
    assert_eq!(c.cached_keys(), vec![(0, 3)]);
    assert_eq!(c.stats().expirations, 2);
    assert_eq!(c.stats().evictions, 1);
    assert_eq!(c.poll_timeout(), Some(t0 + ms(3) + ttl));
    assert_eq!(
        c.set_bounds(t0 + ms(5), 5, cost(10) - 1, ttl),
        1,
        "bytes too"
    );
    assert!(c.is_empty());
    assert_eq!((c.expiry_len(), c.lru_len()), (0, 0));
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
        let mut cache = Harness::new(max_entries, max_bytes, ttl);
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
            prop_assert_eq!(cache.lru_keys(), model_keys.clone());
            prop_assert_eq!(cache.len(), model.entries.len());
            prop_assert_eq!(cache.bytes(), model.bytes());
            prop_assert_eq!(cache.stats(), model.stats);
            prop_assert_eq!(cache.poll_timeout(), model.poll_timeout());
            prop_assert!(cache.len() <= max_entries);
            prop_assert!(cache.bytes() <= max_bytes);
            prop_assert!(cache.expiry_len() <= 2 * cache.len());
            prop_assert!(cache.lru_len() <= 2 * cache.len());
            let mut cached = model_keys.clone();
            cached.sort_unstable();
            prop_assert_eq!(cache.cached_keys(), cached, "records live in their slots");
        }
    }
}

#[test]
fn settling_out_of_order_looks_slots_up_only_to_compact() {
    let t0 = Instant::now();
    let n = 1_000;
    let mut c = Harness::new(n as usize, 1 << 20, TTL);
    for o in 0..n {
        c.insert(t0, (0, o), rec(1, 0));
    }
    c.slots.lookups = 0;
    // Newest first: the oldest entry keeps both fronts live until the end.
    for o in (0..n).rev() {
        assert!(c.remove((0, o)));
        assert!(c.expiry_len() <= 2 * c.len() + 1 && c.lru_len() <= 2 * c.len() + 1);
    }
    assert_eq!(
        (c.len(), c.bytes(), c.expiry_len(), c.lru_len()),
        (0, 0, 0, 0)
    );
    // Only compactions look slots up, each the survivors of a queue at twice the live
    // entries: n/2 + n/4 + ... per queue. Checking each front's liveness by a lookup, as
    // lazy deletion does, would cost two lookups per settle before any compaction.
    let lookups = c.slots.lookups;
    assert!(
        lookups <= 2 * n as usize,
        "{lookups} lookups to settle {n} entries"
    );
}

#[test]
fn a_slot_dropped_unreleased_does_not_stop_expiry_behind_it() {
    let t0 = Instant::now();
    let mut c = roomy();
    for o in 0..4 {
        c.insert(t0, (0, o), rec(1, o as u8));
    }
    // Out of contract: a slot goes without giving its cell back first; the next one is
    // settled properly, leaving an empty item right behind the orphaned one.
    c.slots.cells.remove(&(0, 1));
    assert!(c.remove((0, 2)));
    c.handle_timeout(t0 + TTL);
    assert_eq!(
        c.cached_keys(),
        Vec::<CacheKey>::new(),
        "(0, 0) and (0, 3) expired"
    );
    // The orphaned entry is held by the cache, not by its slot: it expires too, and leaves
    // nothing counted behind.
    assert_eq!(c.stats().expirations, 3);
    assert_eq!((c.len(), c.bytes()), (0, 0));
    assert_eq!(c.poll_timeout(), None, "no expiry item is left behind");
}
