//! proptest strategies for users' and our own property tests: whole scenarios (about a third
//! of them consumer-group sessions with other members joining and leaving), fault plans and
//! application behaviours.
//!
//! Every strategy builds on the seeded derivations of [`Scenario::from_seed`],
//! [`FaultPlan::from_rng`] and [`AppBehaviour::from_rng`], so a shrunk case is still a
//! realistic one, plus a few targeted variations (no faults, a well-behaved application).

use std::time::Duration;

use proptest::prelude::*;

use crate::faults::{FaultPlan, SimRng};
use crate::sim::{AppBehaviour, Scenario};

/// Any scenario a seed can derive.
pub fn scenario() -> impl Strategy<Value = Scenario> {
    any::<u64>().prop_map(Scenario::from_seed)
}

/// A scenario with every fault switched off (a healthy network with a little latency).
pub fn healthy_scenario() -> impl Strategy<Value = Scenario> {
    (any::<u64>(), 0u64..5).prop_map(|(seed, latency)| {
        let mut s = Scenario::from_seed(seed);
        s.faults = FaultPlan::none(Duration::from_millis(latency));
        s.liveness_budget = s.default_liveness_budget();
        s
    })
}

/// A fault plan healing at `heal_at`, swarm style (each fault kind on or off).
pub fn fault_plan(heal_at: Duration) -> impl Strategy<Value = FaultPlan> {
    any::<u64>().prop_map(move |seed| FaultPlan::from_rng(&mut SimRng::new(seed), heal_at))
}

/// An application behaviour, swarm style (each misbehaviour on or off).
pub fn app_behaviour() -> impl Strategy<Value = AppBehaviour> {
    any::<u64>().prop_map(|seed| AppBehaviour::from_rng(&mut SimRng::new(seed)))
}

/// A scenario derived from a seed, with the given application behaviour and fault plan
/// strategies substituted: compose your own.
pub fn scenario_with(
    app: impl Strategy<Value = AppBehaviour>,
    faults: impl Strategy<Value = FaultPlan>,
) -> impl Strategy<Value = Scenario> {
    (any::<u64>(), app, faults).prop_map(|(seed, app, faults)| {
        let mut s = Scenario::from_seed(seed);
        s.app = app;
        if !s.config.enable_auto_commit && s.app.commit_per_sec == 0.0 {
            s.app.commit_per_sec = 1.0;
        }
        let phantoms = std::mem::take(&mut s.faults.phantoms);
        s.faults = faults;
        if s.is_group() {
            // Keep the seed's other members, gone by the new heal time.
            let heal = s.faults.heal_at;
            s.faults.phantoms = phantoms
                .into_iter()
                .filter(|p| p.join_at < heal)
                .map(|mut p| {
                    p.leave_at = p.leave_at.min(heal);
                    p
                })
                .collect();
        }
        s.liveness_budget = s.default_liveness_budget();
        s
    })
}
