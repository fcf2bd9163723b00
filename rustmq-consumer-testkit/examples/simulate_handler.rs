//! Test your own message handler under deterministic simulation.
//!
//! The handler below is ordinary application logic: it acks orders, retries ones whose
//! payment service "times out" with an explicit delay, and rejects malformed ones. The
//! simulation runs it against the simulated broker with faults (latency, error frames, lost
//! answers, connection loss, broker crashes) and checks every consumer invariant after every
//! step; then it checks that everything settles after the faults heal and that close works.
//!
//! ```text
//! cargo run -p rustmq-consumer-testkit --example simulate_handler            # seeds 0..20
//! cargo run -p rustmq-consumer-testkit --example simulate_handler -- 1234    # one seed
//! ```
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Duration;

use rustmq_consumer_core::Message;
use rustmq_consumer_testkit::{Action, Decision, Scenario, SimRng, Simulation};

/// The application's handler: decides what to do with one message and how long it takes.
fn handle_order(delivery: &Message, rng: &mut SimRng) -> Decision {
    let body = String::from_utf8_lossy(&delivery.record.value);
    // Every 13th order is malformed: no retry helps, send it to the dead-letter topic.
    if delivery.tag.offset % 13 == 12 {
        return Decision::new(
            Action::Reject(format!("malformed order {body:.12}")),
            Duration::from_millis(1),
        );
    }
    // The payment service is flaky on first attempts: retry after a short explicit delay.
    if delivery.tag.attempt == 1 && rng.chance(0.2) {
        return Decision::new(
            Action::Nack(Some(Duration::from_millis(50))),
            rng.millis(5, 30),
        );
    }
    Decision::new(Action::Ack, rng.millis(1, 20))
}

fn main() -> ExitCode {
    let seeds: Vec<u64> = match std::env::args().nth(1).and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => (0..20).collect(),
    };
    for seed in seeds {
        // The seed derives the partitions, message counts, config knobs and faults.
        let mut scenario = Scenario::from_seed(seed);
        // Pin what matters to this application: a dead-letter topic and a few retries.
        scenario.config.dead_letter_queue = Some("orders-dlq".to_owned());
        scenario.config.max_retry_attempts = 3;
        scenario.liveness_budget = scenario.default_liveness_budget();
        let result = Simulation::with_handler(scenario, handle_order)
            .keep_trace(40)
            .run();
        match result {
            Ok(r) => println!(
                "seed {seed}: ok, {} produced, {} deliveries, {} acked, {} dead-lettered, {} faults, {} crashes, {:?} simulated",
                r.produced, r.delivered, r.acked, r.dead_lettered, r.faults, r.crashes, r.simulated
            ),
            Err(failure) => {
                println!("{failure}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
