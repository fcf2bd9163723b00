//! End-of-run checks: what must hold once the machine reported `Closed`: the close's phases in
//! order and silence after it (`close`), the dead letters' content (`dead-letter-content`), and
//! for a group session the final commit on the broker (`liveness`) and the leave (`close`).

use std::collections::BTreeSet;

use rustmq_consumer_core::protocol::{Record, TopicPartition};
use rustmq_consumer_core::{BreakerState, ClosePhase, ConsumerConfig, Transmit};

use super::names::*;
use super::{Checker, Violation};
use crate::broker::SimBroker;

impl Checker {
    /// End of run: the close went through every phase in order (`LeavingGroup` only in a
    /// group session).
    pub fn check_close_phases(&self, phases: &[ClosePhase]) -> Result<(), Violation> {
        let mut expected = vec![
            ClosePhase::Draining,
            ClosePhase::FlushingDeadLetters,
            ClosePhase::FinalCommit,
            ClosePhase::Closed,
        ];
        if self.group {
            expected.insert(3, ClosePhase::LeavingGroup);
        }
        if phases != expected {
            return Err(self.broken(CLOSE, format!("close phases {phases:?}")));
        }
        Ok(())
    }

    /// End of run: `late`, the machine's first transmit after a timeout long after `Closed`,
    /// is none (nothing more is sent after Closed, whatever time passes).
    pub fn check_silent_after_close(&self, late: Option<&Transmit>) -> Result<(), Violation> {
        match late {
            Some(t) => Err(self.broken(CLOSE, format!("{:?} sent after Closed", t.request.kind()))),
            None => Ok(()),
        }
    }

    /// End of run: every dead-lettered offset is in `config`'s dead-letter topic on `broker`,
    /// with the original value and the documented headers.
    pub fn check_dead_letters(
        &self,
        broker: &SimBroker,
        config: &ConsumerConfig,
    ) -> Result<(), Violation> {
        let Some(dlq) = &config.dead_letter_queue else {
            return Ok(());
        };
        use rustmq_consumer_core::dead_letter_headers::*;
        let (topic, group) = (config.topic.as_str(), config.consumer_group.as_str());
        let text = |r: &Record, k: &str| {
            r.header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let mut found = BTreeSet::new();
        for r in broker.records(dlq, 0) {
            let bad = |what: String| Err(self.broken(DEAD_LETTER_CONTENT, what));
            let (Ok(p), Ok(o)) = (
                text(r, ORIGINAL_PARTITION).parse::<u32>(),
                text(r, ORIGINAL_OFFSET).parse::<u64>(),
            ) else {
                return bad(format!(
                    "dead letter without partition/offset headers: {r:?}"
                ));
            };
            let attempts = text(r, ATTEMPTS).parse::<u32>().unwrap_or(0);
            let original = broker.records(topic, p).get(o as usize);
            if text(r, ORIGINAL_TOPIC) != topic
                || text(r, CONSUMER_GROUP) != group
                || r.header(LAST_REASON).is_none()
                || attempts == 0
                || attempts > self.max_attempts_ever
                || original.map(|x| &x.value) != Some(&r.value)
            {
                return bad(format!("dead letter of p{p}@{o} is wrong: {r:?}"));
            }
            found.insert((p, o));
        }
        for key in self.dead_lettered() {
            if !found.contains(key) {
                return Err(self.broken(
                    DEAD_LETTER_CONTENT,
                    format!("confirmed dead letter {key:?} missing from the topic"),
                ));
            }
        }
        Ok(())
    }

    /// End of a group session: the final commit reached `broker` (each of `partitions` at its
    /// high watermark, unless a restart (`crashed`) lost commits the consumer had confirmed),
    /// and the consumer left the group, unless its circuit was open through the whole leave
    /// phase (nothing goes out while it is open: the group then rebalances after the session
    /// timeout).
    pub fn check_group_after_close(
        &self,
        broker: &SimBroker,
        config: &ConsumerConfig,
        partitions: u32,
        crashed: bool,
    ) -> Result<(), Violation> {
        let (topic, group) = (config.topic.as_str(), config.consumer_group.as_str());
        for p in 0..partitions {
            let hw = broker.high_watermark(topic, p).unwrap_or(0);
            let committed = broker.committed(group, &TopicPartition::new(topic, p));
            if !(committed == Some(hw) || (committed.is_none() && (hw == 0 || crashed))) {
                return Err(self.broken(
                    LIVENESS,
                    format!("closed with partition {p} committed at {committed:?} on the broker, high watermark {hw}"),
                ));
            }
        }
        let members = broker.members(group);
        let barred = !self.leave_sent && self.breaker == BreakerState::Open;
        if !members.is_empty() && !barred {
            return Err(self.broken(
                CLOSE,
                format!("closed, yet the group still has members {members:?}"),
            ));
        }
        Ok(())
    }
}
