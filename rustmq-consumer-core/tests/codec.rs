//! The wire codec: golden frames, round trips, hostile and truncated input, size limits.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use rustmq_consumer_core::codec::{
    decode_request, decode_response, decode_response_bytes, encode_error_frame, encode_request,
    encode_response, request_frame_len, CodecError, MAX_RESPONSE_FRAME,
};
use rustmq_consumer_core::protocol::*;
use rustmq_consumer_core::TransportError;

/// Parses hex with any whitespace in between.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn frame(type_byte: u8, body: &str) -> Vec<u8> {
    let mut frame = vec![type_byte];
    frame.extend(hex(body));
    frame
}

fn fetch_probe() -> Request {
    Request::Fetch(FetchRequest {
        topic: "probe-topic".into(),
        partition_id: 0,
        fetch_offset: 0,
        max_bytes: 1_048_576,
        timeout_ms: 100,
    })
}

/// The bincode body of the message inside a request, as `bincode::serialize` writes it.
fn plain_bincode(request: &Request) -> Vec<u8> {
    match request {
        Request::Produce(r) => bincode::serialize(r),
        Request::Fetch(r) => bincode::serialize(r),
        Request::Metadata(r) => bincode::serialize(r),
        Request::FindCoordinator(r) => bincode::serialize(r),
        Request::JoinGroup(r) => bincode::serialize(r),
        Request::ConsumerHeartbeat(r) => bincode::serialize(r),
        Request::CommitOffset(r) => bincode::serialize(r),
        Request::FetchOffset(r) => bincode::serialize(r),
        Request::LeaveGroup(r) => bincode::serialize(r),
        other => panic!("no test coverage for {other:?}"),
    }
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Golden frames
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_fetch_matches_protocol_md() {
    let body =
        hex("0b00000000000000 70726f62652d746f706963 00000000 0000000000000000 00001000 64000000");
    assert_eq!(body.len(), 39);
    let encoded = encode_request(&fetch_probe()).unwrap();
    assert_eq!(encoded[0], 0x02);
    assert_eq!(&encoded[1..], &body[..]);
    assert_eq!(encoded.len(), 40);
    assert_eq!(decode_request(&encoded).unwrap(), fetch_probe());
}

#[test]
fn golden_commit_offset() {
    let mut offsets = BTreeMap::new();
    offsets.insert(TopicPartition::new("t", 1), 42);
    let request = Request::CommitOffset(CommitOffsetRequest {
        group_id: "g".into(),
        member_id: "m".into(),
        generation_id: 3,
        offsets,
    });
    let expected = frame(
        0x07,
        "0100000000000000 67
         0100000000000000 6d
         0300000000000000
         0100000000000000
         0100000000000000 74 01000000 2a00000000000000",
    );
    assert_eq!(&encode_request(&request).unwrap()[..], &expected[..]);
    assert_eq!(decode_request(&expected).unwrap(), request);
}

#[test]
fn golden_produce_with_record() {
    let request = Request::Produce(ProduceRequest {
        topic: "d".into(),
        partition_id: 0,
        records: vec![Record {
            key: None,
            value: Bytes::from_static(b"v"),
            headers: vec![Header::new("h", Bytes::from_static(b"x"))],
            timestamp: 5,
        }],
        acks: AcknowledgmentLevel::Leader,
        timeout_ms: 1000,
    });
    let expected = frame(
        0x01,
        "0100000000000000 64
         00000000
         0100000000000000
           00
           0100000000000000 76
           0100000000000000
             0100000000000000 68
             0100000000000000 78
           0500000000000000
         01000000
         e8030000",
    );
    assert_eq!(&encode_request(&request).unwrap()[..], &expected[..]);
    assert_eq!(decode_request(&expected).unwrap(), request);
}

#[test]
fn golden_acknowledgment_levels() {
    let cases = [
        (AcknowledgmentLevel::None, "00000000"),
        (AcknowledgmentLevel::Leader, "01000000"),
        (AcknowledgmentLevel::Majority, "02000000"),
        (AcknowledgmentLevel::All, "03000000"),
        (AcknowledgmentLevel::Custom(7), "04000000 0700000000000000"),
    ];
    for (level, wire) in cases {
        assert_eq!(bincode::serialize(&level).unwrap(), hex(wire), "{level:?}");
        let request = Request::Produce(ProduceRequest {
            topic: String::new(),
            partition_id: 9,
            records: Vec::new(),
            acks: level,
            timeout_ms: 1,
        });
        let mut body = "0000000000000000 09000000 0000000000000000".to_owned();
        body.push_str(wire);
        body.push_str("01000000");
        let expected = frame(0x01, &body);
        assert_eq!(&encode_request(&request).unwrap()[..], &expected[..]);
        assert_eq!(decode_request(&expected).unwrap(), request);
    }
}

#[test]
fn golden_fetch_response_decodes() {
    // One record (key Some("k"), value "v", no headers, timestamp 1), hwm 8, code 0, no message.
    let wire = frame(
        0x02,
        "0100000000000000
           01 0100000000000000 6b
           0100000000000000 76
           0000000000000000
           0100000000000000
         0800000000000000
         00000000
         00",
    );
    let expected = Response::Fetch(FetchResponse {
        records: vec![Record {
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"v"),
            headers: Vec::new(),
            timestamp: 1,
        }],
        high_watermark: 8,
        error_code: 0,
        error_message: None,
    });
    assert_eq!(
        decode_response(RequestKind::Fetch, &wire).unwrap(),
        expected
    );
    assert_eq!(&encode_response(&expected)[..], &wire[..]);
}

#[test]
fn a_fetch_answer_decodes_to_slices_of_its_frame() {
    let record = |i: u8| Record {
        key: Some(Bytes::from(vec![i; 3])),
        value: Bytes::from(vec![i; 40]),
        headers: vec![Header::new("h", vec![i; 2])],
        timestamp: i64::from(i),
    };
    let expected = Response::Fetch(FetchResponse {
        records: (0..5).map(record).collect(),
        high_watermark: 5,
        error_code: 0,
        error_message: None,
    });
    let frame = encode_response(&expected);
    let decoded = decode_response_bytes(RequestKind::Fetch, frame.clone()).unwrap();
    assert_eq!(decoded, expected);
    let Response::Fetch(fetch) = decoded else {
        unreachable!("decoded as a fetch answer above");
    };
    let inside = |b: &Bytes| {
        let (start, end) = (
            frame.as_ptr() as usize,
            frame.as_ptr() as usize + frame.len(),
        );
        let at = b.as_ptr() as usize;
        start <= at && at + b.len() <= end
    };
    for r in &fetch.records {
        assert!(
            inside(&r.value),
            "the value is a slice of the frame, not a copy"
        );
        assert!(inside(r.key.as_ref().unwrap()), "so is the key");
        assert!(inside(&r.headers[0].value), "and the header value");
    }
}

#[test]
fn record_encoded_len_matches_bincode() {
    let record = Record {
        key: Some(Bytes::from_static(b"key")),
        value: Bytes::from_static(b"value"),
        headers: vec![
            Header::new("a", Bytes::from_static(b"bc")),
            Header::new("", ""),
        ],
        timestamp: -3,
    };
    let size = bincode::serialized_size(&record).unwrap() as usize;
    assert_eq!(record.encoded_len(), size);
}

// ---------------------------------------------------------------------------------------------
// Error frames and response checks
// ---------------------------------------------------------------------------------------------

#[test]
fn error_frame_is_broker_error() {
    let wire = encode_error_frame("Partition not found: t:0");
    assert_eq!(wire[0], 0xFF);
    assert_eq!(&wire[1..], b"Error: Partition not found: t:0");
    assert_eq!(
        decode_response(RequestKind::Produce, &wire),
        Err(TransportError::Broker("Partition not found: t:0".into()))
    );
}

#[test]
fn error_frame_without_prefix_or_utf8_is_still_broker_error() {
    let wire = [0xFF, b'o', b'o', 0xC3];
    assert_eq!(
        decode_response(RequestKind::Fetch, &wire),
        Err(TransportError::Broker("oo\u{FFFD}".into()))
    );
    assert_eq!(
        decode_response(RequestKind::Fetch, &[0xFF]),
        Err(TransportError::Broker(String::new()))
    );
}

#[test]
fn empty_response_is_empty_response() {
    assert_eq!(
        decode_response(RequestKind::CommitOffset, &[]),
        Err(TransportError::EmptyResponse)
    );
}

#[test]
fn wrong_type_byte_is_malformed() {
    let wire = encode_response(&Response::LeaveGroup(LeaveGroupResponse { error_code: 0 }));
    assert_eq!(wire[0], 9);
    assert!(matches!(
        decode_response(RequestKind::CommitOffset, &wire),
        Err(TransportError::Malformed(_))
    ));
    assert!(matches!(
        decode_response(RequestKind::CommitOffset, &[0x42, 0, 0, 0, 0]),
        Err(TransportError::Malformed(_))
    ));
    assert_eq!(
        decode_response(RequestKind::LeaveGroup, &wire),
        Ok(Response::LeaveGroup(LeaveGroupResponse { error_code: 0 }))
    );
}

#[test]
fn trailing_bytes_are_ignored() {
    let mut wire = encode_response(&Response::CommitOffset(CommitOffsetResponse {
        error_code: 22,
    }))
    .to_vec();
    wire.extend_from_slice(b"junk");
    assert_eq!(
        decode_response(RequestKind::CommitOffset, &wire),
        Ok(Response::CommitOffset(CommitOffsetResponse {
            error_code: 22
        }))
    );
    let mut request = encode_request(&fetch_probe()).unwrap().to_vec();
    request.push(0xAA);
    assert_eq!(decode_request(&request).unwrap(), fetch_probe());
}

#[test]
fn oversized_response_is_refused() {
    let wire = vec![0x02; MAX_RESPONSE_FRAME + 1];
    assert_eq!(
        decode_response(RequestKind::Fetch, &wire),
        Err(TransportError::ResponseTooLarge(MAX_RESPONSE_FRAME + 1))
    );
}

// ---------------------------------------------------------------------------------------------
// Request frame errors and limits
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_request_errors() {
    assert_eq!(decode_request(&[]), Err(CodecError::Empty));
    assert_eq!(decode_request(&[0]), Err(CodecError::UnknownType(0)));
    assert_eq!(
        decode_request(&[10, 1, 2]),
        Err(CodecError::UnknownType(10))
    );
    assert_eq!(decode_request(&[0xFF]), Err(CodecError::UnknownType(0xFF)));
    assert!(matches!(
        decode_request(&[2]),
        Err(CodecError::Malformed(_))
    ));
    assert_eq!(
        decode_request(&vec![2; MAX_REQUEST_FRAME + 1]),
        Err(CodecError::RequestTooLarge {
            size: MAX_REQUEST_FRAME + 1,
            limit: MAX_REQUEST_FRAME
        })
    );
}

fn produce_with_value(len: usize) -> Request {
    Request::Produce(ProduceRequest {
        topic: "dlq".into(),
        partition_id: 0,
        records: vec![Record::from_value(vec![0xAB; len])],
        acks: AcknowledgmentLevel::All,
        timeout_ms: 5000,
    })
}

#[test]
fn produce_of_ten_kilobytes_is_too_large() {
    let request = produce_with_value(10 * 1024);
    let size = request_frame_len(&request);
    assert!(size > MAX_REQUEST_FRAME);
    assert_eq!(
        encode_request(&request),
        Err(CodecError::RequestTooLarge {
            size,
            limit: MAX_REQUEST_FRAME
        })
    );
    assert_eq!(
        TransportError::from(encode_request(&request).unwrap_err()),
        TransportError::RequestTooLarge(size)
    );
}

#[test]
fn frame_limit_is_inclusive() {
    let overhead = request_frame_len(&produce_with_value(0));
    let fits = produce_with_value(MAX_REQUEST_FRAME - overhead);
    assert_eq!(request_frame_len(&fits), MAX_REQUEST_FRAME);
    assert_eq!(encode_request(&fits).unwrap().len(), MAX_REQUEST_FRAME);
    let over = produce_with_value(MAX_REQUEST_FRAME - overhead + 1);
    assert_eq!(request_frame_len(&over), MAX_REQUEST_FRAME + 1);
    assert!(matches!(
        encode_request(&over),
        Err(CodecError::RequestTooLarge { size, .. }) if size == MAX_REQUEST_FRAME + 1
    ));
}

// ---------------------------------------------------------------------------------------------
// Hostile length prefixes: an error, never a huge allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_string_length_is_malformed() {
    let mut wire = vec![0x02];
    wire.extend_from_slice(&u64::MAX.to_le_bytes());
    wire.extend_from_slice(b"probe");
    assert!(matches!(
        decode_request(&wire),
        Err(CodecError::Malformed(_))
    ));

    let mut wire = vec![0x04];
    wire.extend_from_slice(&u64::MAX.to_le_bytes());
    wire.extend_from_slice(&[0; 64]);
    assert!(matches!(
        decode_response(RequestKind::FindCoordinator, &wire),
        Err(TransportError::Malformed(_))
    ));
}

#[test]
fn hostile_record_count_and_byte_length_are_malformed() {
    // Fetch response claiming u64::MAX records.
    let mut wire = vec![0x02];
    wire.extend_from_slice(&u64::MAX.to_le_bytes());
    wire.extend_from_slice(&[0; 32]);
    assert!(matches!(
        decode_response(RequestKind::Fetch, &wire),
        Err(TransportError::Malformed(_))
    ));

    // One record whose value claims 2^40 bytes.
    let mut wire = vec![0x02];
    wire.extend_from_slice(&1u64.to_le_bytes());
    wire.push(0); // key: None
    wire.extend_from_slice(&(1u64 << 40).to_le_bytes());
    wire.extend_from_slice(&[0; 32]);
    assert!(matches!(
        decode_response(RequestKind::Fetch, &wire),
        Err(TransportError::Malformed(_))
    ));

    // A JoinGroup response whose assignment map claims u64::MAX entries.
    let mut wire = vec![0x05];
    wire.extend_from_slice(&0u64.to_le_bytes()); // generation
    wire.extend_from_slice(&0u64.to_le_bytes()); // member_id ""
    wire.extend_from_slice(&0u64.to_le_bytes()); // leader_id ""
    wire.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode_response(RequestKind::JoinGroup, &wire),
        Err(TransportError::Malformed(_))
    ));
}

#[test]
fn invalid_tags_are_malformed() {
    // Option tag 2 in a produce response's error_message.
    let mut wire = vec![0x01];
    wire.extend_from_slice(&[0; 12]);
    wire.push(2);
    assert!(matches!(
        decode_response(RequestKind::Produce, &wire),
        Err(TransportError::Malformed(_))
    ));
    // AcknowledgmentLevel variant 5 does not exist.
    let mut wire = frame(0x01, "0000000000000000 00000000 0000000000000000");
    wire.extend_from_slice(&[5, 0, 0, 0, 1, 0, 0, 0]);
    assert!(matches!(
        decode_request(&wire),
        Err(CodecError::Malformed(_))
    ));
    // Invalid UTF-8 in a topic.
    let wire = frame(0x03, "0100000000000000 0100000000000000 ff");
    assert!(matches!(
        decode_request(&wire),
        Err(CodecError::Malformed(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Strategies for every protocol type
// ---------------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,6}"
}

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from)
}

fn topic_partition() -> impl Strategy<Value = TopicPartition> {
    (text(), any::<u32>()).prop_map(|(topic, partition)| TopicPartition { topic, partition })
}

fn header() -> impl Strategy<Value = Header> {
    (text(), blob()).prop_map(|(key, value)| Header { key, value })
}

fn record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(blob()),
        blob(),
        proptest::collection::vec(header(), 0..3),
        any::<i64>(),
    )
        .prop_map(|(key, value, headers, timestamp)| Record {
            key,
            value,
            headers,
            timestamp,
        })
}

fn records() -> impl Strategy<Value = Vec<Record>> {
    proptest::collection::vec(record(), 0..4)
}

fn broker_info() -> impl Strategy<Value = BrokerInfo> {
    (text(), text(), any::<u16>(), any::<u16>(), text()).prop_map(
        |(id, host, port_quic, port_rpc, rack_id)| BrokerInfo {
            id,
            host,
            port_quic,
            port_rpc,
            rack_id,
        },
    )
}

fn acknowledgment_level() -> impl Strategy<Value = AcknowledgmentLevel> {
    prop_oneof![
        Just(AcknowledgmentLevel::None),
        Just(AcknowledgmentLevel::Leader),
        Just(AcknowledgmentLevel::Majority),
        Just(AcknowledgmentLevel::All),
        any::<u64>().prop_map(AcknowledgmentLevel::Custom),
    ]
}

fn partition_metadata() -> impl Strategy<Value = PartitionMetadata> {
    (
        any::<u32>(),
        proptest::option::of(text()),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(|(partition_id, leader, replicas)| PartitionMetadata {
            partition_id,
            leader,
            replicas,
        })
}

fn topic_metadata() -> impl Strategy<Value = TopicMetadata> {
    (
        text(),
        proptest::collection::vec(partition_metadata(), 0..3),
    )
        .prop_map(|(name, partitions)| TopicMetadata { name, partitions })
}

fn strings() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(), 0..4)
}

fn offsets() -> impl Strategy<Value = BTreeMap<TopicPartition, u64>> {
    proptest::collection::btree_map(topic_partition(), any::<u64>(), 0..4)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            text(),
            any::<u32>(),
            records(),
            acknowledgment_level(),
            any::<u32>()
        )
            .prop_map(
                |(topic, partition_id, records, acks, timeout_ms)| Request::Produce(
                    ProduceRequest {
                        topic,
                        partition_id,
                        records,
                        acks,
                        timeout_ms
                    }
                )
            ),
        (
            text(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(topic, partition_id, fetch_offset, max_bytes, timeout_ms)| {
                    Request::Fetch(FetchRequest {
                        topic,
                        partition_id,
                        fetch_offset,
                        max_bytes,
                        timeout_ms,
                    })
                }
            ),
        strings().prop_map(|topics| Request::Metadata(MetadataRequest { topics })),
        text().prop_map(|group_id| Request::FindCoordinator(FindCoordinatorRequest { group_id })),
        (text(), text(), any::<u32>(), strings()).prop_map(
            |(group_id, member_id, session_timeout_ms, topics)| {
                Request::JoinGroup(JoinGroupRequest {
                    group_id,
                    member_id,
                    session_timeout_ms,
                    topics,
                })
            }
        ),
        (text(), text(), any::<u64>()).prop_map(|(group_id, member_id, generation_id)| {
            Request::ConsumerHeartbeat(ConsumerHeartbeatRequest {
                group_id,
                member_id,
                generation_id,
            })
        }),
        (text(), text(), any::<u64>(), offsets()).prop_map(
            |(group_id, member_id, generation_id, offsets)| {
                Request::CommitOffset(CommitOffsetRequest {
                    group_id,
                    member_id,
                    generation_id,
                    offsets,
                })
            }
        ),
        (text(), proptest::collection::vec(topic_partition(), 0..4)).prop_map(
            |(group_id, topic_partitions)| Request::FetchOffset(FetchOffsetRequest {
                group_id,
                topic_partitions
            })
        ),
        (text(), text()).prop_map(
            |(group_id, member_id)| Request::LeaveGroup(LeaveGroupRequest {
                group_id,
                member_id
            })
        ),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let error_message = || proptest::option::of(text());
    prop_oneof![
        (any::<u64>(), any::<u32>(), error_message()).prop_map(
            |(offset, error_code, error_message)| Response::Produce(ProduceResponse {
                offset,
                error_code,
                error_message
            })
        ),
        (records(), any::<u64>(), any::<u32>(), error_message()).prop_map(
            |(records, high_watermark, error_code, error_message)| {
                Response::Fetch(FetchResponse {
                    records,
                    high_watermark,
                    error_code,
                    error_message,
                })
            }
        ),
        (
            proptest::collection::vec(broker_info(), 0..3),
            proptest::collection::vec(topic_metadata(), 0..3)
        )
            .prop_map(
                |(brokers, topics_metadata)| Response::Metadata(MetadataResponse {
                    brokers,
                    topics_metadata
                })
            ),
        (text(), text(), any::<u16>(), any::<u32>()).prop_map(
            |(coordinator_broker_id, coordinator_host, coordinator_port, error_code)| {
                Response::FindCoordinator(FindCoordinatorResponse {
                    coordinator_broker_id,
                    coordinator_host,
                    coordinator_port,
                    error_code,
                })
            }
        ),
        (
            any::<u64>(),
            text(),
            text(),
            proptest::collection::btree_map(
                text(),
                proptest::collection::vec(topic_partition(), 0..3),
                0..3
            ),
            any::<u32>()
        )
            .prop_map(
                |(generation_id, member_id, leader_id, assigned_partitions, error_code)| {
                    Response::JoinGroup(JoinGroupResponse {
                        generation_id,
                        member_id,
                        leader_id,
                        assigned_partitions,
                        error_code,
                    })
                }
            ),
        any::<u32>().prop_map(|error_code| Response::ConsumerHeartbeat(
            ConsumerHeartbeatResponse { error_code }
        )),
        any::<u32>()
            .prop_map(|error_code| Response::CommitOffset(CommitOffsetResponse { error_code })),
        (offsets(), any::<u32>()).prop_map(|(offsets, error_code)| Response::FetchOffset(
            FetchOffsetResponse {
                offsets,
                error_code
            }
        )),
        any::<u32>().prop_map(|error_code| Response::LeaveGroup(LeaveGroupResponse { error_code })),
    ]
}

fn request_kind() -> impl Strategy<Value = RequestKind> {
    (1u8..=9).prop_map(|b| RequestKind::from_byte(b).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn request_round_trips(request in request()) {
        let encoded = encode_request(&request).unwrap();
        prop_assert_eq!(encoded.len(), request_frame_len(&request));
        prop_assert_eq!(encoded[0], request.kind() as u8);
        prop_assert_eq!(&encoded[1..], &plain_bincode(&request)[..]);
        prop_assert_eq!(decode_request(&encoded).unwrap(), request);
    }

    #[test]
    fn response_round_trips(response in response()) {
        let encoded = encode_response(&response);
        prop_assert_eq!(encoded[0], response.kind() as u8);
        prop_assert_eq!(decode_response(response.kind(), &encoded).unwrap(), response.clone());
        prop_assert_eq!(decode_response_bytes(response.kind(), encoded).unwrap(), response);
    }

    #[test]
    fn truncated_requests_are_errors(request in request()) {
        let encoded = encode_request(&request).unwrap();
        for cut in 0..encoded.len() {
            let result = decode_request(&encoded[..cut]);
            match cut {
                0 => prop_assert_eq!(result, Err(CodecError::Empty)),
                _ => prop_assert!(
                    matches!(result, Err(CodecError::Malformed(_))),
                    "cut at {} of {} decoded as {:?}", cut, encoded.len(), result
                ),
            }
        }
    }

    #[test]
    fn truncated_responses_are_errors(response in response()) {
        let encoded = encode_response(&response);
        let kind = response.kind();
        for cut in 0..encoded.len() {
            let result = decode_response(kind, &encoded[..cut]);
            match cut {
                0 => prop_assert_eq!(result, Err(TransportError::EmptyResponse)),
                _ => prop_assert!(
                    matches!(result, Err(TransportError::Malformed(_))),
                    "cut at {} of {} decoded as {:?}", cut, encoded.len(), result
                ),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        kind in request_kind(),
    ) {
        // Whatever decodes survives a second round trip unchanged.
        if let Ok(request) = decode_request(&bytes) {
            let again = encode_request(&request).unwrap();
            prop_assert_eq!(decode_request(&again).unwrap(), request);
        }
        match decode_response(kind, &bytes) {
            Ok(response) => {
                prop_assert_eq!(response.kind(), kind);
                let again = encode_response(&response);
                prop_assert_eq!(decode_response(kind, &again).unwrap(), response);
            }
            Err(TransportError::EmptyResponse) => prop_assert!(bytes.is_empty()),
            Err(TransportError::Broker(_)) => prop_assert_eq!(bytes[0], 0xFF),
            Err(TransportError::Malformed(_)) => prop_assert!(!bytes.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        request in request(),
        response in response(),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut wire = encode_request(&request).unwrap().to_vec();
        let at = position.index(wire.len());
        wire[at] = byte;
        if let Ok(decoded) = decode_request(&wire) {
            let again = encode_request(&decoded).unwrap();
            prop_assert_eq!(decode_request(&again).unwrap(), decoded);
        }
        let mut wire = encode_response(&response).to_vec();
        let at = position.index(wire.len());
        wire[at] = byte;
        match decode_response(response.kind(), &wire) {
            Ok(decoded) => {
                let again = encode_response(&decoded);
                prop_assert_eq!(decode_response(response.kind(), &again).unwrap(), decoded);
            }
            Err(TransportError::Malformed(_)) => {}
            Err(TransportError::Broker(_)) => prop_assert_eq!(at, 0),
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}

#[test]
fn a_cloned_record_keeps_every_field() {
    let record = Record {
        key: Some(Bytes::from_static(b"k")),
        value: Bytes::from_static(b"v"),
        headers: vec![Header {
            key: "trace".into(),
            value: Bytes::from_static(b"1"),
        }],
        timestamp: 7,
    };
    assert_eq!(record.clone(), record);
    let bare = Record::from_value(Bytes::from_static(b"v"));
    assert_eq!(bare.clone(), bare);
}
