//! The consumer-group session: coordinator, membership, heartbeats, rebalance state.
//!
//! Pure bookkeeping; the machine sends the requests and moves partitions.

use std::time::{Duration, Instant};

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Asking which broker coordinates the group.
    FindCoordinator,
    /// Joining (or rejoining) the group.
    Join,
    /// A member of generation `generation`, heartbeating.
    Stable,
    /// Giving up every partition: draining until `deadline`, then one commit under the old
    /// generation (`committing`), then rejoin.
    Revoking { deadline: Instant, committing: bool },
    /// Closing: the LeaveGroup is in flight or due.
    Leaving,
    /// Left (or never joined); nothing more to send.
    Left,
}

#[derive(Debug)]
pub(crate) struct GroupSession {
    pub(crate) phase: Phase,
    /// Empty until the broker gives one.
    pub(crate) member_id: String,
    pub(crate) generation: u64,
    /// A FindCoordinator, JoinGroup or LeaveGroup is in flight.
    pub(crate) request_in_flight: bool,
    pub(crate) heartbeat_in_flight: bool,
    /// When the next heartbeat is due (Stable and Revoking).
    pub(crate) next_heartbeat: Option<Instant>,
    /// The broker last confirmed membership (heartbeat or join).
    pub(crate) last_confirmed: Instant,
    /// No group request before this (backoff after a failure).
    pub(crate) retry_at: Option<Instant>,
    pub(crate) failures: u32,
    interval: Duration,
    session_timeout: Duration,
}

impl GroupSession {
    pub(crate) fn new(now: Instant, interval: Duration, session_timeout: Duration) -> Self {
        Self {
            phase: Phase::FindCoordinator,
            member_id: String::new(),
            generation: 0,
            request_in_flight: false,
            heartbeat_in_flight: false,
            next_heartbeat: None,
            last_confirmed: now,
            retry_at: None,
            failures: 0,
            interval,
            session_timeout,
        }
    }

    /// The broker accepted this member into `generation`.
    pub(crate) fn joined(&mut self, now: Instant, member_id: String, generation: u64) {
        self.member_id = member_id;
        self.generation = generation;
        self.phase = Phase::Stable;
        self.failures = 0;
        self.confirmed(now);
    }

    /// The broker confirmed membership (a heartbeat answered 0).
    pub(crate) fn confirmed(&mut self, now: Instant) {
        self.last_confirmed = now;
        self.next_heartbeat = Some(now + self.interval);
    }

    /// A heartbeat got no answer: try again at the normal interval.
    pub(crate) fn heartbeat_failed(&mut self, now: Instant) {
        self.next_heartbeat = Some(now + self.interval);
    }

    /// True while this member holds (or is giving back) an assignment.
    pub(crate) fn is_member(&self) -> bool {
        matches!(self.phase, Phase::Stable | Phase::Revoking { .. })
    }

    /// When the broker will have evicted us if no heartbeat gets through.
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.is_member()
            .then(|| self.last_confirmed + self.session_timeout)
    }

    /// Forget the membership (the broker evicted us or lost the group).
    pub(crate) fn forget_member(&mut self) {
        self.member_id.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn heartbeats_follow_confirmations_and_expiry_follows_the_last_one() {
        let t0 = Instant::now();
        let mut g = GroupSession::new(t0, Duration::from_secs(3), Duration::from_secs(10));
        assert!(!g.is_member());
        assert_eq!(g.expires_at(), None);
        g.joined(t0, "m".into(), 4);
        assert_eq!(g.next_heartbeat, Some(t0 + Duration::from_secs(3)));
        assert_eq!(g.expires_at(), Some(t0 + Duration::from_secs(10)));
        g.heartbeat_failed(t0 + Duration::from_secs(3));
        assert_eq!(
            g.expires_at(),
            Some(t0 + Duration::from_secs(10)),
            "failures do not extend it"
        );
        g.confirmed(t0 + Duration::from_secs(6));
        assert_eq!(g.expires_at(), Some(t0 + Duration::from_secs(16)));
        g.forget_member();
        assert!(g.member_id.is_empty());
    }
}
