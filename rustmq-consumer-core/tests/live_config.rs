//! Live configuration: `ConsumerMachine::update_config` changes each live setting's behaviour
//! from the next input on, and refuses the fixed ones (or an invalid result) changing nothing.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{config, harness, Harness, HarnessExt as _};
use rustmq_consumer_core::*;
use rustmq_consumer_testkit::Route;

fn started(config: ConsumerConfig, produced: usize) -> Harness {
    let mut h = harness(config);
    h.produce(0, produced);
    h.advance(Duration::from_millis(200));
    h
}

/// Applies `edit` to the configuration in force.
fn update(h: &mut Harness, edit: impl FnOnce(&mut ConsumerConfig)) {
    let mut next = h.m.config().clone();
    edit(&mut next);
    h.m.update_config(h.now, next)
        .unwrap_or_else(|e| panic!("update refused: {e}"));
    h.drive();
}

fn dead_lettered(h: &Harness) -> Vec<(u64, u32)> {
    h.events
        .iter()
        .filter_map(|e| match e {
            Event::DeadLettered {
                offset, attempts, ..
            } => Some((*offset, *attempts)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_lowered_retry_limit_dead_letters_at_the_next_nack() {
    let mut c = config("t");
    c.max_retry_attempts = 5;
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    h.nack(d.tag, Some(Duration::from_millis(10)));
    h.advance(Duration::from_millis(20));
    let d = h.deliveries().remove(0);
    assert_eq!(d.tag.attempt, 2);
    update(&mut h, |c| c.max_retry_attempts = 1);
    h.nack(d.tag, Some(Duration::from_millis(10)));
    h.advance(Duration::from_millis(50));
    assert!(
        h.deliveries().is_empty(),
        "attempt 2 is past the new limit of 1 retry: no redelivery"
    );
    assert_eq!(dead_lettered(&h), [(0, 2)]);
    assert_eq!(h.broker.logs[&("dlq".to_owned(), 0)].len(), 1);
}

#[test]
fn a_raised_retry_limit_redelivers_what_would_have_been_dead_lettered() {
    let mut c = config("t");
    c.max_retry_attempts = 0;
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    update(&mut h, |c| c.max_retry_attempts = 2);
    let mut attempts = vec![d.tag.attempt];
    h.nack(d.tag, Some(Duration::from_millis(10)));
    for _ in 0..10 {
        h.advance(Duration::from_millis(20));
        let Some(d) = h.deliveries().pop() else {
            break;
        };
        attempts.push(d.tag.attempt);
        h.nack(d.tag, Some(Duration::from_millis(10)));
    }
    assert_eq!(attempts, [1, 2, 3], "two retries under the new limit");
    assert_eq!(dead_lettered(&h), [(0, 3)]);
}

#[test]
fn new_retry_backoff_bounds_apply_to_the_next_nack() {
    let mut c = config("t");
    c.retry_backoff_base = Duration::from_secs(10);
    c.retry_backoff_max = Duration::from_secs(60);
    let mut h = started(c, 1);
    let d = h.deliveries().remove(0);
    update(&mut h, |c| {
        c.retry_backoff_base = Duration::from_millis(1);
        c.retry_backoff_max = Duration::from_millis(5);
    });
    h.nack(d.tag, None);
    h.advance(Duration::from_millis(6));
    assert_eq!(
        h.deliveries().len(),
        1,
        "redelivered within the new 5 ms cap, not the old 10 s base"
    );
}

#[test]
fn a_new_ack_batch_size_changes_the_commit_cadence() {
    let mut c = config("t");
    c.ack_batch_size = 100;
    c.ack_batch_timeout = Duration::from_secs(60);
    c.ack_batch_min_interval = Duration::ZERO;
    c.fetch_size = 100;
    let mut h = started(c, 30);
    let ds = h.deliveries();
    assert_eq!(ds.len(), 30);
    for d in &ds[..10] {
        h.ack(d.tag);
    }
    assert!(h.commits_sent().is_empty(), "10 acks: below a batch of 100");
    update(&mut h, |c| c.ack_batch_size = 5);
    assert_eq!(
        h.commits_sent().len(),
        1,
        "the 10 waiting settlements are a full batch under the new size"
    );
    assert_eq!(h.broker.committed[&0], 10);
    for d in &ds[10..14] {
        h.ack(d.tag);
    }
    assert_eq!(h.commits_sent().len(), 1, "4 acks: below the new batch");
    h.ack(ds[14].tag);
    assert_eq!(h.commits_sent().len(), 2, "the fifth ack commits");
    assert_eq!(h.broker.committed[&0], 15);
    // A shorter timeout flushes what waits sooner.
    h.ack(ds[15].tag);
    update(&mut h, |c| c.ack_batch_timeout = Duration::from_millis(50));
    h.advance(Duration::from_millis(50));
    assert_eq!(h.commits_sent().len(), 3, "flushed by the new timeout");
    assert_eq!(h.broker.committed[&0], 16);
}

#[test]
fn a_lowered_breaker_threshold_opens_sooner_and_the_recovery_follows() {
    let mut c = config("t");
    c.failure_threshold = 1_000;
    c.recovery_timeout = Duration::from_secs(600);
    c.half_open_max_probes = 1;
    let mut h = started(c, 0);
    update(&mut h, |c| {
        c.failure_threshold = 2;
        c.recovery_timeout = Duration::from_millis(500);
    });
    h.route = Route::Fail;
    for _ in 0..100 {
        if h.m.breaker_state() == BreakerState::Open {
            break;
        }
        h.advance(Duration::from_millis(10));
    }
    assert_eq!(h.m.breaker_state(), BreakerState::Open);
    assert_eq!(
        h.m.metrics().requests_failed,
        2,
        "opened at the new threshold"
    );
    h.route = Route::Answer;
    h.advance(Duration::from_millis(500));
    assert_eq!(
        h.m.breaker_state(),
        BreakerState::Closed,
        "probed after the new recovery timeout (capped at 500 ms), not 600 s"
    );
}

#[test]
fn raised_fetch_bounds_buffer_more_and_lowered_ones_drain_first() {
    let mut c = config("t");
    c.fetch_size = 2;
    c.max_unacked = 1;
    let mut h = started(c, 100);
    assert_eq!(h.m.metrics().buffered, 2);
    update(&mut h, |c| c.fetch_size = 20);
    h.advance(Duration::from_millis(100));
    assert_eq!(
        h.m.metrics().buffered,
        20,
        "the buffer fills to the new bound"
    );
    update(&mut h, |c| c.fetch_size = 5);
    let fetches = h.fetches_sent().len();
    // Delivering (one at a time: max_unacked 1) drains the buffer to the new bound before a
    // fetch goes out.
    let mut buffered = Vec::new();
    for _ in 0..20 {
        let Some(d) = h.deliveries().pop() else {
            break;
        };
        h.ack(d.tag);
        h.advance(Duration::from_millis(1));
        buffered.push(h.m.metrics().buffered);
    }
    let refilled = buffered.windows(2).position(|w| w[1] > w[0]);
    let at = refilled.expect("the buffer was fetched into again");
    assert!(
        buffered[at] < 5,
        "no fetch until the buffer is under the new bound: {buffered:?}"
    );
    assert!(h.fetches_sent().len() > fetches);
    assert!(buffered[at..].iter().all(|&b| b <= 5), "{buffered:?}");
}

#[test]
fn lowered_cache_bounds_evict_at_once() {
    let mut c = config("t");
    c.cache_max_entries = Some(100);
    let mut h = started(c, 10);
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 10);
    assert_eq!(h.m.metrics().cached, 0, "a delivery is not copied");
    for d in delivered {
        assert!(h.m.give_back(h.now, d), "given back: cached for its nack");
    }
    let before = h.m.metrics();
    assert_eq!(before.cached, 10);
    update(&mut h, |c| c.cache_max_entries = Some(3));
    let after = h.m.metrics();
    assert_eq!(after.cached, 3);
    assert_eq!(after.cache_evictions, before.cache_evictions + 7);
    update(&mut h, |c| c.cache_max_bytes = 1);
    assert_eq!(h.m.metrics().cached, 0, "no record fits one byte");
}

#[test]
fn refused_updates_name_the_setting_and_change_nothing() {
    let mut c = config("t");
    c.dead_letter_queue = Some("dlq".into());
    let mut h = started(c, 3);
    let before = h.m.config().clone();
    type Edit = fn(&mut ConsumerConfig);
    let fixed: [(&str, Edit); 11] = [
        ("topic", |c| c.topic = "other".into()),
        ("consumer_group", |c| c.consumer_group = "other".into()),
        ("partitions", |c| c.partitions = vec![0, 1]),
        ("consumer_id", |c| c.consumer_id = Some("other".into())),
        ("start_position", |c| {
            c.start_position = StartPosition::Latest
        }),
        ("seed", |c| c.seed ^= 1),
        ("max_unacked", |c| c.max_unacked += 1),
        ("session_timeout", |c| {
            c.session_timeout += Duration::from_secs(1)
        }),
        ("heartbeat_interval", |c| {
            c.heartbeat_interval = Some(Duration::from_secs(1))
        }),
        ("dead_letter_queue", |c| c.dead_letter_queue = None),
        ("dead_letter_partition", |c| c.dead_letter_partition = 1),
    ];
    assert_eq!(fixed.len(), ConsumerConfig::FIXED_SETTINGS.len());
    for (name, edit) in fixed {
        let mut next = h.m.config().clone();
        next.max_retry_attempts += 1; // a live change beside it is refused with it
        edit(&mut next);
        let refused = h.m.update_config(h.now, next).unwrap_err();
        assert_eq!(refused, ConfigUpdateError::Fixed(name));
        assert_eq!(
            refused.to_string(),
            format!("{name} cannot change while the consumer runs")
        );
    }
    let mut next = h.m.config().clone();
    next.ack_batch_size = 0;
    next.max_retry_attempts = 9;
    assert_eq!(
        h.m.update_config(h.now, next),
        Err(ConfigUpdateError::Invalid(ConfigError::Zero(
            "ack_batch_size"
        )))
    );
    let mut next = h.m.config().clone();
    next.retry_backoff_max = next.retry_backoff_base / 2;
    assert_eq!(
        h.m.update_config(h.now, next),
        Err(ConfigUpdateError::Invalid(ConfigError::Inverted(
            "retry_backoff_base",
            "retry_backoff_max"
        )))
    );
    assert_eq!(h.m.config(), &before, "nothing changed");
    h.m.close(h.now);
    let mut next = h.m.config().clone();
    next.max_retry_attempts = 9;
    assert_eq!(
        h.m.update_config(h.now, next),
        Err(ConfigUpdateError::Closed)
    );
}

/// Regression (the lean ack path met live updates): a partition set aside at a full settle
/// span must fetch again when the span bound is raised, with nothing settled in between.
#[test]
fn a_raised_settle_span_bound_fetches_again_at_once() {
    let mut c = config("t");
    c.max_unsettled_per_partition = 2;
    c.fetch_size = 2;
    let mut h = started(c, 10);
    let first = h.deliveries();
    assert_eq!(first.len(), 2, "the span bound holds the partition at 2");
    let fetches = h.fetches_sent().len();
    h.advance(Duration::from_millis(200));
    assert_eq!(
        h.fetches_sent().len(),
        fetches,
        "no fetch while the span is full"
    );
    update(&mut h, |c| {
        c.max_unsettled_per_partition = 100;
        c.fetch_size = 100;
    });
    h.advance(Duration::from_millis(200));
    assert!(
        h.fetches_sent().len() > fetches,
        "a raised bound lets the partition fetch again"
    );
    assert_eq!(h.deliveries().len(), 8, "the rest is delivered");
}
