//! The retry schedule: nacked deliveries wait for their time, then come back from the cache
//! or are fetched again.

use std::time::Instant;

use tracing::trace;

use super::{AfterRefetch, Partitions, Slot};
use crate::event::{DeliveryTag, DiscardReason};

impl Partitions {
    /// A nacked delivery waits for its retry at `due` (`None`: closing, it stays unsettled
    /// and the next consumer reads it again).
    pub(crate) fn schedule_retry(&mut self, tag: DeliveryTag, idx: usize, due: Option<Instant>) {
        self.at_mut(idx).set(
            tag.offset,
            Slot::Waiting {
                attempt: tag.attempt,
            },
        );
        if let Some(due) = due {
            self.retries.insert((due, tag.partition, tag.offset));
        }
    }

    /// The earliest retry due.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.retries.first().map(|r| r.0)
    }

    /// Makes every retry due by `now` ready: redelivered from the cache, or fetched again.
    pub(crate) fn retries_due(&mut self, now: Instant) {
        while let Some(&(at, partition, offset)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            let Some(idx) = self.index(partition) else {
                continue;
            };
            self.mark(idx);
            let Some(Slot::Waiting { attempt }) = self.list[idx].slot(offset) else {
                continue;
            };
            let attempt = attempt + 1;
            let cached = self.cached_get(now, idx, offset);
            let p = &mut self.list[idx];
            match cached {
                Some(record) => {
                    p.set(offset, Slot::Ready { attempt });
                    p.redeliver.push_back((offset, record));
                }
                None => {
                    trace!(
                        partition,
                        offset,
                        "retry: cache lost the message, fetching it again"
                    );
                    p.set(
                        offset,
                        Slot::Refetching {
                            attempt,
                            then: AfterRefetch::Redeliver,
                        },
                    );
                    p.refetch.push_back(offset);
                }
            }
        }
    }

    /// A poison message the cache lost: fetch it again, then dead-letter it.
    pub(crate) fn refetch_for_dead_letter(
        &mut self,
        idx: usize,
        offset: u64,
        attempt: u32,
        reason: DiscardReason,
    ) {
        self.mark(idx);
        let p = &mut self.list[idx];
        p.refetch_to_dead_letter(offset, attempt);
        self.refetch_reasons.insert((p.id, offset), reason);
    }
}
