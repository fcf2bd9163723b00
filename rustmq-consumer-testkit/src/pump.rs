//! A synchronous pump: one [`ConsumerMachine`] and the broker it talks to, driven in
//! lock-step on a virtual clock, for tests that want to script every step.
//!
//! [`Pump::drive`] feeds every transmit to the broker (or holds, fails or drops it, per
//! [`Route`]) and every answer back to the machine, collecting events, until neither has
//! anything more to say. [`Pump::advance`] moves the virtual `Instant` forward from deadline
//! to deadline (the machine's `poll_timeout` and the broker's), firing each and driving after
//! it. Several machines sharing one broker ([`SharedBroker`]) move together with
//! [`drive_all`] and [`advance_all`].
//!
//! Every loop here is bounded by [`Limits`]; when a bound runs out the pump panics with a
//! message naming it, so a machine that never goes quiet (a retry without a wait, a timer
//! that fires without moving on) fails the test instead of hanging it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rustmq_consumer_core::protocol::{
    CommitOffsetRequest, FetchRequest, ProduceRequest, Record, Request, Response,
};
use rustmq_consumer_core::{
    ConsumerConfig, ConsumerMachine, DeliveryTag, Event, Message, Transmit, TransportError,
};

use crate::broker::SimBroker;
use crate::transport::SharedBroker;

/// Outputs one drain of a machine may yield before [`transmits`], [`events`] or
/// [`take_deliveries`] call it a runaway.
pub const MAX_OUTPUTS: usize = 1_000_000;

/// The other end of a machine's requests: answers each at once.
pub trait Peer {
    /// The answer to `request` at `now`.
    fn answer(&mut self, now: Instant, request: Request) -> Result<Response, TransportError>;

    /// The earliest instant the peer wants [`Peer::handle_timeout`], if any.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Runs whatever is due at `now`.
    fn handle_timeout(&mut self, _now: Instant) {}
}

impl Peer for SimBroker {
    fn answer(&mut self, now: Instant, request: Request) -> Result<Response, TransportError> {
        self.transmit(now, request)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        SimBroker::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        SimBroker::handle_timeout(self, now);
    }
}

impl Peer for SharedBroker {
    fn answer(&mut self, now: Instant, request: Request) -> Result<Response, TransportError> {
        self.lock().answer(now, request)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.lock().poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.lock().handle_timeout(now);
    }
}

/// What the pump does with a transmit.
#[derive(Debug, Clone, Copy, Default)]
pub enum Route {
    /// Answer it at once from the broker.
    #[default]
    Answer,
    /// Keep it in [`Pump::held`] until the test answers it.
    Hold,
    /// Hold the requests the function picks, answer the others.
    HoldIf(fn(&Request) -> bool),
    /// Fail it at once with a lost connection.
    Fail,
    /// Never answer it (an unreachable broker: the machine's request deadline fires).
    Drop,
}

/// The bounds of a pump's loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Transmits and events one [`Pump::drive`] may see at one instant.
    pub outputs: usize,
    /// Deadlines one [`Pump::advance`] may fire.
    pub timers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            outputs: 100_000,
            timers: 100_000,
        }
    }
}

/// One machine and its broker on a virtual clock, and what went between them.
#[derive(Debug)]
pub struct Pump<P: Peer = SimBroker> {
    /// The machine under test.
    pub m: ConsumerMachine,
    /// The broker answering it.
    pub broker: P,
    /// The virtual clock.
    pub now: Instant,
    /// Every event the machine emitted, oldest first (tests may take them).
    pub events: Vec<Event>,
    /// Every request the machine transmitted, oldest first.
    pub sent: Vec<Request>,
    /// Transmits kept by [`Route::Hold`] and [`Route::HoldIf`], oldest first.
    pub held: VecDeque<Transmit>,
    /// What happens to the next transmits.
    pub route: Route,
    /// Ack every delivery as it arrives (the tags go to [`Pump::acked`]).
    pub auto_ack: bool,
    /// `(partition, offset)` of every delivery acked by `auto_ack`.
    pub acked: Vec<(u32, u64)>,
    /// The bounds of every loop.
    pub limits: Limits,
    /// The record of each delivery not yet settled through the pump, given back with its
    /// [`Pump::nack`] or [`Pump::reject`] as a driver gives it back.
    handed_out: HashMap<DeliveryTag, Record>,
}

impl<P: Peer> Pump<P> {
    /// A machine on `config` starting at `now`, talking to `broker`. Nothing is driven yet.
    ///
    /// # Panics
    ///
    /// When the machine refuses `config`.
    pub fn new(broker: P, config: ConsumerConfig, now: Instant) -> Self {
        let m = ConsumerMachine::new(config, now)
            .unwrap_or_else(|e| panic!("pump: the machine refused the config: {e}"));
        Self {
            m,
            broker,
            now,
            events: Vec::new(),
            sent: Vec::new(),
            held: VecDeque::new(),
            route: Route::Answer,
            auto_ack: false,
            acked: Vec::new(),
            limits: Limits::default(),
            handed_out: HashMap::new(),
        }
    }

    /// One pass: every queued transmit through [`Pump::route`], then every queued event.
    /// Counts each output against `budget`; returns whether there was any.
    ///
    /// # Panics
    ///
    /// When `budget` runs out.
    pub fn step(&mut self, budget: &mut usize) -> bool {
        let mut progressed = false;
        while let Some(t) = self.m.poll_transmit() {
            progressed = true;
            self.spend(budget);
            self.sent.push(t.request.clone());
            let hold = match self.route {
                Route::Answer => false,
                Route::Hold => true,
                Route::HoldIf(pick) => pick(&t.request),
                Route::Fail => {
                    let lost = TransportError::ConnectionLost("pump: route Fail".into());
                    self.m.handle_response(self.now, t.id, Err(lost));
                    continue;
                }
                Route::Drop => continue,
            };
            if hold {
                self.held.push_back(t);
            } else {
                let answer = self.broker.answer(self.now, t.request);
                self.m.handle_response(self.now, t.id, answer);
            }
        }
        while let Some(e) = self.m.poll_event() {
            progressed = true;
            self.spend(budget);
            if self.auto_ack {
                if let Some(tag) = delivered_tag(&e) {
                    self.m
                        .ack(self.now, tag)
                        .unwrap_or_else(|err| panic!("pump: auto-ack of {tag:?} refused: {err}"));
                    self.acked.push((tag.partition, tag.offset));
                }
            } else if let Event::Deliver(message) = &e {
                self.hand_out(message);
            }
            self.events.push(e);
        }
        progressed
    }

    fn spend(&self, budget: &mut usize) {
        *budget = budget.checked_sub(1).unwrap_or_else(|| {
            panic!(
                "pump: more than Limits::outputs = {} transmits and events at one instant ({:?}); the machine never goes quiet",
                self.limits.outputs,
                self.sent.iter().rev().take(5).map(Request::kind).collect::<Vec<_>>()
            )
        });
    }

    /// Steps until the machine has nothing more to say at [`Pump::now`].
    ///
    /// # Panics
    ///
    /// After [`Limits::outputs`] outputs.
    pub fn drive(&mut self) {
        let mut budget = self.limits.outputs;
        while self.step(&mut budget) {}
    }

    /// The earliest deadline of the machine or the broker.
    pub fn next_deadline(&self) -> Option<Instant> {
        let machine = self.m.poll_timeout().map(|(at, _)| at);
        machine.into_iter().chain(self.broker.poll_timeout()).min()
    }

    /// Fires the broker's and the machine's timers at `now` (moving the clock there first, never
    /// back), then drives.
    pub fn fire(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.broker.handle_timeout(self.now);
        self.m.handle_timeout(self.now);
        self.drive();
    }

    /// Moves the clock `d` forward, firing every deadline on the way in order.
    ///
    /// # Panics
    ///
    /// After [`Limits::timers`] deadlines (a timer that fires without moving on).
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..self.limits.timers {
            match self.next_deadline() {
                Some(at) if at <= target => self.fire(at),
                _ => return self.fire(target),
            }
        }
        panic!(
            "pump: more than Limits::timers = {} deadlines before {d:?} passed; a timer fires without moving on",
            self.limits.timers
        );
    }

    /// Answers the oldest held transmit from the broker, then drives; returns its request.
    pub fn answer_held(&mut self) -> Option<Request> {
        let t = self.held.pop_front()?;
        let answer = self.broker.answer(self.now, t.request.clone());
        self.m.handle_response(self.now, t.id, answer);
        self.drive();
        Some(t.request)
    }

    /// Answers every held transmit, and those they cause while [`Pump::route`] holds them.
    ///
    /// # Panics
    ///
    /// After [`Limits::outputs`] answers.
    pub fn answer_all_held(&mut self) {
        for _ in 0..self.limits.outputs {
            if self.answer_held().is_none() {
                return;
            }
        }
        panic!(
            "pump: more than Limits::outputs = {} held transmits answered; every answer causes another",
            self.limits.outputs
        );
    }

    /// Takes the events seen so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Takes the delivery tags seen so far, leaving the other events.
    pub fn take_delivered(&mut self) -> Vec<DeliveryTag> {
        let mut tags = Vec::new();
        self.events.retain(|e| match delivered_tag(e) {
            Some(tag) => {
                tags.push(tag);
                false
            }
            None => true,
        });
        tags
    }

    /// Remembers a delivery's record for its nack or reject. Deliveries settled on
    /// [`Pump::m`] directly are forgotten once their offset is below the settle watermark,
    /// and those of a partition no longer assigned (a nack of one still works: its record is
    /// fetched again), looked for when the map outgrows the machine's `max_unacked`.
    fn hand_out(&mut self, message: &Message) {
        let bound = self.m.config().max_unacked.max(64);
        if self.handed_out.len() >= bound {
            let m = &self.m;
            self.handed_out.retain(|tag, _| {
                m.settle_watermark(tag.partition)
                    .is_some_and(|base| tag.offset >= base)
            });
        }
        self.handed_out.insert(message.tag, message.record.clone());
    }

    /// Gives the record of `tag` back to the machine, if the pump saw its delivery.
    fn give_back(&mut self, tag: DeliveryTag) {
        if let Some(record) = self.handed_out.remove(&tag) {
            self.m.give_back(self.now, Message { tag, record });
        }
    }

    /// Acks `tag` now, then drives.
    ///
    /// # Panics
    ///
    /// When the machine refuses the ack.
    pub fn ack(&mut self, tag: DeliveryTag) {
        self.handed_out.remove(&tag);
        self.m
            .ack(self.now, tag)
            .unwrap_or_else(|e| panic!("pump: ack of {tag:?} refused: {e}"));
        self.drive();
    }

    /// Nacks `tag` now, its record given back first (a redelivery from the cache), then
    /// drives.
    ///
    /// # Panics
    ///
    /// When the machine refuses the nack.
    pub fn nack(&mut self, tag: DeliveryTag, delay: Option<Duration>) {
        self.give_back(tag);
        self.m
            .nack(self.now, tag, delay)
            .unwrap_or_else(|e| panic!("pump: nack of {tag:?} refused: {e}"));
        self.drive();
    }

    /// Rejects `tag` now, its record given back first (a dead letter from the cache), then
    /// drives.
    ///
    /// # Panics
    ///
    /// When the machine refuses the reject.
    pub fn reject(&mut self, tag: DeliveryTag, reason: &str) {
        self.give_back(tag);
        self.m
            .reject(self.now, tag, reason)
            .unwrap_or_else(|e| panic!("pump: reject of {tag:?} refused: {e}"));
        self.drive();
    }

    /// The commits sent so far.
    pub fn commits_sent(&self) -> Vec<&CommitOffsetRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::CommitOffset(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The fetches sent so far.
    pub fn fetches_sent(&self) -> Vec<&FetchRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::Fetch(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    /// The produces sent so far.
    pub fn produces_sent(&self) -> Vec<&ProduceRequest> {
        self.sent
            .iter()
            .filter_map(|r| match r {
                Request::Produce(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// How many of the events seen so far match `pred`.
    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }
}

/// Steps every pump in turn until none has anything more to say. They share one clock: the
/// test keeps their `now` equal.
///
/// # Panics
///
/// When one pump goes over its [`Limits::outputs`].
pub fn drive_all<P: Peer>(pumps: &mut [Pump<P>]) {
    let mut budgets: Vec<usize> = pumps.iter().map(|p| p.limits.outputs).collect();
    loop {
        let mut progressed = false;
        for (p, budget) in pumps.iter_mut().zip(&mut budgets) {
            progressed |= p.step(budget);
        }
        if !progressed {
            return;
        }
    }
}

/// Moves every pump's clock from `now` to `now + d`, firing every deadline of every pump (and
/// of their broker) in order and driving them all after each. Returns the new `now`.
///
/// # Panics
///
/// After [`Limits::timers`] deadlines of the first pump.
pub fn advance_all<P: Peer>(pumps: &mut [Pump<P>], now: Instant, d: Duration) -> Instant {
    let target = now + d;
    let Some(limit) = pumps.first().map(|p| p.limits.timers) else {
        return target;
    };
    let mut now = now;
    let mut fire = |pumps: &mut [Pump<P>], at: Instant| {
        now = now.max(at);
        for p in pumps.iter_mut() {
            p.now = now;
            p.broker.handle_timeout(now);
            p.m.handle_timeout(now);
        }
        drive_all(pumps);
        now
    };
    for _ in 0..limit {
        match pumps.iter().filter_map(Pump::next_deadline).min() {
            Some(at) if at <= target => {
                fire(pumps, at);
            }
            _ => return fire(pumps, target),
        }
    }
    panic!(
        "pump: more than Limits::timers = {limit} deadlines before {d:?} passed; a timer fires without moving on"
    );
}

/// The tag of a delivery event (the pump's one contact with the delivery type).
pub fn delivered_tag(e: &Event) -> Option<DeliveryTag> {
    match e {
        Event::Deliver(d) => Some(d.tag),
        _ => None,
    }
}

/// The tags of every delivery among `events`, in order.
pub fn delivered_tags(events: &[Event]) -> Vec<DeliveryTag> {
    events.iter().filter_map(delivered_tag).collect()
}

/// Every transmit the machine has queued.
///
/// # Panics
///
/// After [`MAX_OUTPUTS`].
pub fn transmits(m: &mut ConsumerMachine) -> Vec<Transmit> {
    let mut out = Vec::new();
    for _ in 0..MAX_OUTPUTS {
        match m.poll_transmit() {
            Some(t) => out.push(t),
            None => return out,
        }
    }
    panic!("pump: more than MAX_OUTPUTS = {MAX_OUTPUTS} transmits queued at once");
}

/// Every event the machine has queued.
///
/// # Panics
///
/// After [`MAX_OUTPUTS`].
pub fn events(m: &mut ConsumerMachine) -> Vec<Event> {
    let mut out = Vec::new();
    for _ in 0..MAX_OUTPUTS {
        match m.poll_event() {
            Some(e) => out.push(e),
            None => return out,
        }
    }
    panic!("pump: more than MAX_OUTPUTS = {MAX_OUTPUTS} events queued at once");
}

/// Moves the tag of every queued delivery into `tags`; other events are dropped. No
/// allocation beyond `tags`' growth, one bound check per event: fit for a benchmark loop.
///
/// # Panics
///
/// After [`MAX_OUTPUTS`] events.
pub fn take_deliveries(m: &mut ConsumerMachine, tags: &mut Vec<DeliveryTag>) {
    for _ in 0..MAX_OUTPUTS {
        match m.poll_event() {
            Some(e) => tags.extend(delivered_tag(&e)),
            None => return,
        }
    }
    panic!("pump: more than MAX_OUTPUTS = {MAX_OUTPUTS} events queued at once");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pump(messages: usize) -> Pump {
        let mut broker = SimBroker::new();
        broker.create_topic("t", 1);
        let values = (0..messages).map(|i| format!("m{i}"));
        broker
            .produce_values("t", 0, values)
            .unwrap_or_else(|e| panic!("produce: {e}"));
        let mut config = ConsumerConfig::new("t", "g");
        config.partitions = vec![0];
        config.max_unacked = 10;
        #[allow(clippy::disallowed_methods)] // a test's clock: any instant does
        let now = Instant::now();
        Pump::new(broker, config, now)
    }

    /// A nack through the pump gives the record back, so the retry comes from the cache; the
    /// records of deliveries settled on the machine directly do not pile up.
    #[test]
    fn the_pump_gives_records_back_and_forgets_settled_ones() {
        let mut p = pump(1_000);
        p.advance(Duration::from_millis(100));
        let first = p.take_delivered();
        assert!(!first.is_empty());
        p.nack(first[0], Some(Duration::from_millis(1)));
        for &tag in &first[1..] {
            p.m.ack(p.now, tag).unwrap_or_else(|e| panic!("ack: {e}"));
        }
        let mut rounds = 0;
        while p.m.settle_watermark(0) != Some(1_000) {
            rounds += 1;
            assert!(rounds < 1_000, "never consumed everything");
            p.advance(Duration::from_millis(10));
            for tag in p.take_delivered() {
                p.m.ack(p.now, tag).unwrap_or_else(|e| panic!("ack: {e}"));
            }
            assert!(p.handed_out.len() <= 64 + 10, "{}", p.handed_out.len());
        }
        let m = p.m.metrics();
        assert_eq!((m.retried, m.cache_hits, m.refetches), (1, 1, 0), "{m:?}");
    }
}
