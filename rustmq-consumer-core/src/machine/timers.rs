//! The machine's named deadlines: one table that `poll_timeout` and `handle_timeout` both read.
//!
//! Each [`Timer`] names one kind of deadline. The coordinator reads a kind's earliest deadline
//! from the sub-machine that owns it ([`ConsumerMachine::deadline`](super::ConsumerMachine)),
//! and the same lookup decides what `poll_timeout` offers and what `handle_timeout` fires, so
//! the two cannot disagree.

use std::time::Instant;

use tracing::{debug, warn};

use super::ConsumerMachine;
use crate::error::TransportError;
use crate::event::{BreakerState, Reason, RequestError};

/// One kind of deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// The circuit breaker's recovery or half-open deadline.
    Breaker,
    /// A cached message's time to live.
    CacheTtl,
    /// The earliest in-flight request's deadline.
    RequestDeadline,
    /// The earliest nacked message's redelivery.
    Retry,
    /// The earliest partition's fetch backoff.
    FetchBackoff,
    /// Settled offsets waited `ack_batch_timeout` for a commit, or a full batch
    /// `ack_batch_min_interval` since the last one.
    AckFlush,
    /// The failed commit's retry.
    CommitRetry,
    /// The group request's retry (FindCoordinator, JoinGroup; a manual assignment's join).
    GroupRetry,
    /// The group session's expiry without a confirmed heartbeat.
    SessionExpiry,
    /// The failed dead-letter produce's retry.
    DeadLetterRetry,
    /// The close phase's deadline.
    Close,
    /// The next group heartbeat.
    Heartbeat,
    /// The rebalance's drain deadline.
    Rebalance,
}

impl Timer {
    /// Every timer, in the order `handle_timeout` fires them (ties in `poll_timeout` go to the
    /// first).
    pub(crate) const ALL: [Timer; 13] = [
        Timer::Breaker,
        Timer::CacheTtl,
        Timer::RequestDeadline,
        Timer::Retry,
        Timer::FetchBackoff,
        Timer::AckFlush,
        Timer::CommitRetry,
        Timer::GroupRetry,
        Timer::SessionExpiry,
        Timer::DeadLetterRetry,
        Timer::Close,
        Timer::Heartbeat,
        Timer::Rebalance,
    ];

    /// The public name of this deadline.
    pub(crate) fn reason(self) -> Reason {
        match self {
            Timer::Breaker => Reason::Breaker,
            Timer::CacheTtl => Reason::CacheTtl,
            Timer::RequestDeadline => Reason::RequestDeadline,
            Timer::Retry => Reason::Retry,
            Timer::FetchBackoff => Reason::FetchBackoff,
            Timer::AckFlush => Reason::AckFlush,
            Timer::CommitRetry => Reason::CommitRetry,
            Timer::GroupRetry => Reason::GroupRetry,
            Timer::SessionExpiry => Reason::SessionExpiry,
            Timer::DeadLetterRetry => Reason::DeadLetterRetry,
            Timer::Close => Reason::Close,
            Timer::Heartbeat => Reason::Heartbeat,
            Timer::Rebalance => Reason::Rebalance,
        }
    }
}

/// A snapshot of every timer's deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Reads every timer through `deadline`.
    pub(crate) fn read(mut deadline: impl FnMut(Timer) -> Option<Instant>) -> Self {
        let mut table = Self::default();
        for (slot, timer) in table.deadlines.iter_mut().zip(Timer::ALL) {
            *slot = deadline(timer);
        }
        table
    }

    /// The earliest deadline and its timer; ties go to the timer first in [`Timer::ALL`].
    pub(crate) fn next(&self) -> Option<(Instant, Timer)> {
        let mut best: Option<(Instant, Timer)> = None;
        for (at, timer) in self.deadlines.iter().zip(Timer::ALL) {
            if let Some(at) = *at {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, timer));
                }
            }
        }
        best
    }
}

impl ConsumerMachine {
    /// The timer table: when `timer` is next due, if armed. `poll_timeout` offers the
    /// earliest of these and `handle_timeout` fires each that is due, so every deadline
    /// offered is one that is handled.
    pub(super) fn deadline(&self, timer: Timer) -> Option<Instant> {
        let closing = self.close.is_some();
        let group = self.group.as_ref();
        match timer {
            Timer::Breaker => self.breaker.poll_timeout(),
            Timer::CacheTtl => self.partitions.cache_deadline(),
            Timer::RequestDeadline => self.requests.deadline(),
            Timer::Retry => self.partitions.next_retry().filter(|_| !closing),
            Timer::FetchBackoff => self.partitions.next_fetch_backoff().filter(|_| !closing),
            Timer::AckFlush => self.committer.ack_flush_at(&self.config),
            Timer::CommitRetry => self.committer.retry_at,
            Timer::DeadLetterRetry => self.dead_letters.retry_at,
            Timer::GroupRetry => group
                .and_then(|g| g.retry_at)
                .or_else(|| self.manual.as_ref().and_then(|m| m.retry_at)),
            Timer::SessionExpiry => group.and_then(|g| g.expires_at()).filter(|_| !closing),
            Timer::Heartbeat => group
                .filter(|g| g.is_member() && !g.heartbeat_in_flight && !closing)
                .and_then(|g| g.next_heartbeat),
            // The drain deadline matters only while no commit is in flight (its answer or
            // deadline moves the revoke on) and not once closing (the close drains instead).
            Timer::Rebalance => match group.and_then(|g| g.revoking()) {
                Some((deadline, false)) if !self.committer.in_flight && !closing => Some(deadline),
                _ => None,
            },
            Timer::Close => self.close.and_then(|c| c.deadline()),
        }
    }

    /// Fires one due timer.
    pub(super) fn on_timer(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Breaker => {
                let was_open = self.breaker.state() == BreakerState::Open;
                self.breaker.handle_timeout(now);
                if was_open && self.breaker.state() == BreakerState::HalfOpen {
                    // The breaker paced the outage: partitions backing off after failed
                    // fetches fetch now, as probes, instead of waiting out a backoff grown
                    // during the outage.
                    self.partitions.end_failure_backoff();
                }
            }
            Timer::CacheTtl => self.partitions.cache_timeout(now),
            Timer::RequestDeadline => {
                while let Some((id, flight)) = self.requests.expired(now) {
                    debug!(request = id.0, "request deadline passed");
                    let timed_out = Err(RequestError::Transport(TransportError::TimedOut));
                    self.finish_request(now, id, flight, timed_out);
                }
            }
            Timer::Retry => self.partitions.retries_due(now),
            Timer::FetchBackoff => self.partitions.fetch_backoffs_due(now),
            Timer::AckFlush => self.committer.flush(),
            Timer::CommitRetry => self.committer.retry_at = None,
            Timer::DeadLetterRetry => self.dead_letters.retry_at = None,
            Timer::GroupRetry => {
                if let Some(g) = &mut self.group {
                    g.retry_at = None;
                }
                if let Some(m) = &mut self.manual {
                    m.retry_at = None;
                }
            }
            Timer::SessionExpiry => {
                // The broker has evicted us by now: the assignment is lost. Fence locally.
                warn!(group = %self.config.consumer_group, "session expired without a heartbeat; assignment lost");
                self.lose_assignment();
                if let Some(g) = &mut self.group {
                    g.fence();
                }
            }
            Timer::Close => self.advance_close(now, true),
            // Sent by the group step of `poll_work`, which runs after every input.
            Timer::Heartbeat | Timer::Rebalance => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn the_earliest_deadline_wins_and_ties_go_to_the_first_timer() {
        let t0 = Instant::now();
        assert_eq!(TimerTable::read(|_| None).next(), None);
        let table = TimerTable::read(|t| match t {
            Timer::Close | Timer::Retry => Some(t0),
            Timer::Heartbeat => Some(t0 - Duration::from_millis(1)),
            _ => Some(t0 + Duration::from_secs(1)),
        });
        assert_eq!(
            table.next(),
            Some((t0 - Duration::from_millis(1), Timer::Heartbeat))
        );
        let tie = TimerTable::read(|t| matches!(t, Timer::Close | Timer::Retry).then_some(t0));
        assert_eq!(tie.next(), Some((t0, Timer::Retry)));
    }
}
