//! The deterministic simulation: one [`ConsumerMachine`], one [`SimBroker`], a fault layer
//! and an application model, driven by a discrete-event loop.
//!
//! The loop never sleeps: it jumps straight to the earliest of the machine's `poll_timeout`,
//! the broker's `poll_timeout` and its own queue (request arrivals, answers, application
//! actions, fault events). After every input to the machine it drains the outputs in the
//! documented order and checks every invariant of [`crate::invariants`].
//!
//! About a third of the seeds run a consumer-group session instead of manual assignment:
//! phantom members, driven straight against the broker, join, rejoin, leave and go silent
//! before heal; partitions they hold stall until they are gone, then the consumer owns every
//! partition and must settle everything and commit it in its close.
//!
//! One `u64` seed derives the whole [`Scenario`] (swarm style: partition and message counts,
//! every config knob, which faults are on and how often) and every sub-seed, so
//! `RUSTMQ_SIM_SEED=<seed>` replays a failure exactly.
//!
//! # Codemap
//!
//! - `scenario`: [`Scenario`] derived from a seed, and [`Mutation`]s.
//! - `app`: the application model ([`Handler`], [`ModelApp`], [`AppBehaviour`]), concurrent
//!   processing under the core's scheduler ([`ProcessModel`]), and how its decisions reach
//!   the machine.
//! - `phantom`: the other members of a group session.
//! - `event_loop`: [`Simulation`], the loop itself.
//! - `requests`: the fault layer between the machine and the broker.
//! - `runner`: one seed, many seeds on threads, replay commands, reports.
//!
//! The end-of-run checks (close phases, nothing sent after Closed, dead letters in the topic,
//! the group left with everything committed) are the [`Checker`]'s.

mod app;
mod event_loop;
mod phantom;
mod requests;
mod runner;
mod scenario;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug};
use std::time::Instant;

use rustmq_consumer_core::protocol::{CommitOffsetRequest, Request, Response};
use rustmq_consumer_core::{ClosePhase, ConsumerMachine, DeliveryTag, RequestId, TransportError};

pub use app::{Action, AppBehaviour, Decision, Handler, ModelApp, ProcessModel};
pub use runner::{
    check_determinism, run_seed, run_seeds, seeds_from_env, Failure, SimKind, SimReport, Summary,
    RUNS_ENV, SEED_ENV,
};
pub(crate) use runner::{run_seeds_with, Totals};
pub use scenario::{Mutation, Scenario, DEAD_LETTER_TOPIC, GROUP, TOPIC};

use crate::broker::SimBroker;
use crate::faults::{Fate, SimRng};
use crate::invariants::Checker;
use phantom::PhantomState;

#[derive(Debug, Clone)]
enum Item {
    Produce,
    Arrive(RequestId),
    Answer(RequestId),
    AppDone(u64),
    SideEffect(u64),
    ConnectionLoss,
    Crash,
    StorageFailure,
    Pause,
    Resume(u32),
    Seek,
    CommitNow,
    /// The scenario's live configuration update of this index.
    UpdateConfig(usize),
    PhantomJoin(usize),
    PhantomBeat(usize),
    PhantomEnd(usize),
    Heal,
    /// The partition's fetches work again (heal of a failing partition).
    PartitionHealed(u32),
    /// The rebalance listener's revoke hook returned.
    ListenerReturned,
}

#[derive(Debug)]
struct Flight {
    request: Request,
    /// Why the broker cannot read it (too large, or cut: `SimBroker::send`), found as it left.
    unread: Option<TransportError>,
    fate: Fate,
    /// Lowest unsettled offsets when a commit was sent.
    bound: BTreeMap<u32, u64>,
    answer: Option<Result<Response, TransportError>>,
}

#[derive(Debug)]
struct Work {
    tag: DeliveryTag,
    generation: u64,
    action: Action,
    /// Processing time.
    after: std::time::Duration,
    /// The key its lane is chosen by, under concurrent processing.
    lane_key: Option<bytes::Bytes>,
    /// The delivered record, given back with a nack, a reject or a drop (as the driver
    /// gives it back).
    record: rustmq_consumer_core::protocol::Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Faulty,
    Liveness,
    Closing,
}

/// One simulated run. Build it from a [`Scenario`], optionally give it a [`Handler`] or a
/// [`Mutation`], then [`run`](Self::run).
pub struct Simulation<H: Handler = ModelApp> {
    scenario: Scenario,
    handler: H,
    mutation: Mutation,
    start: Instant,
    now: Instant,
    broker: SimBroker,
    machine: Option<ConsumerMachine>,
    checker: Checker,
    fault_rng: SimRng,
    app_rng: SimRng,
    value_rng: SimRng,
    /// Which storage failures fail one partition until heal (its own stream, so the shape
    /// did not move the other faults of every seed).
    partition_fault_rng: SimRng,
    /// How long each revoke hook takes (the scenario's `listener_latency`).
    listener_rng: SimRng,
    queue: BTreeMap<(Instant, u64), Item>,
    seq: u64,
    flights: BTreeMap<RequestId, Flight>,
    work: BTreeMap<u64, Work>,
    next_work: u64,
    /// Concurrent processing under the scheduler (the scenario's `process`, real policy only).
    process: Option<app::ProcessState>,
    paused: BTreeSet<u32>,
    produced: Vec<u64>,
    bursts_left: u32,
    crashed: bool,
    phase: Phase,
    close_phases: Vec<ClosePhase>,
    phantoms: Vec<PhantomState>,
    report: SimReport,
    scratch: String,
    /// The last trace lines, when kept (`keep_trace`).
    tail: std::collections::VecDeque<String>,
    tail_len: usize,
}

impl<H: Handler> Debug for Simulation<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.scenario.seed)
            .field("step", &self.report.steps)
            .finish_non_exhaustive()
    }
}

/// Wake-ups at one simulated instant before the loop calls it a livelock.
const MAX_STEPS_AT_ONE_INSTANT: u64 = 10_000;
/// Inputs one run may take.
const MAX_STEPS: u64 = 300_000;

/// Request ids from here on belong to mutant drivers, not to the machine.
const ROGUE_IDS: u64 = 1 << 62;

fn commit_offsets(c: &CommitOffsetRequest) -> Vec<(u32, u64)> {
    c.offsets
        .iter()
        .filter(|(tp, _)| tp.topic == TOPIC)
        .map(|(tp, o)| (tp.partition, *o))
        .collect()
}
