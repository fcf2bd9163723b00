//! The driver task: one per consumer, owning the state machine by value.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use event_listener::EventListener;
use futures_lite::{future, Stream};
use futures_util::stream::FuturesUnordered;

use super::consumer::Dropped;
use super::deliveries::Deliveries;
use super::error::ConsumerError;
use super::gate::{AckGate, GateState};
use super::health::HealthReport;
use super::inbox::Inbox;
use super::notices::Notices;
use super::rebalance::{Ended, Hook, Hooks};
use super::runtime::{AsyncTimer, Runtime};
use super::transport::Transport;
use crate::config::{ConfigUpdateError, ConsumerConfig};
use crate::error::{TransportError, UsageError};
use crate::event::{
    CommitError, DeliveryTag, Event, Health, Message, Metrics, PartitionLag, RequestId,
};
use crate::machine::ConsumerMachine;
use crate::protocol::{Record, Response};

mod commands;
mod events;
mod health;
mod telemetry;

pub(crate) use health::DEFAULT_PROGRESS_TIMEOUT;

/// A one-shot reply from the driver (a channel of capacity one).
pub(crate) type Reply<T> = Sender<T>;

/// What the application asks of the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Ack(DeliveryTag, Reply<Result<(), UsageError>>),
    /// The delivery comes back whole: its record is given back to the machine for the
    /// redelivery (boxed: the command channel's room is allocated up front, and a nack is
    /// the rare path). The reply says whether the nack redelivers (else it dead-letters or
    /// discards).
    Nack(
        Box<Message>,
        Option<Duration>,
        Reply<Result<bool, UsageError>>,
    ),
    /// The delivery comes back whole, its record for the dead letter.
    Reject(Box<Message>, String, Reply<Result<(), UsageError>>),
    Pause(Vec<u32>, Reply<Result<(), UsageError>>),
    Resume(Vec<u32>, Reply<Result<(), UsageError>>),
    Seek(u32, u64, Reply<Result<(), UsageError>>),
    Commit(Reply<Result<(), ConsumerError>>),
    Lag(Reply<Vec<PartitionLag>>),
    Assigned(Reply<Vec<u32>>),
    Metrics(Reply<Metrics>),
    Config(Reply<ConsumerConfig>),
    /// The reply is `Err` with the panic's payload when the edit panicked.
    UpdateConfig(ConfigEdit, Reply<EditResult>),
    Health(Reply<HealthReport>),
    Close(Reply<Result<(), ConsumerError>>),
    /// Stop now, without finishing the close (`close_with_timeout` expired).
    Abandon,
}

/// An edit of the configuration in force, applied by the driver (`Consumer::update_config`).
pub(crate) struct ConfigEdit(pub(crate) Box<dyn FnOnce(&mut ConsumerConfig) + Send>);

impl std::fmt::Debug for ConfigEdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigEdit")
    }
}

/// What an edit of the configuration came to: the update's result, or the edit's panic.
pub(crate) type EditResult = std::thread::Result<Result<ConsumerConfig, ConfigUpdateError>>;

/// Most queued commands and dropped deliveries taken per wake-up before the outputs are
/// drained (the command channel's capacity: one wake-up can empty it).
const DRAIN_BATCH: usize = 256;

/// A delivery on its way to the application, stamped with the ack gate's generation when
/// the machine emitted it (see `gate`; the gate also knows the group member id in force at
/// each generation, for the delivery's span). A plain number, not a shared stamp: no
/// reference count changes hands per message.
#[derive(Debug)]
pub(crate) struct Stamped {
    pub(crate) delivery: Message,
    pub(crate) generation: u64,
}

/// Who polls the driver's wake sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poller {
    /// The task, with its waker, before it sleeps.
    Task,
    /// A look between inputs with a no-op waker, under the gate's lock: the timer is read
    /// off the clock rather than polled (a timer polled with another waker registers again,
    /// a syscall on smol), and the rebalance hooks are not polled (a hook may ack).
    Peek,
}

/// What the consumer can still answer after the driver has exited.
#[derive(Debug, Clone)]
pub(crate) struct FinalState {
    pub(crate) metrics: Metrics,
    pub(crate) lag: Vec<PartitionLag>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = (RequestId, Result<Response, TransportError>)> + Send>>;

/// The channels between the driver and its consumer handles.
pub(crate) struct DriverChannels {
    pub(crate) commands: Pin<Box<Receiver<Command>>>,
    pub(crate) dropped: Pin<Box<Receiver<Dropped>>>,
    pub(crate) lifeline: Pin<Box<Receiver<()>>>,
    pub(crate) kicked: Pin<Box<Receiver<()>>>,
    pub(crate) gate: Arc<AckGate>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) final_state: Arc<OnceLock<FinalState>>,
    /// Errors for the application (`receive()`, the stream): at most one waits, the newest.
    pub(crate) errors: Sender<ConsumerError>,
    pub(crate) unread_errors: Receiver<ConsumerError>,
    /// `build()` waiting for the broker's first answer or first outage (fail fast).
    pub(crate) first_contact: Option<Reply<Result<(), ConsumerError>>>,
    /// Events for the application's event streams.
    pub(crate) notices: Notices,
    /// The rebalance listener's hooks, when the application set one.
    pub(crate) hooks: Option<Hooks>,
}

/// What woke the driver.
enum Wake {
    Timer,
    Response(RequestId, Result<Response, TransportError>),
    Command(Command),
    CommandsClosed,
    Dropped(Dropped),
    DroppedClosed,
    LifelineClosed,
    /// The inbox has room again.
    Room,
    /// Acks are waiting in the gate (applied at the top of every iteration anyway).
    Kicked,
    /// A rebalance hook returned, failed or overran.
    Hook(Ended),
}

/// The driver: the state machine plus everything needed to feed it.
pub(crate) struct Driver {
    machine: ConsumerMachine,
    runtime: Arc<dyn Runtime>,
    transport: Arc<dyn Transport>,
    channels: DriverChannels,
    in_flight: FuturesUnordered<ResponseFuture>,
    /// Requests answered as they were sent (a transport that answers at once).
    answered: VecDeque<(RequestId, Result<Response, TransportError>)>,
    timer: Option<Pin<Box<dyn AsyncTimer>>>,
    armed: Option<Instant>,
    /// When the driver looks at the gate's queued acks even if nothing wakes it: set while
    /// acks wake it only in batches (a request in flight; see `gate`).
    look_by: Option<Instant>,
    /// Deliveries the inbox had no room for. A safety net: the inbox holds only deliveries the
    /// machine counts outstanding (stale ones are discarded), so at most `max_unacked`.
    backlog: Deliveries,
    /// Set while the backlog waits for room in the inbox.
    room: Option<EventListener>,
    commit_waiters: Vec<(u64, Reply<Result<(), ConsumerError>>)>,
    /// Why the last commit failed (the cause `close()` reports with offsets left uncommitted).
    commit_error: Option<CommitError>,
    close_waiters: Vec<Reply<Result<(), ConsumerError>>>,
    closing: bool,
    abandoned: bool,
    commands_open: bool,
    dropped_open: bool,
    lifeline_open: bool,
    /// The broker outage in progress ([`ConsumerError::Unreachable`]): set by the first request
    /// that got no answer, cleared by the next answer.
    outage: Option<ConsumerError>,
    /// Partitions stalled now ([`ConsumerError::Stalled`]), until they recover.
    stalls: BTreeMap<u32, ConsumerError>,
    /// Whether the broker ever answered.
    ever_connected: bool,
    /// The current wake-up is the timer: request failures it causes are deadlines.
    timer_wake: bool,
    /// The member id and generation of the last successful JoinGroup answer, for the member
    /// span of the assignment the machine reports next.
    joined: Option<(String, u64)>,
    /// The consumer's span (consumer id, group, topic), the parent of `member_span`.
    span: tracing::Span,
    /// `member{member_id, generation}` of the current group assignment (none before).
    member_span: tracing::Span,
    /// Newly assigned partitions the inbox holds back until their assign hook returns.
    held_for_hook: Vec<u32>,
    /// Since when each health issue lasts (`health_report`).
    watch: health::Watch,
    /// The metrics export (feature `metrics`; nothing without it).
    telemetry: telemetry::Telemetry,
}

impl Driver {
    pub(crate) fn new(
        machine: ConsumerMachine,
        runtime: Arc<dyn Runtime>,
        transport: Arc<dyn Transport>,
        channels: DriverChannels,
    ) -> Self {
        let watch = health::Watch::new(runtime.now());
        let telemetry = telemetry::Telemetry::new(&machine);
        Self {
            machine,
            runtime,
            transport,
            channels,
            in_flight: FuturesUnordered::new(),
            answered: VecDeque::new(),
            timer: None,
            armed: None,
            look_by: None,
            backlog: Deliveries::default(),
            room: None,
            commit_waiters: Vec::new(),
            commit_error: None,
            close_waiters: Vec::new(),
            closing: false,
            abandoned: false,
            commands_open: true,
            dropped_open: true,
            lifeline_open: true,
            outage: None,
            stalls: BTreeMap::new(),
            ever_connected: false,
            timer_wake: false,
            joined: None,
            span: tracing::Span::none(),
            member_span: tracing::Span::none(),
            held_for_hook: Vec::new(),
            watch,
            telemetry,
        }
    }

    /// The run loop: handle the input that woke the task and then every input already ready
    /// (a bounded number), each in a round of its own: under the gate's lock, apply the
    /// gate's acks, feed the machine the input and drain its outputs; after the lock, hand
    /// the deliveries to the inbox and look for the next input (a request's answer is read
    /// and decoded there). Then wait for the first input, until the machine is closed. The
    /// lock is held only while the machine is fed (see `gate`): an application's `ack` never
    /// waits for a decode or for the inbox.
    pub(crate) async fn run(mut self) {
        tracing::debug!("driver started");
        self.span = tracing::Span::current();
        let gate = Arc::clone(&self.channels.gate);
        let mut wake = None;
        loop {
            let done = {
                let member_span = self.member_span.clone();
                let _member = member_span.enter();
                self.handle_ready(&gate, wake.take())
            };
            if done {
                break;
            }
            self.arm_timer();
            wake = Some(self.wait().await);
        }
        self.finish();
    }

    /// Handles `wake` and then every input already ready, in `wait`'s order, up to
    /// `DRAIN_BATCH` of them: a burst of commands or responses costs one wake-up. An input is
    /// only taken from its source when it will be handled: what is still ready after the
    /// batch stays there for `wait`. True once the machine is closed (the gate is then closed
    /// too, in the same hold of its lock).
    fn handle_ready(&mut self, gate: &AckGate, mut wake: Option<Wake>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        for round in 1..=DRAIN_BATCH {
            let done = {
                let mut state = gate.lock();
                let now = self.runtime.now();
                self.apply_pending(now, &mut state);
                if let Some(wake) = wake.take() {
                    self.wake(now, wake, &mut state);
                }
                self.drain_outputs(&mut state);
                self.batch_acks(now, &mut state);
                let done = self.machine.is_closed() || self.abandoned;
                if done {
                    state.open = false;
                }
                done
            };
            self.push_backlog();
            self.observe(self.runtime.now(), false);
            self.timer_wake = false;
            self.joined = None;
            if done {
                return true;
            }
            self.arm_timer();
            if round == DRAIN_BATCH {
                return false;
            }
            // The no-op waker is fine: `wait` polls every source again with the real one
            // before the task sleeps.
            match self.poll_wake(&mut cx, Poller::Peek) {
                Poll::Ready(next) => wake = Some(next),
                Poll::Pending => return false,
            }
        }
        false
    }

    /// How many queued acks wake the driver from now on (see `gate`): a batch while a
    /// request is in flight, whose answer will wake it anyway (looking again within a quarter
    /// of `ack_batch_timeout` at the latest), else the first.
    fn batch_acks(&mut self, now: Instant, state: &mut GateState) {
        if self.in_flight.is_empty() {
            state.kick_at = 1;
            self.look_by = None;
        } else {
            state.kick_at = (state.capacity() / 4).max(1);
            let every = (self.machine.config().ack_batch_timeout / 4).max(Duration::from_millis(1));
            // Past what an `Instant` can hold: never (the answer or a wait wakes it).
            self.look_by = now.checked_add(every);
        }
    }

    /// Feeds the machine every ack the gate accepted. Each was checked against a generation
    /// the machine has not moved past, so a refusal is a bug in the gate's bookkeeping.
    fn apply_pending(&mut self, now: Instant, state: &mut GateState) {
        if state.pending.is_empty() {
            return;
        }
        let refused = self.machine.ack_many(now, state.pending.drain(..));
        for (tag, error) in &refused {
            tracing::error!(partition = tag.partition, offset = tag.offset, attempt = tag.attempt, %error, "an ack the gate accepted was refused");
        }
        debug_assert!(
            refused.is_empty(),
            "gate accepted refused acks: {refused:?}"
        );
    }

    fn wake(&mut self, now: Instant, wake: Wake, state: &mut GateState) {
        match wake {
            Wake::Timer => {
                // A fired timer must be reset before it is polled again.
                self.armed = None;
                self.timer_wake = true;
                self.machine.handle_timeout(now);
            }
            Wake::Response(id, result) => {
                self.telemetry.answered(now, id, &result);
                match &result {
                    Ok(response) => {
                        if let Response::JoinGroup(r) = response {
                            if r.error_code == 0 {
                                self.joined = Some((r.member_id.clone(), r.generation_id));
                            }
                        }
                        self.reached();
                    }
                    Err(error) if error.is_unreachable() => self.unreachable(error.clone()),
                    Err(_) => {}
                }
                self.machine.handle_response(now, id, result)
            }
            Wake::Command(command) => self.command(now, command, state),
            Wake::Dropped((tag, record)) => self.dropped(now, tag, record),
            Wake::Room => self.room = None,
            Wake::Kicked => {}
            Wake::Hook(ended) => self.hook_ended(now, ended),
            Wake::CommandsClosed => self.commands_open = false,
            Wake::DroppedClosed => self.dropped_open = false,
            Wake::LifelineClosed => {
                self.lifeline_open = false;
                tracing::debug!("every consumer handle dropped: closing");
                self.begin_close(now, state);
            }
        }
    }

    fn dropped(&mut self, now: Instant, tag: DeliveryTag, record: Option<Box<Record>>) {
        if let Some(record) = record {
            let record = *record;
            self.machine.give_back(now, Message { tag, record });
        }
        if let Err(error) = self.machine.nack(now, tag, None) {
            tracing::debug!(partition = tag.partition, offset = tag.offset, attempt = tag.attempt, %error, "nack of a dropped delivery refused");
        }
    }

    /// Starts every transmit and routes every event, until the machine has nothing to say.
    /// Deliveries wait in the backlog: the round hands them to the inbox after the lock.
    fn drain_outputs(&mut self, state: &mut GateState) {
        loop {
            let mut progressed = false;
            while let Some(transmit) = self.machine.poll_transmit() {
                progressed = true;
                let transport = Arc::clone(&self.transport);
                let id = transmit.id;
                if self.telemetry.timed() {
                    let now = self.runtime.now();
                    self.telemetry.sent(now, id, transmit.request.kind());
                }
                tracing::trace!(request = id.0, kind = ?transmit.request.kind(), "send");
                let mut request: ResponseFuture = Box::pin(async move {
                    let result = transport.request(transmit.request).await;
                    (id, result)
                });
                // Started here, not at the next wait: the request is on the wire while the
                // deliveries below are handed over, so the broker works on it meanwhile (the
                // next fetch overlaps the delivery of the last answer). `in_flight` polls it
                // again with the real waker before the task sleeps.
                match request
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                {
                    Poll::Ready(answer) => self.answered.push_back(answer),
                    Poll::Pending => self.in_flight.push(request),
                }
            }
            loop {
                // Deliveries up to the next other event go in at once, stamped with the
                // generation in force; that event may change it for the ones after.
                let machine = &mut self.machine;
                self.backlog
                    .append_with(state.generation, |into| machine.poll_deliveries(into));
                let Some(event) = self.machine.poll_event() else {
                    break;
                };
                progressed = true;
                self.event(event, state);
            }
            if !progressed {
                break;
            }
        }
    }

    fn arm_timer(&mut self) {
        // A timer armed for an earlier instant stays, and so does one no longer needed: it
        // fires early, which the machine takes as spurious, and is set for the later one then.
        // Deadlines mostly move later or go (each answered request's), and a reset is not free
        // (on smol it wakes the reactor with a syscall).
        let machine = self.machine.poll_timeout().map(|(deadline, _)| deadline);
        let Some(deadline) = machine.into_iter().chain(self.look_by).min() else {
            return;
        };
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        self.armed = Some(deadline);
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(self.runtime.new_timer(deadline)),
        }
    }

    /// Waits for the first input. Order: timer, responses, dropped deliveries, commands,
    /// lifeline, gate, rebalance hook.
    async fn wait(&mut self) -> Wake {
        future::poll_fn(|cx| self.poll_wake(cx, Poller::Task)).await
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>, poller: Poller) -> Poll<Wake> {
        if let Some(deadline) = self.armed {
            let due = match (poller, &mut self.timer) {
                (Poller::Task, Some(timer)) => timer.as_mut().poll(cx).is_ready(),
                (Poller::Peek, _) => deadline <= self.runtime.now(),
                (Poller::Task, None) => false,
            };
            if due {
                return Poll::Ready(Wake::Timer);
            }
        }
        if let Some((id, result)) = self.answered.pop_front() {
            return Poll::Ready(Wake::Response(id, result));
        }
        if !self.in_flight.is_empty() {
            if let Poll::Ready(Some((id, result))) = Pin::new(&mut self.in_flight).poll_next(cx) {
                return Poll::Ready(Wake::Response(id, result));
            }
        }
        if let Some(room) = &mut self.room {
            if Pin::new(room).poll(cx).is_ready() {
                return Poll::Ready(Wake::Room);
            }
        }
        if self.dropped_open {
            if let Poll::Ready(tag) = self.channels.dropped.as_mut().poll_next(cx) {
                return Poll::Ready(tag.map_or(Wake::DroppedClosed, Wake::Dropped));
            }
        }
        if self.commands_open {
            if let Poll::Ready(command) = self.channels.commands.as_mut().poll_next(cx) {
                return Poll::Ready(command.map_or(Wake::CommandsClosed, Wake::Command));
            }
        }
        if self.lifeline_open {
            if let Poll::Ready(None) = self.channels.lifeline.as_mut().poll_next(cx) {
                return Poll::Ready(Wake::LifelineClosed);
            }
        }
        // Never closed while the driver runs: the gate holds the sender.
        if let Poll::Ready(Some(())) = self.channels.kicked.as_mut().poll_next(cx) {
            return Poll::Ready(Wake::Kicked);
        }
        if let Some(running) = self
            .channels
            .hooks
            .as_mut()
            .filter(|_| poller == Poller::Task)
        {
            if let Poll::Ready(ended) = running.poll(
                cx,
                &*self.runtime,
                self.machine.config().rebalance_drain_timeout,
            ) {
                return Poll::Ready(Wake::Hook(ended));
            }
        }
        Poll::Pending
    }
}
