//! The RustMQ consumer-facing protocol as typed values.
//!
//! Every struct mirrors `PROTOCOL.md` field for field and in wire order, so the codec
//! (`crate::codec`) only adds the type byte and bincode. Nothing here does I/O.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A topic name and a partition number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number within the topic.
    pub partition: u32,
}

impl TopicPartition {
    /// Builds a topic-partition pair.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.topic, self.partition)
    }
}

/// One message as the broker stores it. The broker sends no offset: record `i` of a fetch
/// from offset `o` has offset `o + i`.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Optional key.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Application headers.
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch, set by the broker on produce.
    pub timestamp: i64,
}

// By hand: every delivered record is cloned once (the cache keeps one copy), and most have
// no headers, whose empty `Vec` the derived clone still calls out to copy.
impl Clone for Record {
    #[inline]
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            value: self.value.clone(),
            headers: if self.headers.is_empty() {
                Vec::new()
            } else {
                self.headers.clone()
            },
            timestamp: self.timestamp,
        }
    }
}

impl Record {
    /// A record with a value and nothing else.
    pub fn from_value(value: impl Into<Bytes>) -> Self {
        Self {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp: 0,
        }
    }

    /// Bytes this record occupies on the wire (bincode), used for byte budgets.
    pub fn encoded_len(&self) -> usize {
        1 + self.key.as_ref().map_or(0, |k| 8 + k.len())
            + 8
            + self.value.len()
            + 8
            + self
                .headers
                .iter()
                .map(|h| 16 + h.key.len() + h.value.len())
                .sum::<usize>()
            + 8
    }

    /// The value of the first header named `key`, if any.
    pub fn header(&self, key: &str) -> Option<&Bytes> {
        self.headers.iter().find(|h| h.key == key).map(|h| &h.value)
    }
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value.
    pub value: Bytes,
}

impl Header {
    /// Builds a header.
    pub fn new(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// A broker as `Metadata` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// Broker id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// QUIC port.
    pub port_quic: u16,
    /// RPC port.
    pub port_rpc: u16,
    /// Rack.
    pub rack_id: String,
}

/// How many replicas must confirm a produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcknowledgmentLevel {
    /// Fire and forget.
    None,
    /// The leader only.
    Leader,
    /// A majority of replicas.
    Majority,
    /// Every replica.
    All,
    /// A custom count.
    Custom(u64),
}

/// Partition metadata (`Metadata` response).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMetadata {
    /// Partition number.
    pub partition_id: u32,
    /// Leader broker id.
    pub leader: Option<String>,
    /// Replica broker ids.
    pub replicas: Vec<String>,
}

/// Topic metadata (`Metadata` response).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMetadata {
    /// Topic name.
    pub name: String,
    /// Its partitions.
    pub partitions: Vec<PartitionMetadata>,
}

macro_rules! messages {
    ($(
        $(#[$doc:meta])* $name:ident = $ty:literal,
        $(#[$req_doc:meta])* $req:ident { $($(#[$rf_doc:meta])* $rf:ident : $rt:ty),* $(,)? },
        $(#[$resp_doc:meta])* $resp:ident { $($(#[$sf_doc:meta])* $sf:ident : $st:ty),* $(,)? };
    )*) => {
        $(
            $(#[$req_doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $req { $($(#[$rf_doc])* pub $rf: $rt,)* }

            $(#[$resp_doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $resp { $($(#[$sf_doc])* pub $sf: $st,)* }
        )*

        /// The request type byte that starts every request frame.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum RequestKind { $($(#[$doc])* $name = $ty,)* }

        impl RequestKind {
            /// The kind for a type byte, if it is one.
            pub fn from_byte(byte: u8) -> Option<Self> {
                match byte { $($ty => Some(Self::$name),)* _ => None }
            }
        }

        /// A request to the broker.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Request { $($(#[$doc])* $name($req),)* }

        impl Request {
            /// The type byte of this request.
            pub fn kind(&self) -> RequestKind {
                match self { $(Self::$name(_) => RequestKind::$name,)* }
            }
        }

        /// A successful response from the broker.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Response { $($(#[$doc])* $name($resp),)* }

        impl Response {
            /// The type byte of this response.
            pub fn kind(&self) -> RequestKind {
                match self { $(Self::$name(_) => RequestKind::$name,)* }
            }
        }

        $(
            impl From<$req> for Request {
                fn from(r: $req) -> Self { Self::$name(r) }
            }
            impl From<$resp> for Response {
                fn from(r: $resp) -> Self { Self::$name(r) }
            }
        )*
    };
}

messages! {
    /// Produce (1).
    Produce = 1,
    /// Append records to a partition.
    ProduceRequest {
        /// Topic.
        topic: String,
        /// Partition.
        partition_id: u32,
        /// Records to append.
        records: Vec<Record>,
        /// Replication level.
        acks: AcknowledgmentLevel,
        /// Server-side timeout.
        timeout_ms: u32,
    },
    /// Result of a produce.
    ProduceResponse {
        /// Offset of the first record.
        offset: u64,
        /// 0 on success.
        error_code: u32,
        /// Error text, if any.
        error_message: Option<String>,
    };
    /// Fetch (2).
    Fetch = 2,
    /// Read records starting exactly at `fetch_offset`.
    FetchRequest {
        /// Topic.
        topic: String,
        /// Partition.
        partition_id: u32,
        /// First offset to read.
        fetch_offset: u64,
        /// Byte budget (at least one record comes back when any exist).
        max_bytes: u32,
        /// Ignored by the broker (no long-poll).
        timeout_ms: u32,
    },
    /// Records from `fetch_offset`, contiguous.
    FetchResponse {
        /// The records; record `i` has offset `fetch_offset + i`.
        records: Vec<Record>,
        /// Next offset to be written.
        high_watermark: u64,
        /// 0 on success, 1 on storage failure.
        error_code: u32,
        /// Error text, if any.
        error_message: Option<String>,
    };
    /// Metadata (3).
    Metadata = 3,
    /// Cluster metadata.
    MetadataRequest {
        /// Topics asked about.
        topics: Vec<String>,
    },
    /// Brokers and topics (the real broker lists one broker and no topics).
    MetadataResponse {
        /// Brokers.
        brokers: Vec<BrokerInfo>,
        /// Topics.
        topics_metadata: Vec<TopicMetadata>,
    };
    /// FindCoordinator (4).
    FindCoordinator = 4,
    /// Which broker coordinates a group.
    FindCoordinatorRequest {
        /// Group id.
        group_id: String,
    },
    /// The coordinator (the broker itself).
    FindCoordinatorResponse {
        /// Coordinator broker id.
        coordinator_broker_id: String,
        /// Its host.
        coordinator_host: String,
        /// Its port.
        coordinator_port: u16,
        /// 0 on success.
        error_code: u32,
    };
    /// JoinGroup (5).
    JoinGroup = 5,
    /// Join (or rejoin) a consumer group.
    JoinGroupRequest {
        /// Group id.
        group_id: String,
        /// Empty on the first join; then the id the broker gave.
        member_id: String,
        /// Session timeout.
        session_timeout_ms: u32,
        /// Subscribed topics.
        topics: Vec<String>,
    },
    /// The new generation and every member's assignment.
    JoinGroupResponse {
        /// Generation.
        generation_id: u64,
        /// This member's id.
        member_id: String,
        /// Leader's id.
        leader_id: String,
        /// Assignment of every member.
        assigned_partitions: BTreeMap<String, Vec<TopicPartition>>,
        /// 0 on success.
        error_code: u32,
    };
    /// ConsumerHeartbeat (6).
    ConsumerHeartbeat = 6,
    /// Keep a membership alive.
    ConsumerHeartbeatRequest {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
        /// Generation.
        generation_id: u64,
    },
    /// 0, 16, 22, 25 or 27.
    ConsumerHeartbeatResponse {
        /// 0 on success.
        error_code: u32,
    };
    /// CommitOffset (7).
    CommitOffset = 7,
    /// Store offsets (this project commits the next offset to read).
    CommitOffsetRequest {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
        /// Generation.
        generation_id: u64,
        /// Next offset to read, per partition.
        offsets: BTreeMap<TopicPartition, u64>,
    },
    /// 0, 1, 16 or 22.
    CommitOffsetResponse {
        /// 0 on success.
        error_code: u32,
    };
    /// FetchOffset (8).
    FetchOffset = 8,
    /// Read committed offsets.
    FetchOffsetRequest {
        /// Group id.
        group_id: String,
        /// Partitions asked about.
        topic_partitions: Vec<TopicPartition>,
    },
    /// Only partitions that have a commit appear.
    FetchOffsetResponse {
        /// Committed offsets.
        offsets: BTreeMap<TopicPartition, u64>,
        /// 0 or 16.
        error_code: u32,
    };
    /// LeaveGroup (9).
    LeaveGroup = 9,
    /// Leave a group.
    LeaveGroupRequest {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
    },
    /// 0 or 16.
    LeaveGroupResponse {
        /// 0 on success.
        error_code: u32,
    };
}

/// Broker error codes that the consumer interprets.
pub mod error_code {
    /// Success.
    pub const NONE: u32 = 0;
    /// Storage failure.
    pub const STORAGE: u32 = 1;
    /// Unknown group.
    pub const UNKNOWN_GROUP: u32 = 16;
    /// Illegal generation (the member's generation is not the group's).
    pub const ILLEGAL_GENERATION: u32 = 22;
    /// Unknown member id.
    pub const UNKNOWN_MEMBER: u32 = 25;
    /// A rebalance is in progress.
    pub const REBALANCE_IN_PROGRESS: u32 = 27;
}

/// Largest request frame the broker reads (one read into an 8 KiB buffer), type byte included.
pub const MAX_REQUEST_FRAME: usize = 8192;

/// Largest request frame the consumer splits its own requests to (commits, FetchOffsets,
/// dead-letter batches), type byte included: what one QUIC packet carries for sure (the
/// smallest datagram QUIC allows, 1,200 bytes, less the short header, the AEAD tag and a
/// STREAM frame header, with room to spare).
///
/// The broker reads a request with one read that returns what has arrived, so a frame sent as
/// several packets fails to decode when its packets arrive apart, as they do over a network:
/// measured with the packets of a 1,000-partition consumer 300 µs apart, every commit failed.
/// Names are short enough (`ConsumerConfig::MAX_NAME_LEN`) that a request about one partition
/// always fits; only a dead-letter record can make a larger request, up to
/// [`MAX_REQUEST_FRAME`].
pub const PACKET_REQUEST_FRAME: usize = 1_100;

/// The error frame the broker answers a request it read in part with (its one read got the
/// packets that had arrived; the rest came later): see `RequestError::cut_in_transit`.
pub const CUT_IN_TRANSIT: &str = "Serialization error: io error: unexpected end of file";
