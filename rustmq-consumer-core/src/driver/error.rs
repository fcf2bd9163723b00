//! The errors the application sees from the consumer.

use thiserror::Error;

use super::rebalance::Hook;
use crate::config::{ConfigError, ConfigUpdateError};
use crate::error::{TransportError, UsageError};
use crate::event::{CommitError, StallReason};

/// Why a consumer call failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// `build()` without a transport (`.client(..)` or `.transport(..)`).
    #[error("no transport given")]
    MissingTransport,
    /// The configuration failed validation (a missing topic or group included).
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A configuration update was refused ([`Consumer::update_config`](super::Consumer::update_config)):
    /// it changes a setting fixed while running, or fails validation. Nothing changed.
    #[error("configuration update refused: {0}")]
    ConfigUpdate(#[from] ConfigUpdateError),
    /// The state machine refused the command (stale delivery, unknown partition, closed...).
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// `commit()` or `close()` could not get every settled offset stored: the broker did not
    /// confirm these. They stay settled: a later commit may still store them, and otherwise
    /// the next consumer of the partition reads them again (at least once).
    #[error("offsets not committed ({}): {cause}", list(offsets))]
    #[non_exhaustive]
    Uncommitted {
        /// Each partition whose settlements the broker has not confirmed, with its settle
        /// watermark (the offset a commit would store: the next one to read). Empty when the
        /// partitions were revoked since (their offsets go to their next owner).
        offsets: Vec<(u32, u64)>,
        /// Why the last commit failed.
        cause: CommitError,
    },
    /// `close_with_timeout` gave up; the consumer was stopped without finishing its close.
    /// `offsets` names what the broker did not confirm storing, as
    /// [`Uncommitted`](Self::Uncommitted) does; they go to the partitions' next consumer.
    #[error("close timed out{}", uncommitted(offsets))]
    #[non_exhaustive]
    CloseTimedOut {
        /// Each partition whose settlements the broker has not confirmed, with its settle
        /// watermark (the offset a commit would store). Empty when every settlement was stored.
        offsets: Vec<(u32, u64)>,
    },
    /// The broker cannot be reached or refused the handshake. Not fatal: the consumer keeps
    /// trying (under its circuit breaker) and goes on when the broker answers again. Reported
    /// once per outage by `receive()` and the delivery stream, and by `health_report()` while
    /// it lasts.
    #[error("broker unreachable: {cause}")]
    Unreachable {
        /// Why: the transport's error (refused, timed out, the TLS reason...).
        cause: TransportError,
        /// Whether the broker had ever answered this consumer before.
        ever_connected: bool,
    },
    /// A partition cannot make progress (its fetches fail, or a poison message cannot be
    /// dead-lettered); the others go on. Not fatal: reported once per stall by `receive()` and
    /// the delivery stream, and by `health_report()` while it lasts.
    #[error("partition {partition} stalled at offset {offset}: {reason}")]
    Stalled {
        /// Partition.
        partition: u32,
        /// The offset it is stuck at.
        offset: u64,
        /// Why.
        reason: StallReason,
    },
    /// A [`RebalanceListener`](super::RebalanceListener) hook failed or overran its
    /// `rebalance_drain_timeout`; the rebalance went on without it. Not fatal.
    #[error("rebalance listener's {hook} hook failed for partitions {partitions:?}: {cause}")]
    Listener {
        /// Which hook.
        hook: Hook,
        /// The partitions it was called for.
        partitions: Vec<u32>,
        /// The hook's error, or the overrun.
        cause: String,
    },
}

/// `; offsets not committed (partition 0 at 6)`, or nothing when none is.
fn uncommitted(offsets: &[(u32, u64)]) -> String {
    if offsets.is_empty() {
        String::new()
    } else {
        format!("; offsets not committed ({})", list(offsets))
    }
}

/// `partition 0 at 6, partition 3 at 10`.
fn list(offsets: &[(u32, u64)]) -> String {
    let named: Vec<String> = offsets
        .iter()
        .map(|(p, o)| format!("partition {p} at {o}"))
        .collect();
    named.join(", ")
}

impl ConsumerError {
    /// The error for any call made after the consumer has closed.
    pub(crate) fn closed() -> Self {
        Self::Usage(UsageError::Closed)
    }

    /// True when retrying cannot help: a broker certificate the consumer will never accept
    /// (see [`TransportError::is_permanent`]).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Unreachable { cause, .. } if cause.is_permanent())
    }
}
