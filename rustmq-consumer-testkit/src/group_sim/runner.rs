//! Running group seeds: one ([`run_group_seed`]), many on threads ([`run_group_seeds`], on
//! the simulation's runner) and what a run reports. A run fails with the simulation's
//! [`Failure`], which names its replay command.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use super::{group_names, GroupScenario, GroupSimulation};
use crate::invariants::Violation;
use crate::sim::{run_seeds_with, Failure, SimKind, Totals};

/// What a finished group run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupReport {
    /// The seed.
    pub seed: u64,
    /// Members that ran (a late joiner after heal included).
    pub members: u64,
    /// Partitions of the topic.
    pub partitions: u64,
    /// Inputs fed to the machines (steps, timer firings, acks and nacks).
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries (redeliveries included).
    pub delivered: u64,
    /// Acks the machines accepted.
    pub acked: u64,
    /// Nacks the machines accepted.
    pub nacked: u64,
    /// Acks and nacks refused (the partition was revoked or the member closed meanwhile).
    pub refused: u64,
    /// Deliveries of a message some member had already acked.
    pub duplicates: u64,
    /// `Assigned` events over every member.
    pub assignments: u64,
    /// `Revoked` events over every member.
    pub revocations: u64,
    /// Commits the broker accepted.
    pub commits: u64,
    /// The group's generation at the end.
    pub generation: u64,
    /// Members crashed.
    pub crashes: u64,
    /// Members paused.
    pub pauses: u64,
    /// Members closed (before heal and at the end).
    pub closes: u64,
    /// Members that joined at heal because nobody was left.
    pub late_joiners: u64,
    /// Simulated time from heal until every message was acked by someone.
    pub settled_after_heal: Duration,
    /// Simulated time until every member closed.
    pub simulated: Duration,
}

/// Totals of many group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupSummary {
    /// Seeds run.
    pub runs: u64,
    /// Members, summed.
    pub members: u64,
    /// Largest member count of one run.
    pub max_members: u64,
    /// Largest partition count of one run.
    pub max_partitions: u64,
    /// Inputs fed to machines.
    pub steps: u64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Deliveries of a message already acked.
    pub duplicates: u64,
    /// Acks and nacks refused.
    pub refused: u64,
    /// Commits accepted by the broker.
    pub commits: u64,
    /// Generations, summed over runs.
    pub generations: u64,
    /// Crashes.
    pub crashes: u64,
    /// Pauses.
    pub pauses: u64,
    /// Closes.
    pub closes: u64,
    /// Longest time from heal until everything was acked.
    pub max_settled_after_heal: Duration,
    /// Simulated time, summed.
    pub simulated: Duration,
}

impl Totals for GroupSummary {
    type Report = GroupReport;

    fn add(&mut self, r: &GroupReport) {
        self.runs += 1;
        self.members += r.members;
        self.max_members = self.max_members.max(r.members);
        self.max_partitions = self.max_partitions.max(r.partitions);
        self.steps += r.steps;
        self.produced += r.produced;
        self.delivered += r.delivered;
        self.duplicates += r.duplicates;
        self.refused += r.refused;
        self.commits += r.commits;
        self.generations += r.generation;
        self.crashes += r.crashes;
        self.pauses += r.pauses;
        self.closes += r.closes;
        self.max_settled_after_heal = self.max_settled_after_heal.max(r.settled_after_heal);
        self.simulated += r.simulated;
    }

    fn merge(&mut self, s: &GroupSummary) {
        self.runs += s.runs;
        self.members += s.members;
        self.max_members = self.max_members.max(s.max_members);
        self.max_partitions = self.max_partitions.max(s.max_partitions);
        self.steps += s.steps;
        self.produced += s.produced;
        self.delivered += s.delivered;
        self.duplicates += s.duplicates;
        self.refused += s.refused;
        self.commits += s.commits;
        self.generations += s.generations;
        self.crashes += s.crashes;
        self.pauses += s.pauses;
        self.closes += s.closes;
        self.max_settled_after_heal = self.max_settled_after_heal.max(s.max_settled_after_heal);
        self.simulated += s.simulated;
    }
}

/// Runs `sim`, turning a panic (a pump bound ran out, a machine refused its config) into a
/// failure of [`group_names::BOUNDED`].
fn guarded(seed: u64, sim: GroupSimulation) -> Result<GroupReport, Failure> {
    catch_unwind(AssertUnwindSafe(|| sim.run())).unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned());
        Err(Failure {
            kind: SimKind::Group,
            seed,
            violation: Violation {
                invariant: group_names::BOUNDED,
                step: 0,
                at: Duration::ZERO,
                detail,
            },
            trace_tail: Vec::new(),
        })
    })
}

/// Runs group seed `seed`; on failure, runs it again keeping the last `trace_lines` trace
/// lines for the report.
pub fn run_group_seed(seed: u64, trace_lines: usize) -> Result<GroupReport, Failure> {
    guarded(seed, GroupSimulation::new(GroupScenario::from_seed(seed))).map_err(|first| {
        if trace_lines == 0 {
            return first;
        }
        let sim = GroupSimulation::new(GroupScenario::from_seed(seed)).keep_trace(trace_lines);
        match guarded(seed, sim) {
            Err(again) if again.violation.invariant == first.violation.invariant => again,
            // A run that differs from the first is a determinism failure of its own.
            other => Failure {
                kind: SimKind::Group,
                seed,
                violation: Violation {
                    invariant: group_names::DETERMINISM,
                    step: first.violation.step,
                    at: first.violation.at,
                    detail: format!(
                        "the replay differs: first {}, then {other:?}",
                        first.violation
                    ),
                },
                trace_tail: Vec::new(),
            },
        }
    })
}

/// Runs every seed on `threads` threads; the failure of the lowest seed wins.
pub fn run_group_seeds(
    seeds: &[u64],
    threads: usize,
    trace_lines: usize,
) -> Result<GroupSummary, Failure> {
    run_seeds_with(seeds, threads, |seed| run_group_seed(seed, trace_lines))
}
