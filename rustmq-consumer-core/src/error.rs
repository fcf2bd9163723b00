//! Errors: usage errors returned by commands, transport errors fed in as inputs.

use thiserror::Error;

/// A command the state machine refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The partition is not assigned to this consumer.
    #[error("partition {0} is not assigned")]
    UnknownPartition(u32),
    /// No delivery of that offset is outstanding with the application.
    #[error("no outstanding delivery of offset {offset} on partition {partition}")]
    UnknownDelivery {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// The delivery belongs to an earlier assignment, seek or attempt.
    #[error("stale delivery of offset {offset} on partition {partition}")]
    StaleDelivery {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// The delivery was already acked, nacked or rejected.
    #[error(
        "delivery of offset {offset} on partition {partition} is already settled or handed back"
    )]
    NotOutstanding {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// The consumer is closing or closed.
    #[error("consumer is closed")]
    Closed,
}

/// Why a request produced no response. Fed to `handle_response`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection was lost or could not be made.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The broker answered with its error frame (0xFF).
    #[error("broker error: {0}")]
    Broker(String),
    /// The broker answered with zero bytes (it did not know the request type).
    #[error("empty response")]
    EmptyResponse,
    /// The response could not be decoded.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The response exceeded the size cap.
    #[error("response of {0} bytes exceeds the cap")]
    ResponseTooLarge(usize),
    /// The request frame exceeds the broker's 8 KiB limit and was not sent.
    #[error("request of {0} bytes exceeds the 8192-byte frame limit")]
    RequestTooLarge(usize),
    /// The transport gave up waiting.
    #[error("request timed out")]
    TimedOut,
    /// No connection could be made: nothing answered the handshake in time, or the peer
    /// refused the connection. Worth retrying.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed: the broker's certificate was refused (with the rustls reason,
    /// such as `UnknownIssuer`) or the broker refused the handshake. Retrying cannot help until
    /// the certificate or the trust settings change.
    #[error("tls handshake failed: {0}")]
    Tls(String),
}

impl TransportError {
    /// True when the request got no answer from the broker at all: no connection, a lost
    /// connection, a refused handshake or a deadline. (An error frame, an empty or malformed
    /// answer means the broker was reached.)
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::ConnectionLost(_) | Self::Connect(_) | Self::Tls(_) | Self::TimedOut
        )
    }

    /// True when retrying cannot help until the configuration or the broker's certificate
    /// changes ([`TransportError::Tls`]).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}
