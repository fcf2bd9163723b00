//! The application's commands, the start of a close and the driver's last words.

use std::panic::AssertUnwindSafe;

use super::*;

impl Driver {
    pub(super) fn command(&mut self, now: Instant, command: Command, state: &mut GateState) {
        let machine = &mut self.machine;
        match command {
            Command::Ack(tag, reply) => {
                let _ = reply.try_send(machine.ack(now, tag));
            }
            Command::Nack(message, delay, reply) => {
                let tag = message.tag;
                // Read before the nack, under the limit the machine applies to it.
                let redelivers = tag.attempt <= machine.config().max_retry_attempts;
                machine.give_back(now, *message);
                let _ = reply.try_send(machine.nack(now, tag, delay).map(|()| redelivers));
            }
            Command::Reject(message, reason, reply) => {
                let tag = message.tag;
                machine.give_back(now, *message);
                let _ = reply.try_send(machine.reject(now, tag, &reason));
            }
            Command::Pause(partitions, reply) => {
                let result = machine.pause(now, &partitions);
                if result.is_ok() {
                    // The application's pause outlasts an assign hook's hold.
                    self.held_for_hook.retain(|p| !partitions.contains(p));
                    // Before the reply: once `pause_partitions` returns, nothing of these
                    // partitions can be taken, including what is already queued.
                    self.channels.inbox.pause(&partitions);
                }
                let _ = reply.try_send(result);
            }
            Command::Resume(partitions, reply) => {
                let result = machine.resume(now, &partitions);
                if result.is_ok() {
                    self.channels.inbox.resume(&partitions);
                }
                let _ = reply.try_send(result);
            }
            Command::Seek(partition, offset, reply) => {
                // Deliveries the machine emitted before the seek keep the old generation; the
                // seek may make any of them stale.
                self.drain_outputs(state);
                state.generation += 1;
                let result = self.machine.seek(now, partition, offset);
                if result.is_ok() {
                    state.invalidate(&[partition]);
                    self.discard_stale(&[partition], false);
                }
                let _ = reply.try_send(result);
            }
            Command::Commit(reply) => match machine.commit(now) {
                Ok(ticket) => self.commit_waiters.push((ticket, reply)),
                Err(error) => {
                    let _ = reply.try_send(Err(error.into()));
                }
            },
            Command::Lag(reply) => {
                let _ = reply.try_send(machine.lag(now));
            }
            Command::Assigned(reply) => {
                let _ = reply.try_send(machine.assigned_partitions());
            }
            Command::Metrics(reply) => {
                let _ = reply.try_send(machine.metrics());
            }
            Command::Config(reply) => {
                let _ = reply.try_send(machine.config().clone());
            }
            Command::UpdateConfig(edit, reply) => {
                let mut next = machine.config().clone();
                // The application's edit runs here: a panic in it goes back to the caller
                // (`Consumer::update_config` resumes it), not through the driver.
                let edited = std::panic::catch_unwind(AssertUnwindSafe(|| (edit.0)(&mut next)));
                let result = edited.map(|()| {
                    machine
                        .update_config(now, next)
                        .map(|()| machine.config().clone())
                });
                let _ = reply.try_send(result);
            }
            Command::Health(reply) => {
                let _ = reply.try_send(self.health_report());
            }
            Command::Close(reply) => {
                self.close_waiters.push(reply);
                self.begin_close(now, state);
            }
            Command::Abandon => {
                if !self.machine.is_closed() {
                    tracing::warn!(phase = ?self.machine.close_phase(), "close timed out: stopping without finishing it");
                }
                self.abandoned = true;
            }
        }
    }

    /// Starts the machine's phased close, and hands back deliveries the application never took.
    pub(super) fn begin_close(&mut self, now: Instant, state: &mut GateState) {
        if self.closing {
            return;
        }
        self.closing = true;
        tracing::info!("close requested");
        self.machine.close(now);
        // Deliveries still queued were never seen by the application: return them so the drain
        // phase does not wait for them. They stay unsettled (redelivered to the next member).
        // Events the close emitted first: the backlog then holds every delivery made so far.
        self.drain_outputs(state);
        let mut returned = self.channels.inbox.take_all();
        returned.extend(self.backlog.drain());
        self.give_back(now, returned);
    }

    /// Nacks deliveries the application never took: they stay unsettled (no redelivery while
    /// their partitions are closing or revoking; the next owner reads them).
    pub(super) fn give_back(&mut self, now: Instant, undelivered: Vec<Stamped>) {
        for stamped in undelivered {
            let tag = stamped.delivery.tag;
            if let Err(error) = self.machine.nack(now, tag, None) {
                tracing::debug!(partition = tag.partition, offset = tag.offset, attempt = tag.attempt, %error, "undelivered message not returned");
            }
        }
    }

    /// Replies to every waiter and every queued command, and leaves the final snapshot for
    /// the handles.
    pub(super) fn finish(mut self) {
        let now = self.runtime.now();
        // The run loop closed the gate under the lock after its last input; nothing is pending.
        self.channels.gate.lock().open = false;
        self.observe(now, true);
        self.telemetry.finish();
        let final_state = FinalState {
            metrics: self.machine.metrics(),
            lag: self.machine.lag(now),
        };
        let _ = self.channels.final_state.set(final_state.clone());
        // Closed is not enough: the broker must hold every settlement.
        let close_result = if !self.machine.is_closed() {
            // Abandoned (`close_with_timeout`) before the close finished.
            Err(ConsumerError::CloseTimedOut {
                offsets: self.machine.uncommitted_offsets(),
            })
        } else if self.machine.uncommitted_offsets().is_empty() {
            Ok(())
        } else {
            let cause = self
                .commit_error
                .clone()
                .unwrap_or(CommitError::CloseDeadline);
            Err(self.uncommitted(cause))
        };
        // Close the channels first: a command queued after this fails to send and the handle
        // falls back to the final snapshot; one queued before is answered here. (Queued
        // commands would otherwise outlive this task with their reply channels open.)
        self.channels.commands.close();
        self.channels.dropped.close();
        self.channels.inbox.close();
        while let Ok(command) = self.channels.commands.try_recv() {
            let closed = || Err(UsageError::Closed);
            match command {
                Command::Nack(_, _, reply) => {
                    let _ = reply.try_send(Err(UsageError::Closed));
                }
                Command::Ack(_, reply)
                | Command::Reject(_, _, reply)
                | Command::Pause(_, reply)
                | Command::Resume(_, reply)
                | Command::Seek(_, _, reply) => {
                    let _ = reply.try_send(closed());
                }
                Command::Commit(reply) => {
                    let _ = reply.try_send(Err(ConsumerError::closed()));
                }
                Command::Lag(reply) => {
                    let _ = reply.try_send(final_state.lag.clone());
                }
                Command::Assigned(reply) => {
                    let _ = reply.try_send(Vec::new());
                }
                Command::Metrics(reply) => {
                    let _ = reply.try_send(final_state.metrics);
                }
                Command::Config(reply) => {
                    let _ = reply.try_send(self.machine.config().clone());
                }
                Command::UpdateConfig(_, reply) => {
                    let _ = reply.try_send(Ok(Err(ConfigUpdateError::Closed)));
                }
                Command::Health(reply) => {
                    let _ = reply.try_send(HealthReport::stopped());
                }
                Command::Close(reply) => self.close_waiters.push(reply),
                Command::Abandon => {}
            }
        }
        for reply in self.close_waiters.drain(..) {
            let _ = reply.try_send(close_result.clone());
        }
        for (_, reply) in self.commit_waiters.drain(..) {
            let _ = reply.try_send(Err(ConsumerError::closed()));
        }
        tracing::debug!(
            in_flight = self.in_flight.len(),
            closed = self.machine.is_closed(),
            "driver stopped"
        );
    }
}
