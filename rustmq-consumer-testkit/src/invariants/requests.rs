//! What the machine sends and how it is answered: fetch answers (for `no-fetch-spin`), commits
//! sent and accepted against the side effects done (`commit-after-side-effect`,
//! `broker-commit-after-side-effect`), each transmit (nothing after `Closed`,
//! `breaker-open-silence`, `half-open-probes`, `no-fetch-spin`, no commit after the leave),
//! requests resolved, and an input's events applied before its transmits are checked.

use std::collections::BTreeMap;

use rustmq_consumer_core::protocol::Request;
use rustmq_consumer_core::{BreakerState, ClosePhase, Event, RequestId};

use super::names::*;
use super::{Checker, Violation};

impl Checker {
    /// A fetch of `partition` at `offset` was answered; `records` came back.
    pub fn on_fetch_answer(&mut self, partition: u32, offset: u64, records: usize) {
        if records == 0 {
            self.fetch_spin.remove(&partition);
        } else {
            let e = self.fetch_spin.entry(partition).or_insert((offset, 0));
            if e.0 != offset {
                *e = (offset, 0);
            }
        }
    }

    /// Checks a commit request about to be sent; returns the bound (lowest unsettled offset
    /// per partition now) to check the broker's acceptance against later.
    pub fn on_commit_sent(&self, offsets: &[(u32, u64)]) -> Result<BTreeMap<u32, u64>, Violation> {
        let mut bound = BTreeMap::new();
        for &(p, o) in offsets {
            let low = self.lowest_unsettled(p).unwrap_or(0);
            if o > low {
                return self.fail(
                    COMMIT_AFTER_SIDE_EFFECT,
                    format!(
                        "commit of partition {p} at {o} sent while offset {low} is not processed"
                    ),
                );
            }
            bound.insert(p, low);
        }
        Ok(bound)
    }

    /// The broker accepted a commit whose request was checked with `bound`.
    pub fn on_commit_accepted(
        &mut self,
        offsets: &[(u32, u64)],
        bound: &BTreeMap<u32, u64>,
    ) -> Result<(), Violation> {
        for &(p, o) in offsets {
            self.accepted.insert((p, o));
            let low = bound.get(&p).copied().unwrap_or(0);
            if o > low {
                return self.fail(
                    BROKER_COMMIT_AFTER_SIDE_EFFECT,
                    format!(
                        "broker stored partition {p} at {o}; offset {low} was unprocessed when it was sent"
                    ),
                );
            }
        }
        Ok(())
    }

    /// A request the machine transmitted, with the breaker's state after the input that
    /// produced it (call [`Checker::on_events_of_input`] for that input first).
    pub fn on_transmit(
        &mut self,
        id: RequestId,
        request: &Request,
        breaker: BreakerState,
    ) -> Result<(), Violation> {
        if self.closed {
            return self.fail(CLOSE, format!("{:?} sent after Closed", request.kind()));
        }
        if let Request::CommitOffset(_) = request {
            if self.leave_sent {
                return self.fail(
                    COMMIT_BEFORE_LEAVE,
                    "CommitOffset sent after the LeaveGroup".to_owned(),
                );
            }
            self.commits_in_flight.insert(id);
        }
        if let Request::Fetch(f) = request {
            let spins = match self.fetch_spin.get_mut(&f.partition_id) {
                Some(e) if f.max_bytes > 1 && e.0 == f.fetch_offset => {
                    e.1 += 1;
                    e.1
                }
                Some(_) if f.max_bytes > 1 => {
                    self.fetch_spin.remove(&f.partition_id);
                    0
                }
                _ => 0,
            };
            if spins > 50 {
                return self.fail(
                    NO_FETCH_SPIN,
                    format!(
                        "fetch of partition {} at {} sent {spins} times in a row although each answer had records",
                        f.partition_id, f.fetch_offset
                    ),
                );
            }
        }
        match breaker {
            BreakerState::Open => {
                return self.fail(
                    BREAKER_OPEN_SILENCE,
                    format!("{:?} sent while the circuit is open", request.kind()),
                );
            }
            BreakerState::HalfOpen => {
                let phase = self.half_open_phase;
                self.probes.insert(id, phase);
                let current = self.probes.values().filter(|&&p| p == phase).count();
                let total = self.probes.len();
                let max = self.max_probes as usize;
                if total > max {
                    return self.fail(
                        HALF_OPEN_PROBES,
                        format!(
                            "{total} probes in flight while half-open ({current} of this phase, max {max}): {:?}",
                            self.probes
                        ),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A request's fate reached the machine (an answer, a failure, or its deadline).
    pub fn on_resolved(&mut self, id: RequestId) {
        self.probes.remove(&id);
        self.commits_in_flight.remove(&id);
    }

    /// Applies the side effects an input's events report before its transmits are checked:
    /// a discard is its own side effect, and happens in the same input as the commit it
    /// allows. Call once per input with all of its events, before [`Checker::on_transmit`].
    pub fn on_events_of_input(&mut self, events: &[Event]) {
        for e in events {
            match e {
                Event::Closing(phase) => self.close_phase = Some(*phase),
                Event::CommitFailed { .. } if self.close_phase.is_some() => {
                    self.close_commit_failed = true;
                    if self.close_phase == Some(ClosePhase::FinalCommit) {
                        self.final_commit_expired = true;
                    }
                }
                Event::RequestFailed { id, .. } => {
                    self.commits_in_flight.remove(id);
                }
                Event::Assigned(tps) if self.group => {
                    self.assignments += 1;
                    if let Some((generation, member)) = self.pending_join.take() {
                        self.owned_generation = generation;
                        self.member = member;
                    }
                    self.owned.extend(tps.iter().map(|tp| tp.partition));
                }
                Event::Revoked(tps) if self.group => {
                    self.revocations += 1;
                    for tp in tps {
                        self.owned.remove(&tp.partition);
                        if let Some(t) = self.partitions.get_mut(&tp.partition) {
                            // Deliveries the application still holds are stale from here on
                            // (a rebalance that gives the partition back says no `Revoked`:
                            // they stay valid); side effects done so far stay done.
                            t.generation += 1;
                            t.outstanding.clear();
                            t.paused = false;
                        }
                    }
                }
                _ => {}
            }
            if let Event::BreakerChanged {
                to: BreakerState::HalfOpen,
                ..
            } = e
            {
                self.half_open_phase += 1;
            }
            if let Event::Discarded {
                partition, offset, ..
            } = e
            {
                if let Some(t) = self.partitions.get_mut(partition) {
                    if *offset >= t.floor {
                        t.mark_done(*offset);
                    }
                }
            }
        }
    }
}
