//! [`Consumer::events`](super::Consumer::events): what the consumer decided, as a bounded
//! stream for the application.
//!
//! The driver broadcasts every event of the machine except deliveries (those come out of
//! `receive()`) on one bounded `async-broadcast` channel in overflow mode: a reader that falls
//! behind loses the oldest events, never slows the consumer, and learns how many it lost from
//! the next notice's `missed`. Nothing is cloned or queued while no stream is open.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_broadcast::{InactiveReceiver, Receiver, RecvError, Sender};
use futures_lite::{ready, Stream};

use crate::event::Event;

/// Events queued for the slowest open stream before the oldest are dropped.
pub const EVENTS_CAPACITY: usize = 1024;

/// One event from [`Consumer::events`](super::Consumer::events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventNotice {
    /// What happened.
    pub event: Event,
    /// Events this stream lost just before this one because its reader fell more than
    /// [`EVENTS_CAPACITY`] behind.
    pub missed: u64,
}

/// The stream returned by [`Consumer::events`](super::Consumer::events); ends after
/// [`Event::Closed`].
#[derive(Debug)]
pub struct EventStream {
    receiver: Receiver<Event>,
    missed: u64,
}

impl Stream for EventStream {
    type Item = EventNotice;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventNotice>> {
        loop {
            match ready!(Pin::new(&mut self.receiver).poll_recv(cx)) {
                Some(Ok(event)) => {
                    let missed = std::mem::take(&mut self.missed);
                    return Poll::Ready(Some(EventNotice { event, missed }));
                }
                Some(Err(RecvError::Overflowed(lost))) => self.missed += lost,
                Some(Err(RecvError::Closed)) | None => return Poll::Ready(None),
            }
        }
    }
}

/// The driver's end: broadcasts events to every open stream.
#[derive(Debug)]
pub(crate) struct Notices {
    sender: Sender<Event>,
    /// Keeps the channel open while no stream is; new streams are activated from it.
    idle: InactiveReceiver<Event>,
}

impl Notices {
    pub(crate) fn new() -> Self {
        let (mut sender, receiver) = async_broadcast::broadcast(EVENTS_CAPACITY);
        sender.set_overflow(true);
        sender.set_await_active(false);
        Self {
            sender,
            idle: receiver.deactivate(),
        }
    }

    /// A handle the consumer keeps to open streams.
    pub(crate) fn subscriber(&self) -> InactiveReceiver<Event> {
        self.idle.clone()
    }

    /// Sends `event` to every open stream (nothing when none is open).
    pub(crate) fn publish(&self, event: &Event) {
        // Streams get no deliveries; counting receivers takes a lock.
        if !matches!(event, Event::Deliver(_)) && self.sender.receiver_count() > 0 {
            // Full: the oldest goes (overflow mode). Inactive or closed: nobody reads.
            let _ = self.sender.try_broadcast(event.clone());
        }
    }
}

/// Opens a stream of the events from now on.
pub(crate) fn subscribe(idle: &InactiveReceiver<Event>) -> EventStream {
    EventStream {
        receiver: idle.activate_cloned(),
        missed: 0,
    }
}
