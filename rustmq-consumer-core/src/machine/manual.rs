//! The generation a manual assignment commits under.
//!
//! The broker stores a commit only for a group that exists and only under the group's current
//! generation (it never checks membership), and only a JoinGroup creates a group or reveals its
//! generation. So before its first commit, and again after a commit answered 16 (unknown group:
//! a restarted broker) or 22 (illegal generation), or a FetchOffset answered 16, a manual
//! assignment joins once to create the group and learn its generation, leaves at once (it never
//! holds a slot in the group's assignment), and commits under that generation.
//!
//! Leaving bumps the generation when other members remain. When the join's answer shows other
//! members (a leader or an assignment that is not ours) the generation after the leave is the
//! learned one plus one. A generation learned afresh that a commit still refuses means others
//! share the group: that refusal is reported, and learning again waits for a backoff, so the
//! consumer disturbs the group's members (each join and leave makes them rebalance) at most
//! once per backoff.

use std::time::Instant;

use tracing::debug;

use super::requests::{check, expect, Owner, Requests};
use crate::backoff::{later, Jitter};
use crate::breaker::Breaker;
use crate::config::ConsumerConfig;
use crate::event::RequestError;
use crate::protocol::{JoinGroupRequest, LeaveGroupRequest, Request, RequestKind, Response};

/// The manual assignment's view of its group: the generation to commit under, and the join
/// and leave that learn it.
#[derive(Debug, Default)]
pub(crate) struct ManualGeneration {
    /// The generation commits go under; `None`: learn it before the next commit.
    generation: Option<u64>,
    /// A commit under `generation` was confirmed: it is not only learned.
    proven: bool,
    /// Joined as this member, into this generation (already the one after the leave): leave
    /// before committing.
    leaving: Option<(String, u64)>,
    in_flight: bool,
    /// Consecutive learned generations a commit refused before any was confirmed.
    refusals: u32,
    /// Consecutive failed joins.
    failures: u32,
    /// No join before this (backoff after a failure or a refusal).
    pub(crate) retry_at: Option<Instant>,
}

impl ManualGeneration {
    /// The generation to commit under, once learned (and the leave is done).
    pub(crate) fn generation(&self) -> Option<u64> {
        self.generation.filter(|_| self.leaving.is_none())
    }

    /// Sends the leave that follows a join, or, when `wanted` (a commit is due) and the
    /// generation is unknown, the join that learns it. False when the breaker said no.
    /// Whether [`send`](Self::send) has a request to build (a leave, or a join when a commit
    /// is `wanted` and no generation is known); otherwise it returns at once, so the work step
    /// skips it.
    #[inline]
    pub(crate) fn has_work(&self, wanted: bool) -> bool {
        !self.in_flight
            && (self.leaving.is_some()
                || (wanted && self.generation.is_none() && self.retry_at.is_none()))
    }

    pub(crate) fn send(
        &mut self,
        now: Instant,
        wanted: bool,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> bool {
        if self.in_flight {
            return true;
        }
        // Built only when there is something to send: this runs after every input.
        let group_id = || config.consumer_group.clone();
        let (owner, request): (Owner, Request) = match &self.leaving {
            Some((member, _)) => (
                Owner::Leave,
                LeaveGroupRequest {
                    group_id: group_id(),
                    member_id: member.clone(),
                }
                .into(),
            ),
            None if wanted && self.generation.is_none() && self.retry_at.is_none() => (
                Owner::Join,
                JoinGroupRequest {
                    group_id: group_id(),
                    member_id: String::new(),
                    session_timeout_ms: u32::try_from(config.session_timeout.as_millis())
                        .unwrap_or(u32::MAX),
                    topics: vec![config.topic.clone()],
                }
                .into(),
            ),
            None => return true,
        };
        let Some(permit) = breaker.try_acquire() else {
            return false;
        };
        self.in_flight = true;
        requests.send(now, permit, owner, request);
        true
    }

    /// The join answered: leave next, then commit under the generation it revealed.
    pub(crate) fn on_join(
        &mut self,
        now: Instant,
        answer: Result<Response, RequestError>,
        jitter: &mut Jitter,
    ) -> Result<(), RequestError> {
        self.in_flight = false;
        let answer = expect(answer, RequestKind::JoinGroup, |r| match r {
            Response::JoinGroup(r) => Ok(r),
            other => Err(other),
        })
        .and_then(|r| check(RequestKind::JoinGroup, r.error_code).map(|()| r));
        let r = match answer {
            Ok(r) => r,
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(later(now, jitter.after_failures(self.failures)));
                return Err(error);
            }
        };
        self.failures = 0;
        // Our leave bumps the generation when other members remain.
        let others =
            r.leader_id != r.member_id || r.assigned_partitions.keys().any(|m| *m != r.member_id);
        let generation = r.generation_id + u64::from(others);
        debug!(
            member = %r.member_id,
            joined = r.generation_id,
            others,
            generation,
            "manual assignment: learned the group's generation; leaving"
        );
        self.leaving = Some((r.member_id, generation));
        Ok(())
    }

    /// The leave answered or failed. Either way the learned generation stands: a member whose
    /// leave did not get through is evicted after its session timeout, which keeps the
    /// generation of a group it was alone in.
    pub(crate) fn on_leave(
        &mut self,
        answer: Result<Response, RequestError>,
    ) -> Result<(), RequestError> {
        self.in_flight = false;
        if let Some((_, generation)) = self.leaving.take() {
            self.generation = Some(generation);
            self.proven = false;
        }
        expect(answer, RequestKind::LeaveGroup, |r| match r {
            Response::LeaveGroup(_) => Ok(()),
            other => Err(other),
        })
    }

    /// A commit under the generation was confirmed.
    pub(crate) fn confirmed(&mut self) {
        self.proven = true;
        self.refusals = 0;
    }

    /// The broker does not know the group (a FetchOffset answered 16): learn it again.
    pub(crate) fn forget(&mut self) {
        self.generation = None;
    }

    /// A commit was refused with 16 or 22: learn the generation again. Returns true when the
    /// refusal is worth reporting: the generation was learned afresh and still refused (others
    /// share the group), so the next join waits for a backoff.
    pub(crate) fn refused(&mut self, now: Instant, jitter: &mut Jitter) -> bool {
        self.generation = None;
        if self.proven {
            self.proven = false;
            return false;
        }
        self.refusals = self.refusals.saturating_add(1);
        self.retry_at = Some(later(now, jitter.after_failures(self.refusals)));
        true
    }
}
