//! Running seeds: one ([`run_seed`]), twice to compare ([`check_determinism`]), many on
//! threads ([`run_seeds`]) with their [`Summary`]; what a run reports ([`SimReport`]) or how
//! it failed ([`Failure`]), and how to replay it. The group simulation's runs fail with the
//! same [`Failure`] and run on the same threads ([`run_seeds_with`]).

use std::fmt;
use std::time::Duration;

use super::{Scenario, Simulation};
use crate::invariants::{names, Violation};

/// Environment variable replaying one seed.
pub const SEED_ENV: &str = "RUSTMQ_SIM_SEED";
/// Environment variable setting how many seeds run.
pub const RUNS_ENV: &str = "RUSTMQ_SIM_RUNS";

/// Which simulation a seed ran in: its test target replays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimKind {
    /// One consumer, the broker and its faults ([`Simulation`]; `--test simulation`).
    Single,
    /// Several consumers in one group ([`GroupSimulation`](crate::GroupSimulation);
    /// `--test group_simulation`).
    Group,
}

impl SimKind {
    /// The command that replays `seed` of this simulation.
    pub fn replay_command(self, seed: u64) -> String {
        let test = match self {
            Self::Single => "simulation",
            Self::Group => "group_simulation",
        };
        format!("{SEED_ENV}={seed} cargo test -p rustmq-consumer-testkit --test {test}")
    }
}

/// The seeds to run: the one in `RUSTMQ_SIM_SEED` if set, else `RUSTMQ_SIM_RUNS` (or
/// `default_runs`) seeds counting up from `first`.
pub fn seeds_from_env(first: u64, default_runs: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return vec![seed];
    }
    let runs = std::env::var(RUNS_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default_runs);
    (first..first.saturating_add(runs)).collect()
}

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Inputs fed to the machine.
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries (redeliveries included).
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Messages confirmed in the dead-letter topic.
    pub dead_lettered: u64,
    /// Poison messages discarded.
    pub discarded: u64,
    /// Requests the machine sent.
    pub requests: u64,
    /// Requests the fault layer failed or lost.
    pub faults: u64,
    /// Requests the broker read in part: they straddled two packets under split reads.
    pub cut: u64,
    /// Broker crashes.
    pub crashes: u64,
    /// Seeks.
    pub seeks: u64,
    /// Live configuration updates applied.
    pub config_updates: u64,
    /// The run was a group session.
    pub group: bool,
    /// Group session: assignments the consumer received (`Assigned` events).
    pub assignments: u64,
    /// Group session: JoinGroup requests of other (phantom) members.
    pub phantom_joins: u64,
    /// Acks, nacks and rejects of stale deliveries (revoked or sought) the machine refused.
    pub stale_refused: u64,
    /// Deliveries of messages already processed (at least once across rebalances, restarts
    /// and seeks).
    pub duplicates: u64,
    /// Group session: revoke hooks of the rebalance listener that returned.
    pub hooks_returned: u64,
    /// Simulated time until Closed.
    pub simulated: Duration,
    /// Hash of every transmit, event and application action, in order.
    pub trace_hash: u64,
}

/// A failed run of either simulation: the violation and how to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The simulation that ran.
    pub kind: SimKind,
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub violation: Violation,
    /// The last trace lines before it broke (empty unless the run kept its trace).
    pub trace_tail: Vec<String>,
}

impl Failure {
    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        self.kind.replay_command(self.seed)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seed = match self.kind {
            SimKind::Single => "seed",
            SimKind::Group => "group seed",
        };
        write!(
            f,
            "{seed} {}: {}\nreplay: {}",
            self.seed,
            self.violation,
            self.replay_command()
        )?;
        if !self.trace_tail.is_empty() {
            write!(f, "\nlast trace lines:\n{}", self.trace_tail.join("\n"))?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Trace lines attached to a failure: `RUSTMQ_SIM_TRACE_LINES` or 60.
fn trace_lines() -> usize {
    std::env::var("RUSTMQ_SIM_TRACE_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// Runs `seed`'s scenario with its application model.
pub fn run_seed(seed: u64) -> Result<SimReport, Failure> {
    Simulation::new(Scenario::from_seed(seed)).run()
}

/// Runs `seed` twice and compares the trace hashes; a difference is a [`Failure`] of the
/// `determinism` invariant.
pub fn check_determinism(seed: u64) -> Result<SimReport, Failure> {
    let first = run_seed(seed)?;
    let second = run_seed(seed)?;
    if first != second {
        return Err(Failure {
            kind: SimKind::Single,
            seed,
            violation: Violation {
                invariant: names::DETERMINISM,
                step: first.steps.min(second.steps),
                at: first.simulated.min(second.simulated),
                detail: format!("two runs differ: {first:?} vs {second:?}"),
            },
            trace_tail: Vec::new(),
        });
    }
    Ok(first)
}

/// Totals of many runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Seeds run.
    pub runs: u64,
    /// Inputs fed to machines.
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Dead-lettered messages.
    pub dead_lettered: u64,
    /// Discarded messages.
    pub discarded: u64,
    /// Faults injected.
    pub faults: u64,
    /// Requests cut under split reads.
    pub cut: u64,
    /// Broker crashes.
    pub crashes: u64,
    /// Simulated time, summed.
    pub simulated: Duration,
    /// Seeds that ran a group session.
    pub group_runs: u64,
    /// Assignments received in group sessions.
    pub assignments: u64,
    /// JoinGroups of phantom members.
    pub phantom_joins: u64,
    /// Stale acks, nacks and rejects refused.
    pub stale_refused: u64,
    /// Deliveries of messages already processed, in group sessions.
    pub group_duplicates: u64,
    /// Revoke hooks that returned (seeds with a rebalance listener).
    pub hooks_returned: u64,
    /// Runs that updated the configuration live.
    pub update_runs: u64,
    /// Live configuration updates applied.
    pub config_updates: u64,
}

/// Totals of many runs of one simulation, summed from their reports.
pub(crate) trait Totals: Default + Send {
    /// What one run reports.
    type Report;
    /// Adds one run.
    fn add(&mut self, report: &Self::Report);
    /// Adds another thread's totals.
    fn merge(&mut self, other: &Self);
}

impl Totals for Summary {
    type Report = SimReport;

    fn add(&mut self, r: &SimReport) {
        self.group_runs += u64::from(r.group);
        self.assignments += r.assignments;
        self.phantom_joins += r.phantom_joins;
        self.stale_refused += r.stale_refused;
        self.hooks_returned += r.hooks_returned;
        if r.group {
            self.group_duplicates += r.duplicates;
        }
        self.update_runs += u64::from(r.config_updates > 0);
        self.config_updates += r.config_updates;
        self.runs += 1;
        self.steps += r.steps;
        self.produced += r.produced;
        self.delivered += r.delivered;
        self.dead_lettered += r.dead_lettered;
        self.discarded += r.discarded;
        self.faults += r.faults;
        self.cut += r.cut;
        self.crashes += r.crashes;
        self.simulated += r.simulated;
    }

    fn merge(&mut self, s: &Summary) {
        self.runs += s.runs;
        self.steps += s.steps;
        self.produced += s.produced;
        self.delivered += s.delivered;
        self.dead_lettered += s.dead_lettered;
        self.discarded += s.discarded;
        self.faults += s.faults;
        self.cut += s.cut;
        self.crashes += s.crashes;
        self.simulated += s.simulated;
        self.group_runs += s.group_runs;
        self.assignments += s.assignments;
        self.phantom_joins += s.phantom_joins;
        self.stale_refused += s.stale_refused;
        self.group_duplicates += s.group_duplicates;
        self.hooks_returned += s.hooks_returned;
        self.update_runs += s.update_runs;
        self.config_updates += s.config_updates;
    }
}

/// Runs every seed on `threads` threads; the first failure (lowest seed) wins, replayed with
/// its trace.
pub fn run_seeds(seeds: &[u64], threads: usize) -> Result<Summary, Failure> {
    run_seeds_with(seeds, threads, |seed| {
        run_seed(seed).map_err(|_| {
            // Replay the failure keeping its trace for the report.
            Simulation::new(Scenario::from_seed(seed))
                .keep_trace(trace_lines())
                .run()
                .expect_err("a failing seed fails again: runs are deterministic")
        })
    })
}

/// Runs every seed through `run` on `threads` threads, each thread taking every `threads`-th
/// seed and stopping at its first failure, and sums the reports; the failure of the lowest
/// seed wins.
pub(crate) fn run_seeds_with<T, F>(seeds: &[u64], threads: usize, run: F) -> Result<T, Failure>
where
    T: Totals,
    F: Fn(u64) -> Result<T::Report, Failure> + Sync,
{
    let threads = threads.max(1);
    let run = &run;
    let results: Vec<Result<T, Failure>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut sum = T::default();
                    for &seed in seeds.iter().skip(t).step_by(threads) {
                        sum.add(&run(seed)?);
                    }
                    Ok(sum)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut total = T::default();
    let mut first: Option<Failure> = None;
    for r in results {
        match r {
            Ok(s) => total.merge(&s),
            Err(f) => {
                if first.as_ref().is_none_or(|g| f.seed < g.seed) {
                    first = Some(f);
                }
            }
        }
    }
    match first {
        Some(f) => Err(f),
        None => Ok(total),
    }
}
