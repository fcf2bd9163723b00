//! The rebalance listener: application hooks that run inside the group protocol.
//!
//! The driver runs at most one hook at a time, polled inside its own task beside every other
//! input (so the hook can ack, seek and commit through the consumer while it runs), never
//! while it holds the ack gate's lock. A revoke hook runs after [`Event::Revoking`]: the
//! machine [holds the revoke commit](crate::ConsumerMachine::hold_revokes) until it returns.
//! An assign hook runs after [`Event::Assigned`] while the inbox holds the new partitions'
//! deliveries back. Each hook has `rebalance_drain_timeout`; one that fails or overruns is
//! reported (`ConsumerError::Listener`) and the protocol goes on.
//!
//! [`Event::Revoking`]: crate::Event::Revoking
//! [`Event::Assigned`]: crate::Event::Assigned

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use super::consumer::Consumer;
use super::runtime::{AsyncTimer, Runtime};

/// What a rebalance hook may fail with: any error, reported with its `Display`.
pub type ListenerError = Box<dyn std::error::Error + Send + Sync>;

/// Hooks around a rebalance, like Kafka's `ConsumerRebalanceListener`. Set one with
/// [`ConsumerBuilder::rebalance_listener`](super::ConsumerBuilder::rebalance_listener).
///
/// Both run inside the consumer's protocol, one at a time, and each may take up to the
/// config's `rebalance_drain_timeout`; the consumer keeps serving the hook's calls (acks,
/// seeks, commits) meanwhile. A hook that fails or overruns is reported through `receive()`
/// as [`ConsumerError::Listener`](super::ConsumerError::Listener) and the rebalance goes on.
///
/// ```
/// use rustmq_consumer_core::{async_trait, Consumer, ListenerError, RebalanceListener};
///
/// struct FlushOnRevoke;
///
/// #[async_trait]
/// impl RebalanceListener for FlushOnRevoke {
///     async fn on_partitions_revoked(
///         &self,
///         _consumer: &Consumer,
///         partitions: &[u32],
///     ) -> Result<(), ListenerError> {
///         // Finish the work of `partitions` and ack it: the acks go into the revoke commit.
///         println!("revoked {partitions:?}");
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait RebalanceListener: Send + Sync + 'static {
    /// These partitions are being taken away. Deliveries of them have stopped (those not yet
    /// received are handed back); acks made before this returns are in the revoke commit,
    /// made under the generation that owned them.
    async fn on_partitions_revoked(
        &self,
        consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        let _ = (consumer, partitions);
        Ok(())
    }

    /// These partitions are now this consumer's. No delivery of them reaches the application
    /// before this returns; a [`Consumer::seek`] here takes effect before the first one.
    async fn on_partitions_assigned(
        &self,
        consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        let _ = (consumer, partitions);
        Ok(())
    }
}

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Hook {
    /// [`RebalanceListener::on_partitions_revoked`].
    Revoke,
    /// [`RebalanceListener::on_partitions_assigned`].
    Assign,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Revoke => "revoke",
            Hook::Assign => "assign",
        })
    }
}

type HookFuture = Pin<Box<dyn Future<Output = Result<(), ListenerError>> + Send>>;

struct Running {
    hook: Hook,
    partitions: Vec<u32>,
    future: HookFuture,
    limit: Duration,
    overrun: Pin<Box<dyn AsyncTimer>>,
}

/// A hook that ended: returned, failed (`Err` with the cause) or overran.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) hook: Hook,
    pub(crate) partitions: Vec<u32>,
    pub(crate) result: Result<(), String>,
}

/// The driver's hook runner: a queue of hooks to run and the one running.
pub(crate) struct Hooks {
    listener: Arc<dyn RebalanceListener>,
    /// The handle hooks get; it does not keep the consumer alive.
    consumer: Consumer,
    queue: VecDeque<(Hook, Vec<u32>)>,
    running: Option<Running>,
}

impl Hooks {
    pub(crate) fn new(listener: Arc<dyn RebalanceListener>, consumer: Consumer) -> Self {
        Self {
            listener,
            consumer,
            queue: VecDeque::new(),
            running: None,
        }
    }

    /// Runs `hook` for `partitions` after those queued before it.
    pub(crate) fn push(&mut self, hook: Hook, partitions: Vec<u32>) {
        self.queue.push_back((hook, partitions));
    }

    /// Drops the revoke hook, running or queued (the machine let the partitions go: it
    /// overran); returns its partitions when there was one.
    pub(crate) fn cancel_revoke(&mut self) -> Option<Vec<u32>> {
        if let Some(at) = self.queue.iter().position(|(h, _)| *h == Hook::Revoke) {
            return self.queue.remove(at).map(|(_, partitions)| partitions);
        }
        match self.running.take() {
            Some(running) if running.hook == Hook::Revoke => Some(running.partitions),
            other => {
                self.running = other;
                None
            }
        }
    }

    /// Starts the next hook if none runs (it may take `limit`: the config's
    /// `rebalance_drain_timeout` in force), and polls the running one and its overrun timer.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        runtime: &dyn Runtime,
        limit: Duration,
    ) -> Poll<Ended> {
        if self.running.is_none() {
            let Some((hook, partitions)) = self.queue.pop_front() else {
                return Poll::Pending;
            };
            let listener = Arc::clone(&self.listener);
            let consumer = self.consumer.clone();
            let parts = partitions.clone();
            let future: HookFuture = Box::pin(async move {
                match hook {
                    Hook::Revoke => listener.on_partitions_revoked(&consumer, &parts).await,
                    Hook::Assign => listener.on_partitions_assigned(&consumer, &parts).await,
                }
            });
            tracing::debug!(%hook, ?partitions, "rebalance listener called");
            self.running = Some(Running {
                hook,
                partitions,
                future,
                limit,
                overrun: runtime.new_timer(crate::backoff::later(runtime.now(), limit)),
            });
        }
        let Some(running) = &mut self.running else {
            return Poll::Pending;
        };
        let result = match running.future.as_mut().poll(cx) {
            Poll::Ready(result) => result.map_err(|error| error.to_string()),
            Poll::Pending => match running.overrun.as_mut().poll(cx) {
                Poll::Ready(()) => Err(format!("overran {:?}", running.limit)),
                Poll::Pending => return Poll::Pending,
            },
        };
        let Some(Running {
            hook, partitions, ..
        }) = self.running.take()
        else {
            return Poll::Pending;
        };
        Poll::Ready(Ended {
            hook,
            partitions,
            result,
        })
    }
}
