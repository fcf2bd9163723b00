//! The group session's checks: ownership learnt from JoinGroup answers (adopted on
//! `Assigned`), stale hand-backs refused (`stale-ack-refused`), the LeaveGroup only after the
//! final commit (`commit-before-leave`), commits only of owned partitions under the generation
//! and member id that assigned them (`commit-owned`), and the broker's offsets never moving
//! back (`broker-commit-monotonic`).

use rustmq_consumer_core::{ClosePhase, UsageError};

use super::names::*;
use super::{Checker, Violation};

impl Checker {
    /// A successful JoinGroup answer (`generation`, `member`) is about to be handed to the
    /// machine; an `Assigned` event in the same input adopts it. Call
    /// [`Checker::end_of_input`] after the input.
    pub fn on_join_answer(&mut self, generation: u64, member: &str) {
        self.pending_join = Some((generation, member.to_owned()));
    }

    /// Forgets what the current input did not use (a late JoinGroup answer the machine ignored).
    pub fn end_of_input(&mut self) {
        self.pending_join = None;
    }

    /// True when a delivery of `generation` on `partition` is stale: the partition was revoked
    /// or sought since.
    pub fn is_stale(&self, partition: u32, generation: u64) -> bool {
        self.generation(partition) != generation
    }

    /// The application handed back a *stale* delivery (its partition was revoked or sought
    /// since): the machine must refuse it as [`UsageError::StaleDelivery`], and the settle
    /// watermark (`before`, `after` the command) must not move.
    pub fn on_stale_handback(
        &mut self,
        partition: u32,
        offset: u64,
        result: Result<(), &UsageError>,
        before: Option<u64>,
        after: Option<u64>,
    ) -> Result<(), Violation> {
        match result {
            Err(UsageError::StaleDelivery { .. }) if before == after => {
                self.stale_refused += 1;
                Ok(())
            }
            Err(UsageError::StaleDelivery { .. }) => self.fail(
                STALE_ACK_REFUSED,
                format!("refused stale delivery of partition {partition} offset {offset} moved the watermark from {before:?} to {after:?}"),
            ),
            Ok(()) => self.fail(
                STALE_ACK_REFUSED,
                format!("delivery of partition {partition} offset {offset} from a revoked assignment (or before a seek) was accepted (watermark {before:?} -> {after:?})"),
            ),
            Err(e) => self.fail(
                STALE_ACK_REFUSED,
                format!("stale delivery of partition {partition} offset {offset} refused for the wrong reason: {e}"),
            ),
        }
    }

    /// Checks that a LeaveGroup about to be sent comes after the final commit: the close
    /// reached `LeavingGroup`, no commit is unanswered unless the final commit's deadline
    /// passed, and every settled offset is committed (`uncommitted` lists the owned partitions
    /// whose settle watermark the broker has not confirmed) unless a `CommitFailed` said why.
    /// A manual assignment's LeaveGroup follows the join that learned its generation: none of
    /// this applies.
    pub fn on_leave_sent(&mut self, uncommitted: &[u32]) -> Result<(), Violation> {
        if !self.group {
            return Ok(());
        }
        self.check_leave(uncommitted)?;
        self.leave_sent = true;
        Ok(())
    }

    fn check_leave(&self, uncommitted: &[u32]) -> Result<(), Violation> {
        if !uncommitted.is_empty() && !self.close_commit_failed {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent with the settled offsets of partitions {uncommitted:?} uncommitted and no CommitFailed reported (close phase {:?})",
                    self.close_phase
                ),
            );
        }
        if self.close_phase != Some(ClosePhase::LeavingGroup) {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent in close phase {:?}, before the final commit was done",
                    self.close_phase
                ),
            );
        }
        if !self.commits_in_flight.is_empty() && !self.final_commit_expired {
            return self.fail(
                COMMIT_BEFORE_LEAVE,
                format!(
                    "LeaveGroup sent while commit {:?} is unanswered and the final commit's deadline has not passed",
                    self.commits_in_flight
                ),
            );
        }
        Ok(())
    }

    /// Checks that a commit names only owned partitions and, in group mode, goes under the
    /// generation and member id that assigned them. (A manual assignment commits under the
    /// generation it learned by joining and leaving; the broker refuses any other, and an
    /// orphan member of a join whose answer was lost bumps it: liveness covers it.)
    pub fn check_commit_owner(
        &self,
        offsets: &[(u32, u64)],
        generation: u64,
        member: &str,
    ) -> Result<(), Violation> {
        for &(p, o) in offsets {
            if !self.owned.contains(&p) {
                return self.fail(
                    COMMIT_OWNED,
                    format!(
                        "commit of partition {p} at {o} while the consumer owns {:?}",
                        self.owned
                    ),
                );
            }
        }
        // The machine forgets its member id when the broker answers 25 or 16, before the
        // revoke commit: an empty id is tolerated (the broker does not check membership).
        let member_ok = member == self.member || member.is_empty();
        if self.group && !offsets.is_empty() && (generation != self.owned_generation || !member_ok)
        {
            return self.fail(
                COMMIT_OWNED,
                format!(
                    "commit {offsets:?} under generation {generation} member {member:?}; the partitions were assigned under generation {} member {:?}",
                    self.owned_generation, self.member
                ),
            );
        }
        Ok(())
    }

    /// Group mode: checks that an accepted commit does not move the broker's offset of a
    /// partition backwards; `previous` gives what the broker held before it.
    pub fn check_commit_monotonic(
        &self,
        offsets: &[(u32, u64)],
        previous: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), Violation> {
        if !self.group {
            return Ok(());
        }
        for &(p, o) in offsets {
            if let Some(prev) = previous(p).filter(|&prev| o < prev) {
                return self.fail(
                    BROKER_COMMIT_MONOTONIC,
                    format!("broker's offset of partition {p} moved back from {prev} to {o}"),
                );
            }
        }
        Ok(())
    }
}
