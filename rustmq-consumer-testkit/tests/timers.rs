//! The machine's timer table: every deadline `poll_timeout` offers is handled by
//! `handle_timeout`. Members of one group run against the simulated broker with lost, failed
//! and held requests and an application that acks, nacks, rejects and sits on messages;
//! whenever a member is woken at its earliest deadline, nothing may be left due at that
//! instant afterwards, and across the runs every kind of timer must have fired.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rustmq_consumer_core::*;
use rustmq_consumer_testkit::{SimBroker, SimRng};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const DEAD_LETTERS: &str = "orders-dlq";

/// Every `Reason` the machine can give.
const ALL: [Reason; 13] = [
    Reason::RequestDeadline,
    Reason::AckFlush,
    Reason::Retry,
    Reason::FetchBackoff,
    Reason::DeadLetterRetry,
    Reason::Breaker,
    Reason::CacheTtl,
    Reason::CommitRetry,
    Reason::Close,
    Reason::Heartbeat,
    Reason::SessionExpiry,
    Reason::GroupRetry,
    Reason::Rebalance,
];

fn config(seed: u64) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(TOPIC, GROUP);
    c.seed = seed;
    c.session_timeout = Duration::from_secs(6);
    c.request_timeout = Duration::from_secs(2);
    c.ack_batch_timeout = Duration::from_millis(200);
    c.ack_batch_size = 50;
    c.empty_fetch_backoff_max = Duration::from_millis(200);
    c.cache_ttl = Duration::from_millis(500);
    c.max_retry_attempts = 2;
    c.dead_letter_queue = Some(DEAD_LETTERS.to_owned());
    c.drain_timeout = Duration::from_secs(1);
    c.rebalance_drain_timeout = Duration::from_secs(1);
    c.failure_threshold = 3;
    c.recovery_timeout = Duration::from_millis(500);
    c
}

struct Member {
    m: ConsumerMachine,
    /// Deliveries the application sits on (settled later, or never).
    held: Vec<DeliveryTag>,
}

/// Runs one seed; returns the reasons of every deadline that fired.
fn run(seed: u64) -> BTreeSet<String> {
    let mut rng = SimRng::new(seed);
    let mut broker = SimBroker::with_seed(seed);
    broker.create_topic(TOPIC, 3);
    for p in 0..3 {
        broker
            .produce_values(TOPIC, p, (0..40).map(|i| format!("p{p}-m{i}")))
            .unwrap();
    }
    let start = Instant::now();
    let mut now = start;
    let mut members: Vec<Member> = Vec::new();
    let mut fired = BTreeSet::new();
    let join_at = [Duration::ZERO, Duration::from_secs(3)];
    let close_at = Duration::from_secs(20);
    let dlq_created_at = Duration::from_secs(10);
    let mut steps = 0;
    while now - start < Duration::from_secs(40) {
        steps += 1;
        assert!(
            steps < 200_000,
            "seed {seed}: the run did not finish in 200000 steps"
        );
        let elapsed = now - start;
        if members.len() < join_at.len() && elapsed >= join_at[members.len()] {
            let c = config(seed.wrapping_add(members.len() as u64));
            members.push(Member {
                m: ConsumerMachine::new(c, now).unwrap(),
                held: Vec::new(),
            });
        }
        if elapsed >= dlq_created_at {
            broker.create_topic(DEAD_LETTERS, 1);
        }
        if elapsed >= close_at {
            for member in &mut members {
                member.m.close(now);
            }
        }
        // Quiesce: answer, fail or hold every request; settle or hold every delivery.
        let mut progressed = true;
        let mut rounds = 0;
        while progressed {
            rounds += 1;
            assert!(rounds < 10_000, "seed {seed}: the members never went quiet");
            progressed = false;
            for member in &mut members {
                while let Some(t) = member.m.poll_transmit() {
                    progressed = true;
                    let fate = rng.range(0, 100);
                    if fate < 4 {
                        continue; // lost: its deadline fires
                    }
                    let answer = if fate < 10 {
                        Err(TransportError::ConnectionLost("cut".to_owned()))
                    } else {
                        if fate < 13 {
                            broker.fail_next_commits(1);
                        }
                        broker.transmit(now, t.request)
                    };
                    member.m.handle_response(now, t.id, answer);
                }
                while let Some(event) = member.m.poll_event() {
                    progressed = true;
                    if let Event::Deliver(message) = event {
                        let tag = message.tag;
                        let _ = match rng.range(0, 100) {
                            0..60 => member.m.ack(now, tag),
                            // Handed back as a driver does: the record first.
                            60..75 => {
                                member.m.give_back(now, message);
                                member.m.nack(now, tag, None)
                            }
                            75..80 => {
                                member.m.give_back(now, message);
                                member.m.reject(now, tag, "poison")
                            }
                            _ => {
                                member.held.push(tag);
                                Ok(())
                            }
                        };
                    }
                }
                // Some held deliveries are settled late.
                if !member.held.is_empty() && rng.chance(0.05) {
                    let tag = member.held.remove(0);
                    let _ = member.m.ack(now, tag);
                    progressed = true;
                }
            }
        }
        // Wake the earliest: a member's deadline or the broker's reaper.
        let member_next = members
            .iter()
            .enumerate()
            .filter_map(|(i, member)| member.m.poll_timeout().map(|(at, r)| (at, i, r)))
            .min_by_key(|&(at, i, _)| (at, i));
        let broker_next = broker.poll_timeout();
        let next_join = join_at.get(members.len()).map(|d| start + *d).into_iter();
        let later = [start + dlq_created_at, start + close_at]
            .into_iter()
            .chain(next_join)
            .filter(|t| *t > now)
            .min();
        let wake = [member_next.map(|m| m.0), broker_next, later]
            .into_iter()
            .flatten()
            .min();
        let Some(wake) = wake else {
            break;
        };
        now = now.max(wake);
        if broker_next.is_some_and(|t| t <= now) {
            broker.handle_timeout(now);
        }
        if let Some((at, i, reason)) = member_next.filter(|m| m.0 <= now) {
            let m = &mut members[i].m;
            m.handle_timeout(now);
            fired.insert(format!("{reason:?}"));
            if let Some((again, again_reason)) = m.poll_timeout() {
                assert!(
                    again > now,
                    "seed {seed}: {reason:?} at {at:?} was handled, yet {again_reason:?} is still due at {again:?}"
                );
            }
        }
    }
    fired
}

#[test]
fn every_deadline_poll_timeout_offers_is_handled_by_handle_timeout() {
    let mut fired = BTreeSet::new();
    for seed in 0..24 {
        fired.extend(run(seed));
    }
    let missing: Vec<_> = ALL
        .iter()
        .map(|r| format!("{r:?}"))
        .filter(|r| !fired.contains(r))
        .collect();
    assert!(
        missing.is_empty(),
        "never fired (the runs do not cover them): {missing:?}"
    );
}
