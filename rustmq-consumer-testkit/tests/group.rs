//! Consumer-group sessions against the simulated broker: join, heartbeats, rebalance with
//! fencing, commit before leave, broker restarts. Several `ConsumerMachine`s share one
//! `SimBroker`; every answer is immediate unless a test holds it.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use rustmq_consumer_core::protocol::*;
use rustmq_consumer_core::*;
use rustmq_consumer_testkit::{
    advance_all, broker_with, delivered_tags, drive_all, Pump, Route, SharedBroker, SimBroker,
};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";

/// A member: its machine, what it sent and emitted, and what it acked (`auto_ack`). Its
/// `route` is `Route::Drop` while the broker is unreachable for it.
type Member = Pump<SharedBroker>;

struct Cluster {
    broker: SharedBroker,
    now: Instant,
    members: Vec<Member>,
}

fn config() -> ConsumerConfig {
    let mut c = ConsumerConfig::new(TOPIC, GROUP);
    c.session_timeout = Duration::from_secs(9);
    c.ack_batch_timeout = Duration::from_millis(200);
    c.empty_fetch_backoff_max = Duration::from_millis(100);
    c
}

impl Cluster {
    fn new(partitions: u32, messages: usize) -> Self {
        Self {
            broker: SharedBroker::new(broker_with(TOPIC, partitions, messages)),
            now: Instant::now(),
            members: Vec::new(),
        }
    }

    /// The broker, to set up or inspect.
    fn b(&self) -> MutexGuard<'_, SimBroker> {
        self.broker.lock()
    }

    fn join(&mut self, config: ConsumerConfig) -> usize {
        self.join_acking(config, true)
    }

    fn join_acking(&mut self, config: ConsumerConfig, auto_ack: bool) -> usize {
        let mut member = Pump::new(self.broker.clone(), config, self.now);
        member.auto_ack = auto_ack;
        self.members.push(member);
        self.pump();
        self.members.len() - 1
    }

    fn pump(&mut self) {
        drive_all(&mut self.members);
    }

    fn advance(&mut self, d: Duration) {
        self.now = advance_all(&mut self.members, self.now, d);
    }

    fn committed(&self, partition: u32) -> Option<u64> {
        self.b()
            .committed(GROUP, &TopicPartition::new(TOPIC, partition))
    }
}

fn sent_kinds(m: &Member) -> Vec<RequestKind> {
    m.sent.iter().map(Request::kind).collect()
}

/// The tags of every delivery the member's machine emitted.
fn delivered(m: &Member) -> Vec<DeliveryTag> {
    delivered_tags(&m.events)
}

#[test]
fn a_member_joins_consumes_from_offset_zero_and_commits_under_its_generation() {
    let mut c = Cluster::new(1, 20);
    let a = c.join(config());
    c.advance(Duration::from_secs(2));
    let kinds = sent_kinds(&c.members[a]);
    assert_eq!(
        kinds[..3],
        [
            RequestKind::FindCoordinator,
            RequestKind::JoinGroup,
            RequestKind::FetchOffset
        ]
    );
    assert_eq!(c.members[a].m.assigned_partitions(), [0]);
    assert_eq!(c.members[a].acked.first(), Some(&(0, 0)));
    assert_eq!(c.members[a].acked.len(), 20);
    assert_eq!(c.committed(0), Some(20));
    let generation = c.b().generation(GROUP).unwrap();
    let member = c.b().members(GROUP)[0].clone();
    for commit in c.b().commit_log() {
        assert_eq!(
            (commit.generation, &commit.member),
            (generation, &member),
            "never a hard-coded generation"
        );
    }
}

#[test]
fn heartbeats_keep_the_member_alive_past_the_session_timeout() {
    let mut c = Cluster::new(1, 1);
    let a = c.join(config());
    c.advance(Duration::from_secs(60));
    assert_eq!(c.b().members(GROUP).len(), 1, "not evicted");
    let beats = sent_kinds(&c.members[a])
        .iter()
        .filter(|k| **k == RequestKind::ConsumerHeartbeat)
        .count();
    assert!(
        (18..=21).contains(&beats),
        "{beats} heartbeats in 60 s at 3 s"
    );
    assert!(!c.members[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Revoked(_))));
}

#[test]
fn partitions_of_other_topics_are_ignored_with_an_event() {
    let mut c = Cluster::new(3, 0);
    c.b().create_topic("other", 3);
    // Another member subscribed to "other" makes the broker spread both topics over members.
    let mut other = config();
    other.topic = "other".into();
    let b = c.join(other);
    let a = c.join(config());
    c.advance(Duration::from_secs(30));
    let ignored: Vec<&Event> = c
        .members
        .iter()
        .flat_map(|m| &m.events)
        .filter(|e| matches!(e, Event::AssignmentIgnored(_)))
        .collect();
    assert!(
        !ignored.is_empty(),
        "round-robin hands out partitions of topics a member did not subscribe to"
    );
    for m in [a, b] {
        let topic = c.members[m].m.config().topic.clone();
        for e in &c.members[m].events {
            if let Event::Assigned(tps) = e {
                assert!(tps.iter().all(|tp| tp.topic == topic));
            }
        }
    }
}

#[test]
fn a_rebalance_revokes_commits_with_the_owning_generation_and_rejoins() {
    let mut c = Cluster::new(4, 50);
    let a = c.join(config());
    c.advance(Duration::from_secs(1));
    assert_eq!(c.members[a].m.assigned_partitions(), [0, 1, 2, 3]);
    let b = c.join(config());
    c.advance(Duration::from_secs(60));
    // Both members consumed; nothing is lost: every message was acked by someone.
    let mut seen = BTreeSet::new();
    for m in &c.members {
        seen.extend(m.acked.iter().copied());
    }
    assert_eq!(seen.len(), 200, "every message processed at least once");
    assert!(c.members[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Revoked(_))));
    assert!(
        !c.members[b].m.assigned_partitions().is_empty()
            || !c.members[a].m.assigned_partitions().is_empty()
    );
    // No accepted commit names a partition the committing member did not own.
    for commit in c.b().commit_log() {
        let owned = commit.member_assignment.clone().unwrap_or_default();
        for tp in commit.offsets.keys() {
            assert!(
                owned.contains(tp),
                "commit for {tp} by a member that does not own it"
            );
        }
    }
}

#[test]
fn stale_generation_acks_are_refused_and_never_move_a_watermark() {
    let mut c = Cluster::new(1, 5);
    let mut cfg = config();
    cfg.rebalance_drain_timeout = Duration::from_secs(1);
    let a = c.join_acking(cfg, false);
    c.advance(Duration::from_secs(1));
    let held = delivered(&c.members[a]);
    assert_eq!(held.len(), 5);
    // Another member joins: generation moves on, `a` revokes after its drain deadline.
    let _b = c.join(config());
    c.advance(Duration::from_secs(8));
    assert!(c.members[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Revoked(_))));
    for tag in held {
        let err = c.members[a].m.ack(c.now, tag).unwrap_err();
        assert!(
            matches!(
                err,
                UsageError::StaleDelivery { .. } | UsageError::UnknownPartition(_)
            ),
            "{err}"
        );
    }
    assert_eq!(
        c.members[a].m.metrics().acked,
        0,
        "no stale ack settled anything"
    );
}

#[test]
fn an_unreachable_coordinator_fences_the_member_after_the_session_timeout() {
    let mut c = Cluster::new(1, 3);
    let a = c.join(config());
    c.advance(Duration::from_secs(1));
    assert_eq!(c.members[a].m.assigned_partitions(), [0]);
    c.members[a].route = Route::Drop;
    c.advance(Duration::from_secs(10));
    assert!(
        c.members[a].m.assigned_partitions().is_empty(),
        "assignment treated as lost"
    );
    assert!(c.members[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Revoked(_))));
    c.members[a].route = Route::Answer;
    c.advance(Duration::from_secs(70));
    assert_eq!(
        c.members[a].m.assigned_partitions(),
        [0],
        "rejoined once reachable"
    );
}

#[test]
fn close_commits_before_it_leaves() {
    let mut c = Cluster::new(1, 10);
    let a = c.join(config());
    c.advance(Duration::from_secs(1));
    c.members[a].m.close(c.now);
    c.pump();
    c.advance(Duration::from_secs(1));
    assert!(c.members[a].m.is_closed());
    let kinds = sent_kinds(&c.members[a]);
    let last_commit = kinds
        .iter()
        .rposition(|k| *k == RequestKind::CommitOffset)
        .unwrap();
    let leave = kinds
        .iter()
        .position(|k| *k == RequestKind::LeaveGroup)
        .unwrap();
    assert!(last_commit < leave, "commit before leave: {kinds:?}");
    assert_eq!(leave, kinds.len() - 1, "nothing after leave");
    assert_eq!(c.committed(0), Some(10));
    assert!(c.b().members(GROUP).is_empty());
    let phases: Vec<ClosePhase> = c.members[a]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Closing(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(phases.last(), Some(&ClosePhase::Closed));
    assert!(phases.contains(&ClosePhase::LeavingGroup));
}

#[test]
fn a_broker_restart_loses_commits_but_a_running_member_keeps_its_place() {
    let mut c = Cluster::new(1, 10);
    let a = c.join(config());
    c.advance(Duration::from_secs(2));
    assert_eq!(c.members[a].acked.len(), 10);
    c.b().restart();
    assert_eq!(c.committed(0), None);
    c.b().produce_values(TOPIC, 0, ["late"]).unwrap();
    c.advance(Duration::from_secs(20));
    // The heartbeat saw 16, the member rejoined, and resumed at its own position: no replay.
    let offsets: Vec<u64> = c.members[a].acked.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        offsets,
        (0..11).collect::<Vec<_>>(),
        "no message replayed after the restart"
    );
    assert_eq!(
        c.committed(0),
        Some(11),
        "{:#?}",
        c.members[a]
            .events
            .iter()
            .filter(|e| !matches!(e, Event::Deliver(_)))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_fresh_assignment_without_a_commit_uses_the_start_position() {
    let mut c = Cluster::new(1, 10);
    let mut cfg = config();
    cfg.start_position = StartPosition::Latest;
    let a = c.join(cfg);
    c.advance(Duration::from_secs(1));
    assert!(c.members[a].acked.is_empty(), "Latest skips what was there");
    c.b().produce_values(TOPIC, 0, ["new"]).unwrap();
    c.advance(Duration::from_secs(1));
    assert_eq!(c.members[a].acked, [(0, 10)]);
    let lag = c.members[a].m.lag(c.now);
    assert_eq!(lag[0].high_watermark, Some(11));
}

#[test]
fn heartbeat_error_codes_each_lead_to_a_rejoin() {
    for (what, code) in [
        ("rebalance", 27u32),
        ("generation", 22),
        ("member", 25),
        ("group", 16),
    ] {
        let mut c = Cluster::new(1, 0);
        let a = c.join(config());
        c.advance(Duration::from_secs(1));
        let generation = c.b().generation(GROUP).unwrap();
        match code {
            27 | 22 => {
                // A second member joining moves the generation (22); its leave starts a rebalance (27).
                let b = c.join(config());
                if code == 27 {
                    c.members[b].m.close(c.now);
                    c.pump();
                }
            }
            25 => {
                let member = c.b().members(GROUP)[0].clone();
                c.b()
                    .handle(
                        c.now,
                        LeaveGroupRequest {
                            group_id: GROUP.into(),
                            member_id: member,
                        }
                        .into(),
                    )
                    .unwrap();
            }
            _ => c.b().restart(),
        }
        c.advance(Duration::from_secs(10));
        let joins = sent_kinds(&c.members[a])
            .iter()
            .filter(|k| **k == RequestKind::JoinGroup)
            .count();
        assert!(joins >= 2, "{what} ({code}): rejoined");
        assert!(c.b().generation(GROUP).unwrap() >= generation, "{what}");
        assert!(!c.b().members(GROUP).is_empty(), "{what}: a member again");
    }
}

/// A manual assignment has no group session: it joins only to create the group and learn
/// its generation, leaves at once, never heartbeats, and its commits are stored.
#[test]
fn manual_assignment_creates_its_group_and_commits_without_a_session() {
    let mut c = Cluster::new(2, 3);
    let mut cfg = config();
    cfg.partitions = vec![1];
    let a = c.join(cfg);
    c.advance(Duration::from_secs(30));
    let kinds: Vec<RequestKind> = sent_kinds(&c.members[a])
        .into_iter()
        .filter(|k| !matches!(k, RequestKind::Fetch | RequestKind::FetchOffset))
        .collect();
    use RequestKind::*;
    assert_eq!(kinds, [JoinGroup, LeaveGroup, CommitOffset]);
    assert_eq!(c.members[a].acked, [(1, 0), (1, 1), (1, 2)]);
    assert_eq!(c.committed(1), Some(3));
    assert!(c.b().members(GROUP).is_empty(), "it left at once");
    assert_eq!(c.b().generation(GROUP), Some(1), "left alone: unchanged");
}

/// A manual assignment sharing its group with a group member (which the config docs advise
/// against), here reading another topic: its leave bumps the generation, which it sees coming
/// from the join's answer, so its commit is stored; the member rebalances and goes on.
#[test]
fn manual_assignment_sharing_a_group_commits_under_the_generation_after_its_leave() {
    let mut c = Cluster::new(2, 3);
    c.b().create_topic("audit", 1);
    c.b()
        .produce_values("audit", 0, ["a0", "a1", "a2"])
        .unwrap();
    let member = c.join(config());
    c.advance(Duration::from_secs(1));
    assert_eq!(c.b().members(GROUP).len(), 1);
    let mut cfg = config();
    cfg.topic = "audit".to_owned();
    cfg.partitions = vec![0];
    let manual = c.join_acking(cfg, false);
    c.advance(Duration::from_secs(1));
    let held = delivered(&c.members[manual]);
    assert_eq!(held.len(), 3, "{:?}", c.members[manual].events);
    let now = c.now;
    for tag in held {
        c.members[manual].m.ack(now, tag).unwrap();
    }
    c.members[manual].m.commit(now).unwrap();
    c.pump();
    c.advance(Duration::from_secs(10));
    let commits: Vec<u64> = c.members[manual]
        .sent
        .iter()
        .filter_map(|r| match r {
            Request::CommitOffset(r) => Some(r.generation_id),
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 1, "stored at the first attempt: {commits:?}");
    let audit = TopicPartition::new("audit", 0);
    assert_eq!(c.b().committed(GROUP, &audit), Some(3));
    assert!(!c.members[manual]
        .events
        .iter()
        .any(|e| matches!(e, Event::CommitFailed { .. })));
    // The group member rebalanced and is the group's only member again.
    assert_eq!(c.b().members(GROUP).len(), 1);
    assert_eq!(c.members[member].m.assigned_partitions(), [0, 1]);
}

#[test]
fn no_commit_goes_out_under_a_generation_the_coordinator_refused() {
    let mut c = Cluster::new(1, 10);
    let mut cfg = config();
    cfg.ack_batch_size = 1;
    cfg.rebalance_drain_timeout = Duration::from_secs(30);
    let a = c.join_acking(cfg, false);
    c.advance(Duration::from_secs(1));
    let generation = c.b().generation(GROUP).unwrap();
    let held = delivered(&c.members[a]);
    assert_eq!(held.len(), 10);
    // Another member joins: the broker moves the generation on, and `a` learns it from its
    // next heartbeat (22) while it still holds every delivery, draining.
    let mark = c.members[a].sent.len();
    let _b = c.join(config());
    c.advance(Duration::from_secs(4));
    for tag in held {
        // Acks during the drain settle locally; each would batch a commit of its own.
        let _ = c.members[a].m.ack(c.now, tag);
        c.pump();
    }
    c.advance(Duration::from_secs(10));
    let refused_generation = c.members[a].sent[mark..]
        .iter()
        .filter(
            |r| matches!(r, Request::CommitOffset(commit) if commit.generation_id == generation),
        )
        .count();
    assert_eq!(
        refused_generation, 0,
        "every commit under a generation the coordinator refused is refused too"
    );
    assert!(c.members[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Revoked(_))));
}

/// A member that is not the consumer, driven straight at the broker: joins (or rejoins under
/// `member`) and returns its id.
fn phantom_join(c: &mut Cluster, member: &str) -> String {
    let request = JoinGroupRequest {
        group_id: GROUP.into(),
        member_id: member.into(),
        session_timeout_ms: 600_000,
        topics: vec![TOPIC.into()],
    };
    match c.broker.lock().handle(c.now, request.into()) {
        Ok(Response::JoinGroup(r)) if r.error_code == 0 => r.member_id,
        other => panic!("phantom join: {other:?}"),
    }
}

/// A restarted broker counts generations from 1 again, so a member can be given the number of
/// a generation refused to it before the restart. That refusal fenced the old membership, not
/// the new one: the new generation's commits go out. The machine once kept the fence across
/// the rejoin and never committed again, not even in its close. Found by the swarm (seed
/// 38259).
#[test]
fn a_generation_number_given_again_after_a_restart_is_not_fenced() {
    let mut c = Cluster::new(1, 5);
    let mut cfg = config();
    cfg.ack_batch_size = 1;
    let a = c.join(cfg);
    c.advance(Duration::from_secs(1));
    assert_eq!(c.committed(0), Some(5));
    // A phantom joins (generation 2): `a`'s next heartbeat, under 1, is refused (22); `a`
    // rejoins under 3.
    phantom_join(&mut c, "");
    c.advance(Duration::from_secs(4));
    assert_eq!(c.broker.lock().generation(GROUP), Some(3));
    // The broker restarts; a phantom recreates the group (generation 1). `a`'s heartbeat
    // under 3 is refused (22): 3 is fenced. `a` rejoins under 2.
    c.broker.lock().restart();
    let phantom = phantom_join(&mut c, "");
    c.advance(Duration::from_secs(4));
    assert_eq!(c.broker.lock().generation(GROUP), Some(2));
    // The phantom leaves (generation 3, rebalancing): `a` rejoins under 3 again, alone.
    c.broker
        .lock()
        .handle(
            c.now,
            LeaveGroupRequest {
                group_id: GROUP.into(),
                member_id: phantom,
            }
            .into(),
        )
        .unwrap();
    c.advance(Duration::from_secs(4));
    assert_eq!(c.broker.lock().generation(GROUP), Some(3));
    assert_eq!(c.members[a].m.assigned_partitions(), [0]);
    c.broker
        .lock()
        .produce_values(TOPIC, 0, ["m5", "m6"])
        .unwrap();
    c.advance(Duration::from_secs(2));
    let acked: Vec<u64> = c.members[a].acked.iter().map(|(_, o)| *o).collect();
    assert!(acked.contains(&6), "acked {acked:?}");
    assert_eq!(
        c.committed(0),
        Some(7),
        "commits under generation 3 of the new group: {:?}",
        c.members[a]
            .events
            .iter()
            .filter(|e| matches!(e, Event::CommitFailed { .. } | Event::Committed { .. }))
            .collect::<Vec<_>>()
    );
}

/// How many acks of each partition the member made.
fn acked_per_partition(m: &Member, partitions: u32) -> Vec<usize> {
    (0..partitions)
        .map(|p| m.acked.iter().filter(|(q, _)| *q == p).count())
        .collect()
}

fn stalls(m: &Member) -> Vec<(u32, u64, StallReason)> {
    m.events
        .iter()
        .filter_map(|e| match e {
            Event::Stalled {
                partition,
                offset,
                reason,
            } => Some((*partition, *offset, reason.clone())),
            _ => None,
        })
        .collect()
}

fn recoveries(m: &Member) -> Vec<u32> {
    m.events
        .iter()
        .filter_map(|e| match e {
            Event::Recovered { partition } => Some(*partition),
            _ => None,
        })
        .collect()
}

/// One partition's fetches fail (error code 1, as the real broker answers every fetch of a
/// partition whose segments compaction merged) while the others and commits work: that
/// partition backs off alone and reports one stall; the others deliver everything and commit;
/// the breaker never counts it; the stall ends with a `Recovered` when its fetches succeed
/// again; and a close while it fails finishes at once. The breaker once opened for everything
/// and the close took 30 to 50 s.
#[test]
fn a_partition_whose_fetches_fail_stalls_alone_and_recovers() {
    const MESSAGES: usize = 300;
    let mut c = Cluster::new(3, MESSAGES);
    c.b().set_partition_failing(TOPIC, 1, true);
    let a = c.join(config());
    c.advance(Duration::from_secs(120));
    let m = &c.members[a];
    assert_eq!(acked_per_partition(m, 3), [MESSAGES, 0, MESSAGES]);
    assert_eq!(c.committed(0), Some(MESSAGES as u64));
    assert_eq!(c.committed(2), Some(MESSAGES as u64));
    assert_eq!(m.m.breaker_state(), BreakerState::Closed);
    assert!(
        !m.events
            .iter()
            .any(|e| matches!(e, Event::BreakerChanged { .. })),
        "the breaker never moved"
    );
    let failure = RequestError::ErrorCode {
        request: RequestKind::Fetch,
        code: 1,
        message: Some("Failed to fetch records".into()),
    };
    assert_eq!(
        stalls(m),
        [(
            1,
            0,
            StallReason::FetchFailing {
                error: failure.clone()
            }
        )],
        "one stall for the whole episode"
    );
    assert_eq!(m.m.health(), Health::Degraded);
    // Its own growing backoff: retried, but far fewer times than once per empty-fetch wait.
    let tries = m
        .sent
        .iter()
        .filter(|r| matches!(r, Request::Fetch(f) if f.partition_id == 1))
        .count();
    assert!((3..40).contains(&tries), "{tries} fetches of partition 1");

    // The partition heals: it fetches again within its backoff (at most 30 s), says so, and
    // catches up.
    c.b().set_partition_failing(TOPIC, 1, false);
    c.advance(Duration::from_secs(40));
    let m = &c.members[a];
    assert_eq!(recoveries(m), [1]);
    assert_eq!(acked_per_partition(m, 3), [MESSAGES; 3]);
    assert_eq!(c.committed(1), Some(MESSAGES as u64));
    assert_eq!(m.m.health(), Health::Healthy);

    // It fails again: a new episode, a new stall; a close now is not held up by it.
    c.b().set_partition_failing(TOPIC, 1, true);
    c.b()
        .produce_values(TOPIC, 1, ["late-1"])
        .expect("topic exists");
    c.b()
        .produce_values(TOPIC, 0, ["late-0"])
        .expect("topic exists");
    c.advance(Duration::from_secs(10));
    assert_eq!(stalls(&c.members[a]).len(), 2, "a second episode");
    assert_eq!(c.committed(0), Some(MESSAGES as u64 + 1));
    let asked = c.now;
    c.members[a].m.close(c.now);
    c.pump();
    for _ in 0..100 {
        if c.members[a].m.is_closed() {
            break;
        }
        c.advance(Duration::from_millis(10));
    }
    assert!(
        c.members[a].m.is_closed(),
        "closed within a second of simulated time"
    );
    assert!(c.now - asked < Duration::from_secs(1));
    assert_eq!(c.committed(0), Some(MESSAGES as u64 + 1));
    assert_eq!(c.committed(1), Some(MESSAGES as u64), "nothing skipped");
}

/// What one run of [`two_members_one_partition`] saw.
#[derive(Debug)]
struct TwoMembers {
    /// Deliveries the application handled (a refused ack is a message it will see again).
    deliveries: usize,
    /// Distinct offsets among them.
    distinct: usize,
    /// Joins after each member's first (the broker moves the generation on every one).
    rebalances: usize,
    /// Times a member lost the partition (`Revoked`).
    moves: usize,
}

impl TwoMembers {
    fn duplicates(&self) -> usize {
        self.deliveries - self.distinct
    }

    /// At most one ack batch of duplicates per rebalance.
    fn assert_within_bound(&self) {
        assert!(self.rebalances > 0, "{self:?}");
        assert!(
            self.duplicates() <= self.rebalances * config().ack_batch_size,
            "{} duplicates over {} rebalances: {self:?}",
            self.duplicates(),
            self.rebalances
        );
    }
}

/// Two members, one partition of `messages`, a broker seeded with `seed` (which orders the
/// member ids, and so who gets the partition), and an application that handles `rate`
/// deliveries per member every 10 ms, acking each (a refused ack is a message it will see
/// again). The broker moves the generation on every join, as the real one does, so the two
/// members rebalance each other for as long as both are there. Runs until everything is
/// processed and committed, or `limit` of simulated time.
fn two_members_one_partition(
    messages: usize,
    seed: u64,
    rate: usize,
    limit: Duration,
) -> TwoMembers {
    let mut broker = SimBroker::with_seed(seed);
    broker.create_topic(TOPIC, 1);
    broker
        .produce_values(TOPIC, 0, (0..messages).map(|i| format!("m{i}")))
        .unwrap();
    let mut c = Cluster {
        broker: SharedBroker::new(broker),
        now: Instant::now(),
        members: Vec::new(),
    };
    let a = c.join_acking(config(), false);
    c.advance(Duration::from_millis(500));
    let b = c.join_acking(config(), false);
    let mut cursor = [0usize; 2];
    let mut held: [std::collections::VecDeque<DeliveryTag>; 2] = Default::default();
    let mut seen = BTreeSet::new();
    let mut deliveries = 0;
    let step = Duration::from_millis(10);
    for _ in 0..limit.as_millis() / step.as_millis() {
        if seen.len() == messages && c.committed(0) == Some(messages as u64) {
            break;
        }
        for (i, m) in [a, b].into_iter().enumerate() {
            for e in &c.members[m].events[cursor[i]..] {
                match e {
                    Event::Deliver(d) => held[i].push_back(d.tag),
                    // The driver drops what the application has not taken of a revoked
                    // partition (the one partition here).
                    Event::Revoked(_) => held[i].clear(),
                    _ => {}
                }
            }
            cursor[i] = c.members[m].events.len();
            for tag in held[i].drain(..rate.min(held[i].len())) {
                deliveries += 1;
                seen.insert(tag.offset);
                let _ = c.members[m].m.ack(c.now, tag);
            }
        }
        c.pump();
        c.advance(step);
    }
    let count = |f: fn(&Event) -> bool| -> usize {
        c.members
            .iter()
            .map(|m| m.events.iter().filter(|e| f(e)).count())
            .sum()
    };
    let run = TwoMembers {
        deliveries,
        distinct: seen.len(),
        rebalances: count(|e| matches!(e, Event::Assigned(_))).saturating_sub(2),
        moves: count(|e| matches!(e, Event::Revoked(_))),
    };
    assert_eq!(
        (seen.len(), c.committed(0)),
        (messages, Some(messages as u64)),
        "everything processed and committed within {limit:?}: {run:?}"
    );
    run
}

/// The partition stays with the member that has it (seed 1 orders the ids so) through every
/// rebalance: it drains, rejoins and resumes at its own settle watermark, so an application
/// that keeps up with the drain sees nothing twice.
#[test]
fn a_partition_given_back_resumes_at_the_settle_watermark() {
    let run = two_members_one_partition(10_000, 1, 10, Duration::from_secs(120));
    run.assert_within_bound();
    assert_eq!(run.moves, 0, "{run:?}");
}

/// Issue 12 item 5. An application slower than `max_unacked` per drain (100 messages a
/// second here) still holds deliveries at the rebalance's drain deadline. They used to go
/// stale although the partition came straight back, were delivered again, and the next
/// rebalance (every drain plus heartbeat while two members exist) came before they were done:
/// the group stayed at 920 committed for 2,000 s with 198,080 duplicates. A partition given
/// back keeps its window, and the deliveries the application holds stay valid across the
/// rejoin.
#[test]
fn a_slow_application_is_not_livelocked_by_rebalances_that_give_the_partition_back() {
    let run = two_members_one_partition(10_000, 1, 1, Duration::from_secs(300));
    run.assert_within_bound();
    assert_eq!(run.duplicates(), 0, "{run:?}");
}

/// Issue 12 item 5's scenario: two members, one partition, 10,000 messages, a broker that moves
/// the generation on every join. Where the partition goes back to the member that had it
/// (seeds 1 and 7 order the ids so), every rebalance keeps its position and the deliveries
/// the application holds, whatever the application's speed (100, 1,000 and 100,000 messages
/// a second): at most one ack batch of duplicates per rebalance, and in fact none. Before,
/// 100 messages a second never finished (28,080 duplicates in 300 s, committed stuck at 920).
#[test]
fn two_members_one_partition_duplicate_at_most_one_ack_batch_per_rebalance() {
    for seed in [1, 7] {
        for rate in [1, 10, 1_000] {
            let run = two_members_one_partition(10_000, seed, rate, Duration::from_secs(300));
            run.assert_within_bound();
            assert_eq!(
                (run.moves, run.duplicates()),
                (0, 0),
                "seed {seed} rate {rate}: {run:?}"
            );
        }
    }
}

/// Where the newcomer's id sorts first (seed 5), the partition moves to it at its join, once,
/// and then stays there through every rebalance. The broker moved the generation at the join,
/// so the old owner's revoke commit cannot go, and it drains for one `ack_batch_timeout` at
/// most instead of `rebalance_drain_timeout`: the move costs what the old owner handled after
/// its last accepted commit, which for an application slower than `max_unacked` per
/// `ack_batch_timeout` is at most one ack batch plus one `ack_batch_timeout` of its work (40
/// at 100 messages a second, 290 at 1,000; 520 and 1,100 with the whole drain), and at full
/// speed what it held (`max_unacked`) twice at most. Before parking, 100 messages a second
/// never finished.
#[test]
fn a_partition_that_moves_once_costs_one_ack_batch_timeout_of_work() {
    let c = config();
    // `rate` deliveries every 10 ms.
    for rate in [1, 10, 100, 1_000] {
        let run = two_members_one_partition(10_000, 5, rate, Duration::from_secs(300));
        assert_eq!(run.moves, 1, "rate {rate}: {run:?}");
        let per_timeout = rate * 100 * c.ack_batch_timeout.as_millis() as usize / 1_000;
        let bound = if per_timeout < c.max_unacked {
            c.ack_batch_size + per_timeout
        } else {
            2 * c.max_unacked
        };
        assert!(
            run.duplicates() <= bound,
            "rate {rate}: {} duplicates, bound {bound}: {run:?}",
            run.duplicates()
        );
    }
}

/// A phantom member leaves the group.
fn phantom_leave(c: &mut Cluster, member: &str) {
    let request = LeaveGroupRequest {
        group_id: GROUP.into(),
        member_id: member.into(),
    };
    c.broker.lock().handle(c.now, request.into()).unwrap();
}

/// Member `a` (one partition of 10 messages, all delivered and held by its application, a
/// dead-letter topic) is made to rebalance by a phantom's join, and its rejoin is held: it
/// sits with the partition parked. Returns the cluster, `a`, the phantom's id and the tags
/// the application holds.
fn parked_member() -> (Cluster, usize, String, Vec<DeliveryTag>) {
    let mut c = Cluster::new(1, 10);
    c.b().create_topic("orders.dead", 1);
    let mut cfg = config();
    cfg.rebalance_drain_timeout = Duration::from_secs(1);
    cfg.dead_letter_queue = Some("orders.dead".into());
    cfg.max_retry_attempts = 3;
    let a = c.join_acking(cfg, false);
    c.advance(Duration::from_secs(1));
    let held = delivered(&c.members[a]);
    assert_eq!(held.len(), 10);
    c.members[a].m.ack(c.now, held[0]).unwrap();
    c.advance(Duration::from_millis(500));
    assert_eq!(c.committed(0), Some(1));
    c.members[a].route = Route::HoldIf(|r| matches!(r, Request::JoinGroup(_)));
    let phantom = phantom_join(&mut c, "");
    c.advance(Duration::from_secs(6));
    let m = &c.members[a];
    assert!(
        m.m.assigned_partitions().is_empty(),
        "let go in the rebalance"
    );
    assert_eq!(m.held.len(), 1, "its rejoin is held");
    assert_eq!(
        m.count(|e| matches!(e, Event::Revoked(_))),
        0,
        "parked, not revoked"
    );
    (c, a, phantom, held)
}

/// Issue 12 item 5: the deliveries the application holds across a rebalance that gives their
/// partition back stay valid. While the partition is parked (revoked, rejoin pending) an ack
/// settles, a nack is retried once it is back (from the cache: the pump gives its record
/// back, and no refetch is sent), a reject is dead-lettered once it is back; after the rejoin
/// the rest are acked; nothing but the nacked offset is delivered twice, and the watermark is
/// committed under the new generation.
#[test]
fn deliveries_held_across_a_rebalance_that_gives_the_partition_back_stay_valid() {
    let (mut c, a, phantom, held) = parked_member();
    let now = c.now;
    c.members[a].nack(held[2], None);
    let m = &mut c.members[a].m;
    m.ack(now, held[1]).unwrap();
    m.reject(now, held[3], "bad").unwrap();
    assert_eq!(
        m.ack(now, held[1]),
        Err(UsageError::NotOutstanding {
            partition: 0,
            offset: 1
        })
    );
    // The phantom leaves, so the partition comes back to `a`.
    phantom_leave(&mut c, &phantom);
    c.members[a].route = Route::Answer;
    c.members[a].answer_all_held();
    c.advance(Duration::from_secs(1));
    let m = &c.members[a];
    assert_eq!(m.m.assigned_partitions(), [0]);
    assert_eq!(m.count(|e| matches!(e, Event::Revoked(_))), 0);
    let generation = c.b().generation(GROUP).unwrap();
    assert!(
        m.commits_sent()
            .iter()
            .any(|r| r.generation_id == generation && r.offsets.values().next() == Some(&2)),
        "the watermark is committed under the new generation: {:?}",
        m.commits_sent()
    );
    let now = c.now;
    for &tag in &held[4..] {
        c.members[a].m.ack(now, tag).unwrap();
    }
    c.advance(Duration::from_secs(2));
    let redelivered: Vec<DeliveryTag> = delivered(&c.members[a])[10..].to_vec();
    assert_eq!(
        redelivered
            .iter()
            .map(|t| (t.offset, t.attempt))
            .collect::<Vec<_>>(),
        [(2, 2)],
        "only the nacked offset comes again"
    );
    let metrics = c.members[a].m.metrics();
    assert_eq!(
        (metrics.cache_hits, metrics.refetches),
        (1, 1),
        "the nacked record came back from the cache; only the rejected one was fetched again"
    );
    assert_eq!(
        c.members[a].count(|e| matches!(e, Event::DeadLettered { offset: 3, .. })),
        1
    );
    c.members[a].m.ack(c.now, redelivered[0]).unwrap();
    c.advance(Duration::from_secs(1));
    assert_eq!(c.committed(0), Some(10));
}

/// A partition given back after another member committed past this one's watermark starts
/// over at that commit: `Revoked` then `Assigned` say so, and the held deliveries are stale.
#[test]
fn a_partition_given_back_after_another_member_committed_past_it_starts_over() {
    let (mut c, a, phantom, held) = parked_member();
    let generation = c.b().generation(GROUP).unwrap();
    let commit = CommitOffsetRequest {
        group_id: GROUP.into(),
        member_id: phantom.clone(),
        generation_id: generation,
        offsets: [(TopicPartition::new(TOPIC, 0), 8)].into_iter().collect(),
    };
    c.b().handle(c.now, commit.into()).unwrap();
    phantom_leave(&mut c, &phantom);
    c.members[a].route = Route::Answer;
    c.members[a].answer_all_held();
    c.advance(Duration::from_secs(1));
    let m = &c.members[a];
    assert_eq!(m.m.assigned_partitions(), [0]);
    let tail: Vec<&Event> = m
        .events
        .iter()
        .filter(|e| matches!(e, Event::Revoked(_) | Event::Assigned(_)))
        .collect();
    assert_eq!(
        tail.len(),
        4,
        "assigned, assigned again, revoked, assigned: {tail:?}"
    );
    assert!(matches!(tail[2], Event::Revoked(_)));
    assert_eq!(
        c.members[a].m.ack(c.now, held[5]),
        Err(UsageError::StaleDelivery {
            partition: 0,
            offset: 5
        })
    );
    let again: Vec<u64> = delivered(&c.members[a])[10..]
        .iter()
        .map(|t| t.offset)
        .collect();
    assert_eq!(again, [8, 9], "it starts over at the other member's commit");
}
