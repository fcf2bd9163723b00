//! The RustMQ consumer on smol.
//!
//! [`SmolRuntime`] implements the core's [`Runtime`] with `async_io::Timer` (re-exported by
//! smol) and `smol::spawn(..).detach()`; everything else is the core's runtime-agnostic API,
//! re-exported under the same names as `rustmq-consumer-tokio`, so switching runtime is a
//! one-line change:
//!
//! ```no_run
//! use rustmq_consumer_smol::{ConsumerBuilder, ConsumerError, Transport};
//!
//! # async fn run(transport: impl Transport) -> Result<(), ConsumerError> {
//! let consumer = ConsumerBuilder::new()
//!     .topic("orders")
//!     .consumer_group("billing")
//!     .client(transport)
//!     .build()
//!     .await?;
//! while let Some(delivery) = consumer.receive().await? {
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The driver task runs on smol's global executor.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// The same API as the other runtime's crate (the QUIC transport with feature `quic`).
pub use rustmq_consumer_core::adapter::*;

/// A [`QuicTransport`] to the broker in `config`, running on smol (feature `quic`, on by
/// default). Nothing touches the network until the first request.
///
/// ```no_run
/// # fn main() -> Result<(), rustmq_consumer_smol::QuicError> {
/// use rustmq_consumer_smol::{quic_transport, QuicConfig, TlsMode};
///
/// // Today's RustMQ broker shows a self-signed certificate it regenerates at every start.
/// let addr = "127.0.0.1:9092".parse().expect("an address");
/// let transport = quic_transport(
///     QuicConfig::new(addr, "localhost").with_tls(TlsMode::DangerousAcceptAnyCertificate),
/// )?;
/// # drop(transport);
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "quic")]
pub fn quic_transport(config: QuicConfig) -> Result<QuicTransport, QuicError> {
    QuicTransport::new(
        config,
        std::sync::Arc::new(rustmq_consumer_core::quic::quinn::SmolRuntime),
    )
}

/// The consumer builder bound to smol: `ConsumerBuilder::new()`.
pub type ConsumerBuilder = rustmq_consumer_core::ConsumerBuilder<SmolRuntime>;

/// The smol [`Runtime`]: the system clock, `async_io::Timer` and smol's global executor.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmolRuntime;

impl Runtime for SmolRuntime {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SmolTimer(smol::Timer::at(deadline)))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        smol::spawn(future).detach();
    }
}

/// An `async_io::Timer` as an [`AsyncTimer`].
#[derive(Debug)]
struct SmolTimer(smol::Timer);

impl AsyncTimer for SmolTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.0.set_at(deadline);
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reset_timer_fires_again() {
        smol::block_on(async {
            let rt = SmolRuntime;
            let start = rt.now();
            let mut timer = rt.new_timer(start + Duration::from_millis(1));
            std::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
            let first = rt.now();
            assert!(first >= start + Duration::from_millis(1));
            timer.as_mut().reset(first + Duration::from_millis(2));
            std::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
            assert!(rt.now() >= first + Duration::from_millis(2));
        });
    }

    #[test]
    fn spawn_runs_the_future() {
        let (tx, rx) = smol::channel::bounded(1);
        SmolRuntime.spawn(Box::pin(async move {
            let _ = tx.send(7).await;
        }));
        assert_eq!(smol::block_on(rx.recv()).ok(), Some(7));
    }
}
