//! The errors the application sees from the consumer.

use thiserror::Error;

use crate::config::ConfigError;
use crate::error::UsageError;

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
    /// The state machine refused the command (stale delivery, unknown partition, closed...).
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The broker did not store the commit.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// `close_with_timeout` gave up; the consumer was stopped without finishing its close.
    #[error("close timed out")]
    CloseTimedOut,
}

impl ConsumerError {
    /// The error for any call made after the consumer has closed.
    pub(crate) fn closed() -> Self {
        Self::Usage(UsageError::Closed)
    }
}
