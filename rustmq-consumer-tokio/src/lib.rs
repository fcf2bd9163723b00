//! RustMQ consumer: tokio crate (in progress).
