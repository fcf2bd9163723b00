//! The group-wide invariants, checked from what the members' machines emit, what their
//! application did, and what the broker accepted.

use std::collections::{BTreeMap, BTreeSet};

use rustmq_consumer_core::protocol::TopicPartition;

use crate::broker::CommitRecord;

/// Names of the group-wide invariants, as [`crate::Violation::invariant`] gives them.
pub mod group_names {
    /// No partition is delivered by one member while another holds it under the same
    /// generation.
    pub const EXCLUSIVE_PARTITION: &str = "group-exclusive-partition";
    /// A member delivers only partitions the coordinator gave it in the generation it holds.
    pub const DELIVERY_IN_ASSIGNMENT: &str = "group-delivery-in-assignment";
    /// The broker's committed offset of a partition never passes the lowest offset nobody in
    /// the group has acked yet.
    pub const COMMIT_WITHIN_SETTLED: &str = "group-commit-within-settled";
    /// After heal, every produced message is acked by some member within the liveness budget.
    pub const SETTLED_AFTER_HEAL: &str = "group-settled-after-heal";
    /// A member that closes reaches `Closed` within its bound.
    pub const CLOSE: &str = "group-close";
    /// The simulation's own bounds (steps, outputs at one instant) held.
    pub const BOUNDED: &str = "group-bounded";
    /// Two runs of one seed give the same report.
    pub const DETERMINISM: &str = "group-determinism";
}

/// What the group as a whole has settled, per partition.
#[derive(Debug, Clone, Default)]
struct Settled {
    /// Every offset below this was acked by someone.
    prefix: u64,
    /// Offsets above `prefix` acked by someone.
    above: BTreeSet<u64>,
    /// Messages produced (the high watermark).
    produced: u64,
}

impl Settled {
    fn contains(&self, offset: u64) -> bool {
        offset < self.prefix || self.above.contains(&offset)
    }

    fn settle(&mut self, offset: u64) {
        if offset == self.prefix {
            self.prefix += 1;
            while self.above.remove(&self.prefix) {
                self.prefix += 1;
            }
        } else if offset > self.prefix {
            self.above.insert(offset);
        }
    }

    fn done(&self) -> bool {
        self.prefix >= self.produced
    }
}

/// One member as the checker sees it.
#[derive(Debug, Clone, Default)]
struct Holder {
    /// The generation of the member's last JoinGroup answer.
    generation: Option<u64>,
    /// The partitions the coordinator gave it in that generation.
    granted: BTreeSet<u32>,
    /// The partitions its machine consumes (`Assigned` minus `Revoked`).
    held: BTreeSet<u32>,
}

/// The group-wide checker. Each method returns a `(invariant, detail)` when it found a
/// violation.
#[derive(Debug, Clone)]
pub(crate) struct GroupChecker {
    topic: String,
    settled: Vec<Settled>,
    /// Partitions with something produced and not acked yet.
    open: usize,
    holders: BTreeMap<usize, Holder>,
    /// For each partition, the members whose machine holds it.
    holding: Vec<BTreeSet<usize>>,
    /// Deliveries of a message some member had already acked (at least once, not a failure).
    pub(crate) duplicates: u64,
    /// Accepted commits checked.
    pub(crate) commits: u64,
}

pub(crate) type Found = (&'static str, String);

impl GroupChecker {
    pub(crate) fn new(topic: &str, partitions: u32) -> Self {
        Self {
            topic: topic.to_owned(),
            settled: vec![Settled::default(); partitions as usize],
            open: 0,
            holders: BTreeMap::new(),
            holding: vec![BTreeSet::new(); partitions as usize],
            duplicates: 0,
            commits: 0,
        }
    }

    /// `count` more messages were produced to `partition`.
    pub(crate) fn produced(&mut self, partition: u32, count: u64) {
        let s = &mut self.settled[partition as usize];
        let was_done = s.done();
        s.produced += count;
        if was_done && !s.done() {
            self.open += 1;
        }
    }

    /// Some member acked (or otherwise settled) `partition`@`offset`.
    pub(crate) fn settled(&mut self, partition: u32, offset: u64) {
        let s = &mut self.settled[partition as usize];
        let was_done = s.done();
        s.settle(offset);
        if !was_done && s.done() {
            self.open -= 1;
        }
    }

    /// True once every produced message was acked by someone.
    pub(crate) fn all_settled(&self) -> bool {
        self.open == 0
    }

    /// The first partition with an unacked message, and that offset.
    pub(crate) fn first_unsettled(&self) -> Option<(u32, u64, u64)> {
        self.settled
            .iter()
            .enumerate()
            .find(|(_, s)| !s.done())
            .map(|(p, s)| (p as u32, s.prefix, s.produced))
    }

    /// Member `slot` got a JoinGroup answer: generation and what the coordinator gave it.
    pub(crate) fn joined(&mut self, slot: usize, generation: u64, granted: &[u32]) {
        let h = self.holders.entry(slot).or_default();
        h.generation = Some(generation);
        h.granted = granted.iter().copied().collect();
    }

    /// Member `slot`'s machine emitted `Assigned`.
    pub(crate) fn assigned(&mut self, slot: usize, partitions: &[TopicPartition]) {
        let h = self.holders.entry(slot).or_default();
        for tp in partitions.iter().filter(|tp| tp.topic == self.topic) {
            if let Some(set) = self.holding.get_mut(tp.partition as usize) {
                h.held.insert(tp.partition);
                set.insert(slot);
            }
        }
    }

    /// Member `slot`'s machine emitted `Revoked`.
    pub(crate) fn revoked(&mut self, slot: usize, partitions: &[TopicPartition]) {
        let h = self.holders.entry(slot).or_default();
        for tp in partitions.iter().filter(|tp| tp.topic == self.topic) {
            h.held.remove(&tp.partition);
            if let Some(set) = self.holding.get_mut(tp.partition as usize) {
                set.remove(&slot);
            }
        }
    }

    /// Member `slot` is gone (crashed or closed): it holds nothing any more.
    pub(crate) fn gone(&mut self, slot: usize) {
        if let Some(h) = self.holders.remove(&slot) {
            for p in h.held {
                self.holding[p as usize].remove(&slot);
            }
        }
    }

    /// Member `slot` delivered `partition`@`offset`: invariants (1), exclusive ownership
    /// under one generation, and delivery within the coordinator's assignment.
    pub(crate) fn delivered(&mut self, slot: usize, partition: u32, offset: u64) -> Option<Found> {
        let Some(s) = self.settled.get(partition as usize) else {
            return Some((
                group_names::DELIVERY_IN_ASSIGNMENT,
                format!("member {slot} delivered partition {partition}, which does not exist"),
            ));
        };
        if s.contains(offset) {
            self.duplicates += 1;
        }
        let Some((generation, h)) = self
            .holders
            .get(&slot)
            .and_then(|h| h.generation.map(|g| (g, h)))
        else {
            return Some((
                group_names::DELIVERY_IN_ASSIGNMENT,
                format!("member {slot} delivered {partition}@{offset} before it ever joined"),
            ));
        };
        if !h.granted.contains(&partition) {
            return Some((
                group_names::DELIVERY_IN_ASSIGNMENT,
                format!(
                    "member {slot} delivered {partition}@{offset} under generation {generation}, \
                     whose assignment gave it {:?}",
                    h.granted
                ),
            ));
        }
        for &other in &self.holding[partition as usize] {
            if other == slot {
                continue;
            }
            let theirs = self.holders.get(&other).and_then(|o| o.generation);
            if theirs == Some(generation) {
                return Some((
                    group_names::EXCLUSIVE_PARTITION,
                    format!(
                        "member {slot} delivered {partition}@{offset} while member {other} holds \
                         partition {partition} under the same generation {generation}"
                    ),
                ));
            }
        }
        None
    }

    /// The broker accepted `commit`: invariant (3), no committed offset past the lowest offset
    /// nobody acked.
    pub(crate) fn commit_accepted(&mut self, commit: &CommitRecord) -> Option<Found> {
        self.commits += 1;
        for (tp, &offset) in &commit.offsets {
            if tp.topic != self.topic {
                continue;
            }
            let Some(s) = self.settled.get(tp.partition as usize) else {
                continue;
            };
            if offset > s.prefix {
                return Some((
                    group_names::COMMIT_WITHIN_SETTLED,
                    format!(
                        "the broker stored {offset} for partition {} (member {}, generation {}), \
                         but offset {} was never acked by anyone",
                        tp.partition, commit.member, commit.generation, s.prefix
                    ),
                ));
            }
        }
        None
    }
}
