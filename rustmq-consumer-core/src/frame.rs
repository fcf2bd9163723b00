//! Exact request frame sizes (type byte + bincode body) for splitting work into requests that
//! fit the broker's 8 KiB read. Tests check them against the codec byte for byte.

/// A `String` on the wire: u64 length then the bytes.
fn string(s: &str) -> usize {
    8 + s.len()
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
