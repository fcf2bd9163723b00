//! `Consumer::process`: an async handler on many deliveries at once, in per-key order.
//!
//! The loop runs inside the calling task (no spawning, so it works on any runtime): the
//! handlers' futures live in one `FuturesUnordered`, and the sans-IO
//! [`Scheduler`](crate::process::Scheduler) decides which delivery may start. The loop pulls
//! with `receive` only while the scheduler has room (its bounds are the backpressure), starts
//! whatever may start, and settles each delivery as its handler's [`Outcome`] says, inside the
//! handler's own future so a slow settle never holds the others up.
//!
//! Staleness: when the ack gate's generation moves (a seek, a rebalance, the close), queued
//! deliveries whose partition was sought or revoked are dropped unsettled (the consumer would
//! refuse their settles) and holds waiting for their redeliveries are released; a running
//! handler's settle that comes back refused is logged and counted, never fatal.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures_lite::future;
use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::Instrument as _;

use super::consumer::{Consumer, Delivery};
use super::error::ConsumerError;
use crate::process::{Finish, Limits, OrderBy, Scheduler, Ticket};

/// How [`Consumer::process`] runs the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessOptions {
    concurrency: usize,
    order_by: OrderBy,
    max_waiting_per_key: usize,
    max_waiting: Option<usize>,
}

impl ProcessOptions {
    /// Up to `concurrency` handlers at once (at least 1), ordered by key, at most 16
    /// deliveries waiting per key and `4 * concurrency` in all.
    pub fn new(concurrency: usize) -> Self {
        Self {
            concurrency: concurrency.max(1),
            order_by: OrderBy::Key,
            max_waiting_per_key: 16,
            max_waiting: None,
        }
    }

    /// Which deliveries may overlap (default [`OrderBy::Key`]).
    pub fn order_by(mut self, order_by: OrderBy) -> Self {
        self.order_by = order_by;
        self
    }

    /// Deliveries waiting behind one key (or partition) at most, at least 1 (default 16).
    /// When one key's queue is full the consumer stops pulling until it drains: a hot key
    /// cannot grow memory without bound.
    pub fn max_waiting_per_key(mut self, max: usize) -> Self {
        self.max_waiting_per_key = max.max(1);
        self
    }

    /// Deliveries waiting to start at most, in all (default `4 * concurrency`; never more
    /// than the consumer's `max_unacked` minus one, so a redelivery can always come in).
    pub fn max_waiting(mut self, max: usize) -> Self {
        self.max_waiting = Some(max.max(1));
        self
    }

    fn limits(&self, max_unacked: usize) -> Limits {
        let wanted = self
            .max_waiting
            .unwrap_or(self.concurrency.saturating_mul(4));
        Limits {
            concurrency: self.concurrency,
            max_waiting_per_lane: self.max_waiting_per_key,
            max_waiting: wanted.min(max_unacked.saturating_sub(1)).max(1),
        }
    }
}

/// What the handler decided for one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done: [`Delivery::ack`].
    Ack,
    /// Failed: redeliver after the retry policy's backoff (`None`) or after the delay
    /// ([`Delivery::nack`], [`Delivery::nack_with_delay`]). Under an ordered mode the key waits
    /// for the redelivery before anything else of it runs.
    Nack(Option<Duration>),
    /// Poison: to the dead-letter path with this reason ([`Delivery::reject`]).
    Reject(String),
}

/// What a [`Consumer::process`] run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessSummary {
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked.
    pub nacked: u64,
    /// Deliveries rejected.
    pub rejected: u64,
    /// Settles the consumer refused (stale after a seek or rebalance, or closed).
    pub refused: u64,
    /// Queued deliveries dropped before their handler ran, stale after a seek or rebalance.
    pub dropped_stale: u64,
    /// Most handlers running at once.
    pub peak_running: usize,
    /// Most deliveries waiting to start at once.
    pub peak_waiting: usize,
}

/// How one delivery ended, for the summary.
#[derive(Debug, Clone, Copy)]
enum Settled {
    Acked,
    Nacked,
    Rejected,
    Refused,
}

/// What woke the loop.
enum Wake {
    Stop,
    Finished(Option<(Ticket, Finish, Settled)>),
    Pulled(Result<Option<Delivery>, ConsumerError>),
}

impl Consumer {
    /// Runs `handler` on up to `options`' concurrency deliveries at once until the consumer is
    /// closed (from another handle, [`Consumer::close`]); see [`Consumer::process_until`].
    pub async fn process<F, Fut>(
        &self,
        options: ProcessOptions,
        handler: F,
    ) -> Result<ProcessSummary, ConsumerError>
    where
        F: Fn(&Delivery) -> Fut,
        Fut: Future<Output = Outcome>,
    {
        self.process_until(options, handler, future::pending())
            .await
    }

    /// Runs `handler` on up to `options`' concurrency deliveries at once, in the order
    /// `options` asks for, and settles each as its [`Outcome`] says, until `stop` completes or
    /// the consumer is closed. Then it pulls no more, finishes what it already took (running
    /// and queued handlers) and returns.
    ///
    /// Everything runs inside the calling task: no spawning, any runtime. The handler gets the
    /// delivery by reference and returns a future that does not borrow it (clone what it
    /// needs). A settle the consumer refuses (the delivery went stale in a seek or rebalance,
    /// or the consumer closed) is logged and counted in the summary, not an error. Deliveries
    /// waiting to start whose partition was sought or revoked are dropped without settling.
    ///
    /// Errors: a permanent [`ConsumerError`] from `receive` (see
    /// [`ConsumerError::is_permanent`]) stops the run like `stop` and is returned once the
    /// running handlers are done; other errors are logged and the run goes on.
    pub async fn process_until<F, Fut, S>(
        &self,
        options: ProcessOptions,
        handler: F,
        stop: S,
    ) -> Result<ProcessSummary, ConsumerError>
    where
        F: Fn(&Delivery) -> Fut,
        Fut: Future<Output = Outcome>,
        S: Future<Output = ()>,
    {
        let shared = std::sync::Arc::clone(self.shared());
        let mut scheduler: Scheduler<Delivery> =
            Scheduler::new(options.order_by, options.limits(shared.max_unacked));
        let mut running = FuturesUnordered::new();
        let mut summary = ProcessSummary::default();
        let mut stop = pin!(stop.fuse());
        let mut intake_open = true;
        let mut failure = None;
        let mut seen_generation = shared.gate.generation();
        loop {
            let generation = shared.gate.generation();
            if generation != seen_generation {
                let stale = scheduler.drop_waiting(|_, _, delivery| delivery.known_stale());
                scheduler.release_holds(|partition, _| {
                    shared.gate.known_stale(partition, seen_generation)
                });
                if !stale.is_empty() {
                    tracing::debug!(dropped = stale.len(), "stale queued deliveries dropped");
                }
                summary.dropped_stale += stale.len() as u64;
                stale.into_iter().for_each(Delivery::discard);
                seen_generation = generation;
            }
            while let Some((ticket, delivery)) = scheduler.start() {
                // The handler runs, and its delivery is settled, inside the delivery's span.
                let span = delivery.span().clone();
                let work = span.in_scope(|| handler(&delivery));
                running.push(settle(ticket, delivery, work).instrument(span));
            }
            summary.peak_running = summary.peak_running.max(running.len());
            if !intake_open && running.is_empty() {
                if scheduler.waiting() == 0 {
                    break;
                }
                // Only held lanes wait: no redelivery can come in any more.
                scheduler.release_holds(|_, _| true);
                continue;
            }
            let pull = intake_open && scheduler.has_room();
            let stopped = async {
                (&mut stop).await;
                Wake::Stop
            };
            let finished = async {
                if running.is_empty() {
                    future::pending().await
                } else {
                    Wake::Finished(running.next().await)
                }
            };
            let pulled = async {
                if pull {
                    Wake::Pulled(self.receive().await)
                } else {
                    future::pending().await
                }
            };
            match future::or(stopped, future::or(finished, pulled)).await {
                Wake::Stop => intake_open = false,
                Wake::Finished(None) => {}
                Wake::Finished(Some((ticket, finish, settled))) => {
                    scheduler.finish(ticket, finish);
                    match settled {
                        Settled::Acked => summary.acked += 1,
                        Settled::Nacked => summary.nacked += 1,
                        Settled::Rejected => summary.rejected += 1,
                        Settled::Refused => summary.refused += 1,
                    }
                }
                Wake::Pulled(Ok(Some(delivery))) => {
                    if delivery.known_stale() {
                        summary.dropped_stale += 1;
                        delivery.discard();
                        continue;
                    }
                    let key = delivery.record().key.clone();
                    let pushed = scheduler.push(
                        delivery.partition(),
                        delivery.offset(),
                        key.as_ref(),
                        delivery,
                    );
                    assert!(pushed.is_ok(), "room was checked before the pull");
                    summary.peak_waiting = summary.peak_waiting.max(scheduler.waiting());
                }
                Wake::Pulled(Ok(None)) => intake_open = false,
                Wake::Pulled(Err(error)) => {
                    tracing::warn!(%error, "receive failed while processing");
                    if error.is_permanent() {
                        intake_open = false;
                        failure = Some(error);
                    }
                }
            }
        }
        failure.map_or(Ok(summary), Err)
    }
}

/// Runs one handler, then settles its delivery as the outcome says.
async fn settle<Fut: Future<Output = Outcome>>(
    ticket: Ticket,
    delivery: Delivery,
    work: Fut,
) -> (Ticket, Finish, Settled) {
    let outcome = work.await;
    let (partition, offset, attempt) =
        (delivery.partition(), delivery.offset(), delivery.attempt());
    let (result, settled, finish) = match outcome {
        Outcome::Ack => (delivery.ack().await, Settled::Acked, Finish::Done),
        Outcome::Nack(delay) => {
            let result = delivery.nack_redelivers(delay).await;
            let finish = if result == Ok(true) {
                Finish::Redeliver
            } else {
                Finish::Done
            };
            (result.map(drop), Settled::Nacked, finish)
        }
        Outcome::Reject(reason) => (
            delivery.reject(reason).await,
            Settled::Rejected,
            Finish::Done,
        ),
    };
    match result {
        Ok(()) => (ticket, finish, settled),
        Err(error) => {
            tracing::debug!(partition, offset, attempt, %error, "settle refused: skipped");
            (ticket, Finish::Done, Settled::Refused)
        }
    }
}
