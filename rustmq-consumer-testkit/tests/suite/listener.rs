//! The rebalance listener and the event stream: hooks run at the right moment of the group
//! protocol (revoke acks in the revoke commit, an assign hook's seek before the first
//! delivery), a failing hook is reported and the consumer goes on, and a reader that never
//! reads the event stream does not hold the consumer back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use rustmq_consumer_core::driver::Delivery;
use rustmq_consumer_core::protocol::{ConsumerHeartbeatResponse, Request, RequestKind, Response};
use rustmq_consumer_core::{
    sleep, Consumer, ConsumerBuilder, ConsumerConfig, ConsumerError, Event, Hook, ListenerError,
    RebalanceListener, Runtime, Transport, TransportError, EVENTS_CAPACITY,
};
use rustmq_consumer_testkit::{SharedBroker, SimTransport};

use super::{broker, committed, fast_config, maybe_next, next, within, GROUP, TOPIC};

/// What the application and its listener saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    RevokeCalled(Vec<u32>),
    RevokeReturned,
    AckedInHook(u64),
    Assigned(Vec<u32>),
    Delivered(u32, u64),
}

/// A listener that acks, in its revoke hook, the deliveries the application left with it,
/// and seeks in its assign hook when told to.
#[derive(Default, Clone)]
struct Recorder {
    log: Arc<Mutex<Vec<Seen>>>,
    unfinished: Arc<Mutex<Vec<Delivery>>>,
    seek_on_assign: Option<(u32, u64)>,
    fail_assign: bool,
    /// The revoke hook lingers this long on this clock after its acks (flushing state), and
    /// records when it returned.
    linger: Option<(Arc<dyn Runtime>, Duration)>,
    revoke_returned_at: Arc<Mutex<Option<Instant>>>,
}

impl Recorder {
    fn push(&self, seen: Seen) {
        self.log.lock().expect("log").push(seen);
    }

    fn log(&self) -> Vec<Seen> {
        self.log.lock().expect("log").clone()
    }
}

#[async_trait::async_trait]
impl RebalanceListener for Recorder {
    async fn on_partitions_revoked(
        &self,
        _consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        self.push(Seen::RevokeCalled(partitions.to_vec()));
        let unfinished = std::mem::take(&mut *self.unfinished.lock().expect("unfinished"));
        for delivery in unfinished {
            let offset = delivery.offset();
            delivery.ack().await?;
            self.push(Seen::AckedInHook(offset));
        }
        if let Some((rt, linger)) = &self.linger {
            sleep(&**rt, *linger).await;
            *self.revoke_returned_at.lock().expect("returned at") = Some(rt.now());
        }
        self.push(Seen::RevokeReturned);
        Ok(())
    }

    async fn on_partitions_assigned(
        &self,
        consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        self.push(Seen::Assigned(partitions.to_vec()));
        if self.fail_assign {
            return Err("no state for these partitions".into());
        }
        if let Some((partition, offset)) = self.seek_on_assign {
            consumer.seek(partition, offset).await?;
        }
        Ok(())
    }
}

async fn start_with<R: Runtime + Clone>(
    rt: &R,
    broker: &SharedBroker,
    config: ConsumerConfig,
    listener: Recorder,
) -> Consumer {
    ConsumerBuilder::with_runtime(rt.clone())
        .topic(TOPIC)
        .consumer_group(GROUP)
        .config(config)
        .client(SimTransport::new(broker.clone(), rt.clone()))
        .rebalance_listener(listener)
        .build()
        .await
        .expect("valid consumer")
}

/// A group config that rebalances quickly and commits only when asked or at a revoke.
fn group_config() -> ConsumerConfig {
    let mut config = fast_config();
    config.session_timeout = Duration::from_secs(3);
    config.heartbeat_interval = Some(Duration::from_millis(5));
    config.rebalance_drain_timeout = Duration::from_secs(5);
    config.ack_batch_size = 1_000;
    config.ack_batch_timeout = Duration::from_secs(60);
    config
}

/// A transport to the simulated broker that, on cue, answers the next heartbeat with 27
/// (rebalance in progress) without moving the group's generation: the coordinator asking a
/// member to give its partitions up, as Kafka's does. (RustMQ's own coordinator moves the
/// generation first, which fences the revoke commit; see ARCHITECTURE.md.)
#[derive(Clone)]
struct RebalanceOnCue {
    inner: SimTransport,
    cue: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Transport for RebalanceOnCue {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        if matches!(request, Request::ConsumerHeartbeat(_))
            && self.cue.swap(false, Ordering::SeqCst)
        {
            return Ok(Response::ConsumerHeartbeat(ConsumerHeartbeatResponse {
                error_code: 27,
            }));
        }
        self.inner.request(request).await
    }
}

/// The revoke hook runs after deliveries of the partition stopped; its acks are in the revoke
/// commit, made under the generation that owned the partition; the consumer lets the
/// partition go (and rejoins) only after the hook returned; and no delivery of the revoked
/// partition reaches the application after that, until the partition is assigned again.
pub async fn revoke_hook_acks_are_in_the_revoke_commit<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 40);
    let listener = Recorder {
        linger: Some((Arc::new(rt.clone()), Duration::from_millis(30))),
        ..Recorder::default()
    };
    let cue = Arc::new(AtomicBool::new(false));
    let transport = RebalanceOnCue {
        inner: SimTransport::new(broker.clone(), rt.clone()),
        cue: Arc::clone(&cue),
    };
    let first = ConsumerBuilder::with_runtime(rt.clone())
        .topic(TOPIC)
        .consumer_group(GROUP)
        .config(group_config())
        .client(transport)
        .rebalance_listener(listener.clone())
        .build()
        .await
        .expect("valid consumer");
    for expected in 0..5 {
        let d = next(&rt, &first).await;
        assert_eq!((d.partition(), d.offset()), (0, expected));
        listener.push(Seen::Delivered(0, expected));
        listener.unfinished.lock().expect("unfinished").push(d);
    }
    let generation = broker.lock().generation(GROUP);
    assert_eq!(
        committed(&broker, 0),
        None,
        "nothing committed before the rebalance"
    );
    cue.store(true, Ordering::SeqCst);
    // The application keeps receiving while the rebalance runs, leaving its work unfinished
    // for the hook.
    let mut rounds = 0;
    while !listener
        .log()
        .iter()
        .skip_while(|s| **s != Seen::RevokeReturned)
        .any(|s| matches!(s, Seen::Assigned(_)))
    {
        rounds += 1;
        assert!(rounds <= 2_000, "no rebalance: {:?}", listener.log());
        if let Some(d) = maybe_next(&rt, &first, Duration::from_millis(2)).await {
            listener.push(Seen::Delivered(d.partition(), d.offset()));
            listener.unfinished.lock().expect("unfinished").push(d);
        }
    }
    let log = listener.log();
    let acked_in_hook: Vec<u64> = log
        .iter()
        .filter_map(|s| match s {
            Seen::AckedInHook(offset) => Some(*offset),
            _ => None,
        })
        .collect();
    assert!(acked_in_hook.len() >= 5, "{log:?}");
    let hook_acks = acked_in_hook.len() as u64;
    assert_eq!(acked_in_hook, (0..hook_acks).collect::<Vec<_>>());
    let commits: Vec<(Option<u64>, u64)> = broker
        .lock()
        .commit_log()
        .iter()
        .map(|c| {
            (
                Some(c.generation),
                c.offsets.values().copied().max().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        commits.first(),
        Some(&(generation, hook_acks)),
        "the revoke commit carries the hook's acks under the owning generation"
    );
    let called = log.iter().position(|s| *s == Seen::RevokeCalled(vec![0]));
    let returned = log.iter().position(|s| *s == Seen::RevokeReturned);
    let reassigned = log.iter().rposition(|s| matches!(s, Seen::Assigned(_)));
    let (Some(called), Some(returned), Some(reassigned)) = (called, returned, reassigned) else {
        panic!("hooks not called in order: {log:?}");
    };
    assert!(called < returned && returned < reassigned, "{log:?}");
    let returned_at = listener
        .revoke_returned_at
        .lock()
        .expect("returned at")
        .expect("the hook lingered");
    let rejoined_at = broker
        .lock()
        .request_log()
        .iter()
        .filter(|r| r.kind == RequestKind::JoinGroup)
        .nth(1)
        .map(|r| r.at)
        .expect("a rejoin");
    assert!(
        rejoined_at >= returned_at,
        "rejoined {:?} before the revoke hook returned",
        returned_at - rejoined_at
    );
    let stale: Vec<&Seen> = log[returned..reassigned]
        .iter()
        .filter(|s| matches!(s, Seen::Delivered(0, _)))
        .collect();
    assert!(
        stale.is_empty(),
        "revoked partition delivered: {stale:?} in {log:?}"
    );
    within(&rt, first.close()).await.expect("close");
}

/// An assign hook's seek takes effect before the first delivery of the partition.
pub async fn assign_hook_seeks_before_the_first_delivery<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 40);
    let listener = Recorder {
        seek_on_assign: Some((0, 30)),
        ..Recorder::default()
    };
    let consumer = start_with(&rt, &broker, group_config(), listener.clone()).await;
    let first = next(&rt, &consumer).await;
    assert_eq!((first.partition(), first.offset()), (0, 30));
    assert_eq!(listener.log(), vec![Seen::Assigned(vec![0])]);
    first.ack().await.expect("ack");
    within(&rt, consumer.commit()).await.expect("commit");
    assert_eq!(committed(&broker, 0), Some(31));
    within(&rt, consumer.close()).await.expect("close");
}

/// A hook that fails is reported once through `receive()`; the partitions deliver anyway.
pub async fn failing_hook_is_reported_and_the_consumer_goes_on<R: Runtime + Clone>(rt: R) {
    let broker = broker(1, 10);
    let listener = Recorder {
        fail_assign: true,
        ..Recorder::default()
    };
    let consumer = start_with(&rt, &broker, group_config(), listener).await;
    let error = within(&rt, consumer.receive())
        .await
        .expect_err("the hook's failure");
    assert_eq!(
        error,
        ConsumerError::Listener {
            hook: Hook::Assign,
            partitions: vec![0],
            cause: "no state for these partitions".to_owned(),
        }
    );
    for expected in 0..10 {
        let d = next(&rt, &consumer).await;
        assert_eq!(d.offset(), expected);
        d.ack().await.expect("ack");
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(10));
}

/// `events()` says what the consumer decided; a stream nobody reads holds the newest
/// `EVENTS_CAPACITY` events, counts the rest as missed, and never slows consumption.
pub async fn event_stream_is_bounded_and_never_blocks<R: Runtime + Clone>(rt: R) {
    const MESSAGES: u64 = 1_500;
    let broker = broker(1, MESSAGES as usize);
    let consumer = super::start(&rt, &broker, fast_config()).await;
    let unread = consumer.events();
    let mut read = Some(consumer.events());
    // No dead-letter topic: each reject is one `Discarded` event.
    for expected in 0..MESSAGES {
        let d = next(&rt, &consumer).await;
        assert_eq!(d.offset(), expected);
        d.reject("unwanted").await.expect("reject");
        // Streams are independent: one read (then dropped) does not touch the other.
        if let Some(mut stream) = read.take() {
            let first = within(&rt, stream.next()).await.expect("an event");
            assert_eq!(first.missed, 0, "{first:?}");
        }
    }
    within(&rt, consumer.close()).await.expect("close");
    assert_eq!(committed(&broker, 0), Some(MESSAGES));
    let notices: Vec<_> = within(&rt, unread.collect::<Vec<_>>()).await;
    let missed: u64 = notices.iter().map(|n| n.missed).sum();
    assert_eq!(notices.len(), EVENTS_CAPACITY, "the newest events are kept");
    assert!(missed > 0 && notices[0].missed == missed, "missed {missed}");
    assert_eq!(notices.last().map(|n| &n.event), Some(&Event::Closed));
    let discarded = notices
        .iter()
        .filter(|n| matches!(n.event, Event::Discarded { .. }))
        .count() as u64;
    assert!(discarded > 0, "{notices:?}");
    let Some(Event::Committed { offsets, .. }) = notices
        .iter()
        .rev()
        .map(|n| &n.event)
        .find(|e| matches!(e, Event::Committed { .. }))
    else {
        panic!("no commit among the newest events");
    };
    assert_eq!(offsets, &vec![(0, MESSAGES)]);
}
