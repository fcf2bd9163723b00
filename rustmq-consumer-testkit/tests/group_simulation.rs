//! Several consumers in one group on the simulated broker: members join, leave, crash and
//! pause before heal; after heal every message must be acked by someone, no partition is
//! delivered by two members under one generation, and the broker's commits never pass what
//! the group settled.
//!
//! `RUSTMQ_SIM_SEED=<seed>` replays one seed; `RUSTMQ_SIM_RUNS=<n>` runs n seeds (default 24,
//! a few seconds in a debug build).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use rustmq_consumer_testkit::*;

#[test]
fn group_seeds_hold_every_group_invariant() {
    let seeds = seeds_from_env(0, 24);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    match run_group_seeds(&seeds, threads, 80) {
        Ok(s) => {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} group seeds in {secs:.1}s on {threads} threads: {} members (at most {}), at most {} partitions, {} steps, {} produced, {} deliveries, {} duplicates, {} refused acks, {} commits accepted, {} generations, {} crashes, {} pauses, {} closes, at most {:?} from heal to all acked, {:?} simulated",
                s.runs, s.members, s.max_members, s.max_partitions, s.steps, s.produced, s.delivered, s.duplicates, s.refused, s.commits, s.generations, s.crashes, s.pauses, s.closes, s.max_settled_after_heal, s.simulated
            );
            assert_eq!(s.runs, seeds.len() as u64);
            assert!(s.delivered >= s.produced, "every message delivered");
            if s.runs >= 24 {
                assert!(s.crashes > 0, "crashes exercised");
                assert!(s.pauses > 0, "pauses exercised");
                assert!(s.closes > s.runs, "leaves exercised");
                assert!(s.generations > s.runs * 3, "rebalances exercised");
            }
        }
        Err(f) => panic!("{f}"),
    }
}

#[test]
fn group_scenarios_span_the_advertised_ranges() {
    let scenarios: Vec<GroupScenario> = (0..2_000).map(GroupScenario::from_seed).collect();
    let members = |s: &GroupScenario| s.members.len();
    assert_eq!(scenarios.iter().map(members).min(), Some(2));
    assert_eq!(scenarios.iter().map(members).max(), Some(20));
    assert_eq!(scenarios.iter().map(|s| s.partitions).min(), Some(1));
    assert!(scenarios.iter().map(|s| s.partitions).max() > Some(900));
    let fates = |f: fn(&MemberFate) -> bool| {
        scenarios
            .iter()
            .flat_map(|s| &s.members)
            .filter(|m| f(&m.fate))
            .count()
    };
    assert!(fates(|f| matches!(f, MemberFate::Leaves(_))) > 100);
    assert!(fates(|f| matches!(f, MemberFate::Crashes(_))) > 100);
    assert!(fates(|f| matches!(f, MemberFate::Silent(..))) > 100);
    for s in &scenarios {
        assert!(
            s.members.iter().all(|m| m.join_at <= s.heal_at),
            "everyone joins before heal"
        );
        assert!(s.members.iter().any(|m| m.join_at.is_zero()));
    }
}

#[test]
fn a_group_seed_replays_to_the_same_report() {
    for seed in [3, 11] {
        let a = run_group_seed(seed, 0).unwrap_or_else(|f| panic!("{f}"));
        let b = run_group_seed(seed, 0).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(a, b);
        assert!(a.members >= 2 && a.delivered >= a.produced);
    }
}

/// Runs seeds with every member mutated; returns the failures.
fn catch(mutation: GroupMutation) -> Vec<Failure> {
    (0..12)
        .filter_map(|seed| {
            GroupSimulation::new(GroupScenario::from_seed(seed))
                .with_mutation(mutation)
                .run()
                .err()
        })
        .collect()
}

#[test]
fn group_checker_catches_commits_past_what_was_settled() {
    let caught = catch(GroupMutation::CommitPastSettled);
    assert!(caught.len() >= 10, "caught only {} of 12", caught.len());
    for f in &caught {
        assert_eq!(
            f.violation.invariant,
            group_names::COMMIT_WITHIN_SETTLED,
            "{f}"
        );
    }
    let shown = caught[0].to_string();
    println!("{shown}");
    assert!(
        shown.contains(&format!(
            "RUSTMQ_SIM_SEED={} cargo test -p rustmq-consumer-testkit --test group_simulation",
            caught[0].seed
        )),
        "{shown}"
    );
}

#[test]
fn group_checker_catches_members_taking_partitions_they_were_not_given() {
    let caught = catch(GroupMutation::TakeEveryPartition);
    assert!(caught.len() >= 10, "caught only {} of 12", caught.len());
    let ownership = [
        group_names::DELIVERY_IN_ASSIGNMENT,
        group_names::EXCLUSIVE_PARTITION,
    ];
    for f in &caught {
        assert!(ownership.contains(&f.violation.invariant), "{f}");
    }
    println!("{}", caught[0]);
}
