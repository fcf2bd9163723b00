//! The circuit breaker: a sans-IO sub-machine deciding whether a request may be sent.
//!
//! Closed -> Open after `failure_threshold` consecutive failures -> HalfOpen after the open
//! interval -> Closed after `max_probes` successful probes, or Open again on any probe failure
//! or when `half_open_max_wait` passes without a decision.
//!
//! The open interval grows with the outage (like resilience4j's exponential wait interval in
//! the open state): a quarter of the time since the circuit first opened, at least
//! [`FIRST_OPEN_WAIT`] and at most `recovery_timeout`. A broker back after an outage of `T`
//! is probed again within `max(FIRST_OPEN_WAIT, T / 4)` of its return (a 5 s outage costs
//! about a second), the interval grows by a quarter per failed probe once the outage is longer
//! than four first waits, and an outage longer than `4 * recovery_timeout` is probed once
//! per `recovery_timeout`. Closing the circuit ends the outage.
//!
//! Polling order after every input: drain [`Breaker::poll_transition`], then read
//! [`Breaker::poll_timeout`]. The breaker never reads a clock: `now` is an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::event::BreakerState;

/// The shortest open interval (capped by `recovery_timeout`): the first wait of an outage.
pub(crate) const FIRST_OPEN_WAIT: Duration = Duration::from_secs(1);

/// The open interval is the outage's age divided by this (within its bounds).
const OUTAGE_FRACTION: u32 = 4;

/// The kind of request a [`Breaker::try_acquire`] allowed. Hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// An ordinary request, sent while the circuit was closed.
    Normal,
    /// A probe, sent while the circuit was half-open; its outcome decides the circuit.
    Probe,
}

/// Where the breaker is, with the data that state needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    /// Requests flow; counts failures in a row.
    Closed { consecutive_failures: u32 },
    /// Nothing flows until `opened_at + wait`.
    Open { opened_at: Instant, wait: Duration },
    /// Probes flow, at most `max_probes` at a time.
    HalfOpen { since: Instant, successes: u32 },
}

/// A circuit breaker. Starts closed.
///
/// Outcomes of [`Permit::Normal`] requests that arrive while open or half-open (they were sent
/// before the circuit opened) are ignored, and so are [`Permit::Probe`] outcomes arriving while
/// closed or open, or while no probe is in flight.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    /// Consecutive failures that open a closed circuit (at least 1).
    failure_threshold: u32,
    /// The longest the circuit stays open before probing.
    recovery_timeout: Duration,
    /// When the circuit first opened in the current outage (`None` while closed).
    outage_since: Option<Instant>,
    /// Probes in flight at once, and successes needed to close (at least 1).
    max_probes: u32,
    /// Longest a half-open circuit waits for a decision before opening again.
    half_open_max_wait: Duration,
    /// The current state.
    inner: Inner,
    /// Probes sent and not yet answered, across half-open phases: a probe of an earlier phase
    /// still in flight keeps its slot, so at most `max_probes` are ever outstanding.
    probes_in_flight: u32,
    /// Transitions not yet drained, oldest first.
    pending: VecDeque<(BreakerState, BreakerState)>,
    /// Every transition since construction.
    transitions: u64,
}

impl Breaker {
    /// A closed breaker. A `failure_threshold` or `max_probes` of 0 is taken as 1.
    pub(crate) fn new(
        failure_threshold: u32,
        recovery_timeout: Duration,
        max_probes: u32,
        half_open_max_wait: Duration,
    ) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            recovery_timeout,
            outage_since: None,
            max_probes: max_probes.max(1),
            half_open_max_wait,
            inner: Inner::Closed {
                consecutive_failures: 0,
            },
            probes_in_flight: 0,
            pending: VecDeque::new(),
            transitions: 0,
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// May a request be sent now? Closed: `Some(Normal)`. Open: `None`. HalfOpen:
    /// `Some(Probe)` while fewer than `max_probes` probes are in flight, else `None`.
    ///
    /// A returned permit must come back through exactly one of [`Breaker::on_success`],
    /// [`Breaker::on_failure`] or [`Breaker::release`].
    pub(crate) fn try_acquire(&mut self) -> Option<Permit> {
        match self.inner {
            Inner::Closed { .. } => Some(Permit::Normal),
            Inner::Open { .. } => None,
            Inner::HalfOpen { .. } => {
                if self.probes_in_flight < self.max_probes {
                    self.probes_in_flight += 1;
                    Some(Permit::Probe)
                } else {
                    None
                }
            }
        }
    }

    /// The request sent under `permit` succeeded.
    ///
    /// `_now` is unused today (success never starts a timer) but keeps the signature of
    /// [`Breaker::on_failure`].
    pub(crate) fn on_success(&mut self, _now: Instant, permit: Permit) {
        if permit == Permit::Probe && !self.take_probe() {
            return;
        }
        match (&mut self.inner, permit) {
            (
                Inner::Closed {
                    consecutive_failures,
                },
                Permit::Normal,
            ) => *consecutive_failures = 0,
            (Inner::HalfOpen { successes, .. }, Permit::Probe) => {
                *successes += 1;
                if *successes >= self.max_probes {
                    self.outage_since = None;
                    self.transition(Inner::Closed {
                        consecutive_failures: 0,
                    });
                }
            }
            _ => {}
        }
    }

    /// The request sent under `permit` failed (transport, broker error or deadline).
    pub(crate) fn on_failure(&mut self, now: Instant, permit: Permit) {
        if permit == Permit::Probe && !self.take_probe() {
            return;
        }
        match (&mut self.inner, permit) {
            (
                Inner::Closed {
                    consecutive_failures,
                },
                Permit::Normal,
            ) => {
                *consecutive_failures = consecutive_failures.saturating_add(1);
                if *consecutive_failures >= self.failure_threshold {
                    self.open(now);
                }
            }
            (Inner::HalfOpen { .. }, Permit::Probe) => self.open(now),
            _ => {}
        }
    }

    /// A permit whose request ended with no verdict (e.g. cancelled before sending): frees a
    /// probe slot. A no-op for a normal permit.
    #[cfg(test)]
    pub(crate) fn release(&mut self, permit: Permit) {
        if permit == Permit::Probe {
            self.take_probe();
        }
    }

    /// Frees one probe slot; false when no probe was outstanding (an outcome to ignore).
    fn take_probe(&mut self) -> bool {
        let had = self.probes_in_flight > 0;
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        had
    }

    /// When [`Breaker::handle_timeout`] has work: Open, `opened_at` plus the open interval (the
    /// circuit half-opens); HalfOpen, `half_open_since + half_open_max_wait` (the circuit opens
    /// again); Closed, `None`. `None` also when the deadline is beyond what `Instant` can hold.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.inner {
            Inner::Closed { .. } => None,
            Inner::Open { opened_at, wait } => opened_at.checked_add(wait),
            Inner::HalfOpen { since, .. } => since.checked_add(self.half_open_max_wait),
        }
    }

    /// Open -> HalfOpen at its deadline; HalfOpen -> Open (a fresh, longer open interval) when
    /// the maximum wait passed without a decision. Spurious calls are no-ops.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        match self.inner {
            Inner::Closed { .. } => {}
            Inner::Open { .. } => self.transition(Inner::HalfOpen {
                since: now,
                successes: 0,
            }),
            Inner::HalfOpen { .. } => self.open(now),
        }
    }

    /// Opens the circuit at `now` for the open interval the outage's age calls for.
    fn open(&mut self, now: Instant) {
        let since = *self.outage_since.get_or_insert(now);
        let first = FIRST_OPEN_WAIT.min(self.recovery_timeout);
        let wait = (now.saturating_duration_since(since) / OUTAGE_FRACTION)
            .clamp(first, self.recovery_timeout);
        debug!(wait_ms = wait.as_millis() as u64, "circuit opens");
        self.transition(Inner::Open {
            opened_at: now,
            wait,
        });
    }

    /// The next transition `(from, to)` since the last poll, oldest first.
    pub(crate) fn poll_transition(&mut self) -> Option<(BreakerState, BreakerState)> {
        self.pending.pop_front()
    }

    /// Transitions since construction.
    pub(crate) fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Moves to `to`, recording the transition.
    fn transition(&mut self, to: Inner) {
        let from = self.state();
        self.inner = to;
        let to = self.state();
        self.transitions += 1;
        self.pending.push_back((from, to));
        debug!(
            ?from,
            ?to,
            transitions = self.transitions,
            "circuit breaker transition"
        );
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::unwrap_used)] // tests build their base instant once, and may unwrap
mod tests {
    use super::*;

    /// Below `FIRST_OPEN_WAIT`: every open interval is this (the growth has its own tests).
    const RECOVERY: Duration = Duration::from_millis(800);
    const MAX_WAIT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Threshold 3, two probes.
    fn breaker() -> Breaker {
        Breaker::new(3, RECOVERY, 2, MAX_WAIT)
    }

    fn drain(b: &mut Breaker) -> Vec<(BreakerState, BreakerState)> {
        std::iter::from_fn(|| b.poll_transition()).collect()
    }

    /// Fails `n` normal requests at `now`.
    fn fail(b: &mut Breaker, now: Instant, n: u32) {
        for _ in 0..n {
            let p = b.try_acquire().unwrap();
            assert_eq!(p, Permit::Normal);
            b.on_failure(now, p);
        }
    }

    /// Opens the breaker at `now`, then half-opens it at its deadline; returns that deadline.
    fn half_open(b: &mut Breaker, now: Instant) -> Instant {
        fail(b, now, 3);
        let at = b.poll_timeout().unwrap();
        b.handle_timeout(at);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        drain(b);
        at
    }

    #[test]
    fn starts_closed_and_allows_normal_requests() {
        let mut b = breaker();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.try_acquire(), Some(Permit::Normal));
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.poll_transition(), None);
        assert_eq!(b.transitions(), 0);
    }

    #[test]
    fn threshold_of_consecutive_failures_opens() {
        let t0 = Instant::now();
        let mut b = breaker();
        fail(&mut b, t0, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&mut b, t0 + ms(5), 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire(), None);
        assert_eq!(b.poll_timeout(), Some(t0 + ms(5) + RECOVERY));
        assert_eq!(
            drain(&mut b),
            vec![(BreakerState::Closed, BreakerState::Open)]
        );
        assert_eq!(b.transitions(), 1);
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = breaker();
        fail(&mut b, t0, 2);
        let p = b.try_acquire().unwrap();
        b.on_success(t0, p);
        fail(&mut b, t0, 2);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "2 + 2 failures, not in a row"
        );
        fail(&mut b, t0, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn zero_threshold_and_probes_are_taken_as_one() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0, RECOVERY, 0, MAX_WAIT);
        fail(&mut b, t0, 1);
        assert_eq!(b.state(), BreakerState::Open);
        b.handle_timeout(t0 + RECOVERY);
        assert_eq!(b.try_acquire(), Some(Permit::Probe));
        assert_eq!(b.try_acquire(), None);
        b.on_success(t0 + RECOVERY, Permit::Probe);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn open_half_opens_at_the_recovery_deadline() {
        let t0 = Instant::now();
        let mut b = breaker();
        fail(&mut b, t0, 3);
        b.handle_timeout(t0 + RECOVERY - ms(1));
        assert_eq!(b.state(), BreakerState::Open, "before the deadline");
        b.handle_timeout(t0 + RECOVERY);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.poll_timeout(), Some(t0 + RECOVERY + MAX_WAIT));
        assert_eq!(
            drain(&mut b),
            vec![
                (BreakerState::Closed, BreakerState::Open),
                (BreakerState::Open, BreakerState::HalfOpen)
            ]
        );
    }

    #[test]
    fn late_timeout_half_opens_from_the_call_time() {
        let t0 = Instant::now();
        let mut b = breaker();
        fail(&mut b, t0, 3);
        let late = t0 + RECOVERY + ms(500);
        b.handle_timeout(late);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.poll_timeout(), Some(late + MAX_WAIT));
    }

    #[test]
    fn probes_are_bounded_while_half_open() {
        let t0 = Instant::now();
        let mut b = breaker();
        half_open(&mut b, t0);
        assert_eq!(b.try_acquire(), Some(Permit::Probe));
        assert_eq!(b.try_acquire(), Some(Permit::Probe));
        assert_eq!(b.try_acquire(), None, "two probes in flight at most");
        b.release(Permit::Probe);
        assert_eq!(b.try_acquire(), Some(Permit::Probe), "release frees a slot");
        assert_eq!(b.try_acquire(), None);
    }

    #[test]
    fn successful_probes_close_even_sequentially() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        let p = b.try_acquire().unwrap();
        b.on_success(at, p);
        assert_eq!(b.state(), BreakerState::HalfOpen, "one success of two");
        let p = b.try_acquire().unwrap();
        assert_eq!(p, Permit::Probe, "the success freed its slot");
        b.on_success(at, p);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.try_acquire(), Some(Permit::Normal));
        assert_eq!(
            drain(&mut b),
            vec![(BreakerState::HalfOpen, BreakerState::Closed)]
        );
    }

    #[test]
    fn closing_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        for _ in 0..2 {
            let p = b.try_acquire().unwrap();
            b.on_success(at, p);
        }
        fail(&mut b, at, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&mut b, at, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn probe_failure_reopens_with_a_fresh_recovery_timer() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        let first = b.try_acquire().unwrap();
        let second = b.try_acquire().unwrap();
        b.on_success(at, first);
        b.on_failure(at + ms(7), second);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire(), None);
        assert_eq!(b.poll_timeout(), Some(at + ms(7) + RECOVERY));
        assert_eq!(
            drain(&mut b),
            vec![(BreakerState::HalfOpen, BreakerState::Open)]
        );
    }

    #[test]
    fn half_open_reopens_after_the_max_wait() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        let _stuck = b.try_acquire().unwrap();
        b.handle_timeout(at + MAX_WAIT - ms(1));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.handle_timeout(at + MAX_WAIT);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.poll_timeout(), Some(at + MAX_WAIT + RECOVERY));
        assert_eq!(
            drain(&mut b),
            vec![(BreakerState::HalfOpen, BreakerState::Open)]
        );
        // The stuck probe's late answer changes nothing.
        b.on_success(at + MAX_WAIT + ms(1), Permit::Probe);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.poll_transition(), None);
    }

    #[test]
    fn probes_of_an_earlier_half_open_phase_keep_their_slots() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        let probes: Vec<Permit> = std::iter::from_fn(|| b.try_acquire()).collect();
        assert!(!probes.is_empty());
        b.handle_timeout(at + MAX_WAIT);
        b.handle_timeout(at + MAX_WAIT + RECOVERY);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(
            b.try_acquire(),
            None,
            "the earlier probes are still in flight"
        );
        b.on_success(at + MAX_WAIT + RECOVERY, probes[0]);
        assert_eq!(
            b.try_acquire(),
            Some(Permit::Probe),
            "an answer frees its slot"
        );
    }

    #[test]
    fn stale_normal_outcomes_are_ignored_when_open_or_half_open() {
        let t0 = Instant::now();
        let mut b = breaker();
        // Three requests sent while closed, all answered after the circuit opened.
        let early: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        fail(&mut b, t0, 3);
        let deadline = b.poll_timeout();
        b.on_success(t0 + ms(1), early[0]);
        b.on_failure(t0 + ms(2), early[1]);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.poll_timeout(),
            deadline,
            "a stale failure does not re-arm"
        );
        let at = deadline.unwrap();
        b.handle_timeout(at);
        drain(&mut b);
        let probe = b.try_acquire().unwrap();
        b.on_failure(at, early[2]);
        b.on_success(at, Permit::Normal);
        b.on_success(at, Permit::Normal);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "normal outcomes decide nothing"
        );
        assert_eq!(b.try_acquire(), Some(Permit::Probe), "one probe slot left");
        assert_eq!(b.try_acquire(), None);
        b.release(Permit::Normal);
        assert_eq!(
            b.try_acquire(),
            None,
            "releasing a normal permit frees no probe"
        );
        b.on_failure(at, probe);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn stale_probe_outcomes_are_ignored_when_closed_or_open() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        let probes: Vec<Permit> = (0..2).map(|_| b.try_acquire().unwrap()).collect();
        b.on_failure(at, probes[0]);
        assert_eq!(b.state(), BreakerState::Open);
        b.on_success(at, probes[1]);
        b.on_failure(at, probes[1]);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.poll_timeout(), Some(at + RECOVERY));

        // Half-open again, then closed; a probe answered in Closed counts for nothing.
        let at = b.poll_timeout().unwrap();
        b.handle_timeout(at);
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        let p3 = {
            b.on_success(at, p1);
            b.try_acquire().unwrap()
        };
        b.on_success(at, p2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&mut b, at, 2);
        b.on_failure(at, p3);
        b.on_failure(at, Permit::Probe);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "probe failures do not count"
        );
    }

    #[test]
    fn probe_outcome_with_no_probe_in_flight_is_ignored() {
        let t0 = Instant::now();
        let mut b = breaker();
        let at = half_open(&mut b, t0);
        b.on_success(at, Permit::Probe);
        b.on_success(at, Permit::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.on_failure(at, Permit::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.release(Permit::Probe);
        assert_eq!(b.try_acquire(), Some(Permit::Probe));
        assert_eq!(b.try_acquire(), Some(Permit::Probe));
        assert_eq!(b.try_acquire(), None, "release never goes below zero");
    }

    #[test]
    fn spurious_timeouts_are_no_ops() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.handle_timeout(t0);
        b.handle_timeout(t0 + RECOVERY * 10);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.transitions(), 0);

        fail(&mut b, t0, 3);
        b.handle_timeout(t0);
        b.handle_timeout(t0 + ms(1));
        assert_eq!(b.state(), BreakerState::Open);

        b.handle_timeout(t0 + RECOVERY);
        let probe = b.try_acquire().unwrap();
        b.handle_timeout(t0 + RECOVERY);
        b.handle_timeout(t0 + RECOVERY + ms(1));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.try_acquire(), Some(Permit::Probe), "slots untouched");
        b.release(probe);
        assert_eq!(b.transitions(), 2);
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::MAX, 1, Duration::MAX);
        fail(&mut b, t0, 1);
        assert_eq!(b.poll_timeout(), Some(t0 + FIRST_OPEN_WAIT));
        b.handle_timeout(t0 + FIRST_OPEN_WAIT);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(
            b.poll_timeout(),
            None,
            "the half-open wait is beyond any instant"
        );
        b.handle_timeout(t0 + Duration::from_secs(1_000_000));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    /// Opens a default-like breaker (threshold 1, one probe, 60 s recovery) at `t0`, then fails
    /// every probe as soon as it is allowed until `until`; returns the open intervals in order.
    fn failed_probe_waits(b: &mut Breaker, t0: Instant, until: Instant) -> Vec<Duration> {
        fail(b, t0, 1);
        let mut waits = Vec::new();
        let mut opened = t0;
        for _ in 0..10_000 {
            let at = b.poll_timeout().unwrap();
            if at > until {
                return waits;
            }
            waits.push(at - opened);
            b.handle_timeout(at);
            let probe = b.try_acquire().unwrap();
            b.on_failure(at, probe);
            assert_eq!(b.state(), BreakerState::Open);
            opened = at;
        }
        panic!("more than 10,000 probes before {until:?}");
    }

    #[test]
    fn open_interval_grows_from_a_second_to_the_recovery_timeout() {
        let t0 = Instant::now();
        let recovery = Duration::from_secs(60);
        let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
        let waits = failed_probe_waits(&mut b, t0, t0 + Duration::from_secs(3600));
        assert_eq!(waits[0], FIRST_OPEN_WAIT, "a short first wait");
        assert!(
            waits.windows(2).all(|w| w[0] <= w[1]),
            "never shrinks: {waits:?}"
        );
        assert_eq!(*waits.last().unwrap(), recovery, "capped: {waits:?}");
        // A long outage is probed at most once per recovery timeout once the interval is
        // capped: from the first probe failing four recovery timeouts into the outage.
        let capped_at = waits.iter().position(|w| *w == recovery).unwrap();
        let before_cap: Duration = waits[..capped_at].iter().sum();
        assert!(before_cap < recovery * 5, "{before_cap:?}");
        assert!(waits[capped_at..].iter().all(|w| *w == recovery));
        assert!(waits.len() < 100, "{} probes in an hour", waits.len());
    }

    #[test]
    fn a_short_outage_is_probed_again_within_a_quarter_of_its_length() {
        let t0 = Instant::now();
        let recovery = Duration::from_secs(60);
        for outage_secs in [1, 3, 5, 8, 20, 100] {
            let back = t0 + Duration::from_secs(outage_secs);
            let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
            failed_probe_waits(&mut b, t0, back);
            // The broker is back: the next probe, due at the pending deadline, succeeds.
            let next = b.poll_timeout().unwrap();
            let bound = FIRST_OPEN_WAIT.max(Duration::from_secs(outage_secs) / 4);
            assert!(
                next - back <= bound,
                "outage of {outage_secs} s: probed {:?} after the return",
                next - back
            );
            b.handle_timeout(next);
            let probe = b.try_acquire().unwrap();
            b.on_success(next, probe);
            assert_eq!(b.state(), BreakerState::Closed);
        }
    }

    #[test]
    fn closing_ends_the_outage_and_the_next_one_starts_short() {
        let t0 = Instant::now();
        let recovery = Duration::from_secs(60);
        let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
        failed_probe_waits(&mut b, t0, t0 + Duration::from_secs(600));
        let at = b.poll_timeout().unwrap();
        b.handle_timeout(at);
        let probe = b.try_acquire().unwrap();
        b.on_success(at, probe);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&mut b, at + ms(1), 1);
        assert_eq!(b.poll_timeout(), Some(at + ms(1) + FIRST_OPEN_WAIT));
    }

    #[test]
    fn an_undecided_half_open_phase_counts_as_a_failed_probe() {
        let t0 = Instant::now();
        let recovery = Duration::from_secs(60);
        let mut b = Breaker::new(1, recovery, 1, Duration::from_secs(8));
        fail(&mut b, t0, 1);
        let at = b.poll_timeout().unwrap();
        b.handle_timeout(at);
        let _stuck = b.try_acquire().unwrap();
        let expiry = b.poll_timeout().unwrap();
        b.handle_timeout(expiry);
        assert_eq!(b.state(), BreakerState::Open);
        // Opened 9 s into the outage: a quarter of that.
        assert_eq!(b.poll_timeout(), Some(expiry + (expiry - t0) / 4));
    }

    #[test]
    fn transitions_queue_in_order_and_count() {
        let t0 = Instant::now();
        let mut b = breaker();
        fail(&mut b, t0, 3);
        b.handle_timeout(t0 + RECOVERY);
        b.handle_timeout(t0 + RECOVERY + MAX_WAIT);
        let at = t0 + RECOVERY + MAX_WAIT + RECOVERY;
        b.handle_timeout(at);
        let p = b.try_acquire().unwrap();
        b.on_failure(at, p);
        b.handle_timeout(at + RECOVERY);
        for _ in 0..2 {
            let p = b.try_acquire().unwrap();
            b.on_success(at + RECOVERY, p);
        }
        use BreakerState::{Closed, HalfOpen, Open};
        assert_eq!(
            drain(&mut b),
            vec![
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed),
            ]
        );
        assert_eq!(b.transitions(), 7);
        assert_eq!(b.poll_transition(), None, "drained");
        fail(&mut b, at + RECOVERY, 3);
        assert_eq!(b.poll_transition(), Some((Closed, Open)));
        assert_eq!(b.transitions(), 8, "the total survives draining");
    }
}
