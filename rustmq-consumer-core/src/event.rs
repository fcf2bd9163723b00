//! What the state machine tells its driver: transmits, events, timer reasons, query results.

use std::time::Duration;

use thiserror::Error;

use crate::error::TransportError;
use crate::protocol::{Record, Request, RequestKind, TopicPartition, CUT_IN_TRANSIT};

/// Identifies one request from transmit to response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A request the driver must send. Its answer goes back through `handle_response` with `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Correlates the answer.
    pub id: RequestId,
    /// What to send.
    pub request: Request,
}

/// Names one delivery of one message. Acks, nacks and rejects take it back.
///
/// A tag goes stale when its partition is revoked (lost to another member, or let go at the
/// close) or sought, or when the message was redelivered since; a stale tag is refused and
/// never moves a watermark. A rebalance that gives a partition back to this member does not
/// make its tags stale: they are accepted before, during and after the rejoin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryTag {
    /// Partition of the consumed topic.
    pub partition: u32,
    /// Offset of the message.
    pub offset: u64,
    /// Assignment epoch of the partition when it was delivered (a partition given back in a
    /// rebalance gets a new epoch, and its tags of earlier epochs stay valid).
    pub epoch: u64,
    /// Delivery attempt, from 1.
    pub attempt: u32,
}

/// A message handed to the application ([`Event::Deliver`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Settle it with this.
    pub tag: DeliveryTag,
    /// The message.
    pub record: Record,
}

/// State of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Nothing is sent until the recovery timeout passes.
    Open,
    /// A bounded number of probe requests decides.
    HalfOpen,
}

/// A phase of `close`. Each is reported as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ClosePhase {
    /// No more fetches or deliveries; waiting for outstanding deliveries (bounded).
    Draining,
    /// Waiting for confirmed dead letters (bounded).
    FlushingDeadLetters,
    /// The final commit is in flight (bounded).
    FinalCommit,
    /// Leaving the consumer group, after the final commit (bounded).
    LeavingGroup,
    /// Done: nothing more will be sent.
    Closed,
}

/// Why a partition cannot make progress.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StallReason {
    /// A poison message cannot fit in one dead-letter request.
    #[error("dead-letter request of {size} bytes exceeds the frame limit")]
    DeadLetterTooLarge {
        /// Size of the request it would need.
        size: usize,
    },
    /// The dead-letter request carrying a poison message of this partition is over one packet
    /// and was read in part this many times in a row: the real broker reads one packet of a
    /// request when its packets arrive apart, as over a network (PROTOCOL.md). It is retried
    /// with backoff, and [`Event::Recovered`] says when it gets through.
    #[error("dead-letter request of {size} bytes cut in transit {cuts} times in a row")]
    DeadLetterCut {
        /// Size of the request.
        size: usize,
        /// Cuts in a row so far.
        cuts: u32,
    },
    /// The broker answers this partition's fetches with an error that names the partition
    /// (a non-zero `error_code`, `Partition not found`); the partition backs off and tries
    /// again, and [`Event::Recovered`] says when a fetch succeeds.
    #[error("fetches fail: {error}")]
    FetchFailing {
        /// The latest failure.
        error: RequestError,
    },
}

/// Why a request failed ([`Event::RequestFailed`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No response: transport failure, broker error frame, malformed answer, or the request
    /// deadline passed ([`TransportError::TimedOut`]).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The broker answered with an error code.
    #[error("error code {code} from {request:?}")]
    ErrorCode {
        /// The request refused.
        request: RequestKind,
        /// The broker's error code.
        code: u32,
        /// The broker's error message, when the response carries one.
        message: Option<String>,
    },
    /// The broker answered with a response of another type.
    #[error("unexpected {got:?} response to {request:?}")]
    UnexpectedResponse {
        /// The request sent.
        request: RequestKind,
        /// The response type received.
        got: RequestKind,
    },
}

impl RequestError {
    /// True when the broker answered a fetch with an error that is one partition's problem
    /// (an error code, `Partition not found`) rather than the broker's: that partition backs
    /// off, the circuit breaker does not count it.
    pub fn names_partition(&self) -> bool {
        match self {
            Self::ErrorCode {
                request: RequestKind::Fetch,
                ..
            } => true,
            Self::Transport(TransportError::Broker(message)) => {
                message.contains("Partition not found")
            }
            _ => false,
        }
    }

    /// True when the broker read only part of the request: its single read of a request got
    /// the packets that had arrived, and the rest came later (a frame straddling two packets,
    /// over a network; see PROTOCOL.md). A fault of the path, not of the broker, which
    /// answered at once: the request is retried, the circuit breaker does not count it.
    pub fn cut_in_transit(&self) -> bool {
        matches!(self, Self::Transport(TransportError::Broker(message))
            if message.contains(CUT_IN_TRANSIT))
    }
}

/// Why a commit failed ([`Event::CommitFailed`]). Its offsets stay settled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The request failed or the broker refused it; the offsets go with the next commit.
    #[error("the broker did not confirm the commit")]
    Unconfirmed,
    /// The group coordinator rejected it (unknown group, illegal generation): the group moved
    /// on, and the commit is not retried under this generation.
    #[error("commit rejected with error code {code}")]
    Rejected {
        /// The coordinator's error code.
        code: u32,
    },
    /// Closing: the coordinator had refused this generation's commits.
    #[error("the coordinator refused this generation's commits")]
    Fenced,
    /// Closing: the final commit's deadline passed before the broker confirmed it.
    #[error("closed before the final commit was confirmed")]
    CloseDeadline,
    /// A rebalance needed a commit while the circuit was open.
    #[error("circuit open during a rebalance: settled offsets not committed")]
    CircuitOpen,
}

/// Why a message was dropped without reaching a dead-letter topic ([`Event::Discarded`]),
/// also the last reason a dead-letter record carries.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DiscardReason {
    /// Nacked more than `max_retry_attempts` times.
    #[error("retries exhausted after {attempts} attempts")]
    RetriesExhausted {
        /// Deliveries it had.
        attempts: u32,
    },
    /// The application rejected it, with this reason.
    #[error("{0}")]
    Rejected(String),
    /// Fetched again (the cache had lost it) and no longer on the broker (retention).
    #[error("message no longer on the broker")]
    NoLongerOnBroker,
}

/// Something the application or the driver should know. Drain with `poll_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message for the application.
    Deliver(Message),
    /// The broker stored these offsets (next offset to read). `ticket` covers every
    /// `commit()` ticket up to it.
    Committed {
        /// Highest on-demand ticket this commit covers (0: none).
        ticket: u64,
        /// Partition and committed offset.
        offsets: Vec<(u32, u64)>,
    },
    /// A commit failed; its offsets stay settled and are sent again with the next commit.
    CommitFailed {
        /// Highest on-demand ticket this commit covered.
        ticket: u64,
        /// Why.
        error: CommitError,
    },
    /// A poison message is in the dead-letter topic; its offset is settled.
    DeadLettered {
        /// Partition of the source.
        partition: u32,
        /// Offset in the source.
        offset: u64,
        /// Deliveries it had.
        attempts: u32,
    },
    /// A poison message was dropped (no dead-letter topic configured); its offset is settled.
    Discarded {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Deliveries it had.
        attempts: u32,
        /// Why.
        reason: DiscardReason,
    },
    /// The circuit breaker changed state.
    BreakerChanged {
        /// Before.
        from: BreakerState,
        /// After.
        to: BreakerState,
    },
    /// Partitions now consumed.
    Assigned(Vec<TopicPartition>),
    /// A rebalance started: no more deliveries of these partitions. The revoke commit follows
    /// once their outstanding deliveries settle and a rebalance listener (if the machine
    /// [holds revokes](crate::ConsumerMachine::hold_revokes)) returned, or at
    /// `rebalance_drain_timeout`; the partitions are then let go ([`Event::Revoked`] for those
    /// the next assignment does not give back).
    Revoking(Vec<TopicPartition>),
    /// Partitions no longer consumed: their outstanding deliveries are stale from here on.
    /// A rebalance lets every partition go, but says `Revoked` only for those the next
    /// assignment does not give back (or at the close); one given back keeps its position and
    /// its outstanding deliveries. `Revoked` followed by `Assigned` of a partition: it was
    /// given back, but another member committed past this one meanwhile, so it starts over at
    /// that commit.
    Revoked(Vec<TopicPartition>),
    /// The coordinator assigned partitions of topics this consumer did not subscribe to.
    AssignmentIgnored(Vec<TopicPartition>),
    /// A partition cannot move past `offset`: until an operator acts (a poison message too
    /// large for a dead-letter request), or until its fetches succeed again or its
    /// dead-letter request gets through ([`Event::Recovered`]).
    Stalled {
        /// Partition.
        partition: u32,
        /// The offset that cannot settle.
        offset: u64,
        /// Why.
        reason: StallReason,
    },
    /// A partition stalled by failing fetches ([`StallReason::FetchFailing`]) fetched again, or
    /// its dead-letter request cut in transit ([`StallReason::DeadLetterCut`]) got through.
    Recovered {
        /// Partition.
        partition: u32,
    },
    /// A request failed (transport, broker error frame, error code or deadline).
    RequestFailed {
        /// Which request.
        id: RequestId,
        /// Why.
        error: RequestError,
    },
    /// A close phase started.
    Closing(ClosePhase),
    /// Closed: nothing more will happen.
    Closed,
}

/// Why the state machine wants to be woken (`poll_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A request's deadline.
    RequestDeadline,
    /// Settled offsets waited `ack_batch_timeout` for a commit, or a full batch
    /// `ack_batch_min_interval` since the last one.
    AckFlush,
    /// A nacked message is due for redelivery.
    Retry,
    /// A partition's next fetch after an empty one or a failure.
    FetchBackoff,
    /// A dead-letter produce is due for another try.
    DeadLetterRetry,
    /// The circuit breaker's recovery or half-open deadline.
    Breaker,
    /// A cached message's time to live.
    CacheTtl,
    /// A commit that failed is due for another try.
    CommitRetry,
    /// A close phase's deadline.
    Close,
    /// The group heartbeat is due.
    Heartbeat,
    /// The group session expires without a confirmed heartbeat.
    SessionExpiry,
    /// A group request (FindCoordinator, JoinGroup) is due for another try.
    GroupRetry,
    /// A rebalance's drain deadline.
    Rebalance,
}

/// Lag of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition.
    pub partition: u32,
    /// Next offset the broker will write, from the latest fetch (`None` before any).
    pub high_watermark: Option<u64>,
    /// Last offset the broker confirmed as committed (next offset to read).
    pub committed: Option<u64>,
    /// Next offset this consumer will fetch.
    pub position: u64,
    /// High watermark minus the committed offset (or minus the settle watermark before any commit).
    pub lag: u64,
    /// High watermark minus the position: what is not fetched yet.
    pub position_lag: u64,
    /// Age of the oldest delivered, unsettled message.
    pub oldest_unsettled_age: Option<Duration>,
}

/// How the consumer is doing, from the breaker and from progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Circuit closed, no partition stalled.
    Healthy,
    /// Circuit half-open, or a partition stalled.
    Degraded,
    /// Circuit open: the broker is unreachable or failing.
    Unhealthy,
    /// Closing or closed.
    Closed,
}

/// A snapshot of counters and gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Metrics {
    /// Messages received from fetches.
    pub received: u64,
    /// Deliveries to the application (redeliveries included).
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Nacks (explicit, dropped handles included).
    pub nacked: u64,
    /// Redeliveries.
    pub retried: u64,
    /// Rejects.
    pub rejected: u64,
    /// Messages confirmed in the dead-letter topic.
    pub dead_lettered: u64,
    /// Poison messages dropped for want of a dead-letter topic.
    pub discarded: u64,
    /// Commit requests sent.
    pub commits_sent: u64,
    /// Commits that failed.
    pub commits_failed: u64,
    /// Settlements carried by successful commits.
    pub committed_settlements: u64,
    /// Largest settlement count of one commit.
    pub max_batch: u64,
    /// Requests failed (transport, broker, deadline).
    pub requests_failed: u64,
    /// Fetch requests sent.
    pub fetches: u64,
    /// Single-offset fetches for retries the cache had lost.
    pub refetches: u64,
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Cache evictions (capacity and time to live).
    pub cache_evictions: u64,
    /// Breaker transitions.
    pub breaker_transitions: u64,
    /// Requests in flight now.
    pub in_flight_requests: u64,
    /// Deliveries outstanding with the application now.
    pub in_flight_deliveries: u64,
    /// Fetched messages buffered now.
    pub buffered: u64,
    /// Messages in the cache now: records handed back for a retry or a dead letter (a
    /// delivery is not copied in).
    pub cached: u64,
    /// Bytes the cache holds now.
    pub cached_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_naming_a_partition_are_the_partitions_failure() {
        let code = |request| RequestError::ErrorCode {
            request,
            code: 1,
            message: Some("Failed to fetch records".into()),
        };
        let frame = |text: &str| RequestError::Transport(TransportError::Broker(text.into()));
        assert!(code(RequestKind::Fetch).names_partition());
        assert!(frame("Partition not found: t:0").names_partition());
        assert!(!code(RequestKind::CommitOffset).names_partition());
        assert!(!frame("Serialization error: bad tag").names_partition());
        assert!(!RequestError::Transport(TransportError::TimedOut).names_partition());
        let lost = TransportError::ConnectionLost("reset".into());
        assert!(!RequestError::Transport(lost).names_partition());
    }

    #[test]
    fn only_a_request_read_in_part_was_cut_in_transit() {
        let frame = |text: &str| RequestError::Transport(TransportError::Broker(text.into()));
        assert!(frame("Serialization error: io error: unexpected end of file").cut_in_transit());
        assert!(!frame("Serialization error: invalid value: integer `7`").cut_in_transit());
        assert!(!frame("Partition not found: t:0").cut_in_transit());
        assert!(!RequestError::Transport(TransportError::TimedOut).cut_in_transit());
        let malformed = TransportError::Malformed("unexpected end of file".into());
        assert!(!RequestError::Transport(malformed).cut_in_transit());
    }
}
