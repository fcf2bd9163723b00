//! The RustMQ consumer on tokio.
//!
//! [`TokioRuntime`] implements the core's [`Runtime`] with tokio's clock, timers and
//! `tokio::spawn`; everything else is the core's runtime-agnostic API, re-exported under the
//! same names as `rustmq-consumer-smol`, so switching runtime is a one-line change:
//!
//! ```no_run
//! use rustmq_consumer_tokio::{ConsumerBuilder, ConsumerError, Transport};
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
//! Time is read with `tokio::time::Instant::now()`, so a test on tokio's paused clock
//! (`#[tokio::test(start_paused = true)]`) runs the whole consumer in virtual time.
//! `build()` must be called inside a tokio runtime (it spawns the driver task).
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// The same API as the other runtime's crate (the QUIC transport with feature `quic`).
pub use rustmq_consumer_core::adapter::*;

/// A [`QuicTransport`] to the broker in `config`, running on tokio (feature `quic`, on by
/// default). Nothing touches the network until the first request.
///
/// ```no_run
/// # fn main() -> Result<(), rustmq_consumer_tokio::QuicError> {
/// use rustmq_consumer_tokio::{quic_transport, QuicConfig, TlsMode};
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
        std::sync::Arc::new(rustmq_consumer_core::quic::quinn::TokioRuntime),
    )
}

/// The consumer builder bound to tokio: `ConsumerBuilder::new()`.
pub type ConsumerBuilder = rustmq_consumer_core::ConsumerBuilder<TokioRuntime>;

/// The tokio [`Runtime`]: tokio's (pausable) clock, `sleep_until` timers and `tokio::spawn`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(TokioTimer(Box::pin(tokio::time::sleep_until(
            deadline.into(),
        ))))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        drop(tokio::spawn(future));
    }
}

/// A tokio `Sleep` as an [`AsyncTimer`].
#[derive(Debug)]
struct TokioTimer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for TokioTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.0.as_mut().reset(deadline.into());
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn timer_follows_the_paused_clock() {
        let rt = TokioRuntime;
        let start = rt.now();
        rustmq_consumer_core::sleep(&rt, Duration::from_secs(3600)).await;
        assert!(rt.now() >= start + Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn reset_timer_fires_at_the_new_deadline() {
        let rt = TokioRuntime;
        let start = rt.now();
        let mut timer = rt.new_timer(start + Duration::from_secs(10));
        timer.as_mut().reset(start + Duration::from_secs(1));
        std::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
        let elapsed = rt.now() - start;
        assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn spawn_runs_the_future() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        TokioRuntime.spawn(Box::pin(async move {
            let _ = tx.send(7);
        }));
        assert_eq!(rx.await.ok(), Some(7));
    }
}
