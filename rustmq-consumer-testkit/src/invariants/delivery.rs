//! Deliveries and the application's truth: side effects, hand-backs, seeks, pauses and dead
//! letters stored; a live configuration update moving the bounds; each event checked
//! (`attempts-bounded`, `delivery-matches-log`, `deliver-only-owned`, `pause-holds`,
//! `no-concurrent-delivery`, `dead-letter-confirmed`, `discard-only-without-dlq`,
//! `committed-means-accepted`); the state after each step (`settle-after-side-effect`,
//! `cache-bounded`, `prefetch-bounded`, `deliveries-bounded`); and the lanes of concurrent
//! processing (`key-order`).

use rustmq_consumer_core::protocol::Record;
use rustmq_consumer_core::{ConsumerConfig, DeliveryTag, DiscardReason, Event, Metrics};

use super::names::*;
use super::{Checker, Violation};

impl Checker {
    /// The application did the side effect of delivery `offset` of `generation` (before
    /// acking it). Side effects of a previous generation do not count.
    pub fn side_effect(&mut self, partition: u32, offset: u64, generation: u64) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            if t.generation == generation {
                t.mark_done(offset);
            }
        }
    }

    /// A live configuration update: the machine accepted `config` (its `metrics` right after
    /// it). The bounds follow it: the cache's at once (the machine evicts down to them), the
    /// prefetch buffer's once what was buffered past a lowered `fetch_size` is delivered, the
    /// attempts' from the next nack of each message, the probes' at the next probe.
    pub fn on_config_update(&mut self, config: &ConsumerConfig, metrics: &Metrics) {
        let max_attempts = config.max_retry_attempts.saturating_add(1);
        self.max_attempts = max_attempts;
        self.max_attempts_ever = self.max_attempts_ever.max(max_attempts);
        self.cache_entries = config.cache_entries() as u64;
        self.cache_bytes = config.cache_max_bytes as u64;
        self.fetch_size_target = config.fetch_size as u64;
        self.fetch_size
            .set(self.fetch_size_target.max(metrics.buffered));
        self.max_probes = config.half_open_max_probes;
    }

    /// The attempts a message may have been delivered (and may be dead-lettered or discarded
    /// after): the limit in force, or the higher one of a nack before a live update lowered it.
    fn attempts_bound(&self, partition: u32, offset: u64) -> u32 {
        self.attempts_allowed
            .get(&(partition, offset))
            .map_or(self.max_attempts, |&a| a.max(self.max_attempts))
    }

    /// The application handed a delivery back (ack, nack, reject or drop accepted).
    pub fn handed_back(&mut self, partition: u32, offset: u64, generation: u64) {
        let allowed = self
            .attempts_allowed
            .entry((partition, offset))
            .or_default();
        *allowed = (*allowed).max(self.max_attempts);
        if let Some(t) = self.partitions.get_mut(&partition) {
            if t.generation == generation {
                t.outstanding.remove(&offset);
            }
        }
    }

    /// The application sought `partition` to `offset`: outstanding deliveries go stale and
    /// nothing below `offset` is owed any more; everything from `offset` is owed again.
    pub fn seek(&mut self, partition: u32, offset: u64) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            t.generation += 1;
            t.floor = offset;
            t.low = offset;
            t.done.clear();
            t.outstanding.clear();
        }
    }

    /// The application paused or resumed `partition`.
    pub fn set_paused(&mut self, partition: u32, paused: bool) {
        if let Some(t) = self.partitions.get_mut(&partition) {
            t.paused = paused;
        }
    }

    /// The broker stored `record` in the dead-letter topic: its original offset's side effect
    /// is done.
    pub fn dead_letter_stored(&mut self, partition: u32, offset: u64) {
        self.dead_lettered.insert((partition, offset));
        if let Some(t) = self.partitions.get_mut(&partition) {
            if offset >= t.floor {
                t.mark_done(offset);
            }
        }
    }

    /// An event the machine emitted. `log` gives the broker's record at an offset, to check
    /// deliveries against.
    pub fn on_event<'a>(
        &mut self,
        event: &Event,
        log: impl Fn(u32, u64) -> Option<&'a Record>,
    ) -> Result<(), Violation> {
        match event {
            Event::Deliver(d) => {
                let (p, o, attempt) = (d.tag.partition, d.tag.offset, d.tag.attempt);
                let max = self.attempts_bound(p, o);
                if attempt > max || attempt == 0 {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!(
                            "partition {p} offset {o} delivered with attempt {attempt} (max {max})"
                        ),
                    );
                }
                match log(p, o) {
                    Some(r) if r.value == d.record.value && r.key == d.record.key => {}
                    other => {
                        return self.fail(
                            DELIVERY_MATCHES_LOG,
                            format!(
                                "partition {p} offset {o}: delivered {:?}, broker has {:?}",
                                d.record.value,
                                other.map(|r| &r.value)
                            ),
                        )
                    }
                }
                if !self.owned.contains(&p) {
                    return self.fail(
                        DELIVER_ONLY_OWNED,
                        format!(
                            "partition {p} offset {o} delivered while the consumer owns {:?}",
                            self.owned
                        ),
                    );
                }
                let Some(t) = self.partitions.get_mut(&p) else {
                    return self.fail(
                        DELIVERY_MATCHES_LOG,
                        format!("delivery from unassigned partition {p}"),
                    );
                };
                if t.paused {
                    return self.fail(
                        PAUSE_HOLDS,
                        format!("partition {p} offset {o} delivered while paused"),
                    );
                }
                if o < t.low || t.done.contains(&o) {
                    self.duplicates += 1;
                }
                if let Some(prev) = t.outstanding.insert(o, attempt) {
                    return self.fail(
                        NO_CONCURRENT_DELIVERY,
                        format!("partition {p} offset {o} delivered (attempt {attempt}) while attempt {prev} is outstanding"),
                    );
                }
            }
            Event::DeadLettered {
                partition,
                offset,
                attempts,
            } => {
                if *attempts > self.attempts_bound(*partition, *offset) {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!("partition {partition} offset {offset} dead-lettered after {attempts} attempts"),
                    );
                }
                if !self.dead_lettered.contains(&(*partition, *offset)) {
                    return self.fail(
                        DEAD_LETTER_CONFIRMED,
                        format!("partition {partition} offset {offset} reported dead-lettered, the broker has no such record"),
                    );
                }
            }
            Event::Discarded {
                partition,
                offset,
                attempts,
                reason,
            } => {
                if *attempts > self.attempts_bound(*partition, *offset) {
                    return self.fail(
                        ATTEMPTS_BOUNDED,
                        format!("partition {partition} offset {offset} discarded after {attempts} attempts"),
                    );
                }
                if self.dead_letter && *reason != DiscardReason::NoLongerOnBroker {
                    return self.fail(
                        DISCARD_ONLY_WITHOUT_DLQ,
                        format!("partition {partition} offset {offset} discarded ({reason}) although a dead-letter topic is configured"),
                    );
                }
            }
            Event::Committed { offsets, .. } => {
                for &(p, o) in offsets {
                    if !self.accepted.contains(&(p, o)) {
                        return self.fail(
                            COMMITTED_MEANS_ACCEPTED,
                            format!("Committed reports partition {p} at {o}, which the broker never accepted"),
                        );
                    }
                }
            }
            Event::RequestFailed { id, .. } => self.on_resolved(*id),
            Event::BreakerChanged { to, .. } => self.breaker = *to,
            Event::Closed => self.closed = true,
            _ => {}
        }
        Ok(())
    }

    /// Checks the machine's state after a step: watermarks against the application's truth,
    /// and every bound.
    pub fn check_state(
        &self,
        metrics: &Metrics,
        watermark: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), Violation> {
        for (&p, t) in &self.partitions {
            let Some(w) = watermark(p) else { continue };
            if w > t.low {
                return self.fail(
                    SETTLE_AFTER_SIDE_EFFECT,
                    format!(
                        "partition {p}: settle watermark {w} passed unprocessed offset {}",
                        t.low
                    ),
                );
            }
        }
        if metrics.cached > self.cache_entries || metrics.cached_bytes > self.cache_bytes {
            return self.fail(
                CACHE_BOUNDED,
                format!(
                    "cache holds {} entries / {} bytes (bounds {} / {})",
                    metrics.cached, metrics.cached_bytes, self.cache_entries, self.cache_bytes
                ),
            );
        }
        if metrics.buffered <= self.fetch_size_target {
            // Drained to a lowered bound: it holds from here on.
            self.fetch_size.set(self.fetch_size_target);
        }
        if metrics.buffered > self.fetch_size.get() {
            return self.fail(
                PREFETCH_BOUNDED,
                format!(
                    "{} messages buffered (fetch_size {})",
                    metrics.buffered,
                    self.fetch_size.get()
                ),
            );
        }
        let outstanding = self.outstanding();
        if metrics.in_flight_deliveries > self.max_unacked
            || (!self.closed && metrics.in_flight_deliveries != outstanding)
        {
            return self.fail(
                DELIVERIES_BOUNDED,
                format!(
                    "machine counts {} outstanding deliveries, application holds {outstanding} (max_unacked {})",
                    metrics.in_flight_deliveries, self.max_unacked
                ),
            );
        }
        Ok(())
    }

    /// Concurrent processing started a delivery in `lane` (a key, or a partition): no other
    /// delivery of the lane may be running, and a first attempt must not come before an
    /// offset of its partition the lane already started in this generation.
    pub fn lane_started(
        &mut self,
        lane: &str,
        tag: DeliveryTag,
        generation: u64,
    ) -> Result<(), Violation> {
        if !self.running_lanes.insert(lane.to_owned()) {
            return self.fail(
                KEY_ORDER,
                format!("{lane}: {tag:?} started while another delivery of it runs"),
            );
        }
        if tag.attempt == 1 {
            let next = self
                .lane_next
                .entry((lane.to_owned(), tag.partition))
                .or_insert((generation, 0));
            if next.0 == generation && tag.offset < next.1 {
                let last = next.1 - 1;
                return self.fail(
                    KEY_ORDER,
                    format!("{lane}: {tag:?} started after offset {last} of its partition"),
                );
            }
            *next = (generation, tag.offset + 1);
        }
        Ok(())
    }

    /// Concurrent processing finished a delivery of `lane`.
    pub fn lane_finished(&mut self, lane: &str) {
        self.running_lanes.remove(lane);
    }
}
