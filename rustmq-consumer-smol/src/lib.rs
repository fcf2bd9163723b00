//! RustMQ consumer: smol crate (in progress).
