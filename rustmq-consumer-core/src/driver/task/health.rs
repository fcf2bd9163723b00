//! Why the consumer is (not) well: when each outage, breaker state and stall began, and which
//! partitions make no progress; the periodic look at the machine's lag it needs (shared with
//! the metrics export).

use super::*;
use crate::driver::health::{HealthIssue, HealthReport};
use crate::event::{BreakerState, PartitionLag};

/// Shortest time between two looks at every partition's lag while the driver works.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

/// The default of `ConsumerBuilder::progress_timeout`.
pub(crate) const DEFAULT_PROGRESS_TIMEOUT: Duration = Duration::from_secs(300);

/// When each reason for ill health began.
#[derive(Debug)]
pub(crate) struct Watch {
    started: Instant,
    pub(super) progress_timeout: Duration,
    breaker_since: Instant,
    outage_since: Option<Instant>,
    stalled_since: BTreeMap<u32, Instant>,
    progress: BTreeMap<u32, Progress>,
    /// The last look at the partitions' lag.
    observed: Option<Instant>,
}

/// One partition's settle watermark and since when it has not moved with messages past it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    watermark: u64,
    since: Instant,
    lag_then: u64,
    lag: u64,
}

impl Watch {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            started: now,
            progress_timeout: DEFAULT_PROGRESS_TIMEOUT,
            breaker_since: now,
            outage_since: None,
            stalled_since: BTreeMap::new(),
            progress: BTreeMap::new(),
            observed: None,
        }
    }

    /// Notes when the events that start or end an issue happened.
    fn event(&mut self, now: Instant, event: &Event) {
        match event {
            Event::BreakerChanged { .. } => self.breaker_since = now,
            Event::Stalled { partition, .. } => {
                self.stalled_since.entry(*partition).or_insert(now);
            }
            Event::Recovered { partition } => {
                self.stalled_since.remove(partition);
            }
            _ => {}
        }
    }

    /// Takes a fresh look at every partition: a watermark that moved, or one that cannot be
    /// blamed on the application (the broker away, the partition paused or stalled, nothing
    /// past it), starts its clock again.
    fn look(
        &mut self,
        now: Instant,
        lags: &[PartitionLag],
        machine: &ConsumerMachine,
        excused: bool,
    ) {
        self.progress
            .retain(|p, _| lags.iter().any(|l| l.partition == *p));
        self.stalled_since
            .retain(|p, _| lags.iter().any(|l| l.partition == *p));
        for l in lags {
            let watermark = machine.settle_watermark(l.partition).unwrap_or(l.position);
            let lag = l
                .high_watermark
                .map_or(0, |hw| hw.saturating_sub(watermark));
            let fresh = Progress {
                watermark,
                since: now,
                lag_then: lag,
                lag,
            };
            let entry = self.progress.entry(l.partition).or_insert(fresh);
            let reset = excused
                || lag == 0
                || entry.watermark != watermark
                || machine.is_paused(l.partition) == Some(true)
                || self.stalled_since.contains_key(&l.partition);
            if reset {
                *entry = fresh;
            } else {
                entry.lag = lag;
            }
        }
    }
}

impl Driver {
    /// Sets `ConsumerBuilder::progress_timeout`.
    pub(crate) fn progress_timeout(mut self, timeout: Duration) -> Self {
        self.watch.progress_timeout = timeout;
        self
    }

    /// After each batch of inputs: exports the metrics, and looks at the partitions' lag at
    /// most once per `OBSERVE_EVERY` (always when `force`).
    pub(super) fn observe(&mut self, now: Instant, force: bool) {
        self.telemetry.sync(&self.machine);
        let recent = self
            .watch
            .observed
            .is_some_and(|at| now.saturating_duration_since(at) < OBSERVE_EVERY);
        if recent && !force {
            return;
        }
        self.watch.observed = Some(now);
        let lags = self.machine.lag(now);
        self.telemetry.lag(&lags);
        let excused = self.outage.is_some()
            || !self.ever_connected
            || self.machine.breaker_state() != BreakerState::Closed;
        self.watch.look(now, &lags, &self.machine, excused);
    }

    /// What an event means for health and metrics, beside its routing.
    pub(super) fn watch_event(&mut self, event: &Event) {
        self.telemetry.event(event, &self.machine);
        if matches!(event, Event::Assigned(_) | Event::Revoked(_)) {
            // The partitions changed: the next look is not put off.
            self.watch.observed = None;
        }
        if matches!(
            event,
            Event::BreakerChanged { .. } | Event::Stalled { .. } | Event::Recovered { .. }
        ) {
            let now = self.runtime.now();
            self.watch.event(now, event);
        }
    }

    /// An outage began (`unreachable`) or ended (`None`).
    pub(super) fn watch_outage(&mut self, began: bool) {
        self.watch.outage_since = began.then(|| self.runtime.now());
    }

    /// The health the application sees: the machine's, and `Unhealthy` during an outage; with
    /// every issue and since when.
    pub(super) fn health_report(&mut self) -> HealthReport {
        let now = self.runtime.now();
        self.observe(now, true);
        let health = match self.machine.health() {
            Health::Healthy if self.outage.is_some() => Health::Unhealthy,
            health => health,
        };
        let watch = &self.watch;
        let aged = |at: Instant| (at, now.saturating_duration_since(at));
        let mut issues = Vec::new();
        if self.machine.health() == Health::Closed {
            issues.push(HealthIssue::Closed { stopped: false });
        }
        match &self.outage {
            Some(ConsumerError::Unreachable { cause, .. }) => {
                let (since, elapsed) = aged(watch.outage_since.unwrap_or(now));
                issues.push(HealthIssue::Unreachable {
                    cause: cause.clone(),
                    since,
                    elapsed,
                });
            }
            _ if !self.ever_connected => {
                let (since, elapsed) = aged(watch.started);
                issues.push(HealthIssue::Connecting { since, elapsed });
            }
            _ => {}
        }
        let state = self.machine.breaker_state();
        if state != BreakerState::Closed {
            let (since, elapsed) = aged(watch.breaker_since);
            issues.push(HealthIssue::Breaker {
                state,
                since,
                elapsed,
            });
        }
        for stall in self.stalls.values() {
            if let ConsumerError::Stalled {
                partition,
                offset,
                reason,
            } = stall
            {
                let at = watch.stalled_since.get(partition).copied().unwrap_or(now);
                let (since, elapsed) = aged(at);
                issues.push(HealthIssue::Stalled {
                    partition: *partition,
                    offset: *offset,
                    reason: reason.clone(),
                    since,
                    elapsed,
                });
            }
        }
        for (partition, p) in &watch.progress {
            let (since, elapsed) = aged(p.since);
            if p.lag > 0 && elapsed >= watch.progress_timeout {
                issues.push(HealthIssue::NoProgress {
                    partition: *partition,
                    offset: p.watermark,
                    lag_then: p.lag_then,
                    lag: p.lag,
                    since,
                    elapsed,
                });
            }
        }
        HealthReport {
            health,
            cause: self
                .outage
                .clone()
                .or_else(|| self.stalls.values().next().cloned()),
            issues,
        }
    }
}
