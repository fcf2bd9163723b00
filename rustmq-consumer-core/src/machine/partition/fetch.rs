//! Fetching: where each partition starts (FetchOffset, Latest), when a fetch goes out and the
//! buffer slots it reserves, the intake of a fetch answer (which teaches the fetch sizer),
//! refetches of lost messages, fetch backoff.

use std::time::Instant;

use tracing::{trace, warn};

use super::flights::{Flight, Landed};
use super::sizing::Room;
use super::{AfterRefetch, FetchTurn, Partition, Partitions, Phase, Refetched, Slot, Unsettled};
use crate::backoff::{self, later, Jitter};
use crate::breaker::Breaker;
use crate::config::{ConsumerConfig, StartPosition};
use crate::event::{DiscardReason, Metrics, RequestError};
use crate::frame;
use crate::machine::requests::{expect, FetchOwner, Owner, Requests, StartOwner};
use crate::protocol::{
    error_code, FetchOffsetRequest, FetchOffsetResponse, FetchRequest, FetchResponse, Request,
    RequestKind, Response, TopicPartition, PACKET_REQUEST_FRAME,
};

impl Partitions {
    /// Sends the FetchOffsets of the starting partitions due one. False when the breaker said
    /// no (the partitions it did not cover stay due).
    #[inline]
    pub(crate) fn send_fetch_offset(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> bool {
        self.refresh();
        if self.starting_due.is_empty() {
            return true;
        }
        self.send_fetch_offset_due(now, config, breaker, requests)
    }

    /// [`send_fetch_offset`](Self::send_fetch_offset) when a partition is due one: as many
    /// partitions per FetchOffset as fit one packet's frame (`PACKET_REQUEST_FRAME`: about 60
    /// partitions of a short topic name), each request with its own permit.
    fn send_fetch_offset_due(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
    ) -> bool {
        let room = PACKET_REQUEST_FRAME
            .saturating_sub(frame::fetch_offset_base_len(&config.consumer_group));
        let per_request = (room / frame::fetch_offset_entry_len(&config.topic)).max(1);
        let due: Vec<u32> = self.starting_due.iter().copied().collect();
        for ids in due.chunks(per_request) {
            let Some(permit) = breaker.try_acquire() else {
                return false;
            };
            let mut asked = Vec::with_capacity(ids.len());
            let mut topic_partitions = Vec::with_capacity(ids.len());
            for &id in ids {
                let Some(p) = self.get_mut(id) else {
                    continue;
                };
                p.fetch_in_flight = true;
                asked.push(StartOwner {
                    partition: id,
                    epoch: p.epoch,
                });
                topic_partitions.push(TopicPartition::new(config.topic.clone(), id));
            }
            let request = FetchOffsetRequest {
                group_id: config.consumer_group.clone(),
                topic_partitions,
            };
            requests.send(now, permit, Owner::FetchOffset(asked), request.into());
        }
        true
    }

    /// The committed offsets of the starting partitions `asked` arrived: place those still
    /// starting under the same epoch (the others have their own FetchOffset). Returns how many
    /// positions moved past what the broker holds (to commit again).
    pub(crate) fn on_fetch_offset(
        &mut self,
        now: Instant,
        asked: &[StartOwner],
        answer: Result<Response, RequestError>,
        config: &ConsumerConfig,
        jitter: &mut Jitter,
    ) -> Result<u64, RequestError> {
        let answer = expect(answer, RequestKind::FetchOffset, |r| match r {
            Response::FetchOffset(r) => Ok(r),
            other => Err(other),
        })
        .and_then(|r: FetchOffsetResponse| {
            // 16: the group has no state on the broker yet, so nothing was committed.
            match r.error_code {
                error_code::NONE | error_code::UNKNOWN_GROUP => Ok(r),
                code => Err(RequestError::ErrorCode {
                    request: RequestKind::FetchOffset,
                    code,
                    message: None,
                }),
            }
        });
        let r = match answer {
            Ok(r) => r,
            Err(error) => {
                self.phase_failed(now, Phase::Starting, jitter, |p| was_asked(asked, p));
                return Err(error);
            }
        };
        // Partitions given back to this member first (`parked.rs`).
        let mut moved =
            self.resume_restored(now, asked, |tp| r.offsets.get(tp).copied(), &config.topic);
        // Only the partitions this request asked about (a few dozen of maybe thousands).
        for owner in asked {
            let Some(idx) = self.index(owner.partition) else {
                continue;
            };
            if self.list[idx].phase != Phase::Starting || self.list[idx].epoch != owner.epoch {
                continue;
            }
            self.mark(idx);
            let p = &mut self.list[idx];
            let tp = TopicPartition::new(config.topic.clone(), p.id);
            p.fetch_in_flight = false;
            let known = self.known_positions.get(&p.id).copied();
            if let Some(&committed) = r.offsets.get(&tp) {
                // Everything below this member's own settle watermark was processed, even if
                // its commit was rejected in a rebalance: never go back behind it.
                let position = known.map_or(committed, |k| k.max(committed));
                p.committed = Some(committed);
                p.reset_window(position, &mut self.cache);
                p.phase = Phase::Active;
                if position != committed {
                    moved += 1;
                }
                continue;
            }
            // The broker lost its commits (a restart) but this member was here: keep its place.
            if let Some(known) = known {
                // No `start` baseline: the position is committed again with the next batch.
                p.reset_window(known, &mut self.cache);
                p.phase = Phase::Active;
                moved += 1;
                continue;
            }
            match config.start_position {
                StartPosition::Earliest => {
                    p.reset_window(0, &mut self.cache);
                    p.start = Some(0);
                    p.phase = Phase::Active;
                }
                StartPosition::Offset(o) => {
                    p.reset_window(o, &mut self.cache);
                    p.start = Some(o);
                    p.phase = Phase::Active;
                }
                // Resolved by a one-record fetch that reports the high watermark.
                _ => p.phase = Phase::Latest,
            }
        }
        self.tidy_cache();
        Ok(moved)
    }

    /// Every partition in `phase` that the failed request asked about backs off after a
    /// failed FetchOffset or Latest lookup.
    fn phase_failed(
        &mut self,
        now: Instant,
        phase: Phase,
        jitter: &mut Jitter,
        asked: impl Fn(&Partition) -> bool,
    ) {
        self.all_dirty = true;
        for p in &mut self.list {
            if p.phase == phase && asked(p) {
                p.fetch_failed(now, jitter);
            }
        }
    }

    /// The high watermark for a partition starting at Latest arrived.
    pub(crate) fn on_resolve_latest(
        &mut self,
        now: Instant,
        owner: FetchOwner,
        answer: Result<Response, RequestError>,
        jitter: &mut Jitter,
    ) -> Result<(), RequestError> {
        let r = match fetch_answer(answer) {
            Ok(r) => r,
            Err(error) => {
                self.phase_failed(now, Phase::Latest, jitter, |_| true);
                return Err(error);
            }
        };
        if let Some(idx) = self.index(owner.partition) {
            self.mark(idx);
            let p = &mut self.list[idx];
            if p.epoch == owner.epoch && p.phase == Phase::Latest {
                p.high_watermark = Some(r.high_watermark);
                p.reset_window(r.high_watermark, &mut self.cache);
                p.start = Some(r.high_watermark);
                p.phase = Phase::Active;
                p.fetch_in_flight = false;
            }
            self.tidy_cache();
        }
        Ok(())
    }

    /// Sends every partition's due refetch or fetch, partitions taking turns. Every fetch in
    /// flight reserves the buffer slots of the records it may bring back, so concurrent
    /// fetches of several partitions never bring back more than the buffer takes (which would
    /// be dropped and fetched again). False when the breaker said no.
    #[inline]
    pub(crate) fn send_fetches(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
        metrics: &mut Metrics,
    ) -> bool {
        self.refresh();
        // Nothing to visit: the common case after an ack.
        if self.byte_waiting.is_empty() && self.fetch_candidates.is_empty() {
            return true;
        }
        self.send_fetch_pass(now, config, breaker, requests, metrics)
    }

    /// [`send_fetches`](Self::send_fetches) when a partition may have a fetch to send.
    fn send_fetch_pass(
        &mut self,
        now: Instant,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
        metrics: &mut Metrics,
    ) -> bool {
        // Partitions that waited for buffer room for their first record and now fit.
        while let Some(&(need, id)) = self.byte_waiting.first() {
            if self.buffered > 0 && self.buffered_bytes + need > config.prefetch_bytes {
                break;
            }
            self.byte_waiting.pop_first();
            if let Some(idx) = self.index(id) {
                self.list[idx].fetch_turn = FetchTurn::Candidate;
                self.fetch_candidates.insert(id);
            }
        }
        // Nothing to visit (the lookups below are visited only after a candidate found the
        // buffer full): the common case after an ack.
        if self.fetch_candidates.is_empty() {
            return true;
        }
        // Partitions take turns in id order from `fetch_turn`, once each; once the buffer is
        // full, only refetches and Latest lookups can go.
        let start = self.fetch_turn;
        let (mut from, mut wrapped, mut full) = (start, false, false);
        loop {
            let set = if full {
                &self.lookups
            } else {
                &self.fetch_candidates
            };
            let next = if wrapped {
                set.range(from..start).next()
            } else {
                set.range(from..).next()
            };
            let Some(&id) = next else {
                if wrapped {
                    return true;
                }
                (from, wrapped) = (0, true);
                continue;
            };
            match id.checked_add(1) {
                Some(after) => from = after,
                None if wrapped => return true,
                None => (from, wrapped) = (0, true),
            }
            let Some(idx) = self.index(id) else {
                self.fetch_candidates.remove(&id);
                self.lookups.remove(&id);
                continue;
            };
            let visit = self.send_partition_fetches(now, idx, config, breaker, requests, metrics);
            if !self.list[idx].has_lookup() {
                self.lookups.remove(&id);
            }
            match visit {
                Visit::Refused => return false,
                Visit::Waits => self.set_aside(idx),
                Visit::ByteBlocked(need) => {
                    self.set_aside(idx);
                    self.byte_waiting.insert((need, id));
                }
                Visit::Full => full = true,
            }
        }
    }

    /// Takes the partition at `idx` out of the fetch candidates until its own state changes.
    fn set_aside(&mut self, idx: usize) {
        let p = &mut self.list[idx];
        p.fetch_turn = FetchTurn::SetAside(p.fetch_state(self.max_unsettled));
        self.fetch_candidates.remove(&p.id);
    }

    /// Sends one partition's refetch or fetches if due, and says what the partition waits for
    /// now. A fetch goes out as soon as the buffer has room for one worth its round trip,
    /// while earlier records are still delivered: it asks for what that room takes, in the
    /// broker's unit (see [`super::sizing`]), and reserves the records it may bring back. A
    /// second one may go out ahead of it (see [`super::flights`]).
    fn send_partition_fetches(
        &mut self,
        now: Instant,
        idx: usize,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
        metrics: &mut Metrics,
    ) -> Visit {
        let p = &mut self.list[idx];
        if p.fetch_not_before.is_some() {
            return Visit::Waits;
        }
        if !p.refetch_in_flight {
            if let Some(&offset) = p.refetch.front() {
                let Some(permit) = breaker.try_acquire() else {
                    return Visit::Refused;
                };
                p.refetch.pop_front();
                p.refetch_in_flight = true;
                metrics.refetches += 1;
                let owner = FetchOwner {
                    partition: p.id,
                    epoch: p.epoch,
                    offset,
                };
                let request = fetch_request(config, owner.partition, offset, 1);
                requests.send(now, permit, Owner::Refetch(owner), request);
            }
        }
        // After one is sent, maybe one more goes out ahead of it.
        loop {
            if let Some(visit) = self.send_fetch(now, idx, config, breaker, requests, metrics) {
                return visit;
            }
        }
    }

    /// Sends the partition at `idx` a fetch if one is due: `None` when it sent one, or else
    /// what it waits for.
    fn send_fetch(
        &mut self,
        now: Instant,
        idx: usize,
        config: &ConsumerConfig,
        breaker: &mut Breaker,
        requests: &mut Requests,
        metrics: &mut Metrics,
    ) -> Option<Visit> {
        // A first fetch's share of the buffer (see `Room::first_share`).
        let first_share = config.fetch_size / self.list.len().max(1);
        let p = &mut self.list[idx];
        if p.paused || p.revoking || p.phase == Phase::Starting {
            return Some(Visit::Waits); // a Starting partition waits for FetchOffset
        }
        if p.fetch_in_flight && p.flights.is_empty() {
            return Some(Visit::Waits); // its FetchOffset or Latest lookup
        }
        let offset = if p.flights.is_empty() {
            p.window.end()
        } else {
            // Ahead of the fetch in flight: only while no other partition's is (with several
            // partitions fetching, their fetches overlap already), where that one's end is
            // known (see `FetchSizer::knows_cost`) and the partition holds records past it.
            match p.flights.ahead_from(p.window.end()) {
                Some(from)
                    if self.fetches_in_flight == 1
                        && self.sizer.knows_cost()
                        && p.high_watermark.is_some_and(|hw| from < hw) =>
                {
                    from
                }
                _ => return Some(Visit::Waits),
            }
        };
        let owner = FetchOwner {
            partition: p.id,
            epoch: p.epoch,
            offset,
        };
        if p.phase == Phase::Latest {
            let Some(permit) = breaker.try_acquire() else {
                return Some(Visit::Refused);
            };
            p.fetch_in_flight = true;
            p.counted_in_flight = true;
            self.fetches_in_flight += 1;
            let request = fetch_request(config, owner.partition, 0, 1);
            requests.send(now, permit, Owner::ResolveLatest(owner), request);
            return Some(Visit::Waits);
        }
        // The offsets the fetches in flight may bring back count against the span too.
        let span = p.window.span() + p.flights.reserved() as u64;
        if span >= config.max_unsettled_per_partition {
            return Some(Visit::Waits); // until settlements move the window
        }
        if let Some(need) = p.byte_blocked {
            if self.buffered > 0 && self.buffered_bytes + need > config.prefetch_bytes {
                return Some(Visit::ByteBlocked(need));
            }
        }
        let room = Room {
            records: config
                .fetch_size
                .saturating_sub(self.buffered + self.fetch_reserved),
            span: config.max_unsettled_per_partition.saturating_sub(span),
            bytes: config.prefetch_bytes.saturating_sub(self.buffered_bytes),
            reserved: self.fetch_reserved,
            buffered: self.buffered,
            available: p.high_watermark.map(|hw| hw.saturating_sub(offset)),
            first_share: p.high_watermark.is_none().then_some(first_share),
        };
        // Not worth a round trip yet: wait for deliveries to free room.
        let Some(planned) = self.sizer.plan(room, config) else {
            return Some(Visit::Full);
        };
        let Some(permit) = breaker.try_acquire() else {
            return Some(Visit::Refused);
        };
        if !p.counted_in_flight {
            p.counted_in_flight = true;
            self.fetches_in_flight += 1;
        }
        p.fetch_in_flight = true;
        p.flights.push(Flight {
            offset,
            planned,
            released: p.byte_blocked.take().is_some(),
            landed: None,
        });
        self.fetch_reserved += planned.records;
        self.fetch_turn = owner.partition.checked_add(1).unwrap_or(0);
        metrics.fetches += 1;
        let request = fetch_request(config, owner.partition, offset, planned.max_bytes);
        requests.send(now, permit, Owner::Fetch(owner), request);
        None
    }

    /// A fetch answered: buffer what fits, or back off (empty fetch, failure). Answers are
    /// taken in offset order: one that lands before the fetch in front of it waits for it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_fetch(
        &mut self,
        now: Instant,
        owner: FetchOwner,
        answer: Result<Response, RequestError>,
        closing: bool,
        config: &ConsumerConfig,
        jitter: &mut Jitter,
        metrics: &mut Metrics,
    ) -> Result<(), RequestError> {
        let answer = fetch_answer(answer);
        let Some(idx) = self.index(owner.partition) else {
            return answer.map(drop);
        };
        self.mark(idx);
        let p = &mut self.list[idx];
        // A stale answer's reservation went with the restart that made it stale.
        let position = (p.epoch == owner.epoch)
            .then(|| p.flights.position(owner.offset))
            .flatten();
        let (r, position) = match (answer, position) {
            (Ok(r), Some(at)) => (r, at),
            (Ok(_) | Err(RequestError::ErrorCode { .. }), None) => {
                trace!(
                    partition = owner.partition,
                    "ignoring a fetch from before a seek or reassignment"
                );
                return Ok(());
            }
            (Err(error), _) => {
                // The delay is drawn even for a stale failure, keeping the PRNG's sequence.
                let failures = p.fetch_failures.saturating_add(1);
                let delay = jitter.after_failures(failures);
                if let Some(flight) = position.and_then(|at| p.flights.remove(at)) {
                    self.fetch_reserved -= flight.planned.records;
                    p.fetch_failures = failures;
                    p.fetch_not_before = Some(later(now, delay));
                    // A fetch ahead of it is past a gap now: dropped when it lands (or now,
                    // if it landed).
                    self.take_landed(now, idx, closing, config, metrics);
                }
                return Err(error);
            }
        };
        p.fetch_failures = 0;
        if let Some(flight) = p.flights.get(position) {
            let more = r.high_watermark > owner.offset.saturating_add(r.records.len() as u64);
            self.sizer
                .learn(flight.planned.max_bytes, r.records.len(), more);
        }
        p.flights.land(
            position,
            Landed {
                records: r.records,
                high_watermark: r.high_watermark,
            },
        );
        self.take_landed(now, idx, closing, config, metrics);
        Ok(())
    }

    /// Takes the answers of the partition at `idx` that are next in offset order.
    fn take_landed(
        &mut self,
        now: Instant,
        idx: usize,
        closing: bool,
        config: &ConsumerConfig,
        metrics: &mut Metrics,
    ) {
        while let Some((flight, landed)) = self.list[idx].flights.pop_landed() {
            self.fetch_reserved -= flight.planned.records;
            self.take_answer(now, idx, &flight, landed, closing, config, metrics);
        }
        let p = &mut self.list[idx];
        p.fetch_in_flight = !p.flights.is_empty();
    }

    /// Takes a fetch answer in its turn: buffers what fits from the partition's position on
    /// (an answer overlapping the one before it is taken from where that one ended), or backs
    /// off after an empty one.
    #[allow(clippy::too_many_arguments)]
    fn take_answer(
        &mut self,
        now: Instant,
        idx: usize,
        flight: &Flight,
        landed: Landed,
        closing: bool,
        config: &ConsumerConfig,
        metrics: &mut Metrics,
    ) {
        let p = &mut self.list[idx];
        p.high_watermark = Some(landed.high_watermark);
        let end = p.window.end();
        // Past a gap (the answer before it came back short or failed), or closing.
        let Some(skip) = end.checked_sub(flight.offset).filter(|_| !closing) else {
            trace!(
                partition = p.id,
                offset = flight.offset,
                "dropping an answer past a gap"
            );
            return;
        };
        let mut records = landed.records;
        if records.is_empty() {
            if skip == 0 {
                // No long-poll on the broker: back off before asking again.
                p.fetch_not_before = Some(later(
                    now,
                    backoff::ceiling(
                        config.empty_fetch_backoff_min,
                        config.empty_fetch_backoff_max,
                        p.empty_fetches + 1,
                    ),
                ));
                p.empty_fetches = p.empty_fetches.saturating_add(1);
            }
            return;
        }
        let Some(skip) = usize::try_from(skip).ok().filter(|&s| s < records.len()) else {
            return; // the answer before it brought all of these
        };
        records.drain(..skip);
        p.empty_fetches = 0;
        let span_room = config
            .max_unsettled_per_partition
            .saturating_sub(p.window.span());
        // At most this many are taken (the byte budget may stop sooner): room for them at once.
        let most = usize::try_from(span_room)
            .unwrap_or(usize::MAX)
            .min(config.fetch_size.saturating_sub(self.buffered))
            .min(records.len());
        p.window.reserve(most);
        let released = flight.released;
        let mut taken = 0u64;
        let (mut first_bytes, mut taken_bytes) = (0, 0);
        for record in &records {
            let bytes = record.encoded_len();
            if taken == 0 {
                first_bytes = bytes; // only the first record is looked at while none is taken
            }
            // A fetch released from a wait for byte room takes its first record whatever
            // answers came in beside it, or they could take that room again every time (a
            // fetch spin, swarm seed 97915): the budget overshoots by at most one record.
            let over_bytes = self.buffered_bytes + bytes > config.prefetch_bytes
                && self.buffered > 0
                && !(released && taken == 0);
            if taken >= span_room || self.buffered >= config.fetch_size || over_bytes {
                break; // the rest is fetched again later
            }
            if end.checked_add(taken).is_none() {
                break;
            }
            p.window.push(Unsettled::new(Slot::Buffered));
            self.buffered += 1;
            self.buffered_bytes += bytes;
            taken_bytes += bytes;
            taken += 1;
        }
        if taken == 0 {
            // Nothing fitted: wait for deliveries to free room rather than asking again now.
            p.byte_blocked = Some(first_bytes);
        }
        // The answer's own list is the buffer (no record moved twice); one that gives up most
        // of its records is shrunk, so what is left over does not hold its room.
        records.truncate(taken as usize);
        if records.capacity() > 2 * records.len() {
            records.shrink_to_fit();
        }
        p.buffered.push(end, records);
        self.sizer.taken(taken as usize, taken_bytes);
        metrics.received += taken;
    }

    /// A fetch of `owner` failed with an error that names its partition: returns the offset
    /// it asked for when this starts a stall (reported once, not on every retry).
    pub(crate) fn fetch_failing(&mut self, owner: FetchOwner) -> Option<u64> {
        let p = self
            .get_mut(owner.partition)
            .filter(|p| p.epoch == owner.epoch && !p.fetch_failing)?;
        p.fetch_failing = true;
        Some(owner.offset)
    }

    /// A fetch of `owner` succeeded: true when this ends a stall of failing fetches.
    pub(crate) fn fetch_recovered(&mut self, owner: FetchOwner) -> bool {
        let Some(p) = self
            .get_mut(owner.partition)
            .filter(|p| p.epoch == owner.epoch && p.fetch_failing)
        else {
            return false;
        };
        p.fetch_failing = false;
        true
    }

    /// A single-offset fetch of a lost message answered.
    pub(crate) fn on_refetch(
        &mut self,
        now: Instant,
        owner: FetchOwner,
        answer: Result<Response, RequestError>,
        jitter: &mut Jitter,
    ) -> Result<Refetched, RequestError> {
        let FetchOwner {
            partition,
            epoch,
            offset,
        } = owner;
        let answer = fetch_answer(answer);
        let Some(p) = self.get_mut(partition).filter(|p| p.epoch == epoch) else {
            return match answer {
                Ok(_) | Err(RequestError::ErrorCode { .. }) => Ok(Refetched::Done),
                Err(error) => Err(error),
            };
        };
        p.refetch_in_flight = false;
        let r = match answer {
            Ok(r) => r,
            Err(error) => {
                if matches!(p.slot(offset), Some(Slot::Refetching { .. })) {
                    p.refetch.push_front(offset);
                }
                p.fetch_failures = p.fetch_failures.saturating_add(1);
                p.fetch_not_before = Some(later(now, jitter.after_failures(p.fetch_failures)));
                return Err(error);
            }
        };
        let Some(Slot::Refetching { attempt, then }) = p.slot(offset) else {
            return Ok(Refetched::Done);
        };
        let Some(record) = r.records.into_iter().next() else {
            warn!(
                partition,
                offset, attempt, "message no longer on the broker"
            );
            self.refetch_reasons.remove(&(partition, offset));
            return Ok(Refetched::Gone { attempt });
        };
        match then {
            AfterRefetch::Redeliver => {
                p.set(offset, Slot::Ready { attempt });
                p.redeliver.push_back((offset, record));
                Ok(Refetched::Done)
            }
            AfterRefetch::DeadLetter => {
                // A revoke drops the reasons; the record then carries an empty one.
                let reason = self
                    .refetch_reasons
                    .remove(&(partition, offset))
                    .unwrap_or(DiscardReason::Rejected(String::new()));
                Ok(Refetched::DeadLetter {
                    attempt,
                    reason,
                    record,
                })
            }
        }
    }
}

/// What a partition waits for after its turn at sending fetches.
enum Visit {
    /// The breaker refused a request: no more requests now.
    Refused,
    /// Its own state (in flight, backoff, paused, window full...): nothing until it changes.
    Waits,
    /// Room in the prefetch buffer, as every partition does.
    Full,
    /// Room in the prefetch buffer for a first record of this many bytes.
    ByteBlocked(usize),
}

/// Whether a FetchOffset that `asked` (in ascending partition order) covers `p` under its
/// current epoch.
pub(super) fn was_asked(asked: &[StartOwner], p: &Partition) -> bool {
    asked
        .binary_search_by_key(&p.id, |o| o.partition)
        .is_ok_and(|i| asked[i].epoch == p.epoch)
}

/// A fetch request, complete.
fn fetch_request(config: &ConsumerConfig, partition: u32, offset: u64, max_bytes: u32) -> Request {
    FetchRequest {
        topic: config.topic.clone(),
        partition_id: partition,
        fetch_offset: offset,
        max_bytes,
        timeout_ms: u32::try_from(config.fetch_timeout.as_millis()).unwrap_or(u32::MAX),
    }
    .into()
}

/// A fetch answer with error code 0, or why not.
fn fetch_answer(answer: Result<Response, RequestError>) -> Result<FetchResponse, RequestError> {
    let r = expect(answer, RequestKind::Fetch, |r| match r {
        Response::Fetch(r) => Ok(r),
        other => Err(other),
    })?;
    if r.error_code == error_code::NONE {
        Ok(r)
    } else {
        Err(RequestError::ErrorCode {
            request: RequestKind::Fetch,
            code: r.error_code,
            message: r.error_message,
        })
    }
}
