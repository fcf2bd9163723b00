//! The consumer against a broker that reads requests as the real one does over a network
//! (`SimBroker::set_split_reads`: a frame that straddles two packets fails, so every frame over
//! one packet, and some smaller ones sent together with others): every request it sends about
//! partitions fits one packet, whatever the names (up to `ConsumerConfig::MAX_NAME_LEN`) and
//! however many partitions, so it starts, consumes, dead-letters, commits and closes.
//! In memory, on a virtual clock.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rustmq_consumer_core::codec::request_frame_len;
use rustmq_consumer_core::protocol::Request;
use rustmq_consumer_core::protocol::{TopicPartition, PACKET_REQUEST_FRAME};
use rustmq_consumer_core::{ConsumerConfig, Event, Health, StallReason, TransportError};
use rustmq_consumer_testkit::{delivered_tag, Pump, Route, SimBroker};

/// Virtual time a run may take before the test gives up.
const BUDGET: Duration = Duration::from_secs(120);

/// A broker reading one packet of each request, `records` in each of `partitions`.
fn broker(topic: &str, partitions: u32, records: usize) -> SimBroker {
    let mut b = SimBroker::new();
    b.create_topic(topic, partitions);
    for p in 0..partitions {
        let values = (0..records).map(|i| Bytes::from(format!("m{i}")));
        b.produce_values(topic, p, values).unwrap();
    }
    b.set_split_reads(true);
    b
}

/// Acks every delivery but `poison` (rejected), closes once every partition's `records` are
/// settled, and steps virtual time until closed. False if [`BUDGET`] ran out first.
fn consume_and_close(
    pump: &mut Pump<SimBroker>,
    partitions: u32,
    records: u64,
    poison: Option<(u32, u64)>,
) -> bool {
    let start = pump.now;
    let mut closing = false;
    while pump.now < start + BUDGET {
        pump.drive();
        let events = pump.take_events();
        for tag in events.iter().filter_map(delivered_tag) {
            if Some((tag.partition, tag.offset)) == poison {
                pump.m.reject(pump.now, tag, "poison").unwrap();
            } else {
                pump.ack(tag);
            }
        }
        if pump.m.is_closed() {
            return true;
        }
        let settled = (0..partitions).all(|p| pump.m.settle_watermark(p) == Some(records));
        if settled && !closing {
            pump.m.close(pump.now);
            closing = true;
            continue;
        }
        pump.advance(Duration::from_millis(50));
    }
    false
}

/// Every request the pump sent fits one packet.
fn assert_one_packet_requests(pump: &Pump<SimBroker>) {
    for request in &pump.sent {
        let size = request_frame_len(request);
        assert!(
            size <= PACKET_REQUEST_FRAME,
            "a {:?} of {size} bytes",
            request.kind()
        );
    }
}

#[test]
fn a_group_member_with_the_longest_names_works_when_the_broker_reads_one_packet() {
    const PARTITIONS: u32 = 50;
    let name = |c: char| c.to_string().repeat(ConsumerConfig::MAX_NAME_LEN);
    let (topic, group, dlq) = (name('t'), name('g'), name('d'));
    let mut b = broker(&topic, PARTITIONS, 4);
    b.create_topic(&dlq, 1);
    // The coordinator deals all 50 partitions (the real one counts one per topic unless told).
    b.set_coordinator_partition_count(&topic, Some(PARTITIONS));
    let mut config = ConsumerConfig::new(topic.clone(), group.clone());
    config.dead_letter_queue = Some(dlq.clone());
    let mut pump = Pump::new(b, config, Instant::now());
    assert!(
        consume_and_close(&mut pump, PARTITIONS, 4, Some((7, 2))),
        "not closed within {BUDGET:?}: {:?}",
        pump.m.metrics()
    );
    assert_one_packet_requests(&pump);
    for p in 0..PARTITIONS {
        let tp = TopicPartition::new(topic.clone(), p);
        assert_eq!(pump.broker.committed(&group, &tp), Some(4), "partition {p}");
    }
    assert_eq!(pump.broker.records(&dlq, 0).len(), 1, "the poison message");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Manual assignment over many partitions, names of any allowed length.
    #[test]
    fn any_names_and_partition_counts_fit_one_packet_requests(
        topic_len in 1..=ConsumerConfig::MAX_NAME_LEN,
        group_len in 1..=ConsumerConfig::MAX_NAME_LEN,
        partitions in 1u32..=300,
    ) {
        let (topic, group) = ("t".repeat(topic_len), "g".repeat(group_len));
        let mut config = ConsumerConfig::new(topic.clone(), group.clone());
        config.partitions = (0..partitions).collect();
        let mut pump = Pump::new(broker(&topic, partitions, 2), config, Instant::now());
        prop_assert!(
            consume_and_close(&mut pump, partitions, 2, None),
            "not closed within {:?}: {:?}", BUDGET, pump.m.metrics()
        );
        assert_one_packet_requests(&pump);
        for p in 0..partitions {
            let tp = TopicPartition::new(topic.clone(), p);
            prop_assert_eq!(pump.broker.committed(&group, &tp), Some(2), "partition {}", p);
        }
    }
}

#[test]
fn a_dead_letter_record_over_one_packet_stalls_visibly_and_recovers_when_it_gets_through() {
    // Over a network the broker reads one packet of a request, so a dead-letter produce of a
    // record over one packet is cut every time: before, its partition stopped at the poison
    // message with nothing but debug-level request failures to show for it.
    let mut b = SimBroker::new();
    b.create_topic("t", 2);
    b.create_topic("dlq", 1);
    for p in 0..2 {
        let values = (0..4u8).map(|i| Bytes::from(vec![b'a' + i; 3_000]));
        b.produce_values("t", p, values).unwrap();
    }
    b.set_split_reads(true);
    let mut config = ConsumerConfig::new("t", "g");
    config.partitions = vec![0, 1];
    config.dead_letter_queue = Some("dlq".into());
    let mut pump = Pump::new(b, config, Instant::now());
    let poison = (0, 1);
    let run = |pump: &mut Pump<SimBroker>, span: Duration| {
        let (start, mut seen) = (pump.now, Vec::new());
        while pump.now < start + span {
            pump.drive();
            for event in pump.take_events() {
                match event {
                    Event::Deliver(d) if (d.tag.partition, d.tag.offset) == poison => {
                        pump.m.reject(pump.now, d.tag, "poison").unwrap();
                    }
                    Event::Deliver(d) => pump.ack(d.tag),
                    other => seen.push(other),
                }
            }
            pump.advance(Duration::from_millis(50));
        }
        seen
    };
    let seen = run(&mut pump, Duration::from_secs(60));
    let stalls: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::Stalled { .. }))
        .collect();
    assert!(
        matches!(
            stalls.as_slice(),
            [Event::Stalled {
                partition: 0,
                offset: 1,
                reason: StallReason::DeadLetterCut { cuts: 3, size },
            }] if *size > PACKET_REQUEST_FRAME
        ),
        "one stall, after three cuts: {stalls:?}"
    );
    assert_eq!(pump.m.health(), Health::Degraded);
    assert_eq!(
        pump.m.settle_watermark(0),
        Some(1),
        "stopped at the poison message"
    );
    assert_eq!(
        pump.m.settle_watermark(1),
        Some(4),
        "the other partition goes on"
    );
    assert!(pump.broker.records("dlq", 0).is_empty());
    // The path changes (packets now arrive together): the retried produce gets through.
    pump.broker.set_split_reads(false);
    let seen = run(&mut pump, Duration::from_secs(60));
    assert!(
        seen.contains(&Event::Recovered { partition: 0 }),
        "recovered: {seen:?}"
    );
    assert_eq!(pump.broker.records("dlq", 0).len(), 1, "the poison message");
    assert_eq!(pump.m.settle_watermark(0), Some(4));
    assert_eq!(pump.m.health(), Health::Healthy);
}

#[test]
fn a_one_packet_dead_letter_cut_by_chance_is_retried_not_reported() {
    // A produce of one packet is cut only when it straddles two beside other requests: bad
    // luck, however often in a row, not a partition that cannot move on.
    let mut b = SimBroker::new();
    b.create_topic("t", 1);
    b.create_topic("dlq", 1);
    b.produce_values("t", 0, ["poison", "ok"]).unwrap();
    let mut config = ConsumerConfig::new("t", "g");
    config.partitions = vec![0];
    config.dead_letter_queue = Some("dlq".into());
    let mut pump = Pump::new(b, config, Instant::now());
    pump.route = Route::HoldIf(|r| matches!(r, Request::Produce(_)));
    pump.drive();
    for tag in pump.take_delivered() {
        if tag.offset == 0 {
            pump.m.reject(pump.now, tag, "poison").unwrap();
        } else {
            pump.ack(tag);
        }
    }
    pump.drive();
    let cut =
        || TransportError::Broker("Serialization error: io error: unexpected end of file".into());
    // The next attempt, after its backoff (well within the request deadline).
    let next = |pump: &mut Pump<SimBroker>| {
        for _ in 0..1_000 {
            if let Some(produce) = pump.held.pop_front() {
                return produce;
            }
            pump.advance(Duration::from_millis(100));
        }
        panic!("no dead-letter produce within 100 s");
    };
    for _ in 0..5 {
        let produce = next(&mut pump);
        pump.m.handle_response(pump.now, produce.id, Err(cut()));
        pump.drive();
    }
    assert_eq!(pump.count(|e| matches!(e, Event::Stalled { .. })), 0);
    assert_eq!(pump.m.health(), Health::Healthy);
    let produce = next(&mut pump);
    let answer = pump.broker.transmit(pump.now, produce.request);
    pump.m.handle_response(pump.now, produce.id, answer);
    pump.drive();
    assert_eq!(pump.broker.records("dlq", 0).len(), 1, "the poison message");
    assert_eq!(pump.m.settle_watermark(0), Some(2));
}
