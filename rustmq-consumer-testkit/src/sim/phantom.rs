//! Phantom members: other members of the consumer's group, driven straight against the
//! broker, joining, heartbeating, rejoining, leaving and going silent before heal.

use rustmq_consumer_core::protocol::{
    error_code, ConsumerHeartbeatRequest, JoinGroupRequest, Response,
};

use super::{Handler, Item, Simulation, GROUP, TOPIC};
use crate::faults::PhantomPlan;

/// A phantom member's state: its id and generation on the broker, and whether it still
/// heartbeats.
#[derive(Debug, Clone)]
pub(super) struct PhantomState {
    pub(super) plan: PhantomPlan,
    pub(super) member: String,
    pub(super) generation: u64,
    pub(super) alive: bool,
}

impl<H: Handler> Simulation<H> {
    /// A phantom member joins (or rejoins under its id), straight at the broker.
    pub(super) fn phantom_join(&mut self, i: usize) {
        let now = self.now;
        let ph = &self.phantoms[i];
        let request = JoinGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: ph.member.clone(),
            session_timeout_ms: u32::try_from(ph.plan.session_timeout.as_millis())
                .unwrap_or(u32::MAX),
            topics: vec![TOPIC.to_owned()],
        };
        self.report.phantom_joins += 1;
        if let Ok(Response::JoinGroup(r)) = self.broker.handle(now, request.into()) {
            if r.error_code == error_code::NONE {
                let ph = &mut self.phantoms[i];
                ph.member = r.member_id.clone();
                ph.generation = r.generation_id;
                let mine = r.assigned_partitions.get(&r.member_id).cloned();
                self.trace("phantom", &("joined", i, r.generation_id, mine));
            }
        }
    }

    /// A phantom member heartbeats; like an eager consumer it rejoins on 22 and 27, and joins
    /// afresh on 25. On 16 (the broker lost the group) it waits for the group to come back.
    pub(super) fn phantom_beat(&mut self, i: usize) {
        if !self.phantoms[i].alive {
            return;
        }
        let now = self.now;
        let request = ConsumerHeartbeatRequest {
            group_id: GROUP.to_owned(),
            member_id: self.phantoms[i].member.clone(),
            generation_id: self.phantoms[i].generation,
        };
        let code = match self.broker.handle(now, request.into()) {
            Ok(Response::ConsumerHeartbeat(r)) => r.error_code,
            _ => error_code::NONE,
        };
        match code {
            error_code::REBALANCE_IN_PROGRESS | error_code::ILLEGAL_GENERATION => {
                self.phantom_join(i)
            }
            error_code::UNKNOWN_MEMBER => {
                self.phantoms[i].member.clear();
                self.phantom_join(i);
            }
            _ => {}
        }
        let beat = self.phantoms[i].plan.heartbeat_interval();
        self.schedule(beat, Item::PhantomBeat(i));
    }
}
