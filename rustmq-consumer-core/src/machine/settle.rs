//! The application's verdicts on its deliveries (`ack`, `ack_many`, `nack`, `reject`,
//! `give_back`) and what a settlement or a poison message moves: the partition's watermark and
//! the committer, the dead-letter outbox, a parked partition's hand-back.

use std::time::{Duration, Instant};

use tracing::{trace, warn};

use super::dead_letter::DeadLetterEntry;
use super::partition::{AckRun, Handback, Slot};
use super::ConsumerMachine;
use crate::backoff::later;
use crate::error::UsageError;
use crate::event::{DeliveryTag, DiscardReason, Event, Message};
use crate::protocol::Record;

impl ConsumerMachine {
    /// Settles a delivery: it will be committed once every lower offset is settled too.
    pub fn ack(&mut self, now: Instant, tag: DeliveryTag) -> Result<(), UsageError> {
        if self.partitions.is_parked(tag.partition) {
            return self.ack_parked(now, tag);
        }
        let idx = self.outstanding(tag)?;
        self.partitions.delivery_ended();
        self.metrics.acked += 1;
        self.trace_ack(tag);
        self.settle(now, idx, tag.offset);
        self.poll_work(now);
        Ok(())
    }

    /// Acks every delivery of `tags`, in order, as one input: each is settled (or refused)
    /// exactly as [`ack`](Self::ack) would, and the work step that ends an input (deliveries,
    /// fetches, commits) runs once, after the last. Returns the refused tags with the reason;
    /// the others are settled. This is how a driver applies a burst of acks.
    pub fn ack_many(
        &mut self,
        now: Instant,
        tags: impl IntoIterator<Item = DeliveryTag>,
    ) -> Vec<(DeliveryTag, UsageError)> {
        let mut refused = Vec::new();
        let mut work = false;
        // Acks of one partition and epoch in a row (a burst in order, the common case) are
        // a run: the partition is looked up and checked once, and the bookkeeping of a
        // settlement is done once at the run's end.
        let mut run: Option<AckRun> = None;
        for tag in tags {
            if let Some(current) = run.as_mut().filter(|run| run.takes(tag)) {
                match self.partitions.settle_in_run(current, tag) {
                    Ok(()) => self.trace_ack(tag),
                    Err(error) => refused.push((tag, error)),
                }
                continue;
            }
            if let Some(ended) = run.take() {
                self.end_run(now, ended);
            }
            if self.partitions.is_parked(tag.partition) {
                if let Err(error) = self.ack_parked(now, tag) {
                    refused.push((tag, error));
                }
                continue;
            }
            match self.outstanding(tag) {
                Ok(idx) => {
                    let mut started = self.partitions.begin_run(idx, tag);
                    let settled = self.partitions.settle_in_run(&mut started, tag);
                    debug_assert!(settled.is_ok(), "checked outstanding");
                    self.trace_ack(tag);
                    run = Some(started);
                    work = true;
                }
                Err(error) => refused.push((tag, error)),
            }
        }
        if let Some(ended) = run {
            self.end_run(now, ended);
        }
        if work {
            self.poll_work(now);
        }
        refused
    }

    /// The trace event of one settled ack.
    #[inline]
    fn trace_ack(&self, tag: DeliveryTag) {
        trace!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, "ack");
    }

    /// Accounts for a run of acks settled by [`ack_many`](Self::ack_many).
    fn end_run(&mut self, now: Instant, run: AckRun) {
        let (settled, advanced) = self.partitions.end_run(run);
        self.metrics.acked += settled as u64;
        self.committer.settled(now, advanced, &self.config);
    }

    /// Acks a delivery of a partition parked in a rebalance: handed back (which runs the work
    /// step), its settlement kept for when the partition is back.
    fn ack_parked(&mut self, now: Instant, tag: DeliveryTag) -> Result<(), UsageError> {
        self.hand_back_parked(now, tag, Handback::Ack)?;
        self.metrics.acked += 1;
        Ok(())
    }

    /// Gives a delivered message back before its [`nack`](Self::nack) or
    /// [`reject`](Self::reject): its record is cached for the redelivery or the dead letter,
    /// which otherwise fetch it from the broker again. A delivered record is not copied into
    /// the cache (the application holds it, and most deliveries are acked), so a driver gives
    /// it back whenever the application hands a delivery back, dropped handles included.
    ///
    /// Returns whether it was cached: false for a delivery that is not outstanding (the nack
    /// that follows says why) or too large for the cache. Either way nothing is settled; only
    /// the nack or reject does that. A delivery of a partition parked in a rebalance is
    /// cached too, for its retry once the partition is back.
    pub fn give_back(&mut self, now: Instant, message: Message) -> bool {
        self.partitions.cache_returned(now, message)
    }

    /// Hands a delivery back for a retry after `delay` (or the backoff policy when `None`).
    /// Past `max_retry_attempts` it goes to the dead-letter path instead. Its record comes
    /// from the cache when it was given back ([`give_back`](Self::give_back)) and is still
    /// there, else from the broker.
    pub fn nack(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        delay: Option<Duration>,
    ) -> Result<(), UsageError> {
        if self.partitions.is_parked(tag.partition) {
            let how = if tag.attempt > self.config.max_retry_attempts {
                self.poison_handback(DiscardReason::RetriesExhausted {
                    attempts: tag.attempt,
                })
            } else {
                Handback::Retry
            };
            self.hand_back_parked(now, tag, how)?;
            self.metrics.nacked += 1;
            return Ok(());
        }
        let idx = self.outstanding(tag)?;
        self.partitions.delivery_ended();
        self.metrics.nacked += 1;
        if tag.attempt > self.config.max_retry_attempts {
            let reason = DiscardReason::RetriesExhausted {
                attempts: tag.attempt,
            };
            self.poison(now, idx, tag.offset, tag.attempt, reason);
        } else if self.close.is_some() {
            // Closing: no more deliveries. The offset stays unsettled, so it is redelivered to
            // the next consumer (at-least-once).
            self.partitions.schedule_retry(tag, idx, None);
        } else {
            let delay = delay.unwrap_or_else(|| self.jitter.retry(tag.attempt));
            trace!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, ?delay, "nack: retry scheduled");
            self.partitions
                .schedule_retry(tag, idx, Some(later(now, delay)));
        }
        self.poll_work(now);
        Ok(())
    }

    /// Sends a delivery straight to the dead-letter path (or discards it, with an event, when
    /// no dead-letter topic is configured).
    pub fn reject(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        reason: &str,
    ) -> Result<(), UsageError> {
        if self.partitions.is_parked(tag.partition) {
            let how = self.poison_handback(DiscardReason::Rejected(reason.to_owned()));
            self.hand_back_parked(now, tag, how)?;
            self.metrics.rejected += 1;
            return Ok(());
        }
        let idx = self.outstanding(tag)?;
        self.partitions.delivery_ended();
        self.metrics.rejected += 1;
        let reason = DiscardReason::Rejected(reason.to_owned());
        self.poison(now, idx, tag.offset, tag.attempt, reason);
        self.poll_work(now);
        Ok(())
    }

    /// Validates that `tag` names a delivery outstanding with the application.
    // Always inlined, as `settle` below and the partitions' two they call, and `send_work`
    // into the work step: a single `ack` runs in one frame (callgrind: 400 -> 335
    // instructions an ack).
    #[inline(always)]
    fn outstanding(&self, tag: DeliveryTag) -> Result<usize, UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        self.partitions.outstanding(tag)
    }

    /// What becomes of a poison delivery of a parked partition.
    fn poison_handback(&self, reason: DiscardReason) -> Handback {
        match self.config.dead_letter_queue {
            Some(_) => Handback::DeadLetter(reason),
            None => Handback::Discard(reason),
        }
    }

    /// A delivery of a partition given back in a rebalance and not reassigned yet, handed
    /// back: its parked state takes it (`partition/parked.rs`).
    fn hand_back_parked(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        how: Handback,
    ) -> Result<(), UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        let discarded = match &how {
            Handback::Discard(reason) => Some(reason.clone()),
            _ => None,
        };
        self.partitions.hand_back_parked(tag, how)?;
        trace!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, "handed back while its partition is parked");
        if let Some(reason) = discarded {
            warn!(topic = %self.config.topic, partition = tag.partition, offset = tag.offset, attempt = tag.attempt, %reason, "discarding poison message: no dead-letter topic");
            self.metrics.discarded += 1;
            self.events.push_back(Event::Discarded {
                partition: tag.partition,
                offset: tag.offset,
                attempts: tag.attempt,
                reason,
            });
        }
        self.poll_work(now);
        Ok(())
    }

    /// Marks an offset settled; the committer follows the watermark.
    #[inline(always)]
    pub(super) fn settle(&mut self, now: Instant, idx: usize, offset: u64) {
        let advanced = self.partitions.settle(idx, offset);
        self.committer.settled(now, advanced, &self.config);
    }

    /// A message exhausted its retries or was rejected.
    fn poison(
        &mut self,
        now: Instant,
        idx: usize,
        offset: u64,
        attempt: u32,
        reason: DiscardReason,
    ) {
        if self.config.dead_letter_queue.is_none() {
            let id = self.partitions.at(idx).id;
            warn!(topic = %self.config.topic, partition = id, offset, attempt, %reason, "discarding poison message: no dead-letter topic");
            self.discard(now, idx, offset, attempt, reason);
            return;
        }
        match self.partitions.cached_get(now, idx, offset) {
            Some(record) => self.enqueue_dead_letter(idx, offset, attempt, reason, record),
            // The cache lost it: fetch it again, then dead-letter it.
            None => self
                .partitions
                .refetch_for_dead_letter(idx, offset, attempt, reason),
        }
    }

    /// Settles a message that will not be delivered again, and says so.
    pub(super) fn discard(
        &mut self,
        now: Instant,
        idx: usize,
        offset: u64,
        attempts: u32,
        reason: DiscardReason,
    ) {
        self.metrics.discarded += 1;
        self.settle(now, idx, offset);
        self.events.push_back(Event::Discarded {
            partition: self.partitions.at(idx).id,
            offset,
            attempts,
            reason,
        });
    }

    pub(super) fn enqueue_dead_letter(
        &mut self,
        idx: usize,
        offset: u64,
        attempts: u32,
        reason: DiscardReason,
        record: Record,
    ) {
        let p = self.partitions.at_mut(idx);
        p.set(offset, Slot::DeadLetter { attempt: attempts });
        self.dead_letters.push(DeadLetterEntry {
            partition: p.id,
            epoch: p.epoch,
            offset,
            attempts,
            reason,
            record,
        });
    }
}
