//! The message cache's side of the partitions: the cache indexes the records the windows'
//! slots hold (assigned and parked partitions alike), and these borrow the two apart.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Partition, Partitions};
use crate::cache::{CacheCell, CacheKey, CacheSlots, MessageCache};
use crate::config::ConsumerConfig;
use crate::event::Message;
use crate::protocol::Record;

/// Every partition's window, assigned or parked, as the message cache reaches them.
pub(super) struct Windows<'a> {
    list: &'a mut [Partition],
    parked: &'a mut BTreeMap<u32, Partition>,
}

impl CacheSlots for Windows<'_> {
    #[inline]
    fn cell(&mut self, (id, offset): CacheKey) -> Option<&mut CacheCell> {
        let p = match self.list.binary_search_by_key(&id, |p| p.id) {
            Ok(idx) => &mut self.list[idx],
            Err(_) => self.parked.get_mut(&id)?,
        };
        p.window.get_mut(offset).map(|u| &mut u.cached)
    }
}

impl Partitions {
    /// The cache and the windows it indexes, borrowed apart.
    #[inline]
    pub(super) fn cache_windows(&mut self) -> (&mut MessageCache, Windows<'_>) {
        let windows = Windows {
            list: &mut self.list,
            parked: &mut self.parked.partitions,
        };
        (&mut self.cache, windows)
    }

    /// Restores the cache's invariants after records were released with their slots.
    #[inline]
    pub(super) fn tidy_cache(&mut self) {
        let (cache, mut windows) = self.cache_windows();
        cache.tidy(&mut windows);
    }

    /// The message cache (its counters and gauges).
    pub(crate) fn cache(&self) -> &MessageCache {
        &self.cache
    }

    /// The record of a delivery of the partition at `idx`, from the cache (a use: it becomes
    /// the most recently used entry); `None` when the cache lost it.
    pub(crate) fn cached_get(&mut self, now: Instant, idx: usize, offset: u64) -> Option<Record> {
        let key = (self.list[idx].id, offset);
        let (cache, mut windows) = self.cache_windows();
        cache.get(now, key, &mut windows)
    }

    /// Caches the record of a delivery outstanding with the application that it gave back
    /// (see `ConsumerMachine::give_back`), in its slot (of an assigned or a parked partition),
    /// replacing what the slot had cached; false when it was not stored (not outstanding, or
    /// too large for the cache).
    pub(crate) fn cache_returned(&mut self, now: Instant, message: Message) -> bool {
        let Message { tag, record } = message;
        let (cache, mut windows) = self.cache_windows();
        cache.expire(now, &mut windows);
        let p = if self.is_parked(tag.partition) {
            self.parked.outstanding(tag)
        } else {
            self.outstanding(tag).map(|idx| &mut self.list[idx])
        };
        let Some(u) = p.ok().and_then(|p| p.window.get_mut(tag.offset)) else {
            return false;
        };
        let key = (tag.partition, tag.offset);
        let encoded_len = record.encoded_len();
        let stored = self
            .cache
            .fill(now, key, record, encoded_len, &mut u.cached);
        let (cache, mut windows) = self.cache_windows();
        cache.after_fill(stored, &mut windows);
        stored
    }

    /// The cached record of an offset of an assigned partition, without touching the cache.
    pub(crate) fn cached_peek(&self, now: Instant, id: u32, offset: u64) -> Option<&Record> {
        let u = self.get(id)?.window.get(offset)?;
        self.cache.peek(now, &u.cached)
    }

    /// When the oldest cached record expires.
    pub(crate) fn cache_deadline(&self) -> Option<Instant> {
        self.cache.poll_timeout()
    }

    /// Drops the cached records whose time to live passed.
    pub(crate) fn cache_timeout(&mut self, now: Instant) {
        let (cache, mut windows) = self.cache_windows();
        cache.handle_timeout(now, &mut windows);
    }

    /// New cache bounds (a live configuration update); returns how many records were evicted.
    pub(crate) fn set_cache_bounds(&mut self, now: Instant, config: &ConsumerConfig) -> usize {
        let (cache, mut windows) = self.cache_windows();
        cache.set_bounds(
            now,
            config.cache_entries(),
            config.cache_max_bytes,
            config.cache_ttl,
            &mut windows,
        )
    }
}
