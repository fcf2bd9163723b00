//! The driver's metrics export (feature `metrics`; names in [`crate::telemetry`]). Without the
//! feature every method is an empty inline function.
//!
//! Counters and most gauges are the machine's [`Metrics`] snapshot, compared after each batch
//! of inputs with the one exported before: the difference is added, so the export always
//! equals the snapshot once the driver has taken its step. The rest comes from what the driver
//! already sees: request failures from [`Event::RequestFailed`] (labelled with the kind of the
//! request, remembered from its transmit), latencies from each request's start and answer on
//! the runtime's clock, records per fetch from the answer, settlements per commit from the
//! snapshot at each [`Event::Committed`].

#[cfg(feature = "metrics")]
pub(super) use enabled::Telemetry;

#[cfg(not(feature = "metrics"))]
pub(super) use disabled::Telemetry;

#[cfg(not(feature = "metrics"))]
mod disabled {
    use std::time::Instant;

    use crate::error::TransportError;
    use crate::event::{Event, PartitionLag, RequestId};
    use crate::machine::ConsumerMachine;
    use crate::protocol::{RequestKind, Response};

    /// Nothing to export.
    pub(in crate::driver::task) struct Telemetry;

    impl Telemetry {
        pub(in crate::driver::task) fn new(_machine: &ConsumerMachine) -> Self {
            Self
        }
        #[inline]
        pub(in crate::driver::task) fn sent(&mut self, _: Instant, _: RequestId, _: RequestKind) {}
        #[inline]
        pub(in crate::driver::task) fn answered(
            &mut self,
            _: Instant,
            _: RequestId,
            _: &Result<Response, TransportError>,
        ) {
        }
        #[inline]
        pub(in crate::driver::task) fn event(&mut self, _: &Event, _: &ConsumerMachine) {}
        #[inline]
        pub(in crate::driver::task) fn sync(&mut self, _: &ConsumerMachine) {}
        #[inline]
        pub(in crate::driver::task) fn lag(&mut self, _: &[PartitionLag]) {}
        #[inline]
        pub(in crate::driver::task) fn finish(&mut self) {}
        /// Whether the recorder wants the request times (no clock read when disabled).
        #[inline]
        pub(in crate::driver::task) fn timed(&self) -> bool {
            false
        }
    }
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};
    use rustc_hash::FxHashMap;

    use crate::error::TransportError;
    use crate::event::{BreakerState, Event, Metrics, PartitionLag, RequestError, RequestId};
    use crate::machine::ConsumerMachine;
    use crate::protocol::{RequestKind, Response};
    use crate::telemetry as names;

    /// One counter per [`Metrics`] counter, in the order of [`counter_values`].
    const COUNTERS: [&str; 17] = [
        names::RECEIVED,
        names::DELIVERED,
        names::ACKED,
        names::NACKED,
        names::RETRIED,
        names::REJECTED,
        names::DEAD_LETTERED,
        names::DISCARDED,
        names::COMMITS,
        names::COMMIT_FAILURES,
        names::COMMITTED_SETTLEMENTS,
        names::FETCHES,
        names::REFETCHES,
        names::CACHE_HITS,
        names::CACHE_MISSES,
        names::CACHE_EVICTIONS,
        names::BREAKER_TRANSITIONS,
    ];

    fn counter_values(m: &Metrics) -> [u64; 17] {
        [
            m.received,
            m.delivered,
            m.acked,
            m.nacked,
            m.retried,
            m.rejected,
            m.dead_lettered,
            m.discarded,
            m.commits_sent,
            m.commits_failed,
            m.committed_settlements,
            m.fetches,
            m.refetches,
            m.cache_hits,
            m.cache_misses,
            m.cache_evictions,
            m.breaker_transitions,
        ]
    }

    /// One gauge per [`Metrics`] gauge, in the order of [`gauge_values`].
    const GAUGES: [&str; 5] = [
        names::IN_FLIGHT_DELIVERIES,
        names::IN_FLIGHT_REQUESTS,
        names::BUFFERED,
        names::CACHED,
        names::CACHED_BYTES,
    ];

    fn gauge_values(m: &Metrics) -> [u64; 5] {
        [
            m.in_flight_deliveries,
            m.in_flight_requests,
            m.buffered,
            m.cached,
            m.cached_bytes,
        ]
    }

    const BREAKER_STATES: [(BreakerState, &str); 3] = [
        (BreakerState::Closed, "closed"),
        (BreakerState::Open, "open"),
        (BreakerState::HalfOpen, "half_open"),
    ];

    /// The registered series and what was exported so far.
    pub(in crate::driver::task) struct Telemetry {
        labels: Vec<Label>,
        counters: Vec<Counter>,
        gauges: Vec<Gauge>,
        breaker: Vec<Gauge>,
        /// The snapshot exported last.
        last: Metrics,
        breaker_state: Option<BreakerState>,
        /// Each partition's lag gauge and the value this consumer added to it.
        lag: BTreeMap<u32, (Gauge, u64)>,
        /// Requests in flight: kind and start (failures are labelled with the kind; answers
        /// of fetches and commits give a latency). An entry leaves with the transport's answer
        /// or the machine's failure, whichever comes first.
        sent: FxHashMap<RequestId, (RequestKind, Instant)>,
        /// The request answered last: the machine may call its answer a failure.
        answered: Option<(RequestId, RequestKind)>,
        commit_latency: Histogram,
        fetch_latency: Histogram,
        records_per_fetch: Histogram,
        settlements_per_commit: Histogram,
        /// `committed_settlements` at the last successful commit.
        committed_at_last: u64,
    }

    impl Telemetry {
        pub(in crate::driver::task) fn new(machine: &ConsumerMachine) -> Self {
            names::describe();
            let config = machine.config();
            let labels = vec![
                Label::new(names::TOPIC, config.topic.clone()),
                Label::new(names::GROUP, config.consumer_group.clone()),
            ];
            let with = |name: &'static str| (name, labels.clone());
            let breaker = BREAKER_STATES
                .iter()
                .map(|(_, state)| {
                    let mut labels = labels.clone();
                    labels.push(Label::new(names::STATE, *state));
                    gauge!(names::BREAKER_STATE, labels)
                })
                .collect();
            Self {
                counters: COUNTERS
                    .iter()
                    .map(|&name| {
                        let (name, labels) = with(name);
                        counter!(name, labels)
                    })
                    .collect(),
                gauges: GAUGES
                    .iter()
                    .map(|&name| {
                        let (name, labels) = with(name);
                        gauge!(name, labels)
                    })
                    .collect(),
                breaker,
                commit_latency: histogram!(names::COMMIT_LATENCY, labels.clone()),
                fetch_latency: histogram!(names::FETCH_LATENCY, labels.clone()),
                records_per_fetch: histogram!(names::RECORDS_PER_FETCH, labels.clone()),
                settlements_per_commit: histogram!(names::SETTLEMENTS_PER_COMMIT, labels.clone()),
                labels,
                last: Metrics::default(),
                breaker_state: None,
                lag: BTreeMap::new(),
                sent: FxHashMap::default(),
                answered: None,
                committed_at_last: 0,
            }
        }

        /// Whether the recorder wants the request times.
        pub(in crate::driver::task) fn timed(&self) -> bool {
            true
        }

        /// A request started.
        pub(in crate::driver::task) fn sent(
            &mut self,
            now: Instant,
            id: RequestId,
            kind: RequestKind,
        ) {
            self.sent.insert(id, (kind, now));
        }

        /// The transport answered a request (perhaps after the machine gave it up).
        pub(in crate::driver::task) fn answered(
            &mut self,
            now: Instant,
            id: RequestId,
            result: &Result<Response, TransportError>,
        ) {
            let Some((kind, start)) = self.sent.remove(&id) else {
                return;
            };
            self.answered = Some((id, kind));
            let latency = now.saturating_duration_since(start);
            match (kind, result) {
                (RequestKind::Fetch, Ok(response)) => {
                    self.fetch_latency.record(latency);
                    if let Response::Fetch(fetch) = response {
                        self.records_per_fetch.record(fetch.records.len() as f64);
                    }
                }
                (RequestKind::CommitOffset, Ok(_)) => self.commit_latency.record(latency),
                _ => {}
            }
        }

        /// Routes what an event says beside the snapshot.
        pub(in crate::driver::task) fn event(&mut self, event: &Event, machine: &ConsumerMachine) {
            match event {
                Event::RequestFailed { id, error } => {
                    let kind = match self.sent.remove(id) {
                        Some((kind, _)) => Some(kind),
                        None => self
                            .answered
                            .filter(|(answered, _)| answered == id)
                            .map(|(_, kind)| kind),
                    };
                    let mut labels = self.labels.clone();
                    labels.push(Label::new(
                        names::REQUEST,
                        kind.map_or_else(|| "unknown".to_owned(), snake_case),
                    ));
                    labels.push(Label::new(names::ERROR, error_kind(error)));
                    counter!(names::REQUEST_FAILURES, labels).increment(1);
                }
                Event::Committed { .. } => {
                    let committed = machine.metrics().committed_settlements;
                    let carried = committed.saturating_sub(self.committed_at_last);
                    self.committed_at_last = committed;
                    self.settlements_per_commit.record(carried as f64);
                }
                _ => {}
            }
        }

        /// Exports what moved in the machine's snapshot since the last call.
        pub(in crate::driver::task) fn sync(&mut self, machine: &ConsumerMachine) {
            let now = machine.metrics();
            if now != self.last {
                let (new, old) = (counter_values(&now), counter_values(&self.last));
                for ((counter, new), old) in self.counters.iter().zip(new).zip(old) {
                    if new > old {
                        counter.increment(new - old);
                    }
                }
                let (new, old) = (gauge_values(&now), gauge_values(&self.last));
                for ((gauge, new), old) in self.gauges.iter().zip(new).zip(old) {
                    move_gauge(gauge, old, new);
                }
                self.last = now;
            }
            let state = machine.breaker_state();
            if self.breaker_state != Some(state) {
                for ((known, _), gauge) in BREAKER_STATES.iter().zip(&self.breaker) {
                    if self.breaker_state == Some(*known) {
                        gauge.decrement(1.0);
                    }
                    if state == *known {
                        gauge.increment(1.0);
                    }
                }
                self.breaker_state = Some(state);
            }
        }

        /// Sets the lag gauges to `lags`; partitions no longer listed take their share back.
        pub(in crate::driver::task) fn lag(&mut self, lags: &[PartitionLag]) {
            self.lag.retain(|partition, (gauge, value)| {
                let kept = lags.iter().any(|l| l.partition == *partition);
                if !kept {
                    gauge.decrement(*value as f64);
                }
                kept
            });
            for l in lags {
                let labels = &self.labels;
                let (gauge, value) = self.lag.entry(l.partition).or_insert_with(|| {
                    let mut labels = labels.clone();
                    labels.push(Label::new(names::PARTITION, l.partition.to_string()));
                    (gauge!(names::LAG, labels), 0)
                });
                move_gauge(gauge, *value, l.lag);
                *value = l.lag;
            }
        }

        /// The driver stops: gauges take this consumer's share back.
        pub(in crate::driver::task) fn finish(&mut self) {
            self.lag(&[]);
            for (gauge, value) in self.gauges.iter().zip(gauge_values(&self.last)) {
                move_gauge(gauge, value, 0);
            }
            for ((known, _), gauge) in BREAKER_STATES.iter().zip(&self.breaker) {
                if self.breaker_state == Some(*known) {
                    gauge.decrement(1.0);
                }
            }
            self.breaker_state = None;
        }
    }

    fn move_gauge(gauge: &Gauge, old: u64, new: u64) {
        if new > old {
            gauge.increment((new - old) as f64);
        } else if old > new {
            gauge.decrement((old - new) as f64);
        }
    }

    fn error_kind(error: &RequestError) -> &'static str {
        match error {
            RequestError::Transport(TransportError::TimedOut) => "timeout",
            // Read in part by the broker (PROTOCOL.md): the path's doing, retried.
            _ if error.cut_in_transit() => "cut",
            RequestError::Transport(_) => "transport",
            RequestError::ErrorCode { .. } => "error_code",
            RequestError::UnexpectedResponse { .. } => "unexpected_response",
        }
    }

    /// `CommitOffset` -> `commit_offset`.
    fn snake_case(kind: RequestKind) -> String {
        let mut out = String::new();
        for (i, c) in format!("{kind:?}").chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn request_kinds_are_snake_case() {
            assert_eq!(snake_case(RequestKind::CommitOffset), "commit_offset");
            assert_eq!(snake_case(RequestKind::Fetch), "fetch");
        }
    }
}
