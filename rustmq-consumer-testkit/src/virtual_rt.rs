//! [`VirtualRuntime`]: a deterministic single-threaded executor on a virtual clock.
//!
//! Tasks run in FIFO wake order on the thread calling [`VirtualRuntime::block_on`]. When every
//! task is idle, the clock jumps straight to the earliest timer, so a consumer that would
//! spend minutes in backoffs and batching timeouts runs in microseconds of real time, and the
//! same program always sees the same sequence of instants.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rustmq_consumer_core::{AsyncTimer, Runtime};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The id of the future passed to `block_on`.
const MAIN: u64 = 0;

/// `block_on` found every task idle and no timer pending: nothing can ever happen again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("virtual runtime stalled: every task is idle and no timer is pending")]
pub struct Stalled;

struct State {
    now: Instant,
    /// Registered timers: (deadline, timer id) -> the waker of the task waiting on it.
    timers: BTreeMap<(Instant, u64), Waker>,
    next_timer: u64,
    /// Tasks to poll, in wake order, each at most once.
    ready: VecDeque<u64>,
    queued: BTreeSet<u64>,
    next_task: u64,
    spawned: u64,
}

struct Inner {
    state: Mutex<State>,
    /// Spawned tasks not currently being polled.
    tasks: Mutex<BTreeMap<u64, Task>>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tasks(&self) -> MutexGuard<'_, BTreeMap<u64, Task>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn schedule(&self, id: u64) {
        let mut state = self.state();
        if state.queued.insert(id) {
            state.ready.push_back(id);
        }
    }
}

struct TaskWaker {
    id: u64,
    inner: Arc<Inner>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.inner.schedule(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.schedule(self.id);
    }
}

/// A deterministic runtime with a virtual clock. Cheap to clone; clones share one executor.
#[derive(Clone)]
pub struct VirtualRuntime {
    inner: Arc<Inner>,
}

impl fmt::Debug for VirtualRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state();
        f.debug_struct("VirtualRuntime")
            .field("now", &state.now)
            .field("timers", &state.timers.len())
            .field("spawned", &state.spawned)
            .finish()
    }
}

impl Default for VirtualRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualRuntime {
    /// A runtime whose clock starts at an arbitrary fixed instant (only differences matter).
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A runtime whose clock starts at `start`.
    pub fn starting_at(start: Instant) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    now: start,
                    timers: BTreeMap::new(),
                    next_timer: 0,
                    ready: VecDeque::new(),
                    queued: BTreeSet::new(),
                    next_task: MAIN + 1,
                    spawned: 0,
                }),
                tasks: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// How many tasks were spawned on this runtime so far.
    pub fn spawned_tasks(&self) -> u64 {
        self.inner.state().spawned
    }

    /// Spawned tasks that have not finished yet.
    pub fn live_tasks(&self) -> usize {
        self.inner.tasks().len()
    }

    /// Completes after `duration` of virtual time.
    pub fn sleep(&self, duration: Duration) -> rustmq_consumer_core::Sleep {
        rustmq_consumer_core::sleep(self, duration)
    }

    /// Runs `future` (and every spawned task) until `future` completes.
    ///
    /// # Panics
    ///
    /// If the program deadlocks (see [`VirtualRuntime::try_block_on`]).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match self.try_block_on(future) {
            Ok(output) => output,
            Err(stalled) => panic!("{stalled}"),
        }
    }

    /// Runs `future` (and every spawned task) until `future` completes, or until every task is
    /// idle with no timer pending ([`Stalled`]). Tasks still pending when `future` completes
    /// stay in the runtime and run again on the next `block_on`.
    pub fn try_block_on<F: Future>(&self, future: F) -> Result<F::Output, Stalled> {
        let mut main = pin!(future);
        let main_waker = Waker::from(Arc::new(TaskWaker {
            id: MAIN,
            inner: Arc::clone(&self.inner),
        }));
        self.inner.schedule(MAIN);
        loop {
            let next = {
                let mut state = self.inner.state();
                let next = state.ready.pop_front();
                if let Some(id) = next {
                    state.queued.remove(&id);
                }
                next
            };
            match next {
                Some(MAIN) => {
                    if let Poll::Ready(output) =
                        main.as_mut().poll(&mut Context::from_waker(&main_waker))
                    {
                        return Ok(output);
                    }
                }
                Some(id) => self.poll_task(id),
                None => self.advance()?,
            }
        }
    }

    fn poll_task(&self, id: u64) {
        let Some(mut task) = self.inner.tasks().remove(&id) else {
            return;
        };
        let waker = Waker::from(Arc::new(TaskWaker {
            id,
            inner: Arc::clone(&self.inner),
        }));
        if task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
        {
            self.inner.tasks().insert(id, task);
        }
    }

    /// Every task is idle: jump the clock to the earliest timer and wake what is due.
    fn advance(&self) -> Result<(), Stalled> {
        let due: Vec<Waker> = {
            let mut state = self.inner.state();
            let Some((&(deadline, _), _)) = state.timers.first_key_value() else {
                return Err(Stalled);
            };
            if deadline > state.now {
                state.now = deadline;
            }
            let now = state.now;
            let mut due = Vec::new();
            while let Some(entry) = state.timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            due
        };
        due.into_iter().for_each(Waker::wake);
        Ok(())
    }
}

impl Runtime for VirtualRuntime {
    fn now(&self) -> Instant {
        self.inner.state().now
    }

    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let id = {
            let mut state = self.inner.state();
            state.next_timer += 1;
            state.next_timer
        };
        Box::pin(VirtualTimer {
            inner: Arc::clone(&self.inner),
            id,
            deadline,
            registered: None,
        })
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let id = {
            let mut state = self.inner.state();
            state.spawned += 1;
            state.next_task += 1;
            state.next_task
        };
        self.inner.tasks().insert(id, future);
        self.inner.schedule(id);
    }
}

/// A timer on the virtual clock.
struct VirtualTimer {
    inner: Arc<Inner>,
    id: u64,
    deadline: Instant,
    /// The deadline under which a waker is registered, if any.
    registered: Option<Instant>,
}

impl fmt::Debug for VirtualTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualTimer")
            .field("id", &self.id)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl VirtualTimer {
    fn unregister(&mut self, state: &mut State) {
        if let Some(at) = self.registered.take() {
            state.timers.remove(&(at, self.id));
        }
    }
}

impl AsyncTimer for VirtualTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        let inner = Arc::clone(&self.inner);
        let mut state = inner.state();
        self.unregister(&mut state);
        self.deadline = deadline;
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = Arc::clone(&self.inner);
        let mut state = inner.state();
        self.unregister(&mut state);
        if state.now >= self.deadline {
            return Poll::Ready(());
        }
        state
            .timers
            .insert((self.deadline, self.id), cx.waker().clone());
        self.registered = Some(self.deadline);
        Poll::Pending
    }
}

impl Drop for VirtualTimer {
    fn drop(&mut self) {
        let inner = Arc::clone(&self.inner);
        let mut state = inner.state();
        self.unregister(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_jumps_to_the_next_timer() {
        let rt = VirtualRuntime::new();
        let start = rt.now();
        rt.block_on(rt.sleep(Duration::from_secs(3600)));
        assert_eq!(rt.now() - start, Duration::from_secs(3600));
    }

    #[test]
    fn spawned_tasks_run_in_timer_order() {
        let rt = VirtualRuntime::new();
        let (tx, rx) = async_channel::unbounded();
        for (name, secs) in [("late", 5), ("early", 1), ("middle", 3)] {
            let (tx, timer_rt) = (tx.clone(), rt.clone());
            rt.spawn(Box::pin(async move {
                timer_rt.sleep(Duration::from_secs(secs)).await;
                let _ = tx.send((name, timer_rt.now())).await;
            }));
        }
        drop(tx);
        let start = rt.now();
        let order = rt.block_on(async {
            let mut order = Vec::new();
            while let Ok((name, at)) = rx.recv().await {
                order.push((name, (at - start).as_secs()));
            }
            order
        });
        assert_eq!(order, vec![("early", 1), ("middle", 3), ("late", 5)]);
        assert_eq!(rt.spawned_tasks(), 3);
        assert_eq!(rt.live_tasks(), 0);
    }

    #[test]
    fn reset_moves_the_deadline() {
        let rt = VirtualRuntime::new();
        let start = rt.now();
        let mut timer = rt.new_timer(start + Duration::from_secs(10));
        rt.block_on(async {
            let mut polled = false;
            std::future::poll_fn(|cx| {
                if !polled {
                    polled = true;
                    // Registered at 10 s, then moved to 2 s: the old registration must go.
                    assert!(timer.as_mut().poll(cx).is_pending());
                    timer.as_mut().reset(start + Duration::from_secs(2));
                }
                timer.as_mut().poll(cx)
            })
            .await;
        });
        assert_eq!(rt.now() - start, Duration::from_secs(2));
    }

    #[test]
    fn a_deadlock_is_reported() {
        let rt = VirtualRuntime::new();
        let (_tx, rx) = async_channel::bounded::<()>(1);
        assert_eq!(rt.try_block_on(rx.recv()).err(), Some(Stalled));
    }
}
