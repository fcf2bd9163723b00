//! Partitions given back in a rebalance, kept until the next assignment says whether they come
//! back to this member.
//!
//! The rebalance is eager: every partition is drained, committed under the old generation and
//! let go before the rejoin. A partition is *parked* then, not forgotten: its settle window
//! (watermark, position, the deliveries the application still holds, nacked offsets) stays
//! under its epoch, and the application may keep acking, nacking and rejecting what it holds.
//! - The next assignment gives it back: it is *restored* under a new epoch, and the
//!   deliveries made under any epoch since its window began stay its outstanding ones. Once
//!   FetchOffset answers, it resumes where it stood if the broker's commit is at or below its
//!   settle watermark (the watermark is committed under the new generation), or starts over at
//!   a commit another member made meanwhile: then its old deliveries are stale, which the
//!   coordinator says with `Revoked` and `Assigned` of that partition.
//! - The next assignment (or the close) does not give it back: it is dropped, and the
//!   coordinator says `Revoked`; its held deliveries are stale from then on.
//!
//! A partition with a message on the dead-letter path when the rebalance lets it go is not
//! parked (the outbox and the refetch reasons forget it): it is revoked at once, as before.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::fetch::was_asked;
use super::index::{FetchTurn, Indexed};
use super::{AfterRefetch, Partition, Partitions, Phase, Slot};
use crate::error::UsageError;
use crate::event::{DeliveryTag, DiscardReason};
use crate::machine::requests::StartOwner;
use crate::protocol::TopicPartition;

/// What the application did with a delivery of a parked partition.
#[derive(Debug)]
pub(crate) enum Handback {
    /// Acked: settled.
    Ack,
    /// Nacked within its retries: retried once the partition is back.
    Retry,
    /// Rejected or out of retries, with a dead-letter topic: dead-lettered once it is back.
    DeadLetter(DiscardReason),
    /// Rejected or out of retries, without a dead-letter topic: discarded (settled) now.
    Discard(DiscardReason),
}

/// The parked partitions and what restoring one leaves to do.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    /// Partitions let go in a rebalance, by id, each under the epoch it had (their cached
    /// records stay in the cache).
    pub(super) partitions: BTreeMap<u32, Partition>,
    /// Restored partitions whose FetchOffset has not answered yet.
    restoring: BTreeSet<u32>,
    /// Per restored partition, the first epoch of its window: deliveries made under any epoch
    /// from this one to its current one are still outstanding with the application.
    since: BTreeMap<u32, u64>,
    /// Restored partitions that started over at a commit another member made meanwhile (for
    /// the coordinator to say so).
    restarted: Vec<u32>,
}

impl Parked {
    /// The parked partition of a delivery outstanding with the application, validated as
    /// [`Partitions::outstanding`] validates one of an assigned partition.
    pub(super) fn outstanding(&mut self, tag: DeliveryTag) -> Result<&mut Partition, UsageError> {
        let (partition, offset) = (tag.partition, tag.offset);
        let Some(p) = self.partitions.get_mut(&partition) else {
            return Err(UsageError::StaleDelivery { partition, offset });
        };
        let since = self.since.get(&partition).copied().unwrap_or(p.epoch);
        if tag.epoch < since || tag.epoch > p.epoch {
            return Err(UsageError::StaleDelivery { partition, offset });
        }
        match p.slot(offset) {
            Some(Slot::Delivered { attempt, .. }) if attempt == tag.attempt => Ok(p),
            Some(Slot::Delivered { .. }) => Err(UsageError::StaleDelivery { partition, offset }),
            _ if offset >= p.window.end() => Err(UsageError::UnknownDelivery { partition, offset }),
            _ => Err(UsageError::NotOutstanding { partition, offset }),
        }
    }
}

impl Partition {
    /// True when nothing of it is on the dead-letter path, which a revoke forgets.
    fn parkable(&self) -> bool {
        self.window.iter().all(|(_, u)| {
            !matches!(
                u.state,
                Slot::DeadLetter { .. }
                    | Slot::Stuck
                    | Slot::Refetching {
                        then: AfterRefetch::DeadLetter,
                        ..
                    }
            )
        })
    }

    /// Keeps what the application holds and what it handed back; fetched records not yet
    /// delivered are fetched again, and retries wait for the partition to come back.
    fn park(&mut self) {
        // Buffered offsets were never delivered, so the cache holds nothing of theirs.
        self.window.trim_back(|u| matches!(u.state, Slot::Buffered));
        for u in self.window.iter_mut() {
            u.state = match u.state {
                // Not delivered yet; its record is gone with the buffer: read it again.
                Slot::Buffered => Slot::Waiting { attempt: 0 },
                Slot::Ready { attempt }
                | Slot::Refetching {
                    attempt,
                    then: AfterRefetch::Redeliver,
                } => Slot::Waiting {
                    attempt: attempt.saturating_sub(1),
                },
                other => other,
            };
        }
        self.buffered.clear();
        self.stop_fetching();
        self.fetch_failures = 0;
        self.commit_in_flight = None;
        // Out of every index of the list (`revoke_all` clears them): its own record of where
        // it was indexed starts afresh too, so `unpark` indexes it like a new partition.
        self.dirty = false;
        self.indexed_backoff = None;
        self.counted_in_flight = false;
        self.indexed = Indexed::default();
        self.fetch_turn = FetchTurn::Candidate;
    }
}

impl Parked {
    /// The first epoch whose deliveries of partition `id` (now under `epoch`) are still its
    /// outstanding ones.
    pub(crate) fn since(&self, id: u32, epoch: u64) -> u64 {
        self.since.get(&id).copied().unwrap_or(epoch)
    }

    /// Partition `id` started over (a seek or a restart): its earlier deliveries are stale.
    pub(crate) fn forget(&mut self, id: u32) {
        self.since.remove(&id);
        self.restoring.remove(&id);
    }
}

impl Partitions {
    /// Parks the partition at `idx` (it stays in the list; the caller takes it out). False
    /// when it cannot be parked.
    pub(crate) fn park(&mut self, idx: usize) -> bool {
        let p = &mut self.list[idx];
        if !p.parkable() {
            return false;
        }
        // Fetched during the drain (a fetch in flight when it began).
        self.release_buffer(idx);
        let p = &mut self.list[idx];
        p.park();
        self.parked.restoring.remove(&p.id);
        true
    }

    /// Takes the parked partitions out of the list (after `park`).
    pub(crate) fn take_parked(&mut self, ids: &[u32]) {
        let list = std::mem::take(&mut self.list);
        self.list_changed();
        for p in list {
            if ids.contains(&p.id) {
                self.parked.partitions.insert(p.id, p);
            }
        }
    }

    /// Drops every parked partition the assignment `keep` does not give back (their cached
    /// messages too), remembering where each stood; returns their ids. Their outstanding
    /// deliveries are stale from here on.
    pub(crate) fn drop_parked(&mut self, keep: &[u32]) -> Vec<u32> {
        let gone: Vec<u32> = self
            .parked
            .partitions
            .keys()
            .copied()
            .filter(|id| !keep.contains(id))
            .collect();
        for &id in &gone {
            let Some(mut p) = self.parked.partitions.remove(&id) else {
                continue;
            };
            p.release_cached(&mut self.cache);
            self.unacked -= p.delivered();
            self.known_positions.insert(id, p.window.base());
            self.parked.forget(id);
            self.retries.retain(|&(_, pid, _)| pid != id);
            self.refetch_reasons.retain(|&(pid, _), _| pid != id);
        }
        self.tidy_cache();
        gone
    }

    /// Closing: restored partitions whose FetchOffset has not answered are let go like the
    /// parked ones (their watermark cannot be committed before the broker's offset is known:
    /// another member may have committed past it); returns their ids.
    pub(crate) fn drop_restoring(&mut self) -> Vec<u32> {
        let ids: Vec<u32> = std::mem::take(&mut self.parked.restoring)
            .into_iter()
            .filter(|&id| self.get(id).is_some_and(|p| p.phase == Phase::Starting))
            .collect();
        for &id in &ids {
            let Some(idx) = self.index(id) else { continue };
            let base = self.list[idx].window.base();
            self.known_positions.insert(id, base);
            self.restart(idx, base);
            self.take_out(idx);
        }
        ids
    }

    /// Removes the partition at `idx` from the list and from every index.
    pub(super) fn take_out(&mut self, idx: usize) {
        let p = self.list.remove(idx);
        self.list_changed();
        let id = p.id;
        self.dirty.retain(|&d| d != id);
        self.deliverable.remove(&id);
        self.fetch_candidates.remove(&id);
        self.lookups.remove(&id);
        self.byte_waiting.retain(|&(_, pid)| pid != id);
        if let Some(at) = p.indexed_backoff {
            self.backoffs.remove(&(at, id));
        }
        self.starting_due.remove(&id);
        self.uncommitted.remove(&id);
        if p.counted_in_flight {
            self.fetches_in_flight -= 1;
        }
    }

    /// Gives a parked partition back to this member under a new epoch; it waits for
    /// FetchOffset (`resume_restored`). False when `id` is not parked.
    pub(crate) fn unpark(&mut self, id: u32) -> bool {
        let Some(mut p) = self.parked.partitions.remove(&id) else {
            return false;
        };
        let since = self.parked.since(id, p.epoch);
        self.parked.since.insert(id, since);
        p.epoch = self.next_epoch;
        self.next_epoch += 1;
        p.phase = Phase::Starting;
        p.revoking = false;
        self.parked.restoring.insert(id);
        let at = self.list.partition_point(|q| q.id < id);
        self.list.insert(at, p);
        self.inserted(at);
        self.fetch_candidates.insert(id);
        self.mark(at);
        true
    }

    /// A FetchOffset that `asked` answered with the broker's `committed` offsets: every
    /// restored partition it asked about resumes where it stood when the commit is at or below
    /// its settle watermark (its nacked offsets are retried now), or starts over at the commit.
    /// Returns how many watermarks are to commit under the new generation.
    pub(crate) fn resume_restored(
        &mut self,
        now: Instant,
        asked: &[StartOwner],
        committed: impl Fn(&TopicPartition) -> Option<u64>,
        topic: &str,
    ) -> u64 {
        let mut moved = 0;
        let ids: Vec<u32> = self.parked.restoring.iter().copied().collect();
        for id in ids {
            let Some(idx) = self.index(id) else {
                self.parked.restoring.remove(&id);
                continue;
            };
            if self.list[idx].phase != Phase::Starting || !was_asked(asked, &self.list[idx]) {
                continue;
            }
            self.parked.restoring.remove(&id);
            self.mark(idx);
            self.list[idx].fetch_in_flight = false; // the FetchOffset
            let commit = committed(&TopicPartition::new(topic, id));
            let base = self.list[idx].window.base();
            if let Some(c) = commit.filter(|&c| c > base) {
                // Another member processed past this one's watermark and committed.
                self.restart(idx, c);
                let p = &mut self.list[idx];
                p.committed = Some(c);
                p.start = None;
                p.paused = false;
                p.phase = Phase::Active;
                self.parked.restarted.push(id);
                continue;
            }
            let p = &mut self.list[idx];
            p.committed = commit;
            p.start = None;
            p.phase = Phase::Active;
            if commit != Some(base) {
                moved += 1;
            }
            for (offset, u) in p.window.iter() {
                if matches!(u.state, Slot::Waiting { .. }) {
                    self.retries.insert((now, id, offset));
                }
            }
        }
        moved
    }

    /// Restored partitions that started over at another member's commit since the last call.
    pub(crate) fn take_restarted(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.parked.restarted)
    }

    /// True when partition `id` was given back and waits for its FetchOffset.
    pub(crate) fn is_restoring(&self, id: u32) -> bool {
        self.parked.restoring.contains(&id)
            && self.get(id).is_some_and(|p| p.phase == Phase::Starting)
    }

    /// True when deliveries of partition `id` are handed back to its parked state.
    pub(crate) fn is_parked(&self, id: u32) -> bool {
        self.parked.partitions.contains_key(&id)
    }

    /// Pauses or resumes a parked partition: it comes back so.
    pub(crate) fn set_parked_paused(&mut self, id: u32, paused: bool) {
        if let Some(p) = self.parked.partitions.get_mut(&id) {
            p.paused = paused;
        }
    }

    /// A delivery of a parked partition handed back: validated as
    /// [`outstanding`](Self::outstanding) does, then settled, or kept for a retry or the
    /// dead-letter path once the partition is back.
    pub(crate) fn hand_back_parked(
        &mut self,
        tag: DeliveryTag,
        how: Handback,
    ) -> Result<(), UsageError> {
        let (partition, offset) = (tag.partition, tag.offset);
        let p = self.parked.outstanding(tag)?;
        self.unacked -= 1;
        let attempt = tag.attempt;
        match how {
            Handback::Ack | Handback::Discard(_) => {
                let cache = &mut self.cache;
                p.window
                    .settle_with(offset, |u| _ = cache.release(&mut u.cached));
                self.tidy_cache();
            }
            Handback::Retry => p.set(offset, Slot::Waiting { attempt }),
            Handback::DeadLetter(reason) => {
                p.refetch_to_dead_letter(offset, attempt);
                self.refetch_reasons.insert((partition, offset), reason);
            }
        }
        Ok(())
    }
}
