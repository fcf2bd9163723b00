//! The consumer state machine: `ConsumerMachine`.

use std::time::{Duration, Instant};

use crate::config::{ConfigError, ConsumerConfig};
use crate::error::{TransportError, UsageError};
use crate::event::*;
use crate::protocol::{Record, Response};

/// The sans-IO consumer (skeleton: the API the driver programs against).
#[derive(Debug)]
pub struct ConsumerMachine {
    _config: ConsumerConfig,
}

#[allow(missing_docs, unused_variables, clippy::todo)]
impl ConsumerMachine {
    pub fn new(config: ConsumerConfig, now: Instant) -> Result<Self, ConfigError> {
        todo!()
    }
    pub fn config(&self) -> &ConsumerConfig {
        &self._config
    }
    pub fn handle_response(
        &mut self,
        now: Instant,
        id: RequestId,
        result: Result<Response, TransportError>,
    ) {
        todo!()
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        todo!()
    }
    pub fn ack(&mut self, now: Instant, tag: DeliveryTag) -> Result<(), UsageError> {
        todo!()
    }
    pub fn nack(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        delay: Option<Duration>,
    ) -> Result<(), UsageError> {
        todo!()
    }
    pub fn reject(
        &mut self,
        now: Instant,
        tag: DeliveryTag,
        reason: &str,
    ) -> Result<(), UsageError> {
        todo!()
    }
    pub fn pause(&mut self, now: Instant, partitions: &[u32]) -> Result<(), UsageError> {
        todo!()
    }
    pub fn resume(&mut self, now: Instant, partitions: &[u32]) -> Result<(), UsageError> {
        todo!()
    }
    pub fn seek(&mut self, now: Instant, partition: u32, offset: u64) -> Result<(), UsageError> {
        todo!()
    }
    pub fn commit(&mut self, now: Instant) -> Result<u64, UsageError> {
        todo!()
    }
    pub fn close(&mut self, now: Instant) {
        todo!()
    }
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        todo!()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        todo!()
    }
    pub fn poll_timeout(&self) -> Option<(Instant, Reason)> {
        todo!()
    }
    pub fn assigned_partitions(&self) -> Vec<u32> {
        todo!()
    }
    pub fn lag(&self, now: Instant) -> Vec<PartitionLag> {
        todo!()
    }
    pub fn metrics(&self) -> Metrics {
        todo!()
    }
    pub fn health(&self) -> Health {
        todo!()
    }
    pub fn breaker_state(&self) -> BreakerState {
        todo!()
    }
    pub fn close_phase(&self) -> Option<ClosePhase> {
        todo!()
    }
    pub fn is_closed(&self) -> bool {
        todo!()
    }
    pub fn find_message_by_offset(&self, partition: u32, offset: u64) -> Option<&Record> {
        todo!()
    }
}
