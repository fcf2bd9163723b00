//! The span of each delivery, and (feature `opentelemetry`) the trace context it continues.
//!
//! Every [`Delivery`](super::Delivery) gets a `delivery` span when the application takes it,
//! recording topic, partition, offset, attempt, group and member (`otel.kind` is `consumer`).
//! `Consumer::process` runs each handler inside its delivery's span.
//!
//! With the `opentelemetry` feature, a record carrying a W3C
//! [`traceparent`](https://www.w3.org/TR/trace-context/#traceparent-header) header (and a
//! `tracestate` beside it) makes the span the child of that remote span, through
//! `tracing-opentelemetry` (a subscriber without its layer ignores it). The header is parsed
//! here, not by a global propagator, so no propagator needs installing; a malformed or
//! all-zero `traceparent` is ignored (the span keeps its ordinary parent). The headers stay
//! on the record, so a dead letter of it carries the producer's trace context on.

use tracing::Span;

use crate::event::Message;

/// The W3C trace-context header naming the producer's span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace-context header carrying vendor state along with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// The span of one delivery: a child of the record's `traceparent` when the feature is on and
/// the header is valid, else of the current span. `member` is called only when the span is
/// enabled.
#[inline]
pub(crate) fn delivery_span<M: std::fmt::Display>(
    message: &Message,
    topic: &str,
    group: &str,
    member: impl FnOnce() -> M,
) -> Span {
    let tag = message.tag;
    let span = tracing::info_span!(
        "delivery",
        otel.kind = "consumer",
        topic = %topic,
        partition = tag.partition,
        offset = tag.offset,
        attempt = tag.attempt,
        group = %group,
        member = %member(),
    );
    #[cfg(feature = "opentelemetry")]
    otel::continue_trace(&span, &message.record);
    span
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use std::str::FromStr as _;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::{TRACEPARENT, TRACESTATE};
    use crate::protocol::Record;

    /// Makes `span` the child of the remote span the record's headers name, if any.
    pub(super) fn continue_trace(span: &tracing::Span, record: &Record) {
        if span.is_disabled() {
            return;
        }
        let Some(remote) = remote_span(record) else {
            return;
        };
        // Without a `tracing-opentelemetry` layer there is nothing to parent: not an error.
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }

    /// The remote span context of a record's `traceparent` and `tracestate` headers.
    pub(crate) fn remote_span(record: &Record) -> Option<SpanContext> {
        let text = |key| std::str::from_utf8(record.header(key)?).ok();
        let (trace_id, span_id, flags) = parse_traceparent(text(TRACEPARENT)?.trim())?;
        // An invalid `tracestate` is dropped, the parent kept (W3C trace context, 3.3).
        let state = text(TRACESTATE)
            .and_then(|s| TraceState::from_str(s.trim()).ok())
            .unwrap_or_default();
        Some(SpanContext::new(trace_id, span_id, flags, true, state))
    }

    /// `version-traceid-parentid-flags`, lowercase hex, with the W3C rules: version `ff` is
    /// invalid, version `00` has exactly four fields (a later version may append more), and
    /// all-zero ids are invalid.
    pub(crate) fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
        let mut fields = value.split('-');
        let version = fields.next()?;
        let (trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some((
            trace_id,
            span_id,
            TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        ))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

        #[test]
        fn a_valid_traceparent_is_read() {
            let (trace, span, flags) = parse_traceparent(VALID).expect("valid");
            assert_eq!(format!("{trace}"), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(format!("{span}"), "00f067aa0ba902b7");
            assert!(flags.is_sampled());
            let unsampled = VALID.replace("-01", "-00");
            assert!(!parse_traceparent(&unsampled).expect("valid").2.is_sampled());
            let future = format!("cc{}-extra", &VALID[2..]);
            assert!(
                parse_traceparent(&future).is_some(),
                "a later version may add fields"
            );
        }

        #[test]
        fn invalid_traceparents_are_ignored() {
            for bad in [
                "",
                "00",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
                "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ] {
                assert!(parse_traceparent(bad).is_none(), "{bad:?} accepted");
            }
        }

        #[test]
        fn the_headers_give_a_remote_context_with_its_state() {
            let mut record = Record::from_value("v");
            assert!(remote_span(&record).is_none(), "no header, no parent");
            record
                .headers
                .push(crate::protocol::Header::new(TRACEPARENT, VALID));
            record.headers.push(crate::protocol::Header::new(
                TRACESTATE,
                "congo=t61rcWkgMzE",
            ));
            let cx = remote_span(&record).expect("a parent");
            assert!(cx.is_remote() && cx.is_valid());
            assert_eq!(cx.trace_state().get("congo"), Some("t61rcWkgMzE"));
        }
    }
}
