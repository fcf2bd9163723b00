//! Ready-made pieces for scripted tests: a broker holding a topic with messages, and a
//! consumer config whose idle waits are short.

use std::time::Duration;

use rustmq_consumer_core::ConsumerConfig;

use crate::broker::SimBroker;

/// A broker with `topic` of `partitions` partitions, each holding `messages` messages whose
/// values are `p<partition>-m<index>`.
pub fn broker_with(topic: &str, partitions: u32, messages: usize) -> SimBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(topic, partitions);
    for p in 0..partitions {
        broker
            .produce_values(topic, p, (0..messages).map(|i| format!("p{p}-m{i}")))
            .unwrap_or_else(|e| panic!("fixture: produce to {topic}/{p}: {}", e.0));
    }
    broker
}

/// A consumer of `topic` in `group` (a group session: no partitions assigned by hand) whose
/// empty fetches back off between 10 ms and 100 ms, so idle time passes in few steps.
pub fn fast_config(topic: &str, group: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(topic, group);
    c.empty_fetch_backoff_min = Duration::from_millis(10);
    c.empty_fetch_backoff_max = Duration::from_millis(100);
    c
}
