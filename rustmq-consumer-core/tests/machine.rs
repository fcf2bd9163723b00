//! Behaviour of the consumer state machine, one test per promise. Tests named after a defect
//! of the old SDK (PROTOCOL.md, "How the broker's own SDK consumer failed") guard against it.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{config, harness, harness_with, Harness, HarnessExt as _};
use rustmq_consumer_core::protocol::*;
use rustmq_consumer_core::*;
use rustmq_consumer_testkit::Route;

fn started(config: ConsumerConfig, produced: usize) -> Harness {
    let mut h = harness(config);
    h.produce(0, produced);
    h.advance(Duration::from_millis(200));
    h
}

#[test]
fn starts_at_offset_zero_not_one() {
    let mut h = started(config("t"), 3);
    let ds = h.deliveries();
    assert_eq!(
        ds.iter().map(|d| d.tag.offset).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(ds[0].record.value.as_ref(), b"m0");
    for d in &ds {
        h.ack(d.tag);
    }
    let t = h.m.commit(h.now).unwrap();
    h.drive();
    assert!(h.events.contains(&Event::Committed {
        ticket: t,
        offsets: vec![(0, 3)]
    }));
    assert_eq!(
        h.broker.committed[&0], 3,
        "commit is the next offset to read"
    );
}

#[test]
fn resumes_from_the_stored_commit_instead_of_ignoring_it() {
    let mut logs = std::collections::BTreeMap::new();
    logs.insert(
        ("t".to_owned(), 0),
        (0..6)
            .map(|i| Record::from_value(format!("m{i}")))
            .collect(),
    );
    let committed = [(0u32, 4u64)].into_iter().collect();
    let mut h = harness_with(config("t"), logs, committed);
    h.advance(Duration::from_millis(50));
    let offsets: Vec<u64> = h.deliveries().iter().map(|d| d.tag.offset).collect();
    assert_eq!(offsets, [4, 5]);
    assert_eq!(h.m.committed_offset(0), Some(4));
}

#[test]
fn start_position_applies_only_without_a_commit() {
    for (start, expect) in [
        (StartPosition::Earliest, 0),
        (StartPosition::Latest, 5),
        (StartPosition::Offset(3), 3),
    ] {
        let mut c = config("t");
        c.start_position = start;
        let mut logs = std::collections::BTreeMap::new();
        logs.insert(
            ("t".to_owned(), 0),
            (0..5)
                .map(|i| Record::from_value(format!("m{i}")))
                .collect(),
        );
        let mut h = harness_with(c, logs, Default::default());
        h.advance(Duration::from_millis(50));
        h.produce(0, 2);
        h.advance(Duration::from_millis(200));
        let first = h.deliveries().first().map(|d| d.tag.offset);
        assert_eq!(first, Some(expect), "{start:?}");
    }
}

#[test]
fn never_refetches_from_the_commit_point() {
    let mut h = started(config("t"), 10);
    assert_eq!(h.deliveries().len(), 10);
    // The application holds every message; time passes.
    h.advance(Duration::from_secs(30));
    assert!(
        h.deliveries().is_empty(),
        "no redelivery of outstanding messages"
    );
    let offsets: Vec<u64> = h.fetches_sent().iter().map(|f| f.fetch_offset).collect();
    let first_past = offsets.iter().position(|&o| o == 10).unwrap();
    assert!(
        offsets[first_past..].iter().all(|&o| o == 10),
        "fetching goes on from the position"
    );
}

#[test]
fn out_of_order_acks_never_pass_a_gap() {
    let mut h = started(config("t"), 3);
    let ds = h.deliveries();
    h.ack(ds[2].tag);
    h.ack(ds[1].tag);
    assert_eq!(h.m.settle_watermark(0), Some(0));
    h.m.commit(h.now).unwrap();
    h.drive();
    assert!(h.commits_sent().is_empty(), "nothing committable yet");
    h.ack(ds[0].tag);
    assert_eq!(h.m.settle_watermark(0), Some(3));
}

/// A burst of acks as one input settles each as `ack` would, refuses the bad ones with the
/// reason (and loses nothing else), and runs the work step once: the freed credit delivers
/// in one pass and the full batch commits.
#[test]
fn ack_many_settles_a_burst_as_one_input_and_refuses_what_ack_would() {
    let mut c = config("t");
    c.max_unacked = 5;
    c.ack_batch_size = 5;
    c.ack_batch_min_interval = Duration::ZERO;
    let mut h = started(c, 12);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 5, "credit bounds the deliveries");
    let unknown = DeliveryTag {
        offset: 999,
        ..ds[0].tag
    };
    let mut burst: Vec<DeliveryTag> = ds.iter().map(|d| d.tag).collect();
    burst.insert(2, unknown);
    burst.push(ds[0].tag);
    let refused = h.m.ack_many(h.now, burst);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0].0, unknown);
    assert_eq!(refused[1].0, ds[0].tag, "acked twice");
    assert_eq!(h.m.settle_watermark(0), Some(5));
    assert_eq!(h.m.metrics().acked, 5);
    h.drive();
    let next = h.deliveries();
    assert_eq!(
        next.iter().map(|d| d.tag.offset).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9],
        "the freed credit delivers the next five"
    );
    assert_eq!(
        h.broker.committed.get(&0),
        Some(&5),
        "the full batch committed"
    );
    assert!(
        h.m.ack_many(h.now, []).is_empty(),
        "an empty burst is no input"
    );
}

/// `ack_many` is `ack` applied tag by tag: a burst that switches partitions, with runs of
/// one partition, a tag twice, an attempt that was never delivered, an offset and a partition
/// that do not exist, settles and refuses exactly what a twin machine with the same
/// deliveries, acked one tag at a time, settles and refuses.
#[test]
fn ack_many_settles_and_refuses_as_acking_each_tag_in_turn() {
    let twin = || {
        let mut c = config("t");
        c.partitions = vec![0, 1];
        let mut h = harness(c);
        h.produce(0, 6);
        h.produce(1, 6);
        h.advance(Duration::from_millis(200));
        h
    };
    let (mut a, mut b) = (twin(), twin());
    let ds = a.deliveries();
    let tags = |ds: &[Message]| ds.iter().map(|d| d.tag).collect::<Vec<_>>();
    assert_eq!(tags(&ds), tags(&b.deliveries()), "twins");
    assert_eq!(ds.len(), 12);
    let tag = |partition, offset| {
        ds.iter()
            .map(|d| d.tag)
            .find(|t| t.partition == partition && t.offset == offset)
            .unwrap()
    };
    let burst = vec![
        tag(0, 0),
        tag(0, 1),
        tag(1, 0),
        tag(0, 2),
        tag(0, 2),
        DeliveryTag {
            attempt: 2,
            ..tag(0, 3)
        },
        tag(0, 4),
        DeliveryTag {
            offset: 99,
            ..tag(0, 5)
        },
        DeliveryTag {
            partition: 7,
            ..tag(1, 1)
        },
        tag(1, 2),
        tag(1, 1),
        tag(0, 3),
    ];
    let refused = a.m.ack_many(a.now, burst.clone());
    let one_by_one: Vec<(DeliveryTag, UsageError)> = burst
        .iter()
        .filter_map(|&t| b.m.ack(b.now, t).err().map(|error| (t, error)))
        .collect();
    assert_eq!(refused, one_by_one);
    assert_eq!(
        refused.iter().map(|(t, _)| t.offset).collect::<Vec<_>>(),
        [2, 3, 99, 1],
        "{refused:?}"
    );
    for partition in [0, 1] {
        assert_eq!(
            a.m.settle_watermark(partition),
            b.m.settle_watermark(partition)
        );
    }
    assert_eq!(a.m.settle_watermark(0), Some(5));
    assert_eq!(a.m.settle_watermark(1), Some(3));
    assert_eq!(a.m.metrics(), b.m.metrics());
    assert_eq!(a.m.metrics().acked, 8);
}

#[test]
fn commits_are_batched_by_size_then_by_timeout_one_in_flight() {
    let mut c = config("t");
    c.ack_batch_size = 10;
    c.ack_batch_timeout = Duration::from_secs(1);
    // Every full batch commits (the pacing by time has a test of its own below).
    c.ack_batch_min_interval = Duration::ZERO;
    c.fetch_size = 100;
    let mut h = started(c, 35);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 35);
    // The first batch also learns the group's generation (join and leave) on the way.
    for d in &ds[..10] {
        h.ack(d.tag);
    }
    assert_eq!(h.commits_sent().len(), 1);
    assert_eq!(h.broker.committed[&0], 10);
    h.route = Route::Hold;
    for d in &ds[10..30] {
        h.ack(d.tag);
    }
    assert_eq!(
        h.commits_sent().len(),
        2,
        "one commit in flight, the newer watermark waits"
    );
    assert_eq!(h.commits_sent()[1].offsets.values().next(), Some(&20));
    h.route = Route::Answer;
    h.answer_all_held();
    assert_eq!(
        h.commits_sent().len(),
        3,
        "superseding commit sent after the first"
    );
    assert_eq!(h.commits_sent()[2].offsets.values().next(), Some(&30));
    for d in &ds[30..] {
        h.ack(d.tag);
    }
    assert_eq!(
        h.commits_sent().len(),
        3,
        "5 settlements: below the batch size"
    );
    h.advance(Duration::from_millis(999));
    assert_eq!(h.commits_sent().len(), 3);
    h.advance(Duration::from_millis(2));
    assert_eq!(h.commits_sent().len(), 4, "batch timeout flushed");
    assert_eq!(h.broker.committed[&0], 35);
    assert!(h.m.metrics().max_batch >= 10);
}

#[test]
fn full_batches_commit_no_more_often_than_the_min_interval() {
    let mut c = config("t");
    c.ack_batch_size = 10;
    c.ack_batch_timeout = Duration::from_secs(1);
    c.ack_batch_min_interval = Duration::from_millis(100);
    let mut h = started(c, 100);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 100);
    for d in &ds[..50] {
        h.ack(d.tag);
    }
    assert_eq!(
        h.commits_sent().len(),
        1,
        "the first full batch commits at once"
    );
    h.advance(Duration::from_millis(99));
    assert_eq!(h.commits_sent().len(), 1, "four more full batches wait");
    h.advance(Duration::from_millis(1));
    assert_eq!(
        h.commits_sent().len(),
        2,
        "the interval passed: one commit of them all"
    );
    assert_eq!(h.broker.committed[&0], 50);
    // A slow stream: a full batch long after the last commit goes at once.
    h.advance(Duration::from_millis(500));
    for d in &ds[50..60] {
        h.ack(d.tag);
    }
    assert_eq!(h.commits_sent().len(), 3);
    assert_eq!(h.broker.committed[&0], 60);
    // Less than a batch still commits within the timeout.
    h.ack(ds[60].tag);
    h.advance(Duration::from_millis(999));
    assert_eq!(h.commits_sent().len(), 3);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.commits_sent().len(), 4, "the batch timeout flushed");
    assert_eq!(h.broker.committed[&0], 61);
}

#[test]
fn retries_count_attempts_back_off_and_stop_after_success() {
    let mut c = config("t");
    c.retry_backoff_base = Duration::from_millis(100);
    c.retry_backoff_max = Duration::from_secs(10);
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    assert_eq!(d.tag.attempt, 1);
    h.nack(d.tag, Some(Duration::from_millis(500)));
    h.advance(Duration::from_millis(499));
    assert!(h.deliveries().is_empty(), "not before the explicit delay");
    h.advance(Duration::from_millis(1));
    let d2 = h.deliveries().remove(0);
    assert_eq!((d2.tag.offset, d2.tag.attempt), (0, 2));
    assert_eq!(d2.record, d.record);
    // The old tag is stale now.
    assert_eq!(
        h.m.ack(h.now, d.tag),
        Err(UsageError::StaleDelivery {
            partition: 0,
            offset: 0
        })
    );
    h.ack(d2.tag);
    h.advance(Duration::from_secs(60));
    assert!(
        h.deliveries().is_empty(),
        "retries_re_queued_after_success: no redelivery after an ack"
    );
    assert_eq!(h.m.metrics().retried, 1);
}

#[test]
fn renacks_continue_the_chain_and_end_in_the_dead_letter_topic() {
    let mut c = config("t");
    c.max_retry_attempts = 2;
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 2);
    let mut attempts = Vec::new();
    loop {
        h.advance(Duration::from_secs(60));
        let ds = h.deliveries();
        let Some(d) = ds.iter().find(|d| d.tag.offset == 0) else {
            break;
        };
        attempts.push(d.tag.attempt);
        h.nack(d.tag, None);
        if let Some(d1) = ds.iter().find(|d| d.tag.offset == 1) {
            h.ack(d1.tag);
        }
    }
    assert_eq!(
        attempts,
        [1, 2, 3],
        "attempts grow and stop at max_retry_attempts + 1"
    );
    let dlq = &h.broker.logs[&("dlq".to_owned(), 0)];
    assert_eq!(dlq.len(), 1);
    let header = |k: &str| String::from_utf8(dlq[0].header(k).unwrap().to_vec()).unwrap();
    assert_eq!(header(dead_letter_headers::ORIGINAL_TOPIC), "t");
    assert_eq!(header(dead_letter_headers::ORIGINAL_PARTITION), "0");
    assert_eq!(header(dead_letter_headers::ORIGINAL_OFFSET), "0");
    assert_eq!(header(dead_letter_headers::ATTEMPTS), "3");
    assert_eq!(header(dead_letter_headers::CONSUMER_GROUP), "g");
    assert!(header(dead_letter_headers::LAST_REASON).contains("retries exhausted"));
    assert_eq!(dlq[0].value.as_ref(), b"m0");
    assert_eq!(
        h.count(|e| matches!(
            e,
            Event::DeadLettered {
                offset: 0,
                attempts: 3,
                ..
            }
        )),
        1
    );
}

#[test]
fn a_dead_lettered_offset_settles_and_the_partition_moves_on() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 3);
    let ds = h.deliveries();
    h.route = Route::Hold;
    h.reject(ds[0].tag, "bad payload");
    h.ack(ds[1].tag);
    h.ack(ds[2].tag);
    assert_eq!(
        h.m.settle_watermark(0),
        Some(0),
        "not settled before the produce is confirmed"
    );
    h.route = Route::Answer;
    h.answer_all_held();
    assert_eq!(h.m.settle_watermark(0), Some(3));
    h.m.commit(h.now).unwrap();
    h.drive();
    assert_eq!(h.broker.committed[&0], 3);
    assert_eq!(h.m.metrics().dead_lettered, 1);
}

#[test]
fn one_dead_letter_produce_in_flight_batching_the_rest() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 6);
    let ds = h.deliveries();
    h.route = Route::Hold;
    for d in &ds {
        h.reject(d.tag, "poison");
    }
    assert_eq!(h.produces_sent().len(), 1, "one producer request at a time");
    assert_eq!(h.produces_sent()[0].records.len(), 1);
    h.route = Route::Answer;
    h.answer_all_held();
    let produces = h.produces_sent();
    let batches: Vec<usize> = produces.iter().map(|p| p.records.len()).collect();
    assert_eq!(batches.iter().sum::<usize>(), 6, "{batches:?}");
    assert!(
        batches.len() < 6 && batches[1] > 1,
        "the other five went in batches (as many as fit one packet): {batches:?}"
    );
    assert_eq!(h.m.settle_watermark(0), Some(6));
}

#[test]
fn dead_letter_batches_fit_one_packet_or_hold_one_record() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = harness(c);
    let sizes = [50, 50, 50, 3_000, 10];
    h.broker.logs.insert(
        ("t".into(), 0),
        sizes
            .iter()
            .map(|&n| Record::from_value(vec![7u8; n]))
            .collect(),
    );
    h.advance(Duration::from_millis(100));
    // Held: the first goes alone, the other four wait and are batched.
    h.route = Route::Hold;
    for d in h.deliveries() {
        h.reject(d.tag, "poison");
    }
    h.route = Route::Answer;
    h.answer_all_held();
    let produces = h.produces_sent();
    let batches: Vec<usize> = produces.iter().map(|p| p.records.len()).collect();
    let dead_lettered: usize = batches.iter().sum();
    assert_eq!(dead_lettered, 5, "{batches:?}");
    assert!(
        batches.iter().any(|&n| n > 1),
        "small records share a batch: {batches:?}"
    );
    for p in &produces {
        let size = codec::request_frame_len(&Request::Produce((*p).clone()));
        assert!(
            size <= PACKET_REQUEST_FRAME || p.records.len() == 1,
            "a batch of {} records in {size} bytes",
            p.records.len()
        );
    }
    assert_eq!(h.m.settle_watermark(0), Some(5));
}

#[test]
fn a_long_reason_is_cut_not_a_reason_to_stall() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    // A backtrace's worth, ending in multi-byte characters around the cut.
    let reason = format!("{}{}", "x".repeat(254), "é".repeat(10_000));
    h.reject(d.tag, &reason);
    assert_eq!(
        h.m.settle_watermark(0),
        Some(1),
        "dead-lettered, not stalled"
    );
    let produces = h.produces_sent();
    assert_eq!(produces.len(), 1);
    let size = codec::request_frame_len(&Request::Produce(produces[0].clone()));
    assert!(size <= PACKET_REQUEST_FRAME, "{size}");
    let header = produces[0].records[0]
        .header(dead_letter_headers::LAST_REASON)
        .unwrap();
    let text = std::str::from_utf8(header).unwrap();
    assert!(
        text.len() <= dead_letter_headers::MAX_REASON_LEN,
        "{}",
        text.len()
    );
    assert!(reason.contains(text.trim_start_matches("rejected: ")));
    assert!(text.ends_with('x') || text.ends_with('é'), "{text:?}");
}

#[test]
fn poison_without_a_dead_letter_topic_is_discarded_explicitly() {
    let mut c = config("t");
    c.max_retry_attempts = 0;
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    h.nack(d.tag, None);
    assert_eq!(
        h.count(|e| matches!(
            e,
            Event::Discarded {
                offset: 0,
                attempts: 1,
                ..
            }
        )),
        1
    );
    assert_eq!(h.m.metrics().discarded, 1);
    assert_eq!(h.m.settle_watermark(0), Some(1));
}

#[test]
fn oversized_poison_stalls_the_partition_visibly() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = harness(c);
    h.broker
        .logs
        .insert(("t".into(), 0), vec![Record::from_value(vec![7u8; 9000])]);
    h.advance(Duration::from_millis(100));
    let d = h.deliveries().remove(0);
    h.reject(d.tag, "too big");
    assert!(h.produces_sent().is_empty(), "nothing over 8 KiB is sent");
    assert!(h.events.iter().any(|e| matches!(
        e,
        Event::Stalled {
            partition: 0,
            offset: 0,
            reason: StallReason::DeadLetterTooLarge { .. }
        }
    )));
    assert_eq!(h.m.health(), Health::Degraded);
    assert_eq!(h.m.settle_watermark(0), Some(0), "never silently settled");
}

#[test]
fn circuit_breaker_is_called_opens_and_recovers() {
    let mut c = config("t");
    c.failure_threshold = 3;
    c.recovery_timeout = Duration::from_secs(5);
    c.half_open_max_probes = 1;
    let mut h = harness(c);
    h.route = Route::Fail;
    while h.m.breaker_state() != BreakerState::Open {
        h.advance(Duration::from_millis(100));
        assert!(h.m.metrics().requests_failed <= 3, "opens at the threshold");
    }
    assert_eq!(h.m.health(), Health::Unhealthy);
    let sent = h.sent.len();
    h.advance(Duration::from_millis(10));
    assert_eq!(h.sent.len(), sent, "nothing sent while open");
    h.route = Route::Answer;
    h.produce(0, 2);
    h.advance(Duration::from_secs(6));
    assert_eq!(h.m.breaker_state(), BreakerState::Closed);
    assert!(h.events.iter().any(|e| *e
        == Event::BreakerChanged {
            from: BreakerState::Open,
            to: BreakerState::HalfOpen
        }));
    assert!(h.events.iter().any(|e| *e
        == Event::BreakerChanged {
            from: BreakerState::HalfOpen,
            to: BreakerState::Closed
        }));
    assert_eq!(h.deliveries().len(), 2, "consumption resumes");
}

#[test]
fn handler_nacks_never_count_as_broker_failures() {
    let mut c = config("t");
    c.failure_threshold = 1;
    c.max_retry_attempts = 10;
    let mut h = started(c, 1);
    for _ in 0..5 {
        let d = h.deliveries().remove(0);
        h.nack(d.tag, Some(Duration::from_millis(1)));
        h.advance(Duration::from_millis(5));
    }
    assert_eq!(h.m.breaker_state(), BreakerState::Closed);
}

#[test]
fn acks_settle_while_open_and_commit_when_closed_again() {
    let mut c = config("t");
    c.failure_threshold = 1;
    c.recovery_timeout = Duration::from_secs(5);
    c.half_open_max_probes = 1;
    let mut h = started(c, 2);
    let ds = h.deliveries();
    h.route = Route::Fail;
    h.advance(Duration::from_millis(200));
    assert_eq!(h.m.breaker_state(), BreakerState::Open);
    h.ack(ds[0].tag);
    h.ack(ds[1].tag);
    assert_eq!(h.m.settle_watermark(0), Some(2));
    h.m.commit(h.now).unwrap();
    h.route = Route::Answer;
    h.advance(Duration::from_secs(6));
    assert_eq!(h.broker.committed.get(&0), Some(&2));
}

#[test]
fn cache_eviction_is_counted_and_the_retry_refetches() {
    let mut c = config("t");
    c.cache_max_entries = Some(1);
    let mut h = started(c, 3);
    let ds = h.deliveries();
    for d in &ds {
        h.nack(d.tag, Some(Duration::from_millis(10)));
    }
    assert!(
        h.m.metrics().cache_evictions >= 2,
        "evictions are counted, not silent"
    );
    h.advance(Duration::from_millis(100));
    let mut again = h.deliveries();
    again.sort_by_key(|d| d.tag.offset);
    assert_eq!(again.len(), 3);
    for (a, b) in ds.iter().zip(&again) {
        assert_eq!(a.record, b.record, "the refetched record is the original");
        assert_eq!(b.tag.attempt, 2);
    }
    assert!(h.m.metrics().refetches >= 2);
}

#[test]
fn cache_ttl_is_read_and_expiry_refetches() {
    let mut c = config("t");
    c.cache_ttl = Duration::from_secs(1);
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    h.nack(d.tag, Some(Duration::from_secs(5)));
    h.advance(Duration::from_secs(6));
    let again = h.deliveries();
    assert_eq!(again.len(), 1);
    assert!(h.m.metrics().cache_evictions >= 1);
    assert_eq!(h.m.metrics().refetches, 1);
}

#[test]
fn deliveries_and_prefetch_are_bounded() {
    let mut c = config("t");
    c.max_unacked = 5;
    c.fetch_size = 10;
    let mut h = started(c, 100);
    h.advance(Duration::from_secs(5));
    assert_eq!(h.deliveries().len(), 5, "credit stops deliveries");
    let m = h.m.metrics();
    assert!(m.buffered <= 10, "{m:?}");
    assert_eq!(m.in_flight_deliveries, 5);
}

#[test]
fn a_fully_delivered_buffer_is_refilled_without_waiting_for_an_ack() {
    let mut c = config("t");
    c.fetch_size = 5;
    c.max_unacked = 100;
    let mut h = started(c, 20);
    h.advance(Duration::from_millis(100));
    assert_eq!(
        h.deliveries().len(),
        20,
        "the application holds every message, unacked"
    );
}

#[test]
fn a_fetch_that_fits_nothing_waits_for_room_instead_of_spinning() {
    let mut c = config("t");
    c.prefetch_bytes = 100;
    c.max_unacked = 1;
    let mut h = harness(c);
    let topic_log = h.broker.logs.entry(("t".into(), 0)).or_default();
    for _ in 0..5 {
        topic_log.push(Record::from_value(vec![0u8; 40])); // 65 bytes encoded
    }
    h.advance(Duration::from_secs(1));
    let held = h.deliveries();
    assert_eq!(held.len(), 1, "the application holds one message");
    let fetches = h.fetches_sent().len();
    assert!(fetches <= 4, "{fetches} fetches while nothing fits: a spin");
    h.ack(held[0].tag);
    h.advance(Duration::from_millis(100));
    assert_eq!(h.deliveries().len(), 1, "room freed: fetching resumes");
}

/// Consumes and commits 10 messages, seeks back to 5 and commits that: the broker stores 5,
/// but the answer never reaches the machine.
fn committed_then_sought_back_with_the_answer_lost(c: ConsumerConfig) -> Harness {
    let mut h = started(c, 10);
    for d in h.deliveries() {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.drive();
    assert_eq!(h.broker.committed[&0], 10);
    h.m.seek(h.now, 0, 5).unwrap();
    h.route = Route::Hold;
    h.m.commit(h.now).unwrap();
    h.drive();
    let at = h
        .held
        .iter()
        .position(|t| matches!(t.request, Request::CommitOffset(_)))
        .unwrap();
    let lost = h.held.remove(at).unwrap();
    let _ = h.answer(&lost.request);
    assert_eq!(h.broker.committed[&0], 5);
    h
}

#[test]
fn a_commit_with_an_unknown_outcome_is_stated_again_after_a_seek() {
    let mut c = config("t");
    c.request_timeout = Duration::from_secs(1);
    let mut h = committed_then_sought_back_with_the_answer_lost(c);
    h.advance(Duration::from_millis(1500));
    h.route = Route::Answer;
    h.answer_all_held();
    h.advance(Duration::from_secs(1));
    for d in h.deliveries() {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.advance(Duration::from_secs(5));
    assert_eq!(
        h.broker.committed[&0], 10,
        "the watermark is committed again, not assumed"
    );
}

#[test]
fn the_unsettled_span_per_partition_is_capped() {
    let mut c = config("t");
    c.max_unsettled_per_partition = 8;
    c.max_unacked = 100;
    let mut h = started(c, 50);
    h.advance(Duration::from_secs(5));
    let ds = h.deliveries();
    assert_eq!(ds.len(), 8);
    h.ack(ds[1].tag);
    h.advance(Duration::from_secs(1));
    assert!(
        h.deliveries().is_empty(),
        "offset 0 unsettled: the span is still full"
    );
    h.ack(ds[0].tag);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.deliveries().len(), 2);
}

#[test]
fn pause_holds_buffered_messages_and_resume_releases_them() {
    let mut c = config("t");
    c.max_unacked = 2;
    let mut h = started(c, 5);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 2);
    h.m.pause(h.now, &[0]).unwrap();
    h.ack(ds[0].tag);
    h.ack(ds[1].tag);
    let fetches = h.fetches_sent().len();
    h.advance(Duration::from_secs(5));
    assert!(h.deliveries().is_empty());
    assert_eq!(h.fetches_sent().len(), fetches, "no fetch while paused");
    h.m.resume(h.now, &[0]).unwrap();
    h.drive();
    let after: Vec<u64> = h.deliveries().iter().map(|d| d.tag.offset).collect();
    assert_eq!(after, [2, 3], "buffered messages were kept");
    assert_eq!(h.m.pause(h.now, &[9]), Err(UsageError::UnknownPartition(9)));
}

#[test]
fn seek_resets_the_partition_and_stales_old_deliveries() {
    let mut h = started(config("t"), 10);
    let ds = h.deliveries();
    h.m.seek(h.now, 0, 7).unwrap();
    h.drive();
    h.advance(Duration::from_millis(100));
    let after: Vec<u64> = h.deliveries().iter().map(|d| d.tag.offset).collect();
    assert_eq!(after, [7, 8, 9]);
    assert_eq!(
        h.m.ack(h.now, ds[0].tag),
        Err(UsageError::StaleDelivery {
            partition: 0,
            offset: 0
        })
    );
    assert_eq!(h.m.metrics().in_flight_deliveries, 3);
    assert_eq!(h.m.settle_watermark(0), Some(7));
}

#[test]
fn usage_errors_are_clear_and_change_nothing() {
    let mut h = started(config("t"), 2);
    let ds = h.deliveries();
    let mut forged = ds[0].tag;
    forged.offset = 99;
    assert_eq!(
        h.m.ack(h.now, forged),
        Err(UsageError::UnknownDelivery {
            partition: 0,
            offset: 99
        })
    );
    forged.partition = 3;
    forged.epoch = 0;
    assert_eq!(
        h.m.ack(h.now, forged).unwrap_err().to_string(),
        "partition 3 is not assigned"
    );
    h.ack(ds[1].tag);
    assert_eq!(
        h.m.ack(h.now, ds[1].tag),
        Err(UsageError::NotOutstanding {
            partition: 0,
            offset: 1
        })
    );
    assert_eq!(h.m.settle_watermark(0), Some(0));
    assert_eq!(h.m.seek(h.now, 5, 0), Err(UsageError::UnknownPartition(5)));
}

#[test]
fn durations_too_long_for_an_instant_mean_never_not_a_panic() {
    // `Instant + Duration::MAX` panics; the machine cuts such a deadline to a century.
    let mut c = config("t");
    c.ack_batch_size = 10;
    c.ack_batch_timeout = Duration::MAX;
    c.ack_batch_min_interval = Duration::MAX;
    c.request_timeout = Duration::MAX;
    c.drain_timeout = Duration::MAX;
    c.retry_backoff_max = Duration::MAX;
    c.empty_fetch_backoff_max = Duration::MAX;
    c.recovery_timeout = Duration::MAX;
    c.half_open_max_wait = Duration::MAX;
    c.cache_ttl = Duration::MAX;
    let mut h = started(c, 30);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 30);
    h.nack(ds[0].tag, Some(Duration::MAX));
    for d in &ds[1..] {
        h.ack(d.tag);
    }
    h.advance(Duration::from_secs(3600));
    assert!(
        h.deliveries().is_empty(),
        "a Duration::MAX retry delay is never"
    );
    assert_eq!(h.m.metrics().acked, 29);
    assert!(h.commits_sent().is_empty(), "offset 0 waits for its retry");
    // Closing does not wait a century for the retry, and leaves offset 0 uncommitted.
    h.m.close(h.now);
    h.drive();
    assert!(h.m.is_closed());
    assert_eq!(h.broker.committed.get(&0).copied().unwrap_or(0), 0);
}

#[test]
fn empty_fetches_back_off() {
    let mut c = config("t");
    c.empty_fetch_backoff_min = Duration::from_millis(10);
    c.empty_fetch_backoff_max = Duration::from_millis(80);
    let mut h = harness(c);
    h.advance(Duration::from_secs(1));
    let n = h.fetches_sent().len();
    // 10, 20, 40, 80, 80, ... ms: about 15 fetches a second at most, not one per pump.
    assert!((5..=20).contains(&n), "{n} fetches in one idle second");
}

#[test]
fn late_responses_to_expired_requests_are_ignored() {
    let mut c = config("t");
    c.request_timeout = Duration::from_secs(1);
    let mut h = harness(c);
    h.answer_all_held();
    h.produce(0, 3);
    h.route = Route::Hold;
    h.advance(Duration::from_millis(200));
    assert!(!h.held.is_empty());
    h.advance(Duration::from_secs(2));
    assert!(h.count(|e| matches!(e, Event::RequestFailed { .. })) >= 1);
    // Answer the stale fetch now: it must not deliver anything.
    let stale = h.held.pop_front().unwrap();
    let r = h.answer(&stale.request);
    h.m.handle_response(h.now, stale.id, r);
    h.drive();
    assert!(h.deliveries().is_empty());
    h.route = Route::Answer;
    h.answer_all_held();
    h.advance(Duration::from_secs(5));
    assert_eq!(
        h.deliveries()
            .iter()
            .map(|d| d.tag.offset)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[test]
fn malformed_and_error_responses_are_failures_not_panics() {
    let mut h = harness(config("t"));
    h.route = Route::Hold;
    h.advance(Duration::from_millis(100));
    let t = h.held.pop_front().unwrap();
    h.m.handle_response(h.now, t.id, Ok(LeaveGroupResponse { error_code: 0 }.into()));
    h.drive();
    assert_eq!(h.m.metrics().requests_failed, 1);
    h.advance(Duration::from_secs(1));
    if let Some(t) = h.held.pop_front() {
        h.m.handle_response(
            h.now,
            t.id,
            Err(TransportError::Broker("Partition not found: t:0".into())),
        );
    }
    h.drive();
    assert_eq!(h.m.metrics().requests_failed, 2);
    h.m.handle_response(
        h.now,
        RequestId(424242),
        Ok(CommitOffsetResponse { error_code: 0 }.into()),
    );
    h.drive();
    assert_eq!(h.m.metrics().requests_failed, 2, "an unknown id is ignored");
}

#[test]
fn close_drains_flushes_dead_letters_then_commits_last() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    c.drain_timeout = Duration::from_secs(5);
    let mut h = started(c, 4);
    let ds = h.deliveries();
    h.ack(ds[0].tag);
    h.m.close(h.now);
    h.drive();
    assert_eq!(h.m.close_phase(), Some(ClosePhase::Draining));
    h.m.close(h.now); // idempotent
    h.route = Route::Hold;
    h.reject(ds[1].tag, "poison");
    h.ack(ds[2].tag);
    h.ack(ds[3].tag);
    assert_eq!(h.m.close_phase(), Some(ClosePhase::FlushingDeadLetters));
    h.route = Route::Answer;
    h.answer_all_held();
    assert!(h.m.is_closed());
    assert_eq!(
        h.broker.committed[&0], 4,
        "every ack made before close is committed"
    );
    let phases: Vec<ClosePhase> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Closing(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [
            ClosePhase::Draining,
            ClosePhase::FlushingDeadLetters,
            ClosePhase::FinalCommit,
            ClosePhase::Closed
        ]
    );
    assert_eq!(h.events.last(), Some(&Event::Closed));
    assert_eq!(h.m.ack(h.now, ds[0].tag), Err(UsageError::Closed));
    let sent = h.sent.len();
    h.advance(Duration::from_secs(60));
    assert_eq!(h.sent.len(), sent, "nothing is sent after Closed");
}

#[test]
fn close_leaves_unacked_deliveries_uncommitted_after_the_drain_deadline() {
    let mut c = config("t");
    c.drain_timeout = Duration::from_secs(2);
    let mut h = started(c, 3);
    let ds = h.deliveries();
    h.ack(ds[0].tag);
    h.ack(ds[2].tag);
    h.m.close(h.now);
    h.drive();
    h.advance(Duration::from_secs(3));
    assert!(h.m.is_closed());
    assert_eq!(
        h.broker.committed[&0], 1,
        "offset 1 was never settled: redelivered to the next member"
    );
}

#[test]
fn commit_maps_are_split_into_one_packet_frames() {
    let mut c = config(&"t".repeat(200));
    c.partitions = (0..100).collect();
    let mut h = harness(c);
    for p in 0..100 {
        h.produce(p, 1);
    }
    h.advance(Duration::from_millis(200));
    for d in h.deliveries() {
        h.ack(d.tag);
    }
    let t = h.m.commit(h.now).unwrap();
    h.drive();
    // `commit()` is answered by the last part only: the earlier parts left offsets unstored.
    let tickets: Vec<u64> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Committed { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .collect();
    assert!(tickets.len() >= 20, "{tickets:?}");
    assert_eq!(tickets.last(), Some(&t));
    assert!(
        tickets[..tickets.len() - 1].iter().all(|&x| x == 0),
        "{tickets:?}"
    );
    let commits = h.commits_sent();
    assert!(
        commits.len() >= 20,
        "100 entries of 220 bytes need twenty one-packet frames, not {}",
        commits.len()
    );
    let total: usize = commits.iter().map(|c| c.offsets.len()).sum();
    assert_eq!(total, 100);
    for c in commits {
        let size = codec::request_frame_len(&Request::CommitOffset(c.clone()));
        assert!(size <= PACKET_REQUEST_FRAME, "{size}");
    }
    assert!((0..100).all(|p| h.broker.committed[&p] == 1));
}

#[test]
fn lag_reports_high_watermark_commit_position_and_age() {
    let mut h = started(config("t"), 10);
    let ds = h.deliveries();
    for d in &ds[..4] {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.drive();
    h.produce(0, 5);
    h.advance(Duration::from_secs(2));
    let lag = h.m.lag(h.now)[0];
    assert_eq!(lag.high_watermark, Some(15));
    assert_eq!(lag.committed, Some(4));
    assert_eq!(lag.lag, 11);
    assert_eq!(lag.position, 15);
    assert_eq!(lag.position_lag, 0);
    assert!(lag.oldest_unsettled_age.unwrap() >= Duration::from_secs(2));
}

#[test]
fn bad_configs_are_rejected() {
    let mut c = config("t");
    c.ack_batch_size = 0;
    assert_eq!(
        ConsumerMachine::new(c, std::time::Instant::now()).unwrap_err(),
        ConfigError::Zero("ack_batch_size")
    );
    let mut c = config("t");
    c.cache_max_entries = Some(0);
    assert!(c.validate().is_err());
    let mut c = config("t");
    c.request_timeout = Duration::ZERO;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "request_timeout must be greater than zero"
    );
    let mut c = config("t");
    c.dead_letter_queue = Some("t".into());
    assert_eq!(c.validate(), Err(ConfigError::DeadLetterIsSource));
    let mut c = config("t");
    c.partitions = vec![1, 1];
    assert_eq!(c.validate(), Err(ConfigError::DuplicatePartition(1)));
    // The driver sizes queues by `max_unacked`: usize::MAX used to panic in `build()`
    // (capacity overflow), and a large value to abort on the allocation.
    let mut c = config("t");
    c.max_unacked = ConsumerConfig::MAX_UNACKED;
    assert_eq!(c.validate(), Ok(()));
    c.max_unacked = ConsumerConfig::MAX_UNACKED + 1;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "max_unacked is too large"
    );
    c.max_unacked = usize::MAX;
    assert_eq!(c.validate(), Err(ConfigError::TooLarge("max_unacked")));
    // A request naming one partition must fit the broker's 8 KiB read of a request.
    let name = "n".repeat(ConsumerConfig::MAX_NAME_LEN);
    let mut c = config(&name);
    c.consumer_group = name.clone();
    c.dead_letter_queue = Some("d".repeat(ConsumerConfig::MAX_NAME_LEN));
    assert_eq!(c.validate(), Ok(()));
    c.topic.push('n');
    assert_eq!(c.validate(), Err(ConfigError::TooLarge("topic")));
    let mut c = config("t");
    c.consumer_group = format!("{name}g");
    assert_eq!(c.validate(), Err(ConfigError::TooLarge("consumer_group")));
    let mut c = config("t");
    c.dead_letter_queue = Some(format!("{name}d"));
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "dead_letter_queue is too large"
    );
}

#[test]
fn fetches_of_several_partitions_never_bring_back_more_than_the_buffer_takes() {
    let mut c = config("t");
    c.partitions = vec![0, 1, 2];
    c.fetch_size = 2;
    c.max_unacked = 1;
    let mut h = harness(c);
    for p in 0..3 {
        h.produce(p, 50);
    }
    h.advance(Duration::from_millis(200));
    let mut from = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let held = h.deliveries();
        assert_eq!(held.len(), 1, "one delivery at a time");
        from.insert(held[0].tag.partition);
        h.ack(held[0].tag);
    }
    let fetches = h.fetches_sent().len();
    // Before the fix every ack sent a fetch for each of the three partitions, and two of the
    // three answers were dropped: 180 fetches for 60 messages.
    assert!(fetches <= 70, "{fetches} fetches for 60 messages");
    assert_eq!(from.len(), 3, "partitions take turns: {from:?}");
}

/// The kinds of the requests sent so far, without fetches.
fn group_requests(h: &Harness) -> Vec<RequestKind> {
    h.sent
        .iter()
        .map(Request::kind)
        .filter(|k| !matches!(k, RequestKind::Fetch | RequestKind::FetchOffset))
        .collect()
}

#[test]
fn a_manual_assignment_creates_its_group_and_learns_the_generation_before_committing() {
    let mut h = started(config("t"), 10);
    assert_eq!(h.broker.generation, None, "the broker knows no group yet");
    for d in h.deliveries() {
        h.ack(d.tag);
    }
    let t = h.m.commit(h.now).unwrap();
    h.drive();
    use RequestKind::*;
    assert_eq!(group_requests(&h), [JoinGroup, LeaveGroup, CommitOffset]);
    let join = h.sent.iter().find_map(|r| match r {
        Request::JoinGroup(j) => Some(j.clone()),
        _ => None,
    });
    assert_eq!(join.unwrap().member_id, "", "a new member");
    assert_eq!(
        h.commits_sent()[0].generation_id,
        1,
        "the joined generation"
    );
    assert_eq!(h.broker.committed[&0], 10);
    assert!(h.events.contains(&Event::Committed {
        ticket: t,
        offsets: vec![(0, 10)]
    }));
    assert!(h.m.uncommitted_offsets().is_empty());
}

#[test]
fn a_manual_commit_to_a_group_the_restarted_broker_forgot_is_retried() {
    let mut c = config("t");
    c.failure_threshold = 1;
    let mut h = started(c, 10);
    let ds = h.deliveries();
    for d in &ds[..4] {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.drive();
    assert_eq!(h.broker.committed[&0], 4);
    // The broker restarts: the group and its commits are gone, and commits answer 16.
    h.broker.generation = None;
    h.broker.committed.clear();
    h.events.clear();
    for d in &ds[4..] {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.drive();
    use RequestKind::*;
    assert_eq!(
        group_requests(&h),
        [
            JoinGroup,
            LeaveGroup,
            CommitOffset,
            CommitOffset,
            JoinGroup,
            LeaveGroup,
            CommitOffset
        ]
    );
    assert_eq!(
        h.broker.committed.get(&0),
        Some(&10),
        "stored under the new group"
    );
    assert_eq!(
        h.m.breaker_state(),
        BreakerState::Closed,
        "group state, not broker health"
    );
    assert!(
        !h.events
            .iter()
            .any(|e| matches!(e, Event::CommitFailed { .. })),
        "a generation that had worked is learned again silently: {:?}",
        h.events
    );
}

#[test]
fn a_manual_commit_under_a_moved_generation_learns_it_again() {
    let mut h = started(config("t"), 10);
    let ds = h.deliveries();
    h.ack(ds[0].tag);
    h.m.commit(h.now).unwrap();
    h.drive();
    assert_eq!(h.commits_sent()[0].generation_id, 1);
    // Another member joined (and left) meanwhile: generation 2.
    h.broker.generation = Some(2);
    for d in &ds[1..] {
        h.ack(d.tag);
    }
    h.m.commit(h.now).unwrap();
    h.drive();
    let generations: Vec<u64> = h.commits_sent().iter().map(|c| c.generation_id).collect();
    assert_eq!(
        generations,
        [1, 1, 3],
        "refused under 1, stored under the relearned 3"
    );
    assert_eq!(h.broker.committed[&0], 10);
}

/// Answers every held request; a LeaveGroup lets another member move the generation on.
fn answer_held_with_others_joining(h: &mut Harness) -> u32 {
    let mut leaves = 0;
    while let Some(request) = h.answer_held() {
        if let Request::LeaveGroup(_) = request {
            leaves += 1;
            h.broker.generation = h.broker.generation.map(|g| g + 1);
        }
    }
    leaves
}

#[test]
fn a_manual_assignment_sharing_its_group_reports_refusals_and_learns_again_with_backoff() {
    let mut c = config("t");
    c.retry_backoff_base = Duration::from_millis(100);
    c.retry_backoff_max = Duration::from_secs(2);
    c.drain_timeout = Duration::from_secs(10);
    let mut h = started(c, 10);
    for d in h.deliveries() {
        h.ack(d.tag);
    }
    let t = h.m.commit(h.now).unwrap();
    // Other members move the generation on after every leave of ours: 22 forever.
    h.route = Route::Hold;
    let mut joins = 0;
    for _ in 0..200 {
        h.drive();
        joins += answer_held_with_others_joining(&mut h);
        h.advance(Duration::from_millis(100));
    }
    assert_eq!(h.broker.committed.get(&0), None);
    assert!(
        h.events.contains(&Event::CommitFailed {
            ticket: t,
            error: CommitError::Rejected { code: 22 }
        }),
        "{:?}",
        h.events
    );
    assert_eq!(h.m.breaker_state(), BreakerState::Closed);
    // 20 s of refusals: learning again waits for a backoff of up to 2 s each time.
    assert!((5..=60).contains(&joins), "{joins} joins in 20 s");
    assert_eq!(h.m.uncommitted_offsets(), [(0, 10)]);
    // The close gives up at its deadline, saying the offsets are not committed.
    h.m.close(h.now);
    for _ in 0..1000 {
        if h.m.is_closed() {
            break;
        }
        h.drive();
        answer_held_with_others_joining(&mut h);
        h.advance(Duration::from_millis(100));
    }
    assert!(h.m.is_closed(), "close bounded by its deadline");
    assert!(h.events.iter().any(|e| matches!(
        e,
        Event::CommitFailed {
            error: CommitError::CloseDeadline,
            ..
        }
    )));
    assert_eq!(h.m.uncommitted_offsets(), [(0, 10)]);
}

#[test]
fn a_commit_of_unknown_outcome_is_forgotten_even_if_a_seek_came_between() {
    let mut c = config("t");
    c.request_timeout = Duration::from_secs(1);
    let mut h = committed_then_sought_back_with_the_answer_lost(c);
    // Seek forward to 10 again while that commit's outcome is unknown, then it times out.
    h.m.seek(h.now, 0, 10).unwrap();
    h.route = Route::Answer;
    h.advance(Duration::from_secs(5));
    h.answer_all_held();
    h.m.commit(h.now).unwrap();
    h.advance(Duration::from_secs(5));
    assert_eq!(h.broker.committed[&0], 10, "the watermark is stated again");
}

#[test]
fn fetches_ask_for_what_the_buffer_takes_not_fetch_max_bytes() {
    let mut c = config("t");
    c.fetch_size = 10;
    c.max_unacked = 1000;
    let mut h = started(c, 500);
    let record = Record::from_value("m100").encoded_len() as u32;
    // Once records came back (fetches at offset 0 know nothing of their size yet).
    let later: Vec<(u64, u32)> = h
        .fetches_sent()
        .iter()
        .filter(|f| f.fetch_offset > 0)
        .map(|f| (f.fetch_offset, f.max_bytes))
        .collect();
    assert!(!later.is_empty());
    for (offset, max_bytes) in later {
        // Ten records and a little slack, never the 1 MiB default budget.
        assert!(
            max_bytes <= 14 * record,
            "fetch at {offset}: {max_bytes} bytes for ten records of {record}"
        );
    }
    assert_eq!(h.deliveries().len(), 500, "and everything still arrives");
}

#[test]
fn fetches_of_many_partitions_carry_batches_not_single_records() {
    let mut c = config("t");
    c.partitions = (0..100).collect();
    let mut h = harness(c);
    for p in 0..100 {
        h.produce(p, 40);
    }
    let mut acked = 0;
    for _ in 0..10_000 {
        h.advance(Duration::from_millis(1));
        for d in h.deliveries() {
            h.ack(d.tag);
            acked += 1;
        }
        if acked == 4_000 {
            break;
        }
    }
    assert_eq!(acked, 4_000, "every message delivered within the bound");
    let fetches = h.fetches_sent().len();
    // Every freed buffer slot used to start a fetch sized for one record: about one fetch
    // per message.
    assert!(fetches <= 1_000, "{fetches} fetches for 4,000 messages");
}

/// `poll_deliveries` hands out what `poll_event` would, in the same order: the run of
/// deliveries before the next other event, which `poll_event` then returns.
#[test]
fn poll_deliveries_takes_the_deliveries_poll_event_would_in_order() {
    use rustmq_consumer_testkit::Peer as _;
    use std::collections::VecDeque;

    let now = std::time::Instant::now();
    let outputs = |bulk: bool| -> Vec<Event> {
        let mut broker = common::MiniBroker::default();
        let log = (0..20)
            .map(|i| Record::from_value(format!("m{i:02}")))
            .collect();
        broker.logs.insert(("t".to_owned(), 0), log);
        let mut cfg = config("t");
        // Two records a fetch: several answers, so deliveries and other events interleave.
        cfg.fetch_max_bytes = 2 * Record::from_value("m00").encoded_len() as u32;
        let mut m = ConsumerMachine::new(cfg, now).unwrap();
        // Answer one round of requests at a time. A commit asked for after the first answer
        // sends a JoinGroup (for the generation it commits under) beside the next fetch; that
        // one fails, so a `RequestFailed` event falls between two answers' deliveries.
        for round in 0..20 {
            let sent: Vec<Transmit> = std::iter::from_fn(|| m.poll_transmit()).take(100).collect();
            if sent.is_empty() {
                break;
            }
            for t in sent {
                let answer = match t.request {
                    Request::JoinGroup(_) => Err(TransportError::ConnectionLost("test".into())),
                    request => broker.answer(now, request),
                };
                m.handle_response(now, t.id, answer);
            }
            if round == 1 {
                m.commit(now).unwrap();
            }
        }
        let mut out = Vec::new();
        for _ in 0..100 {
            if bulk {
                let mut run = VecDeque::new();
                let n = m.poll_deliveries(&mut run);
                assert_eq!(n, run.len());
                out.extend(run.into_iter().map(Event::Deliver));
            }
            match m.poll_event() {
                Some(Event::Deliver(_)) if bulk => panic!("a delivery left behind a run"),
                Some(event) => out.push(event),
                None => return out,
            }
        }
        panic!("the machine never went quiet");
    };
    let one_by_one = outputs(false);
    let offsets: Vec<Option<u64>> = one_by_one
        .iter()
        .map(|e| match e {
            Event::Deliver(m) => Some(m.tag.offset),
            _ => None,
        })
        .collect();
    // Some event sits between two deliveries.
    assert!(
        offsets
            .windows(3)
            .any(|w| w[0].is_some() && w[1].is_none() && w[2].is_some()),
        "deliveries on both sides of another event: {offsets:?}"
    );
    assert_eq!(outputs(true), one_by_one);
}

/// How [`fetch_ahead_run`] answers each round's Fetch requests.
#[derive(Clone, Copy)]
enum Answering {
    /// As sent.
    InOrder,
    /// Last sent first (the fetch ahead before the one in front of it).
    Reversed,
    /// The first Fetch of every other round brings back half of what it would.
    FirstShort,
    /// The first Fetch of every other round brings back half as much again as it asked for.
    FirstLong,
    /// Every other round, last sent first, and the first Fetch fails (after the fetch ahead
    /// of it landed).
    FirstFails,
}

/// A consumer of `n` records in each of `partitions` partitions against the simulated broker
/// (its real `max_bytes` accounting), every delivery acked, each round of requests answered as
/// `how` says. Returns each partition's delivered offsets in order, and the most Fetch
/// requests of one partition one round sent.
fn fetch_ahead_run(partitions: u32, n: usize, how: Answering) -> (Vec<Vec<u64>>, usize) {
    use rustmq_consumer_testkit::{broker_with, Peer as _};

    let now = std::time::Instant::now();
    let mut broker = broker_with("t", partitions, n);
    let mut cfg = config("t");
    cfg.partitions = (0..partitions).collect();
    let mut m = ConsumerMachine::new(cfg, now).unwrap();
    let mut delivered = vec![Vec::new(); partitions as usize];
    let (mut total, mut most, mut settled_rounds) = (0, 0, 0);
    for round in 0..1_000 {
        // Past any fetch backoff.
        let now = now + Duration::from_secs(round);
        m.handle_timeout(now);
        let mut sent: Vec<Transmit> = std::iter::from_fn(|| m.poll_transmit()).take(100).collect();
        // A few rounds past the last record, for any delivered twice.
        if total >= n * partitions as usize {
            settled_rounds += 1;
            if settled_rounds > 3 {
                return (delivered, most);
            }
        }
        let mut fetches = vec![0; partitions as usize];
        for t in &sent {
            if let Request::Fetch(f) = &t.request {
                fetches[f.partition_id as usize] += 1;
            }
        }
        most = fetches.into_iter().fold(most, usize::max);
        if matches!(how, Answering::Reversed)
            || (matches!(how, Answering::FirstFails) && round % 2 == 1)
        {
            sent.reverse();
        }
        let fails = sent
            .iter()
            .rev()
            .find(|t| matches!(t.request, Request::Fetch(_)))
            .map(|t| t.id)
            .filter(|_| matches!(how, Answering::FirstFails) && round % 2 == 1);
        let mut first = true;
        for t in sent {
            let answer = match (t.request, how) {
                (Request::Fetch(mut f), Answering::FirstShort | Answering::FirstLong)
                    if std::mem::take(&mut first) && round % 2 == 1 =>
                {
                    let long = matches!(how, Answering::FirstLong);
                    if long {
                        f.max_bytes = f.max_bytes.saturating_mul(3) / 2;
                    }
                    let mut answer = broker.answer(now, Request::Fetch(f));
                    if let (Ok(Response::Fetch(r)), false) = (&mut answer, long) {
                        r.records.truncate(r.records.len().div_ceil(2));
                    }
                    answer
                }
                _ if fails == Some(t.id) => Err(TransportError::ConnectionLost("test".into())),
                (request, _) => broker.answer(now, request),
            };
            m.handle_response(now, t.id, answer);
        }
        while let Some(event) = m.poll_event() {
            if let Event::Deliver(d) = event {
                let DeliveryTag {
                    partition, offset, ..
                } = d.tag;
                assert_eq!(
                    d.record.value,
                    format!("p{partition}-m{offset}").as_bytes(),
                    "{partition}/{offset}"
                );
                delivered[partition as usize].push(offset);
                total += 1;
                m.ack(now, d.tag).unwrap();
            }
        }
    }
    panic!("{n} records of each of {partitions} partitions not delivered in 1,000 rounds: {total}");
}

/// [`fetch_ahead_run`] of 20,000 records answered `how`: a fetch went out ahead of the one in
/// flight, and every offset was delivered once, in order.
fn every_offset_once_with_a_fetch_ahead(how: Answering) {
    let (delivered, most) = fetch_ahead_run(1, 20_000, how);
    assert_eq!(most, 2, "a fetch ahead of the one in flight");
    assert!(
        delivered[0].iter().copied().eq(0..20_000),
        "every offset once, in order"
    );
}

#[test]
fn a_fetch_ahead_answered_first_is_delivered_after_the_one_before_it() {
    every_offset_once_with_a_fetch_ahead(Answering::Reversed);
}

#[test]
fn a_short_answer_drops_the_fetch_ahead_of_it_and_loses_nothing() {
    every_offset_once_with_a_fetch_ahead(Answering::FirstShort);
}

#[test]
fn a_long_answer_is_not_delivered_twice_from_the_fetch_ahead_of_it() {
    every_offset_once_with_a_fetch_ahead(Answering::FirstLong);
}

#[test]
fn a_failed_fetch_drops_the_answer_ahead_of_it_and_loses_nothing() {
    every_offset_once_with_a_fetch_ahead(Answering::FirstFails);
}

/// Records of varying size (10 to 409 payload bytes, in no order): an answer brings a few
/// records more or fewer than its fetch reserved, and a fetch ahead asked from the exact end of
/// a short one would be dropped. Asked a little before it, the one ahead overlaps instead: the
/// answers bring back little more than the records delivered.
#[test]
fn records_of_varying_size_seldom_drop_the_fetch_ahead() {
    use rustmq_consumer_testkit::{Peer as _, SimBroker};

    const N: usize = 50_000;
    let size = |i: usize| 10 + (i.wrapping_mul(2_654_435_761) >> 7) % 400;
    let now = std::time::Instant::now();
    let mut broker = SimBroker::new();
    broker.create_topic("t", 1);
    broker
        .produce_values("t", 0, (0..N).map(|i| vec![b'x'; size(i)]))
        .expect("produce");
    let mut cfg = config("t");
    cfg.partitions = vec![0];
    let mut m = ConsumerMachine::new(cfg, now).unwrap();
    let (mut delivered, mut fetched, mut most) = (0u64, 0usize, 0usize);
    for round in 0..10_000u64 {
        if delivered == N as u64 {
            assert_eq!(most, 2, "a fetch ahead of the one in flight");
            // Each answer past a gap is a whole answer fetched again; an overlap a few records.
            assert!(
                fetched <= N + N / 20,
                "{fetched} records fetched for {N} delivered"
            );
            return;
        }
        let now = now + Duration::from_secs(round);
        m.handle_timeout(now);
        let sent: Vec<Transmit> = std::iter::from_fn(|| m.poll_transmit()).take(100).collect();
        most = most.max(
            sent.iter()
                .filter(|t| matches!(t.request, Request::Fetch(_)))
                .count(),
        );
        for t in sent {
            let answer = broker.answer(now, t.request);
            if let Ok(Response::Fetch(f)) = &answer {
                fetched += f.records.len();
            }
            m.handle_response(now, t.id, answer);
        }
        while let Some(event) = m.poll_event() {
            if let Event::Deliver(d) = event {
                assert_eq!(d.tag.offset, delivered, "every offset once, in order");
                assert_eq!(d.record.value.len(), size(d.tag.offset as usize));
                delivered += 1;
                m.ack(now, d.tag).unwrap();
            }
        }
    }
    panic!("{N} records not delivered in 10,000 rounds: {delivered}");
}

#[test]
fn partitions_fetching_side_by_side_send_no_fetch_ahead() {
    let (delivered, most) = fetch_ahead_run(2, 20_000, Answering::InOrder);
    assert_eq!(most, 1, "a fetch ahead while another partition fetches");
    for offsets in delivered {
        assert!(
            offsets.into_iter().eq(0..20_000),
            "every offset once, in order"
        );
    }
}
