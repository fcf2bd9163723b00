//! Deterministic simulation support for the RustMQ consumer.
//!
//! Everything here is sans-IO like the core: time is an `Instant` argument, randomness comes
//! from seeds, and every collection iterates in a fixed order, so a scenario replays exactly.
//!
//! # Codemap
//!
//! - `broker`: [`SimBroker`], a model of the RustMQ broker with the semantics of
//!   `PROTOCOL.md` (storage, group coordinator, session reaper, crash and restart), plus the
//!   logs ([`CommitRecord`], [`RequestLogEntry`]) that invariant checks read; one file per
//!   concern: `storage`, `cold` (the cold tier: [`SimBroker::tier_to_cold`], answers ending at
//!   a segment's end and cached per offset, [`ColdReads`] counts, and
//!   [`SimBroker::with_cold_read_latency`], owed per cache miss), `group` (the coordinator),
//!   `request_log`.
//! - `transport`: [`SimTransport`], an in-memory transport from a consumer's driver to a
//!   [`SharedBroker`], with optional latency on the runtime's clock, plus the broker's
//!   cold-read latency on a cold-tier cache miss.
//! - `loopback` (feature `quic`, on by default): [`LoopbackBroker`], a [`SharedBroker`] served
//!   over real QUIC on 127.0.0.1 with the real broker's framing quirks and fault knobs. It is
//!   the one part of the testkit that does I/O.
//! - `virtual_rt`: [`VirtualRuntime`], a deterministic single-threaded executor whose clock
//!   jumps to the next timer when every task is idle.
//! - `faults`: [`FaultPlan`] (latency, error frames, lost requests and answers, connection
//!   loss, crash and restart, storage failures, other group members joining, leaving and
//!   going silent ([`PhantomPlan`]); all stop at a heal time) and [`SimRng`], the seeded PRNG
//!   every choice comes from.
//! - `invariants`: [`Checker`], the consumer's invariants checked from what is observable,
//!   and [`Violation`] naming the one that broke ([`invariant_names`]); one file per family:
//!   `delivery`, `requests`, `group`, `close` (the end-of-run checks).
//! - `sim`: [`Simulation`], the discrete-event loop driving one `ConsumerMachine`, the
//!   broker, the fault layer and an application ([`Handler`], [`ModelApp`]); [`Scenario`]
//!   derives everything from one seed (about a third of the seeds run a consumer-group
//!   session instead of manual assignment); [`run_seeds`] and [`seeds_from_env`] run many; a
//!   [`Failure`] (of this simulation or the group one, [`SimKind`]) names the invariant that
//!   broke and the command that replays it; [`Mutation`] runs deliberately wrong policies
//!   (the checker must catch them).
//! - `group_sim`: [`GroupSimulation`], several machines in one consumer group on one broker
//!   (members joining, leaving, crashing and pausing, from one seed: [`GroupScenario`]), with
//!   group-wide invariants ([`group_names`]); [`run_group_seeds`] runs many, and
//!   [`GroupMutation`]s are deliberately wrong members the checker must catch.
//! - `pump`: [`Pump`], one `ConsumerMachine` and a broker ([`Peer`]) driven in lock-step on a
//!   virtual clock for scripted tests ([`drive_all`] and [`advance_all`] for several machines
//!   sharing one broker); every loop is bounded ([`Limits`]) and panics naming the bound.
//! - `fixtures`: [`broker_with`] (a topic holding messages) and [`fast_config`].
//! - `strategies`: proptest strategies for scenarios, fault plans and application behaviours.
//!
//! # Absences
//!
//! The simulated broker never reads a clock, never sleeps and never touches a socket; a
//! transport (or a test) turns its [`BrokerError`] into the `0xFF` error frame.
#![forbid(unsafe_code)]

mod broker;
mod faults;
mod fixtures;
mod group_sim;
mod invariants;
#[cfg(feature = "quic")]
mod loopback;
mod pump;
mod sim;
pub mod strategies;
mod transport;
mod virtual_rt;

pub use broker::{
    BrokerError, ColdReads, CommitRecord, GroupState, Outcome, RequestLogEntry, SimBroker,
    CLOCK_BASE_MS, DEFAULT_RECORD_OVERHEAD, PACKET_PAYLOAD, REAPER_INTERVAL,
};
pub use faults::{Fate, FaultPlan, PhantomPlan, SimRng};
pub use fixtures::{broker_with, fast_config};
pub use group_sim::{
    group_names, run_group_seed, run_group_seeds, Burst, GroupMutation, GroupReport, GroupScenario,
    GroupSimulation, GroupSummary, MemberFate, MemberPlan, GROUP_ID, GROUP_TOPIC, MAX_PARTITIONS,
};
pub use invariants::{names as invariant_names, Checker, Violation};
#[cfg(feature = "quic")]
pub use loopback::{
    Fault, LoopbackBroker, LoopbackError, DRAIN_GRACE, INJECTED_ERROR, LOOPBACK_SERVER_NAME,
};
pub use pump::{
    advance_all, delivered_tag, delivered_tags, drive_all, events, take_deliveries, transmits,
    Limits, Peer, Pump, Route, MAX_OUTPUTS,
};
pub use sim::{
    check_determinism, run_seed, run_seeds, seeds_from_env, Action, AppBehaviour, Decision,
    Failure, Handler, ModelApp, Mutation, ProcessModel, Scenario, SimKind, SimReport, Simulation,
    Summary, DEAD_LETTER_TOPIC, GROUP, RUNS_ENV, SEED_ENV, TOPIC,
};
pub use transport::{SharedBroker, SimTransport, Switch};
pub use virtual_rt::{Stalled, VirtualRuntime};
