//! The simulated broker's cold tier against PROTOCOL.md ("How `max_bytes` is counted"): a
//! Fetch from a cold segment ends at the segment's end; its answer is cached per (partition,
//! `fetch_offset`) and given again to a Fetch at the same offset whatever its `max_bytes`; a
//! Fetch at another offset misses; hot records are read as before; a miss costs the cold-read
//! latency through `SimTransport`, a hit does not; and a default consumer reads a partition
//! whose first part is cold exactly once.
//!
//! Latencies are measured on the runtime's (virtual or paused) clock, never on wall time.
// `cold_segments` is a list of ranges: `[0..COLD]` is meant as a list of one.
#![allow(clippy::single_range_in_vec_init)]

#[macro_use]
mod virtual_and_tokio;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rustmq_consumer_core::protocol::{FetchRequest, FetchResponse, Request, Response};
use rustmq_consumer_core::{
    timeout, ConsumerBuilder, ConsumerConfig, Runtime, Transport, TransportError,
};
use rustmq_consumer_testkit::{
    ColdReads, SharedBroker, SimBroker, SimTransport, DEFAULT_RECORD_OVERHEAD,
};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
/// Every value is 10 bytes: a record costs `DEFAULT_RECORD_OVERHEAD` + 10 = 360 units.
const VALUE_LEN: u32 = 10;
/// Records tiered to cold, then records produced hot after them (the scripted tests).
const COLD: u64 = 1_000;
const HOT: u64 = 500;
/// What a cache miss costs (the real broker's ~50 ms for a 9 MB segment).
const COLD_LATENCY: Duration = Duration::from_millis(50);

/// `max_bytes` for exactly `n` records.
fn worth(n: u32) -> u32 {
    n * (DEFAULT_RECORD_OVERHEAD + VALUE_LEN)
}

fn produce(broker: &mut SimBroker, from: u64, count: u64) {
    let first = broker
        .produce_values(TOPIC, 0, (from..from + count).map(|i| format!("{i:010}")))
        .expect("the topic exists");
    assert_eq!(first, from, "offsets are contiguous");
}

/// A broker whose partition 0 holds `COLD` cold records (one segment), then `HOT` hot ones.
fn tiered() -> SimBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    produce(&mut broker, 0, COLD);
    let segment = broker.tier_to_cold(TOPIC, 0).expect("the partition exists");
    assert_eq!(segment, 0..COLD);
    produce(&mut broker, COLD, HOT);
    broker
}

/// A Fetch of partition 0 from `offset`.
fn fetch_request(offset: u64, max_bytes: u32) -> Request {
    FetchRequest {
        topic: TOPIC.to_owned(),
        partition_id: 0,
        fetch_offset: offset,
        max_bytes,
        timeout_ms: 100,
    }
    .into()
}

fn fetch_at(broker: &mut SimBroker, offset: u64, max_bytes: u32) -> FetchResponse {
    match broker.handle(Instant::now(), fetch_request(offset, max_bytes)) {
        Ok(Response::Fetch(r)) => r,
        other => panic!("a Fetch answer expected, got {other:?}"),
    }
}

/// The offsets of an answer from `offset`, checked to be the stored records in order.
fn answered(broker: &SimBroker, offset: u64, response: &FetchResponse) -> std::ops::Range<u64> {
    let end = offset + response.records.len() as u64;
    for (i, record) in response.records.iter().enumerate() {
        let expected = format!("{:010}", offset + i as u64);
        assert_eq!(
            record.value,
            expected.as_bytes(),
            "record {i} of the answer"
        );
    }
    assert_eq!(response.error_code, 0);
    assert_eq!(
        Some(response.high_watermark),
        broker.high_watermark(TOPIC, 0),
        "the watermark is the current one"
    );
    offset..end
}

fn reads(misses: u64, hits: u64) -> ColdReads {
    ColdReads { misses, hits }
}

#[test]
fn a_broker_has_no_cold_tier_unless_asked() {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    produce(&mut broker, 0, COLD);
    assert!(broker.cold_segments(TOPIC, 0).is_empty());
    assert_eq!(broker.cold_read_latency(), Duration::ZERO);
    for _ in 0..2 {
        let r = fetch_at(&mut broker, 10, worth(5));
        assert_eq!(answered(&broker, 10, &r), 10..15);
        assert_eq!(broker.take_answer_delay(), Duration::ZERO);
    }
    assert_eq!(broker.cold_reads(), ColdReads::default());
}

#[test]
fn a_cold_answer_ends_at_the_segment_end() {
    let mut broker = tiered().with_cold_read_latency(COLD_LATENCY);
    assert_eq!(broker.cold_segments(TOPIC, 0), [0..COLD]);
    // Within the segment, the ordinary rule: the first record always, then while it fits.
    let r = fetch_at(&mut broker, 0, worth(11));
    assert_eq!(answered(&broker, 0, &r), 0..11);
    let r = fetch_at(&mut broker, 20, 0);
    assert_eq!(answered(&broker, 20, &r), 20..21);
    // max_bytes for 300 records from 900: the 100 up to the segment's end, no hot record.
    let r = fetch_at(&mut broker, 900, worth(300));
    assert_eq!(answered(&broker, 900, &r), 900..COLD);
    assert_eq!(
        broker.take_answer_delay(),
        COLD_LATENCY,
        "a miss owes a download"
    );
    assert_eq!(broker.take_answer_delay(), Duration::ZERO, "taken once");
    // The last cold record alone.
    let r = fetch_at(&mut broker, COLD - 1, worth(300));
    assert_eq!(answered(&broker, COLD - 1, &r), COLD - 1..COLD);
    assert_eq!(broker.cold_reads(), reads(4, 0));
}

#[test]
fn an_answer_never_crosses_into_the_next_segment() {
    let mut broker = tiered();
    // The hot records become a second segment; later records are hot.
    assert_eq!(
        broker.tier_to_cold(TOPIC, 0).expect("exists"),
        COLD..COLD + HOT
    );
    assert_eq!(
        broker.tier_to_cold(TOPIC, 0).expect("exists"),
        COLD + HOT..COLD + HOT
    );
    produce(&mut broker, COLD + HOT, 100);
    assert_eq!(
        broker.cold_segments(TOPIC, 0),
        [0..COLD, COLD..COLD + HOT],
        "nothing new: no empty segment"
    );
    let r = fetch_at(&mut broker, COLD - 10, worth(1_000));
    assert_eq!(answered(&broker, COLD - 10, &r), COLD - 10..COLD);
    let r = fetch_at(&mut broker, COLD, worth(1_000));
    assert_eq!(answered(&broker, COLD, &r), COLD..COLD + HOT);
    let r = fetch_at(&mut broker, COLD + HOT, worth(1_000));
    assert_eq!(
        answered(&broker, COLD + HOT, &r),
        COLD + HOT..COLD + HOT + 100
    );
    assert_eq!(broker.cold_reads(), reads(2, 0));
}

#[test]
fn a_repeated_offset_gets_the_cached_answer_whatever_its_max_bytes() {
    let mut broker = tiered().with_cold_read_latency(COLD_LATENCY);
    let first = fetch_at(&mut broker, 100, worth(20));
    assert_eq!(answered(&broker, 100, &first), 100..120);
    assert_eq!(broker.take_answer_delay(), COLD_LATENCY);
    // Room for 50: the cached 20 (fewer than it allows), at no download.
    let again = fetch_at(&mut broker, 100, worth(50));
    assert_eq!(answered(&broker, 100, &again), 100..120);
    assert_eq!(again.records, first.records);
    assert_eq!(
        broker.take_answer_delay(),
        Duration::ZERO,
        "a hit owes nothing"
    );
    // Room for 2: still the cached 20 (more than it allows).
    let again = fetch_at(&mut broker, 100, worth(2));
    assert_eq!(answered(&broker, 100, &again), 100..120);
    // The same from another offset, the other way round.
    let r = fetch_at(&mut broker, 500, 0);
    assert_eq!(answered(&broker, 500, &r), 500..501);
    let r = fetch_at(&mut broker, 500, worth(300));
    assert_eq!(answered(&broker, 500, &r), 500..501);
    // A cut answer is cached cut.
    let r = fetch_at(&mut broker, 950, worth(300));
    assert_eq!(answered(&broker, 950, &r), 950..COLD);
    let r = fetch_at(&mut broker, 950, worth(10));
    assert_eq!(answered(&broker, 950, &r), 950..COLD);
    assert_eq!(broker.cold_reads(), reads(3, 4));
    assert_eq!(broker.cold_reads().total(), 7);
}

#[test]
fn a_fresh_offset_misses() {
    let mut broker = tiered().with_cold_read_latency(COLD_LATENCY);
    let r = fetch_at(&mut broker, 100, worth(20));
    assert_eq!(answered(&broker, 100, &r), 100..120);
    // One past it, and from where it ended: each a download of its own.
    for offset in [101, 120, 99] {
        let r = fetch_at(&mut broker, offset, worth(20));
        assert_eq!(answered(&broker, offset, &r), offset..offset + 20);
        assert_eq!(broker.take_answer_delay(), COLD_LATENCY, "offset {offset}");
    }
    assert_eq!(broker.cold_reads(), reads(4, 0));
}

#[test]
fn hot_records_after_the_segment_are_unaffected() {
    let mut broker = tiered().with_cold_read_latency(COLD_LATENCY);
    let mut plain = SimBroker::new();
    plain.create_topic(TOPIC, 1);
    produce(&mut plain, 0, COLD + HOT);
    for (offset, n) in [(COLD, 300), (COLD, 10), (COLD + 7, 1_000), (COLD + HOT, 10)] {
        let r = fetch_at(&mut broker, offset, worth(n));
        let expected = fetch_at(&mut plain, offset, worth(n));
        assert_eq!(r, expected, "hot fetch at {offset} for {n}");
        assert_eq!(broker.take_answer_delay(), Duration::ZERO);
    }
    assert_eq!(broker.cold_reads(), ColdReads::default());
    // Hot records produced after the tiering and the partition's records are all there.
    assert_eq!(broker.records(TOPIC, 0).len() as u64, COLD + HOT);
}

#[test]
fn a_restart_keeps_the_tier_and_loses_the_cache() {
    let mut broker = tiered();
    let r = fetch_at(&mut broker, 100, worth(20));
    assert_eq!(answered(&broker, 100, &r), 100..120);
    broker.restart();
    assert_eq!(broker.cold_segments(TOPIC, 0), [0..COLD]);
    assert_eq!(broker.cold_reads(), reads(1, 0), "the counts are kept");
    // The cache is gone: the same offset misses and is answered by its own max_bytes.
    let r = fetch_at(&mut broker, 100, worth(30));
    assert_eq!(answered(&broker, 100, &r), 100..130);
    assert_eq!(broker.cold_reads(), reads(2, 0));
    // The hot records stay hot until tiered.
    let r = fetch_at(&mut broker, COLD, worth(30));
    assert_eq!(answered(&broker, COLD, &r), COLD..COLD + 30);
    assert_eq!(broker.cold_reads(), reads(2, 0));
}

#[test]
fn tiering_an_unknown_partition_is_an_error() {
    let mut broker = tiered();
    let error = broker.tier_to_cold(TOPIC, 1).expect_err("no partition 1");
    assert_eq!(error.0, "Partition not found: orders:1");
    assert!(broker.tier_to_cold("nope", 0).is_err());
    assert!(broker.cold_segments("nope", 0).is_empty());
}

/// Through `SimTransport`: a miss is answered after the transport's latency and the cold-read
/// latency, a hit and a hot read after the transport's latency only.
async fn a_miss_takes_the_cold_latency_and_a_hit_does_not<R: Runtime + Clone>(rt: R) {
    const LATENCY: Duration = Duration::from_millis(2);
    let broker = SharedBroker::new(tiered().with_cold_read_latency(COLD_LATENCY));
    let transport = SimTransport::new(broker.clone(), rt.clone()).with_latency(LATENCY);
    let timed = |offset: u64, max_bytes: u32| {
        let (rt, transport) = (rt.clone(), transport.clone());
        async move {
            let sent = rt.now();
            let answer = timeout(
                &rt,
                Duration::from_secs(10),
                transport.request(fetch_request(offset, max_bytes)),
            )
            .await
            .expect("answered in time");
            let Ok(Response::Fetch(r)) = answer else {
                panic!("a Fetch answer expected, got {answer:?}");
            };
            (rt.now() - sent, r.records.len() as u64)
        }
    };
    assert_eq!(
        timed(100, worth(20)).await,
        (LATENCY + COLD_LATENCY, 20),
        "miss"
    );
    assert_eq!(timed(100, worth(50)).await, (LATENCY, 20), "hit");
    assert_eq!(
        timed(120, worth(50)).await,
        (LATENCY + COLD_LATENCY, 50),
        "fresh offset"
    );
    assert_eq!(timed(COLD, worth(50)).await, (LATENCY, 50), "hot");
    assert_eq!(broker.lock().cold_reads(), reads(2, 1));
    // Without a transport latency, a miss still takes the cold latency.
    let bare = SimTransport::new(broker.clone(), rt.clone());
    let sent = rt.now();
    let request = FetchRequest {
        topic: TOPIC.to_owned(),
        partition_id: 0,
        fetch_offset: 170,
        max_bytes: worth(1),
        timeout_ms: 100,
    };
    bare.request(request.into()).await.expect("an answer");
    assert_eq!(rt.now() - sent, COLD_LATENCY);
}

/// One Fetch of the consumer's topic as the transport saw it.
#[derive(Debug, Clone, Copy)]
struct Fetched {
    offset: u64,
    returned: u64,
}

/// A `SimTransport` that records every Fetch and how many records it got.
#[derive(Clone)]
struct Recording {
    inner: SimTransport,
    fetches: Arc<Mutex<Vec<Fetched>>>,
}

#[async_trait]
impl Transport for Recording {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        let offset = match &request {
            Request::Fetch(f) if f.topic == TOPIC => Some(f.fetch_offset),
            _ => None,
        };
        let answer = self.inner.request(request).await;
        if let (Some(offset), Ok(Response::Fetch(r))) = (offset, &answer) {
            self.fetches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Fetched {
                    offset,
                    returned: r.records.len() as u64,
                });
        }
        answer
    }
}

/// A consumer with the default configuration reads a partition whose first 20,000 records
/// are cold (a miss costs 50 ms) and the next 5,000 hot: every offset exactly once, in order.
/// Each cold download is a Fetch at an offset not fetched before; there are no more of them
/// than Fetches into the cold range.
async fn a_default_consumer_reads_cold_then_hot_records_once<R: Runtime + Clone>(rt: R) {
    const COLD_RECORDS: u64 = 20_000;
    const HOT_RECORDS: u64 = 5_000;
    const TOTAL: u64 = COLD_RECORDS + HOT_RECORDS;
    /// Longest one receive may wait on the runtime's clock.
    const GUARD: Duration = Duration::from_secs(60);
    /// Receives allowed: one per record, plus slack for short batches.
    const MAX_RECEIVES: u64 = 2 * TOTAL;

    let mut broker = SimBroker::new().with_cold_read_latency(COLD_LATENCY);
    broker.create_topic(TOPIC, 1);
    produce(&mut broker, 0, COLD_RECORDS);
    assert_eq!(
        broker.tier_to_cold(TOPIC, 0).expect("exists"),
        0..COLD_RECORDS
    );
    produce(&mut broker, COLD_RECORDS, HOT_RECORDS);
    let broker = SharedBroker::new(broker);
    let fetches = Arc::new(Mutex::new(Vec::new()));
    let transport = Recording {
        inner: SimTransport::new(broker.clone(), rt.clone()),
        fetches: Arc::clone(&fetches),
    };
    let started = rt.now();
    let consumer = timeout(
        &rt,
        GUARD,
        ConsumerBuilder::with_runtime(rt.clone())
            .config(ConsumerConfig::new(TOPIC, GROUP))
            .client(transport)
            .build(),
    )
    .await
    .expect("built in time")
    .expect("valid consumer");

    let mut next = 0u64;
    let mut receives = 0u64;
    while next < TOTAL {
        receives += 1;
        assert!(
            receives <= MAX_RECEIVES,
            "{MAX_RECEIVES} receives and only {next} of {TOTAL} records delivered"
        );
        let batch = timeout(&rt, GUARD, consumer.receive_many(1_000))
            .await
            .unwrap_or_else(|| panic!("no delivery within {GUARD:?} at offset {next}"))
            .expect("receive");
        assert!(!batch.is_empty(), "the consumer closed at offset {next}");
        for delivery in batch {
            assert_eq!(
                (delivery.partition(), delivery.offset()),
                (0, next),
                "every offset once, in order"
            );
            assert_eq!(delivery.value().as_ref(), format!("{next:010}").as_bytes());
            next += 1;
            delivery.ack().await.expect("ack");
        }
    }
    let elapsed = rt.now() - started;
    timeout(&rt, GUARD, consumer.close())
        .await
        .expect("closed in time")
        .expect("close");

    let cold = broker.lock().cold_reads();
    let fetches = fetches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let into_cold: Vec<Fetched> = fetches
        .iter()
        .copied()
        .filter(|f| f.offset < COLD_RECORDS)
        .collect();
    let distinct: BTreeSet<u64> = into_cold.iter().map(|f| f.offset).collect();
    let cold_returned: u64 = into_cold.iter().map(|f| f.returned).sum();
    eprintln!(
        "{TOTAL} records ({COLD_RECORDS} cold) in {elapsed:?} on the runtime's clock: {} fetches, \
         {} into the cold range at {} distinct offsets returning {cold_returned} records; \
         cold reads {cold:?}",
        fetches.len(),
        into_cold.len(),
        distinct.len(),
    );
    assert_eq!(
        cold.total(),
        into_cold.len() as u64,
        "every Fetch into the cold range is a cold read"
    );
    assert_eq!(
        cold.misses,
        distinct.len() as u64,
        "one download per distinct cold offset fetched"
    );
    assert!(
        cold.misses >= 1,
        "the cold range was read from the cold tier"
    );
    assert!(
        cold.misses <= into_cold.len() as u64,
        "{} cold misses for {} fetches into the cold range",
        cold.misses,
        into_cold.len()
    );
    assert!(
        elapsed >= COLD_LATENCY * u32::try_from(cold.misses).expect("few misses") / 2,
        "cold downloads took their latency: {elapsed:?} for {} misses",
        cold.misses
    );
}

on_virtual_and_tokio!(
    a_miss_takes_the_cold_latency_and_a_hit_does_not,
    a_default_consumer_reads_cold_then_hot_records_once,
);
