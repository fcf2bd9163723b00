//! Seeded randomness, exponential backoff with full jitter, and deadlines that cannot overflow.

use std::time::{Duration, Instant};

/// What a wait too long for an `Instant` (a `Duration::MAX` timeout or delay) is cut to: a
/// century, which stands for never.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `at + after`; a sum `Instant` cannot hold is cut to `at` plus a century. Every deadline
/// the consumer derives from a configured duration or a requested delay goes through here:
/// `Instant + Duration` panics on overflow.
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .or_else(|| at.checked_add(NEVER))
        .unwrap_or(at)
}

/// A small, fast, seedable PRNG (SplitMix64). Deterministic for a seed: simulation replays it.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max` (Lemire's multiply-shift; the tiny bias is irrelevant for jitter).
    pub(crate) fn up_to(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        ((u128::from(self.next_u64()) * (u128::from(max) + 1)) >> 64) as u64
    }
}

/// The capped exponential delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`,
/// at most `max`.
pub(crate) fn ceiling(base: Duration, max: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(32);
    base.checked_mul(1u32 << shift.min(31))
        .map_or(max, |d| d.min(max))
}

/// Full jitter: uniform in `[0, ceiling(base, max, attempt)]`.
pub(crate) fn full_jitter(rng: &mut Rng, base: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = ceiling(base, max, attempt);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.up_to(nanos))
}

/// Failure counts past this no longer double the delay (it is capped by `max` long before).
const MAX_FAILURE_SHIFT: u32 = 16;

/// The retry delays of the machine: failed requests and nacked messages, full jitter between
/// `base` and `max`, drawn from the seeded PRNG.
#[derive(Debug, Clone)]
pub(crate) struct Jitter {
    rng: Rng,
    base: Duration,
    max: Duration,
}

impl Jitter {
    pub(crate) fn new(seed: u64, base: Duration, max: Duration) -> Self {
        Self {
            rng: Rng::new(seed),
            base,
            max,
        }
    }

    /// New bounds (a live configuration update); the generator goes on where it was.
    pub(crate) fn set_bounds(&mut self, base: Duration, max: Duration) {
        self.base = base;
        self.max = max;
    }

    /// The delay before delivery `attempt + 1` of a nacked message.
    pub(crate) fn retry(&mut self, attempt: u32) -> Duration {
        full_jitter(&mut self.rng, self.base, self.max, attempt)
    }

    /// The delay before trying again after `failures` failures in a row.
    pub(crate) fn after_failures(&mut self, failures: u32) -> Duration {
        self.retry(failures.min(MAX_FAILURE_SHIFT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // a base instant for the test
    fn later_is_exact_when_it_fits_and_a_century_when_not() {
        let t0 = Instant::now();
        let d = Duration::from_secs(5);
        assert_eq!(later(t0, d), t0 + d);
        assert_eq!(later(t0, Duration::MAX), t0 + NEVER);
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(ceiling(b, m, 1), b);
        assert_eq!(ceiling(b, m, 2), Duration::from_millis(200));
        assert_eq!(ceiling(b, m, 4), Duration::from_millis(800));
        assert_eq!(ceiling(b, m, 5), m);
        assert_eq!(ceiling(b, m, u32::MAX), m);
    }

    #[test]
    fn jitter_stays_within_ceiling_and_is_seeded() {
        let b = Duration::from_millis(10);
        let m = Duration::from_millis(500);
        let mut a = Rng::new(7);
        let mut c = Rng::new(7);
        let mut distinct = std::collections::BTreeSet::new();
        for attempt in 1..200 {
            let d = full_jitter(&mut a, b, m, attempt % 8 + 1);
            assert!(d <= ceiling(b, m, attempt % 8 + 1));
            assert_eq!(d, full_jitter(&mut c, b, m, attempt % 8 + 1));
            distinct.insert(d);
        }
        assert!(distinct.len() > 100, "jitter should spread delays");
    }

    #[test]
    fn up_to_covers_bounds() {
        let mut r = Rng::new(1);
        assert_eq!(r.up_to(0), 0);
        let mut seen = [false; 4];
        for _ in 0..1000 {
            seen[r.up_to(3) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
