//! The logs the invariant checks read: every request the broker handled
//! ([`RequestLogEntry`], with its [`Outcome`]) and every commit it accepted ([`CommitRecord`]).

use std::collections::BTreeMap;
use std::time::Instant;

use rustmq_consumer_core::protocol::{RequestKind, TopicPartition};

use super::SimBroker;

/// How the broker answered one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A typed response; `error_code` is `None` for responses that carry none (Metadata).
    Response {
        /// The response's error code, if its type has one.
        error_code: Option<u32>,
    },
    /// The error frame.
    ErrorFrame {
        /// The text after `Error: `.
        message: String,
    },
}

/// One request the broker handled, as [`SimBroker::request_log`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLogEntry {
    /// When it was handled.
    pub at: Instant,
    /// Its type.
    pub kind: RequestKind,
    /// The group it names, if any.
    pub group: Option<String>,
    /// The member it names; for JoinGroup the id the member ends up with.
    pub member: Option<String>,
    /// The generation it carries; for JoinGroup the generation it was given.
    pub generation: Option<u64>,
    /// The partition of a Produce or Fetch.
    pub partition: Option<TopicPartition>,
    /// How the broker answered.
    pub outcome: Outcome,
}

/// One CommitOffset the broker accepted (error code 0), as [`SimBroker::commit_log`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    /// Index of the CommitOffset request in [`SimBroker::request_log`], to order commits
    /// against other requests handled at the same instant.
    pub seq: usize,
    /// When it was accepted.
    pub at: Instant,
    /// Group.
    pub group: String,
    /// The member id the request carried (the broker does not check membership).
    pub member: String,
    /// The generation the request carried (equal to the group's at that moment).
    pub generation: u64,
    /// The offsets stored, verbatim.
    pub offsets: BTreeMap<TopicPartition, u64>,
    /// The partitions the group's current assignment gave that member when the commit was
    /// accepted, or `None` when the id was not a member of the group.
    pub member_assignment: Option<Vec<TopicPartition>>,
}

impl SimBroker {
    /// Every CommitOffset the broker accepted, in order.
    pub fn commit_log(&self) -> &[CommitRecord] {
        &self.commit_log
    }

    /// Every request handled, in order.
    pub fn request_log(&self) -> &[RequestLogEntry] {
        &self.request_log
    }
}
