//! The runtime-agnostic driver and the application API.
//!
//! One task per consumer owns the [`ConsumerMachine`](crate::ConsumerMachine) by value. Its
//! loop: start every transmit on the [`Transport`] without awaiting it (the request futures
//! live in one `FuturesUnordered` inside the task), push deliveries into the inbox (bounded by
//! `max_unacked`, held per partition while paused: see `inbox`), route the other events
//! (commit and close waiters, tracing), then wait for the first of a completed request, an
//! application command or the timer at the machine's `poll_timeout`. It exits once the machine reports itself closed. Time comes only
//! from the [`Runtime`], so paused and virtual clocks drive the consumer too.

mod builder;
mod consumer;
mod deliveries;
mod error;
mod gate;
mod health;
mod inbox;
mod notices;
mod process;
mod rebalance;
mod runtime;
mod task;
mod trace;
mod transport;

pub use builder::ConsumerBuilder;
pub use consumer::{Ack, Consumer, Delivery, DeliveryStream};
pub use error::ConsumerError;
pub use health::{HealthIssue, HealthReport, Probe};
pub use notices::{EventNotice, EventStream, EVENTS_CAPACITY};
pub use process::{Outcome, ProcessOptions, ProcessSummary};
pub use rebalance::{Hook, ListenerError, RebalanceListener};
pub use runtime::{sleep, sleep_until, timeout, AsyncTimer, Runtime, Sleep};
pub use trace::{TRACEPARENT, TRACESTATE};
pub use transport::Transport;
