//! The RustMQ consumer's core: a sans-IO state machine, the wire codec and the driver.
#![forbid(unsafe_code)]

mod backoff;
mod breaker;
mod cache;
pub mod codec;
mod config;
pub mod driver;
mod error;
mod event;
mod frame;
mod machine;
pub mod protocol;
mod window;

pub use config::{ConfigError, ConsumerConfig, StartPosition};
pub use driver::{
    sleep, sleep_until, timeout, AsyncTimer, Consumer, ConsumerBuilder, ConsumerError,
    DeliveryStream, Runtime, Sleep, Transport,
};
pub use error::{TransportError, UsageError};
pub use event::{
    BreakerState, ClosePhase, Delivery, DeliveryTag, Event, Health, Metrics, PartitionLag, Reason,
    RequestId, StallReason, Transmit,
};
pub use machine::{dead_letter_headers, ConsumerMachine};
