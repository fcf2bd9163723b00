//! `ConsumerBuilder`: the old SDK's way to make a consumer.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::Instrument;

use super::consumer::{Consumer, Shared};
use super::error::ConsumerError;
use super::gate::AckGate;
use super::inbox::Inbox;
use super::notices::Notices;
use super::rebalance::{Hooks, RebalanceListener};
use super::runtime::Runtime;
use super::task::{Command, Driver, DriverChannels, DEFAULT_PROGRESS_TIMEOUT};
use super::transport::Transport;
use crate::config::{ConfigError, ConsumerConfig};
use crate::machine::ConsumerMachine;

/// Capacity of the command channel from the handles to the driver.
const COMMAND_CAPACITY: usize = 256;

/// Builds a [`Consumer`] on runtime `R`.
///
/// ```no_run
/// # use rustmq_consumer_core::{ConsumerBuilder, ConsumerConfig, Runtime, Transport};
/// # async fn run<R: Runtime + Default>(
/// #     config: ConsumerConfig,
/// #     transport: impl Transport,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// let consumer = ConsumerBuilder::<R>::new()
///     .topic("orders")
///     .consumer_group("billing")
///     .config(config)
///     .client(transport)
///     .build()
///     .await?;
/// # Ok(())
/// # }
/// ```
///
/// The topic and the group live in the [`ConsumerConfig`]; `.topic(..)` and
/// `.consumer_group(..)` fill in what the config leaves empty (in any order). Given in both
/// places they must agree, otherwise `build()` fails with [`ConfigError::Conflicting`]; given
/// in neither, with [`ConfigError::MissingTopic`] or [`ConfigError::MissingGroup`].
///
/// The runtime crates (`rustmq-consumer-tokio`, `rustmq-consumer-smol`) alias this type with
/// their runtime, so `ConsumerBuilder::new()` needs no runtime argument there.
pub struct ConsumerBuilder<R> {
    runtime: R,
    topic: Option<String>,
    consumer_group: Option<String>,
    config: ConsumerConfig,
    transport: Option<Arc<dyn Transport>>,
    fail_fast: bool,
    listener: Option<Arc<dyn RebalanceListener>>,
    progress_timeout: Duration,
}

impl<R: fmt::Debug> fmt::Debug for ConsumerBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("runtime", &self.runtime)
            .field("topic", &self.topic)
            .field("consumer_group", &self.consumer_group)
            .field("config", &self.config)
            .field("transport", &self.transport.is_some())
            .field("fail_fast", &self.fail_fast)
            .field("rebalance_listener", &self.listener.is_some())
            .field("progress_timeout", &self.progress_timeout)
            .finish()
    }
}

impl<R: Runtime + Default> ConsumerBuilder<R> {
    /// A builder on the runtime's default handle.
    pub fn new() -> Self {
        Self::with_runtime(R::default())
    }
}

impl<R: Runtime + Default> Default for ConsumerBuilder<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Runtime> ConsumerBuilder<R> {
    /// A builder on `runtime`.
    pub fn with_runtime(runtime: R) -> Self {
        Self {
            runtime,
            topic: None,
            consumer_group: None,
            config: ConsumerConfig::default(),
            transport: None,
            fail_fast: false,
            listener: None,
            progress_timeout: DEFAULT_PROGRESS_TIMEOUT,
        }
    }

    /// The topic to consume (the config's, if it names one, must be the same).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The consumer group (the config's, if it names one, must be the same).
    pub fn consumer_group(mut self, group: impl Into<String>) -> Self {
        self.consumer_group = Some(group.into());
        self
    }

    /// Every other setting; defaults to `ConsumerConfig::default()`.
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// The transport to the broker (the old SDK's name).
    pub fn client(self, transport: impl Transport) -> Self {
        self.transport(transport)
    }

    /// The transport to the broker.
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Fail fast: `build()` waits for the broker's first answer and fails with
    /// [`ConsumerError::Unreachable`] (and the cause) when the broker cannot be reached or
    /// refuses the handshake, within `request_timeout`. Off by default: the consumer then
    /// starts at once and reports an outage through `receive()`.
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.fail_fast = fail_fast;
        self
    }

    /// Hooks that run inside the group protocol around each rebalance: see
    /// [`RebalanceListener`]. A group session's revoke commit then waits for the revoke hook
    /// (within `rebalance_drain_timeout`), and no delivery of newly assigned partitions comes
    /// out before the assign hook returned.
    pub fn rebalance_listener(mut self, listener: impl RebalanceListener) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// How long a partition's settle watermark may stay put, while the broker answers and has
    /// messages past it, before [`Consumer::health_report`] reports
    /// [`HealthIssue::NoProgress`](super::HealthIssue::NoProgress) and
    /// [`Consumer::liveness`] fails. Default 5 minutes (like Kafka's `max.poll.interval.ms`):
    /// longer than the slowest handler is expected to take.
    pub fn progress_timeout(mut self, timeout: Duration) -> Self {
        self.progress_timeout = timeout;
        self
    }

    /// Validates the settings and starts the consumer's driver task (and with
    /// [`fail_fast`](Self::fail_fast), waits for the broker's first answer).
    pub async fn build(self) -> Result<Consumer, ConsumerError> {
        let mut config = self.config;
        merge("topic", self.topic, &mut config.topic)?;
        merge(
            "consumer group",
            self.consumer_group,
            &mut config.consumer_group,
        )?;
        config.validate()?;
        let transport = self.transport.ok_or(ConsumerError::MissingTransport)?;

        let runtime: Arc<dyn Runtime> = Arc::new(self.runtime);
        if config.seed == ConsumerConfig::DEFAULT_SEED {
            config.seed = entropy();
        }
        let consumer_id = config
            .consumer_id
            .clone()
            .unwrap_or_else(|| format!("consumer-{:016x}", entropy()));
        let topic = config.topic.clone();
        let group = config.consumer_group.clone();
        // Inside it, the driver opens a `member` span (member id, generation) per assignment.
        let span = tracing::info_span!(
            "consumer",
            consumer_id = %consumer_id,
            group = %config.consumer_group,
            topic = %topic,
        );
        let max_unacked = config.max_unacked;
        let mut machine = ConsumerMachine::new(config, runtime.now())?;
        if self.listener.is_some() {
            machine.hold_revokes();
        }
        let notices = Notices::new();

        let (commands_tx, commands) = async_channel::bounded(COMMAND_CAPACITY);
        let (dropped_tx, dropped) = async_channel::bounded(max_unacked);
        let (lifeline_tx, lifeline) = async_channel::bounded(1);
        let inbox = Arc::new(Inbox::new(max_unacked));
        let (errors, unread_errors) = async_channel::bounded(1);
        let (first_contact, contacted) = async_channel::bounded(1);
        let (gate, kicked) = AckGate::new(max_unacked);
        let gate = Arc::new(gate);
        let final_state = Arc::new(OnceLock::new());
        let shared = Arc::new(Shared {
            topic,
            group,
            consumer_id,
            commands: commands_tx,
            dropped: dropped_tx,
            gate: Arc::clone(&gate),
            inbox: Arc::clone(&inbox),
            runtime: Arc::clone(&runtime),
            final_state: Arc::clone(&final_state),
            max_unacked,
            events: notices.subscriber(),
        });
        let consumer = Consumer::new(
            Arc::clone(&shared),
            unread_errors.clone(),
            Some(lifeline_tx),
        );
        let hooks = self.listener.map(|listener| {
            let handle = Consumer::new(Arc::clone(&shared), unread_errors.clone(), None);
            Hooks::new(listener, handle)
        });
        let driver = Driver::new(
            machine,
            Arc::clone(&runtime),
            transport,
            DriverChannels {
                commands: Box::pin(commands),
                dropped: Box::pin(dropped),
                lifeline: Box::pin(lifeline),
                kicked: Box::pin(kicked),
                gate,
                inbox,
                final_state,
                errors,
                unread_errors,
                first_contact: self.fail_fast.then_some(first_contact),
                notices,
                hooks,
            },
        );
        let driver = driver.progress_timeout(self.progress_timeout);
        runtime.spawn(Box::pin(driver.run().instrument(span)));
        if self.fail_fast {
            // The driver answers within `request_timeout` (a deadline is an outage too).
            let contact = contacted
                .recv()
                .await
                .unwrap_or_else(|_| Err(ConsumerError::closed()));
            if let Err(error) = contact {
                // Stop without a close: there is nothing to commit and no broker to leave.
                let _ = shared.commands.send(Command::Abandon).await;
                return Err(error);
            }
        }
        Ok(consumer)
    }
}

/// 64 bits from the operating system's entropy: std's `RandomState` keys are drawn from it
/// once per thread and bumped for every new state, so each call gives a fresh, unpredictable
/// value (a SipHash of nothing under fresh keys).
fn entropy() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Fills the config's `field` from the builder's value; both given and different is an error.
fn merge(
    field: &'static str,
    from_builder: Option<String>,
    in_config: &mut String,
) -> Result<(), ConfigError> {
    match from_builder {
        Some(value) if in_config.is_empty() => *in_config = value,
        Some(value) if value != *in_config => return Err(ConfigError::Conflicting(field)),
        _ => {}
    }
    Ok(())
}
