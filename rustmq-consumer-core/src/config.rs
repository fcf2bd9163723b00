//! Consumer configuration, its defaults and its validation.

use std::time::Duration;

use thiserror::Error;

/// Where a partition starts when the group has no committed offset for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// The first offset the broker holds (offset 0 on RustMQ).
    #[default]
    Earliest,
    /// The partition's high watermark when the consumer starts: only new messages.
    Latest,
    /// An explicit offset.
    Offset(u64),
}

/// Everything a consumer can be tuned with. Names follow the old RustMQ SDK where it had one.
///
/// Build it with `ConsumerConfig::new(topic, group)` and adjust fields, or with struct update
/// syntax as the old SDK's documentation did:
///
/// ```
/// use rustmq_consumer_core::ConsumerConfig;
///
/// let config = ConsumerConfig {
///     fetch_size: 500,
///     dead_letter_queue: Some("orders.dead".to_owned()),
///     ..Default::default()
/// };
/// assert_eq!(config.cache_entries(), 5_000);
/// ```
///
/// The default has no topic and no group: give them here or with the builder's `topic(..)` and
/// `consumer_group(..)` (`build()` refuses a consumer without them, and refuses two different
/// values for either). `validate()` rejects nonsense before the state machine ever sees it.
///
/// A duration too long for an `Instant` (`Duration::MAX`) is valid and means never: every
/// deadline derived from one is cut to a century from now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// The subscribed topic (required: here or with the builder's `topic(..)`), at most 249
    /// bytes (`MAX_NAME_LEN`).
    pub topic: String,
    /// The consumer group whose offsets this consumer commits (required: here or with the
    /// builder's `consumer_group(..)`), at most 249 bytes (`MAX_NAME_LEN`).
    pub consumer_group: String,
    /// An id for logs (`None`: the driver draws a unique one from the operating system's
    /// entropy; a bare state machine has none).
    pub consumer_id: Option<String>,
    /// Empty (the default): join `consumer_group` and consume what its coordinator assigns.
    /// Non-empty: consume exactly these partitions of `topic`, with no group session.
    /// Commits still go to `consumer_group`. The broker stores them only for a group that
    /// exists, under its current generation, and only a JoinGroup creates a group or reveals
    /// its generation: before its first commit (and when a commit answers 16 or 22) the
    /// consumer joins the group once to learn the generation and leaves at once, so it never
    /// holds a slot in the group's assignment. Give a manual assignment a group of its own:
    /// each join and leave makes the members of a shared group rebalance, and their joins
    /// move the generation under its commits (a refused commit is reported, and learning
    /// again waits for a backoff).
    pub partitions: Vec<u32>,
    /// Group session timeout: the broker evicts a member silent for longer.
    pub session_timeout: Duration,
    /// Time between heartbeats (`None`: a third of `session_timeout`).
    pub heartbeat_interval: Option<Duration>,
    /// Rebalance: longest wait for outstanding deliveries of revoked partitions (a member
    /// already fenced, 22, waits `ack_batch_timeout` at most unless a revoke hook holds it).
    pub rebalance_drain_timeout: Duration,
    /// Where to start where no offset was committed.
    pub start_position: StartPosition,
    /// Most fetched messages buffered ahead of the application (beside the `max_unacked` it
    /// holds), all partitions together.
    ///
    /// The default, 10,000, is large enough to fetch ahead: the next fetch of a partition goes
    /// out as soon as the previous answer is in the buffer, while earlier records are still
    /// delivered, and a full fetch (`fetch_max_bytes` of small records: about 2,900 at the
    /// real broker's 350-byte record overhead) still finds room, for a second one too: once
    /// the answers taught the consumer what a record costs, a partition keeps a second fetch in
    /// flight, from a little before where the first will end, whenever the buffer has room
    /// for both and no other partition is fetching. For records of more than a
    /// few hundred bytes `prefetch_bytes` binds first, so the buffer's memory stays bounded
    /// by that budget, not by this count. Until a partition's first fetch answers, it may
    /// reserve only its share (`fetch_size` over the assigned partitions), so with many
    /// partitions every first fetch goes out at once.
    pub fetch_size: usize,
    /// Most one fetch asks for (`max_bytes` on the wire, in the broker's unit, which is not
    /// wire bytes: the real broker charges each record about 350 bytes plus its payload).
    /// Each fetch asks for what the buffer has room for, at the cost per record the consumer
    /// learns from the broker's answers (records returned for the bytes asked).
    pub fetch_max_bytes: u32,
    /// Byte budget (wire bytes) of fetched messages buffered ahead of the application. A
    /// record larger than the room left waits for room; when room comes, it is taken even if
    /// other partitions' answers arrived first, so the budget can be passed by one record.
    pub prefetch_bytes: usize,
    /// `timeout_ms` sent with fetches (the broker ignores it).
    pub fetch_timeout: Duration,
    /// Smallest pause after an empty fetch (the broker has no long-poll).
    pub empty_fetch_backoff_min: Duration,
    /// Largest pause after repeated empty fetches.
    pub empty_fetch_backoff_max: Duration,
    /// Deliveries outstanding with the application (delivered, not yet settled); at most
    /// `ConsumerConfig::MAX_UNACKED`, 1,048,576 (the driver sizes its queues by it).
    pub max_unacked: usize,
    /// Cap on a partition's unsettled span: next fetch offset minus the settle watermark.
    pub max_unsettled_per_partition: u64,
    /// Commit automatically (by batch size and timeout); when false only on demand and on close.
    pub enable_auto_commit: bool,
    /// Settlements that trigger a commit (no sooner than `ack_batch_min_interval` after the
    /// previous one).
    pub ack_batch_size: usize,
    /// Longest time a settlement waits for its commit (the old SDK's `auto_commit_interval`).
    pub ack_batch_timeout: Duration,
    /// Shortest time between the previous commit and one that `ack_batch_size` triggers: at
    /// full speed commits are bounded by time (at most about 1 / this per second), not by
    /// message count, while a slow stream still commits within `ack_batch_timeout`. A crash
    /// redelivers up to about this much more work than with count-only batching. Zero: every
    /// `ack_batch_size` settlements commit.
    pub ack_batch_min_interval: Duration,
    /// Retries before a message is poison (a message is delivered at most this plus one times).
    pub max_retry_attempts: u32,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`, with full jitter.
    pub retry_backoff_base: Duration,
    /// Cap on the retry delay.
    pub retry_backoff_max: Duration,
    /// Dead-letter topic (at most 249 bytes); `None` discards poison messages with an explicit
    /// event.
    pub dead_letter_queue: Option<String>,
    /// Partition of the dead-letter topic.
    pub dead_letter_partition: u32,
    /// Message cache capacity in entries (`None`: `fetch_size * 10`).
    pub cache_max_entries: Option<usize>,
    /// Message cache capacity in bytes.
    pub cache_max_bytes: usize,
    /// Time a cached message stays valid (from when it was handed back for a retry or a
    /// dead letter).
    pub cache_ttl: Duration,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// Consecutive broker or transport failures that open the circuit.
    pub failure_threshold: u32,
    /// Longest time the circuit stays open before probing. An outage's first open interval is
    /// one second (or this, if shorter); each later one is a quarter of the outage's age so
    /// far, up to this: a broker back after a few seconds costs about a second, a long outage
    /// is probed once per `recovery_timeout`.
    pub recovery_timeout: Duration,
    /// Probe requests allowed (and successes needed) while half-open.
    pub half_open_max_probes: u32,
    /// Longest time half-open without a decision before the circuit opens again.
    pub half_open_max_wait: Duration,
    /// Close: longest wait for outstanding deliveries to settle, and for each flush phase.
    pub drain_timeout: Duration,
    /// Seed of the jitter PRNG (deterministic simulation replays it). Left at
    /// [`ConsumerConfig::DEFAULT_SEED`], the driver (`ConsumerBuilder::build`) replaces it with
    /// a seed from the operating system's entropy, so two consumers never retry in lockstep;
    /// any other value is used as given.
    pub seed: u64,
}

impl ConsumerConfig {
    /// The seed the default sets: the driver draws a fresh one from OS entropy in its place.
    pub const DEFAULT_SEED: u64 = 0x5eed_0f2b_17c0_de00;

    /// The longest topic, group or dead-letter topic name, in bytes (Kafka's topic-name limit):
    /// requests name the group and the topic together (a commit also the member), and the
    /// broker reads a request with one read that, over a network, gets its first packet only,
    /// so a request about one partition must fit one packet
    /// ([`PACKET_REQUEST_FRAME`](crate::protocol::PACKET_REQUEST_FRAME)) whatever the names.
    pub const MAX_NAME_LEN: usize = 249;

    /// The largest `max_unacked` (2^20): the driver allocates its queue of dropped deliveries
    /// and its ack queue for that many up front (about 56 bytes each at this bound).
    pub const MAX_UNACKED: usize = 1 << 20;
}

impl Default for ConsumerConfig {
    /// Every default, with no topic and no group (see the type's documentation).
    fn default() -> Self {
        Self {
            topic: String::new(),
            consumer_group: String::new(),
            consumer_id: None,
            partitions: Vec::new(),
            session_timeout: Duration::from_secs(30),
            heartbeat_interval: None,
            rebalance_drain_timeout: Duration::from_secs(5),
            start_position: StartPosition::Earliest,
            fetch_size: 10_000,
            fetch_max_bytes: 1024 * 1024,
            prefetch_bytes: 16 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(1),
            empty_fetch_backoff_min: Duration::from_millis(10),
            empty_fetch_backoff_max: Duration::from_secs(1),
            max_unacked: 1000,
            max_unsettled_per_partition: 10_000,
            enable_auto_commit: true,
            ack_batch_size: 100,
            ack_batch_timeout: Duration::from_millis(100),
            ack_batch_min_interval: Duration::from_millis(100),
            max_retry_attempts: 3,
            retry_backoff_base: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(30),
            dead_letter_queue: None,
            dead_letter_partition: 0,
            cache_max_entries: None,
            cache_max_bytes: 64 * 1024 * 1024,
            cache_ttl: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(60),
            half_open_max_probes: 3,
            half_open_max_wait: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            seed: Self::DEFAULT_SEED,
        }
    }
}

impl ConsumerConfig {
    /// A configuration with every default, for `topic` in `consumer_group`.
    pub fn new(topic: impl Into<String>, consumer_group: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            consumer_group: consumer_group.into(),
            ..Self::default()
        }
    }

    /// True when partitions come from a group session (no manual assignment).
    pub fn uses_group_session(&self) -> bool {
        self.partitions.is_empty()
    }

    /// The effective heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(self.session_timeout / 3)
    }

    /// The effective cache capacity in entries.
    pub fn cache_entries(&self) -> usize {
        self.cache_max_entries
            .unwrap_or_else(|| self.fetch_size.saturating_mul(10))
    }

    /// Rejects configurations the consumer cannot honour.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use ConfigError::*;
        let nonzero = |name: &'static str, ok: bool| if ok { Ok(()) } else { Err(Zero(name)) };
        if self.topic.is_empty() {
            return Err(MissingTopic);
        }
        if self.consumer_group.is_empty() {
            return Err(MissingGroup);
        }
        let mut sorted = self.partitions.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(DuplicatePartition(w[0]));
        }
        if self.dead_letter_queue.as_deref() == Some(self.topic.as_str()) {
            return Err(DeadLetterIsSource);
        }
        if self.dead_letter_queue.as_deref() == Some("") {
            return Err(EmptyDeadLetterTopic);
        }
        let long = |name: &'static str, value: &str| {
            if value.len() > Self::MAX_NAME_LEN {
                Err(TooLarge(name))
            } else {
                Ok(())
            }
        };
        long("topic", &self.topic)?;
        long("consumer_group", &self.consumer_group)?;
        long(
            "dead_letter_queue",
            self.dead_letter_queue.as_deref().unwrap_or_default(),
        )?;
        nonzero("fetch_size", self.fetch_size > 0)?;
        nonzero("fetch_max_bytes", self.fetch_max_bytes > 0)?;
        nonzero("prefetch_bytes", self.prefetch_bytes > 0)?;
        nonzero("max_unacked", self.max_unacked > 0)?;
        if self.max_unacked > Self::MAX_UNACKED {
            return Err(TooLarge("max_unacked"));
        }
        nonzero(
            "max_unsettled_per_partition",
            self.max_unsettled_per_partition > 0,
        )?;
        nonzero("ack_batch_size", self.ack_batch_size > 0)?;
        nonzero("ack_batch_timeout", !self.ack_batch_timeout.is_zero())?;
        nonzero("retry_backoff_base", !self.retry_backoff_base.is_zero())?;
        nonzero("cache_max_entries", self.cache_entries() > 0)?;
        nonzero("cache_max_bytes", self.cache_max_bytes > 0)?;
        nonzero("cache_ttl", !self.cache_ttl.is_zero())?;
        nonzero("request_timeout", !self.request_timeout.is_zero())?;
        nonzero("failure_threshold", self.failure_threshold > 0)?;
        nonzero("recovery_timeout", !self.recovery_timeout.is_zero())?;
        nonzero("half_open_max_probes", self.half_open_max_probes > 0)?;
        nonzero("half_open_max_wait", !self.half_open_max_wait.is_zero())?;
        nonzero("drain_timeout", !self.drain_timeout.is_zero())?;
        nonzero("session_timeout", !self.session_timeout.is_zero())?;
        nonzero(
            "heartbeat_interval",
            self.heartbeat_interval.is_none_or(|h| !h.is_zero()),
        )?;
        if u32::try_from(self.session_timeout.as_millis()).is_err() {
            return Err(TooLarge("session_timeout"));
        }
        if self.heartbeat() >= self.session_timeout {
            return Err(Inverted("heartbeat_interval", "session_timeout"));
        }
        nonzero(
            "empty_fetch_backoff_min",
            !self.empty_fetch_backoff_min.is_zero(),
        )?;
        if self.retry_backoff_max < self.retry_backoff_base {
            return Err(Inverted("retry_backoff_base", "retry_backoff_max"));
        }
        if self.empty_fetch_backoff_max < self.empty_fetch_backoff_min {
            return Err(Inverted(
                "empty_fetch_backoff_min",
                "empty_fetch_backoff_max",
            ));
        }
        Ok(())
    }
}

impl ConsumerConfig {
    /// The settings an update cannot change while the consumer runs (see
    /// [`ConsumerConfig::check_update`]), and why:
    ///
    /// - `topic`, `consumer_group`, `partitions`, `consumer_id`: who the consumer is. The
    ///   assignment, the group membership and every commit are keyed by them.
    /// - `start_position`: where partitions without a commit started; one consumer's
    ///   partitions all start by one rule.
    /// - `seed`: the retry jitter's generator was seeded from it at the start (a simulated run
    ///   replays from it).
    /// - `max_unacked`: it sized the driver's bounded channels (the delivery inbox, the ack
    ///   gate, dropped deliveries) and the processing scheduler's limits at `build()`.
    /// - `session_timeout`, `heartbeat_interval`: the session timeout went to the group
    ///   coordinator with the JoinGroup, which holds the member to it; heartbeats must stay
    ///   under it.
    /// - `dead_letter_queue`, `dead_letter_partition`: dead letters already queued or in
    ///   flight are bound for the topic they were queued for, and switching the dead-letter
    ///   path on or off would change what a poison message owes half way through.
    ///
    /// Everything else can change live: retries (`max_retry_attempts`,
    /// `retry_backoff_base`, `retry_backoff_max`), commits (`enable_auto_commit`,
    /// `ack_batch_size`, `ack_batch_timeout`, `ack_batch_min_interval`), the circuit breaker
    /// (`failure_threshold`, `recovery_timeout`, `half_open_max_probes`,
    /// `half_open_max_wait`), fetching (`fetch_size`, `fetch_max_bytes`, `prefetch_bytes`,
    /// `max_unsettled_per_partition`, `fetch_timeout`, `empty_fetch_backoff_min`,
    /// `empty_fetch_backoff_max`), the cache (`cache_max_entries`, `cache_max_bytes`,
    /// `cache_ttl`) and the timeouts (`request_timeout`, `drain_timeout`,
    /// `rebalance_drain_timeout`).
    pub const FIXED_SETTINGS: &'static [&'static str] = &[
        "topic",
        "consumer_group",
        "partitions",
        "consumer_id",
        "start_position",
        "seed",
        "max_unacked",
        "session_timeout",
        "heartbeat_interval",
        "dead_letter_queue",
        "dead_letter_partition",
    ];

    /// Checks that `next` may replace this configuration while the consumer runs: it changes
    /// none of the [`FIXED_SETTINGS`](Self::FIXED_SETTINGS) (the first one it changes is
    /// named), and it passes [`validate`](Self::validate) as `build()` requires.
    pub fn check_update(&self, next: &ConsumerConfig) -> Result<(), ConfigUpdateError> {
        let same = [
            self.topic == next.topic,
            self.consumer_group == next.consumer_group,
            self.partitions == next.partitions,
            self.consumer_id == next.consumer_id,
            self.start_position == next.start_position,
            self.seed == next.seed,
            self.max_unacked == next.max_unacked,
            self.session_timeout == next.session_timeout,
            self.heartbeat_interval == next.heartbeat_interval,
            self.dead_letter_queue == next.dead_letter_queue,
            self.dead_letter_partition == next.dead_letter_partition,
        ];
        if let Some(i) = same.iter().position(|same| !same) {
            return Err(ConfigUpdateError::Fixed(Self::FIXED_SETTINGS[i]));
        }
        next.validate()?;
        Ok(())
    }
}

/// Why a configuration update was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigUpdateError {
    /// The update changes a setting that is fixed while the consumer runs (one of
    /// [`ConsumerConfig::FIXED_SETTINGS`], where each one's reason is given).
    #[error("{0} cannot change while the consumer runs")]
    Fixed(&'static str),
    /// The updated configuration fails validation, as `build()` would refuse it.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] ConfigError),
    /// The consumer is closing or closed.
    #[error("consumer is closed")]
    Closed,
}

/// Why a configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No topic: neither the config nor the builder's `topic(..)` gave one.
    #[error("no topic given")]
    MissingTopic,
    /// No group: neither the config nor the builder's `consumer_group(..)` gave one.
    #[error("no consumer group given")]
    MissingGroup,
    /// The builder and the config name different values for the same setting.
    #[error("{0} given twice with different values")]
    Conflicting(&'static str),
    /// A partition listed twice.
    #[error("partition {0} is listed twice")]
    DuplicatePartition(u32),
    /// Dead letters would loop back into the source.
    #[error("dead-letter topic is the consumed topic")]
    DeadLetterIsSource,
    /// An empty dead-letter topic name.
    #[error("dead-letter topic is empty")]
    EmptyDeadLetterTopic,
    /// A size, count or duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A duration the wire cannot carry, a name longer than
    /// [`ConsumerConfig::MAX_NAME_LEN`], or a bound above its documented maximum.
    #[error("{0} is too large")]
    TooLarge(&'static str),
    /// A lower bound above its upper bound.
    #[error("{0} exceeds {1}")]
    Inverted(&'static str, &'static str),
}
