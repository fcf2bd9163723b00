//! The RustMQ consumer's core: a sans-IO state machine, the wire codec and (soon) the
//! runtime-agnostic driver.
//!
//! # The run loop
//!
//! [`ConsumerMachine`] is pure logic. Whoever drives it (the driver, a test, the simulation)
//! repeats:
//!
//! 1. feed one input: [`ConsumerMachine::handle_response`] for an answer,
//!    [`ConsumerMachine::handle_timeout`] when the deadline from `poll_timeout` passed, or an
//!    application command ([`ConsumerMachine::ack`], `nack`, `reject`, `pause`, `resume`,
//!    `seek`, `commit`, `close`);
//! 2. drain [`ConsumerMachine::poll_transmit`] (send every request, without waiting for
//!    answers), then [`ConsumerMachine::poll_event`] (deliveries and everything else);
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
//!     if let Event::Deliver(delivery) = event {
//!         consumer.ack(now, delivery.tag)?;
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
//! The core never reads a clock, sleeps, spawns, locks or touches I/O (`clippy.toml`
//! disallows the clock and CI checks its dependency tree has no runtime). Time is an
//! `Instant` argument; jitter comes from a PRNG seeded by [`ConsumerConfig::seed`].
//!
//! # Codemap
//!
//! - `machine`: [`ConsumerMachine`], the top-level state machine; it drains the sub-machines
//!   inside its own handlers.
//! - `window`: the per-partition settle window (O(1) amortised acks, the commit watermark).
//! - `breaker`: the circuit breaker (Closed, Open, HalfOpen with bounded probes).
//! - `cache`: the LRU + TTL message cache that redeliveries come from.
//! - `group`: the consumer-group session (join, heartbeats, eager rebalance, fencing).
//! - `backoff`: the seeded PRNG and exponential backoff with full jitter.
//! - `frame`: exact request sizes, so commits and dead-letter batches fit the broker's 8 KiB.
//! - [`protocol`]: typed RustMQ requests and responses; [`codec`]: their bytes on the wire.
//! - `config`, `event`, `error`: what goes in, what comes out, what can be refused.
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
mod group;
mod machine;
pub mod protocol;
#[cfg(feature = "quic")]
pub mod quic;
mod window;

pub use config::{ConfigError, ConsumerConfig, StartPosition};
pub use driver::{
    sleep, sleep_until, timeout, AsyncTimer, Consumer, ConsumerBuilder, ConsumerError,
    DeliveryStream, HealthReport, Runtime, Sleep, Transport,
};
pub use error::{TransportError, UsageError};
pub use event::{
    BreakerState, ClosePhase, Delivery, DeliveryTag, Event, Health, Metrics, PartitionLag, Reason,
    RequestId, StallReason, Transmit,
};
pub use machine::{dead_letter_headers, ConsumerMachine};

/// The API every runtime adapter re-exports (`pub use rustmq_consumer_core::adapter::*`), so
/// `rustmq-consumer-tokio` and `rustmq-consumer-smol` cannot drift apart.
#[doc(hidden)]
pub mod adapter {
    pub use crate::driver::Delivery;
    #[cfg(feature = "quic")]
    pub use crate::quic::{QuicConfig, QuicError, QuicTransport, RootCerts, TlsMode};
    pub use crate::{
        protocol, AsyncTimer, BreakerState, ConfigError, Consumer, ConsumerConfig, ConsumerError,
        DeliveryStream, DeliveryTag, Health, HealthReport, Metrics, PartitionLag, Runtime,
        StartPosition, Transport, TransportError, UsageError,
    };
}
