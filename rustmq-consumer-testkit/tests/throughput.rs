//! The default configuration at full speed against the simulated broker (which counts a
//! fetch's `max_bytes` like the real one): fetches sized in the broker's unit, fetch-ahead
//! with records delivered in offset order, commits bounded by time rather than by count, many
//! partitions fetched at once.
//! In memory, on a virtual clock: no assertion depends on how long anything took.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustmq_consumer_core::codec::request_frame_len;
use rustmq_consumer_core::protocol::{Request, Response, TopicPartition, PACKET_REQUEST_FRAME};
use rustmq_consumer_core::{ConsumerConfig, ConsumerMachine, DeliveryTag, Event};
use rustmq_consumer_testkit::{Pump, Route, SimBroker, GROUP, PACKET_PAYLOAD, TOPIC};

/// One fetch as the broker saw it.
#[derive(Debug, Clone, Copy)]
struct Fetched {
    partition: u32,
    offset: u64,
    max_bytes: u32,
    returned: u64,
    high_watermark: u64,
    /// Deliveries of the partition the application had received when the fetch was sent.
    delivered_before: u64,
}

/// A machine with the default configuration (partitions assigned by hand) against a
/// `SimBroker`, and an application that acks every delivery, `per_ack` of virtual time each.
struct Rig {
    m: ConsumerMachine,
    b: SimBroker,
    now: Instant,
    per_ack: Duration,
    fetches: Vec<Fetched>,
    commits: usize,
    /// Circuit breaker transitions seen.
    breaker_changes: usize,
    /// Offsets delivered per partition, in delivery order.
    delivered: BTreeMap<u32, Vec<u64>>,
    pending: VecDeque<DeliveryTag>,
}

impl Rig {
    fn new(b: SimBroker, partitions: u32, per_ack: Duration) -> Self {
        let mut config = ConsumerConfig::new(TOPIC, GROUP);
        config.partitions = (0..partitions).collect();
        let now = Instant::now();
        Self {
            m: ConsumerMachine::new(config, now).unwrap(),
            b,
            now,
            per_ack,
            fetches: Vec::new(),
            commits: 0,
            breaker_changes: 0,
            delivered: BTreeMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn broker(overhead: u32, partitions: u32, records: usize, payload: usize) -> SimBroker {
        let mut b = SimBroker::new().with_record_overhead(overhead);
        b.create_topic(TOPIC, partitions);
        let value = Bytes::from(vec![b'x'; payload]);
        for p in 0..partitions {
            b.produce_values(TOPIC, p, (0..records).map(|_| value.clone()))
                .unwrap();
        }
        b
    }

    /// Answers every request at once, takes every event, acks one delivery; fires the next
    /// timer when nothing else moves. False when nothing at all is left to do.
    fn step(&mut self) -> bool {
        let mut progressed = false;
        while let Some(t) = self.m.poll_transmit() {
            progressed = true;
            let fetch = match &t.request {
                Request::Fetch(f) => Some((f.partition_id, f.fetch_offset, f.max_bytes)),
                Request::CommitOffset(_) => {
                    self.commits += 1;
                    None
                }
                _ => None,
            };
            let answer = self.b.transmit(self.now, t.request);
            if let (Some((partition, offset, max_bytes)), Ok(Response::Fetch(r))) = (fetch, &answer)
            {
                self.fetches.push(Fetched {
                    partition,
                    offset,
                    max_bytes,
                    returned: r.records.len() as u64,
                    high_watermark: r.high_watermark,
                    delivered_before: self.delivered.get(&partition).map_or(0, |d| d.len()) as u64,
                });
            }
            self.m.handle_response(self.now, t.id, answer);
        }
        while let Some(e) = self.m.poll_event() {
            match e {
                Event::Deliver(d) => {
                    self.delivered
                        .entry(d.tag.partition)
                        .or_default()
                        .push(d.tag.offset);
                    self.pending.push_back(d.tag);
                }
                Event::BreakerChanged { .. } => self.breaker_changes += 1,
                _ => {}
            }
        }
        if let Some(tag) = self.pending.pop_front() {
            self.now += self.per_ack;
            self.m.ack(self.now, tag).unwrap();
            return true;
        }
        if progressed {
            return true;
        }
        let Some((at, _)) = self.m.poll_timeout() else {
            return false;
        };
        self.now = self.now.max(at);
        self.m.handle_timeout(self.now);
        true
    }

    /// Steps until every partition's `records` are delivered and committed.
    fn run_until_committed(&mut self, partitions: u32, records: u64) {
        let limit = 4 * records as usize * partitions as usize + 10_000;
        let committed =
            |b: &SimBroker, p| b.committed(GROUP, &TopicPartition::new(TOPIC, p)) == Some(records);
        // Partitions below `done` are committed (a commit never goes back): each step looks
        // at the first one that was not, not at all of them.
        let mut done = 0;
        for _ in 0..limit {
            while done < partitions && committed(&self.b, done) {
                done += 1;
            }
            if done == partitions || !self.step() {
                break;
            }
        }
        for p in 0..partitions {
            assert_eq!(
                self.b.committed(GROUP, &TopicPartition::new(TOPIC, p)),
                Some(records),
                "partition {p} not consumed and committed within {limit} steps"
            );
        }
    }
}

#[test]
fn commits_at_full_speed_are_bounded_by_time_not_count() {
    const RECORDS: u64 = 200_000;
    // An application that takes 2 us per message: 0.4 s of virtual time in all.
    let b = Rig::broker(350, 1, RECORDS as usize, 32);
    let mut rig = Rig::new(b, 1, Duration::from_micros(2));
    rig.run_until_committed(1, RECORDS);
    assert_eq!(rig.delivered[&0].len() as u64, RECORDS);
    // By count alone (a commit per `ack_batch_size` = 100 settlements) this was 2,000.
    assert!(
        rig.commits <= 100,
        "{} commits for {RECORDS} records",
        rig.commits
    );
    assert!(rig.commits >= 2, "the stream was committed on the way");
    // Full fetches: about 1 MiB / 382 = 2,745 records each, not a tenth of that.
    assert!(
        rig.fetches.len() <= 100,
        "{} fetches for {RECORDS} records",
        rig.fetches.len()
    );
}

#[test]
fn fetch_sizing_converges_to_the_broker_unit_within_a_few_fetches() {
    let config = ConsumerConfig::new(TOPIC, GROUP);
    // (record overhead the broker charges, payload bytes)
    for (overhead, payload) in [(350u32, 32usize), (0, 32), (350, 10_000), (0, 10_000)] {
        let cost = u64::from(overhead) + payload as u64;
        let full = (u64::from(config.fetch_max_bytes) / cost).max(1);
        // What a fetch should bring: a full fetch, or half the buffer when a full fetch
        // is more than the buffer takes (fetch-ahead waits for that much room).
        let wire = payload as u64 + 25;
        let buffer = (config.fetch_size as u64)
            .min(config.prefetch_bytes as u64 / wire)
            .min(full);
        let worthwhile = buffer.div_ceil(2).min(full);
        let records = 30 * full.min(config.fetch_size as u64 / 2);
        let b = Rig::broker(overhead, 1, records as usize, payload);
        let mut rig = Rig::new(b, 1, Duration::from_micros(1));
        rig.run_until_committed(1, records);
        let case = format!("overhead {overhead}, payload {payload}");
        let fetches: Vec<Fetched> = rig.fetches.clone();
        assert!(fetches.len() >= 8, "{case}: {} fetches", fetches.len());
        for (i, pair) in fetches.windows(2).enumerate().skip(2) {
            let (f, next) = (pair[0], pair[1]);
            if f.offset + f.returned >= f.high_watermark {
                continue; // the end of the log, not the size asked for, cut this one
            }
            assert!(
                f.returned * 100 >= worthwhile * 98,
                "{case}: fetch {i} brought {} records for {} (max_bytes {}), want >= {worthwhile}",
                f.returned,
                f.max_bytes,
                cost,
            );
            // The buffer took what came: the next fetch asks from where this one ended or,
            // ahead of it, from a 32nd of its records before (the overlap a fetch ahead asks).
            let taken = next.offset - f.offset;
            let overlap = f.returned.div_ceil(32) + 1;
            assert!(
                f.returned - taken <= f.returned / 50 + overlap,
                "{case}: fetch {i} brought {} records and the buffer took {taken}",
                f.returned
            );
        }
    }
}

#[test]
fn fetch_ahead_keeps_each_partition_in_offset_order() {
    const RECORDS: u64 = 20_000;
    let b = Rig::broker(350, 3, RECORDS as usize, 32);
    let mut rig = Rig::new(b, 3, Duration::from_micros(1));
    rig.run_until_committed(3, RECORDS);
    for p in 0..3 {
        let offsets = &rig.delivered[&p];
        assert!(
            offsets.iter().copied().eq(0..RECORDS),
            "partition {p}: every offset once, in order"
        );
        // Fetch-ahead: a fetch went out while the partition's earlier records were still
        // to be delivered (more than `max_unacked` of them behind its offset).
        let ahead = rig
            .fetches
            .iter()
            .filter(|f| f.partition == p && f.offset > f.delivered_before + 1_000)
            .count();
        assert!(
            ahead >= 2,
            "partition {p}: {ahead} fetches ahead of delivery"
        );
    }
}

/// Partitions and records each of the many-partition tests: the `partitions` bench's 1,000.
const MANY: u32 = 1_000;
const EACH: usize = 200;

/// The default config over [`MANY`] partitions assigned by hand, [`EACH`] records in each.
fn many_partitions() -> Pump<SimBroker> {
    let b = Rig::broker(350, MANY, EACH, 32);
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.partitions = (0..MANY).collect();
    Pump::new(b, config, Instant::now())
}

#[test]
fn every_partitions_first_fetch_goes_out_at_once() {
    let mut pump = many_partitions();
    pump.route = Route::HoldIf(|r| matches!(r, Request::Fetch(_)));
    pump.drive();
    let first: BTreeSet<u32> = pump
        .held
        .iter()
        .filter_map(|t| match &t.request {
            Request::Fetch(f) => Some(f.partition_id),
            _ => None,
        })
        .collect();
    // Each reserving a full fetch (about 2,900 records) of the 10,000-record buffer, a few
    // went at a time and the others waited for their answers.
    assert_eq!(
        first.len(),
        MANY as usize,
        "partitions with their first fetch in flight after the first work step"
    );
    assert_eq!(pump.held.len(), MANY as usize, "one fetch per partition");
}

#[test]
fn many_partitions_drain_in_few_fetches_each() {
    let b = Rig::broker(350, MANY, EACH, 32);
    let mut rig = Rig::new(b, MANY, Duration::from_micros(1));
    rig.run_until_committed(MANY, EACH as u64);
    for p in 0..MANY {
        let offsets = &rig.delivered[&p];
        assert!(
            offsets.iter().copied().eq(0..EACH as u64),
            "partition {p}: every offset once, in order"
        );
    }
    // Per partition: a first fetch sized by its share of the buffer and a guessed record
    // cost (2 records here), then one that brings the rest, sized from what the answers
    // taught; no small fetches in between (fetches in flight fill the buffer: nothing is
    // idle while they are). Empty fetches at the end of the log come on top, as time passes.
    let brought = rig.fetches.iter().filter(|f| f.returned > 0).count();
    assert!(
        brought <= 2 * MANY as usize,
        "{brought} fetches brought records for {MANY} partitions of {EACH} records"
    );
}

#[test]
fn many_partitions_start_with_fetch_offsets_of_one_packet() {
    let mut pump = many_partitions();
    pump.route = Route::HoldIf(|r| matches!(r, Request::FetchOffset(_)));
    pump.auto_ack = true;
    pump.drive();
    // The broker reads one read of at most 8 KiB of a request (one FetchOffset of all 1,000
    // is 17 KB), and over a network that read gets the first packet only: the partitions are
    // split over one-packet requests, each asked about once.
    let asked: Vec<Vec<u32>> = pump
        .held
        .iter()
        .map(|t| {
            let size = request_frame_len(&t.request);
            assert!(
                size <= PACKET_REQUEST_FRAME,
                "a FetchOffset of {size} bytes"
            );
            match &t.request {
                Request::FetchOffset(r) => {
                    r.topic_partitions.iter().map(|tp| tp.partition).collect()
                }
                other => panic!("held a {:?}", other.kind()),
            }
        })
        .collect();
    assert!(asked.len() >= 16, "{} FetchOffset requests", asked.len());
    let mut all: Vec<u32> = asked.concat();
    all.sort_unstable();
    assert!(
        all.iter().copied().eq(0..MANY),
        "every partition asked about once"
    );
    // The first answer starts its own partitions only: the others wait for theirs.
    pump.answer_held();
    let fetching = |pump: &Pump<SimBroker>| -> BTreeSet<u32> {
        pump.sent
            .iter()
            .filter_map(|r| match r {
                Request::Fetch(f) => Some(f.partition_id),
                _ => None,
            })
            .collect()
    };
    let first: BTreeSet<u32> = asked[0].iter().copied().collect();
    assert_eq!(
        fetching(&pump),
        first,
        "partitions fetching after the first answer"
    );
    pump.answer_all_held();
    pump.drive();
    let fetch_offsets = pump
        .sent
        .iter()
        .filter(|r| matches!(r, Request::FetchOffset(_)))
        .count();
    assert_eq!(fetch_offsets, asked.len(), "no FetchOffset asked again");
    assert_eq!(
        fetching(&pump).len(),
        MANY as usize,
        "every partition fetching"
    );
}

#[test]
fn many_partitions_start_consume_and_commit_when_the_broker_reads_one_packet() {
    // What the real broker does over a network (packets 300 us apart): a request of more
    // than one packet is read in part and fails. Before the consumer kept its requests to one
    // packet, a 1,000-partition consumer consumed everything there and committed nothing.
    const { assert!(PACKET_REQUEST_FRAME <= PACKET_PAYLOAD) };
    let mut b = Rig::broker(350, MANY, EACH, 32);
    b.set_split_reads(true);
    let mut rig = Rig::new(b, MANY, Duration::from_micros(1));
    let t0 = rig.now;
    rig.run_until_committed(MANY, EACH as u64);
    assert!(
        rig.commits >= MANY as usize / 50,
        "{} commits for {MANY} partitions: about 40 partitions a commit",
        rig.commits
    );
    // Requests sent together share packets, so some straddle two and are cut, as the real
    // broker cut 17 to 33 while 1,000 partitions started: each is retried, and none is the
    // broker failing, so the circuit breaker stays closed (five in a row opened it for a
    // second).
    let cut = rig.m.metrics().requests_failed;
    assert!(cut >= 5, "{cut} requests cut: the start sends many at once");
    assert_eq!(
        rig.breaker_changes, 0,
        "the breaker moved over {cut} cut requests"
    );
    // Counted as the broker failing, the cuts opened the breaker over and over (its probes,
    // sent together, were cut too): 15 hours of virtual time to get through.
    let took = rig.now - t0;
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} of virtual time"
    );
}
