//! Trace context through messages (the core's `opentelemetry` feature, enabled by this
//! crate's dev-dependency so `cargo test --workspace` runs it): records produced with a W3C
//! `traceparent` header are delivered under spans parented to it, the handler of
//! `Consumer::process` runs inside the delivery's span, and a dead letter carries the header on.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};
use rustmq_consumer_core::protocol::{Header, Record};
use rustmq_consumer_core::{
    timeout, ConsumerBuilder, ConsumerConfig, Outcome, ProcessOptions, TRACEPARENT, TRACESTATE,
};
use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport, VirtualRuntime};
use tracing_subscriber::layer::SubscriberExt as _;

const TOPIC: &str = "orders";
const DLQ: &str = "orders.dead";
const A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Every span the SDK ended, for the test to look at.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn record(value: &str, traceparent: Option<&str>, tracestate: Option<&str>) -> Record {
    let mut r = Record::from_value(value.to_owned());
    r.headers
        .extend(traceparent.map(|v| Header::new(TRACEPARENT, v.to_owned())));
    r.headers
        .extend(tracestate.map(|v| Header::new(TRACESTATE, v.to_owned())));
    r
}

fn ids(traceparent: &str) -> (TraceId, SpanId) {
    let f: Vec<&str> = traceparent.split('-').collect();
    (
        TraceId::from_hex(f[1]).unwrap(),
        SpanId::from_hex(f[2]).unwrap(),
    )
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The delivery spans ended, by offset.
fn deliveries(spans: &[SpanData], offset: u64) -> Vec<SpanData> {
    spans
        .iter()
        .filter(|s| s.name == "delivery" && attribute(s, "offset") == Some(offset.to_string()))
        .cloned()
        .collect()
}

/// Runs `app` against a broker holding `records` under a subscriber with an OpenTelemetry
/// layer; returns the broker and every span ended.
fn traced<F>(records: Vec<Record>, app: F) -> (SharedBroker, Vec<SpanData>)
where
    F: AsyncFnOnce(&VirtualRuntime, rustmq_consumer_core::Consumer),
{
    traced_with(records, |_| {}, app)
}

/// [`traced`], the configuration (partition 0 assigned by hand) changed by `configure` first.
fn traced_with<F>(
    records: Vec<Record>,
    configure: impl FnOnce(&mut ConsumerConfig),
    app: F,
) -> (SharedBroker, Vec<SpanData>)
where
    F: AsyncFnOnce(&VirtualRuntime, rustmq_consumer_core::Consumer),
{
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    broker.create_topic(DLQ, 1);
    broker.produce(TOPIC, 0, records).unwrap();
    let broker = SharedBroker::new(broker);
    let collected = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(collected.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-context-test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let rt = VirtualRuntime::new();
        rt.block_on(async {
            let mut config = ConsumerConfig::new(TOPIC, "billing");
            config.partitions = vec![0];
            config.consumer_id = Some("consumer-1".to_owned());
            config.dead_letter_queue = Some(DLQ.to_owned());
            configure(&mut config);
            let consumer = ConsumerBuilder::with_runtime(rt.clone())
                .config(config)
                .client(SimTransport::new(broker.clone(), rt.clone()))
                .build()
                .await
                .unwrap();
            timeout(&rt, Duration::from_secs(60), app(&rt, consumer.clone()))
                .await
                .expect("the application finished in time");
            consumer.close().await.unwrap();
        });
    });
    provider.force_flush().unwrap();
    let spans = collected.0.lock().unwrap().clone();
    (broker, spans)
}

#[test]
fn delivery_spans_continue_the_producers_trace_and_dead_letters_carry_it_on() {
    let records = vec![
        record("m0", Some(A), Some("vendor=a1")),
        record("m1", None, None),
        record("m2", Some(B), None),
        record("m3", Some("00-not-a-traceparent-01"), None),
    ];
    let (broker, spans) = traced(records, async |_, consumer| {
        for _ in 0..4 {
            let d = consumer.receive().await.unwrap().unwrap();
            if d.offset() == 0 {
                d.reject("poison").await.unwrap();
            } else {
                d.ack().await.unwrap();
            }
        }
    });
    for (offset, parent) in [(0, A), (2, B)] {
        let found = deliveries(&spans, offset);
        assert_eq!(found.len(), 1, "one delivery span of offset {offset}");
        let span = &found[0];
        let (trace, parent_span) = ids(parent);
        assert_eq!(span.span_context.trace_id(), trace, "offset {offset}");
        assert_eq!(span.parent_span_id, parent_span, "offset {offset}");
        assert!(span.parent_span_is_remote);
        assert_eq!(span.span_kind, SpanKind::Consumer);
        for (key, value) in [
            ("topic", TOPIC),
            ("partition", "0"),
            ("attempt", "1"),
            ("group", "billing"),
            ("member", "consumer-1"),
        ] {
            assert_eq!(attribute(span, key).as_deref(), Some(value), "{key}");
        }
    }
    assert_eq!(
        deliveries(&spans, 0)[0]
            .span_context
            .trace_state()
            .get("vendor"),
        Some("a1"),
        "tracestate travels with the parent"
    );
    for offset in [1, 3] {
        let span = &deliveries(&spans, offset)[0];
        assert!(
            !span.parent_span_is_remote,
            "offset {offset}: no (valid) traceparent, no remote parent"
        );
        assert!(![ids(A).0, ids(B).0].contains(&span.span_context.trace_id()));
    }
    let dead = broker.lock().records(DLQ, 0).to_vec();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header(TRACEPARENT).map(|v| &v[..]),
        Some(A.as_bytes())
    );
    assert_eq!(
        dead[0].header(TRACESTATE).map(|v| &v[..]),
        Some(&b"vendor=a1"[..])
    );
}

#[test]
fn process_runs_each_handler_inside_its_delivery_span() {
    let records = (0..6)
        .map(|i| record(&format!("m{i}"), Some(A), None))
        .collect();
    let (_, spans) = traced(records, async |_, consumer| {
        let handled = std::cell::Cell::new(0);
        let stop = async {
            while handled.get() < 6 {
                futures_lite::future::yield_now().await;
            }
        };
        let summary = consumer
            .process_until(
                ProcessOptions::new(3),
                |delivery| {
                    let offset = delivery.offset();
                    let handled = &handled;
                    async move {
                        tracing::info_span!("handle", offset).in_scope(|| {});
                        handled.set(handled.get() + 1);
                        Outcome::Ack
                    }
                },
                stop,
            )
            .await
            .unwrap();
        assert_eq!(summary.acked, 6);
    });
    let (trace, parent) = ids(A);
    for offset in 0..6u64 {
        let delivery = &deliveries(&spans, offset)[0];
        assert_eq!(delivery.parent_span_id, parent);
        let handle = spans
            .iter()
            .find(|s| s.name == "handle" && attribute(s, "offset") == Some(offset.to_string()))
            .expect("the handler's span");
        assert_eq!(handle.span_context.trace_id(), trace);
        assert_eq!(
            handle.parent_span_id,
            delivery.span_context.span_id(),
            "offset {offset}: the handler ran inside the delivery span"
        );
    }
}

/// In a group assignment the span names the group member id the delivery was made under
/// (the driver stamps deliveries with the gate's generation only; the member is looked up
/// when the span is recorded), not the consumer id.
#[test]
fn delivery_spans_of_a_group_member_name_the_member_id() {
    let records = vec![record("m0", None, None), record("m1", None, None)];
    let (_, spans) = traced_with(
        records,
        |config| config.partitions.clear(),
        async |_, consumer| {
            for _ in 0..2 {
                let d = consumer.receive().await.unwrap().unwrap();
                d.ack().await.unwrap();
            }
        },
    );
    // The driver's `member{member_id, generation}` span names the member id it joined as.
    let member = spans
        .iter()
        .find(|s| s.name == "member")
        .and_then(|s| attribute(s, "member_id"))
        .expect("the consumer joined the group");
    assert_ne!(member, "consumer-1");
    for offset in [0, 1] {
        let found = deliveries(&spans, offset);
        assert_eq!(found.len(), 1, "one delivery span of offset {offset}");
        assert_eq!(
            attribute(&found[0], "member").as_deref(),
            Some(member.as_str())
        );
    }
}
