//! The cold tier (PROTOCOL.md, "How `max_bytes` is counted"): partitions' records moved to
//! object storage as segments, fetches from a cold segment answered from a per-offset cache,
//! the count of cold downloads and the latency each owes.
//!
//! The records themselves stay in the partition's log (`storage`): the cold tier only records
//! where each partition's cold segments end, and which cold answers are cached. A log is
//! append-only, so a cached answer is kept as its record count.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use rustmq_consumer_core::protocol::TopicPartition;
use tracing::debug;

use super::{BrokerError, SimBroker};

/// How many fetches the cold tier answered, and how: each miss downloaded and decoded a whole
/// cold segment (and owes [`SimBroker::cold_read_latency`]); each hit was served from the cold
/// answer cache, as fast as a read from memory. Counted over every partition since the broker
/// was built (a [`SimBroker::restart`] keeps the counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ColdReads {
    /// Fetches in a cold segment whose (partition, `fetch_offset`) was not cached: one segment
    /// download and decode each.
    pub misses: u64,
    /// Fetches in a cold segment answered from the cache: the answer first given at that
    /// (partition, `fetch_offset`), whatever this fetch's `max_bytes`.
    pub hits: u64,
}

impl ColdReads {
    /// Every fetch the cold tier answered: misses and hits.
    pub fn total(&self) -> u64 {
        self.misses + self.hits
    }
}

/// What a cold fetch found: where its segment ends, and the cached answer's record count if
/// its (partition, `fetch_offset`) was fetched before.
#[derive(Debug, Clone, Copy)]
pub(super) struct ColdLookup {
    /// The offset after the last record of the segment holding `fetch_offset`: no answer
    /// goes past it.
    pub(super) segment_end: u64,
    /// The record count of the cached answer, if any.
    pub(super) cached: Option<usize>,
}

/// The cold tier's state in a [`SimBroker`].
#[derive(Debug, Clone, Default)]
pub(super) struct ColdTier {
    /// Per partition, the end offset of each cold segment in ascending order. The first segment
    /// starts at offset 0, each later one where the previous ended; offsets from the last end
    /// on are hot. Partitions never tiered are absent.
    segments: BTreeMap<TopicPartition, Vec<u64>>,
    /// The cold answer cache: per partition, `fetch_offset` to the record count of the answer
    /// first given there. At most one entry per cold offset fetched.
    cache: BTreeMap<TopicPartition, BTreeMap<u64, usize>>,
    reads: ColdReads,
    latency: Duration,
    /// What the last answer owes for a cold download, until taken.
    owed: Duration,
}

impl ColdTier {
    /// The cold segment holding `offset` of `tp`, and the cached answer there, or `None` if
    /// `offset` is hot (or the partition was never tiered).
    pub(super) fn lookup(&self, tp: &TopicPartition, offset: u64) -> Option<ColdLookup> {
        let ends = self.segments.get(tp)?;
        let segment_end = *ends.get(ends.partition_point(|&end| end <= offset))?;
        let cached = self.cache.get(tp).and_then(|c| c.get(&offset)).copied();
        Some(ColdLookup {
            segment_end,
            cached,
        })
    }

    /// Records a cold answer: a hit, or a miss whose answer (`count` records) is cached and
    /// whose download the answer owes.
    pub(super) fn record(&mut self, tp: TopicPartition, offset: u64, hit: bool, count: usize) {
        if hit {
            self.reads.hits += 1;
        } else {
            self.reads.misses += 1;
            self.owed = self.latency;
            self.cache.entry(tp).or_default().insert(offset, count);
        }
    }

    /// Forgets what the previous answer owed: called as each request is handled.
    pub(super) fn new_answer(&mut self) {
        self.owed = Duration::ZERO;
    }

    /// A restart loses the cache (it is the broker's memory); segments stay in object storage.
    pub(super) fn restart(&mut self) {
        self.cache.clear();
    }
}

impl SimBroker {
    /// The same broker owing `latency` for each cold-tier cache miss (one segment download
    /// and decode; about 50 ms for a 9 MB segment of 148,615 records on the machine
    /// PROTOCOL.md was measured on). None by default. See
    /// [`set_cold_read_latency`](Self::set_cold_read_latency).
    #[must_use]
    pub fn with_cold_read_latency(mut self, latency: Duration) -> Self {
        self.set_cold_read_latency(latency);
        self
    }

    /// Sets the latency each cold-tier cache miss owes; a cache hit owes nothing, like a read
    /// from memory.
    ///
    /// The broker answers at once: the delay is reported by
    /// [`take_answer_delay`](Self::take_answer_delay), and a transport pays it.
    /// [`SimTransport`](crate::SimTransport) sleeps it on its runtime's clock before returning
    /// the answer, and [`Simulation`](crate::Simulation) adds it to the answer's way back
    /// (its scenarios tier nothing today, so none of its answers owes one). The drivers that
    /// answer at once ([`Pump`](crate::Pump), [`GroupSimulation`](crate::GroupSimulation))
    /// and the QUIC `LoopbackBroker` do not apply it.
    pub fn set_cold_read_latency(&mut self, latency: Duration) {
        self.cold.latency = latency;
    }

    /// The latency each cold-tier cache miss owes (zero unless set).
    pub fn cold_read_latency(&self) -> Duration {
        self.cold.latency
    }

    /// The delay the last answer owes beyond the transport's own latency, then zero until
    /// another answer owes one: [`cold_read_latency`](Self::cold_read_latency) if the last
    /// request handled was a Fetch that missed the cold answer cache, otherwise zero. Each
    /// request handled resets it, so a transport takes it right after
    /// [`transmit`](Self::transmit) or [`serve`](Self::serve), under the same lock.
    pub fn take_answer_delay(&mut self) -> Duration {
        std::mem::take(&mut self.cold.owed)
    }

    /// Moves every record stored in `topic`:`partition` and not yet cold to the cold tier, as
    /// one segment, as the real broker does when its write cache fills, after an upload
    /// interval or on a restart. Records produced later are hot, until the next call makes
    /// them a segment of their own. Returns the new segment's offsets (an empty range, and no
    /// segment, if every record was already cold); an unknown topic or partition is an error.
    ///
    /// A Fetch from a cold offset is then answered like the real broker's (PROTOCOL.md):
    /// - by the ordinary `max_bytes` rule from `fetch_offset`, but ending at the end of the
    ///   segment holding it, however much `max_bytes` is left: an answer never crosses into
    ///   the next segment or into hot records;
    /// - the answer is cached per (partition, `fetch_offset`): a later Fetch at the same
    ///   offset gets the same records whatever its own `max_bytes`, more or fewer than it
    ///   would allow; a Fetch at any other offset misses. The high watermark is always the
    ///   current one.
    ///
    /// [`cold_reads`](Self::cold_reads) counts misses (one segment download each, owing
    /// [`cold_read_latency`](Self::cold_read_latency)) and hits. The cache grows only with
    /// the distinct cold offsets fetched: at most one entry (a record count) per cold record.
    ///
    /// [`restart`](Self::restart) does not tier anything: call this after it to reproduce the
    /// real broker's restart.
    pub fn tier_to_cold(&mut self, topic: &str, partition: u32) -> Result<Range<u64>, BrokerError> {
        let end = self
            .high_watermark(topic, partition)
            .ok_or_else(|| BrokerError(format!("Partition not found: {topic}:{partition}")))?;
        let ends = self
            .cold
            .segments
            .entry(TopicPartition::new(topic, partition))
            .or_default();
        let start = ends.last().copied().unwrap_or(0);
        if end > start {
            ends.push(end);
            debug!(topic, partition, start, end, "records tiered to cold");
        }
        Ok(start..end)
    }

    /// The offsets of each cold segment of `topic`:`partition`, in order; empty if nothing of
    /// it was tiered (or it is unknown). Offsets from the last segment's end on are hot.
    pub fn cold_segments(&self, topic: &str, partition: u32) -> Vec<Range<u64>> {
        let Some(ends) = self
            .cold
            .segments
            .get(&TopicPartition::new(topic, partition))
        else {
            return Vec::new();
        };
        let starts = std::iter::once(0).chain(ends.iter().copied());
        starts
            .zip(ends.iter().copied())
            .map(|(s, e)| s..e)
            .collect()
    }

    /// How many Fetches the cold tier answered, misses (segment downloads) and hits (cached
    /// answers), over every partition.
    pub fn cold_reads(&self) -> ColdReads {
        self.cold.reads
    }
}
