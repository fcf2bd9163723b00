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

    /// New settings (a live configuration update). The state stays: a closed circuit opens
    /// once its failures in a row reach the new threshold (at its next failure if they already
    /// did), an open interval already running keeps its end, and a half-open circuit sends no
    /// more probes while `max_probes` or more are in flight and closes after `max_probes`
    /// successes. Zeros are taken as 1, as in [`Breaker::new`].
    pub(crate) fn reconfigure(
        &mut self,
        failure_threshold: u32,
        recovery_timeout: Duration,
        max_probes: u32,
        half_open_max_wait: Duration,
    ) {
        self.failure_threshold = failure_threshold.max(1);
        self.recovery_timeout = recovery_timeout;
        self.max_probes = max_probes.max(1);
        self.half_open_max_wait = half_open_max_wait;
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

    /// A permit whose request ended with no verdict on the broker (e.g. an answer naming one
    /// partition's problem): frees a probe slot. A no-op for a normal permit.
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
#[allow(clippy::disallowed_methods, clippy::unwrap_used)]
// tests build their base instant once, and may unwrap
mod tests;
