//! [`SimTransport`]: an in-memory [`Transport`] from a consumer to a shared [`SimBroker`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rustmq_consumer_core::protocol::{Request, Response};
use rustmq_consumer_core::{sleep, Runtime, Transport, TransportError};

use crate::broker::SimBroker;

/// A [`SimBroker`] shared by transports, tests and examples.
#[derive(Debug, Clone, Default)]
pub struct SharedBroker(Arc<Mutex<SimBroker>>);

impl SharedBroker {
    /// Shares `broker`.
    pub fn new(broker: SimBroker) -> Self {
        Self(Arc::new(Mutex::new(broker)))
    }

    /// Locks the broker to set it up or inspect it. Do not hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, SimBroker> {
        // A panic while the lock was held cannot leave the broker half-updated in a way that
        // matters to a test: keep going with the state as it is.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Connects a consumer to a [`SharedBroker`] in memory.
///
/// Each request waits `latency` on the runtime's clock (none by default), then runs the
/// broker's due `handle_timeout` (its session reaper) and the request itself at the runtime's
/// current time; an answer that owes a delay (a cold-tier cache miss, see
/// [`SimBroker::set_cold_read_latency`]) is returned once that delay has passed on the
/// runtime's clock. Broker error frames become [`TransportError::Broker`].
#[derive(Clone)]
pub struct SimTransport {
    broker: SharedBroker,
    runtime: Arc<dyn Runtime>,
    latency: Duration,
}

impl fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTransport")
            .field("runtime", &self.runtime)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl SimTransport {
    /// A transport to `broker` that reads time from `runtime`.
    pub fn new(broker: SharedBroker, runtime: impl Runtime) -> Self {
        Self {
            broker,
            runtime: Arc::new(runtime),
            latency: Duration::ZERO,
        }
    }

    /// Delays every request by `latency` (on the runtime's clock).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The broker behind this transport.
    pub fn broker(&self) -> &SharedBroker {
        &self.broker
    }
}

#[async_trait]
impl Transport for SimTransport {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        if !self.latency.is_zero() {
            sleep(&*self.runtime, self.latency).await;
        }
        let now = self.runtime.now();
        let (answer, owed) = {
            let mut broker = self.broker.lock();
            if broker.poll_timeout().is_some_and(|due| due <= now) {
                broker.handle_timeout(now);
            }
            let answer = broker.transmit(now, request);
            (answer, broker.take_answer_delay())
        };
        if !owed.is_zero() {
            sleep(&*self.runtime, owed).await;
        }
        answer
    }
}

/// A [`SimTransport`] that can be stopped: while down every request fails at once with `cause`
/// (what the QUIC transport answers between reconnection attempts); while up it is the
/// simulated broker. A stop does not touch the broker's state. Clones share the switch.
#[derive(Clone)]
pub struct Switch {
    inner: SimTransport,
    down: Arc<AtomicBool>,
    cause: TransportError,
}

impl fmt::Debug for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switch")
            .field("down", &self.down.load(Ordering::SeqCst))
            .field("cause", &self.cause)
            .finish_non_exhaustive()
    }
}

impl Switch {
    /// A switch, up, in front of `broker` on `runtime`'s clock.
    pub fn new(broker: &SharedBroker, runtime: impl Runtime, cause: TransportError) -> Self {
        Self {
            inner: SimTransport::new(broker.clone(), runtime),
            down: Arc::new(AtomicBool::new(false)),
            cause,
        }
    }

    /// Stops (`true`) or restarts the way to the broker.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

#[async_trait]
impl Transport for Switch {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(self.cause.clone());
        }
        self.inner.request(request).await
    }
}
