//! Deterministic simulation support for the RustMQ consumer.
//!
//! Everything here is sans-IO like the core: time is an `Instant` argument, randomness comes
//! from seeds, and every collection iterates in a fixed order, so a scenario replays exactly.
//!
//! # Codemap
//!
//! - `broker`: [`SimBroker`], a model of the RustMQ broker with the semantics of
//!   `PROTOCOL.md` (storage, group coordinator, session reaper, crash and restart), plus the
//!   logs ([`CommitRecord`], [`RequestLogEntry`]) that invariant checks read.
//!
//! # Absences
//!
//! The simulated broker never reads a clock, never sleeps and never touches a socket; a
//! transport (or a test) turns its [`BrokerError`] into the `0xFF` error frame.
#![forbid(unsafe_code)]

mod broker;

pub use broker::{
    BrokerError, CommitRecord, GroupState, Outcome, RequestLogEntry, SimBroker, CLOCK_BASE_MS,
    REAPER_INTERVAL,
};
