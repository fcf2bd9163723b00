//! The application's handles: `Consumer`, `Delivery` and the delivery stream.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_channel::{Receiver, Sender};
use bytes::Bytes;
use event_listener::EventListener;
use futures_lite::{future, Stream};

use async_broadcast::InactiveReceiver;

use super::error::ConsumerError;
use super::gate::AckGate;
use super::health::{HealthReport, Probe};
use super::inbox::{Inbox, Take};
use super::notices::{self, EventStream};
use super::runtime::{sleep, Runtime};
use super::task::{Command, ConfigEdit, FinalState, Reply, Stamped};
use crate::config::{ConfigUpdateError, ConsumerConfig};
use crate::error::UsageError;
use crate::event::{self, DeliveryTag, Event, Health, Metrics, PartitionLag};
use crate::protocol::Record;

/// Times `receive` (and the stream) yield to the runtime, looking again, when no delivery is
/// waiting, before they wait for one. The acks just queued wake the driver (see `gate`),
/// which on the same worker runs in between and hands over the next deliveries: cheaper than
/// parking and being woken through the inbox's listener, and a few microseconds of looking
/// when the application runs on a thread of its own (`block_on`).
const YIELDS_BEFORE_WAIT: u32 = 32;

/// A delivery dropped unsettled: its tag, and its record unless a cancelled settling command
/// took it.
pub(crate) type Dropped = (DeliveryTag, Option<Box<Record>>);

/// State shared by a consumer's handles and its deliveries.
pub(crate) struct Shared {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) consumer_id: String,
    pub(crate) commands: Sender<Command>,
    /// Deliveries dropped unsettled, with their records for the redelivery (boxed: the
    /// channel's room for `max_unacked` of them is allocated up front, and a drop is the
    /// rare path).
    pub(crate) dropped: Sender<Dropped>,
    pub(crate) gate: Arc<AckGate>,
    /// Deliveries waiting for the application.
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) final_state: Arc<OnceLock<FinalState>>,
    /// The config's `max_unacked`: deliveries outstanding at most (fixed while running).
    pub(crate) max_unacked: usize,
    /// Opens event streams ([`Consumer::events`]).
    pub(crate) events: InactiveReceiver<Event>,
}

impl Shared {
    /// Sends a command and waits for its reply; `None` once the driver has exited.
    async fn request<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (reply, answer) = async_channel::bounded(1);
        self.commands.send(command(reply)).await.ok()?;
        answer.recv().await.ok()
    }

    async fn settle(
        &self,
        command: impl FnOnce(Reply<Result<(), UsageError>>) -> Command,
    ) -> Result<(), ConsumerError> {
        match self.request(command).await {
            Some(result) => result.map_err(ConsumerError::Usage),
            None => Err(ConsumerError::closed()),
        }
    }
}

/// A running consumer: receive deliveries, settle them, steer and observe the consumer.
///
/// One driver task per consumer (spawned by `ConsumerBuilder::build`) owns the state machine;
/// every method here sends it a command over a bounded channel (an ack the driver is certain
/// to accept skips the reply: see [`Delivery::ack`]). Handles are cheap to clone and share one
/// consumer. When every handle is dropped the consumer closes gracefully.
#[derive(Clone)]
pub struct Consumer {
    shared: Arc<Shared>,
    errors: Receiver<ConsumerError>,
    /// Dropped with the last handle that has one: the consumer then closes. The handle a
    /// rebalance hook gets has none.
    _lifeline: Option<Sender<()>>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("consumer_id", &self.shared.consumer_id)
            .field("topic", &self.shared.topic)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        errors: Receiver<ConsumerError>,
        lifeline: Option<Sender<()>>,
    ) -> Self {
        Self {
            shared,
            errors,
            _lifeline: lifeline,
        }
    }

    /// The next delivery (never one of a paused partition); `None` once the consumer is
    /// closed.
    ///
    /// An error is not fatal: [`ConsumerError::Unreachable`] says the broker cannot be reached
    /// (or refused the handshake) and why, once per outage; the consumer keeps trying and the
    /// next call waits for deliveries again. [`ConsumerError::is_permanent`] tells a broker
    /// certificate that will never be accepted. [`ConsumerError::Stalled`] says a partition
    /// stopped making progress (once per stall) while the others go on.
    pub async fn receive(&self) -> Result<Option<Delivery>, ConsumerError> {
        // The common case, without building the futures of `next_stamped`: no error, and a
        // delivery waiting.
        if self.errors.is_empty() {
            if let Some(stamped) = self.shared.inbox.try_pop() {
                return Ok(Some(Delivery::new(stamped, Arc::clone(&self.shared))));
            }
        }
        let stamped = self.next_stamped().await?;
        Ok(stamped.map(|stamped| Delivery::new(stamped, Arc::clone(&self.shared))))
    }

    /// What `receive` returns now, if anything: an error first, then a delivery or the end.
    fn look(&self) -> Option<Result<Option<Stamped>, ConsumerError>> {
        // Without building the futures of a wait when an error or a delivery is waiting.
        if !self.errors.is_empty() {
            if let Ok(error) = self.errors.try_recv() {
                return Some(Err(error));
            }
        }
        match self.shared.inbox.try_take() {
            Take::Delivery(stamped) => Some(Ok(Some(stamped))),
            Take::Closed => Some(Ok(None)),
            Take::Empty => None,
        }
    }

    /// The next delivery (`None` once closed), or the next error for the application first.
    async fn next_stamped(&self) -> Result<Option<Stamped>, ConsumerError> {
        if let Some(found) = self.look() {
            return found;
        }
        self.shared.gate.kick_if_pending();
        for _ in 0..YIELDS_BEFORE_WAIT {
            future::yield_now().await;
            if let Some(found) = self.look() {
                return found;
            }
        }
        let error = async {
            match self.errors.recv().await {
                Ok(error) => Err(error),
                // The driver has exited: only the deliveries' end is left to report.
                Err(_) => future::pending().await,
            }
        };
        future::or(error, async { Ok(self.shared.inbox.take().await) }).await
    }

    /// Waits for the next delivery, then takes every other one already waiting, up to `max`
    /// in all; empty once the consumer is closed (or when `max` is 0).
    ///
    /// The batch form of [`Consumer::receive`]; settle the batch with
    /// [`Consumer::ack_all`] or one delivery at a time.
    pub async fn receive_many(&self, max: usize) -> Result<Vec<Delivery>, ConsumerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let Some(first) = self.next_stamped().await? else {
            return Ok(Vec::new());
        };
        let mut taken = vec![first];
        self.shared.inbox.take_many(max - 1, &mut taken);
        Ok(taken
            .into_iter()
            .map(|stamped| Delivery::new(stamped, Arc::clone(&self.shared)))
            .collect())
    }

    /// Acks every delivery of `deliveries` as one batch: acks the consumer is certain to
    /// accept are queued together without waiting for the driver; the others (stale
    /// deliveries, deliveries of another consumer, any ack after close) are then sent one by
    /// one, in order, and answered as [`Delivery::ack`] would.
    ///
    /// Every delivery is settled or refused; the result is the first refusal, if any.
    pub async fn ack_all(
        &self,
        deliveries: impl IntoIterator<Item = Delivery>,
    ) -> Result<(), ConsumerError> {
        // Collected in place when given a `Vec` (as `receive_many` returns).
        let mut deliveries: Vec<Delivery> = deliveries.into_iter().collect();
        let ours = deliveries
            .iter_mut()
            .filter(|delivery| Arc::ptr_eq(&delivery.shared, &self.shared))
            .map(|delivery| {
                (
                    delivery.inner.tag,
                    delivery.generation,
                    &mut delivery.settled,
                )
            });
        self.shared.gate.try_ack_each(ours);
        // The queued ones are dropped here, outside the gate's lock, without moving.
        deliveries.retain(|delivery| !delivery.settled);
        let mut first_error = None;
        for delivery in deliveries {
            if let Err(error) = delivery.ack().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The deliveries as a stream, ending when the consumer is closed. Errors are the ones
    /// [`Consumer::receive`] returns: not fatal, the stream goes on after them.
    pub fn stream(&self) -> DeliveryStream {
        DeliveryStream {
            errors: Box::pin(self.errors.clone()),
            shared: Arc::clone(&self.shared),
            yields: 0,
            listener: None,
        }
    }

    /// What the consumer decides from now on, as a bounded stream: assignments and
    /// revocations, commits (with offsets) and their failures (with the cause), dead letters,
    /// discards, stalls, breaker changes, close phases; every [`Event`] but deliveries. A
    /// reader that falls more than [`EVENTS_CAPACITY`](super::EVENTS_CAPACITY) events behind
    /// never slows the consumer: it loses the oldest, and the next
    /// [`EventNotice::missed`](super::EventNotice::missed) says how many. Each call opens an
    /// independent stream; it ends after [`Event::Closed`].
    pub fn events(&self) -> EventStream {
        notices::subscribe(&self.shared.events)
    }

    /// Commits every settled offset now and waits for the broker to store it. Fails with
    /// [`ConsumerError::Uncommitted`], naming the offsets the broker has not stored, when the
    /// commit is not confirmed (the consumer keeps committing them).
    pub async fn commit(&self) -> Result<(), ConsumerError> {
        self.shared
            .request(Command::Commit)
            .await
            .unwrap_or_else(|| Err(ConsumerError::closed()))
    }

    /// Lag of every assigned partition, keyed by partition: its high watermark minus its
    /// committed offset (the last known values once closed). The old SDK's signature; see
    /// [`Consumer::lag_details`] for positions and the age of the oldest unsettled message.
    pub async fn get_lag(&self) -> Result<HashMap<u32, u64>, ConsumerError> {
        let details = self.lag_details().await;
        Ok(details.into_iter().map(|p| (p.partition, p.lag)).collect())
    }

    /// Lag of every assigned partition in detail (the last known values once closed).
    pub async fn lag_details(&self) -> Vec<PartitionLag> {
        match self.shared.request(Command::Lag).await {
            Some(lag) => lag,
            None => self.final_state().map(|s| s.lag).unwrap_or_default(),
        }
    }

    /// Partitions of the topic this consumer reads (none once closed).
    pub async fn assigned_partitions(&self) -> Vec<u32> {
        self.shared
            .request(Command::Assigned)
            .await
            .unwrap_or_default()
    }

    /// Stops fetching and delivering these partitions until resumed (a `Vec`, an array or a
    /// slice). Takes effect at once: from the return on, `receive()`, `receive_many()` and the
    /// stream yield nothing of them; what was already fetched or queued for the application is
    /// kept and delivered after [`Consumer::resume_partitions`], in order.
    ///
    /// An unknown partition refuses the whole call ([`UsageError::UnknownPartition`]). Held
    /// deliveries stay outstanding: a rebalance waits for them up to `rebalance_drain_timeout`,
    /// then drops them with the partition (its next owner reads them from the last commit).
    pub async fn pause_partitions(
        &self,
        partitions: impl AsRef<[u32]>,
    ) -> Result<(), ConsumerError> {
        let partitions = partitions.as_ref().to_vec();
        self.shared
            .settle(|reply| Command::Pause(partitions, reply))
            .await
    }

    /// Resumes paused partitions (a `Vec`, an array or a slice): what they held is delivered
    /// first, in order.
    pub async fn resume_partitions(
        &self,
        partitions: impl AsRef<[u32]>,
    ) -> Result<(), ConsumerError> {
        let partitions = partitions.as_ref().to_vec();
        self.shared
            .settle(|reply| Command::Resume(partitions, reply))
            .await
    }

    /// Moves a partition's position; outstanding deliveries of it become stale.
    pub async fn seek(&self, partition: u32, offset: u64) -> Result<(), ConsumerError> {
        self.shared
            .settle(|reply| Command::Seek(partition, offset, reply))
            .await
    }

    /// The configuration in force (`None` once the consumer has closed).
    pub async fn config(&self) -> Option<ConsumerConfig> {
        self.shared.request(Command::Config).await
    }

    /// Changes settings while the consumer runs: `edit` gets the configuration in force and
    /// changes what it wants; the driver applies it as one command between two inputs
    /// ([`ConsumerMachine::update_config`](crate::ConsumerMachine::update_config) says when
    /// each setting takes effect). Returns the configuration now in force.
    ///
    /// `edit` runs on the driver task, between two inputs: keep it short. If it panics, the
    /// panic resumes here, in the caller, and the consumer goes on unchanged.
    ///
    /// Refused with [`ConsumerError::ConfigUpdate`], and nothing changes, when the edit
    /// changes a setting fixed while running ([`ConsumerConfig::FIXED_SETTINGS`]: topic,
    /// group, partitions, consumer id, start position, seed, `max_unacked`, the session and
    /// heartbeat, the dead-letter topic and partition), when the result fails validation as
    /// `build()` would refuse it, or once the consumer is closing.
    ///
    /// ```no_run
    /// # async fn run(consumer: rustmq_consumer_core::Consumer) -> Result<(), rustmq_consumer_core::ConsumerError> {
    /// use std::time::Duration;
    ///
    /// let config = consumer
    ///     .update_config(|c| {
    ///         c.max_retry_attempts = 1;
    ///         c.ack_batch_size = 500;
    ///         c.recovery_timeout = Duration::from_secs(10);
    ///     })
    ///     .await?;
    /// assert_eq!(config.ack_batch_size, 500);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_config(
        &self,
        edit: impl FnOnce(&mut ConsumerConfig) + Send + 'static,
    ) -> Result<ConsumerConfig, ConsumerError> {
        let edit = ConfigEdit(Box::new(edit));
        match self
            .shared
            .request(|reply| Command::UpdateConfig(edit, reply))
            .await
        {
            Some(Ok(result)) => result.map_err(ConsumerError::ConfigUpdate),
            // The edit panicked on the driver task: the panic is the caller's.
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Err(ConsumerError::ConfigUpdate(ConfigUpdateError::Closed)),
        }
    }

    /// A snapshot of the consumer's counters (the final one once closed).
    pub async fn metrics(&self) -> Metrics {
        match self.shared.request(Command::Metrics).await {
            Some(metrics) => metrics,
            None => self.final_state().map(|s| s.metrics).unwrap_or_default(),
        }
    }

    /// How the consumer is doing: the circuit breaker and progress, and `Unhealthy` while the
    /// broker is unreachable. [`Consumer::health_report`] says why.
    pub async fn health(&self) -> Health {
        self.health_report().await.health
    }

    /// How the consumer is doing and why: the outage in progress, if any
    /// ([`ConsumerError::Unreachable`] with its cause), else a stalled partition; and every
    /// issue with when it began ([`HealthReport::issues`]: no answer from the broker yet, an
    /// outage, the circuit breaker not closed, a partition stalled, a partition without
    /// progress for longer than [`ConsumerBuilder::progress_timeout`](super::ConsumerBuilder::progress_timeout)).
    pub async fn health_report(&self) -> HealthReport {
        self.shared
            .request(Command::Health)
            .await
            .unwrap_or_else(HealthReport::stopped)
    }

    /// The readiness probe for a health endpoint: passes when [`Consumer::health_report`]
    /// finds no issue (see [`HealthReport::readiness`]).
    pub async fn readiness(&self) -> Probe {
        self.health_report().await.readiness()
    }

    /// The liveness probe for a health endpoint: fails only when a restart is the remedy, a
    /// partition without progress or a stopped consumer (see [`HealthReport::liveness`]).
    pub async fn liveness(&self) -> Probe {
        self.health_report().await.liveness()
    }

    /// Closes gracefully: stop fetching, drain, flush acks and dead letters, final commit,
    /// leave the group. Every ack made before the call is committed, or the close fails with
    /// [`ConsumerError::Uncommitted`] naming the offsets the broker did not store. Idempotent.
    pub async fn close(&self) -> Result<(), ConsumerError> {
        self.shared.request(Command::Close).await.unwrap_or(Ok(()))
    }

    /// Like [`Consumer::close`], but stops the consumer without finishing the close if it takes
    /// longer than `limit` on the runtime's clock ([`ConsumerError::CloseTimedOut`], naming the
    /// offsets the broker did not store).
    pub async fn close_with_timeout(&self, limit: Duration) -> Result<(), ConsumerError> {
        let expiry = sleep(&*self.shared.runtime, limit);
        let close = self.close();
        futures_lite::pin!(close);
        let outcome = futures_lite::future::or(async { Some((&mut close).await) }, async {
            expiry.await;
            None
        })
        .await;
        if let Some(result) = outcome {
            return result;
        }
        // An error means the driver has already exited: nothing left to stop.
        let _ = self.shared.commands.send(Command::Abandon).await;
        // The driver stops at once and answers the close it abandoned with what it could not
        // commit (a close that finished meanwhile answers with its own outcome).
        close.await
    }

    /// The consumed topic.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// This consumer's id (from the config, or drawn from OS entropy: unique per instance).
    pub fn consumer_id(&self) -> &str {
        &self.shared.consumer_id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn final_state(&self) -> Option<FinalState> {
        self.shared.final_state.get().cloned()
    }
}

/// A stream of deliveries (see [`Consumer::stream`]). Ends when the consumer is closed; an
/// error item is not fatal (see [`Consumer::receive`]).
pub struct DeliveryStream {
    errors: Pin<Box<Receiver<ConsumerError>>>,
    shared: Arc<Shared>,
    /// Times it found the inbox empty and yielded since the last delivery (see
    /// [`YIELDS_BEFORE_WAIT`]).
    yields: u32,
    /// Set while waiting for a takeable delivery.
    listener: Option<EventListener>,
}

impl fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryStream")
            .field("topic", &self.shared.topic)
            .finish_non_exhaustive()
    }
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery, ConsumerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Ends with the deliveries: the errors' end (the driver exited) is not reported.
        if let Poll::Ready(Some(error)) = this.errors.as_mut().poll_next(cx) {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            match this.shared.inbox.try_take() {
                Take::Delivery(stamped) => {
                    this.listener = None;
                    this.yields = 0;
                    return Poll::Ready(Some(Ok(Delivery::new(stamped, Arc::clone(&this.shared)))));
                }
                Take::Closed => {
                    this.listener = None;
                    return Poll::Ready(None);
                }
                Take::Empty => {}
            }
            if this.listener.is_none() && this.yields < YIELDS_BEFORE_WAIT {
                if this.yields == 0 {
                    this.shared.gate.kick_if_pending();
                }
                this.yields += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match &mut this.listener {
                // Listen, then look again: a push between the take and the listener is seen.
                None => this.listener = Some(this.shared.inbox.listen()),
                Some(listener) => {
                    if Pin::new(listener).poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.listener = None;
                }
            }
        }
    }
}

/// The future [`Delivery::ack`] returns: ready at once when the ack was queued at the call (the
/// common case), else the driver's answer.
#[must_use = "an ack the driver has to answer is sent only when awaited"]
pub struct Ack(Option<AskedAck>);

/// An ack the driver answers (stale, closed, or the gate full).
type AskedAck = Pin<Box<dyn Future<Output = Result<(), ConsumerError>> + Send>>;

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("queued", &self.0.is_none())
            .finish()
    }
}

impl Future for Ack {
    type Output = Result<(), ConsumerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            None => Poll::Ready(Ok(())),
            Some(asked) => asked.as_mut().poll(cx),
        }
    }
}

/// One message handed to the application. Settle it with exactly one of `ack`, `nack`,
/// `nack_with_delay` or `reject`.
///
/// A delivery dropped unsettled counts as a nack (with a warning), so a forgotten handle
/// cannot stall its partition.
pub struct Delivery {
    inner: event::Message,
    /// `delivery{topic, partition, offset, attempt, group, member}` (see [`Delivery::span`]).
    span: tracing::Span,
    /// The ack gate's generation when the machine emitted it.
    generation: u64,
    shared: Arc<Shared>,
    settled: bool,
    /// The record went to the driver with a settling command (only its tag is left).
    record_sent: bool,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.shared.topic)
            .field("tag", &self.inner.tag)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The message, boxed for a settling command, its record taken out (an empty one left
    /// in its place): the nack's and the reject's record goes back whole, for a redelivery
    /// or a dead letter; what stays behind is the tag, for the drop should the send be
    /// cancelled.
    fn take_message(&mut self) -> Box<event::Message> {
        self.record_sent = true;
        Box::new(event::Message {
            tag: self.inner.tag,
            record: std::mem::take(&mut self.inner.record),
        })
    }

    #[inline(always)]
    fn new(stamped: Stamped, shared: Arc<Shared>) -> Self {
        // Looked up only when tracing records the span: the member id of a group assignment,
        // else the consumer id.
        let member = || match shared.gate.member_at(stamped.generation) {
            Some(member) => member,
            None => Arc::from(shared.consumer_id.as_str()),
        };
        let span =
            super::trace::delivery_span(&stamped.delivery, &shared.topic, &shared.group, member);
        Self {
            span,
            inner: stamped.delivery,
            generation: stamped.generation,
            shared,
            settled: false,
            record_sent: false,
        }
    }

    /// Sends a settling command. The delivery counts as settled once the command is queued:
    /// if this future is dropped before that, the delivery's drop nacks it.
    async fn settle<T>(
        mut self,
        command: impl FnOnce(&mut Self, Reply<Result<T, UsageError>>) -> Command,
    ) -> Result<T, ConsumerError> {
        let (reply, answer) = async_channel::bounded(1);
        let command = command(&mut self, reply);
        if self.shared.commands.send(command).await.is_err() {
            self.settled = true;
            return Err(ConsumerError::closed());
        }
        self.settled = true;
        match answer.recv().await {
            Ok(result) => result.map_err(ConsumerError::Usage),
            Err(_) => Err(ConsumerError::closed()),
        }
    }

    /// Done with it: its offset may be committed.
    ///
    /// When nothing since the delivery can have made it stale (no seek, rebalance or close),
    /// the ack is queued for the driver when `ack` is called, and the future it returns is
    /// ready with `Ok`: the driver applies queued acks before any other input, so the machine
    /// accepts it. Otherwise the future asks the driver and returns its answer
    /// ([`UsageError::StaleDelivery`], [`UsageError::Closed`], ...); dropped before it is
    /// done, that ack counts as a dropped delivery (a nack).
    ///
    /// The queued ack takes effect at the call, not at the first poll: a `Delivery` is large,
    /// and this way the common case never moves it into a future.
    pub fn ack(mut self) -> Ack {
        if self.shared.gate.try_ack(self.inner.tag, self.generation) {
            self.settled = true;
            return Ack(None);
        }
        Ack(Some(Box::pin(self.settle(|delivery, reply| {
            Command::Ack(delivery.inner.tag, reply)
        }))))
    }

    /// Failed: redeliver after the retry policy's backoff (dead-letter once attempts run out).
    pub async fn nack(self) -> Result<(), ConsumerError> {
        self.nack_redelivers(None).await.map(drop)
    }

    /// Failed: redeliver after `delay` (`Duration::MAX`: a century, that is never; the offset
    /// then holds back its partition's commits until a seek or a rebalance moves it on).
    pub async fn nack_with_delay(self, delay: Duration) -> Result<(), ConsumerError> {
        self.nack_redelivers(Some(delay)).await.map(drop)
    }

    /// Nacks it; `Ok(true)` when a redelivery follows, `Ok(false)` when attempts ran out
    /// under the `max_retry_attempts` in force at the nack (dead-lettered or discarded).
    pub(crate) async fn nack_redelivers(
        self,
        delay: Option<Duration>,
    ) -> Result<bool, ConsumerError> {
        self.settle(|delivery, reply| Command::Nack(delivery.take_message(), delay, reply))
            .await
    }

    /// Poison: straight to the dead-letter path, with `reason` in its headers.
    pub async fn reject(self, reason: impl Into<String>) -> Result<(), ConsumerError> {
        let reason = reason.into();
        self.settle(|delivery, reply| Command::Reject(delivery.take_message(), reason, reply))
            .await
    }

    /// The span of this delivery, `delivery`, with fields `topic`, `partition`, `offset`,
    /// `attempt`, `group` and `member` (the group member id it was delivered under; the
    /// consumer id in a manual assignment), and `otel.kind = "consumer"`. Enter it (or
    /// `.instrument(..)` the handling with it) to trace the processing; `Consumer::process`
    /// runs each handler inside it. It is created when the application takes the delivery,
    /// as a child of the current span.
    ///
    /// With the `opentelemetry` feature, a record whose headers carry a W3C
    /// [`TRACEPARENT`](crate::TRACEPARENT) (and [`TRACESTATE`](crate::TRACESTATE)) makes the
    /// span a child of that remote span instead, through `tracing-opentelemetry`: the
    /// consumer joins the producer's trace.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Delivery attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.inner.tag.attempt
    }

    /// Partition of the message.
    pub fn partition(&self) -> u32 {
        self.inner.tag.partition
    }

    /// Offset of the message.
    pub fn offset(&self) -> u64 {
        self.inner.tag.offset
    }

    /// The consumed topic.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The message.
    pub fn record(&self) -> &Record {
        &self.inner.record
    }

    /// The message (the old SDK's name for [`Delivery::record`]).
    pub fn message(&self) -> &Record {
        &self.inner.record
    }

    /// The message's payload.
    pub fn value(&self) -> &Bytes {
        &self.inner.record.value
    }

    /// The tag the state machine knows this delivery by.
    pub fn tag(&self) -> DeliveryTag {
        self.inner.tag
    }

    /// True when the consumer certainly refuses to settle it (its partition was sought or
    /// revoked since, or the consumer closed).
    pub(crate) fn known_stale(&self) -> bool {
        self.shared
            .gate
            .known_stale(self.inner.tag.partition, self.generation)
    }

    /// Drops a delivery that can no longer be settled without the unsettled-drop warning.
    pub(crate) fn discard(mut self) {
        self.settled = true;
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let tag = self.inner.tag;
        tracing::warn!(
            parent: &self.span,
            consumer_id = %self.shared.consumer_id,
            topic = %self.shared.topic,
            partition = tag.partition,
            offset = tag.offset,
            attempt = tag.attempt,
            "delivery dropped unsettled: counted as a nack"
        );
        // Never full: at most `max_unacked` deliveries are outstanding, the channel's capacity.
        // Closed means the consumer is gone and the message stays uncommitted.
        // Its record too, unless a settling command took it and was cancelled.
        let record = (!self.record_sent).then(|| Box::new(std::mem::take(&mut self.inner.record)));
        let _ = self.shared.dropped.try_send((tag, record));
    }
}
