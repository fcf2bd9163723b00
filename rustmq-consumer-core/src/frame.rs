//! Exact request frame sizes (type byte + bincode body) for splitting work into requests of
//! one packet's worth (`PACKET_REQUEST_FRAME`), never over the broker's 8 KiB read. Tests check
//! them against the codec byte for byte.

/// A `String` on the wire: u64 length then the bytes.
fn string(s: &str) -> usize {
    8 + s.len()
}

/// A `FetchOffset` frame with an empty partition list.
pub(crate) fn fetch_offset_base_len(group: &str) -> usize {
    1 + string(group) + 8
}

/// What one `TopicPartition` adds to a `FetchOffset` frame.
pub(crate) fn fetch_offset_entry_len(topic: &str) -> usize {
    string(topic) + 4
}

/// A `CommitOffset` frame with an empty offsets map.
pub(crate) fn commit_base_len(group: &str, member: &str) -> usize {
    1 + string(group) + string(member) + 8 + 8
}

/// What one `(TopicPartition, u64)` entry adds to a `CommitOffset` frame.
pub(crate) fn commit_entry_len(topic: &str) -> usize {
    string(topic) + 4 + 8
}

/// A `Produce` frame with no records and `AcknowledgmentLevel::Leader`; each record adds its
/// `Record::encoded_len`.
pub(crate) fn produce_base_len(topic: &str) -> usize {
    1 + string(topic) + 4 + 8 + 4 + 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::request_frame_len;
    use crate::protocol::*;

    #[test]
    fn sizes_match_the_codec_byte_for_byte() {
        let offsets = (0..3)
            .map(|p| (TopicPartition::new("orders", p), 42))
            .collect();
        let commit = CommitOffsetRequest {
            group_id: "billing".into(),
            member_id: "m-1".into(),
            generation_id: 3,
            offsets,
        };
        assert_eq!(
            request_frame_len(&commit.into()),
            commit_base_len("billing", "m-1") + 3 * commit_entry_len("orders")
        );
        let fetch_offset = FetchOffsetRequest {
            group_id: "billing".into(),
            topic_partitions: (0..3).map(|p| TopicPartition::new("orders", p)).collect(),
        };
        assert_eq!(
            request_frame_len(&fetch_offset.into()),
            fetch_offset_base_len("billing") + 3 * fetch_offset_entry_len("orders")
        );
        let mut record = Record::from_value(vec![1u8; 100]);
        record.key = Some(vec![2u8; 5].into());
        record.headers.push(Header::new("k", "v"));
        let produce = ProduceRequest {
            topic: "dlq".into(),
            partition_id: 0,
            records: vec![record.clone(), record.clone()],
            acks: AcknowledgmentLevel::Leader,
            timeout_ms: 5,
        };
        assert_eq!(
            request_frame_len(&produce.into()),
            produce_base_len("dlq") + 2 * record.encoded_len()
        );
    }
}
