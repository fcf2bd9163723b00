//! The deterministic simulation: one [`ConsumerMachine`], one [`SimBroker`], a fault layer
//! and an application model, driven by a discrete-event loop.
//!
//! The loop never sleeps: it jumps straight to the earliest of the machine's `poll_timeout`,
//! the broker's `poll_timeout` and its own queue (request arrivals, answers, application
//! actions, fault events). After every input to the machine it drains the outputs in the
//! documented order and checks every invariant of [`crate::invariants`].
//!
//! About a third of the seeds run a consumer-group session instead of manual assignment:
//! phantom members, driven straight against the broker, join, rejoin, leave and go silent
//! before heal; partitions they hold stall until they are gone, then the consumer owns every
//! partition and must settle everything and commit it in its close.
//!
//! One `u64` seed derives the whole [`Scenario`] (swarm style: partition and message counts,
//! every config knob, which faults are on and how often) and every sub-seed, so
//! `RUSTMQ_SIM_SEED=<seed>` replays a failure exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug, Write as _};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustmq_consumer_core::protocol::{
    error_code, CommitOffsetRequest, ConsumerHeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    Record, Request, Response, TopicPartition,
};
use rustmq_consumer_core::{
    dead_letter_headers, BreakerState, ClosePhase, ConsumerConfig, ConsumerMachine, DeliveryTag,
    Event, Message, RequestId, TransportError, UsageError,
};
use tracing::debug;

use crate::broker::{GroupState, SimBroker, REAPER_INTERVAL};
use crate::faults::{Fate, FaultPlan, PhantomPlan, SimRng};
use crate::invariants::{names, Checker, Violation};

/// Environment variable replaying one seed.
pub const SEED_ENV: &str = "RUSTMQ_SIM_SEED";
/// Environment variable setting how many seeds run.
pub const RUNS_ENV: &str = "RUSTMQ_SIM_RUNS";

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("{SEED_ENV}={seed} cargo test -p rustmq-consumer-testkit --test simulation")
}

/// The seeds to run: the one in `RUSTMQ_SIM_SEED` if set, else `RUSTMQ_SIM_RUNS` (or
/// `default_runs`) seeds counting up from `first`.
pub fn seeds_from_env(first: u64, default_runs: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return vec![seed];
    }
    let runs = std::env::var(RUNS_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default_runs);
    (first..first.saturating_add(runs)).collect()
}

/// What the application does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Process it (the side effect), then ack.
    Ack,
    /// Hand it back for a retry, after the policy's backoff or an explicit delay.
    Nack(Option<Duration>),
    /// Send it to the dead-letter path with this reason.
    Reject(String),
    /// Forget the handle (the driver turns this into a nack).
    Drop,
}

/// An [`Action`] and when the application takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// Processing time before doing it.
    pub after: Duration,
}

impl Decision {
    /// `action` after `after`.
    pub fn new(action: Action, after: Duration) -> Self {
        Self { action, after }
    }
}

/// The application under simulation: decides what to do with each delivery.
///
/// Any `FnMut(&Message, &mut SimRng) -> Decision` is a handler, so a user can test their
/// own handler logic under faults with a seed.
pub trait Handler {
    /// Decides the fate of one delivery. `rng` is the simulation's seeded application stream.
    fn handle(&mut self, delivery: &Message, rng: &mut SimRng) -> Decision;
}

impl<F: FnMut(&Message, &mut SimRng) -> Decision> Handler for F {
    fn handle(&mut self, delivery: &Message, rng: &mut SimRng) -> Decision {
        self(delivery, rng)
    }
}

/// The application model's knobs: how it acks, nacks, rejects and drops, how slow it is, and
/// how often it pauses, seeks and commits on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct AppBehaviour {
    /// Fraction of messages that are poison: always nacked or rejected.
    pub poison_rate: f64,
    /// Probability that a poison delivery is rejected rather than nacked.
    pub poison_reject_rate: f64,
    /// Probability that an ordinary delivery is nacked.
    pub nack_rate: f64,
    /// Probability that a nack carries an explicit delay.
    pub nack_delay_rate: f64,
    /// Largest explicit nack delay.
    pub nack_delay_max: Duration,
    /// Probability that an ordinary delivery is rejected.
    pub reject_rate: f64,
    /// Probability that a delivery's handle is dropped.
    pub drop_rate: f64,
    /// Smallest processing time.
    pub delay_min: Duration,
    /// Largest ordinary processing time.
    pub delay_max: Duration,
    /// Probability of a slow delivery.
    pub slow_rate: f64,
    /// Largest processing time of a slow delivery.
    pub slow_max: Duration,
    /// Expected pauses per simulated second (before heal).
    pub pause_per_sec: f64,
    /// Longest pause.
    pub pause_max: Duration,
    /// Expected seeks per simulated second (before heal).
    pub seek_per_sec: f64,
    /// Expected on-demand commits per simulated second.
    pub commit_per_sec: f64,
}

impl AppBehaviour {
    /// A well-behaved application: acks everything within `delay`.
    pub fn well_behaved(delay: Duration) -> Self {
        Self {
            poison_rate: 0.0,
            poison_reject_rate: 0.0,
            nack_rate: 0.0,
            nack_delay_rate: 0.0,
            nack_delay_max: Duration::ZERO,
            reject_rate: 0.0,
            drop_rate: 0.0,
            delay_min: Duration::ZERO,
            delay_max: delay,
            slow_rate: 0.0,
            slow_max: delay,
            pause_per_sec: 0.0,
            pause_max: Duration::ZERO,
            seek_per_sec: 0.0,
            commit_per_sec: 0.0,
        }
    }

    /// Swarm-style: each misbehaviour on or off by a coin flip, with a random rate.
    pub fn from_rng(rng: &mut SimRng) -> Self {
        let on = |rng: &mut SimRng, p: f64, lo: f64, hi: f64| {
            if rng.chance(p) {
                lo + (hi - lo) * (rng.range(0, 1000) as f64 / 1000.0)
            } else {
                0.0
            }
        };
        let delay_min = rng.millis(0, 2);
        let delay_max = delay_min + rng.millis(0, 50);
        Self {
            poison_rate: on(rng, 0.7, 0.01, 0.1),
            poison_reject_rate: on(rng, 0.5, 0.2, 1.0),
            nack_rate: on(rng, 0.5, 0.01, 0.2),
            nack_delay_rate: on(rng, 0.5, 0.1, 0.9),
            nack_delay_max: rng.millis(1, 300),
            reject_rate: on(rng, 0.3, 0.005, 0.05),
            drop_rate: on(rng, 0.3, 0.005, 0.05),
            delay_min,
            delay_max,
            slow_rate: on(rng, 0.4, 0.01, 0.1),
            slow_max: delay_max + rng.millis(0, 2_000),
            pause_per_sec: on(rng, 0.3, 0.1, 2.0),
            pause_max: rng.millis(1, 1_000),
            seek_per_sec: on(rng, 0.2, 0.05, 0.5),
            commit_per_sec: on(rng, 0.3, 0.2, 5.0),
        }
    }

    /// True when the offset is poison under this behaviour and `seed`.
    pub fn is_poison(&self, seed: u64, partition: u32, offset: u64) -> bool {
        let mut rng = SimRng::new(seed ^ (u64::from(partition) << 40) ^ offset);
        rng.chance(self.poison_rate)
    }
}

/// The application model driven by [`AppBehaviour`]; the default [`Handler`].
#[derive(Debug, Clone)]
pub struct ModelApp {
    behaviour: AppBehaviour,
    seed: u64,
}

impl ModelApp {
    /// The model for `behaviour`; `seed` decides which messages are poison.
    pub fn new(behaviour: AppBehaviour, seed: u64) -> Self {
        Self { behaviour, seed }
    }
}

impl Handler for ModelApp {
    fn handle(&mut self, d: &Message, rng: &mut SimRng) -> Decision {
        let b = &self.behaviour;
        let ms = |x: Duration| x.as_millis() as u64;
        let after = if rng.chance(b.slow_rate) {
            rng.millis(ms(b.delay_min), ms(b.slow_max))
        } else {
            rng.millis(ms(b.delay_min), ms(b.delay_max))
        };
        let nack = |rng: &mut SimRng| {
            if rng.chance(b.nack_delay_rate) {
                Action::Nack(Some(rng.millis(0, ms(b.nack_delay_max))))
            } else {
                Action::Nack(None)
            }
        };
        let action = if b.is_poison(self.seed, d.tag.partition, d.tag.offset) {
            if rng.chance(b.poison_reject_rate) {
                Action::Reject(format!("poison at {}", d.tag.offset))
            } else {
                nack(rng)
            }
        } else if rng.chance(b.drop_rate) {
            Action::Drop
        } else if rng.chance(b.reject_rate) {
            Action::Reject("handler refused".to_owned())
        } else if rng.chance(b.nack_rate) {
            nack(rng)
        } else {
            Action::Ack
        };
        Decision::new(action, after)
    }
}

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
        };
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
            let phantom = self
                .faults
                .phantoms
                .iter()
                .map(|p| p.session_timeout)
                .max()
                .unwrap_or_default();
            phantom
                + REAPER_INTERVAL * 2
                + (c.session_timeout + c.heartbeat() + c.rebalance_drain_timeout + rtt) * 4
                + c.request_timeout * 4
        } else {
            Duration::ZERO
        };
        group
            + per_try * attempts * 4
            + breaker * 8
            + c.ack_batch_timeout * 4
            + self.faults.group_recreate_delay
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

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Inputs fed to the machine.
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries (redeliveries included).
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Messages confirmed in the dead-letter topic.
    pub dead_lettered: u64,
    /// Poison messages discarded.
    pub discarded: u64,
    /// Requests the machine sent.
    pub requests: u64,
    /// Requests the fault layer failed or lost.
    pub faults: u64,
    /// Broker crashes.
    pub crashes: u64,
    /// Seeks.
    pub seeks: u64,
    /// The run was a group session.
    pub group: bool,
    /// Group session: assignments the consumer received (`Assigned` events).
    pub assignments: u64,
    /// Group session: JoinGroup requests of other (phantom) members.
    pub phantom_joins: u64,
    /// Acks, nacks and rejects of stale deliveries (revoked or sought) the machine refused.
    pub stale_refused: u64,
    /// Deliveries of messages already processed (at least once across rebalances, restarts
    /// and seeks).
    pub duplicates: u64,
    /// Simulated time until Closed.
    pub simulated: Duration,
    /// Hash of every transmit, event and application action, in order.
    pub trace_hash: u64,
}

/// A failed run: the violation and how to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub violation: Violation,
    /// The last trace lines before it broke (empty unless the run kept its trace).
    pub trace_tail: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {}\nreplay: {}",
            self.seed,
            self.violation,
            replay_command(self.seed)
        )?;
        if !self.trace_tail.is_empty() {
            write!(f, "\nlast trace lines:\n{}", self.trace_tail.join("\n"))?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

#[derive(Debug, Clone)]
enum Item {
    Produce,
    Arrive(RequestId),
    Answer(RequestId),
    AppDone(u64),
    SideEffect(u64),
    ConnectionLoss,
    Crash,
    RecreateGroup,
    StorageFailure,
    Pause,
    Resume(u32),
    Seek,
    CommitNow,
    PhantomJoin(usize),
    PhantomBeat(usize),
    PhantomEnd(usize),
    Heal,
}

/// A phantom member's state: its id and generation on the broker, and whether it still
/// heartbeats.
#[derive(Debug, Clone)]
struct PhantomState {
    plan: PhantomPlan,
    member: String,
    generation: u64,
    alive: bool,
}

#[derive(Debug)]
struct Flight {
    request: Request,
    fate: Fate,
    /// Lowest unsettled offsets when a commit was sent.
    bound: BTreeMap<u32, u64>,
    answer: Option<Result<Response, TransportError>>,
}

#[derive(Debug)]
struct Work {
    tag: DeliveryTag,
    generation: u64,
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Faulty,
    Liveness,
    Closing,
}

/// One simulated run. Build it from a [`Scenario`], optionally give it a [`Handler`] or a
/// [`Mutation`], then [`run`](Self::run).
pub struct Simulation<H: Handler = ModelApp> {
    scenario: Scenario,
    handler: H,
    mutation: Mutation,
    start: Instant,
    now: Instant,
    broker: SimBroker,
    machine: Option<ConsumerMachine>,
    checker: Checker,
    fault_rng: SimRng,
    app_rng: SimRng,
    value_rng: SimRng,
    queue: BTreeMap<(Instant, u64), Item>,
    seq: u64,
    flights: BTreeMap<RequestId, Flight>,
    work: BTreeMap<u64, Work>,
    next_work: u64,
    paused: BTreeSet<u32>,
    produced: Vec<u64>,
    bursts_left: u32,
    crashed: bool,
    phase: Phase,
    close_phases: Vec<ClosePhase>,
    phantoms: Vec<PhantomState>,
    /// The instant the machine's revoke deadline last fired (spin detection).
    report: SimReport,
    scratch: String,
    /// The last trace lines, when kept (`keep_trace`).
    tail: std::collections::VecDeque<String>,
    tail_len: usize,
}

impl<H: Handler> Debug for Simulation<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.scenario.seed)
            .field("step", &self.report.steps)
            .finish_non_exhaustive()
    }
}

impl Simulation<ModelApp> {
    /// A run of `scenario` with its application model.
    pub fn new(scenario: Scenario) -> Self {
        let app = ModelApp::new(scenario.app.clone(), scenario.seed);
        Simulation::with_handler(scenario, app)
    }
}

impl<H: Handler> Simulation<H> {
    /// A run of `scenario` with a custom application.
    pub fn with_handler(scenario: Scenario, handler: H) -> Self {
        let mut rng = SimRng::new(scenario.seed ^ 0x51u64.rotate_left(56));
        let start = Instant::now();
        let checker = Checker::new(&scenario.config);
        let produced = vec![0; scenario.messages.len()];
        Self {
            handler,
            mutation: Mutation::None,
            start,
            now: start,
            broker: SimBroker::with_seed(scenario.seed),
            machine: None,
            checker,
            fault_rng: rng.fork(10),
            app_rng: rng.fork(11),
            value_rng: rng.fork(12),
            queue: BTreeMap::new(),
            seq: 0,
            flights: BTreeMap::new(),
            work: BTreeMap::new(),
            next_work: 0,
            paused: BTreeSet::new(),
            produced,
            bursts_left: scenario.bursts,
            crashed: false,
            phase: Phase::Faulty,
            close_phases: Vec::new(),
            phantoms: scenario
                .faults
                .phantoms
                .iter()
                .map(|plan| PhantomState {
                    plan: plan.clone(),
                    member: String::new(),
                    generation: 0,
                    alive: false,
                })
                .collect(),
            report: SimReport {
                seed: scenario.seed,
                trace_hash: 0xcbf2_9ce4_8422_2325,
                ..SimReport::default()
            },
            scratch: String::new(),
            tail: std::collections::VecDeque::new(),
            tail_len: 0,
            scenario,
        }
    }

    /// Runs a deliberately wrong policy instead of the real one.
    pub fn with_mutation(mut self, mutation: Mutation) -> Self {
        self.mutation = mutation;
        self
    }

    /// Keeps the last `lines` trace lines and attaches them to a [`Failure`].
    pub fn keep_trace(mut self, lines: usize) -> Self {
        self.tail_len = lines;
        self
    }

    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    fn elapsed(&self) -> Duration {
        self.now.saturating_duration_since(self.start)
    }

    fn schedule(&mut self, after: Duration, item: Item) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), item);
    }

    fn schedule_poisson(&mut self, per_sec: f64, item: Item, before_heal: bool) {
        if let Some(d) = FaultPlan::next_event(&mut self.fault_rng, per_sec) {
            if !before_heal || self.elapsed() + d < self.scenario.faults.heal_at {
                self.schedule(d, item);
            }
        }
    }

    fn trace(&mut self, kind: &str, what: &dyn Debug) {
        self.scratch.clear();
        let _ = write!(self.scratch, "{:?}|{kind}|{what:?}", self.elapsed());
        let mut h = self.report.trace_hash;
        for b in self.scratch.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.report.trace_hash = h;
        if self.tail_len > 0 {
            if self.tail.len() == self.tail_len {
                self.tail.pop_front();
            }
            self.tail
                .push_back(format!("#{} {}", self.report.steps, self.scratch));
        }
    }

    fn machine(&mut self) -> &mut ConsumerMachine {
        self.machine
            .as_mut()
            .expect("the machine exists once run() started")
    }

    /// Runs the scenario to the end: faults, heal, liveness, close. Returns the report, or the
    /// first invariant that broke.
    pub fn run(mut self) -> Result<SimReport, Failure> {
        let seed = self.scenario.seed;
        self.run_inner().map_err(|violation| Failure {
            seed,
            violation,
            trace_tail: self.tail.iter().cloned().collect(),
        })
    }

    fn run_inner(&mut self) -> Result<SimReport, Violation> {
        let cfg = self.scenario.config.clone();
        let partitions = self.scenario.messages.len() as u32;
        self.broker.create_topic(TOPIC, partitions);
        if let Some(dlq) = &cfg.dead_letter_queue {
            self.broker.create_topic(dlq, 1);
        }
        self.broker.ensure_group(GROUP);
        if self.scenario.is_group() {
            self.checker.track_partitions(partitions);
            for (i, p) in self.scenario.faults.phantoms.clone().iter().enumerate() {
                self.schedule(p.join_at, Item::PhantomJoin(i));
                self.schedule(p.leave_at, Item::PhantomEnd(i));
            }
            self.schedule(self.scenario.faults.heal_at, Item::Heal);
        }
        self.schedule(Duration::ZERO, Item::Produce);
        let f = self.scenario.faults.clone();
        self.schedule_poisson(f.connection_loss_per_sec, Item::ConnectionLoss, true);
        self.schedule_poisson(f.crash_per_sec, Item::Crash, true);
        self.schedule_poisson(f.storage_failure_per_sec, Item::StorageFailure, true);
        let a = self.scenario.app.clone();
        self.schedule_poisson(a.pause_per_sec, Item::Pause, true);
        if !self.scenario.is_group() {
            // A seek is not durable across a rebalance (the next assignment starts at the
            // group's commit), so group sessions do not seek whatever the behaviour says.
            self.schedule_poisson(a.seek_per_sec, Item::Seek, true);
        }
        self.schedule_poisson(a.commit_per_sec, Item::CommitNow, false);

        let machine = ConsumerMachine::new(cfg.clone(), self.now).map_err(|e| Violation {
            invariant: names::COMMAND_ACCEPTED,
            step: 0,
            at: Duration::ZERO,
            detail: format!("scenario config rejected: {e}"),
        })?;
        self.machine = Some(machine);
        self.after_input()?;

        let heal = f.heal_at;
        let liveness_deadline = heal + self.scenario.liveness_budget;
        let mut close_deadline = Duration::MAX;
        let mut same_instant = 0u64;
        loop {
            if self.phase == Phase::Faulty && self.elapsed() >= heal && self.bursts_left == 0 {
                self.phase = Phase::Liveness;
            }
            if self.phase == Phase::Liveness && self.settled_everything() {
                self.phase = Phase::Closing;
                close_deadline = self.elapsed()
                    + cfg.drain_timeout * 5
                    + cfg.request_timeout * 3
                    + Duration::from_secs(1);
                let now = self.now;
                self.trace("app", &"close");
                self.machine().close(now);
                self.after_input()?;
            }
            if self.phase == Phase::Closing && self.checker.closed() {
                return self.finish();
            }
            let machine_at = self.machine.as_ref().and_then(|m| m.poll_timeout());
            let queue_at = self.queue.keys().next().map(|k| k.0);
            let broker_at = self.broker.poll_timeout();
            let next = [machine_at.map(|m| m.0), queue_at, broker_at]
                .into_iter()
                .flatten()
                .min();
            let bound = match self.phase {
                Phase::Closing => close_deadline,
                _ => liveness_deadline,
            };
            let Some(next) = next.filter(|&t| t.saturating_duration_since(self.start) <= bound)
            else {
                return Err(self.stuck(next.is_none()));
            };
            if next <= self.now {
                same_instant += 1;
                if same_instant > MAX_STEPS_AT_ONE_INSTANT {
                    return Err(self.checker.broken(
                        names::LIVENESS,
                        format!(
                            "time stopped: {same_instant} wake-ups at one instant (machine timeout {:?}, broker {:?}, queue {:?})",
                            machine_at.map(|m| (m.0.saturating_duration_since(self.start), m.1)),
                            broker_at.map(|b| b.saturating_duration_since(self.start)),
                            self.queue.iter().next().map(|(k, v)| (k.0.saturating_duration_since(self.start), v))
                        ),
                    ));
                }
            } else {
                same_instant = 0;
            }
            if self.report.steps > MAX_STEPS {
                return Err(self.stuck(false));
            }
            self.now = self.now.max(next);
            if queue_at == Some(next) {
                let (_, item) = self.queue.pop_first().expect("queue_at came from it");
                self.dispatch(item)?;
            } else if machine_at.is_some_and(|m| m.0 == next) {
                let now = self.now;
                self.machine().handle_timeout(now);
                self.after_input()?;
            } else {
                let now = self.now;
                self.broker.handle_timeout(now);
            }
        }
    }

    fn stuck(&self, idle: bool) -> Violation {
        let why = if idle {
            "nothing left to happen"
        } else {
            "time bound passed"
        };
        let m = self.machine.as_ref().expect("running");
        let group = if self.scenario.is_group() {
            format!(
                "; group: members {:?} state {:?} generation {:?}, consumer {:?} owns {:?} (generation {}), machine assigned {:?}, phantoms alive {}",
                self.broker.members(GROUP),
                self.broker.group_state(GROUP),
                self.broker.generation(GROUP),
                self.checker.member(),
                self.checker.owned(),
                self.checker.owned_generation(),
                m.assigned_partitions(),
                self.phantoms.iter().filter(|p| p.alive).count()
            )
        } else {
            String::new()
        };
        let detail = if self.phase == Phase::Closing {
            format!("{why} while closing; phases {:?}", self.close_phases)
        } else {
            let parts: Vec<String> = (0..self.produced.len() as u32)
                .map(|p| {
                    let accepted: Vec<(Duration, u64)> = self
                        .broker
                        .commit_log()
                        .iter()
                        .filter_map(|c| {
                            let o = c.offsets.get(&TopicPartition::new(TOPIC, p))?;
                            Some((c.at.saturating_duration_since(self.start), *o))
                        })
                        .rev()
                        .take(3)
                        .collect();
                    format!(
                        "p{p}: hw {:?} app-low {:?} watermark {:?} committed {:?} broker {:?} (last accepted, newest first: {accepted:?})",
                        self.broker.high_watermark(TOPIC, p),
                        self.checker.lowest_unsettled(p),
                        m.settle_watermark(p),
                        m.committed_offset(p),
                        self.broker.committed(GROUP, &TopicPartition::new(TOPIC, p)),
                    )
                })
                .collect();
            format!(
                "{why} before everything settled ({}); breaker {:?}, metrics {:?}",
                parts.join("; "),
                m.breaker_state(),
                m.metrics()
            )
        };
        let detail = detail + &group;
        self.checker.broken(
            if self.phase == Phase::Closing {
                names::CLOSE
            } else {
                names::LIVENESS
            },
            detail,
        )
    }

    /// True when every produced message is settled by its side effect, and the machine's
    /// watermark and committed offset (and the broker's, unless a crash lost it) are at the
    /// high watermark.
    ///
    /// In a group session: every phantom is gone, the consumer is the group's only member of
    /// the broker's current (stable) generation and owns every partition, and everything is
    /// processed and settled. The commit is left to the close (commit before leave), and
    /// [`Self::finish`] checks the broker has it.
    fn settled_everything(&self) -> bool {
        let Some(m) = self.machine.as_ref() else {
            return false;
        };
        if self.scenario.is_group() {
            let all: Vec<u32> = (0..self.produced.len() as u32).collect();
            return !self.phantoms.iter().any(|p| p.alive)
                && self.broker.members(GROUP) == [self.checker.member()]
                && self.broker.group_state(GROUP) == Some(GroupState::Stable)
                && self.broker.generation(GROUP) == Some(self.checker.owned_generation())
                && m.assigned_partitions() == all
                && self.checker.outstanding() == 0
                // A commit sent before heal may still meet a fault (a lost answer opens the
                // circuit at its deadline) and hold the final commit past the close deadline.
                && self.checker.commits_in_flight() == 0
                // An open circuit (from a fault before heal) would hold the final commit past
                // the close deadline; wait for it to close like the manual swarm does.
                && m.breaker_state() == BreakerState::Closed
                && all.iter().all(|&p| {
                    let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
                    self.checker.lowest_unsettled(p) == Some(hw)
                        && m.settle_watermark(p) == Some(hw)
                });
        }
        (0..self.produced.len() as u32).all(|p| {
            let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
            let broker = self.broker.committed(GROUP, &TopicPartition::new(TOPIC, p));
            self.checker.lowest_unsettled(p) == Some(hw)
                && m.settle_watermark(p) == Some(hw)
                && m.committed_offset(p).unwrap_or(0) == hw
                && (broker == Some(hw) || (broker.is_none() && (hw == 0 || self.crashed)))
        })
    }

    fn finish(&mut self) -> Result<SimReport, Violation> {
        let mut expected = vec![
            ClosePhase::Draining,
            ClosePhase::FlushingDeadLetters,
            ClosePhase::FinalCommit,
            ClosePhase::Closed,
        ];
        if self.scenario.is_group() {
            expected.insert(3, ClosePhase::LeavingGroup);
        }
        if self.close_phases != expected {
            return Err(self.checker.broken(
                names::CLOSE,
                format!("close phases {:?}", self.close_phases),
            ));
        }
        // Nothing more is sent after Closed, whatever time passes.
        let later = self.now + Duration::from_secs(3_600);
        self.machine().handle_timeout(later);
        if let Some(t) = self.machine().poll_transmit() {
            return Err(self.checker.broken(
                names::CLOSE,
                format!("{:?} sent after Closed", t.request.kind()),
            ));
        }
        self.check_dead_letters()?;
        if self.scenario.is_group() {
            self.check_group_after_close()?;
        }
        let (assignments, _) = self.checker.rebalances();
        self.report.assignments = assignments;
        self.report.stale_refused = self.checker.stale_refused();
        self.report.duplicates = self.checker.duplicates();
        self.report.group = self.scenario.is_group();
        let m = self.machine.as_ref().expect("running").metrics();
        self.report.delivered = m.delivered;
        self.report.acked = m.acked;
        self.report.dead_lettered = m.dead_lettered;
        self.report.discarded = m.discarded;
        self.report.produced = self.produced.iter().sum();
        self.report.simulated = self.elapsed();
        Ok(self.report)
    }

    /// Group session, after Closed: the final commit reached the broker (every partition at
    /// its high watermark, unless a restart lost commits the consumer had confirmed), and the
    /// consumer left the group.
    fn check_group_after_close(&self) -> Result<(), Violation> {
        for p in 0..self.produced.len() as u32 {
            let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
            let broker = self.broker.committed(GROUP, &TopicPartition::new(TOPIC, p));
            if !(broker == Some(hw) || (broker.is_none() && (hw == 0 || self.crashed))) {
                return Err(self.checker.broken(
                    names::LIVENESS,
                    format!("closed with partition {p} committed at {broker:?} on the broker, high watermark {hw}"),
                ));
            }
        }
        let members = self.broker.members(GROUP);
        if !members.is_empty() {
            return Err(self.checker.broken(
                names::CLOSE,
                format!("closed, yet the group still has members {members:?}"),
            ));
        }
        Ok(())
    }

    /// Every dead-lettered offset is in the dead-letter topic with the original value and the
    /// documented headers.
    fn check_dead_letters(&self) -> Result<(), Violation> {
        let Some(dlq) = &self.scenario.config.dead_letter_queue else {
            return Ok(());
        };
        use dead_letter_headers::*;
        let text = |r: &Record, k: &str| {
            r.header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let mut found = BTreeSet::new();
        for r in self.broker.records(dlq, 0) {
            let bad = |what: String| Err(self.checker.broken(names::DEAD_LETTER_CONTENT, what));
            let (Ok(p), Ok(o)) = (
                text(r, ORIGINAL_PARTITION).parse::<u32>(),
                text(r, ORIGINAL_OFFSET).parse::<u64>(),
            ) else {
                return bad(format!(
                    "dead letter without partition/offset headers: {r:?}"
                ));
            };
            let attempts = text(r, ATTEMPTS).parse::<u32>().unwrap_or(0);
            let original = self.broker.records(TOPIC, p).get(o as usize);
            if text(r, ORIGINAL_TOPIC) != TOPIC
                || text(r, CONSUMER_GROUP) != GROUP
                || r.header(LAST_REASON).is_none()
                || attempts == 0
                || attempts > self.scenario.config.max_retry_attempts + 1
                || original.map(|x| &x.value) != Some(&r.value)
            {
                return bad(format!("dead letter of p{p}@{o} is wrong: {r:?}"));
            }
            found.insert((p, o));
        }
        for key in self.checker.dead_lettered() {
            if !found.contains(key) {
                return Err(self.checker.broken(
                    names::DEAD_LETTER_CONTENT,
                    format!("confirmed dead letter {key:?} missing from the topic"),
                ));
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, item: Item) -> Result<(), Violation> {
        match item {
            Item::Produce => self.produce_burst(),
            Item::Arrive(id) => self.arrive(id)?,
            Item::Answer(id) => {
                if let Some(flight) = self.flights.remove(&id) {
                    let answer = flight
                        .answer
                        .unwrap_or_else(|| Err(TransportError::TimedOut));
                    self.deliver_answer(id, Some(&flight.request), answer)?;
                }
            }
            Item::AppDone(key) => self.app_done(key)?,
            Item::SideEffect(key) => {
                if let Some(w) = self.work.remove(&key) {
                    self.trace("side-effect", &w.tag);
                    self.checker
                        .side_effect(w.tag.partition, w.tag.offset, w.generation);
                    self.check_state()?;
                }
            }
            Item::ConnectionLoss => {
                self.report.faults += 1;
                self.trace("fault", &"connection lost");
                self.fail_all_in_flight("connection reset by the simulation")?;
                let rate = self.scenario.faults.connection_loss_per_sec;
                self.schedule_poisson(rate, Item::ConnectionLoss, true);
            }
            Item::Crash => {
                self.report.crashes += 1;
                self.crashed = true;
                self.trace("fault", &"broker crash");
                self.broker.restart();
                self.fail_all_in_flight("broker restarted")?;
                let delay = self.scenario.faults.group_recreate_delay;
                self.schedule(delay, Item::RecreateGroup);
                let rate = self.scenario.faults.crash_per_sec;
                self.schedule_poisson(rate, Item::Crash, true);
            }
            Item::RecreateGroup => {
                self.broker.ensure_group(GROUP);
            }
            Item::StorageFailure => {
                let n = self
                    .fault_rng
                    .range(1, u64::from(self.scenario.faults.storage_failure_burst))
                    as u32;
                if self.fault_rng.chance(0.5) {
                    self.broker.fail_next_fetches(n);
                } else {
                    self.broker.fail_next_commits(n);
                }
                self.trace("fault", &("storage", n));
                let rate = self.scenario.faults.storage_failure_per_sec;
                self.schedule_poisson(rate, Item::StorageFailure, true);
            }
            Item::Pause => {
                let p = self.app_rng.range(0, self.produced.len() as u64 - 1) as u32;
                // In a group session only an owned partition can be paused.
                let owned = self.checker.owned().contains(&p);
                if self.phase == Phase::Faulty && !self.paused.contains(&p) && owned {
                    self.paused.insert(p);
                    self.checker.set_paused(p, true);
                    self.trace("app", &("pause", p));
                    let now = self.now;
                    let r = self.machine().pause(now, &[p]);
                    self.command_result(r, "pause")?;
                    let max = self.scenario.app.pause_max.as_millis() as u64;
                    let d = self.app_rng.millis(0, max);
                    self.schedule(d, Item::Resume(p));
                }
                let rate = self.scenario.app.pause_per_sec;
                self.schedule_poisson(rate, Item::Pause, true);
            }
            Item::Resume(p) => {
                // A revoke dropped the pause along with the partition.
                if self.phase != Phase::Closing && self.paused.contains(&p) {
                    self.paused.remove(&p);
                    self.checker.set_paused(p, false);
                    self.trace("app", &("resume", p));
                    let now = self.now;
                    let r = self.machine().resume(now, &[p]);
                    self.command_result(r, "resume")?;
                }
            }
            Item::Seek => {
                let p = self.app_rng.range(0, self.produced.len() as u64 - 1) as u32;
                let hw = self.broker.high_watermark(TOPIC, p).unwrap_or(0);
                let offset = self.app_rng.range(0, hw);
                if self.phase == Phase::Faulty {
                    self.report.seeks += 1;
                    self.checker.seek(p, offset);
                    self.trace("app", &("seek", p, offset));
                    let now = self.now;
                    let r = self.machine().seek(now, p, offset);
                    self.command_result(r, "seek")?;
                }
                let rate = self.scenario.app.seek_per_sec;
                self.schedule_poisson(rate, Item::Seek, true);
            }
            Item::PhantomJoin(i) => {
                self.phantoms[i].alive = true;
                self.phantom_join(i);
                let beat = self.phantoms[i].plan.heartbeat_interval();
                self.schedule(beat, Item::PhantomBeat(i));
            }
            Item::PhantomBeat(i) => self.phantom_beat(i),
            Item::PhantomEnd(i) => {
                let ph = &mut self.phantoms[i];
                ph.alive = false;
                let (silent, member) = (ph.plan.silent, ph.member.clone());
                self.report.faults += 1;
                if silent {
                    self.trace("phantom", &("silent", i, &member));
                } else {
                    self.trace("phantom", &("leave", i, &member));
                    let now = self.now;
                    let _ = self.broker.handle(
                        now,
                        LeaveGroupRequest {
                            group_id: GROUP.to_owned(),
                            member_id: member,
                        }
                        .into(),
                    );
                }
            }
            Item::Heal => {
                // Storage failures injected before heal and not used up end with the faults.
                self.broker.fail_next_commits(0);
                self.broker.fail_next_fetches(0);
            }
            Item::CommitNow => {
                if self.phase != Phase::Closing {
                    self.trace("app", &"commit");
                    let now = self.now;
                    let r = self.machine().commit(now).map(|_| ());
                    self.command_result(r, "commit")?;
                    let rate = self.scenario.app.commit_per_sec;
                    self.schedule_poisson(rate, Item::CommitNow, false);
                }
            }
        }
        Ok(())
    }

    fn produce_burst(&mut self) {
        if self.bursts_left == 0 {
            return;
        }
        self.bursts_left -= 1;
        let last = self.bursts_left == 0;
        for (p, target) in self.scenario.messages.clone().into_iter().enumerate() {
            let share = if last {
                target - self.produced[p]
            } else {
                (target / u64::from(self.scenario.bursts)).min(target - self.produced[p])
            };
            if share == 0 {
                continue;
            }
            let (lo, hi) = self.scenario.value_size;
            let records: Vec<Record> = (0..share)
                .map(|i| {
                    let len = self.value_rng.range_usize(lo, hi);
                    let mut value = format!("p{p}-m{}-", self.produced[p] + i).into_bytes();
                    value.resize(len.max(value.len()), b'x');
                    let mut r = Record::from_value(Bytes::from(value));
                    if self.value_rng.chance(0.3) {
                        r.key = Some(Bytes::from(format!("k{}", i % 7)));
                    }
                    r
                })
                .collect();
            // The topic was created with these partitions: produce cannot fail.
            if self.broker.produce(TOPIC, p as u32, records).is_ok() {
                self.produced[p] += share;
            }
        }
        self.trace("produce", &self.produced.clone());
        if !last {
            let heal = self.scenario.faults.heal_at.as_millis() as u64;
            let d = self
                .fault_rng
                .millis(0, heal * 8 / 10 / u64::from(self.scenario.bursts));
            self.schedule(d, Item::Produce);
        }
    }

    fn arrive(&mut self, id: RequestId) -> Result<(), Violation> {
        let now = self.now;
        let Some(flight) = self.flights.get_mut(&id) else {
            return Ok(());
        };
        let previous: BTreeMap<u32, u64> = match &flight.request {
            Request::CommitOffset(c) => commit_offsets(c)
                .into_iter()
                .filter_map(|(p, _)| {
                    let o = self
                        .broker
                        .committed(GROUP, &TopicPartition::new(TOPIC, p))?;
                    Some((p, o))
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let result = self.broker.handle(now, flight.request.clone());
        // Side effects the checker must know about: confirmed dead letters, accepted commits.
        let mut accepted = Vec::new();
        let mut stored = Vec::new();
        match (&flight.request, &result) {
            (Request::Produce(req), Ok(Response::Produce(r))) if r.error_code == 0 => {
                for rec in &req.records {
                    let h = |k| {
                        rec.header(k)
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    };
                    if let (Some(p), Some(o)) = (
                        h(dead_letter_headers::ORIGINAL_PARTITION),
                        h(dead_letter_headers::ORIGINAL_OFFSET),
                    ) {
                        stored.push((p as u32, o));
                    }
                }
            }
            (Request::CommitOffset(req), Ok(Response::CommitOffset(r))) if r.error_code == 0 => {
                accepted = req
                    .offsets
                    .iter()
                    .filter(|(tp, _)| tp.topic == TOPIC)
                    .map(|(tp, o)| (tp.partition, *o))
                    .collect();
            }
            _ => {}
        }
        let bound = flight.bound.clone();
        match flight.fate {
            Fate::Deliver { back, .. } => {
                flight.answer = Some(result.map_err(|e| TransportError::Broker(e.0)));
                self.schedule(back, Item::Answer(id));
            }
            // The answer is lost: only a connection loss or the deadline ends it.
            _ => flight.answer = None,
        }
        for (p, o) in stored {
            self.checker.dead_letter_stored(p, o);
        }
        self.checker
            .check_commit_monotonic(&accepted, |p| previous.get(&p).copied())?;
        self.checker.on_commit_accepted(&accepted, &bound)
    }

    fn deliver_answer(
        &mut self,
        id: RequestId,
        request: Option<&Request>,
        answer: Result<Response, TransportError>,
    ) -> Result<(), Violation> {
        self.checker.on_resolved(id);
        if id.0 >= ROGUE_IDS {
            return Ok(());
        }
        self.trace("answer", &(id, answer.as_ref().map(|r| r.kind())));
        match (request, &answer) {
            (Some(Request::Fetch(f)), Ok(Response::Fetch(r))) => {
                self.checker
                    .on_fetch_answer(f.partition_id, f.fetch_offset, r.records.len());
            }
            (Some(Request::JoinGroup(_)), Ok(Response::JoinGroup(r)))
                if r.error_code == error_code::NONE =>
            {
                self.checker.on_join_answer(r.generation_id, &r.member_id);
            }
            _ => {}
        }
        let now = self.now;
        self.machine().handle_response(now, id, answer);
        self.after_input()
    }

    fn fail_all_in_flight(&mut self, why: &str) -> Result<(), Violation> {
        let ids: Vec<RequestId> = self.flights.keys().copied().collect();
        for id in ids {
            self.flights.remove(&id);
            self.report.faults += 1;
            self.deliver_answer(
                id,
                None,
                Err(TransportError::ConnectionLost(why.to_owned())),
            )?;
        }
        Ok(())
    }

    fn command_result(&mut self, r: Result<(), UsageError>, what: &str) -> Result<(), Violation> {
        match r {
            Ok(()) => self.after_input(),
            Err(UsageError::Closed) if self.phase == Phase::Closing => Ok(()),
            Err(e) => Err(self.checker.command_refused(format!("{what} refused: {e}"))),
        }
    }

    fn app_done(&mut self, key: u64) -> Result<(), Violation> {
        let Some(w) = self.work.get(&key) else {
            return Ok(());
        };
        let (tag, generation, action) = (w.tag, w.generation, w.action.clone());
        let honest_ack = self.mutation != Mutation::AckBeforeSideEffect;
        if action != Action::Ack || honest_ack {
            self.work.remove(&key);
        }
        if action == Action::Ack && honest_ack {
            // The side effect first, then the ack.
            self.checker
                .side_effect(tag.partition, tag.offset, generation);
        }
        self.trace("app", &(&action, tag));
        let now = self.now;
        let stale = self.checker.is_stale(tag.partition, generation);
        let before = self
            .machine
            .as_ref()
            .and_then(|m| m.settle_watermark(tag.partition));
        let r = match &action {
            Action::Ack => self.machine().ack(now, tag),
            Action::Nack(delay) => self.machine().nack(now, tag, *delay),
            Action::Reject(reason) => self.machine().reject(now, tag, reason),
            Action::Drop => {
                debug!(
                    partition = tag.partition,
                    offset = tag.offset,
                    "handle dropped: nack"
                );
                self.machine().nack(now, tag, None)
            }
        };
        let closed = self.machine.as_ref().is_some_and(|m| m.is_closed());
        if stale && !(closed && r == Err(UsageError::Closed)) {
            let after = self
                .machine
                .as_ref()
                .and_then(|m| m.settle_watermark(tag.partition));
            self.checker.on_stale_handback(
                tag.partition,
                tag.offset,
                r.as_ref().map(|_| ()),
                before,
                after,
            )?;
            return Ok(());
        }
        match r {
            Ok(()) => {
                if matches!(action, Action::Ack) {
                    self.report.acked += 1;
                }
                self.checker
                    .handed_back(tag.partition, tag.offset, generation);
                self.after_input()
            }
            Err(UsageError::Closed) if self.machine.as_ref().is_some_and(|m| m.is_closed()) => {
                Ok(())
            }
            Err(e) => Err(self
                .checker
                .command_refused(format!("{action:?} of {tag:?} refused: {e}"))),
        }
    }

    fn check_state(&mut self) -> Result<(), Violation> {
        let m = self.machine.as_ref().expect("running");
        self.checker
            .check_state(&m.metrics(), |p| m.settle_watermark(p))
    }

    /// Drains the machine's outputs after an input and checks every invariant.
    fn after_input(&mut self) -> Result<(), Violation> {
        self.report.steps += 1;
        let (step, at) = (self.report.steps, self.elapsed());
        self.checker.set_step(step, at);
        let mut transmits = Vec::new();
        let mut events = Vec::new();
        {
            let m = self.machine.as_mut().expect("running");
            while let Some(t) = m.poll_transmit() {
                transmits.push(t);
            }
            while let Some(e) = m.poll_event() {
                events.push(e);
            }
        }
        let breaker = self.machine.as_ref().expect("running").breaker_state();
        self.checker.on_events_of_input(&events);
        for t in transmits {
            self.trace("transmit", &(t.id, &t.request));
            self.report.requests += 1;
            self.checker.on_transmit(t.id, &t.request, breaker)?;
            self.send(t.id, t.request)?;
        }
        for e in events {
            self.trace("event", &e);
            {
                let broker = &self.broker;
                self.checker
                    .on_event(&e, |p, o| broker.records(TOPIC, p).get(o as usize))?;
            }
            match e {
                Event::Deliver(d) => self.on_deliver(d)?,
                Event::Revoked(tps) => {
                    for tp in tps {
                        self.paused.remove(&tp.partition);
                    }
                }
                Event::Closing(phase) => {
                    self.close_phases.push(phase);
                    if phase == ClosePhase::FinalCommit
                        && self.mutation == Mutation::LeaveBeforeFinalCommit
                        && self.scenario.is_group()
                    {
                        self.rogue_leave()?;
                    }
                }
                Event::Closed if self.close_phases.last() != Some(&ClosePhase::Closed) => {
                    self.close_phases.push(ClosePhase::Closed);
                }
                _ => {}
            }
        }
        self.checker.end_of_input();
        self.check_state()
    }

    fn send(&mut self, id: RequestId, request: Request) -> Result<(), Violation> {
        let bound = match &request {
            Request::CommitOffset(c) => {
                let offsets = commit_offsets(c);
                self.checker
                    .check_commit_owner(&offsets, c.generation_id, &c.member_id)?;
                self.checker.on_commit_sent(&offsets)?
            }
            Request::LeaveGroup(_) => {
                let uncommitted: Vec<u32> = self.machine.as_ref().map_or(Vec::new(), |m| {
                    m.assigned_partitions()
                        .into_iter()
                        .filter(|&p| {
                            m.settle_watermark(p)
                                .is_some_and(|w| m.committed_offset(p).unwrap_or(0) < w)
                        })
                        .collect()
                });
                self.checker.on_leave_sent(&uncommitted)?;
                BTreeMap::new()
            }
            _ => BTreeMap::new(),
        };
        let elapsed = self.elapsed();
        let mut fate = self.scenario.faults.fate(&mut self.fault_rng, elapsed);
        if !self.scenario.faults.late_arrival {
            // The request reaches the broker before its deadline (its answer may still be late).
            let limit = self
                .scenario
                .config
                .request_timeout
                .saturating_sub(Duration::from_millis(1));
            match &mut fate {
                Fate::Deliver { there, .. } | Fate::LostResponse { there } => {
                    *there = (*there).min(limit);
                }
                _ => {}
            }
        }
        if !matches!(fate, Fate::Deliver { .. }) {
            self.report.faults += 1;
        }
        let flight = Flight {
            request,
            fate,
            bound,
            answer: None,
        };
        match fate {
            Fate::Deliver { there, .. } | Fate::LostResponse { there } => {
                self.schedule(there, Item::Arrive(id))
            }
            Fate::ErrorFrame { after } => self.schedule(after, Item::Answer(id)),
            Fate::LostRequest => {}
        }
        let mut flight = flight;
        if let Fate::ErrorFrame { .. } = fate {
            flight.answer = Some(Err(TransportError::Broker(
                "Error: simulated broker failure".to_owned(),
            )));
        }
        self.flights.insert(id, flight);
        Ok(())
    }

    fn on_deliver(&mut self, d: Message) -> Result<(), Violation> {
        let generation = self.checker.generation(d.tag.partition);
        let decision = self.handler.handle(&d, &mut self.app_rng);
        self.trace("decide", &decision);
        let key = self.next_work;
        self.next_work += 1;
        let ack = decision.action == Action::Ack;
        self.work.insert(
            key,
            Work {
                tag: d.tag,
                generation,
                action: decision.action,
            },
        );
        match self.mutation {
            Mutation::AckBeforeSideEffect if ack => {
                self.schedule(Duration::ZERO, Item::AppDone(key));
                self.schedule(decision.after, Item::SideEffect(key));
            }
            Mutation::CommitAtDelivery => {
                self.schedule(decision.after, Item::AppDone(key));
                self.rogue_commit(d.tag.partition, d.tag.offset + 1)?;
            }
            _ => self.schedule(decision.after, Item::AppDone(key)),
        }
        Ok(())
    }

    /// The mutant driver's commit, sent through the fault layer under an id the machine never
    /// issued; its answer is dropped.
    fn rogue_commit(&mut self, partition: u32, offset: u64) -> Result<(), Violation> {
        let request = CommitOffsetRequest {
            group_id: GROUP.to_owned(),
            member_id: String::new(),
            generation_id: self.scenario.config.manual_generation,
            offsets: [(TopicPartition::new(TOPIC, partition), offset)]
                .into_iter()
                .collect(),
        };
        let id = RequestId(ROGUE_IDS + self.seq);
        self.send(id, request.into())
    }
}

impl<H: Handler> Simulation<H> {
    /// A phantom member joins (or rejoins under its id), straight at the broker.
    fn phantom_join(&mut self, i: usize) {
        let now = self.now;
        let ph = &self.phantoms[i];
        let request = JoinGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: ph.member.clone(),
            session_timeout_ms: u32::try_from(ph.plan.session_timeout.as_millis())
                .unwrap_or(u32::MAX),
            topics: vec![TOPIC.to_owned()],
        };
        self.report.phantom_joins += 1;
        if let Ok(Response::JoinGroup(r)) = self.broker.handle(now, request.into()) {
            if r.error_code == error_code::NONE {
                let ph = &mut self.phantoms[i];
                ph.member = r.member_id.clone();
                ph.generation = r.generation_id;
                let mine = r.assigned_partitions.get(&r.member_id).cloned();
                self.trace("phantom", &("joined", i, r.generation_id, mine));
            }
        }
    }

    /// A phantom member heartbeats; like an eager consumer it rejoins on 22 and 27, and joins
    /// afresh on 25. On 16 (the broker lost the group) it waits for the group to come back.
    fn phantom_beat(&mut self, i: usize) {
        if !self.phantoms[i].alive {
            return;
        }
        let now = self.now;
        let request = ConsumerHeartbeatRequest {
            group_id: GROUP.to_owned(),
            member_id: self.phantoms[i].member.clone(),
            generation_id: self.phantoms[i].generation,
        };
        let code = match self.broker.handle(now, request.into()) {
            Ok(Response::ConsumerHeartbeat(r)) => r.error_code,
            _ => error_code::NONE,
        };
        match code {
            error_code::REBALANCE_IN_PROGRESS | error_code::ILLEGAL_GENERATION => {
                self.phantom_join(i)
            }
            error_code::UNKNOWN_MEMBER => {
                self.phantoms[i].member.clear();
                self.phantom_join(i);
            }
            _ => {}
        }
        let beat = self.phantoms[i].plan.heartbeat_interval();
        self.schedule(beat, Item::PhantomBeat(i));
    }

    /// The mutant driver's LeaveGroup for the consumer's member, sent through the fault layer
    /// under an id the machine never issued.
    fn rogue_leave(&mut self) -> Result<(), Violation> {
        let request = LeaveGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: self.checker.member().to_owned(),
        };
        let id = RequestId(ROGUE_IDS + self.seq);
        self.send(id, request.into())
    }
}

/// Trace lines attached to a failure: `RUSTMQ_SIM_TRACE_LINES` or 60.
fn trace_lines() -> usize {
    std::env::var("RUSTMQ_SIM_TRACE_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// Wake-ups at one simulated instant before the loop calls it a livelock.
const MAX_STEPS_AT_ONE_INSTANT: u64 = 10_000;
/// Inputs one run may take.
const MAX_STEPS: u64 = 300_000;

/// Request ids from here on belong to mutant drivers, not to the machine.
const ROGUE_IDS: u64 = 1 << 62;

fn commit_offsets(c: &CommitOffsetRequest) -> Vec<(u32, u64)> {
    c.offsets
        .iter()
        .filter(|(tp, _)| tp.topic == TOPIC)
        .map(|(tp, o)| (tp.partition, *o))
        .collect()
}

/// Runs `seed`'s scenario with its application model.
pub fn run_seed(seed: u64) -> Result<SimReport, Failure> {
    Simulation::new(Scenario::from_seed(seed)).run()
}

/// Runs `seed` twice and compares the trace hashes; a difference is a [`Failure`] of the
/// `determinism` invariant.
pub fn check_determinism(seed: u64) -> Result<SimReport, Failure> {
    let first = run_seed(seed)?;
    let second = run_seed(seed)?;
    if first != second {
        return Err(Failure {
            seed,
            violation: Violation {
                invariant: names::DETERMINISM,
                step: first.steps.min(second.steps),
                at: first.simulated.min(second.simulated),
                detail: format!("two runs differ: {first:?} vs {second:?}"),
            },
            trace_tail: Vec::new(),
        });
    }
    Ok(first)
}

/// Totals of many runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Seeds run.
    pub runs: u64,
    /// Inputs fed to machines.
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Dead-lettered messages.
    pub dead_lettered: u64,
    /// Discarded messages.
    pub discarded: u64,
    /// Faults injected.
    pub faults: u64,
    /// Broker crashes.
    pub crashes: u64,
    /// Simulated time, summed.
    pub simulated: Duration,
    /// Seeds that ran a group session.
    pub group_runs: u64,
    /// Assignments received in group sessions.
    pub assignments: u64,
    /// JoinGroups of phantom members.
    pub phantom_joins: u64,
    /// Stale acks, nacks and rejects refused.
    pub stale_refused: u64,
    /// Deliveries of messages already processed, in group sessions.
    pub group_duplicates: u64,
}

impl Summary {
    fn merge(&mut self, s: &Summary) {
        self.runs += s.runs;
        self.steps += s.steps;
        self.produced += s.produced;
        self.delivered += s.delivered;
        self.dead_lettered += s.dead_lettered;
        self.discarded += s.discarded;
        self.faults += s.faults;
        self.crashes += s.crashes;
        self.simulated += s.simulated;
        self.group_runs += s.group_runs;
        self.assignments += s.assignments;
        self.phantom_joins += s.phantom_joins;
        self.stale_refused += s.stale_refused;
        self.group_duplicates += s.group_duplicates;
    }

    fn add(&mut self, r: &SimReport) {
        self.group_runs += u64::from(r.group);
        self.assignments += r.assignments;
        self.phantom_joins += r.phantom_joins;
        self.stale_refused += r.stale_refused;
        if r.group {
            self.group_duplicates += r.duplicates;
        }
        self.runs += 1;
        self.steps += r.steps;
        self.produced += r.produced;
        self.delivered += r.delivered;
        self.dead_lettered += r.dead_lettered;
        self.discarded += r.discarded;
        self.faults += r.faults;
        self.crashes += r.crashes;
        self.simulated += r.simulated;
    }
}

/// Runs every seed on `threads` threads; the first failure (lowest seed) wins.
pub fn run_seeds(seeds: &[u64], threads: usize) -> Result<Summary, Failure> {
    let threads = threads.max(1);
    let results: Vec<Result<Summary, Failure>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut sum = Summary::default();
                    for seed in seeds.iter().skip(t).step_by(threads) {
                        let r = run_seed(*seed).map_err(|_| {
                            // Replay the failure keeping its trace for the report.
                            Simulation::new(Scenario::from_seed(*seed))
                                .keep_trace(trace_lines())
                                .run()
                                .expect_err("a failing seed fails again: runs are deterministic")
                        })?;
                        sum.add(&r);
                    }
                    Ok(sum)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut total = Summary::default();
    let mut first: Option<Failure> = None;
    for r in results {
        match r {
            Ok(s) => total.merge(&s),
            Err(f) => {
                if first.as_ref().is_none_or(|g| f.seed < g.seed) {
                    first = Some(f);
                }
            }
        }
    }
    match first {
        Some(f) => Err(f),
        None => Ok(total),
    }
}
