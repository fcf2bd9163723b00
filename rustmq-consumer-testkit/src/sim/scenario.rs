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
    /// Live configuration updates (about a quarter of the swarm's seeds): at each time before
    /// heal, the configuration in force is replaced by this one, which redraws some of the
    /// settings that may change while running (`ConsumerMachine::update_config`).
    pub config_updates: Vec<(Duration, ConsumerConfig)>,
}

/// Topic consumed in every scenario.
pub const TOPIC: &str = "sim-topic";
/// Group of every scenario.
pub const GROUP: &str = "sim-group";
/// Dead-letter topic when a scenario has one.
pub const DEAD_LETTER_TOPIC: &str = "sim-dlq";

impl Scenario {
    /// Derives a whole scenario from `seed`; about a third of the seeds run a group session,
    /// about a quarter update the configuration live.
    pub fn from_seed(seed: u64) -> Self {
        Self::derive(seed, None, None)
    }

    /// The scenario of `seed`, forced into a group session (with the same group knobs and
    /// phantom members the seed would give it), without live configuration updates.
    pub fn from_seed_in_group(seed: u64) -> Self {
        Self::derive(seed, Some(true), Some(false))
    }

    /// The scenario of `seed`, forced into manual assignment of every partition, without live
    /// configuration updates (so a pinned seed replays what it always did).
    pub fn from_seed_manual(seed: u64) -> Self {
        Self::derive(seed, Some(false), Some(false))
    }

    /// The scenario of `seed` with live configuration updates at random times before heal
    /// (the seed family of `ConsumerMachine::update_config`); the rest is what `from_seed`
    /// derives.
    pub fn from_seed_with_updates(seed: u64) -> Self {
        Self::derive(seed, None, Some(true))
    }

    fn derive(seed: u64, group: Option<bool>, updates: Option<bool>) -> Self {
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
            config_updates: Vec::new(),
        };
        let mut listener = SimRng::new(seed ^ 0x6c69_7374_656e_6572);
        if s.is_group() && listener.chance(0.5) {
            let max = s.config.rebalance_drain_timeout.as_millis() as u64 * 2;
            s.listener_latency = Some(listener.millis(0, max));
        }
        // Its own stream too: a seed without updates derives what it always did.
        let mut u = SimRng::new(seed ^ 0x6c69_7665_636f_6e66);
        if updates.unwrap_or_else(|| u.chance(0.25)) {
            s.config_updates = live_updates(&mut u, &s.config, s.faults.heal_at);
        }
        s.liveness_budget = s.default_liveness_budget();
        s
    }

    /// Every configuration the run has in force at some time: the first, then each update's.
    pub fn configs(&self) -> impl Iterator<Item = &ConsumerConfig> {
        std::iter::once(&self.config).chain(self.config_updates.iter().map(|(_, c)| c))
    }

    /// A generous bound on the simulated time after heal that settling everything may take,
    /// under the most patient of the configurations the run has in force.
    pub fn default_liveness_budget(&self) -> Duration {
        self.configs()
            .map(|c| self.liveness_budget_under(c))
            .max()
            .unwrap_or_default()
    }

    fn liveness_budget_under(&self, c: &ConsumerConfig) -> Duration {
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

/// One to four updates at random times before `heal_at`, each redrawing some of the settings
/// that may change while running (from the ranges `derive` draws them from) in the one before.
fn live_updates(
    rng: &mut SimRng,
    first: &ConsumerConfig,
    heal_at: Duration,
) -> Vec<(Duration, ConsumerConfig)> {
    let heal = u64::try_from(heal_at.as_millis()).unwrap_or(u64::MAX);
    let mut at: Vec<Duration> = (0..rng.range(1, 4))
        .map(|_| rng.millis(0, heal.saturating_sub(1)))
        .collect();
    at.sort();
    let mut c = first.clone();
    let mut updates = Vec::new();
    for at in at {
        let redraw = |rng: &mut SimRng| rng.chance(0.4);
        if redraw(rng) {
            c.max_retry_attempts = rng.range(0, 4) as u32;
        }
        if redraw(rng) {
            c.retry_backoff_base = rng.millis(1, 50);
            c.retry_backoff_max = c.retry_backoff_base + rng.millis(0, 2_000);
        }
        if redraw(rng) {
            c.ack_batch_size = rng.pick(&[1, 3, 10, 100]);
            c.ack_batch_timeout = rng.millis(5, 500);
            c.ack_batch_min_interval = rng.millis(0, 200);
        }
        if redraw(rng) {
            c.fetch_size = rng.pick(&[1, 2, 5, 10, 50, 100]);
            c.fetch_max_bytes = rng.pick(&[64, 256, 4096, 1 << 20]);
        }
        if redraw(rng) {
            c.prefetch_bytes = rng.pick(&[256, 4096, 16 << 20]);
            c.max_unsettled_per_partition = rng.pick(&[1, 4, 64, 10_000]);
        }
        if redraw(rng) {
            c.cache_max_entries = rng.pick(&[Some(1), Some(2), Some(5), None, Some(1000)]);
            c.cache_max_bytes = rng.pick(&[64, 1024, 64 << 20]);
            c.cache_ttl = rng.pick(&[
                Duration::from_millis(50),
                Duration::from_secs(1),
                Duration::from_secs(300),
            ]);
        }
        if redraw(rng) {
            c.failure_threshold = rng.range(1, 6) as u32;
            c.recovery_timeout = rng.millis(10, 2_000);
            c.half_open_max_probes = rng.range(1, 3) as u32;
            c.half_open_max_wait = rng.millis(50, 3_000);
        }
        if redraw(rng) {
            c.request_timeout = rng.millis(100, 3_000);
            c.drain_timeout = rng.millis(100, 2_000);
            c.empty_fetch_backoff_min = rng.millis(1, 20);
            c.empty_fetch_backoff_max = c.empty_fetch_backoff_min + rng.millis(0, 500);
        }
        if c.uses_group_session() && redraw(rng) {
            c.rebalance_drain_timeout = rng.millis(20, 3_000);
        }
        updates.push((at, c.clone()));
    }
    updates
}
