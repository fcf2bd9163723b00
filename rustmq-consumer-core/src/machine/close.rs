//! The close's phases: drain deliveries, flush dead letters, the final commit, leave the
//! group, closed. Each phase is bounded by its own deadline.

use std::time::{Duration, Instant};

use crate::backoff::later;
use crate::event::{ClosePhase, CommitError};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Close {
    pub(crate) phase: ClosePhase,
    /// When the phase gives up waiting.
    pub(crate) deadline: Instant,
}

/// What the close waits on, read from the other sub-machines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    /// No delivery is outstanding with the application.
    pub(crate) drained: bool,
    /// No dead letter is queued or in flight.
    pub(crate) dead_letters_flushed: bool,
    pub(crate) commit_in_flight: bool,
    /// A watermark moved past what was committed.
    pub(crate) uncommitted: bool,
    /// A commit was answered for good during the final-commit phase.
    pub(crate) commit_answered: bool,
    /// The coordinator refused this generation's commits.
    pub(crate) commits_fenced: bool,
    /// Not (or no longer) a group member.
    pub(crate) left: bool,
}

/// The close's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Keep waiting in this phase.
    Stay,
    /// Enter this phase.
    Enter(ClosePhase),
    /// The final commit is over (`failure` says why it did not happen): leave the group, or
    /// close if there is nothing to leave.
    Leave { failure: Option<CommitError> },
}

impl Close {
    /// Enters `phase`, bounded by `timeout` from `now`.
    pub(crate) fn enter(phase: ClosePhase, now: Instant, timeout: Duration) -> Self {
        Self {
            phase,
            deadline: later(now, timeout),
        }
    }

    /// The phase's deadline, unless closed.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        (self.phase != ClosePhase::Closed).then_some(self.deadline)
    }

    /// Where to go from here; `expired` when the phase's deadline passed.
    pub(crate) fn step(&self, p: Progress, expired: bool) -> Step {
        match self.phase {
            ClosePhase::Draining if p.drained || expired => {
                Step::Enter(ClosePhase::FlushingDeadLetters)
            }
            ClosePhase::FlushingDeadLetters if p.dead_letters_flushed || expired => {
                Step::Enter(ClosePhase::FinalCommit)
            }
            ClosePhase::FinalCommit
                if !p.commit_in_flight && (!p.uncommitted || p.commit_answered) =>
            {
                Step::Leave { failure: None }
            }
            ClosePhase::FinalCommit if !p.commit_in_flight && p.commits_fenced => Step::Leave {
                failure: Some(CommitError::Fenced),
            },
            ClosePhase::FinalCommit if expired => Step::Leave {
                failure: Some(CommitError::CloseDeadline),
            },
            ClosePhase::LeavingGroup if expired || p.left => Step::Enter(ClosePhase::Closed),
            _ => Step::Stay,
        }
    }
}
