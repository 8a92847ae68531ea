//! The timer: one thread that fires events at their due time: deadlines of running
//! calls (the caller gets `timeout`), delayed requests coming due, and a delayed
//! shutdown (`halt`). The queue itself ([`TimerQueue`]) is pure and takes the time
//! as an argument, so it is tested without sleeping. Not for: running functions (the
//! workers do; due requests go to them on the due lane, `handoff.rs`).

use crate::handoff::DueLane;
use crate::job::Job;
use crate::shutdown::Shutdown;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Items ordered by due time; ties keep insertion order.
pub struct TimerQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

struct Entry<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> TimerQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `item`, due at `due`.
    pub fn push(&mut self, due: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Entry {
            due,
            seq: self.seq,
            item,
        });
    }

    /// When the earliest item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.due)
    }

    /// Removes and returns the earliest item if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_due()? <= now {
            self.heap.pop().map(|e| e.item)
        } else {
            None
        }
    }

    /// Keeps only the items for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.heap.retain(|e| keep(&e.item));
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Something with a deadline: a call in progress (`dispatch::Pending`). The timer
/// knows only this, not the dispatcher.
pub(crate) trait Expire: Send + Sync {
    /// The deadline has passed.
    fn expire(&self);

    /// Whether the deadline no longer matters (the call has answered): the timer
    /// may drop it before it comes due.
    fn settled(&self) -> bool;
}

/// The timer drops settled deadlines once it holds at least this many entries,
/// and again each time their number doubles: most calls return long before their
/// deadline, and each would otherwise be held (with its reply channel and names)
/// for its whole `timeout_ms`, up to a day.
const PURGE_AT: usize = 1024;

/// What the timer thread does when an entry comes due.
pub(crate) enum TimerEvent {
    /// A call's deadline: answer `timeout` unless it answered already.
    Deadline(Arc<dyn Expire>),
    /// A delayed request is due: hand it to the workers.
    Due(Job),
    /// Trigger shutdown (`halt`).
    Shutdown,
}

/// What the timer thread and everyone scheduling share. Scheduling is a push
/// under the lock, and wakes the timer thread only when the new event comes due
/// before the time it sleeps until: every call schedules its deadline, and
/// waking a thread per call (as a channel to the timer did) cost a futex wake
/// and a context switch per request for a deadline that is almost never the
/// earliest.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    queue: TimerQueue<TimerEvent>,
    /// When the timer thread will look again unless woken; `None` while it is
    /// awake, when it looks at the queue before it sleeps anyway.
    sleeping_until: Option<Instant>,
    /// The queue's length at which settled deadlines are dropped next.
    purge_at: usize,
    stopped: bool,
}

impl Shared {
    /// The state, even if a thread panicked holding it: each change to it is a
    /// single push, pop or flag, complete before anything that could panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Schedules events on the timer thread.
#[derive(Clone)]
pub(crate) struct TimerHandle {
    shared: Arc<Shared>,
}

impl TimerHandle {
    pub(crate) fn schedule(&self, due: Instant, event: TimerEvent) {
        let mut state = self.shared.lock();
        // Only at the very end of shutdown: nothing would fire it.
        if state.stopped {
            return;
        }
        state.queue.push(due, event);
        if state.queue.len() >= state.purge_at {
            state
                .queue
                .retain(|e| !matches!(e, TimerEvent::Deadline(p) if p.settled()));
            state.purge_at = (state.queue.len() * 2).max(PURGE_AT);
        }
        if state.sleeping_until.is_some_and(|until| due < until) {
            // It looks again at once; it sleeps again only until `due`.
            state.sleeping_until = None;
            self.shared.wake.notify_one();
        }
    }

    pub(crate) fn stop(&self) {
        self.shared.lock().stopped = true;
        self.shared.wake.notify_one();
    }
}

/// Starts the timer thread. Due requests go to `due`; `halt` triggers `shutdown`.
pub(crate) fn start(
    due: DueLane,
    shutdown: Shutdown,
) -> std::io::Result<(TimerHandle, JoinHandle<()>)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: TimerQueue::new(),
            sleeping_until: None,
            purge_at: PURGE_AT,
            stopped: false,
        }),
        wake: Condvar::new(),
    });
    let handle = TimerHandle {
        shared: shared.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("cerbas-timer".into())
        .spawn(move || run(&shared, due, shutdown))?;
    Ok((handle, thread))
}

/// With nothing scheduled, the timer still looks once an hour.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

fn run(shared: &Shared, due: DueLane, shutdown: Shutdown) {
    let mut fired = Vec::new();
    loop {
        {
            let mut state = shared.lock();
            if state.stopped {
                return;
            }
            let now = Instant::now();
            while let Some(event) = state.queue.pop_due(now) {
                fired.push(event);
            }
            if fired.is_empty() {
                let until = state.queue.next_due().unwrap_or(now + IDLE_WAIT);
                state.sleeping_until = Some(until);
                let wait = until.saturating_duration_since(now);
                let (mut state, _) = shared
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(PoisonError::into_inner);
                state.sleeping_until = None;
                continue;
            }
        }
        // Fired outside the lock: an expiry sends a reply, and nothing that
        // schedules should wait for that.
        for event in fired.drain(..) {
            match event {
                TimerEvent::Deadline(pending) => pending.expire(),
                // On shutdown a due request stays in this instance's processing
                // list, which goes back to the queue: it is not lost.
                TimerEvent::Due(job) if !shutdown.is_triggered() => {
                    let _ = due.send(job);
                }
                TimerEvent::Due(_) => {}
                TimerEvent::Shutdown => {
                    log::info!("shutdown requested by a function");
                    shutdown.trigger();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_in_due_order_and_only_when_due() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = TimerQueue::new();
        q.push(at(30), "c");
        q.push(at(10), "a");
        q.push(at(20), "b1");
        q.push(at(20), "b2");
        assert_eq!(q.len(), 4);
        assert_eq!(q.next_due(), Some(at(10)));
        assert_eq!(q.pop_due(at(5)), None);
        assert_eq!(q.pop_due(at(10)), Some("a"));
        assert_eq!(q.pop_due(at(25)), Some("b1"));
        assert_eq!(q.pop_due(at(25)), Some("b2"));
        assert_eq!(q.pop_due(at(25)), None);
        assert_eq!(q.pop_due(at(100)), Some("c"));
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn retain_keeps_the_order_of_what_it_keeps() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = TimerQueue::new();
        for (ms, v) in [(30, 3), (10, 1), (20, 2), (40, 4)] {
            q.push(at(ms), v);
        }
        q.retain(|v| v % 2 == 0);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_due(at(100)), Some(2));
        assert_eq!(q.pop_due(at(100)), Some(4));
        assert!(q.is_empty());
    }

    /// A deadline whose call has answered.
    struct Answered;

    impl Expire for Answered {
        fn expire(&self) {}
        fn settled(&self) -> bool {
            true
        }
    }

    /// Found by review: every call's deadline stayed in the timer until it came
    /// due, with everything it refers to: ~0.5 KB a call for `timeout_ms`, 319 MB
    /// for 600,000 calls under a one-hour timeout. Settled ones are dropped early.
    #[test]
    fn deadlines_of_answered_calls_do_not_wait_for_their_due_time() {
        let (_reader, due_tx, _jobs) = crate::handoff::handoff(1);
        let (timer, thread) = start(due_tx, Shutdown::new()).unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let first: Arc<dyn Expire> = Arc::new(Answered);
        timer.schedule(later, TimerEvent::Deadline(first.clone()));
        for _ in 0..PURGE_AT {
            timer.schedule(later, TimerEvent::Deadline(Arc::new(Answered)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&first) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(Arc::strong_count(&first), 1, "the timer let go of it");
        timer.stop();
        thread.join().unwrap();
    }

    /// The timer sleeps until its earliest event and is woken only by one due
    /// sooner: a near deadline scheduled while it sleeps for a far one fires on
    /// time, not after the far one.
    #[test]
    fn an_event_sooner_than_the_one_slept_for_wakes_the_timer() {
        let (_reader, due_tx, _jobs) = crate::handoff::handoff(1);
        let shutdown = Shutdown::new();
        let (timer, thread) = start(due_tx, shutdown.clone()).unwrap();
        let far: Arc<dyn Expire> = Arc::new(Answered);
        timer.schedule(
            Instant::now() + Duration::from_secs(3600),
            TimerEvent::Deadline(far),
        );
        // Let the timer go to sleep until the far deadline first.
        let asleep = Instant::now() + Duration::from_secs(10);
        while timer.shared.lock().sleeping_until.is_none() && Instant::now() < asleep {
            std::thread::yield_now();
        }
        assert!(
            timer.shared.lock().sleeping_until.is_some(),
            "the timer slept"
        );
        a_shutdown_in_20_ms_fires(timer, thread, &shutdown);
    }

    /// Schedules a shutdown 20 ms ahead, asserts it fires, and stops the timer.
    fn a_shutdown_in_20_ms_fires(timer: TimerHandle, thread: JoinHandle<()>, shutdown: &Shutdown) {
        timer.schedule(
            Instant::now() + Duration::from_millis(20),
            TimerEvent::Shutdown,
        );
        assert!(shutdown.wait_timeout(Duration::from_secs(10)));
        timer.stop();
        thread.join().unwrap();
    }

    #[test]
    fn a_scheduled_shutdown_fires() {
        let (_reader, due_tx, _jobs) = crate::handoff::handoff(1);
        let shutdown = Shutdown::new();
        let (timer, thread) = start(due_tx, shutdown.clone()).unwrap();
        a_shutdown_in_20_ms_fires(timer, thread, &shutdown);
    }
}
