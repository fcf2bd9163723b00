//! The consumer-group session: coordinator, membership, heartbeats, the revoke's phases and
//! fencing. It sends its own requests and handles their answers; the coordinator moves the
//! partitions when the assignment changes.

use std::time::{Duration, Instant};

use tracing::debug;

use super::requests::{check, expect, Owner, Requests};
use crate::backoff::{later, Jitter};
use crate::breaker::Breaker;
use crate::config::ConsumerConfig;
use crate::event::RequestError;
use crate::protocol::{
    error_code, ConsumerHeartbeatRequest, FindCoordinatorRequest, JoinGroupRequest,
    LeaveGroupRequest, Request, RequestKind, Response, TopicPartition,
};

/// What a heartbeat's answer asks of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeartbeatOutcome {
    /// Nothing.
    Stay,
    /// Revoke the assignment and rejoin; `forget_member` when the broker no longer knows us,
    /// `fenced` when it refused our generation.
    Rebalance { forget_member: bool, fenced: bool },
}

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
        self.next_heartbeat = Some(later(now, self.interval));
    }

    /// A heartbeat got no answer: try again at the normal interval.
    pub(crate) fn heartbeat_failed(&mut self, now: Instant) {
        self.next_heartbeat = Some(later(now, self.interval));
    }

    /// True while this member holds (or is giving back) an assignment.
    pub(crate) fn is_member(&self) -> bool {
        matches!(self.phase, Phase::Stable | Phase::Revoking { .. })
    }

    /// When the broker will have evicted us if no heartbeat gets through.
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.is_member()
            .then(|| later(self.last_confirmed, self.session_timeout))
    }

    /// Forget the membership (the broker evicted us or lost the group).
    pub(crate) fn forget_member(&mut self) {
        self.member_id.clear();
    }

    /// The drain deadline and whether the revoke commit went, while revoking.
    pub(crate) fn revoking(&self) -> Option<(Instant, bool)> {
        match self.phase {
            Phase::Revoking {
                deadline,
                committing,
            } => Some((deadline, committing)),
            _ => None,
        }
    }

    /// A group request failed: try again after a backoff.
    fn request_failed(&mut self, now: Instant, jitter: &mut Jitter) {
        self.request_in_flight = false;
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(later(now, jitter.after_failures(self.failures)));
    }

    /// Sends the heartbeat if it is due. False when the breaker said no.
    pub(crate) fn send_heartbeat(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> bool {
        let due = self.is_member()
            && !self.heartbeat_in_flight
            && self.next_heartbeat.is_some_and(|t| t <= now);
        if !due {
            return true;
        }
        let Some(permit) = breaker.try_acquire() else {
            self.heartbeat_failed(now);
            return false;
        };
        self.heartbeat_in_flight = true;
        self.next_heartbeat = None;
        let generation = self.generation;
        let request = ConsumerHeartbeatRequest {
            group_id: config.consumer_group.clone(),
            member_id: self.member_id.clone(),
            generation_id: generation,
        };
        requests.send(now, permit, Owner::Heartbeat { generation }, request.into());
        true
    }

    /// Sends the FindCoordinator, JoinGroup (not while closing) or LeaveGroup the phase
    /// needs. False when the breaker said no.
    pub(crate) fn send_request(
        &mut self,
        now: Instant,
        closing: bool,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> bool {
        if self.request_in_flight || self.retry_at.is_some() {
            return true;
        }
        let group_id = config.consumer_group.clone();
        let (owner, request): (Owner, Request) = match self.phase {
            Phase::FindCoordinator if !closing => (
                Owner::FindCoordinator,
                FindCoordinatorRequest { group_id }.into(),
            ),
            Phase::Join if !closing => (
                Owner::Join,
                JoinGroupRequest {
                    group_id,
                    member_id: self.member_id.clone(),
                    session_timeout_ms: u32::try_from(config.session_timeout.as_millis())
                        .unwrap_or(u32::MAX),
                    topics: vec![config.topic.clone()],
                }
                .into(),
            ),
            Phase::Leaving => (
                Owner::Leave,
                LeaveGroupRequest {
                    group_id,
                    member_id: self.member_id.clone(),
                }
                .into(),
            ),
            _ => return true,
        };
        let Some(permit) = breaker.try_acquire() else {
            return false;
        };
        self.request_in_flight = true;
        requests.send(now, permit, owner, request);
        true
    }

    pub(crate) fn on_find_coordinator(
        &mut self,
        now: Instant,
        answer: Result<Response, RequestError>,
        jitter: &mut Jitter,
    ) -> Result<(), RequestError> {
        let answer = expect(answer, RequestKind::FindCoordinator, |r| match r {
            Response::FindCoordinator(r) => Ok(r.error_code),
            other => Err(other),
        })
        .and_then(|code| check(RequestKind::FindCoordinator, code));
        if let Err(error) = answer {
            self.request_failed(now, jitter);
            return Err(error);
        }
        self.request_in_flight = false;
        if self.phase == Phase::FindCoordinator {
            self.phase = Phase::Join;
        }
        Ok(())
    }

    /// The JoinGroup answered: returns this member's assignment (`None` while closing: the
    /// close will leave).
    pub(crate) fn on_join(
        &mut self,
        now: Instant,
        answer: Result<Response, RequestError>,
        closing: bool,
        jitter: &mut Jitter,
    ) -> Result<Option<Vec<TopicPartition>>, RequestError> {
        let answer = expect(answer, RequestKind::JoinGroup, |r| match r {
            Response::JoinGroup(r) => Ok(r),
            other => Err(other),
        })
        .and_then(|r| check(RequestKind::JoinGroup, r.error_code).map(|()| r));
        let mut r = match answer {
            Ok(r) => r,
            Err(error) => {
                self.request_failed(now, jitter);
                return Err(error);
            }
        };
        self.request_in_flight = false;
        self.joined(now, r.member_id.clone(), r.generation_id);
        debug!(member = %r.member_id, generation = r.generation_id, "joined");
        if closing {
            return Ok(None);
        }
        Ok(Some(
            r.assigned_partitions
                .remove(&r.member_id)
                .unwrap_or_default(),
        ))
    }

    pub(crate) fn on_heartbeat(
        &mut self,
        now: Instant,
        generation: u64,
        answer: Result<Response, RequestError>,
    ) -> Result<HeartbeatOutcome, RequestError> {
        let answer = expect(answer, RequestKind::ConsumerHeartbeat, |r| match r {
            Response::ConsumerHeartbeat(r) => Ok(r.error_code),
            other => Err(other),
        });
        let current = self.generation == generation;
        let code = match answer {
            Ok(_) if !current => return Ok(HeartbeatOutcome::Stay), // about an earlier generation
            Ok(code) => code,
            Err(error) => {
                if current {
                    self.heartbeat_in_flight = false;
                    self.heartbeat_failed(now);
                }
                return Err(error);
            }
        };
        self.heartbeat_in_flight = false;
        Ok(match code {
            error_code::NONE => {
                self.confirmed(now);
                HeartbeatOutcome::Stay
            }
            error_code::REBALANCE_IN_PROGRESS | error_code::ILLEGAL_GENERATION => {
                self.heartbeat_failed(now);
                HeartbeatOutcome::Rebalance {
                    forget_member: false,
                    fenced: code == error_code::ILLEGAL_GENERATION,
                }
            }
            error_code::UNKNOWN_MEMBER | error_code::UNKNOWN_GROUP => {
                self.heartbeat_failed(now);
                HeartbeatOutcome::Rebalance {
                    forget_member: true,
                    fenced: false,
                }
            }
            _ => {
                self.heartbeat_failed(now);
                HeartbeatOutcome::Stay
            }
        })
    }

    /// The LeaveGroup answered or failed: either way we are not a member any more (16, unknown
    /// group, and 0 both mean so).
    pub(crate) fn on_leave(
        &mut self,
        answer: Result<Response, RequestError>,
    ) -> Result<(), RequestError> {
        self.left();
        expect(answer, RequestKind::LeaveGroup, |r| match r {
            Response::LeaveGroup(_) => Ok(()),
            other => Err(other),
        })
    }

    pub(crate) fn left(&mut self) {
        self.request_in_flight = false;
        self.phase = Phase::Left;
    }

    /// Eager rebalance: give up the assignment (drain until `deadline`). False unless Stable.
    pub(crate) fn start_revoke(&mut self, deadline: Instant, forget_member: bool) -> bool {
        if forget_member {
            self.forget_member();
        }
        if self.phase != Phase::Stable {
            return false;
        }
        debug!(
            generation = self.generation,
            "rebalance: revoking the assignment"
        );
        self.phase = Phase::Revoking {
            deadline,
            committing: false,
        };
        true
    }

    /// The revoke commit is going.
    pub(crate) fn revoke_committing(&mut self, deadline: Instant) {
        self.phase = Phase::Revoking {
            deadline,
            committing: true,
        };
    }

    /// The assignment is let go: join again.
    pub(crate) fn revoked(&mut self) {
        if self.is_member() {
            self.phase = Phase::Join;
        }
    }

    /// The session expired: the broker evicted us. Join again as a new member.
    pub(crate) fn fence(&mut self) {
        self.forget_member();
        self.heartbeat_in_flight = false;
        self.next_heartbeat = None;
        self.phase = Phase::Join;
    }

    /// Closing: leave the group if we are in it. False when there is nothing to leave.
    pub(crate) fn leave(&mut self) -> bool {
        if self.is_member() && !self.member_id.is_empty() {
            self.phase = Phase::Leaving;
            true
        } else {
            false
        }
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
