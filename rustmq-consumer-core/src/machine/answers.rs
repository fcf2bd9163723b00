//! Answers: each request's answer (or failure) goes to the sub-machine that sent it; the
//! coordinator then carries the outcome to the others and tells the breaker.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::commit::Answered;
use super::group::HeartbeatOutcome;
use super::partition::Refetched;
use super::requests::{CommitEntry, FetchOwner, InFlight, Owner};
use super::ConsumerMachine;
use crate::event::{
    ClosePhase, CommitError, DiscardReason, Event, RequestError, RequestId, StallReason,
};
use crate::protocol::{error_code, Response};

impl ConsumerMachine {
    /// Hands a request's answer (or failure) to its owner, then tells the breaker and, on
    /// failure, the application.
    pub(super) fn finish_request(
        &mut self,
        now: Instant,
        id: RequestId,
        flight: InFlight,
        answer: Result<Response, RequestError>,
    ) {
        let fetch = matches!(
            flight.owner,
            Owner::Fetch(_) | Owner::Refetch(_) | Owner::ResolveLatest(_)
        );
        match self.on_answer(now, flight.owner, answer) {
            Ok(()) => self.breaker.on_success(now, flight.permit),
            Err(error) => {
                debug!(request = id.0, %error, "request failed");
                self.metrics.requests_failed += 1;
                if (fetch && error.names_partition()) || error.cut_in_transit() {
                    // One partition's problem, not the broker's: the partition backs off and
                    // reports a stall; the breaker does not count it either way. Nor a request
                    // the broker read in part (it straddled two packets): its owner retries
                    // it as any failure, and the broker, which answered, is not failing.
                    self.breaker.release(flight.permit);
                } else {
                    self.breaker.on_failure(now, flight.permit);
                }
                self.events.push_back(Event::RequestFailed { id, error });
            }
        }
    }

    /// Routes an answer to the sub-machine that sent the request. `Err` is a failure for the
    /// breaker; the owner already put its work back.
    pub(super) fn on_answer(
        &mut self,
        now: Instant,
        owner: Owner,
        answer: Result<Response, RequestError>,
    ) -> Result<(), RequestError> {
        let closing = self.close.is_some();
        let jitter = &mut self.jitter;
        match owner {
            Owner::FetchOffset(asked) => {
                // 16: the broker does not know the group (never joined, or restarted since):
                // a manual assignment's generation is gone with it.
                let unknown_group = matches!(&answer, Ok(Response::FetchOffset(r)) if r.error_code == error_code::UNKNOWN_GROUP);
                if let Some(manual) = self.manual.as_mut().filter(|_| unknown_group) {
                    manual.forget();
                }
                let moved =
                    self.partitions
                        .on_fetch_offset(now, &asked, answer, &self.config, jitter)?;
                self.committer.moved(now, moved);
                self.restarted();
            }
            Owner::ResolveLatest(fetch) => {
                let resolved = self
                    .partitions
                    .on_resolve_latest(now, fetch, answer, jitter);
                self.fetch_outcome(fetch, &resolved);
                resolved?;
            }
            Owner::Fetch(fetch) => {
                let fetched = self.partitions.on_fetch(
                    now,
                    fetch,
                    answer,
                    closing,
                    &self.config,
                    jitter,
                    &mut self.metrics,
                );
                self.fetch_outcome(fetch, &fetched);
                fetched?;
            }
            Owner::Refetch(fetch) => {
                let refetched = self.partitions.on_refetch(now, fetch, answer, jitter);
                self.fetch_outcome(fetch, &refetched);
                let refetched = refetched?;
                let Some(idx) = self.partitions.index(fetch.partition) else {
                    return Ok(());
                };
                match refetched {
                    Refetched::Done => {}
                    Refetched::Gone { attempt } => {
                        let reason = DiscardReason::NoLongerOnBroker;
                        self.discard(now, idx, fetch.offset, attempt, reason);
                    }
                    Refetched::DeadLetter {
                        attempt,
                        reason,
                        record,
                    } => self.enqueue_dead_letter(idx, fetch.offset, attempt, reason, record),
                }
            }
            Owner::Commit { entries, ticket } => {
                return self.on_commit(now, entries, ticket, answer)
            }
            Owner::DeadLetter { batch, size } => {
                let confirmed = self.dead_letters.on_answer(
                    now,
                    batch,
                    size,
                    answer,
                    &self.partitions,
                    jitter,
                    &mut self.events,
                )?;
                for e in confirmed {
                    self.metrics.dead_lettered += 1;
                    debug!(topic = %self.config.topic, partition = e.partition, offset = e.offset, attempt = e.attempts, "dead-lettered");
                    if self.partitions.live(e.partition, e.epoch) {
                        if let Some(idx) = self.partitions.index(e.partition) {
                            self.settle(now, idx, e.offset);
                        }
                    }
                    self.events.push_back(Event::DeadLettered {
                        partition: e.partition,
                        offset: e.offset,
                        attempts: e.attempts,
                    });
                }
            }
            Owner::FindCoordinator | Owner::Join | Owner::Heartbeat { .. } | Owner::Leave => {
                return self.on_group_answer(now, owner, answer);
            }
        }
        Ok(())
    }

    /// What a fetch's outcome means for its partition: a failure that names the partition
    /// starts a stall (reported once, whatever the retries), a success ends it.
    fn fetch_outcome<T>(&mut self, owner: FetchOwner, result: &Result<T, RequestError>) {
        let partition = owner.partition;
        match result {
            Ok(_) => {
                if self.partitions.fetch_recovered(owner) {
                    info!(topic = %self.config.topic, partition, "partition fetches again");
                    self.events.push_back(Event::Recovered { partition });
                }
            }
            Err(error) if error.names_partition() => {
                if let Some(offset) = self.partitions.fetch_failing(owner) {
                    warn!(topic = %self.config.topic, partition, offset, %error, "partition stalled: its fetches fail");
                    self.events.push_back(Event::Stalled {
                        partition,
                        offset,
                        reason: StallReason::FetchFailing {
                            error: error.clone(),
                        },
                    });
                }
            }
            Err(_) => {}
        }
    }

    pub(super) fn on_group_answer(
        &mut self,
        now: Instant,
        owner: Owner,
        answer: Result<Response, RequestError>,
    ) -> Result<(), RequestError> {
        let closing = self.close.is_some();
        let Some(g) = &mut self.group else {
            // A manual assignment joins and leaves only to learn its generation.
            return match (owner, &mut self.manual) {
                (Owner::Join, Some(m)) => m.on_join(now, answer, &mut self.jitter),
                (Owner::Leave, Some(m)) => m.on_leave(answer),
                _ => answer.map(drop),
            };
        };
        match owner {
            Owner::FindCoordinator => g.on_find_coordinator(now, answer, &mut self.jitter),
            Owner::Join => {
                let assigned = g.on_join(now, answer, closing, &mut self.jitter)?;
                // A refusal fences one membership; a join starts a new one, even when a
                // restarted broker hands out a generation number refused before.
                self.committer.unfence();
                if let Some(assigned) = assigned {
                    self.assign(assigned);
                }
                Ok(())
            }
            Owner::Heartbeat { generation } => {
                let outcome = g.on_heartbeat(now, generation, answer)?;
                if let HeartbeatOutcome::Rebalance {
                    forget_member,
                    fenced,
                } = outcome
                {
                    if fenced {
                        self.committer.fence(Some(generation));
                    }
                    self.start_rebalance(now, forget_member);
                }
                Ok(())
            }
            _ => g.on_leave(answer),
        }
    }

    pub(super) fn on_commit(
        &mut self,
        now: Instant,
        entries: Vec<CommitEntry>,
        ticket: u64,
        answer: Result<Response, RequestError>,
    ) -> Result<(), RequestError> {
        let final_phase = self.close_phase() == Some(ClosePhase::FinalCommit);
        let (result, answered) = self.committer.on_answer(
            now,
            entries,
            ticket,
            answer,
            self.group.is_none(),
            final_phase,
            &mut self.partitions,
            &mut self.jitter,
            &mut self.events,
            &mut self.metrics,
        );
        // The revoke commit was answered: let the partitions go.
        if self
            .group
            .as_ref()
            .and_then(|g| g.revoking())
            .is_some_and(|(_, committing)| committing)
        {
            self.finish_revoke();
        }
        self.committer.after_answer(
            now,
            answered,
            ticket,
            &self.partitions,
            &self.config,
            self.close.is_some(),
            &mut self.events,
        );
        match (answered, &mut self.manual) {
            (Answered::Confirmed, Some(m)) => m.confirmed(),
            (Answered::Refused { code }, Some(m)) => {
                let worth_reporting = m.refused(now, &mut self.jitter);
                if worth_reporting {
                    warn!(group = %self.config.consumer_group, code, "a generation learned afresh was refused: other members share the group");
                    self.events.push_back(Event::CommitFailed {
                        ticket,
                        error: CommitError::Rejected { code },
                    });
                }
            }
            _ => {}
        }
        if answered == (Answered::Rejected { fenced: true }) {
            self.committer
                .fence(self.group.as_ref().map(|g| g.generation));
            self.start_rebalance(now, false);
        }
        result
    }
}
