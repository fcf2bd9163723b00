//! RustMQ consumer: testkit crate (in progress).
