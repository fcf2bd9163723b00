//! Scenario derivation: everything one run does, from one seed (swarm style), and the
//! deliberately wrong policies a run can take instead of the real one.

use std::time::Duration;

use rustmq_consumer_core::ConsumerConfig;

use super::app::{AppBehaviour, ProcessModel};
use crate::broker::REAPER_INTERVAL;
use crate::faults::{FaultPlan, PhantomPlan, SimRng};

/// A deliberately wrong consumer policy, to show the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mutation {
    /// The real thing.
    #[default]
    None,
    /// The application acks at delivery and does its side effect later.
    AckBeforeSideEffect,
    /// A driver that commits `offset + 1` as soon as a message is delivered.
    CommitAtDelivery,
    /// A group-session driver that sends LeaveGroup for its member as soon as the close
    /// reaches its final commit, without waiting for the commit's answer.
    LeaveBeforeFinalCommit,
}

/// Everything one simulated run does, derived from a seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The seed it came from.
    pub seed: u64,
    /// The consumer's configuration: manual assignment of every partition, or (about a third
    /// of the seeds) a group session (`partitions` empty) with other members joining and
    /// leaving (`faults.phantoms`).
    pub config: ConsumerConfig,
    /// Messages produced per partition over the run.
    pub messages: Vec<u64>,
    /// Produce bursts (the first at time zero, the rest before heal).
    pub bursts: u32,
    /// Smallest and largest message value in bytes.
    pub value_size: (usize, usize),
    /// The faults.
    pub faults: FaultPlan,
    /// The application model (used unless a custom handler is given).
    pub app: AppBehaviour,
    /// Simulated time allowed after heal for everything to settle and commit.
    pub liveness_budget: Duration,
    /// Concurrent processing under the core's scheduler (about half the seeds), or every
    /// delivery processed as soon as it comes.
    pub process: Option<ProcessModel>,
    /// A rebalance listener (about half the group seeds): the machine holds each revoke
    /// commit until the revoke hook returns, which takes up to this long (random per revoke,
    /// up to twice `rebalance_drain_timeout`, so some hooks overrun).
    pub listener_latency: Option<Duration>,
}

/// Topic consumed in every scenario.
pub const TOPIC: &str = "sim-topic";
/// Group of every scenario.
pub const GROUP: &str = "sim-group";
/// Dead-letter topic when a scenario has one.
pub const DEAD_LETTER_TOPIC: &str = "sim-dlq";

impl Scenario {
    /// Derives a whole scenario from `seed`; about a third of the seeds run a group session.
    pub fn from_seed(seed: u64) -> Self {
        Self::derive(seed, None)
    }

    /// The scenario of `seed`, forced into a group session (with the same group knobs and
    /// phantom members the seed would give it).
    pub fn from_seed_in_group(seed: u64) -> Self {
        Self::derive(seed, Some(true))
    }

    /// The scenario of `seed`, forced into manual assignment of every partition.
    pub fn from_seed_manual(seed: u64) -> Self {
        Self::derive(seed, Some(false))
    }

    fn derive(seed: u64, group: Option<bool>) -> Self {
        let mut rng = SimRng::new(seed);
        let mut knobs = rng.fork(1);
        let partitions = knobs.range(1, 4) as u32;
        let total = knobs.pick(&[0u64, 1, 10, 40, 80, 150, 250, 500, 1000, 2000]);
        let mut messages = vec![0u64; partitions as usize];
        for _ in 0..total {
            let p = knobs.range_usize(0, partitions as usize - 1);
            messages[p] += 1;
        }
        let mut c = ConsumerConfig::new(TOPIC, GROUP);
        c.partitions = (0..partitions).collect();
        c.consumer_id = Some(format!("sim-{seed}"));
        c.fetch_size = knobs.pick(&[1, 2, 5, 10, 50, 100]);
        c.fetch_max_bytes = knobs.pick(&[64, 256, 4096, 1 << 20]);
        c.prefetch_bytes = knobs.pick(&[256, 4096, 16 << 20]);
        c.max_unacked = knobs.pick(&[1, 2, 8, 32, 1000]);
        c.max_unsettled_per_partition = knobs.pick(&[1, 4, 64, 10_000]);
        c.enable_auto_commit = knobs.chance(0.9);
        c.ack_batch_size = knobs.pick(&[1, 3, 10, 100]);
        c.ack_batch_timeout = knobs.millis(5, 500);
        c.max_retry_attempts = knobs.range(0, 4) as u32;
        c.retry_backoff_base = knobs.millis(1, 50);
        c.retry_backoff_max = c.retry_backoff_base + knobs.millis(0, 2_000);
        c.dead_letter_queue = knobs.chance(0.5).then(|| DEAD_LETTER_TOPIC.to_owned());
        c.cache_max_entries = knobs.pick(&[Some(1), Some(2), Some(5), None, Some(1000)]);
        c.cache_max_bytes = knobs.pick(&[64, 1024, 64 << 20]);
        c.cache_ttl = knobs.pick(&[
            Duration::from_millis(50),
            Duration::from_secs(1),
            Duration::from_secs(300),
        ]);
        c.request_timeout = knobs.millis(100, 3_000);
        c.failure_threshold = knobs.range(1, 6) as u32;
        c.recovery_timeout = knobs.millis(10, 2_000);
        c.half_open_max_probes = knobs.range(1, 3) as u32;
        c.half_open_max_wait = knobs.millis(50, 3_000);
        c.drain_timeout = knobs.millis(100, 2_000);
        c.empty_fetch_backoff_min = knobs.millis(1, 20);
        c.empty_fetch_backoff_max = c.empty_fetch_backoff_min + knobs.millis(0, 500);
        c.seed = rng.next_u64();
        let heal_at = rng.millis(500, 8_000);
        let mut faults = FaultPlan::from_rng(&mut rng.fork(2), heal_at);
        let mut app = AppBehaviour::from_rng(&mut rng.fork(3));
        if !c.enable_auto_commit && app.commit_per_sec == 0.0 {
            app.commit_per_sec = 1.0;
        }
        let value_min = rng.range_usize(1, 50);
        let value_size = (value_min, value_min + rng.range_usize(0, 200));
        let bursts = rng.range(1, 5) as u32;
        // Drawn after everything else, so a manual-assignment seed derives what it always did.
        let mut g = rng.fork(4);
        let coin = g.chance(1.0 / 3.0);
        if group.unwrap_or(coin) {
            c.partitions.clear();
            c.session_timeout = g.millis(3_000, 10_000);
            c.heartbeat_interval = Some(c.session_timeout / g.range(3, 5) as u32);
            c.rebalance_drain_timeout = g.millis(20, 3_000);
            faults.phantoms = PhantomPlan::swarm(&mut g, heal_at, 3);
            // A seek is not durable across a rebalance (the next owner starts at the commit);
            // the group swarm leaves seeks to the manual one.
            app.seek_per_sec = 0.0;
        }
        let mut s = Self {
            seed,
            config: c,
            messages,
            bursts,
            value_size,
            faults,
            app,
            liveness_budget: Duration::ZERO,
            // Its own stream, so every other knob of a seed stays what it always was.
            process: ProcessModel::from_rng(&mut SimRng::new(seed ^ 0x7072_6f63_6573_7321)),
            listener_latency: None,
        };
        let mut listener = SimRng::new(seed ^ 0x6c69_7374_656e_6572);
        if s.is_group() && listener.chance(0.5) {
            let max = s.config.rebalance_drain_timeout.as_millis() as u64 * 2;
            s.listener_latency = Some(listener.millis(0, max));
        }
        s.liveness_budget = s.default_liveness_budget();
        s
    }

    /// A generous bound on the simulated time after heal that settling everything may take.
    pub fn default_liveness_budget(&self) -> Duration {
        let c = &self.config;
        let a = &self.app;
        let rtt = self.faults.latency_max * 2 + self.faults.latency_spike * 2;
        let attempts = c.max_retry_attempts + 2;
        let per_try =
            c.retry_backoff_max + a.slow_max + a.nack_delay_max + rtt + c.empty_fetch_backoff_max;
        let breaker = c.recovery_timeout + c.half_open_max_wait + c.request_timeout * 2;
        let total: u64 = self.messages.iter().sum();
        // What slowness and retries cost a message on average, twice: with one unsettled
        // message per partition (`max_unsettled_per_partition = 1`) they add up serially.
        let retries = (c.retry_backoff_max + a.nack_delay_max).mul_f64(a.nack_rate);
        let expected = a.slow_max.mul_f64(a.slow_rate) + retries;
        let serial = (a.delay_max + rtt + c.empty_fetch_backoff_max + expected * 2)
            .saturating_mul(u32::try_from(total).unwrap_or(u32::MAX));
        let group = if self.is_group() {
            let listener = self.listener_latency.unwrap_or_default();
            let phantom = self
                .faults
                .phantoms
                .iter()
                .map(|p| p.session_timeout)
                .max()
                .unwrap_or_default();
            phantom
                + REAPER_INTERVAL * 2
                + (c.session_timeout + c.heartbeat() + c.rebalance_drain_timeout + rtt + listener)
                    * 4
                + c.request_timeout * 4
        } else {
            Duration::ZERO
        };
        group
            + per_try * attempts * 4
            + breaker * 8
            + c.ack_batch_timeout * 4
            + a.pause_max
            + serial
            + Duration::from_secs(30)
    }

    /// True when the consumer runs a group session (no manual assignment).
    pub fn is_group(&self) -> bool {
        self.config.partitions.is_empty()
    }

    /// Total messages produced.
    pub fn total_messages(&self) -> u64 {
        self.messages.iter().sum()
    }
}
