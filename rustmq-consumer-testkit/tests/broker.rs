//! The simulated broker against the semantics of PROTOCOL.md.
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustmq_consumer_core::protocol::{
    error_code, AcknowledgmentLevel, CommitOffsetRequest, ConsumerHeartbeatRequest,
    FetchOffsetRequest, FetchRequest, FetchResponse, FindCoordinatorRequest, Header,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, MetadataRequest, ProduceRequest,
    Record, Request, RequestKind, Response, TopicPartition,
};
use rustmq_consumer_testkit::{
    BrokerError, GroupState, Outcome, SimBroker, CLOCK_BASE_MS, DEFAULT_RECORD_OVERHEAD,
    REAPER_INTERVAL,
};

const GROUP: &str = "g";

fn tp(topic: &str, partition: u32) -> TopicPartition {
    TopicPartition::new(topic, partition)
}

fn fetch(
    broker: &mut SimBroker,
    now: Instant,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
) -> FetchResponse {
    let req = FetchRequest {
        topic: topic.to_owned(),
        partition_id: partition,
        fetch_offset: offset,
        max_bytes,
        timeout_ms: 100,
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::Fetch(r) => r,
        other => panic!("unexpected response {other:?}"),
    }
}

fn join(broker: &mut SimBroker, now: Instant, member: &str, topics: &[&str]) -> JoinGroupResponse {
    join_with_timeout(broker, now, member, topics, 10_000)
}

fn join_with_timeout(
    broker: &mut SimBroker,
    now: Instant,
    member: &str,
    topics: &[&str],
    session_timeout_ms: u32,
) -> JoinGroupResponse {
    let req = JoinGroupRequest {
        group_id: GROUP.to_owned(),
        member_id: member.to_owned(),
        session_timeout_ms,
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::JoinGroup(r) => r,
        other => panic!("unexpected response {other:?}"),
    }
}

fn heartbeat_in(
    broker: &mut SimBroker,
    now: Instant,
    group: &str,
    member: &str,
    generation: u64,
) -> u32 {
    let req = ConsumerHeartbeatRequest {
        group_id: group.to_owned(),
        member_id: member.to_owned(),
        generation_id: generation,
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::ConsumerHeartbeat(r) => r.error_code,
        other => panic!("unexpected response {other:?}"),
    }
}

fn heartbeat(broker: &mut SimBroker, now: Instant, member: &str, generation: u64) -> u32 {
    heartbeat_in(broker, now, GROUP, member, generation)
}

fn commit_in(
    broker: &mut SimBroker,
    now: Instant,
    group: &str,
    member: &str,
    generation: u64,
    offsets: &[(TopicPartition, u64)],
) -> u32 {
    let req = CommitOffsetRequest {
        group_id: group.to_owned(),
        member_id: member.to_owned(),
        generation_id: generation,
        offsets: offsets.iter().cloned().collect(),
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::CommitOffset(r) => r.error_code,
        other => panic!("unexpected response {other:?}"),
    }
}

fn commit(
    broker: &mut SimBroker,
    now: Instant,
    member: &str,
    generation: u64,
    offsets: &[(TopicPartition, u64)],
) -> u32 {
    commit_in(broker, now, GROUP, member, generation, offsets)
}

fn fetch_offsets(
    broker: &mut SimBroker,
    now: Instant,
    group: &str,
    tps: &[TopicPartition],
) -> (BTreeMap<TopicPartition, u64>, u32) {
    let req = FetchOffsetRequest {
        group_id: group.to_owned(),
        topic_partitions: tps.to_vec(),
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::FetchOffset(r) => (r.offsets, r.error_code),
        other => panic!("unexpected response {other:?}"),
    }
}

fn leave_in(broker: &mut SimBroker, now: Instant, group: &str, member: &str) -> u32 {
    let req = LeaveGroupRequest {
        group_id: group.to_owned(),
        member_id: member.to_owned(),
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::LeaveGroup(r) => r.error_code,
        other => panic!("unexpected response {other:?}"),
    }
}

fn leave(broker: &mut SimBroker, now: Instant, member: &str) -> u32 {
    leave_in(broker, now, GROUP, member)
}

fn values(n: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("v{i}"))).collect()
}

// ---------------------------------------------------------------- storage

#[test]
fn fetch_returns_contiguous_records_from_fetch_offset() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker.produce_values("t", 0, values(10)).unwrap();

    let resp = fetch(&mut broker, now, "t", 0, 3, 1 << 20);
    assert_eq!(resp.error_code, error_code::NONE);
    assert_eq!(resp.high_watermark, 10);
    let got: Vec<&Bytes> = resp.records.iter().map(|r| &r.value).collect();
    let want: Vec<Bytes> = (3..10).map(|i| Bytes::from(format!("v{i}"))).collect();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
}

#[test]
fn fetch_returns_at_least_one_record_whatever_max_bytes() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker
        .produce_values("t", 0, [vec![7u8; 500], vec![8u8; 500]])
        .unwrap();

    let resp = fetch(&mut broker, now, "t", 0, 0, 0);
    assert_eq!(resp.records.len(), 1);
    assert_eq!(resp.records[0].value, Bytes::from(vec![7u8; 500]));
    let resp = fetch(&mut broker, now, "t", 0, 1, 1);
    assert_eq!(resp.records.len(), 1);
    assert_eq!(resp.records[0].value, Bytes::from(vec![8u8; 500]));
}

#[test]
fn fetch_stops_before_exceeding_max_bytes() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker
        .produce_values("t", 0, (0..5).map(|_| vec![1u8; 100]))
        .unwrap();
    let one = broker.fetch_cost(&broker.records("t", 0)[0]);
    assert_eq!(one, 350 + 100);
    let all_five = u32::try_from(5 * one).unwrap();

    let exactly_three = u32::try_from(3 * one).unwrap();
    assert_eq!(
        fetch(&mut broker, now, "t", 0, 0, exactly_three)
            .records
            .len(),
        3
    );
    assert_eq!(
        fetch(&mut broker, now, "t", 0, 0, exactly_three - 1)
            .records
            .len(),
        2
    );
    assert_eq!(
        fetch(&mut broker, now, "t", 0, 1, all_five).records.len(),
        4
    );
}

/// The figures measured on the real broker for small records (`msg-<i>`, about 35 wire bytes
/// each): `max_bytes` is not counted in wire bytes.
#[test]
fn fetch_counts_max_bytes_like_the_real_broker() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    assert_eq!(broker.record_overhead(), DEFAULT_RECORD_OVERHEAD);
    broker.create_topic("t", 1);
    broker
        .produce_values("t", 0, (100_000..105_000).map(|i| format!("msg-{i}")))
        .unwrap();
    let record = &broker.records("t", 0)[0];
    assert_eq!(record.encoded_len(), 35);
    assert_eq!(broker.fetch_cost(record), 360);

    for (max_bytes, want) in [
        (100, 1),
        (1_000, 2),
        (4_000, 11),
        (40_000, 111),
        (1 << 20, 2_912),
    ] {
        let got = fetch(&mut broker, now, "t", 0, 0, max_bytes).records.len();
        assert_eq!(got, want, "max_bytes {max_bytes}");
    }
}

#[test]
fn fetch_cost_counts_key_and_headers_and_a_settable_overhead() {
    let broker = SimBroker::new().with_record_overhead(0);
    assert_eq!(broker.record_overhead(), 0);
    let mut record = Record::from_value("value");
    record.key = Some(Bytes::from_static(b"key"));
    record.headers.push(Header {
        key: "h".to_owned(),
        value: Bytes::from_static(b"hv"),
    });
    assert_eq!(broker.fetch_cost(&record), 5 + 3 + 1 + 2);
    let broker = broker.with_record_overhead(100);
    assert_eq!(broker.fetch_cost(&record), 100 + 11);

    // With no overhead, max_bytes counts payload only.
    let now = Instant::now();
    let mut broker = SimBroker::new().with_record_overhead(0);
    broker.create_topic("t", 1);
    broker
        .produce_values("t", 0, (0..10).map(|_| vec![0u8; 10]))
        .unwrap();
    assert_eq!(fetch(&mut broker, now, "t", 0, 0, 35).records.len(), 3);
}

#[test]
fn fetch_past_the_end_is_empty_with_error_zero() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker.produce_values("t", 0, values(3)).unwrap();

    for offset in [3, 4, u64::MAX] {
        let resp = fetch(&mut broker, now, "t", 0, offset, 1 << 20);
        assert!(resp.records.is_empty());
        assert_eq!(resp.error_code, error_code::NONE);
        assert_eq!(resp.high_watermark, 3);
    }
}

#[test]
fn fetch_unknown_topic_or_partition_is_empty_with_zero_watermark() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);
    broker.produce_values("t", 0, values(3)).unwrap();

    for (topic, partition) in [("nope", 0), ("t", 2)] {
        let resp = fetch(&mut broker, now, topic, partition, 0, 1 << 20);
        assert!(resp.records.is_empty());
        assert_eq!(resp.error_code, error_code::NONE);
        assert_eq!(resp.high_watermark, 0);
    }
    assert_eq!(broker.high_watermark("t", 1), Some(0));
    assert_eq!(broker.high_watermark("t", 2), None);
    assert!(broker.records("nope", 0).is_empty());
}

#[test]
fn fetch_storage_failure_is_error_one_then_recovers() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker.produce_values("t", 0, values(2)).unwrap();
    broker.fail_next_fetches(2);

    for _ in 0..2 {
        let resp = fetch(&mut broker, now, "t", 0, 0, 1 << 20);
        assert_eq!(resp.error_code, error_code::STORAGE);
        assert!(resp.records.is_empty());
        assert_eq!(resp.high_watermark, 0);
    }
    let resp = fetch(&mut broker, now, "t", 0, 0, 1 << 20);
    assert_eq!(resp.error_code, error_code::NONE);
    assert_eq!(resp.records.len(), 2);
}

#[test]
fn produce_returns_first_offset_and_overwrites_timestamps() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    assert_eq!(broker.produce_values("t", 0, values(3)).unwrap(), 0);

    let mut record = Record::from_value("x");
    record.timestamp = 42;
    let req = ProduceRequest {
        topic: "t".to_owned(),
        partition_id: 0,
        records: vec![record.clone(), record],
        acks: AcknowledgmentLevel::Leader,
        timeout_ms: 1000,
    };
    broker
        .handle(t0, MetadataRequest { topics: vec![] }.into())
        .unwrap();
    let later = t0 + Duration::from_millis(1500);
    let resp = match broker.handle(later, req.into()).unwrap() {
        Response::Produce(r) => r,
        other => panic!("unexpected response {other:?}"),
    };
    assert_eq!(resp.offset, 3);
    assert_eq!(resp.error_code, error_code::NONE);
    assert_eq!(broker.high_watermark("t", 0), Some(5));
    let records = broker.records("t", 0);
    assert!(records[3..]
        .iter()
        .all(|r| r.timestamp == CLOCK_BASE_MS + 1500));
    assert_eq!(broker.produce_values("t", 0, values(1)).unwrap(), 5);
}

#[test]
fn produce_to_unknown_partition_is_error_frame() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);

    assert_eq!(
        broker.produce_values("t", 1, values(1)),
        Err(BrokerError("Partition not found: t:1".to_owned()))
    );
    let req = ProduceRequest {
        topic: "dlq".to_owned(),
        partition_id: 0,
        records: vec![Record::from_value("x")],
        acks: AcknowledgmentLevel::Leader,
        timeout_ms: 1000,
    };
    let err = broker.handle(now, req.into()).unwrap_err();
    assert_eq!(err.to_string(), "Partition not found: dlq:0");
    assert!(broker.records("t", 0).is_empty());
    assert_eq!(
        broker.request_log()[0].outcome,
        Outcome::ErrorFrame {
            message: "Partition not found: dlq:0".to_owned()
        }
    );
}

#[test]
fn metadata_lists_one_broker_and_no_topics() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 3);
    let req = MetadataRequest {
        topics: vec!["t".to_owned()],
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::Metadata(r) => {
            assert_eq!(r.brokers, vec![broker.broker_info().clone()]);
            assert!(r.topics_metadata.is_empty());
        }
        other => panic!("unexpected response {other:?}"),
    }
}

#[test]
fn find_coordinator_returns_the_broker_itself() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    let req = FindCoordinatorRequest {
        group_id: GROUP.to_owned(),
    };
    match broker.handle(now, req.into()).unwrap() {
        Response::FindCoordinator(r) => {
            assert_eq!(r.error_code, error_code::NONE);
            assert_eq!(r.coordinator_broker_id, broker.broker_info().id);
            assert_eq!(r.coordinator_host, broker.broker_info().host);
            assert_eq!(r.coordinator_port, broker.broker_info().port_quic);
        }
        other => panic!("unexpected response {other:?}"),
    }
}

// ---------------------------------------------------------------- group membership

#[test]
fn join_creates_group_generates_member_id_and_bumps_generation() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);
    assert_eq!(broker.generation(GROUP), None);

    let a = join(&mut broker, now, "", &["t"]);
    assert_eq!(a.error_code, error_code::NONE);
    assert!(!a.member_id.is_empty());
    assert_eq!(a.generation_id, 1);
    assert_eq!(a.leader_id, a.member_id);
    assert_eq!(
        a.assigned_partitions[&a.member_id],
        vec![tp("t", 0), tp("t", 1)]
    );
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Stable));

    let b = join(&mut broker, now, "", &["t"]);
    assert_ne!(b.member_id, a.member_id);
    assert_eq!(b.generation_id, 2);
    assert_eq!(broker.members(GROUP).len(), 2);
    assert_eq!(broker.assignment(GROUP), b.assigned_partitions);

    // A rejoin under a known id keeps the id and, the group being Stable, bumps again.
    let again = join(&mut broker, now, &a.member_id, &["t"]);
    assert_eq!(again.member_id, a.member_id);
    assert_eq!(again.generation_id, 3);
    assert_eq!(broker.members(GROUP).len(), 2);
}

#[test]
fn join_assignment_round_robin_covers_every_partition_exactly_once() {
    let now = Instant::now();
    let mut broker = SimBroker::with_seed(7);
    broker.create_topic("a", 5);
    broker.create_topic("b", 2);

    join(&mut broker, now, "m1", &["a"]);
    join(&mut broker, now, "m2", &["b"]);
    let last = join(&mut broker, now, "m3", &["a", "b"]);

    let assignment = last.assigned_partitions;
    assert_eq!(assignment, broker.assignment(GROUP));
    let mut seen = BTreeSet::new();
    for parts in assignment.values() {
        for p in parts {
            assert!(seen.insert(p.clone()), "{p} assigned twice");
        }
    }
    let all: BTreeSet<TopicPartition> = (0..5)
        .map(|p| tp("a", p))
        .chain((0..2).map(|p| tp("b", p)))
        .collect();
    assert_eq!(seen, all);
    // Round-robin over three members: seven partitions split 3/2/2.
    let mut sizes: Vec<usize> = assignment.values().map(Vec::len).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![2, 2, 3]);
    // Member m1 subscribed only to "a" yet may get partitions of "b".
    assert!(assignment.values().flatten().any(|p| p.topic == "b"));
}

#[test]
fn join_counts_a_topic_missing_from_the_partition_table_as_one_partition() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 4);
    broker.set_coordinator_partition_count("t", None);

    join(&mut broker, now, "m1", &["t", "unknown"]);
    let resp = join(&mut broker, now, "m2", &["t"]);
    let all: Vec<TopicPartition> = resp
        .assigned_partitions
        .values()
        .flatten()
        .cloned()
        .collect();
    assert_eq!(all.len(), 2);
    assert!(all.contains(&tp("t", 0)));
    assert!(all.contains(&tp("unknown", 0)));

    // A member given nothing is absent from the map.
    let resp = join(&mut broker, now, "m3", &["t"]);
    assert_eq!(resp.assigned_partitions.len(), 2);
    assert_eq!(broker.members(GROUP).len(), 3);
}

#[test]
fn member_ids_depend_only_on_the_seed() {
    let now = Instant::now();
    let ids = |seed: u64| {
        let mut broker = SimBroker::with_seed(seed);
        (0..3)
            .map(|_| join(&mut broker, now, "", &["t"]).member_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(1), ids(1));
    assert_ne!(ids(1), ids(2));
    assert_eq!(ids(1).iter().collect::<BTreeSet<_>>().len(), 3);
}

#[test]
fn heartbeat_error_codes_are_checked_in_order() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);

    // 16 unknown group, whatever else is wrong.
    assert_eq!(
        heartbeat_in(&mut broker, now, "other", "nobody", 99),
        error_code::UNKNOWN_GROUP
    );

    let a = join(&mut broker, now, "a", &["t"]);
    let b = join(&mut broker, now, "b", &["t"]);
    assert_eq!(a.generation_id + 1, b.generation_id);
    let generation = b.generation_id;

    // 22 before 25: a wrong generation from an unknown member is 22.
    assert_eq!(
        heartbeat(&mut broker, now, "nobody", generation + 5),
        error_code::ILLEGAL_GENERATION
    );
    assert_eq!(
        heartbeat(&mut broker, now, "a", a.generation_id),
        error_code::ILLEGAL_GENERATION
    );
    assert_eq!(
        heartbeat(&mut broker, now, "nobody", generation),
        error_code::UNKNOWN_MEMBER
    );
    assert_eq!(
        heartbeat(&mut broker, now, "a", generation),
        error_code::NONE
    );

    // 27 before 22 and 25: during a rebalance everything is 27.
    assert_eq!(leave(&mut broker, now, "b"), error_code::NONE);
    assert_eq!(
        broker.group_state(GROUP),
        Some(GroupState::PreparingRebalance)
    );
    assert_eq!(
        heartbeat(&mut broker, now, "a", generation),
        error_code::REBALANCE_IN_PROGRESS
    );
    assert_eq!(
        heartbeat(&mut broker, now, "nobody", 0),
        error_code::REBALANCE_IN_PROGRESS
    );
}

#[test]
fn heartbeat_keeps_a_member_alive_past_its_session_timeout() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    let a = join_with_timeout(&mut broker, t0, "a", &["t"], 3_000);

    for s in 1..=10 {
        let now = t0 + Duration::from_secs(s);
        assert_eq!(
            heartbeat(&mut broker, now, "a", a.generation_id),
            error_code::NONE
        );
        assert_eq!(broker.poll_timeout(), Some(now));
        broker.handle_timeout(now);
    }
    assert_eq!(broker.members(GROUP), vec!["a".to_owned()]);
    assert_eq!(broker.generation(GROUP), Some(a.generation_id));
}

// ---------------------------------------------------------------- session reaper

#[test]
fn poll_timeout_is_none_without_members_and_ticks_every_second_with_them() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    assert_eq!(broker.poll_timeout(), None);
    broker
        .handle(t0, MetadataRequest { topics: vec![] }.into())
        .unwrap();
    assert_eq!(broker.poll_timeout(), None);

    join(&mut broker, t0 + Duration::from_millis(2_300), "a", &["t"]);
    assert_eq!(broker.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    broker.handle_timeout(t0 + Duration::from_secs(3));
    assert_eq!(broker.poll_timeout(), Some(t0 + Duration::from_secs(4)));

    leave(&mut broker, t0 + Duration::from_secs(3), "a");
    assert_eq!(broker.poll_timeout(), None);
}

#[test]
fn handle_timeout_before_the_tick_is_a_no_op() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    let a = join_with_timeout(&mut broker, t0, "a", &["t"], 100);
    let due = broker.poll_timeout().unwrap();
    assert_eq!(due, t0 + REAPER_INTERVAL);

    broker.handle_timeout(due - Duration::from_millis(1));
    assert_eq!(broker.members(GROUP), vec!["a".to_owned()]);
    assert_eq!(broker.poll_timeout(), Some(due));
    assert_eq!(broker.generation(GROUP), Some(a.generation_id));
}

#[test]
fn reaper_evicts_a_silent_member_and_rebalances_with_a_generation_bump() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);
    join_with_timeout(&mut broker, t0, "alive", &["t"], 2_000);
    let joined = join_with_timeout(&mut broker, t0, "silent", &["t"], 2_000);
    let generation = joined.generation_id;

    // Exactly the session timeout of silence is not yet "longer than".
    let mut now = t0;
    for _ in 0..2 {
        now = broker.poll_timeout().unwrap();
        assert_eq!(
            heartbeat(&mut broker, now, "alive", generation),
            error_code::NONE
        );
        broker.handle_timeout(now);
    }
    assert_eq!(now, t0 + Duration::from_secs(2));
    assert_eq!(broker.members(GROUP).len(), 2);

    now = broker.poll_timeout().unwrap();
    broker.handle_timeout(now);
    assert_eq!(broker.members(GROUP), vec!["alive".to_owned()]);
    assert_eq!(broker.generation(GROUP), Some(generation + 1));
    assert_eq!(
        broker.group_state(GROUP),
        Some(GroupState::PreparingRebalance)
    );
    assert!(broker.assignment(GROUP).is_empty());
    assert_eq!(
        heartbeat(&mut broker, now, "alive", generation),
        error_code::REBALANCE_IN_PROGRESS
    );

    // The survivor rejoins: no further bump (the group is rebalancing), all partitions.
    let rejoined = join(&mut broker, now, "alive", &["t"]);
    assert_eq!(rejoined.generation_id, generation + 1);
    assert_eq!(
        rejoined.assigned_partitions["alive"],
        vec![tp("t", 0), tp("t", 1)]
    );
    assert_eq!(
        heartbeat(&mut broker, now, "alive", rejoined.generation_id),
        error_code::NONE
    );
}

#[test]
fn reaper_evicting_the_last_member_leaves_an_empty_group() {
    let t0 = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    let a = join_with_timeout(&mut broker, t0, "a", &["t"], 500);

    broker.handle_timeout(broker.poll_timeout().unwrap());
    assert!(broker.members(GROUP).is_empty());
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Empty));
    assert_eq!(broker.generation(GROUP), Some(a.generation_id));
    assert_eq!(broker.poll_timeout(), None);
    assert_eq!(
        heartbeat(&mut broker, t0, "a", a.generation_id),
        error_code::UNKNOWN_MEMBER
    );
    // Joining the Empty group bumps the generation.
    let b = join(&mut broker, t0 + Duration::from_secs(2), "", &["t"]);
    assert_eq!(b.generation_id, a.generation_id + 1);
}

// ---------------------------------------------------------------- offsets

#[test]
fn commit_error_codes_and_verbatim_storage() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);

    assert_eq!(
        commit_in(&mut broker, now, "other", "m", 0, &[(tp("t", 0), 1)]),
        error_code::UNKNOWN_GROUP
    );
    let a = join(&mut broker, now, "a", &["t"]);
    assert_eq!(
        commit(
            &mut broker,
            now,
            "a",
            a.generation_id + 1,
            &[(tp("t", 0), 1)]
        ),
        error_code::ILLEGAL_GENERATION
    );
    broker.fail_next_commits(1);
    assert_eq!(
        commit(&mut broker, now, "a", a.generation_id, &[(tp("t", 0), 1)]),
        error_code::STORAGE
    );
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), None);

    // Membership is not checked, offsets are stored verbatim (even past the end).
    assert_eq!(
        commit(
            &mut broker,
            now,
            "stranger",
            a.generation_id,
            &[(tp("t", 0), 7), (tp("x", 9), 1234)]
        ),
        error_code::NONE
    );
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), Some(7));
    assert_eq!(broker.committed(GROUP, &tp("x", 9)), Some(1234));
    assert_eq!(
        commit(&mut broker, now, "a", a.generation_id, &[(tp("t", 0), 3)]),
        error_code::NONE
    );
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), Some(3));
}

#[test]
fn fetch_offset_returns_only_committed_partitions() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 3);

    let (offsets, code) = fetch_offsets(&mut broker, now, GROUP, &[tp("t", 0)]);
    assert_eq!(code, error_code::UNKNOWN_GROUP);
    assert!(offsets.is_empty());

    let a = join(&mut broker, now, "a", &["t"]);
    commit(&mut broker, now, "a", a.generation_id, &[(tp("t", 1), 5)]);
    let (offsets, code) = fetch_offsets(
        &mut broker,
        now,
        GROUP,
        &[tp("t", 0), tp("t", 1), tp("t", 2)],
    );
    assert_eq!(code, error_code::NONE);
    assert_eq!(offsets, BTreeMap::from([(tp("t", 1), 5)]));
}

/// As on the real broker, only a JoinGroup creates a group: every other group request to an
/// unknown group answers 16 and leaves it unknown.
#[test]
fn only_join_group_creates_a_group() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    assert_eq!(
        commit(&mut broker, now, "m", 0, &[(tp("t", 0), 4)]),
        error_code::UNKNOWN_GROUP
    );
    assert_eq!(
        fetch_offsets(&mut broker, now, GROUP, &[tp("t", 0)]).1,
        error_code::UNKNOWN_GROUP
    );
    assert_eq!(
        heartbeat(&mut broker, now, "m", 0),
        error_code::UNKNOWN_GROUP
    );
    assert_eq!(leave(&mut broker, now, "m"), error_code::UNKNOWN_GROUP);
    assert_eq!(broker.generation(GROUP), None);
    assert!(broker.commit_log().is_empty());

    let a = join(&mut broker, now, "", &["t"]);
    assert_eq!(a.generation_id, 1);
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Stable));
}

/// What manual assignment can rely on: a join creates the group and tells its generation; once
/// the last member left, the group stays (Empty, same generation, commits kept) and accepts
/// commits from anyone under that generation, until another join bumps it.
#[test]
fn an_emptied_group_keeps_its_generation_and_accepts_commits_under_it() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    let a = join(&mut broker, now, "", &["t"]);
    assert_eq!(
        commit(
            &mut broker,
            now,
            &a.member_id,
            a.generation_id,
            &[(tp("t", 0), 2)]
        ),
        error_code::NONE
    );
    assert_eq!(leave(&mut broker, now, &a.member_id), error_code::NONE);
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Empty));
    assert_eq!(broker.generation(GROUP), Some(a.generation_id));
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), Some(2));

    assert_eq!(
        commit(
            &mut broker,
            now,
            &a.member_id,
            a.generation_id,
            &[(tp("t", 0), 5)]
        ),
        error_code::NONE
    );
    assert_eq!(
        commit(
            &mut broker,
            now,
            "anyone",
            a.generation_id,
            &[(tp("t", 0), 6)]
        ),
        error_code::NONE
    );
    assert_eq!(
        commit(
            &mut broker,
            now,
            "anyone",
            a.generation_id - 1,
            &[(tp("t", 0), 9)]
        ),
        error_code::ILLEGAL_GENERATION
    );
    let (offsets, code) = fetch_offsets(&mut broker, now, GROUP, &[tp("t", 0)]);
    assert_eq!(code, error_code::NONE);
    assert_eq!(offsets, BTreeMap::from([(tp("t", 0), 6)]));
    assert_eq!(broker.commit_log()[2].member_assignment, None);

    let b = join(&mut broker, now, "", &["t"]);
    assert_eq!(b.generation_id, a.generation_id + 1);
    assert_eq!(
        commit(
            &mut broker,
            now,
            "anyone",
            a.generation_id,
            &[(tp("t", 0), 7)]
        ),
        error_code::ILLEGAL_GENERATION
    );
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), Some(6));
}

// ---------------------------------------------------------------- leave and rejoin

#[test]
fn leave_group_codes_and_remaining_members_see_rebalance() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 4);
    assert_eq!(
        leave_in(&mut broker, now, "other", "x"),
        error_code::UNKNOWN_GROUP
    );

    join(&mut broker, now, "a", &["t"]);
    join(&mut broker, now, "b", &["t"]);
    let c = join(&mut broker, now, "c", &["t"]);
    let generation = c.generation_id;

    assert_eq!(leave(&mut broker, now, "c"), error_code::NONE);
    assert_eq!(broker.generation(GROUP), Some(generation + 1));
    assert_eq!(broker.members(GROUP), vec!["a".to_owned(), "b".to_owned()]);
    for member in ["a", "b"] {
        assert_eq!(
            heartbeat(&mut broker, now, member, generation),
            error_code::REBALANCE_IN_PROGRESS
        );
    }

    // An unknown member's leave is 0 and, members remaining, still bumps the generation.
    assert_eq!(leave(&mut broker, now, "ghost"), error_code::NONE);
    assert_eq!(broker.generation(GROUP), Some(generation + 2));

    leave(&mut broker, now, "a");
    leave(&mut broker, now, "b");
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Empty));
    assert_eq!(broker.generation(GROUP), Some(generation + 3));
}

#[test]
fn rejoin_after_a_leave_gets_a_new_assignment() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 4);
    join(&mut broker, now, "a", &["t"]);
    let before = join(&mut broker, now, "b", &["t"]);
    assert_eq!(before.assigned_partitions["a"].len(), 2);
    assert_eq!(before.assigned_partitions["b"].len(), 2);

    leave(&mut broker, now, "b");
    assert_eq!(
        heartbeat(&mut broker, now, "a", before.generation_id),
        error_code::REBALANCE_IN_PROGRESS
    );
    let after = join(&mut broker, now, "a", &["t"]);
    assert_eq!(after.generation_id, before.generation_id + 1);
    assert_eq!(
        after.assigned_partitions,
        BTreeMap::from([(
            "a".to_owned(),
            vec![tp("t", 0), tp("t", 1), tp("t", 2), tp("t", 3)]
        )])
    );
    assert_eq!(broker.group_state(GROUP), Some(GroupState::Stable));
    assert_eq!(
        heartbeat(&mut broker, now, "a", after.generation_id),
        error_code::NONE
    );
    // The old generation can no longer commit.
    assert_eq!(
        commit(
            &mut broker,
            now,
            "a",
            before.generation_id,
            &[(tp("t", 0), 1)]
        ),
        error_code::ILLEGAL_GENERATION
    );
}

// ---------------------------------------------------------------- restart

#[test]
fn restart_loses_groups_and_commits_but_keeps_data() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);
    broker.produce_values("t", 0, values(5)).unwrap();
    let a = join(&mut broker, now, "a", &["t"]);
    commit(&mut broker, now, "a", a.generation_id, &[(tp("t", 0), 3)]);
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), Some(3));

    broker.restart();
    assert_eq!(broker.records("t", 0).len(), 5);
    assert_eq!(broker.high_watermark("t", 0), Some(5));
    assert_eq!(broker.committed(GROUP, &tp("t", 0)), None);
    assert_eq!(broker.generation(GROUP), None);
    assert!(broker.members(GROUP).is_empty());
    assert_eq!(broker.poll_timeout(), None);
    assert_eq!(
        heartbeat(&mut broker, now, "a", a.generation_id),
        error_code::UNKNOWN_GROUP
    );
    let (offsets, code) = fetch_offsets(&mut broker, now, GROUP, &[tp("t", 0)]);
    assert_eq!((offsets.len(), code), (0, error_code::UNKNOWN_GROUP));

    // The partition table survives: a fresh join still sees both partitions.
    let b = join(&mut broker, now, "", &["t"]);
    assert_eq!(b.generation_id, 1);
    assert_eq!(b.assigned_partitions[&b.member_id].len(), 2);
    assert_eq!(fetch(&mut broker, now, "t", 0, 0, 1 << 20).records.len(), 5);
}

// ---------------------------------------------------------------- logs

#[test]
fn commit_log_records_only_accepted_commits_with_ownership() {
    let now = Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 2);
    join(&mut broker, now, "a", &["t"]);
    let b = join(&mut broker, now, "b", &["t"]);
    let generation = b.generation_id;

    commit(&mut broker, now, "a", generation, &[(tp("t", 0), 1)]);
    commit(&mut broker, now, "a", generation - 1, &[(tp("t", 0), 2)]);
    broker.fail_next_commits(1);
    commit(&mut broker, now, "b", generation, &[(tp("t", 1), 9)]);
    commit(&mut broker, now, "b", generation, &[(tp("t", 1), 4)]);
    leave(&mut broker, now, "b");

    let log = broker.commit_log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].member, "a");
    assert_eq!(log[0].generation, generation);
    assert_eq!(log[0].offsets, BTreeMap::from([(tp("t", 0), 1)]));
    assert_eq!(log[0].member_assignment, Some(vec![tp("t", 0)]));
    assert_eq!(log[1].member, "b");
    assert_eq!(log[1].offsets, BTreeMap::from([(tp("t", 1), 4)]));
    assert_eq!(log[1].member_assignment, Some(vec![tp("t", 1)]));

    // seq indexes the request log: b's last commit came before its leave.
    let requests = broker.request_log();
    assert_eq!(requests[log[1].seq].kind, RequestKind::CommitOffset);
    let leave_seq = requests
        .iter()
        .position(|e| e.kind == RequestKind::LeaveGroup)
        .unwrap();
    assert!(log[1].seq < leave_seq);
}

#[test]
fn request_log_records_every_request_in_order() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(10);
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    let a = join(&mut broker, t0, "", &["t"]);
    heartbeat(&mut broker, t1, &a.member_id, a.generation_id + 1);
    fetch(&mut broker, t1, "t", 0, 0, 100);
    let unknown: Request = ProduceRequest {
        topic: "t".to_owned(),
        partition_id: 3,
        records: vec![],
        acks: AcknowledgmentLevel::None,
        timeout_ms: 0,
    }
    .into();
    assert!(broker.handle(t1, unknown).is_err());

    let log = broker.request_log();
    let kinds: Vec<RequestKind> = log.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            RequestKind::JoinGroup,
            RequestKind::ConsumerHeartbeat,
            RequestKind::Fetch,
            RequestKind::Produce
        ]
    );
    assert_eq!(log[0].at, t0);
    assert_eq!(log[0].member.as_deref(), Some(a.member_id.as_str()));
    assert_eq!(log[0].generation, Some(a.generation_id));
    assert_eq!(
        log[1].outcome,
        Outcome::Response {
            error_code: Some(error_code::ILLEGAL_GENERATION)
        }
    );
    assert_eq!(log[1].at, t1);
    assert_eq!(log[2].partition, Some(tp("t", 0)));
    assert!(matches!(log[3].outcome, Outcome::ErrorFrame { .. }));
}
