//! Partition storage: topics and their append-only logs, produce, fetch with the real broker's
//! `max_bytes` accounting (see [`SimBroker::fetch_cost`]) and its cold-tier bounds and cache
//! (`cold`), injected fetch failures, and the queries on logs.

use bytes::Bytes;
use rustmq_consumer_core::protocol::{
    error_code, FetchRequest, FetchResponse, ProduceRequest, ProduceResponse, Record,
    TopicPartition,
};
use tracing::{debug, trace};

use super::{BrokerError, SimBroker};

/// What the simulated broker charges a record for its fixed footprint when it fills a Fetch's
/// `max_bytes`, unless [`SimBroker::with_record_overhead`] says otherwise: the real broker
/// counts each record as the size of its in-memory log-record struct (about 350 bytes on
/// 64-bit) plus its payload, see [`SimBroker::fetch_cost`].
pub const DEFAULT_RECORD_OVERHEAD: u32 = 350;

impl SimBroker {
    /// The same broker charging `overhead` bytes per record, instead of
    /// [`DEFAULT_RECORD_OVERHEAD`], when it fills a Fetch's `max_bytes`
    /// (see [`fetch_cost`](Self::fetch_cost)). 0 counts payload bytes only.
    #[must_use]
    pub fn with_record_overhead(mut self, overhead: u32) -> Self {
        self.record_overhead = overhead;
        self
    }

    /// The fixed per-record overhead a Fetch's `max_bytes` is charged.
    pub fn record_overhead(&self) -> u32 {
        self.record_overhead
    }

    /// What `record` counts against a Fetch's `max_bytes`, in the real broker's units: the
    /// per-record overhead plus the value, the key and every header's key and value bytes
    /// (length prefixes, the timestamp and the option tag are not counted).
    pub fn fetch_cost(&self, record: &Record) -> usize {
        let key = record.key.as_ref().map_or(0, Bytes::len);
        let headers: usize = record
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum();
        usize::try_from(self.record_overhead)
            .unwrap_or(usize::MAX)
            .saturating_add(record.value.len())
            .saturating_add(key)
            .saturating_add(headers)
    }

    /// Creates `topic` with `partitions` partitions (an existing topic only grows) and sets the
    /// coordinator's partition count for it to `partitions`.
    pub fn create_topic(&mut self, topic: &str, partitions: u32) {
        let logs = self.topics.entry(topic.to_owned()).or_default();
        let wanted = usize::try_from(partitions).unwrap_or(usize::MAX);
        if logs.len() < wanted {
            logs.resize_with(wanted, Vec::new);
        }
        self.partition_counts.insert(topic.to_owned(), partitions);
        debug!(topic, partitions, "topic created");
    }

    /// Appends records (the same path as a Produce request, but not logged as a request) and
    /// returns the offset of the first. An unknown topic or partition is an error.
    pub fn produce(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, BrokerError> {
        let timestamp = self.clock_ms();
        let log = self
            .topics
            .get_mut(topic)
            .and_then(|logs| logs.get_mut(usize::try_from(partition).ok()?))
            .ok_or_else(|| BrokerError(format!("Partition not found: {topic}:{partition}")))?;
        let first = log.len() as u64;
        let count = records.len();
        log.extend(records.into_iter().map(|mut record| {
            record.timestamp = timestamp;
            record
        }));
        trace!(topic, partition, first, count, "records appended");
        Ok(first)
    }

    /// Appends one record per value (no key, no headers); returns the offset of the first.
    pub fn produce_values(
        &mut self,
        topic: &str,
        partition: u32,
        values: impl IntoIterator<Item = impl Into<Bytes>>,
    ) -> Result<u64, BrokerError> {
        let records = values.into_iter().map(Record::from_value).collect();
        self.produce(topic, partition, records)
    }

    /// The next `n` Fetch requests fail like a failed read on the real broker: error code 1
    /// (storage failure), no records and a high watermark of 0.
    pub fn fail_next_fetches(&mut self, n: u32) {
        self.failing_fetches = n;
    }

    /// While `failing`, every Fetch of `topic`:`partition` fails like the real broker's reads
    /// after compaction merged that partition's segments: error code 1, "Failed to fetch
    /// records", no records and a high watermark of 0. Other partitions and commits work.
    pub fn set_partition_failing(&mut self, topic: &str, partition: u32, failing: bool) {
        let tp = TopicPartition::new(topic, partition);
        if failing {
            self.failing_partitions.insert(tp);
        } else {
            self.failing_partitions.remove(&tp);
        }
    }

    /// The records of a partition in offset order; empty if unknown.
    pub fn records(&self, topic: &str, partition: u32) -> &[Record] {
        self.log(topic, partition).unwrap_or(&[])
    }

    /// The next offset to be written to a partition, or `None` if unknown.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.log(topic, partition).map(|log| log.len() as u64)
    }

    /// How many partitions `topic` has in storage, or `None` if unknown.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.topics
            .get(topic)
            .map(|logs| u32::try_from(logs.len()).unwrap_or(u32::MAX))
    }

    fn log(&self, topic: &str, partition: u32) -> Option<&[Record]> {
        self.topics
            .get(topic)?
            .get(usize::try_from(partition).ok()?)
            .map(Vec::as_slice)
    }

    pub(super) fn handle_produce(
        &mut self,
        req: ProduceRequest,
    ) -> Result<ProduceResponse, BrokerError> {
        let offset = self.produce(&req.topic, req.partition_id, req.records)?;
        Ok(ProduceResponse {
            offset,
            error_code: error_code::NONE,
            error_message: None,
        })
    }

    /// How many records from the start of `tail` a Fetch of `max_bytes` takes: the first
    /// always, each later one while the running total of [`fetch_cost`](Self::fetch_cost)
    /// stays within `max_bytes`.
    fn fetch_count(&self, tail: &[Record], max_bytes: u32) -> usize {
        let budget = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let (mut count, mut used) = (0, 0usize);
        for record in tail {
            let cost = self.fetch_cost(record);
            if count > 0 && used.saturating_add(cost) > budget {
                break;
            }
            used = used.saturating_add(cost);
            count += 1;
        }
        count
    }

    pub(super) fn handle_fetch(&mut self, req: FetchRequest) -> FetchResponse {
        let tp = TopicPartition::new(req.topic.clone(), req.partition_id);
        let failing_partition = self.failing_partitions.contains(&tp);
        if failing_partition || self.failing_fetches > 0 {
            if !failing_partition {
                self.failing_fetches -= 1;
            }
            debug!(topic = %req.topic, partition = req.partition_id, "injected fetch failure");
            // As the real broker answers a failed read: no watermark either.
            return FetchResponse {
                records: Vec::new(),
                high_watermark: 0,
                error_code: error_code::STORAGE,
                error_message: Some("Failed to fetch records".to_owned()),
            };
        }
        let log = self.log(&req.topic, req.partition_id);
        let high_watermark = log.map_or(0, |log| log.len() as u64);
        let from = usize::try_from(req.fetch_offset).ok();
        let tail = log.zip(from).and_then(|(log, from)| log.get(from..));
        let tail = tail.unwrap_or_default();
        // From a cold segment: the answer ends at the segment's end, or is the cached one.
        let cold = self.cold.lookup(&tp, req.fetch_offset);
        let tail = match cold {
            Some(c) => {
                let room = c.segment_end.saturating_sub(req.fetch_offset);
                &tail[..tail.len().min(usize::try_from(room).unwrap_or(usize::MAX))]
            }
            None => tail,
        };
        let count = match cold.and_then(|c| c.cached) {
            Some(cached) => cached.min(tail.len()),
            None => self.fetch_count(tail, req.max_bytes),
        };
        // Counted first, then copied out at once.
        let records = tail[..count].to_vec();
        trace!(
            topic = %req.topic,
            partition = req.partition_id,
            offset = req.fetch_offset,
            count = records.len(),
            high_watermark,
            cold = cold.is_some(),
            "fetch"
        );
        if let Some(c) = cold {
            let hit = c.cached.is_some();
            debug!(
                topic = %req.topic,
                partition = req.partition_id,
                offset = req.fetch_offset,
                count,
                segment_end = c.segment_end,
                hit,
                "cold fetch"
            );
            self.cold.record(tp, req.fetch_offset, hit, count);
        }
        FetchResponse {
            records,
            high_watermark,
            error_code: error_code::NONE,
            error_message: None,
        }
    }
}
