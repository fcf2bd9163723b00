//! The three things the driver needs from an async runtime: a clock, timers and spawning.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// An async runtime as the driver sees it (modelled on quinn's `Runtime`).
///
/// The driver reads time only through [`Runtime::now`], so a runtime with a paused or virtual
/// clock (tokio's `start_paused`, the testkit's virtual runtime) drives the whole consumer on
/// its own timeline.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// The current time on this runtime's clock.
    fn now(&self) -> Instant;
    /// A timer that fires at `deadline` on this runtime's clock.
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>>;
    /// Runs `future` to completion in the background.
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>);
}

/// A resettable timer created by [`Runtime::new_timer`].
pub trait AsyncTimer: Send + fmt::Debug + 'static {
    /// Moves the deadline (earlier or later); the timer is armed again if it had fired.
    fn reset(self: Pin<&mut Self>, deadline: Instant);
    /// Ready once the runtime's clock reaches the deadline.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
}

/// A future that completes at a deadline on a runtime's clock. See [`sleep_until`].
#[derive(Debug)]
#[must_use = "a sleep does nothing unless awaited"]
pub struct Sleep {
    timer: Pin<Box<dyn AsyncTimer>>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.as_mut().poll(cx)
    }
}

/// Completes when `runtime`'s clock reaches `deadline`.
pub fn sleep_until(runtime: &dyn Runtime, deadline: Instant) -> Sleep {
    Sleep {
        timer: runtime.new_timer(deadline),
    }
}

/// Completes after `duration` on `runtime`'s clock.
pub fn sleep(runtime: &dyn Runtime, duration: Duration) -> Sleep {
    sleep_until(runtime, crate::backoff::later(runtime.now(), duration))
}

/// Runs `future` until it completes or `duration` passes on `runtime`'s clock (`None`).
pub async fn timeout<F: Future>(
    runtime: &dyn Runtime,
    duration: Duration,
    future: F,
) -> Option<F::Output> {
    let expiry = sleep(runtime, duration);
    futures_lite::future::or(async { Some(future.await) }, async {
        expiry.await;
        None
    })
    .await
}
