//! The fault layer between the consumer and the simulated broker: latency, error frames,
//! error codes, unanswered requests, connection loss and broker crashes, all bounded and all
//! stopping at a heal time.
//!
//! Nothing here reads a clock or an entropy source: every decision comes from a [`SimRng`]
//! seeded by the scenario, so a fault plan replays exactly.

use std::time::Duration;

/// A small seeded PRNG (splitmix64): fast, deterministic, good enough for scenario choices.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A derived generator for a named sub-stream (so adding a draw in one place does not
    /// shift every other choice).
    pub fn fork(&mut self, label: u64) -> SimRng {
        SimRng::new(self.next_u64() ^ label.wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    /// A value in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo + 1;
        lo + self.next_u64() % span
    }

    /// A `usize` in `lo..=hi`.
    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        // usize fits in u64 on every supported target.
        self.range(lo as u64, hi as u64) as usize
    }

    /// True with probability `p` (0.0 ..= 1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        // 53 random bits as a fraction in [0, 1).
        ((self.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// Picks one of `items` (panics on an empty slice: callers pass constants).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range_usize(0, items.len() - 1)]
    }
}

/// Which faults a scenario injects and how often. Every fault stops at `heal_at`.
///
/// Rates are per request (probabilities) or per simulated second (events).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Simulated time after which no fault is injected and latency is `latency_min`..`latency_max`.
    pub heal_at: Duration,
    /// Smallest one-way latency of a request (and of its response).
    pub latency_min: Duration,
    /// Largest ordinary one-way latency.
    pub latency_max: Duration,
    /// Probability that a request's latency spikes (up to `latency_spike`) before heal.
    pub spike_rate: f64,
    /// Largest spiked one-way latency (may exceed the request deadline: late answers).
    pub latency_spike: Duration,
    /// Probability that the broker answers with its error frame (`TransportError::Broker`).
    pub error_frame_rate: f64,
    /// Probability that a request is handled but its answer never arrives.
    pub lost_response_rate: f64,
    /// Probability that a request never reaches the broker and is never answered.
    pub lost_request_rate: f64,
    /// Expected connection losses per simulated second (everything in flight fails).
    pub connection_loss_per_sec: f64,
    /// Expected broker crash-and-restarts per simulated second (commits lost, data kept).
    pub crash_per_sec: f64,
    /// Expected storage-failure injections (`fail_next_fetches`/`fail_next_commits`, or one
    /// partition whose fetches fail until heal) per simulated second.
    pub storage_failure_per_sec: f64,
    /// Most requests one storage-failure injection fails.
    pub storage_failure_burst: u32,
    /// May a request reach the broker after its deadline expired at the consumer? Off by
    /// default: a late CommitOffset then lands after a newer one and moves the broker's offset
    /// back, which no consumer of this protocol can see (see the `late_commit_*` test).
    /// Late *answers* are always possible.
    pub late_arrival: bool,
    /// Does the broker read requests as over a network, cutting every frame that straddles
    /// two packets ([`SimBroker::set_split_reads`](crate::SimBroker::set_split_reads)) until
    /// heal?
    pub split_reads: bool,
    /// Other members of the consumer group joining and leaving (group-session scenarios
    /// only; empty otherwise). Each is gone by `heal_at` plus its session timeout.
    pub phantoms: Vec<PhantomPlan>,
}

/// Another member of the consumer group, driven by the simulation straight against the
/// broker: it joins at `join_at`, heartbeats (rejoining on 22, 25 and 27 like an eager
/// consumer), and at `leave_at` either sends LeaveGroup or goes silent and is evicted by the
/// broker's session reaper. It never fetches and never commits: partitions the broker assigns
/// to it stall until it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhantomPlan {
    /// When it first joins.
    pub join_at: Duration,
    /// When it leaves or goes silent (before heal).
    pub leave_at: Duration,
    /// Goes silent instead of leaving.
    pub silent: bool,
    /// Its session timeout (it heartbeats at a third of it).
    pub session_timeout: Duration,
}

impl PhantomPlan {
    /// Up to `max` phantoms, swarm style, each joining and gone before `heal_at`.
    pub fn swarm(rng: &mut SimRng, heal_at: Duration, max: u64) -> Vec<PhantomPlan> {
        let heal = heal_at.as_millis() as u64;
        (0..rng.range(1, max))
            .map(|_| {
                let join = rng.range(0, heal * 7 / 10);
                let leave = rng.range(join + 1, heal.max(join + 1));
                PhantomPlan {
                    join_at: Duration::from_millis(join),
                    leave_at: Duration::from_millis(leave),
                    silent: rng.chance(0.4),
                    session_timeout: rng.millis(300, 3_000),
                }
            })
            .collect()
    }

    /// Its heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        self.session_timeout / 3
    }
}

impl FaultPlan {
    /// No faults at all: a healthy network with `latency` one way.
    pub fn none(latency: Duration) -> Self {
        Self {
            heal_at: Duration::ZERO,
            latency_min: latency,
            latency_max: latency,
            spike_rate: 0.0,
            latency_spike: latency,
            error_frame_rate: 0.0,
            lost_response_rate: 0.0,
            lost_request_rate: 0.0,
            connection_loss_per_sec: 0.0,
            crash_per_sec: 0.0,
            storage_failure_per_sec: 0.0,
            storage_failure_burst: 0,
            late_arrival: false,
            split_reads: false,
            phantoms: Vec::new(),
        }
    }

    /// A swarm-style plan: each fault kind is enabled or not by a coin flip, with a random rate.
    pub fn from_rng(rng: &mut SimRng, heal_at: Duration) -> Self {
        let latency_min = rng.millis(0, 2);
        let latency_max = latency_min + rng.millis(0, 20);
        let on = |rng: &mut SimRng, lo: f64, hi: f64| {
            if rng.chance(0.5) {
                lo + (hi - lo) * (rng.range(0, 1000) as f64 / 1000.0)
            } else {
                0.0
            }
        };
        Self {
            heal_at,
            latency_min,
            latency_max,
            spike_rate: on(rng, 0.01, 0.1),
            latency_spike: rng.millis(50, 3_000),
            error_frame_rate: on(rng, 0.01, 0.2),
            lost_response_rate: on(rng, 0.005, 0.05),
            lost_request_rate: on(rng, 0.005, 0.05),
            connection_loss_per_sec: on(rng, 0.05, 1.0),
            crash_per_sec: on(rng, 0.02, 0.3),
            storage_failure_per_sec: on(rng, 0.1, 2.0),
            storage_failure_burst: rng.range(1, 8) as u32,
            late_arrival: false,
            // Drawn last, so every other choice of a seed's plan is what it was before.
            split_reads: rng.chance(0.5),
            phantoms: Vec::new(),
        }
    }

    /// True when some fault may still happen at `elapsed`.
    pub fn active(&self, elapsed: Duration) -> bool {
        elapsed < self.heal_at
    }
}

/// What the fault layer does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The broker handles it after `there`, the answer arrives `back` later.
    Deliver {
        /// Latency to the broker.
        there: Duration,
        /// Latency of the answer.
        back: Duration,
    },
    /// The broker answers with its error frame after the round trip.
    ErrorFrame {
        /// Round trip.
        after: Duration,
    },
    /// The broker handles it after `there`, and the answer is lost.
    LostResponse {
        /// Latency to the broker.
        there: Duration,
    },
    /// The request is lost on the way: never handled, never answered.
    LostRequest,
}

impl FaultPlan {
    /// Decides the fate of a request sent at `elapsed` (simulated time since the start).
    pub fn fate(&self, rng: &mut SimRng, elapsed: Duration) -> Fate {
        let active = self.active(elapsed);
        let latency = |rng: &mut SimRng| {
            let ms = |d: Duration| d.as_millis() as u64;
            if active && rng.chance(self.spike_rate) {
                rng.millis(ms(self.latency_max), ms(self.latency_spike))
            } else {
                rng.millis(ms(self.latency_min), ms(self.latency_max))
            }
        };
        let there = latency(rng);
        let back = latency(rng);
        if active {
            if rng.chance(self.error_frame_rate) {
                return Fate::ErrorFrame {
                    after: there + back,
                };
            }
            if rng.chance(self.lost_request_rate) {
                return Fate::LostRequest;
            }
            if rng.chance(self.lost_response_rate) {
                return Fate::LostResponse { there };
            }
        }
        Fate::Deliver { there, back }
    }

    /// The delay until the next event of a Poisson process with `per_sec`, or `None` if off.
    pub fn next_event(rng: &mut SimRng, per_sec: f64) -> Option<Duration> {
        if per_sec <= 0.0 {
            return None;
        }
        // Inverse transform sampling; u in (0, 1].
        let u = ((rng.next_u64() >> 11) as f64 + 1.0) / ((1u64 << 53) as f64);
        let secs = (-u.ln() / per_sec).min(3_600.0);
        Some(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_ranges_hold() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        for _ in 0..1000 {
            let (x, y) = (a.range(3, 9), b.range(3, 9));
            assert_eq!(x, y);
            assert!((3..=9).contains(&x));
        }
        assert_eq!(a.range(5, 5), 5);
        assert!(!a.chance(0.0));
        assert!(a.chance(1.0));
    }

    #[test]
    fn healed_plan_only_delivers() {
        let mut rng = SimRng::new(1);
        let mut plan = FaultPlan::from_rng(&mut rng, Duration::from_secs(1));
        plan.error_frame_rate = 1.0;
        let after = plan.fate(&mut rng, Duration::from_secs(2));
        assert!(matches!(after, Fate::Deliver { .. }));
        let before = plan.fate(&mut rng, Duration::from_millis(10));
        assert!(matches!(before, Fate::ErrorFrame { .. }));
    }
}
