//! The metrics the driver exports through the [`metrics`] facade (feature `metrics`): their
//! names, labels and meaning.
//!
//! Install a recorder (any exporter: Prometheus, StatsD, OpenTelemetry) before
//! `ConsumerBuilder::build`: each consumer registers its series when it starts. Every series
//! carries the labels [`TOPIC`] and [`GROUP`]; the lag gauge adds [`PARTITION`], request
//! failures add [`REQUEST`] and [`ERROR`], the breaker gauge adds [`STATE`].
//!
//! The counters are the consumer's own [`Metrics`](crate::Metrics) snapshot, exported as it
//! moves (the driver adds each difference): `rustmq_consumer_acked_total` equals
//! `metrics().await.acked`, summed over the consumers that share its labels. Gauges are kept as
//! each consumer's contribution (increments and decrements), so consumers of one group and
//! topic in one process add up, and a closed consumer takes its share back. Latencies are
//! measured on the runtime's clock, from the request's start to its answer.

/// Label: the consumed topic.
pub const TOPIC: &str = "topic";
/// Label: the consumer group.
pub const GROUP: &str = "group";
/// Label: the partition (lag gauge).
pub const PARTITION: &str = "partition";
/// Label: the request kind of a failure (`fetch`, `commit_offset`, `produce`, ...).
pub const REQUEST: &str = "request";
/// Label: how a request failed: `timeout`, `cut` (the broker read it in part:
/// [`RequestError::cut_in_transit`](crate::RequestError::cut_in_transit)), `transport` (no
/// answer: connection, another error frame, malformed answer), `error_code` (the broker
/// refused it), `unexpected_response`.
pub const ERROR: &str = "error";
/// Label: the breaker state a [`BREAKER_STATE`] series counts (`closed`, `open`, `half_open`).
pub const STATE: &str = "state";

/// Counter: messages received from fetches ([`Metrics::received`](crate::Metrics::received)).
pub const RECEIVED: &str = "rustmq_consumer_received_total";
/// Counter: deliveries to the application, redeliveries included.
pub const DELIVERED: &str = "rustmq_consumer_delivered_total";
/// Counter: acks.
pub const ACKED: &str = "rustmq_consumer_acked_total";
/// Counter: nacks (explicit, and deliveries dropped unsettled).
pub const NACKED: &str = "rustmq_consumer_nacked_total";
/// Counter: redeliveries.
pub const RETRIED: &str = "rustmq_consumer_retried_total";
/// Counter: rejects.
pub const REJECTED: &str = "rustmq_consumer_rejected_total";
/// Counter: messages confirmed in the dead-letter topic.
pub const DEAD_LETTERED: &str = "rustmq_consumer_dead_lettered_total";
/// Counter: poison messages dropped for want of a dead-letter topic.
pub const DISCARDED: &str = "rustmq_consumer_discarded_total";
/// Counter: commit requests sent.
pub const COMMITS: &str = "rustmq_consumer_commits_total";
/// Counter: commits that failed.
pub const COMMIT_FAILURES: &str = "rustmq_consumer_commit_failures_total";
/// Counter: settlements carried by successful commits.
pub const COMMITTED_SETTLEMENTS: &str = "rustmq_consumer_committed_settlements_total";
/// Counter: failed requests, labelled [`REQUEST`] and [`ERROR`].
pub const REQUEST_FAILURES: &str = "rustmq_consumer_request_failures_total";
/// Counter: fetch requests sent.
pub const FETCHES: &str = "rustmq_consumer_fetches_total";
/// Counter: single-offset fetches of retries the cache had lost.
pub const REFETCHES: &str = "rustmq_consumer_refetches_total";
/// Counter: message cache hits.
pub const CACHE_HITS: &str = "rustmq_consumer_cache_hits_total";
/// Counter: message cache misses.
pub const CACHE_MISSES: &str = "rustmq_consumer_cache_misses_total";
/// Counter: message cache evictions (capacity and time to live).
pub const CACHE_EVICTIONS: &str = "rustmq_consumer_cache_evictions_total";
/// Counter: circuit breaker transitions.
pub const BREAKER_TRANSITIONS: &str = "rustmq_consumer_breaker_transitions_total";

/// Gauge: a partition's lag (high watermark minus committed offset), labelled [`PARTITION`];
/// refreshed at most once a second while the consumer works.
pub const LAG: &str = "rustmq_consumer_lag";
/// Gauge: deliveries outstanding with the application.
pub const IN_FLIGHT_DELIVERIES: &str = "rustmq_consumer_in_flight_deliveries";
/// Gauge: requests in flight.
pub const IN_FLIGHT_REQUESTS: &str = "rustmq_consumer_in_flight_requests";
/// Gauge: fetched messages buffered ahead of the application.
pub const BUFFERED: &str = "rustmq_consumer_buffered";
/// Gauge: messages in the cache (records handed back for a retry or a dead letter).
pub const CACHED: &str = "rustmq_consumer_cached";
/// Gauge: bytes the cache holds.
pub const CACHED_BYTES: &str = "rustmq_consumer_cached_bytes";
/// Gauge: consumers whose circuit breaker is in the state [`STATE`] (1 for the one it is in,
/// 0 for the others, for one consumer).
pub const BREAKER_STATE: &str = "rustmq_consumer_breaker_state";

/// Histogram: commit latency in seconds (request sent to answer).
pub const COMMIT_LATENCY: &str = "rustmq_consumer_commit_latency_seconds";
/// Histogram: fetch latency in seconds (request sent to answer).
pub const FETCH_LATENCY: &str = "rustmq_consumer_fetch_latency_seconds";
/// Histogram: records in each fetch answer.
pub const RECORDS_PER_FETCH: &str = "rustmq_consumer_records_per_fetch";
/// Histogram: settlements carried by each successful commit.
pub const SETTLEMENTS_PER_COMMIT: &str = "rustmq_consumer_settlements_per_commit";

/// Describes every series to the installed recorder (units and help texts, the `# HELP` lines
/// of a Prometheus page). The driver calls it when a consumer starts; calling it again is
/// harmless.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    let counters = [
        (RECEIVED, "Messages received from fetches."),
        (
            DELIVERED,
            "Deliveries to the application, redeliveries included.",
        ),
        (ACKED, "Acks."),
        (
            NACKED,
            "Nacks, explicit and of deliveries dropped unsettled.",
        ),
        (RETRIED, "Redeliveries."),
        (REJECTED, "Rejects."),
        (
            DEAD_LETTERED,
            "Messages confirmed in the dead-letter topic.",
        ),
        (
            DISCARDED,
            "Poison messages dropped without a dead-letter topic.",
        ),
        (COMMITS, "Commit requests sent."),
        (COMMIT_FAILURES, "Commits that failed."),
        (
            COMMITTED_SETTLEMENTS,
            "Settlements carried by successful commits.",
        ),
        (
            REQUEST_FAILURES,
            "Failed requests, by request kind and error.",
        ),
        (FETCHES, "Fetch requests sent."),
        (
            REFETCHES,
            "Single-offset fetches of retries the cache had lost.",
        ),
        (CACHE_HITS, "Message cache hits."),
        (CACHE_MISSES, "Message cache misses."),
        (
            CACHE_EVICTIONS,
            "Message cache evictions (capacity and time to live).",
        ),
        (BREAKER_TRANSITIONS, "Circuit breaker transitions."),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
    }
    let gauges = [
        (LAG, "Partition lag: high watermark minus committed offset."),
        (
            IN_FLIGHT_DELIVERIES,
            "Deliveries outstanding with the application.",
        ),
        (IN_FLIGHT_REQUESTS, "Requests in flight."),
        (
            BUFFERED,
            "Fetched messages buffered ahead of the application.",
        ),
        (CACHED, "Messages in the cache."),
        (
            BREAKER_STATE,
            "Consumers whose circuit breaker is in this state.",
        ),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, Unit::Count, help);
    }
    describe_gauge!(CACHED_BYTES, Unit::Bytes, "Bytes the message cache holds.");
    describe_histogram!(
        COMMIT_LATENCY,
        Unit::Seconds,
        "Commit latency: request sent to answer."
    );
    describe_histogram!(
        FETCH_LATENCY,
        Unit::Seconds,
        "Fetch latency: request sent to answer."
    );
    describe_histogram!(
        RECORDS_PER_FETCH,
        Unit::Count,
        "Records in each fetch answer."
    );
    describe_histogram!(
        SETTLEMENTS_PER_COMMIT,
        Unit::Count,
        "Settlements carried by each successful commit."
    );
}
