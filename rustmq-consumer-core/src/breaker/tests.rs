//! Tests of the circuit breaker.
use super::*;

/// Below `FIRST_OPEN_WAIT`: every open interval is this (the growth has its own tests).
const RECOVERY: Duration = Duration::from_millis(800);
const MAX_WAIT: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Threshold 3, two probes.
fn breaker() -> Breaker {
    Breaker::new(3, RECOVERY, 2, MAX_WAIT)
}

fn drain(b: &mut Breaker) -> Vec<(BreakerState, BreakerState)> {
    std::iter::from_fn(|| b.poll_transition()).collect()
}

/// Fails `n` normal requests at `now`.
fn fail(b: &mut Breaker, now: Instant, n: u32) {
    for _ in 0..n {
        let p = b.try_acquire().unwrap();
        assert_eq!(p, Permit::Normal);
        b.on_failure(now, p);
    }
}

/// Opens the breaker at `now`, then half-opens it at its deadline; returns that deadline.
fn half_open(b: &mut Breaker, now: Instant) -> Instant {
    fail(b, now, 3);
    let at = b.poll_timeout().unwrap();
    b.handle_timeout(at);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    drain(b);
    at
}

#[test]
fn starts_closed_and_allows_normal_requests() {
    let mut b = breaker();
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.try_acquire(), Some(Permit::Normal));
    assert_eq!(b.poll_timeout(), None);
    assert_eq!(b.poll_transition(), None);
    assert_eq!(b.transitions(), 0);
}

#[test]
fn threshold_of_consecutive_failures_opens() {
    let t0 = Instant::now();
    let mut b = breaker();
    fail(&mut b, t0, 2);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&mut b, t0 + ms(5), 1);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.try_acquire(), None);
    assert_eq!(b.poll_timeout(), Some(t0 + ms(5) + RECOVERY));
    assert_eq!(
        drain(&mut b),
        vec![(BreakerState::Closed, BreakerState::Open)]
    );
    assert_eq!(b.transitions(), 1);
}

#[test]
fn success_resets_the_failure_count() {
    let t0 = Instant::now();
    let mut b = breaker();
    fail(&mut b, t0, 2);
    let p = b.try_acquire().unwrap();
    b.on_success(t0, p);
    fail(&mut b, t0, 2);
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "2 + 2 failures, not in a row"
    );
    fail(&mut b, t0, 1);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn zero_threshold_and_probes_are_taken_as_one() {
    let t0 = Instant::now();
    let mut b = Breaker::new(0, RECOVERY, 0, MAX_WAIT);
    fail(&mut b, t0, 1);
    assert_eq!(b.state(), BreakerState::Open);
    b.handle_timeout(t0 + RECOVERY);
    assert_eq!(b.try_acquire(), Some(Permit::Probe));
    assert_eq!(b.try_acquire(), None);
    b.on_success(t0 + RECOVERY, Permit::Probe);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn open_half_opens_at_the_recovery_deadline() {
    let t0 = Instant::now();
    let mut b = breaker();
    fail(&mut b, t0, 3);
    b.handle_timeout(t0 + RECOVERY - ms(1));
    assert_eq!(b.state(), BreakerState::Open, "before the deadline");
    b.handle_timeout(t0 + RECOVERY);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.poll_timeout(), Some(t0 + RECOVERY + MAX_WAIT));
    assert_eq!(
        drain(&mut b),
        vec![
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen)
        ]
    );
}

#[test]
fn late_timeout_half_opens_from_the_call_time() {
    let t0 = Instant::now();
    let mut b = breaker();
    fail(&mut b, t0, 3);
    let late = t0 + RECOVERY + ms(500);
    b.handle_timeout(late);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.poll_timeout(), Some(late + MAX_WAIT));
}

#[test]
fn probes_are_bounded_while_half_open() {
    let t0 = Instant::now();
    let mut b = breaker();
    half_open(&mut b, t0);
    assert_eq!(b.try_acquire(), Some(Permit::Probe));
    assert_eq!(b.try_acquire(), Some(Permit::Probe));
    assert_eq!(b.try_acquire(), None, "two probes in flight at most");
    b.release(Permit::Probe);
    assert_eq!(b.try_acquire(), Some(Permit::Probe), "release frees a slot");
    assert_eq!(b.try_acquire(), None);
}

#[test]
fn successful_probes_close_even_sequentially() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    let p = b.try_acquire().unwrap();
    b.on_success(at, p);
    assert_eq!(b.state(), BreakerState::HalfOpen, "one success of two");
    let p = b.try_acquire().unwrap();
    assert_eq!(p, Permit::Probe, "the success freed its slot");
    b.on_success(at, p);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.poll_timeout(), None);
    assert_eq!(b.try_acquire(), Some(Permit::Normal));
    assert_eq!(
        drain(&mut b),
        vec![(BreakerState::HalfOpen, BreakerState::Closed)]
    );
}

#[test]
fn closing_resets_the_failure_count() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    for _ in 0..2 {
        let p = b.try_acquire().unwrap();
        b.on_success(at, p);
    }
    fail(&mut b, at, 2);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&mut b, at, 1);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn probe_failure_reopens_with_a_fresh_recovery_timer() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire().unwrap();
    b.on_success(at, first);
    b.on_failure(at + ms(7), second);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.try_acquire(), None);
    assert_eq!(b.poll_timeout(), Some(at + ms(7) + RECOVERY));
    assert_eq!(
        drain(&mut b),
        vec![(BreakerState::HalfOpen, BreakerState::Open)]
    );
}

#[test]
fn half_open_reopens_after_the_max_wait() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    let _stuck = b.try_acquire().unwrap();
    b.handle_timeout(at + MAX_WAIT - ms(1));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    b.handle_timeout(at + MAX_WAIT);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.poll_timeout(), Some(at + MAX_WAIT + RECOVERY));
    assert_eq!(
        drain(&mut b),
        vec![(BreakerState::HalfOpen, BreakerState::Open)]
    );
    // The stuck probe's late answer changes nothing.
    b.on_success(at + MAX_WAIT + ms(1), Permit::Probe);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.poll_transition(), None);
}

#[test]
fn probes_of_an_earlier_half_open_phase_keep_their_slots() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    let probes: Vec<Permit> = std::iter::from_fn(|| b.try_acquire()).collect();
    assert!(!probes.is_empty());
    b.handle_timeout(at + MAX_WAIT);
    b.handle_timeout(at + MAX_WAIT + RECOVERY);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(
        b.try_acquire(),
        None,
        "the earlier probes are still in flight"
    );
    b.on_success(at + MAX_WAIT + RECOVERY, probes[0]);
    assert_eq!(
        b.try_acquire(),
        Some(Permit::Probe),
        "an answer frees its slot"
    );
}

#[test]
fn stale_normal_outcomes_are_ignored_when_open_or_half_open() {
    let t0 = Instant::now();
    let mut b = breaker();
    // Three requests sent while closed, all answered after the circuit opened.
    let early: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    fail(&mut b, t0, 3);
    let deadline = b.poll_timeout();
    b.on_success(t0 + ms(1), early[0]);
    b.on_failure(t0 + ms(2), early[1]);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        b.poll_timeout(),
        deadline,
        "a stale failure does not re-arm"
    );
    let at = deadline.unwrap();
    b.handle_timeout(at);
    drain(&mut b);
    let probe = b.try_acquire().unwrap();
    b.on_failure(at, early[2]);
    b.on_success(at, Permit::Normal);
    b.on_success(at, Permit::Normal);
    assert_eq!(
        b.state(),
        BreakerState::HalfOpen,
        "normal outcomes decide nothing"
    );
    assert_eq!(b.try_acquire(), Some(Permit::Probe), "one probe slot left");
    assert_eq!(b.try_acquire(), None);
    b.release(Permit::Normal);
    assert_eq!(
        b.try_acquire(),
        None,
        "releasing a normal permit frees no probe"
    );
    b.on_failure(at, probe);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn stale_probe_outcomes_are_ignored_when_closed_or_open() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    let probes: Vec<Permit> = (0..2).map(|_| b.try_acquire().unwrap()).collect();
    b.on_failure(at, probes[0]);
    assert_eq!(b.state(), BreakerState::Open);
    b.on_success(at, probes[1]);
    b.on_failure(at, probes[1]);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.poll_timeout(), Some(at + RECOVERY));

    // Half-open again, then closed; a probe answered in Closed counts for nothing.
    let at = b.poll_timeout().unwrap();
    b.handle_timeout(at);
    let p1 = b.try_acquire().unwrap();
    let p2 = b.try_acquire().unwrap();
    let p3 = {
        b.on_success(at, p1);
        b.try_acquire().unwrap()
    };
    b.on_success(at, p2);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&mut b, at, 2);
    b.on_failure(at, p3);
    b.on_failure(at, Permit::Probe);
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "probe failures do not count"
    );
}

#[test]
fn probe_outcome_with_no_probe_in_flight_is_ignored() {
    let t0 = Instant::now();
    let mut b = breaker();
    let at = half_open(&mut b, t0);
    b.on_success(at, Permit::Probe);
    b.on_success(at, Permit::Probe);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    b.on_failure(at, Permit::Probe);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    b.release(Permit::Probe);
    assert_eq!(b.try_acquire(), Some(Permit::Probe));
    assert_eq!(b.try_acquire(), Some(Permit::Probe));
    assert_eq!(b.try_acquire(), None, "release never goes below zero");
}

#[test]
fn spurious_timeouts_are_no_ops() {
    let t0 = Instant::now();
    let mut b = breaker();
    b.handle_timeout(t0);
    b.handle_timeout(t0 + RECOVERY * 10);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.transitions(), 0);

    fail(&mut b, t0, 3);
    b.handle_timeout(t0);
    b.handle_timeout(t0 + ms(1));
    assert_eq!(b.state(), BreakerState::Open);

    b.handle_timeout(t0 + RECOVERY);
    let probe = b.try_acquire().unwrap();
    b.handle_timeout(t0 + RECOVERY);
    b.handle_timeout(t0 + RECOVERY + ms(1));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.try_acquire(), Some(Permit::Probe), "slots untouched");
    b.release(probe);
    assert_eq!(b.transitions(), 2);
}

#[test]
fn huge_durations_do_not_overflow() {
    let t0 = Instant::now();
    let mut b = Breaker::new(1, Duration::MAX, 1, Duration::MAX);
    fail(&mut b, t0, 1);
    assert_eq!(b.poll_timeout(), Some(t0 + FIRST_OPEN_WAIT));
    b.handle_timeout(t0 + FIRST_OPEN_WAIT);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(
        b.poll_timeout(),
        None,
        "the half-open wait is beyond any instant"
    );
    b.handle_timeout(t0 + Duration::from_secs(1_000_000));
    assert_eq!(b.state(), BreakerState::HalfOpen);
}

/// Opens a default-like breaker (threshold 1, one probe, 60 s recovery) at `t0`, then fails
/// every probe as soon as it is allowed until `until`; returns the open intervals in order.
fn failed_probe_waits(b: &mut Breaker, t0: Instant, until: Instant) -> Vec<Duration> {
    fail(b, t0, 1);
    let mut waits = Vec::new();
    let mut opened = t0;
    for _ in 0..10_000 {
        let at = b.poll_timeout().unwrap();
        if at > until {
            return waits;
        }
        waits.push(at - opened);
        b.handle_timeout(at);
        let probe = b.try_acquire().unwrap();
        b.on_failure(at, probe);
        assert_eq!(b.state(), BreakerState::Open);
        opened = at;
    }
    panic!("more than 10,000 probes before {until:?}");
}

#[test]
fn open_interval_grows_from_a_second_to_the_recovery_timeout() {
    let t0 = Instant::now();
    let recovery = Duration::from_secs(60);
    let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
    let waits = failed_probe_waits(&mut b, t0, t0 + Duration::from_secs(3600));
    assert_eq!(waits[0], FIRST_OPEN_WAIT, "a short first wait");
    assert!(
        waits.windows(2).all(|w| w[0] <= w[1]),
        "never shrinks: {waits:?}"
    );
    assert_eq!(*waits.last().unwrap(), recovery, "capped: {waits:?}");
    // A long outage is probed at most once per recovery timeout once the interval is
    // capped: from the first probe failing four recovery timeouts into the outage.
    let capped_at = waits.iter().position(|w| *w == recovery).unwrap();
    let before_cap: Duration = waits[..capped_at].iter().sum();
    assert!(before_cap < recovery * 5, "{before_cap:?}");
    assert!(waits[capped_at..].iter().all(|w| *w == recovery));
    assert!(waits.len() < 100, "{} probes in an hour", waits.len());
}

#[test]
fn a_short_outage_is_probed_again_within_a_quarter_of_its_length() {
    let t0 = Instant::now();
    let recovery = Duration::from_secs(60);
    for outage_secs in [1, 3, 5, 8, 20, 100] {
        let back = t0 + Duration::from_secs(outage_secs);
        let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
        failed_probe_waits(&mut b, t0, back);
        // The broker is back: the next probe, due at the pending deadline, succeeds.
        let next = b.poll_timeout().unwrap();
        let bound = FIRST_OPEN_WAIT.max(Duration::from_secs(outage_secs) / 4);
        assert!(
            next - back <= bound,
            "outage of {outage_secs} s: probed {:?} after the return",
            next - back
        );
        b.handle_timeout(next);
        let probe = b.try_acquire().unwrap();
        b.on_success(next, probe);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}

#[test]
fn closing_ends_the_outage_and_the_next_one_starts_short() {
    let t0 = Instant::now();
    let recovery = Duration::from_secs(60);
    let mut b = Breaker::new(1, recovery, 1, MAX_WAIT);
    failed_probe_waits(&mut b, t0, t0 + Duration::from_secs(600));
    let at = b.poll_timeout().unwrap();
    b.handle_timeout(at);
    let probe = b.try_acquire().unwrap();
    b.on_success(at, probe);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&mut b, at + ms(1), 1);
    assert_eq!(b.poll_timeout(), Some(at + ms(1) + FIRST_OPEN_WAIT));
}

#[test]
fn an_undecided_half_open_phase_counts_as_a_failed_probe() {
    let t0 = Instant::now();
    let recovery = Duration::from_secs(60);
    let mut b = Breaker::new(1, recovery, 1, Duration::from_secs(8));
    fail(&mut b, t0, 1);
    let at = b.poll_timeout().unwrap();
    b.handle_timeout(at);
    let _stuck = b.try_acquire().unwrap();
    let expiry = b.poll_timeout().unwrap();
    b.handle_timeout(expiry);
    assert_eq!(b.state(), BreakerState::Open);
    // Opened 9 s into the outage: a quarter of that.
    assert_eq!(b.poll_timeout(), Some(expiry + (expiry - t0) / 4));
}

#[test]
fn transitions_queue_in_order_and_count() {
    let t0 = Instant::now();
    let mut b = breaker();
    fail(&mut b, t0, 3);
    b.handle_timeout(t0 + RECOVERY);
    b.handle_timeout(t0 + RECOVERY + MAX_WAIT);
    let at = t0 + RECOVERY + MAX_WAIT + RECOVERY;
    b.handle_timeout(at);
    let p = b.try_acquire().unwrap();
    b.on_failure(at, p);
    b.handle_timeout(at + RECOVERY);
    for _ in 0..2 {
        let p = b.try_acquire().unwrap();
        b.on_success(at + RECOVERY, p);
    }
    use BreakerState::{Closed, HalfOpen, Open};
    assert_eq!(
        drain(&mut b),
        vec![
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed),
        ]
    );
    assert_eq!(b.transitions(), 7);
    assert_eq!(b.poll_transition(), None, "drained");
    fail(&mut b, at + RECOVERY, 3);
    assert_eq!(b.poll_transition(), Some((Closed, Open)));
    assert_eq!(b.transitions(), 8, "the total survives draining");
}
