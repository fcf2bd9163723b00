//! Live configuration: [`ConsumerMachine::update_config`] hands the settings that may change
//! while running to the sub-machines that copied them at the start; the others read the
//! configuration in force at each use.

use std::time::Instant;

use tracing::debug;

use super::ConsumerMachine;
use crate::config::{ConfigUpdateError, ConsumerConfig};

impl ConsumerMachine {
    /// Replaces the configuration while the consumer runs.
    ///
    /// `next` is the configuration in force ([`config`](Self::config)) with some settings
    /// changed. It is refused, and nothing changes, when it changes one of
    /// [`ConsumerConfig::FIXED_SETTINGS`] ([`ConfigUpdateError::Fixed`] names the first),
    /// when it fails [`ConsumerConfig::validate`] as `build()` would refuse it
    /// ([`ConfigUpdateError::Invalid`]), or once the close started.
    ///
    /// When each change takes effect:
    ///
    /// - `max_retry_attempts`: at the next nack. A nack of attempt `n` redelivers when `n` is at
    ///   most the limit in force then, so a lowered limit dead-letters (or discards) at the
    ///   next nack of every message already past it; a retry already scheduled is still
    ///   delivered once. `retry_backoff_base`, `retry_backoff_max`: for delays drawn from now
    ///   on (nacks, failed requests).
    /// - `ack_batch_size`, `ack_batch_timeout`, `ack_batch_min_interval`,
    ///   `enable_auto_commit`: at once; settlements already waiting commit as soon as the new
    ///   batch rules say so.
    /// - `failure_threshold`, `recovery_timeout`, `half_open_max_probes`,
    ///   `half_open_max_wait`: the circuit keeps its state; an open interval already running
    ///   keeps its end.
    /// - `fetch_size`, `fetch_max_bytes`, `prefetch_bytes`, `max_unsettled_per_partition`,
    ///   `fetch_timeout`, empty-fetch backoffs: for fetches from now on. Records already
    ///   buffered past a lowered bound are delivered, not dropped: the buffer drains to the
    ///   new bound before it takes more.
    /// - `cache_max_entries`, `cache_max_bytes`, `cache_ttl`: at once; the cache evicts (and
    ///   expires) down to the new bounds. A retry whose message was evicted fetches it again.
    /// - `request_timeout`: for requests sent from now on. `drain_timeout`,
    ///   `rebalance_drain_timeout`: for the next close or rebalance phase that starts.
    pub fn update_config(
        &mut self,
        now: Instant,
        next: ConsumerConfig,
    ) -> Result<(), ConfigUpdateError> {
        if self.close.is_some() {
            return Err(ConfigUpdateError::Closed);
        }
        self.config.check_update(&next)?;
        self.config = next;
        let c = &self.config;
        debug!(topic = %c.topic, max_retry_attempts = c.max_retry_attempts, ack_batch_size = c.ack_batch_size, fetch_size = c.fetch_size, cache_entries = c.cache_entries(), failure_threshold = c.failure_threshold, "configuration updated");
        self.jitter
            .set_bounds(c.retry_backoff_base, c.retry_backoff_max);
        self.breaker.reconfigure(
            c.failure_threshold,
            c.recovery_timeout,
            c.half_open_max_probes,
            c.half_open_max_wait,
        );
        self.partitions.set_cache_bounds(now, &self.config);
        self.requests.set_timeout(c.request_timeout);
        self.partitions.bounds_changed(&self.config);
        self.committer.reconfigured(now, &self.config);
        self.poll_work(now);
        Ok(())
    }
}
