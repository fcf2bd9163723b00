//! The fault layer between the machine and the broker: each request's fate (delivered,
//! lost either way, an error frame, late), its arrival at the broker, and its answer (or
//! failure) back to the machine; and the requests of the mutant drivers.

use std::collections::BTreeMap;
use std::time::Duration;

use rustmq_consumer_core::protocol::{
    error_code, CommitOffsetRequest, LeaveGroupRequest, Request, Response, TopicPartition,
};
use rustmq_consumer_core::{dead_letter_headers, RequestId, TransportError};

use super::{commit_offsets, Flight, Handler, Item, Simulation, GROUP, ROGUE_IDS, TOPIC};
use crate::faults::Fate;
use crate::invariants::Violation;

impl<H: Handler> Simulation<H> {
    pub(super) fn send(&mut self, id: RequestId, request: Request) -> Result<(), Violation> {
        let bound = match &request {
            Request::CommitOffset(c) => {
                let offsets = commit_offsets(c);
                self.checker
                    .check_commit_owner(&offsets, c.generation_id, &c.member_id)?;
                self.checker.on_commit_sent(&offsets)?
            }
            Request::LeaveGroup(_) => {
                let uncommitted: Vec<u32> = self.machine.as_ref().map_or(Vec::new(), |m| {
                    m.assigned_partitions()
                        .into_iter()
                        .filter(|&p| {
                            m.settle_watermark(p)
                                .is_some_and(|w| m.committed_offset(p).unwrap_or(0) < w)
                        })
                        .collect()
                });
                self.checker.on_leave_sent(&uncommitted)?;
                BTreeMap::new()
            }
            _ => BTreeMap::new(),
        };
        let elapsed = self.elapsed();
        let mut fate = self.scenario.faults.fate(&mut self.fault_rng, elapsed);
        if !self.scenario.faults.late_arrival {
            // The request reaches the broker before its deadline (its answer may still be late).
            // The deadline in force when it was sent (live updates change it).
            let limit = self
                .machine()
                .config()
                .request_timeout
                .saturating_sub(Duration::from_millis(1));
            match &mut fate {
                Fate::Deliver { there, .. } | Fate::LostResponse { there } => {
                    *there = (*there).min(limit);
                }
                _ => {}
            }
        }
        if !matches!(fate, Fate::Deliver { .. }) {
            self.report.faults += 1;
        }
        // Packed with the requests sent at this instant (split reads), whatever its fate.
        let now = self.now;
        let unread = self.broker.send(now, &request).err();
        self.report.cut += u64::from(matches!(unread, Some(TransportError::Broker(_))));
        let flight = Flight {
            request,
            unread,
            fate,
            bound,
            answer: None,
        };
        match fate {
            Fate::Deliver { there, .. } | Fate::LostResponse { there } => {
                self.schedule(there, Item::Arrive(id))
            }
            Fate::ErrorFrame { after } => self.schedule(after, Item::Answer(id)),
            Fate::LostRequest => {}
        }
        let mut flight = flight;
        if let Fate::ErrorFrame { .. } = fate {
            flight.answer = Some(Err(TransportError::Broker(
                "Error: simulated broker failure".to_owned(),
            )));
        }
        self.flights.insert(id, flight);
        Ok(())
    }

    pub(super) fn arrive(&mut self, id: RequestId) -> Result<(), Violation> {
        let now = self.now;
        let Some(flight) = self.flights.get_mut(&id) else {
            return Ok(());
        };
        let previous: BTreeMap<u32, u64> = match &flight.request {
            Request::CommitOffset(c) => commit_offsets(c)
                .into_iter()
                .filter_map(|(p, _)| {
                    let o = self
                        .broker
                        .committed(GROUP, &TopicPartition::new(TOPIC, p))?;
                    Some((p, o))
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let result = match flight.unread.clone() {
            Some(error) => Err(error),
            None => self.broker.serve(now, flight.request.clone()),
        };
        // A cold-tier cache miss answers later by the broker's cold-read latency (none unless
        // a test set one and tiered records to cold).
        let owed = self.broker.take_answer_delay();
        // Side effects the checker must know about: confirmed dead letters, accepted commits.
        let mut accepted = Vec::new();
        let mut stored = Vec::new();
        match (&flight.request, &result) {
            (Request::Produce(req), Ok(Response::Produce(r))) if r.error_code == 0 => {
                for rec in &req.records {
                    let h = |k| {
                        rec.header(k)
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    };
                    if let (Some(p), Some(o)) = (
                        h(dead_letter_headers::ORIGINAL_PARTITION),
                        h(dead_letter_headers::ORIGINAL_OFFSET),
                    ) {
                        stored.push((p as u32, o));
                    }
                }
            }
            (Request::CommitOffset(req), Ok(Response::CommitOffset(r))) if r.error_code == 0 => {
                accepted = req
                    .offsets
                    .iter()
                    .filter(|(tp, _)| tp.topic == TOPIC)
                    .map(|(tp, o)| (tp.partition, *o))
                    .collect();
            }
            _ => {}
        }
        let bound = flight.bound.clone();
        match flight.fate {
            Fate::Deliver { back, .. } => {
                flight.answer = Some(result);
                self.schedule(back + owed, Item::Answer(id));
            }
            // The answer is lost: only a connection loss or the deadline ends it.
            _ => flight.answer = None,
        }
        for (p, o) in stored {
            self.checker.dead_letter_stored(p, o);
        }
        self.checker
            .check_commit_monotonic(&accepted, |p| previous.get(&p).copied())?;
        self.checker.on_commit_accepted(&accepted, &bound)
    }

    pub(super) fn deliver_answer(
        &mut self,
        id: RequestId,
        request: Option<&Request>,
        answer: Result<Response, TransportError>,
    ) -> Result<(), Violation> {
        self.checker.on_resolved(id);
        if id.0 >= ROGUE_IDS {
            return Ok(());
        }
        self.trace("answer", &(id, answer.as_ref().map(|r| r.kind())));
        match (request, &answer) {
            (Some(Request::Fetch(f)), Ok(Response::Fetch(r))) => {
                self.checker
                    .on_fetch_answer(f.partition_id, f.fetch_offset, r.records.len());
            }
            (Some(Request::JoinGroup(_)), Ok(Response::JoinGroup(r)))
                if r.error_code == error_code::NONE =>
            {
                self.checker.on_join_answer(r.generation_id, &r.member_id);
            }
            _ => {}
        }
        let now = self.now;
        self.machine().handle_response(now, id, answer);
        self.after_input()
    }

    pub(super) fn fail_all_in_flight(&mut self, why: &str) -> Result<(), Violation> {
        let ids: Vec<RequestId> = self.flights.keys().copied().collect();
        for id in ids {
            self.flights.remove(&id);
            self.report.faults += 1;
            self.deliver_answer(
                id,
                None,
                Err(TransportError::ConnectionLost(why.to_owned())),
            )?;
        }
        Ok(())
    }

    /// The mutant driver's commit, sent through the fault layer under an id the machine never
    /// issued; its answer is dropped.
    pub(super) fn rogue_commit(&mut self, partition: u32, offset: u64) -> Result<(), Violation> {
        let request = CommitOffsetRequest {
            group_id: GROUP.to_owned(),
            member_id: String::new(),
            // The generation the broker holds (the consumer learned it): stored if it exists.
            generation_id: self.broker.generation(GROUP).unwrap_or_default(),
            offsets: [(TopicPartition::new(TOPIC, partition), offset)]
                .into_iter()
                .collect(),
        };
        let id = RequestId(ROGUE_IDS + self.seq);
        self.send(id, request.into())
    }

    /// The mutant driver's LeaveGroup for the consumer's member, sent through the fault layer
    /// under an id the machine never issued.
    pub(super) fn rogue_leave(&mut self) -> Result<(), Violation> {
        let request = LeaveGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: self.checker.member().to_owned(),
        };
        let id = RequestId(ROGUE_IDS + self.seq);
        self.send(id, request.into())
    }
}
