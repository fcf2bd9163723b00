//! Concurrent processing with per-key order: the sans-IO scheduler deciding which deliveries
//! may run now. `Consumer::process` (in the driver) runs handlers under it.

mod scheduler;

pub use scheduler::{Finish, Limits, OrderBy, Scheduler, Ticket};
