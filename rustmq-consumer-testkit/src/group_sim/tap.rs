//! The wire between one member and the shared broker: it answers from the broker and notes
//! what the checker needs to see (each JoinGroup answer the member got: its id, generation
//! and the partitions the coordinator really gave it), and applies a [`GroupMutation`].

use std::time::Instant;

use rustmq_consumer_core::protocol::{Request, Response, TopicPartition};
use rustmq_consumer_core::TransportError;

use crate::pump::Peer;
use crate::transport::SharedBroker;

/// A deliberately wrong member, to show the group checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupMutation {
    /// Every member is the real thing.
    #[default]
    None,
    /// A driver that commits every partition at the broker's high watermark: offsets it never
    /// received, let alone settled.
    CommitPastSettled,
    /// A driver that tells its machine it was given every partition of the topic, whatever
    /// the coordinator's answer said.
    TakeEveryPartition,
}

/// A JoinGroup the broker answered for this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinSeen {
    pub(crate) member_id: String,
    pub(crate) generation: u64,
    /// The partitions of the consumed topic the coordinator gave this member (before any
    /// mutation rewrote the answer).
    pub(crate) granted: Vec<u32>,
}

/// One member's [`Peer`]: the shared broker plus what the checker reads.
#[derive(Debug)]
pub(crate) struct Tap {
    broker: SharedBroker,
    topic: String,
    mutation: GroupMutation,
    /// JoinGroup answers not read yet, oldest first.
    pub(crate) joins: Vec<JoinSeen>,
}

impl Tap {
    pub(crate) fn new(broker: SharedBroker, topic: &str, mutation: GroupMutation) -> Self {
        Self {
            broker,
            topic: topic.to_owned(),
            mutation,
            joins: Vec::new(),
        }
    }

    fn mutate_request(&self, request: &mut Request) {
        if let (GroupMutation::CommitPastSettled, Request::CommitOffset(commit)) =
            (self.mutation, request)
        {
            let b = self.broker.lock();
            for (tp, offset) in &mut commit.offsets {
                if let Some(hw) = b.high_watermark(&tp.topic, tp.partition) {
                    *offset = hw;
                }
            }
        }
    }

    fn note_answer(&mut self, answer: &mut Response) {
        let Response::JoinGroup(join) = answer else {
            return;
        };
        if join.error_code != 0 {
            return;
        }
        let mine = join
            .assigned_partitions
            .get(&join.member_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let granted = mine
            .iter()
            .filter(|tp| tp.topic == self.topic)
            .map(|tp| tp.partition)
            .collect();
        self.joins.push(JoinSeen {
            member_id: join.member_id.clone(),
            generation: join.generation_id,
            granted,
        });
        if self.mutation == GroupMutation::TakeEveryPartition {
            let count = self
                .broker
                .lock()
                .partitions(&self.topic)
                .unwrap_or_default();
            let every = (0..count)
                .map(|p| TopicPartition::new(self.topic.clone(), p))
                .collect();
            join.assigned_partitions
                .insert(join.member_id.clone(), every);
        }
    }
}

impl Peer for Tap {
    fn answer(&mut self, now: Instant, mut request: Request) -> Result<Response, TransportError> {
        self.mutate_request(&mut request);
        let mut answer = self.broker.answer(now, request)?;
        self.note_answer(&mut answer);
        Ok(answer)
    }

    // The simulation runs the broker's reaper itself, once per instant.
}
