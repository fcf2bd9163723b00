//! The work step that ends every input: deliver, then send what is due in priority order
//! (group, commit, dead letters, FetchOffset, fetches), then move the close along.

use std::time::Instant;

use tracing::debug;

use super::close::{Close, Progress, Step};
use super::commit::CommitAs;
use super::group::Phase as GroupPhase;
use super::partition::Slot;
use super::ConsumerMachine;
use crate::event::{ClosePhase, CommitError, Event, StallReason};

impl ConsumerMachine {
    /// Sends whatever is due and allowed, delivers what credit allows, and reports breaker
    /// transitions. Runs at the end of every input.
    pub(super) fn poll_work(&mut self, now: Instant) {
        // Deliver first: it frees prefetch room, which the fetches below then refill.
        if self.close.is_none() {
            self.partitions.deliver(
                now,
                self.config.max_unacked,
                &mut self.metrics,
                &mut self.events,
            );
        }
        self.send_work(now);
        if self.close.and_then(|c| c.deadline()).is_some() {
            self.advance_close(now, false);
        }
        while let Some((from, to)) = self.breaker.poll_transition() {
            debug!(?from, ?to, "circuit breaker");
            self.events.push_back(Event::BreakerChanged { from, to });
        }
        self.partitions.refresh();
    }

    /// Sends what is due, most valuable first (in half-open, the first requests are the
    /// probes): group, commit, dead letters, FetchOffset, fetches. Stops at the first the
    /// breaker refuses.
    // Always inlined into the work step, with `drive_group`'s check for a group: after an
    // ack, each part is a check that finds nothing to send.
    #[inline(always)]
    pub(super) fn send_work(&mut self, now: Instant) {
        // Closed is final: nothing more goes on the wire, not even a commit still wanted.
        if self.is_closed() {
            return;
        }
        let generation = self.group.as_ref().map(|g| g.generation);
        // Nothing is committed after the LeaveGroup.
        let past_final_commit = matches!(
            self.close_phase(),
            Some(ClosePhase::LeavingGroup | ClosePhase::Closed)
        );
        if !self.drive_group(now, !past_final_commit) {
            return;
        }
        // A manual assignment commits once it knows the group's generation.
        let known = self
            .manual
            .as_ref()
            .is_none_or(|m| m.generation().is_some());
        if self.committer.due(generation) && !past_final_commit && known && !self.send_commit(now) {
            return;
        }
        // Skipped when it would return at once (the common case after an ack).
        if self.dead_letters.has_work() && !self.send_dead_letters(now) {
            return;
        }
        if self.close.is_some() {
            return;
        }
        let (config, breaker, requests) = (&self.config, &mut self.breaker, &mut self.requests);
        if self
            .partitions
            .send_fetch_offset(now, config, breaker, requests)
        {
            self.partitions
                .send_fetches(now, config, breaker, requests, &mut self.metrics);
        }
    }

    /// Sends what the dead-letter outbox has queued, and stalls the partitions of records too
    /// large for any request. False when the breaker said no.
    fn send_dead_letters(&mut self, now: Instant) -> bool {
        let (too_large, sent) =
            self.dead_letters
                .send(now, &self.config, &mut self.breaker, &mut self.requests);
        for t in too_large {
            if let Some(p) = self.partitions.get_mut(t.partition) {
                p.set(t.offset, Slot::Stuck);
                p.stalled = true;
            }
            self.events.push_back(Event::Stalled {
                partition: t.partition,
                offset: t.offset,
                reason: StallReason::DeadLetterTooLarge { size: t.size },
            });
        }
        sent
    }

    /// Sends one commit of every moved watermark. False when the breaker said no.
    pub(super) fn send_commit(&mut self, now: Instant) -> bool {
        let by = match &self.group {
            Some(g) => CommitAs {
                member_id: &g.member_id,
                generation: g.generation,
            },
            None => CommitAs {
                member_id: "",
                // Revoke commits are the group session's; a manual commit waits for the
                // generation (see `send_work`).
                generation: self
                    .manual
                    .as_ref()
                    .and_then(|m| m.generation())
                    .unwrap_or(0),
            },
        };
        self.committer.send(
            now,
            by,
            &mut self.partitions,
            &self.config,
            &mut self.breaker,
            &mut self.requests,
            &mut self.events,
            &mut self.metrics,
        )
    }

    /// Sends what the group session needs: heartbeats (also while revoking), the revoke
    /// commit, FindCoordinator, JoinGroup, LeaveGroup; for a manual assignment, the join and
    /// leave that learn the generation when a commit is due (and `may_commit`). False when
    /// the breaker said no.
    #[inline(always)]
    pub(super) fn drive_group(&mut self, now: Instant, may_commit: bool) -> bool {
        if self.group.is_some() {
            return self.drive_group_session(now);
        }
        let commit_due = may_commit && self.committer.due(None);
        self.manual.as_mut().is_none_or(|m| {
            !m.has_work(commit_due)
                || m.send(
                    now,
                    commit_due,
                    &self.config,
                    &mut self.breaker,
                    &mut self.requests,
                )
        })
    }

    /// [`drive_group`](Self::drive_group) of a group member.
    fn drive_group_session(&mut self, now: Instant) -> bool {
        let closing = self.close.is_some();
        let Some(g) = &mut self.group else {
            return true;
        };
        if !closing && !g.send_heartbeat(now, &self.config, &mut self.breaker, &mut self.requests) {
            return false;
        }
        if !closing && !self.drive_revoke(now) {
            return false;
        }
        let Some(g) = &mut self.group else {
            return true;
        };
        g.send_request(
            now,
            closing,
            &self.config,
            &mut self.breaker,
            &mut self.requests,
        )
    }

    /// Revoking: once drained (or at the deadline), one commit under the generation that
    /// owned the partitions, then let them go. False when the breaker said no.
    pub(super) fn drive_revoke(&mut self, now: Instant) -> bool {
        let Some((deadline, false)) = self.group.as_ref().and_then(|g| g.revoking()) else {
            return true;
        };
        let drained =
            self.partitions.unacked == 0 && self.dead_letters.is_flushed() && !self.revoke_held;
        if !(drained || now >= deadline) || self.committer.in_flight {
            return true;
        }
        let generation = self.group.as_ref().map(|g| g.generation);
        if !self.partitions.has_uncommitted() || self.committer.fenced(generation) {
            // Fenced: the coordinator refuses this generation's commits; the next owner
            // starts from the last commit (at-least-once).
            self.finish_revoke();
            return true;
        }
        if let Some(g) = &mut self.group {
            g.revoke_committing(deadline);
        }
        self.committer.retry_at = None;
        if self.send_commit(now) {
            return true;
        }
        self.events.push_back(Event::CommitFailed {
            ticket: self.committer.requested,
            error: CommitError::CircuitOpen,
        });
        self.finish_revoke();
        false
    }

    /// Moves close through its phases; `expired` when the current phase's deadline passed.
    pub(super) fn advance_close(&mut self, now: Instant, mut expired: bool) {
        while let Some(close) = self.close {
            let next = match close.step(self.close_progress(), expired) {
                Step::Stay => return,
                Step::Enter(phase) => {
                    if phase == ClosePhase::FinalCommit {
                        self.committer.arm();
                    }
                    phase
                }
                Step::Leave { failure } => {
                    if let Some(error) = failure {
                        self.events.push_back(Event::CommitFailed {
                            ticket: self.committer.requested,
                            error,
                        });
                    }
                    if self.group.as_mut().is_some_and(|g| g.leave()) {
                        ClosePhase::LeavingGroup
                    } else {
                        ClosePhase::Closed
                    }
                }
            };
            debug!(phase = ?next, "close phase");
            self.close = Some(Close::enter(next, now, self.config.drain_timeout));
            self.events.push_back(Event::Closing(next));
            match next {
                ClosePhase::FinalCommit | ClosePhase::LeavingGroup => self.send_work(now),
                ClosePhase::Closed => {
                    self.events.push_back(Event::Closed);
                    return;
                }
                _ => {}
            }
            // The next phase has a deadline of its own.
            expired = false;
        }
    }

    pub(super) fn close_progress(&self) -> Progress {
        let group = self.group.as_ref();
        Progress {
            drained: self.partitions.unacked == 0,
            dead_letters_flushed: self.dead_letters.is_flushed(),
            commit_in_flight: self.committer.in_flight,
            uncommitted: self.partitions.has_uncommitted(),
            commit_answered: self.committer.answered_in_close,
            commits_fenced: self.committer.fenced(group.map(|g| g.generation)),
            left: group.is_none_or(|g| g.phase == GroupPhase::Left),
        }
    }
}
