//! What the driver does with the machine's events: deliveries into the backlog, commit
//! waiters, outages and stalls for the application, and the gate's generation.

use super::*;

impl Driver {
    /// Routes one event. Events after which an outstanding delivery may be refused (its
    /// partition revoked or given a new epoch, or the consumer closed) bump the gate's
    /// generation, so acks of deliveries stamped before them take the slow path.
    pub(super) fn event(&mut self, event: Event, state: &mut GateState) {
        // Deliveries, most of the events, mean nothing to the notices (streams get no
        // deliveries), health or telemetry: straight to the backlog.
        let event = match event {
            Event::Deliver(delivery) => {
                // Traced by the machine, which emitted it inside this driver's span.
                self.backlog.push_back(Stamped {
                    delivery,
                    generation: state.generation,
                });
                return;
            }
            other => other,
        };
        self.channels.notices.publish(&event);
        self.watch_event(&event);
        match event {
            Event::Deliver(_) => {} // to the backlog above
            Event::Committed { ticket, offsets } => {
                tracing::debug!(ticket, ?offsets, "committed");
                self.resolve_commits(ticket, Ok(()));
            }
            Event::CommitFailed { ticket, error } => {
                tracing::warn!(ticket, %error, "commit failed");
                let failure = self.uncommitted(error.clone());
                self.commit_error = Some(error);
                self.resolve_commits(ticket, Err(failure));
            }
            Event::DeadLettered {
                partition,
                offset,
                attempts,
            } => tracing::info!(partition, offset, attempts, "dead-lettered"),
            Event::Discarded {
                partition,
                offset,
                attempts,
                reason,
            } => tracing::warn!(partition, offset, attempts, %reason, "poison message discarded"),
            Event::BreakerChanged { from, to } => {
                tracing::warn!(?from, ?to, "circuit breaker changed")
            }
            Event::Assigned(partitions) => {
                state.generation += 1;
                if let Some((member_id, generation)) = self.joined.take() {
                    state.joined_as(&member_id);
                    self.member_span = tracing::info_span!(
                        parent: &self.span,
                        "member",
                        member_id = %member_id,
                        generation,
                    );
                }
                self.member_span
                    .in_scope(|| tracing::info!(?partitions, "assigned"));
                if let Some(hooks) = &mut self.channels.hooks {
                    // Held back until the assign hook returns (it may seek first).
                    let ids: Vec<u32> = partitions.iter().map(|tp| tp.partition).collect();
                    self.channels.inbox.pause(&ids);
                    self.held_for_hook.extend(&ids);
                    hooks.push(Hook::Assign, ids);
                }
            }
            Event::Revoking(partitions) => {
                tracing::info!(?partitions, "revoking");
                if self.channels.hooks.is_some() {
                    let ids: Vec<u32> = partitions.iter().map(|tp| tp.partition).collect();
                    self.hand_back(&ids);
                    if let Some(hooks) = &mut self.channels.hooks {
                        hooks.push(Hook::Revoke, ids);
                    }
                }
            }
            Event::Revoked(partitions) => {
                state.generation += 1;
                tracing::info!(?partitions, "revoked");
                // Their queued deliveries are stale: the application could only process them
                // again after the next owner and have the acks refused. Their pause is gone too.
                let ids: Vec<u32> = partitions.iter().map(|tp| tp.partition).collect();
                state.invalidate(&ids);
                self.discard_stale(&ids, true);
                self.held_for_hook.retain(|p| !ids.contains(p));
                if let Some(partitions) =
                    self.channels.hooks.as_mut().and_then(Hooks::cancel_revoke)
                {
                    // The machine let the partitions go at its drain deadline.
                    self.listener_failed(
                        Hook::Revoke,
                        partitions,
                        "overran the rebalance drain timeout".into(),
                    );
                }
            }
            Event::AssignmentIgnored(partitions) => {
                tracing::info!(?partitions, "ignoring partitions of topics not subscribed")
            }
            Event::Stalled {
                partition,
                offset,
                reason,
            } => {
                tracing::error!(partition, offset, %reason, "partition stalled");
                let error = ConsumerError::Stalled {
                    partition,
                    offset,
                    reason,
                };
                // Once per stall; an unread error (an outage) is not replaced.
                let _ = self.channels.errors.try_send(error.clone());
                self.stalls.insert(partition, error);
            }
            Event::Recovered { partition } => {
                tracing::info!(partition, "partition recovered");
                self.stalls.remove(&partition);
            }
            Event::RequestFailed { id, error } => {
                tracing::debug!(request = id.0, %error, "request failed");
                // Transport failures were seen with their response; on a timer wake-up the
                // failures are deadlines: no answer at all.
                if self.timer_wake {
                    self.unreachable(TransportError::TimedOut);
                }
            }
            Event::Closing(phase) => tracing::debug!(?phase, "closing"),
            Event::Closed => {
                state.generation += 1;
                state.open = false;
                tracing::info!("closed");
            }
        }
    }

    /// A request got no answer from the broker: starts an outage, reported once to the
    /// application (replacing an error it has not read), to a fail-fast `build()`, and by
    /// `health_report()` until the broker answers again.
    pub(super) fn unreachable(&mut self, cause: TransportError) {
        if self.outage.is_some() {
            return;
        }
        tracing::warn!(
            %cause,
            permanent = cause.is_permanent(),
            ever_connected = self.ever_connected,
            "broker unreachable"
        );
        let error = ConsumerError::Unreachable {
            cause,
            ever_connected: self.ever_connected,
        };
        while self.channels.unread_errors.try_recv().is_ok() {}
        // Never full (just emptied, and only this task sends); closed once every handle is gone.
        let _ = self.channels.errors.try_send(error.clone());
        if let Some(reply) = self.channels.first_contact.take() {
            let _ = reply.try_send(Err(error.clone()));
        }
        self.outage = Some(error);
        self.watch_outage(true);
    }

    /// The broker answered: ends the outage in progress.
    pub(super) fn reached(&mut self) {
        self.ever_connected = true;
        if let Some(reply) = self.channels.first_contact.take() {
            let _ = reply.try_send(Ok(()));
        }
        if let Some(outage) = self.outage.take() {
            tracing::info!(after = %outage, "broker reachable again");
            self.watch_outage(false);
        }
    }

    /// Moves deliveries into the inbox, as many as it has room for (`max_unacked`); the rest
    /// wait for room.
    pub(super) fn push_backlog(&mut self) {
        self.room = if self.backlog.is_empty() {
            None
        } else {
            self.channels.inbox.push(&mut self.backlog)
        };
    }

    /// Drops the not yet taken deliveries of `partitions` (sought or revoked: stale), and
    /// their stalls (a seek or a new owner starts them afresh).
    pub(super) fn discard_stale(&mut self, partitions: &[u32], unpause: bool) {
        for p in partitions {
            self.stalls.remove(p);
        }
        let dropped = self.backlog.take_partitions(partitions).len()
            + self.channels.inbox.discard(partitions, unpause);
        if dropped > 0 {
            tracing::debug!(
                ?partitions,
                dropped,
                "stale deliveries dropped before the application took them"
            );
        }
    }

    /// Hands the machine back the deliveries of `partitions` the application has not taken
    /// (queued or in the backlog): a revoke hook runs once deliveries of them stopped, and
    /// the revoke commit need not wait for these. They stay unsettled: their next owner reads
    /// them.
    fn hand_back(&mut self, partitions: &[u32]) {
        let now = self.runtime.now();
        let mut returned = self.channels.inbox.take_partitions(partitions);
        returned.extend(self.backlog.take_partitions(partitions));
        self.give_back(now, returned);
    }

    /// A rebalance hook ended: a revoke commit may go; assigned partitions deliver. A failure
    /// is reported first, so the application sees it before the partitions' deliveries.
    pub(super) fn hook_ended(&mut self, now: Instant, ended: Ended) {
        match ended.result {
            Ok(()) => {
                tracing::debug!(hook = %ended.hook, partitions = ?ended.partitions, "rebalance listener returned")
            }
            Err(cause) => self.listener_failed(ended.hook, ended.partitions.clone(), cause),
        }
        match ended.hook {
            Hook::Revoke => self.machine.rebalance_listener_done(now),
            Hook::Assign => {
                let held: Vec<u32> = ended
                    .partitions
                    .into_iter()
                    .filter(|p| self.held_for_hook.contains(p))
                    .collect();
                self.held_for_hook.retain(|p| !held.contains(p));
                self.channels.inbox.resume(&held);
            }
        }
    }

    /// Reports a failed or overrun hook to the application (once; an unread error stays).
    fn listener_failed(&mut self, hook: Hook, partitions: Vec<u32>, cause: String) {
        tracing::warn!(%hook, ?partitions, %cause, "rebalance listener failed");
        let error = ConsumerError::Listener {
            hook,
            partitions,
            cause,
        };
        let _ = self.channels.errors.try_send(error);
    }

    /// The error naming every settled offset the broker has not stored, after `cause`.
    pub(super) fn uncommitted(&self, cause: CommitError) -> ConsumerError {
        ConsumerError::Uncommitted {
            offsets: self.machine.uncommitted_offsets(),
            cause,
        }
    }

    pub(super) fn resolve_commits(&mut self, ticket: u64, result: Result<(), ConsumerError>) {
        self.commit_waiters.retain(|(waiting, reply)| {
            if *waiting <= ticket {
                let _ = reply.try_send(result.clone());
                false
            } else {
                true
            }
        });
    }
}
