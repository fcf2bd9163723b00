//! A group scenario from one seed: how many members and partitions, what each member does and
//! when, the messages, the application's habits, and the heal time.

use std::time::Duration;

use rustmq_consumer_core::ConsumerConfig;

use crate::faults::SimRng;

/// Topic of every group scenario.
pub const GROUP_TOPIC: &str = "group-sim-topic";
/// Consumer group of every group scenario.
pub const GROUP_ID: &str = "group-sim";

/// Most partitions one scenario has.
pub const MAX_PARTITIONS: u32 = 1_000;

/// What happens to one member before heal, after it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberFate {
    /// Stays to the end.
    Stays,
    /// Closes at this time (a graceful leave: final commit, then LeaveGroup).
    Leaves(Duration),
    /// Its process dies at this time: the machine is dropped without a close, and the broker
    /// evicts it after its session timeout.
    Crashes(Duration),
    /// Not driven from `.0` to `.1` (a stop-the-world pause: no heartbeats, no fetches, no
    /// acks), then driven again; a pause still running at heal ends there.
    Silent(Duration, Duration),
}

/// One member of a scenario.
#[derive(Debug, Clone)]
pub struct MemberPlan {
    /// Its configuration (a group session on [`GROUP_TOPIC`] in [`GROUP_ID`]).
    pub config: ConsumerConfig,
    /// When it starts (and sends its first FindCoordinator).
    pub join_at: Duration,
    /// What happens to it before heal.
    pub fate: MemberFate,
}

/// A produce burst during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    /// When.
    pub at: Duration,
    /// How many messages, spread at random over the partitions.
    pub messages: u64,
}

/// Everything one multi-member run does, derived from one seed.
#[derive(Debug, Clone)]
pub struct GroupScenario {
    /// The seed it came from.
    pub seed: u64,
    /// Partitions of the topic (the coordinator's partition count too).
    pub partitions: u32,
    /// Messages produced before anyone joins, per partition.
    pub initial: Vec<u64>,
    /// Produce bursts before heal.
    pub bursts: Vec<Burst>,
    /// The members, in the order they were planned (not the order they join).
    pub members: Vec<MemberPlan>,
    /// From here on nobody joins, leaves, crashes or pauses; the members still running (or a
    /// late joiner, when none is) must settle every message.
    pub heal_at: Duration,
    /// Simulated time allowed after heal for every message to be acked by someone.
    pub liveness_budget: Duration,
    /// Probability that the application nacks a first delivery (it acks the redelivery).
    pub nack_rate: f64,
    /// Probability that the application holds a delivery a while before settling it.
    pub defer_rate: f64,
    /// Longest such hold.
    pub defer_max: Duration,
}

impl GroupScenario {
    /// Derives a whole scenario from `seed`: 2 to 20 members, 1 to 1,000 partitions (most seeds
    /// have few: small scenarios keep many seeds cheap), members joining at random times before
    /// heal, some leaving, crashing or pausing.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SimRng::new(seed ^ 0x6d75_6c74_6973_696d); // "multisim"
        let mut shape = rng.fork(1);
        let members = if shape.chance(0.6) {
            shape.range_usize(2, 5)
        } else {
            shape.range_usize(6, 20)
        };
        let roll = shape.range(0, 99);
        let partitions = match roll {
            0..=49 => shape.range(1, 8),
            50..=84 => shape.range(9, 64),
            85..=96 => shape.range(65, 300),
            _ => shape.range(301, u64::from(MAX_PARTITIONS)),
        } as u32;
        let heal_at = shape.millis(2_000, 20_000);
        let mut initial = vec![0u64; partitions as usize];
        let total = shape.range(0, 200) + shape.range(0, u64::from(partitions) * 2);
        for _ in 0..total {
            initial[shape.range_usize(0, partitions as usize - 1)] += 1;
        }
        let bursts = (0..shape.range(0, 4))
            .map(|_| Burst {
                at: shape.millis(0, heal_at.as_millis() as u64),
                messages: shape.range(1, 100),
            })
            .collect();

        let mut app = rng.fork(2);
        let nack_rate = app.pick(&[0.0, 0.0, 0.05, 0.2]);
        let defer_rate = app.pick(&[0.0, 0.1, 0.5]);
        let defer_max = app.millis(1, 400);

        let mut who = rng.fork(3);
        let first = who.range_usize(1, members.min(3));
        let members: Vec<MemberPlan> = (0..members)
            .map(|i| {
                let join_at = if i < first {
                    Duration::ZERO
                } else {
                    who.millis(0, heal_at.as_millis() as u64)
                };
                Self::member(&mut who, seed, i, join_at, heal_at)
            })
            .collect();
        let longest_session = members
            .iter()
            .map(|m| m.config.session_timeout)
            .max()
            .unwrap_or_default();
        Self {
            seed,
            partitions,
            initial,
            bursts,
            members,
            heal_at,
            // Evicting a member crashed just before heal, the rebalances that follow, and the
            // fetches of every partition, with room to spare.
            liveness_budget: longest_session * 4 + Duration::from_secs(60),
            nack_rate,
            defer_rate,
            defer_max,
        }
    }

    /// A member joining at `join_at` with its own knobs and fate.
    pub(crate) fn member(
        rng: &mut SimRng,
        seed: u64,
        index: usize,
        join_at: Duration,
        heal_at: Duration,
    ) -> MemberPlan {
        let mut c = ConsumerConfig::new(GROUP_TOPIC, GROUP_ID);
        c.consumer_id = Some(format!("group-sim-{seed}-{index}"));
        c.session_timeout = rng.millis(1_500, 10_000);
        c.heartbeat_interval = rng
            .chance(0.3)
            .then(|| c.session_timeout / rng.range(2, 5) as u32);
        c.rebalance_drain_timeout = rng.millis(50, 3_000);
        c.ack_batch_size = rng.pick(&[1, 10, 100]);
        c.ack_batch_timeout = rng.millis(5, 300);
        c.fetch_size = rng.pick(&[1, 10, 100]);
        c.max_unacked = rng.pick(&[4, 64, 1000]);
        c.empty_fetch_backoff_min = rng.millis(5, 50);
        c.empty_fetch_backoff_max = c.empty_fetch_backoff_min + rng.millis(200, 1_000);
        c.drain_timeout = rng.millis(200, 5_000);
        c.seed = rng.next_u64();
        let window = heal_at.saturating_sub(join_at).as_millis() as u64;
        let at = |rng: &mut SimRng| join_at + rng.millis(0, window);
        let fate = match rng.range(0, 99) {
            0..=49 => MemberFate::Stays,
            50..=64 => MemberFate::Leaves(at(rng)),
            65..=79 => MemberFate::Crashes(at(rng)),
            _ => {
                let from = at(rng);
                let pause = rng.millis(100, c.session_timeout.as_millis() as u64 * 5 / 2);
                MemberFate::Silent(from, from + pause)
            }
        };
        MemberPlan {
            config: c,
            join_at,
            fate,
        }
    }

    /// Messages produced over the whole run.
    pub fn total_messages(&self) -> u64 {
        self.initial.iter().sum::<u64>() + self.bursts.iter().map(|b| b.messages).sum::<u64>()
    }
}
