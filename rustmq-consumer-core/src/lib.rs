//! The RustMQ consumer's core: a sans-IO state machine, the wire codec, the runtime-agnostic
//! driver that runs the machine for an application, (feature `quic`) the QUIC transport, and
//! (feature `metrics`) the metrics export through the `metrics` facade.
//!
//! # The run loop
//!
//! [`ConsumerMachine`] is pure logic. Whoever drives it (the driver, a test, the simulation)
//! repeats:
//!
//! 1. feed one input: [`ConsumerMachine::handle_response`] for an answer,
//!    [`ConsumerMachine::handle_timeout`] when the deadline from `poll_timeout` passed, or an
//!    application command ([`ConsumerMachine::ack`], `nack`, `reject`, `pause`, `resume`,
//!    `seek`, `commit`, `close`); a nacked or rejected delivery's record goes back first with
//!    [`ConsumerMachine::give_back`], so its redelivery or dead letter comes from the cache
//!    rather than from the broker again (a delivery is not copied: most are acked);
//! 2. drain [`ConsumerMachine::poll_transmit`] (send every request, without waiting for
//!    answers), then [`ConsumerMachine::poll_event`] (deliveries and everything else; a
//!    driver takes the deliveries before the next other event at once with
//!    [`ConsumerMachine::poll_deliveries`]);
//! 3. sleep until [`ConsumerMachine::poll_timeout`] or the next input, whichever comes first.
//!
//! ```
//! use std::time::Instant;
//! use rustmq_consumer_core::{ConsumerConfig, ConsumerMachine, Event};
//!
//! let now = Instant::now(); // the caller's clock, never the core's
//! let mut consumer = ConsumerMachine::new(ConsumerConfig::new("orders", "billing"), now)?;
//! while let Some(transmit) = consumer.poll_transmit() {
//!     // send transmit.request; later: consumer.handle_response(now, transmit.id, result)
//!     # let _ = transmit;
//! }
//! while let Some(event) = consumer.poll_event() {
//!     if let Event::Deliver(message) = event {
//!         consumer.ack(now, message.tag)?;
//!     }
//! }
//! let _wake_at = consumer.poll_timeout();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Panic policy
//!
//! Nothing that comes from the network or the application can make the core panic: malformed
//! or unexpected responses are request failures (they feed the circuit breaker), misuse is a
//! [`UsageError`], a bad configuration is a [`ConfigError`]. A panic means a broken internal
//! invariant, which is a bug.
//!
//! # Absences
//!
//! The state machine (`machine`, and everything it uses outside `driver` and `quic`) never
//! reads a clock, sleeps, spawns, locks or touches I/O (`clippy.toml` disallows the clock).
//! Time is an `Instant` argument; jitter comes from a PRNG seeded by
//! [`ConsumerConfig::seed`]. The driver is where time and I/O come in: it reads the clock and
//! sets timers through its [`Runtime`], and reaches the broker through a [`Transport`].
//!
//! # Codemap
//!
//! - `machine/`: [`ConsumerMachine`], a coordinator over sub-machines that own their state and
//!   logic and never call back into it:
//!   - `machine/mod.rs`: the machine's fields, its public API, and what one sub-machine's
//!     outcome means for another (assignment, revoke);
//!   - `machine/settle.rs`: the application's verdicts (ack, nack, reject) and what they
//!     move: the committer, the dead-letter outbox, a parked partition's hand-back;
//!   - `machine/answers.rs`: routes each answer (or failure) to the sub-machine that sent the
//!     request, then tells the breaker;
//!   - `machine/work.rs`: the step ending every input: deliver, send what is due in priority
//!     order, move the close along;
//!   - `machine/timers.rs`: the one table of named deadlines that `poll_timeout` offers and
//!     `handle_timeout` fires;
//!   - `machine/requests.rs`: requests in flight, their deadlines and owners;
//!   - `machine/outbox.rs`: the events in order, deliveries kept apart (`poll_deliveries`);
//!   - `machine/partition/`: the assigned partitions (settle windows, buffers, deliveries);
//!     `buffer.rs`: fetched records left in their answers' lists until delivered;
//!     `cached.rs`: the message cache over the records handed back (`give_back`); `retry.rs`: the retry
//!     schedule; `fetch.rs`: start positions, fetch sizing, the intake of a fetch answer,
//!     refetches, fetch backoff; `flights.rs`: a partition's fetches in flight (a second one
//!     ahead of the first, answers taken in offset order); `parked.rs`: partitions let go in a rebalance;
//!   - `machine/commit.rs`: the committer (what is due, the request, its answer, fencing);
//!   - `machine/dead_letter.rs`: the dead-letter outbox (records, headers, answers);
//!   - `machine/group.rs`: the group session (coordinator, join, heartbeats, revoke, fencing);
//!   - `machine/close.rs`: the close's phases;
//!   - `machine/live_config.rs`: a configuration update while running (`update_config`).
//! - `window`: the per-partition settle window (O(1) amortised acks, the commit watermark).
//! - `breaker`: the circuit breaker (Closed, Open, HalfOpen with bounded probes).
//! - `cache`: the LRU + TTL message cache that redeliveries and dead letters come from: the
//!   records the application gave back with a nack or reject, indexed by their slots.
//! - `backoff`: the seeded PRNG and exponential backoff with full jitter.
//! - `frame`: exact request sizes, so FetchOffsets, commits and dead-letter batches go as
//!   one-packet requests.
//! - [`protocol`]: typed RustMQ requests and responses; [`codec`]: their bytes on the wire.
//! - `config`, `event`, `error`: what goes in, what comes out, what can be refused.
//! - [`driver`]: the runtime-agnostic driver and the application API ([`Consumer`],
//!   [`ConsumerBuilder`], deliveries, the [`Runtime`] and [`Transport`] traits): `task/`
//!   owns the machine and runs its loop, `gate.rs` settles acks without a round trip,
//!   `consumer.rs`, `builder.rs`, `error.rs`, `runtime.rs`, `transport.rs` the API;
//!   `trace.rs` each delivery's span (and, feature `opentelemetry`, its parent from the
//!   record's W3C `traceparent` header).
//! - [`process`]: the sans-IO scheduler of concurrent processing (lanes per key or partition,
//!   bounded queues); `driver/process.rs` runs handlers under it (`Consumer::process`).
//! - `quic` (feature `quic`): the [`Transport`] over QUIC (`config.rs`, `tls.rs`).
//! - `telemetry` (feature `metrics`): the names of the metrics the driver exports through the
//!   `metrics` facade (`driver/task/telemetry.rs` records them).
#![forbid(unsafe_code)]

mod backoff;
mod breaker;
mod cache;
pub mod codec;
mod config;
pub mod driver;
mod error;
mod event;
mod frame;
mod machine;
pub mod process;
pub mod protocol;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(feature = "metrics")]
pub mod telemetry;
mod window;

/// The attribute that implements [`RebalanceListener`] (and [`Transport`]) with `async fn`s.
pub use async_trait::async_trait;
pub use config::{ConfigError, ConfigUpdateError, ConsumerConfig, StartPosition};
pub use driver::{
    sleep, sleep_until, timeout, AsyncTimer, Consumer, ConsumerBuilder, ConsumerError,
    DeliveryStream, EventNotice, EventStream, HealthIssue, HealthReport, Hook, ListenerError,
    Outcome, Probe, ProcessOptions, ProcessSummary, RebalanceListener, Runtime, Sleep, Transport,
    EVENTS_CAPACITY, TRACEPARENT, TRACESTATE,
};
pub use error::{TransportError, UsageError};
pub use event::{
    BreakerState, ClosePhase, CommitError, DeliveryTag, DiscardReason, Event, Health, Message,
    Metrics, PartitionLag, Reason, RequestError, RequestId, StallReason, Transmit,
};
pub use machine::{dead_letter_headers, ConsumerMachine};

/// The API every runtime adapter re-exports (`pub use rustmq_consumer_core::adapter::*`), so
/// `rustmq-consumer-tokio` and `rustmq-consumer-smol` cannot drift apart.
#[doc(hidden)]
pub mod adapter {
    pub use crate::async_trait;
    pub use crate::driver::{Ack, Delivery, Outcome, ProcessOptions, ProcessSummary};
    pub use crate::process::OrderBy;
    #[cfg(feature = "quic")]
    pub use crate::quic::{QuicConfig, QuicError, QuicTransport, RootCerts, TlsMode};
    #[cfg(feature = "metrics")]
    pub use crate::telemetry;
    pub use crate::{
        protocol, AsyncTimer, BreakerState, CommitError, ConfigError, ConfigUpdateError, Consumer,
        ConsumerConfig, ConsumerError, DeliveryStream, DeliveryTag, Event, EventNotice,
        EventStream, Health, HealthIssue, HealthReport, Hook, ListenerError, Metrics, PartitionLag,
        Probe, RebalanceListener, Runtime, StartPosition, Transport, TransportError, UsageError,
        TRACEPARENT, TRACESTATE,
    };
}
