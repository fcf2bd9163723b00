//! The dead-letter outbox: poison messages waiting for the dead-letter topic, their records
//! and headers, one produce in flight, its answer and its retry.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tracing::{info, warn};

use super::outbox::Outbox;
use super::partition::Partitions;
use super::requests::{expect, Owner, Requests};
use crate::backoff::{later, Jitter};
use crate::breaker::Breaker;
use crate::config::ConsumerConfig;
use crate::event::{DiscardReason, Event, RequestError, StallReason};
use crate::frame;
use crate::protocol::{
    error_code, AcknowledgmentLevel, Header, ProduceRequest, Record, RequestKind, Response,
    MAX_REQUEST_FRAME, PACKET_REQUEST_FRAME,
};

/// Header names the dead-letter record carries.
pub mod dead_letter_headers {
    /// Topic the message came from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
    /// Deliveries it had.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Last reason given by the application, cut to [`MAX_REASON_LEN`] bytes.
    pub const LAST_REASON: &str = "x-last-reason";
    /// The most bytes of the last reason a dead-letter record carries (cut at a character
    /// boundary): a long reason (an error chain, a backtrace) would otherwise make the record
    /// too large for one packet, or for any request, and stall its partition.
    pub const MAX_REASON_LEN: usize = 256;
    /// The consumer group.
    pub const CONSUMER_GROUP: &str = "x-consumer-group";
}

/// One poison message on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetterEntry {
    pub(crate) partition: u32,
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
    pub(crate) attempts: u32,
    pub(crate) reason: DiscardReason,
    pub(crate) record: Record,
}

/// A poison message too large for any dead-letter request: its partition stalls there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TooLarge {
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    /// The size of the request it would need.
    pub(crate) size: usize,
}

/// Answers in a row saying the broker read a produce of one record over a packet's frame in
/// part, after which its partition is reported stalled: over a network such a record is cut
/// every time (PROTOCOL.md) and would stall unseen; near a packet's size it may get through
/// alone, so one cut does not say it. A batch of one packet is cut only by chance (it
/// straddled two packets beside other requests), and never reported.
pub(crate) const CUTS_BEFORE_STALL: u32 = 3;

#[derive(Debug, Default)]
pub(crate) struct DeadLetters {
    queue: VecDeque<DeadLetterEntry>,
    in_flight: bool,
    failures: u32,
    /// Answers in a row that said the broker read a produce over one packet's frame in part.
    cuts: u32,
    /// The entry reported stalled because its produce keeps being cut, `(partition, offset)`,
    /// until it gets through or its partition is let go.
    cut_stall: Option<(u32, u64)>,
    pub(crate) retry_at: Option<Instant>,
}

impl DeadLetters {
    pub(crate) fn push(&mut self, entry: DeadLetterEntry) {
        self.queue.push_back(entry);
    }

    /// Drops the entries of a partition that was reset or let go.
    pub(crate) fn forget_partition(&mut self, partition: u32) {
        self.queue.retain(|e| e.partition != partition);
        if self.cut_stall.is_some_and(|(p, _)| p == partition) {
            self.cut_stall = None;
            self.cuts = 0;
        }
    }

    /// Whether [`send`](Self::send) may send or report anything: entries queued, none in
    /// flight, no retry backoff. Otherwise it returns at once, so `send_work` skips it.
    #[inline]
    pub(crate) fn has_work(&self) -> bool {
        !self.in_flight && self.retry_at.is_none() && !self.queue.is_empty()
    }

    /// Whether a partition is stalled because its dead-letter produce keeps being cut.
    pub(crate) fn cut_stalled(&self) -> bool {
        self.cut_stall.is_some()
    }

    /// Nothing queued and nothing in flight.
    pub(crate) fn is_flushed(&self) -> bool {
        self.queue.is_empty() && !self.in_flight
    }

    /// Sends the next batch (one produce in flight, as many records as fit one packet's frame,
    /// or one record alone) if one is due. Entries too large for any request come back, for
    /// the coordinator to stall their partition. The flag is false when the breaker said no.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> (Vec<TooLarge>, bool) {
        let mut too_large = Vec::new();
        if !self.has_work() {
            return (too_large, true);
        }
        let Some(topic) = config.dead_letter_queue.clone() else {
            return (too_large, true);
        };
        let base = frame::produce_base_len(&topic);
        // Too large for any request: stall the partition there, visibly. The first record
        // that fits opens the batch, built once.
        let (first, mut size) = loop {
            let Some(front) = self.queue.front() else {
                return (too_large, true);
            };
            let record = record(front, config);
            let size = base + record.encoded_len();
            if size <= MAX_REQUEST_FRAME {
                break (record, size);
            }
            if let Some(e) = self.queue.pop_front() {
                warn!(topic = %config.topic, partition = e.partition, offset = e.offset, size, "poison message too large for a dead-letter request; partition stalled");
                too_large.push(TooLarge {
                    partition: e.partition,
                    offset: e.offset,
                    size,
                });
            }
        };
        let Some(permit) = breaker.try_acquire() else {
            return (too_large, false);
        };
        let mut records = vec![first];
        let mut batch: Vec<DeadLetterEntry> = self.queue.pop_front().into_iter().collect();
        while let Some(front) = self.queue.front() {
            let record = record(front, config);
            let len = record.encoded_len();
            // One packet's worth, or the first record alone (it fits a frame, checked above).
            if size + len > PACKET_REQUEST_FRAME {
                break;
            }
            size += len;
            records.push(record);
            batch.extend(self.queue.pop_front());
        }
        self.in_flight = true;
        let request = ProduceRequest {
            topic,
            partition_id: config.dead_letter_partition,
            records,
            acks: AcknowledgmentLevel::Leader,
            timeout_ms: u32::try_from(config.request_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        requests.send(
            now,
            permit,
            Owner::DeadLetter { batch, size },
            request.into(),
        );
        (too_large, true)
    }

    /// The produce of `size` bytes answered: the confirmed batch comes back to be settled. On
    /// failure the batch's live entries go back to the front of the queue, retried with
    /// backoff. A produce over one packet's frame (one record) cut in transit
    /// [`CUTS_BEFORE_STALL`] times in a row stalls the partition of the entry at the front,
    /// visibly; it recovers when that entry gets through.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_answer(
        &mut self,
        now: Instant,
        batch: Vec<DeadLetterEntry>,
        size: usize,
        answer: Result<Response, RequestError>,
        partitions: &Partitions,
        jitter: &mut Jitter,
        events: &mut Outbox,
    ) -> Result<Vec<DeadLetterEntry>, RequestError> {
        let answer = expect(answer, RequestKind::Produce, |r| match r {
            Response::Produce(r) => Ok(r),
            other => Err(other),
        })
        .and_then(|r| match r.error_code {
            error_code::NONE => Ok(()),
            code => Err(RequestError::ErrorCode {
                request: RequestKind::Produce,
                code,
                message: r.error_message,
            }),
        });
        self.in_flight = false;
        match answer {
            Ok(()) => {
                self.failures = 0;
                self.cuts = 0;
                if let Some((partition, offset)) = self.cut_stall {
                    if batch
                        .iter()
                        .any(|e| (e.partition, e.offset) == (partition, offset))
                    {
                        self.cut_stall = None;
                        info!(partition, offset, "dead-letter record got through");
                        events.push_back(Event::Recovered { partition });
                    }
                }
                Ok(batch)
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(later(now, jitter.after_failures(self.failures)));
                self.cuts = if error.cut_in_transit() && size > PACKET_REQUEST_FRAME {
                    self.cuts.saturating_add(1)
                } else {
                    0
                };
                for e in batch.into_iter().rev() {
                    if partitions.live(e.partition, e.epoch) {
                        self.queue.push_front(e);
                    }
                }
                if self.cuts >= CUTS_BEFORE_STALL && self.cut_stall.is_none() {
                    if let Some(e) = self.queue.front() {
                        let (partition, offset) = (e.partition, e.offset);
                        warn!(partition, offset, size, cuts = self.cuts, "dead-letter request cut in transit again and again; partition stalled until it gets through");
                        self.cut_stall = Some((partition, offset));
                        events.push_back(Event::Stalled {
                            partition,
                            offset,
                            reason: StallReason::DeadLetterCut {
                                size,
                                cuts: self.cuts,
                            },
                        });
                    }
                }
                Err(error)
            }
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(end);
    }
    s
}

/// The record produced to the dead-letter topic: the original, plus headers saying where it
/// came from and why.
fn record(e: &DeadLetterEntry, config: &ConsumerConfig) -> Record {
    use dead_letter_headers::*;
    let mut record = e.record.clone();
    let text = |s: String| Bytes::from(s.into_bytes());
    record.headers.extend([
        Header::new(ORIGINAL_TOPIC, text(config.topic.clone())),
        Header::new(ORIGINAL_PARTITION, text(e.partition.to_string())),
        Header::new(ORIGINAL_OFFSET, text(e.offset.to_string())),
        Header::new(ATTEMPTS, text(e.attempts.to_string())),
        Header::new(LAST_REASON, text(cut(e.reason.to_string(), MAX_REASON_LEN))),
        Header::new(CONSUMER_GROUP, text(config.consumer_group.clone())),
    ]);
    record
}
