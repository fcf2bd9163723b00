//! The committer: when a commit is due, building it to fit one frame, its answer and its
//! failure, and fencing (no commit under a generation the coordinator refused).

use std::collections::BTreeMap;
use std::time::Instant;

use tracing::{debug, warn};

use super::outbox::Outbox;
use super::partition::Partitions;
use super::requests::{expect, CommitEntry, Owner, Requests};
use crate::backoff::{later, Jitter};
use crate::breaker::Breaker;
use crate::config::ConsumerConfig;
use crate::event::{CommitError, Event, Metrics, RequestError};
use crate::frame;
use crate::protocol::{
    error_code, CommitOffsetRequest, RequestKind, Response, TopicPartition, PACKET_REQUEST_FRAME,
};

/// Who commits: the group member and generation, or the manual assignment's learned
/// generation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitAs<'a> {
    pub(crate) member_id: &'a str,
    pub(crate) generation: u64,
}

/// How a commit's answer ended, for the coordinator's follow-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// Confirmed.
    Confirmed,
    /// Refused by the group coordinator for good; `fenced` under an illegal generation.
    Rejected { fenced: bool },
    /// A manual assignment's commit refused with `code` (16 or 22): the offsets go again
    /// once the generation is learned again.
    Refused { code: u32 },
    /// Not confirmed: the offsets go again with the next commit (with backoff).
    Failed,
}

#[derive(Debug, Default)]
pub(crate) struct Committer {
    pub(crate) in_flight: bool,
    /// A commit should be sent as soon as the breaker and the in-flight rule allow.
    wanted: bool,
    /// When the oldest uncommitted watermark advance happened (for `ack_batch_timeout`).
    dirty_since: Option<Instant>,
    /// Watermark advances since the last commit was sent.
    advanced: u64,
    /// Advances carried by the commit in flight.
    advanced_in_flight: u64,
    /// When the last commit was sent (`ack_batch_min_interval` runs from it).
    last_sent: Option<Instant>,
    /// `ack_batch_min_interval` after `last_sent`: from then on a full batch commits (kept,
    /// not summed on every settlement).
    full_batch_at: Option<Instant>,
    /// The commit in flight carries every offset that was due (not split for the frame).
    complete_in_flight: bool,
    /// A commit was answered for good during the close's final-commit phase.
    pub(crate) answered_in_close: bool,
    next_ticket: u64,
    /// Highest ticket asked for by `commit()`.
    pub(crate) requested: u64,
    failures: u32,
    pub(crate) retry_at: Option<Instant>,
    /// The group generation the coordinator refused a commit under (code 22): nothing more
    /// is committed under it, since every such commit would be refused too. A successful
    /// rejoin clears it.
    fenced_generation: Option<u64>,
}

impl Committer {
    /// `commit()`: a new ticket, and a commit as soon as possible.
    pub(crate) fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.requested = self.next_ticket;
        self.arm();
        self.requested
    }

    /// Commit as soon as possible, without waiting for a retry backoff.
    pub(crate) fn arm(&mut self) {
        self.wanted = true;
        self.retry_at = None;
    }

    /// Positions moved without a settlement (seek, a position the broker lost): commit them
    /// with the next batch.
    pub(crate) fn moved(&mut self, now: Instant, count: u64) {
        if count > 0 {
            self.advanced += count;
            self.dirty_since.get_or_insert(now);
        }
    }

    /// Settlements moved watermarks `advanced` offsets: auto-commit once a batch is full.
    pub(crate) fn settled(&mut self, now: Instant, advanced: u64, config: &ConsumerConfig) {
        if advanced > 0 {
            self.moved(now, advanced);
            self.want_full_batch(now, config);
        }
    }

    /// Wants a commit if a full batch waits and `ack_batch_min_interval` passed since the last
    /// one; otherwise [`ack_flush_at`](Self::ack_flush_at) names when it will have.
    fn want_full_batch(&mut self, now: Instant, config: &ConsumerConfig) {
        if !self.wanted && self.batch_full(config) && self.full_batch_at.is_none_or(|at| now >= at)
        {
            self.wanted = true;
        }
    }

    /// The batch settings changed (a live configuration update): a batch that is full under
    /// the new ones commits as it would have after a settlement.
    pub(crate) fn reconfigured(&mut self, now: Instant, config: &ConsumerConfig) {
        self.full_batch_at = self
            .last_sent
            .map(|last| later(last, config.ack_batch_min_interval));
        self.want_full_batch(now, config);
    }

    fn batch_full(&self, config: &ConsumerConfig) -> bool {
        config.enable_auto_commit && self.advanced >= config.ack_batch_size as u64
    }

    /// When settled offsets have waited `ack_batch_timeout`, or a full batch its
    /// `ack_batch_min_interval` since the last commit (while no commit is wanted or in flight).
    pub(crate) fn ack_flush_at(&self, config: &ConsumerConfig) -> Option<Instant> {
        let timeout = self
            .dirty_since
            .filter(|_| !self.in_flight && !self.wanted)
            .map(|t| later(t, config.ack_batch_timeout))?;
        let interval = self.full_batch_at.filter(|_| self.batch_full(config));
        Some(interval.map_or(timeout, |at| at.min(timeout)))
    }

    /// The ack flush deadline passed.
    pub(crate) fn flush(&mut self) {
        self.dirty_since = None;
        self.wanted = true;
    }

    /// Whether the coordinator refused commits under `generation` (the group's, if any).
    pub(crate) fn fenced(&self, generation: Option<u64>) -> bool {
        generation.is_some() && generation == self.fenced_generation
    }

    /// Whether a commit should go now (the breaker permitting).
    pub(crate) fn due(&self, generation: Option<u64>) -> bool {
        self.wanted && !self.in_flight && self.retry_at.is_none() && !self.fenced(generation)
    }

    /// The partitions were let go: nothing of theirs is left to commit.
    pub(crate) fn forget(&mut self) {
        self.wanted = false;
        self.dirty_since = None;
        self.advanced = 0;
        self.retry_at = None;
    }

    /// Sends one commit of the partitions whose watermark moved, as many as fit one packet's
    /// frame ([`PACKET_REQUEST_FRAME`]: about 40 partitions of a short topic name); the rest
    /// go in the next commit, sent when this one is answered.
    /// False when the breaker said no.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        now: Instant,
        by: CommitAs<'_>,
        partitions: &mut Partitions,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
        events: &mut Outbox,
        metrics: &mut Metrics,
    ) -> bool {
        let ticket = self.requested;
        let targets = partitions.commit_targets();
        if targets.is_empty() {
            self.forget_batch();
            if ticket > 0 && !self.in_flight {
                // Everything settled is already committed.
                events.push_back(Event::Committed {
                    ticket,
                    offsets: Vec::new(),
                });
                self.requested = 0;
            }
            return true;
        }
        let Some(permit) = breaker.try_acquire() else {
            return false;
        };
        let mut size = frame::commit_base_len(&config.consumer_group, by.member_id);
        let entry_len = frame::commit_entry_len(&config.topic);
        let mut offsets = BTreeMap::new();
        let mut entries = Vec::new();
        let mut complete = true;
        for (id, offset) in targets {
            if size + entry_len > PACKET_REQUEST_FRAME && !offsets.is_empty() {
                complete = false;
                break; // the rest goes in the next commit
            }
            size += entry_len;
            let Some(p) = partitions.get_mut(id) else {
                continue;
            };
            p.commit_in_flight = Some(offset);
            offsets.insert(TopicPartition::new(config.topic.clone(), id), offset);
            entries.push(CommitEntry {
                partition: id,
                epoch: p.epoch,
                offset,
            });
        }
        self.in_flight = true;
        self.last_sent = Some(now);
        self.full_batch_at = Some(later(now, config.ack_batch_min_interval));
        self.wanted = partitions.has_uncommitted();
        self.dirty_since = None;
        self.advanced_in_flight = std::mem::take(&mut self.advanced);
        self.complete_in_flight = complete;
        metrics.commits_sent += 1;
        let request = CommitOffsetRequest {
            group_id: config.consumer_group.clone(),
            member_id: by.member_id.to_owned(),
            generation_id: by.generation,
            offsets,
        };
        requests.send(
            now,
            permit,
            Owner::Commit { entries, ticket },
            request.into(),
        );
        true
    }

    fn forget_batch(&mut self) {
        self.wanted = false;
        self.dirty_since = None;
        self.advanced = 0;
    }

    /// A commit answered (or failed). `manual` for a manual assignment; `final_phase` while
    /// the close waits for the final commit. Returns the result for the breaker and how it
    /// ended; the coordinator then calls [`Committer::after_answer`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_answer(
        &mut self,
        now: Instant,
        entries: Vec<CommitEntry>,
        ticket: u64,
        answer: Result<Response, RequestError>,
        manual: bool,
        final_phase: bool,
        partitions: &mut Partitions,
        jitter: &mut Jitter,
        events: &mut Outbox,
        metrics: &mut Metrics,
    ) -> (Result<(), RequestError>, Answered) {
        let answer = expect(answer, RequestKind::CommitOffset, |r| match r {
            Response::CommitOffset(r) => Ok(r.error_code),
            other => Err(other),
        });
        let code = match answer {
            Ok(code) => code,
            Err(error) => {
                return (
                    Err(error),
                    self.failed(now, &entries, ticket, partitions, jitter, metrics),
                )
            }
        };
        self.in_flight = false;
        for entry in &entries {
            if let Some(p) = partitions.get_mut(entry.partition) {
                if p.epoch == entry.epoch || p.commit_in_flight.is_some() {
                    p.commit_in_flight = None;
                }
            }
        }
        let answered = match code {
            error_code::UNKNOWN_GROUP | error_code::ILLEGAL_GENERATION if manual => {
                // Manual assignment: the broker lost the group (a restart) or its generation
                // moved on. The offsets go again once the generation is learned again (join
                // and leave). Group state, not broker health, so the breaker ignores it.
                debug!(
                    code,
                    ticket, "manual commit refused; learning the group's generation again"
                );
                metrics.commits_failed += 1;
                self.advanced += std::mem::take(&mut self.advanced_in_flight);
                if code == error_code::UNKNOWN_GROUP {
                    // Whatever the broker held for the group is gone with it.
                    partitions.forget_commits();
                }
                self.wanted = partitions.has_uncommitted() || self.requested > ticket;
                return (Ok(()), Answered::Refused { code });
            }
            error_code::UNKNOWN_GROUP | error_code::ILLEGAL_GENERATION => {
                // The group moved on: reported, never retried under this (or a newer)
                // generation. Group state, not broker health, so the breaker does not count it.
                warn!(code, ticket, "commit rejected by the group coordinator");
                self.failures = self.failures.saturating_add(1);
                metrics.commits_failed += 1;
                self.advanced += std::mem::take(&mut self.advanced_in_flight);
                self.wanted = false;
                self.dirty_since = None;
                events.push_back(Event::CommitFailed {
                    ticket,
                    error: CommitError::Rejected { code },
                });
                Answered::Rejected {
                    fenced: code == error_code::ILLEGAL_GENERATION,
                }
            }
            error_code::NONE => {
                let mut confirmed = Vec::with_capacity(entries.len());
                for entry in entries {
                    // What the broker holds now, even if a seek since then moved the partition
                    // on: the next commit compares against it.
                    if let Some(p) = partitions.get_mut(entry.partition) {
                        p.committed = Some(entry.offset);
                    }
                    confirmed.push((entry.partition, entry.offset));
                }
                metrics.committed_settlements += self.advanced_in_flight;
                metrics.max_batch = metrics.max_batch.max(self.advanced_in_flight);
                self.advanced_in_flight = 0;
                self.failures = 0;
                debug!(ticket, ?confirmed, "committed");
                // A commit split to fit one packet answers `commit()` only with its last part.
                let complete = self.complete_in_flight;
                events.push_back(Event::Committed {
                    ticket: if complete { ticket } else { 0 },
                    offsets: confirmed,
                });
                Answered::Confirmed
            }
            code => {
                let failed = self.failed(now, &entries, ticket, partitions, jitter, metrics);
                let error = RequestError::ErrorCode {
                    request: RequestKind::CommitOffset,
                    code,
                    message: None,
                };
                return (Err(error), failed);
            }
        };
        // The close's final commit is over once answered for good, unless it was one part of
        // a split commit (the next part goes next).
        if final_phase && (self.complete_in_flight || answered != Answered::Confirmed) {
            self.answered_in_close = true;
        }
        (Ok(()), answered)
    }

    /// The commit was not confirmed. The broker may or may not have stored it (even if a
    /// seek since then moved the partition on): forget what we believed it holds, so the
    /// next commit states the watermark again whatever it is.
    fn failed(
        &mut self,
        now: Instant,
        entries: &[CommitEntry],
        ticket: u64,
        partitions: &mut Partitions,
        jitter: &mut Jitter,
        metrics: &mut Metrics,
    ) -> Answered {
        for entry in entries {
            if let Some(p) = partitions.get_mut(entry.partition) {
                p.committed = None;
                p.start = None;
            }
        }
        self.in_flight = false;
        self.failures = self.failures.saturating_add(1);
        metrics.commits_failed += 1;
        for p in partitions.iter_mut() {
            p.commit_in_flight = None;
        }
        // Settled offsets stay settled; the next commit carries them again.
        self.advanced += std::mem::take(&mut self.advanced_in_flight);
        self.wanted = partitions.has_uncommitted() || self.requested > ticket;
        if self.wanted {
            self.retry_at = Some(later(now, jitter.after_failures(self.failures)));
        }
        Answered::Failed
    }

    /// After the coordinator's follow-up (a revoke may have finished): report a failure, or
    /// want the next commit when a newer watermark or ticket waits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn after_answer(
        &mut self,
        now: Instant,
        answered: Answered,
        ticket: u64,
        partitions: &Partitions,
        config: &ConsumerConfig,
        closing: bool,
        events: &mut Outbox,
    ) {
        match answered {
            // Retried (with backoff) until the close deadline, not given up on.
            Answered::Failed => events.push_back(Event::CommitFailed {
                ticket,
                error: CommitError::Unconfirmed,
            }),
            Answered::Confirmed => {
                if self.requested > ticket || partitions.has_uncommitted() {
                    self.wanted |= self.requested > ticket || closing;
                    self.want_full_batch(now, config);
                }
            }
            Answered::Rejected { .. } | Answered::Refused { .. } => {}
        }
    }

    /// The coordinator refused `generation`: no more commits under it.
    pub(crate) fn fence(&mut self, generation: Option<u64>) {
        self.fenced_generation = generation;
    }

    /// A JoinGroup succeeded: the new membership's commits are not fenced.
    pub(crate) fn unfence(&mut self) {
        self.fenced_generation = None;
    }
}
