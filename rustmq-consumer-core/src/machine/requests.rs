//! Requests in flight: ids, deadlines, the breaker permit each holds, the owner its answer
//! goes to, and the queue of transmits not yet taken by the driver.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rustc_hash::FxBuildHasher;
use tracing::trace;

use super::dead_letter::DeadLetterEntry;
use crate::backoff::later;
use crate::breaker::Permit;
use crate::event::{RequestError, RequestId, Transmit};
use crate::protocol::{Request, RequestKind, Response};

/// Who sent a request, and what its answer settles.
#[derive(Debug)]
pub(crate) enum Owner {
    /// The committed offsets of the starting partitions it lists (under their epochs): as
    /// many as fit one packet's frame.
    FetchOffset(Vec<StartOwner>),
    /// A one-record fetch that reports the high watermark (start position Latest).
    ResolveLatest(FetchOwner),
    /// A partition's fetch.
    Fetch(FetchOwner),
    /// A single-offset fetch of a message the cache lost.
    Refetch(FetchOwner),
    /// A commit.
    Commit {
        /// What it commits.
        entries: Vec<CommitEntry>,
        /// Highest `commit()` ticket it covers.
        ticket: u64,
    },
    /// Which broker coordinates the group.
    FindCoordinator,
    /// Joining the group.
    Join,
    /// A heartbeat under `generation`.
    Heartbeat {
        /// The generation it was sent under.
        generation: u64,
    },
    /// Leaving the group.
    Leave,
    /// A batch of dead letters.
    DeadLetter {
        /// The entries produced.
        batch: Vec<DeadLetterEntry>,
        /// The request's frame, in bytes.
        size: usize,
    },
}

/// A starting partition (under its epoch) a FetchOffset asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StartOwner {
    pub(crate) partition: u32,
    pub(crate) epoch: u64,
}

/// The partition (under its epoch) and offset a fetch asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FetchOwner {
    pub(crate) partition: u32,
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
}

/// One partition's offset in a commit in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitEntry {
    pub(crate) partition: u32,
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
}

#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) permit: Permit,
    pub(crate) deadline: Instant,
    pub(crate) owner: Owner,
}

/// The request table and the transmit queue.
#[derive(Debug)]
pub(crate) struct Requests {
    next_id: u64,
    timeout: Duration,
    in_flight: HashMap<RequestId, InFlight, FxBuildHasher>,
    /// Request deadlines, earliest first.
    deadlines: BTreeSet<(Instant, RequestId)>,
    transmits: VecDeque<Transmit>,
}

impl Requests {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            next_id: 0,
            timeout,
            in_flight: HashMap::with_hasher(FxBuildHasher),
            deadlines: BTreeSet::new(),
            transmits: VecDeque::new(),
        }
    }

    /// The deadline of requests sent from now on (a live configuration update); those in
    /// flight keep theirs.
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Queues a complete request for the driver, due back by `now + request_timeout`.
    pub(crate) fn send(&mut self, now: Instant, permit: Permit, owner: Owner, request: Request) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let deadline = later(now, self.timeout);
        trace!(request = id.0, kind = ?request.kind(), "transmit");
        self.deadlines.insert((deadline, id));
        self.in_flight.insert(
            id,
            InFlight {
                permit,
                deadline,
                owner,
            },
        );
        self.transmits.push_back(Transmit { id, request });
    }

    /// The next request for the driver.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Takes the request `id` out of flight (its answer arrived).
    pub(crate) fn answered(&mut self, id: RequestId) -> Option<InFlight> {
        let flight = self.in_flight.remove(&id)?;
        self.deadlines.remove(&(flight.deadline, id));
        Some(flight)
    }

    /// The earliest request deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|d| d.0)
    }

    /// Takes out the next request whose deadline passed by `now`.
    pub(crate) fn expired(&mut self, now: Instant) -> Option<(RequestId, InFlight)> {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                return None;
            }
            self.deadlines.pop_first();
            if let Some(flight) = self.in_flight.remove(&id) {
                return Some((id, flight));
            }
        }
        None
    }

    /// Requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.len()
    }
}

/// Narrows an answer to the response type the request expects; another type is a failure.
pub(crate) fn expect<T>(
    answer: Result<Response, RequestError>,
    request: RequestKind,
    pick: impl FnOnce(Response) -> Result<T, Response>,
) -> Result<T, RequestError> {
    pick(answer?).map_err(|other| RequestError::UnexpectedResponse {
        request,
        got: other.kind(),
    })
}

/// `Err(ErrorCode)` unless `code` is 0.
pub(crate) fn check(request: RequestKind, code: u32) -> Result<(), RequestError> {
    if code == crate::protocol::error_code::NONE {
        Ok(())
    } else {
        Err(RequestError::ErrorCode {
            request,
            code,
            message: None,
        })
    }
}
