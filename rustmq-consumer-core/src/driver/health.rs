//! What `health_report()`, `readiness()` and `liveness()` answer: the state and every reason
//! for it, each with the time it began.

use std::fmt;
use std::time::{Duration, Instant};

use super::error::ConsumerError;
use crate::error::TransportError;
use crate::event::{BreakerState, Health, StallReason};

/// How the consumer is doing, and why (see [`Consumer::health_report`](super::Consumer::health_report)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// The state: from the circuit breaker and progress, and `Unhealthy` while the broker is
    /// unreachable.
    pub health: Health,
    /// The outage in progress ([`ConsumerError::Unreachable`]), if any, else a partition
    /// stalled now ([`ConsumerError::Stalled`]).
    pub cause: Option<ConsumerError>,
    /// Every reason the consumer is not fully well now, each with when it began (on the
    /// runtime's clock) and how long it has lasted. Empty when all is well.
    pub issues: Vec<HealthIssue>,
}

impl HealthReport {
    /// The report of a consumer whose driver has stopped.
    pub(crate) fn stopped() -> Self {
        Self {
            health: Health::Closed,
            cause: None,
            issues: vec![HealthIssue::Closed { stopped: true }],
        }
    }

    /// The readiness probe: passes when there is no issue at all (the broker answered, the
    /// circuit is closed, no partition is stalled or without progress, not closing).
    pub fn readiness(&self) -> Probe {
        Probe {
            passed: self.issues.is_empty(),
            issues: self.issues.clone(),
        }
    }

    /// The liveness probe: fails only when a restart is the remedy: a partition made no
    /// progress for longer than the builder's `progress_timeout` while the broker answered
    /// and had messages for it ([`HealthIssue::NoProgress`]), or the consumer has stopped
    /// ([`HealthIssue::Closed`] with `stopped`). An outage, an open circuit or a stall passes:
    /// a restart cannot bring the broker back.
    pub fn liveness(&self) -> Probe {
        let failing: Vec<HealthIssue> = self
            .issues
            .iter()
            .filter(|issue| {
                matches!(
                    issue,
                    HealthIssue::NoProgress { .. } | HealthIssue::Closed { stopped: true }
                )
            })
            .cloned()
            .collect();
        Probe {
            passed: failing.is_empty(),
            issues: failing,
        }
    }
}

/// One reason the consumer is not fully well ([`HealthReport::issues`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthIssue {
    /// The broker has not answered yet since the consumer started.
    Connecting {
        /// When the consumer started.
        since: Instant,
        /// How long ago.
        elapsed: Duration,
    },
    /// A request got no answer from the broker and none has answered since
    /// ([`ConsumerError::Unreachable`]).
    Unreachable {
        /// Why the request got no answer.
        cause: TransportError,
        /// When the outage began.
        since: Instant,
        /// How long ago.
        elapsed: Duration,
    },
    /// The circuit breaker is not closed.
    Breaker {
        /// `Open` or `HalfOpen`.
        state: BreakerState,
        /// When it entered that state.
        since: Instant,
        /// How long ago.
        elapsed: Duration,
    },
    /// A partition cannot move past `offset` ([`ConsumerError::Stalled`]).
    Stalled {
        /// Partition.
        partition: u32,
        /// The offset that cannot settle.
        offset: u64,
        /// Why.
        reason: StallReason,
        /// When it stalled.
        since: Instant,
        /// How long ago.
        elapsed: Duration,
    },
    /// A partition's settle watermark has not moved for longer than the builder's
    /// `progress_timeout` while the broker answered, its circuit was closed, and it had
    /// messages past the watermark: the application does not settle what it receives (or does
    /// not receive). Paused and stalled partitions are not judged. The lag need not grow: the
    /// high watermark is only learned from fetches, which stop when the buffer is full.
    NoProgress {
        /// Partition.
        partition: u32,
        /// The settle watermark that does not move.
        offset: u64,
        /// Messages past it when it last moved (high watermark minus the watermark).
        lag_then: u64,
        /// Messages past it now.
        lag: u64,
        /// When it last moved (or when the consumer first saw it, or the broker came back).
        since: Instant,
        /// How long ago.
        elapsed: Duration,
    },
    /// Closing, or closed.
    Closed {
        /// The driver has stopped: the consumer will do nothing more.
        stopped: bool,
    },
}

impl fmt::Display for HealthIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connecting { elapsed, .. } => {
                write!(f, "no answer from the broker yet ({elapsed:.1?})")
            }
            Self::Unreachable { cause, elapsed, .. } => {
                write!(f, "broker unreachable for {elapsed:.1?}: {cause}")
            }
            Self::Breaker { state, elapsed, .. } => {
                write!(f, "circuit breaker {state:?} for {elapsed:.1?}")
            }
            Self::Stalled {
                partition,
                offset,
                reason,
                elapsed,
                ..
            } => write!(
                f,
                "partition {partition} stalled at offset {offset} for {elapsed:.1?}: {reason}"
            ),
            Self::NoProgress {
                partition,
                offset,
                lag_then,
                lag,
                elapsed,
                ..
            } => write!(
                f,
                "partition {partition} made no progress past offset {offset} for {elapsed:.1?} (lag {lag_then} then, {lag} now)"
            ),
            Self::Closed { stopped: true } => f.write_str("closed"),
            Self::Closed { stopped: false } => f.write_str("closing"),
        }
    }
}

/// The answer to a readiness or liveness probe ([`Consumer::readiness`](super::Consumer::readiness),
/// [`Consumer::liveness`](super::Consumer::liveness)). Its `Display` is a one-line body for a
/// health endpoint: `ok`, or the failing issues separated by `; `.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probe {
    /// Whether the probe passes.
    pub passed: bool,
    /// The issues that fail it (empty when it passes).
    pub issues: Vec<HealthIssue>,
}

impl Probe {
    /// The HTTP status a health endpoint answers with: 200 when the probe passes, else 503.
    pub fn status_code(&self) -> u16 {
        if self.passed {
            200
        } else {
            503
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            return f.write_str("ok");
        }
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}
