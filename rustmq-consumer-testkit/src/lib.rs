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
//! - `transport`: [`SimTransport`], an in-memory transport from a consumer's driver to a
//!   [`SharedBroker`], with optional latency on the runtime's clock.
//! - `virtual_rt`: [`VirtualRuntime`], a deterministic single-threaded executor whose clock
//!   jumps to the next timer when every task is idle.
//!
//! # Absences
//!
//! The simulated broker never reads a clock, never sleeps and never touches a socket; a
//! transport (or a test) turns its [`BrokerError`] into the `0xFF` error frame.
#![forbid(unsafe_code)]

mod broker;
mod transport;
mod virtual_rt;

pub use broker::{
    BrokerError, CommitRecord, GroupState, Outcome, RequestLogEntry, SimBroker, CLOCK_BASE_MS,
    REAPER_INTERVAL,
};
pub use transport::{SharedBroker, SimTransport};
pub use virtual_rt::{Stalled, VirtualRuntime};
