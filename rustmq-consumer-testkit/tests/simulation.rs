//! Deterministic simulation of the consumer against the simulated broker under faults.
//!
//! `RUSTMQ_SIM_SEED=<seed>` replays one seed; `RUSTMQ_SIM_RUNS=<n>` runs n seeds (default
//! 1000). A failure names the invariant, the step and the replay command.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use rustmq_consumer_testkit::*;

#[test]
fn seeds_hold_every_invariant() {
    let seeds = seeds_from_env(0, 1000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    match run_seeds(&seeds, threads) {
        Ok(s) => {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} seeds in {secs:.1}s: {} steps, {} messages produced, {} delivered ({:.0} deliveries/s wall), {} dead-lettered, {} discarded, {} faults, {} crashes, {:?} simulated",
                s.runs, s.steps, s.produced, s.delivered, s.delivered as f64 / secs, s.dead_lettered, s.discarded, s.faults, s.crashes, s.simulated
            );
            assert_eq!(s.runs, seeds.len() as u64);
        }
        Err(f) => panic!("{f}"),
    }
}
