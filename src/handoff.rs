//! How jobs reach the workers: two lanes under one lock, the reader's (bounded by
//! the pool's width) and the "due" lane (delayed requests from the timer, calls
//! from the HTTP plug), and one condition variable the idle workers sleep on.
//! Not for: deciding how many jobs to take from Redis (the reader counts idle
//! workers on its `ready` channel) or running them (`pool.rs`).
//!
//! Why not two crossbeam channels and a `select!`: on this hot path (one hand-off
//! per request) crossbeam cost several system calls per job. A worker waiting in
//! `select!` is registered on both channels' wakers; a sender unparks it while
//! holding the waker's lock, so the woken worker blocked at once on that lock to
//! unregister (a futex wait and wake more, and on 2 cores a 70 µs stall was seen
//! when the reader was preempted holding it), and a receive spins and yields the
//! CPU before it sleeps. Here a sender pushes under the lock, releases it, and
//! wakes one sleeping worker only if one sleeps and no wake is on its way already;
//! a worker that takes a job and leaves more waiting wakes the next (a chain).
//! So one wake at a time is in flight: a worker already awake (one that just
//! finished) takes what it finds, and a burst of jobs wakes no more workers than
//! take part in it. Jobs still start one wake apart at most, so slow calls spread
//! over the pool as before. (Measured with the floor's threaded mode,
//! `examples/floor.rs --threads --chain-wake`: worker context switches per W2
//! round trip 1.17 → 0.71, server CPU 32 → 27 µs.) A due job goes first, but while
//! both lanes hold jobs they take turns (the `select!` picked either at random):
//! HTTP calls keeping the due lane full must not starve what the reader took.

use crate::job::Job;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

struct Shared {
    lanes: Mutex<Lanes>,
    /// Idle workers wait here for a job.
    arrived: Condvar,
    /// The reader waits here while its lane is full.
    room: Condvar,
}

struct Lanes {
    from_reader: VecDeque<Job>,
    due: VecDeque<Job>,
    /// The most jobs waiting in the reader's lane.
    width: usize,
    /// The reader's end is gone: nothing more will come from Redis.
    reader_closed: bool,
    /// How many [`DueLane`]s are left; none: nothing more will come due.
    due_senders: usize,
    /// How many [`Jobs`] ends are left; none: every worker has gone, and a
    /// send fails at once, as on a channel without receivers.
    receivers: usize,
    /// Workers asleep on `arrived`: a wake, a system call, only for them.
    asleep: usize,
    /// Wakes sent and not yet taken up: while one is on its way, no other is
    /// sent (the woken worker passes it on if it leaves jobs waiting). Each
    /// worker leaving its wait takes one off, woken or not, so it never stays
    /// above what will be taken up.
    waking: usize,
    /// The reader asleep on `room`.
    reader_waits: bool,
    /// The last job taken was a due one: the reader's lane goes first next, so
    /// HTTP calls that keep the due lane full do not starve the requests the
    /// reader took (a `select!` over two channels picked either at random).
    reader_next: bool,
}

impl Lanes {
    /// Whether to wake a sleeping worker for a job that waits (counted as on
    /// its way if so): only if one sleeps and no wake is on its way.
    fn wake_one(&mut self) -> bool {
        let wake = self.asleep > 0 && self.waking == 0;
        if wake {
            self.waking += 1;
        }
        wake
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // Each change under the lock is one push, pop or counter: a panic
        // elsewhere leaves nothing half done.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The three ends of a new hand-off whose reader lane holds at most `width` jobs.
pub(crate) fn handoff(width: usize) -> (ReaderLane, DueLane, Jobs) {
    let shared = Arc::new(Shared {
        lanes: Mutex::new(Lanes {
            from_reader: VecDeque::with_capacity(width),
            due: VecDeque::new(),
            width: width.max(1),
            reader_closed: false,
            due_senders: 1,
            receivers: 1,
            asleep: 0,
            waking: 0,
            reader_waits: false,
            reader_next: false,
        }),
        arrived: Condvar::new(),
        room: Condvar::new(),
    });
    (
        ReaderLane(shared.clone()),
        DueLane(shared.clone()),
        Jobs(shared),
    )
}

/// Why a job was not handed over.
pub(crate) enum NotHanded {
    /// The reader's lane stayed full: the job, to try again.
    Full(Box<Job>),
    /// Every worker has gone (the job is dropped: its caller sees its reply
    /// channel close).
    Closed,
}

/// The reader's end: jobs taken from Redis. Dropping it tells the workers that
/// nothing more will come from Redis.
pub(crate) struct ReaderLane(Arc<Shared>);

impl std::fmt::Debug for NotHanded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotHanded::Full(_) => "the reader's lane is full",
            NotHanded::Closed => "every worker has gone",
        })
    }
}

impl ReaderLane {
    /// Hands `job` to the workers, waiting up to `timeout` while the lane is full.
    pub(crate) fn send_timeout(&self, job: Job, timeout: Duration) -> Result<(), NotHanded> {
        let deadline = Instant::now() + timeout;
        let mut lanes = self.0.lock();
        loop {
            if lanes.receivers == 0 {
                return Err(NotHanded::Closed);
            }
            if lanes.from_reader.len() < lanes.width {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotHanded::Full(Box::new(job)));
            }
            lanes.reader_waits = true;
            lanes = self
                .0
                .room
                .wait_timeout(lanes, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            lanes.reader_waits = false;
        }
        lanes.from_reader.push_back(job);
        let wake = lanes.wake_one();
        drop(lanes);
        if wake {
            self.0.arrived.notify_one();
        }
        Ok(())
    }

    /// The most jobs its lane holds.
    pub(crate) fn width(&self) -> usize {
        self.0.lock().width
    }
}

impl Drop for ReaderLane {
    fn drop(&mut self) {
        self.0.lock().reader_closed = true;
        self.0.arrived.notify_all();
    }
}

/// A sender on the due lane (the timer, the HTTP plug's caller). The lane closes
/// when the last clone is dropped.
pub(crate) struct DueLane(Arc<Shared>);

impl DueLane {
    /// Hands `job` to the workers; never waits. Fails once every worker has
    /// gone.
    pub(crate) fn send(&self, job: Job) -> Result<(), NotHanded> {
        let mut lanes = self.0.lock();
        if lanes.receivers == 0 {
            return Err(NotHanded::Closed);
        }
        lanes.due.push_back(job);
        let wake = lanes.wake_one();
        drop(lanes);
        if wake {
            self.0.arrived.notify_one();
        }
        Ok(())
    }
}

impl Clone for DueLane {
    fn clone(&self) -> Self {
        self.0.lock().due_senders += 1;
        DueLane(self.0.clone())
    }
}

impl Drop for DueLane {
    fn drop(&mut self) {
        let mut lanes = self.0.lock();
        lanes.due_senders -= 1;
        if lanes.due_senders == 0 {
            drop(lanes);
            self.0.arrived.notify_all();
        }
    }
}

/// The workers' end.
pub(crate) struct Jobs(Arc<Shared>);

impl Clone for Jobs {
    fn clone(&self) -> Self {
        self.0.lock().receivers += 1;
        Jobs(self.0.clone())
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        let mut lanes = self.0.lock();
        lanes.receivers -= 1;
        if lanes.receivers == 0 {
            // What waits is dropped unanswered, as a channel's messages are when
            // its last receiver goes: their callers see the reply channel close.
            let mut waiting = std::mem::take(&mut lanes.from_reader);
            waiting.append(&mut lanes.due);
            drop(lanes);
            drop(waiting);
            self.0.room.notify_all();
        }
    }
}

impl Jobs {
    /// The next job and whether it came from the reader (due jobs first, the
    /// lanes taking turns while both hold jobs), waiting for one; `None`
    /// once nothing is waiting and a lane has closed (the reader has gone, or the
    /// timer and the plug have), as a `select!` over two channels ends at the
    /// first closed one.
    pub(crate) fn recv(&self) -> Option<(Job, bool)> {
        self.recv_until(None)
    }

    /// As [`Jobs::recv`], giving up at `deadline` (tests).
    #[cfg(test)]
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Option<(Job, bool)> {
        self.recv_until(Some(Instant::now() + timeout))
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Option<(Job, bool)> {
        let mut lanes = self.0.lock();
        let mut expired = false;
        loop {
            // Due jobs first (an HTTP caller waits for a worker with a
            // deadline), but the two lanes take turns while both hold jobs.
            let next = if lanes.reader_next {
                lanes.from_reader.pop_front().map(|job| (job, true))
            } else {
                None
            }
            .or_else(|| lanes.due.pop_front().map(|job| (job, false)))
            .or_else(|| lanes.from_reader.pop_front().map(|job| (job, true)));
            if let Some((job, from_reader)) = next {
                lanes.reader_next = !from_reader;
                let wake_reader = from_reader && lanes.reader_waits;
                // More waits: the next worker, unless a wake is on its way.
                let wake_next =
                    !(lanes.from_reader.is_empty() && lanes.due.is_empty()) && lanes.wake_one();
                drop(lanes);
                if wake_reader {
                    self.0.room.notify_one();
                }
                if wake_next {
                    self.0.arrived.notify_one();
                }
                return Some((job, from_reader));
            }
            if expired || lanes.reader_closed || lanes.due_senders == 0 {
                return None;
            }
            lanes.asleep += 1;
            lanes = match deadline {
                None => self
                    .0
                    .arrived
                    .wait(lanes)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    let (l, waited) = self
                        .0
                        .arrived
                        .wait_timeout(lanes, left)
                        .unwrap_or_else(PoisonError::into_inner);
                    // Timed out: one more look at the lanes (a job may have
                    // come as the wait ended), then give up.
                    expired = waited.timed_out();
                    l
                }
            };
            lanes.asleep -= 1;
            lanes.waking = lanes.waking.saturating_sub(1);
        }
    }

    /// A due job if one waits, without waiting (the last ones, once the reader
    /// has gone).
    pub(crate) fn try_recv_due(&self) -> Option<Job> {
        self.0.lock().due.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Claim, ReplyTo};
    use crate::protocol::Request;

    fn job(func: &str) -> Job {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        Job {
            reply_to: ReplyTo::Local(tx, Claim::default()),
            body: Ok(Request::new(func, serde_json::Map::new())),
            waited: false,
        }
    }

    fn func(j: &(Job, bool)) -> (String, bool) {
        let name = match &j.0.body {
            Ok(r) => r.func.clone(),
            Err(_) => String::new(),
        };
        (name, j.1)
    }

    #[test]
    fn due_jobs_go_first_and_each_says_where_it_came_from() {
        let (reader, due, jobs) = handoff(4);
        reader.send_timeout(job("a"), Duration::ZERO).unwrap();
        due.send(job("b")).unwrap();
        let got: Vec<_> = (0..2)
            .map(|_| func(&jobs.recv_timeout(Duration::ZERO).unwrap()))
            .collect();
        assert_eq!(got, [("b".into(), false), ("a".into(), true)]);
        assert!(jobs.recv_timeout(Duration::from_millis(1)).is_none());
    }

    #[test]
    fn while_both_lanes_hold_jobs_they_take_turns() {
        let (reader, due, jobs) = handoff(4);
        for name in ["r1", "r2"] {
            reader.send_timeout(job(name), Duration::ZERO).unwrap();
        }
        for name in ["d1", "d2", "d3"] {
            due.send(job(name)).unwrap();
        }
        let got: Vec<_> = (0..5)
            .map(|_| func(&jobs.recv_timeout(Duration::ZERO).unwrap()).0)
            .collect();
        assert_eq!(got, ["d1", "r1", "d2", "r2", "d3"]);
    }

    #[test]
    fn the_reader_lane_is_bounded_and_a_take_makes_room() {
        let (reader, _due, jobs) = handoff(1);
        reader.send_timeout(job("a"), Duration::ZERO).unwrap();
        assert!(matches!(
            reader.send_timeout(job("b"), Duration::from_millis(5)),
            Err(NotHanded::Full(_))
        ));
        let worker = {
            let jobs = jobs.clone();
            std::thread::spawn(move || jobs.recv().map(|j| func(&j)))
        };
        reader
            .send_timeout(job("c"), Duration::from_secs(10))
            .expect("room once the worker took one");
        assert_eq!(worker.join().unwrap(), Some(("a".into(), true)));
        assert_eq!(jobs.recv().map(|j| func(&j)), Some(("c".into(), true)));
    }

    #[test]
    fn a_sleeping_worker_is_woken_by_either_lane() {
        let (reader, due, jobs) = handoff(2);
        for send_due in [true, false] {
            let j = jobs.clone();
            let worker = std::thread::spawn(move || j.recv().map(|j| func(&j)));
            // Until it sleeps, so the wake is what brings the job.
            while jobs.0.lock().asleep == 0 {
                std::thread::yield_now();
            }
            if send_due {
                due.send(job("d")).unwrap();
            } else {
                reader.send_timeout(job("r"), Duration::ZERO).unwrap();
            }
            let expected = if send_due { ("d", false) } else { ("r", true) };
            assert_eq!(
                worker.join().unwrap(),
                Some((expected.0.into(), expected.1))
            );
        }
    }

    /// Calls running now, the most at once, and whether they may return; and
    /// the condition variable they wait on.
    type Running = Arc<(Mutex<(usize, usize, bool)>, Condvar)>;

    /// `n` sleeping workers, each taking jobs until its lanes close and holding
    /// each until the third field of their [`Running`] is set; each returns how
    /// many jobs it took.
    fn slow_workers(jobs: &Jobs, n: usize) -> (Vec<std::thread::JoinHandle<usize>>, Running) {
        let state = Arc::new((Mutex::new((0, 0, false)), Condvar::new()));
        let workers = (0..n)
            .map(|_| {
                let (jobs, state) = (jobs.clone(), state.clone());
                std::thread::spawn(move || {
                    let mut taken = 0;
                    while jobs.recv().is_some() {
                        taken += 1;
                        let (lock, cv) = &*state;
                        let mut s = lock.lock().unwrap();
                        s.0 += 1;
                        s.1 = s.1.max(s.0);
                        cv.notify_all();
                        while !s.2 {
                            s = cv.wait(s).unwrap();
                        }
                        s.0 -= 1;
                    }
                    taken
                })
            })
            .collect();
        while jobs.0.lock().asleep < n {
            std::thread::yield_now();
        }
        (workers, state)
    }

    /// One wake at a time is in flight, but each woken worker that leaves jobs
    /// waiting wakes the next: a burst of slow calls still spreads over every
    /// sleeping worker (none waits behind another's call), from either lane.
    #[test]
    fn a_burst_of_slow_calls_spreads_over_the_sleeping_workers_one_wake_at_a_time() {
        for from_due in [false, true] {
            let (reader, due, jobs) = handoff(8);
            let (workers, state) = slow_workers(&jobs, 8);
            for i in 0..8 {
                let j = job(&format!("j{i}"));
                if from_due {
                    due.send(j).unwrap();
                } else {
                    reader.send_timeout(j, Duration::ZERO).unwrap();
                }
                assert!(jobs.0.lock().waking <= 1, "one wake in flight at most");
            }
            let (lock, cv) = &*state;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = lock.lock().unwrap();
            while s.0 < 8 && Instant::now() < deadline {
                s = cv.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
            }
            assert_eq!(s.0, 8, "all 8 calls run at once (from_due {from_due})");
            s.2 = true;
            cv.notify_all();
            drop(s);
            drop((reader, due));
            let taken: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
            assert_eq!(taken, 8);
        }
    }

    /// A worker already awake takes what comes while the woken one is on its
    /// way, and no job is left waiting with workers asleep: every job is taken.
    #[test]
    fn jobs_pushed_while_a_wake_is_on_its_way_are_all_taken() {
        let (reader, due, jobs) = handoff(64);
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let jobs = jobs.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while jobs.recv().is_some() {
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for round in 0..2_000 {
            reader
                .send_timeout(job("r"), Duration::from_secs(10))
                .unwrap();
            if round % 3 == 0 {
                due.send(job("d")).unwrap();
            }
            if round % 50 == 0 {
                // Let them fall asleep now and then.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Everything sent is taken before the lanes close: none stranded.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(jobs.0.lock().from_reader.is_empty() && jobs.0.lock().due.is_empty()) {
            assert!(Instant::now() < deadline, "jobs left waiting");
            std::thread::yield_now();
        }
        drop((reader, due));
        let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 2_000 + 667);
    }

    /// A small xorshift generator: storms that differ from run to run without
    /// a dependency.
    struct Rng(u64);

    impl Rng {
        fn seeded(salt: u64) -> Rng {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            Rng((t ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// What the lanes hold and the wake counters, for a failure message.
    fn state(jobs: &Jobs) -> String {
        let l = jobs.0.lock();
        format!(
            "reader lane {}, due lane {}, asleep {}, waking {}, receivers {}",
            l.from_reader.len(),
            l.due.len(),
            l.asleep,
            l.waking,
            l.receivers
        )
    }

    /// The rule the one wake in flight rests on, as any thread taking the lock
    /// sees it: a job waits while a worker sleeps only if a wake is on its way,
    /// and never more than one is.
    fn check(jobs: &Jobs) -> Result<(), String> {
        let l = jobs.0.lock();
        let waiting = !(l.from_reader.is_empty() && l.due.is_empty());
        if waiting && l.asleep > 0 && l.waking == 0 {
            drop(l);
            return Err(format!("stranded: {}", state(jobs)));
        }
        if l.waking > 1 {
            drop(l);
            return Err(format!("more than one wake: {}", state(jobs)));
        }
        Ok(())
    }

    /// A worker of the storm: takes jobs until its lanes close. A timed one
    /// (`recv_timeout` of 0-300 µs, so timeouts expire while wakes are on their
    /// way) and one that "retires" after a job (as a hung worker does) hands
    /// its place to a new thread and drops its `Jobs`.
    fn storm_worker(
        mut jobs: Jobs,
        timed: bool,
        seed: u64,
        taken: Arc<std::sync::atomic::AtomicUsize>,
        spawned: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    ) -> std::thread::JoinHandle<()> {
        use std::sync::atomic::Ordering::SeqCst;
        std::thread::spawn(move || {
            let mut rng = Rng::seeded(seed);
            loop {
                let got = if timed {
                    jobs.recv_timeout(Duration::from_micros(rng.below(300)))
                } else {
                    jobs.recv()
                };
                let closed = {
                    let l = jobs.0.lock();
                    l.reader_closed || l.due_senders == 0
                };
                match got {
                    Some(_) => {
                        taken.fetch_add(1, SeqCst);
                        if rng.below(4) == 0 {
                            std::thread::yield_now();
                        }
                        // Now and then this one retires and a new one takes its place.
                        if rng.below(40) == 0 && !closed {
                            let next = storm_worker(
                                jobs.clone(),
                                timed,
                                rng.below(u64::MAX),
                                taken.clone(),
                                spawned.clone(),
                            );
                            spawned.lock().unwrap().push(next);
                            return;
                        }
                    }
                    None if closed => {
                        while jobs.try_recv_due().is_some() {
                            taken.fetch_add(1, SeqCst);
                        }
                        return;
                    }
                    // Timed out: this end goes (as a worker's does when it
                    // exits) and a new one takes its place, on this thread
                    // (a thread for each would pile up when wakes are lost).
                    None => jobs = jobs.clone(),
                }
            }
        })
    }

    /// Storms: the reader (a lane of width 1, 2 or 16, so it often waits for
    /// room, with short send timeouts it retries) and three due senders racing
    /// workers that wait with and without timeouts and retire and are replaced
    /// while wakes are on their way. A checker takes the lock all along and
    /// asserts the rule of [`check`]; once the senders stop, every job must be
    /// taken (none stranded until a later arrival), the last wake taken up,
    /// and a new job on either lane taken at once; the lanes then close and
    /// every worker ends.
    #[test]
    fn storms_of_senders_and_workers_never_leave_a_job_waiting_while_a_worker_sleeps_unwoken() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        for (round, width) in [1usize, 2, 16, 1, 2, 16].into_iter().enumerate() {
            let (reader, due, jobs) = handoff(width);
            let taken = Arc::new(AtomicUsize::new(0));
            let spawned = Arc::new(Mutex::new(Vec::new()));
            let first: Vec<_> = (0..8)
                .map(|i| {
                    storm_worker(
                        jobs.clone(),
                        i % 2 == 1,
                        (round * 100 + i) as u64,
                        taken.clone(),
                        spawned.clone(),
                    )
                })
                .collect();
            spawned.lock().unwrap().extend(first);
            let done = Arc::new(AtomicBool::new(false));
            let checker = {
                let (jobs, done) = (jobs.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut looks = 0u64;
                    while !done.load(SeqCst) {
                        check(&jobs)?;
                        looks += 1;
                        std::thread::yield_now();
                    }
                    Ok::<u64, String>(looks)
                })
            };
            let (per_reader, per_due) = (3_000u64, 1_000u64);
            let reader_thread = std::thread::spawn(move || {
                let mut rng = Rng::seeded(round as u64 + 7);
                for i in 0..per_reader {
                    let mut j = job("r");
                    loop {
                        let wait = Duration::from_micros(rng.below(500));
                        match reader.send_timeout(j, wait) {
                            Ok(()) => break,
                            Err(NotHanded::Full(back)) => j = *back,
                            Err(NotHanded::Closed) => panic!("workers gone"),
                        }
                    }
                    if i % 97 == 0 {
                        // An idle moment: the workers fall asleep.
                        std::thread::sleep(Duration::from_micros(rng.below(400)));
                    }
                }
                reader
            });
            let due_threads: Vec<_> = (0..3)
                .map(|k| {
                    let due = due.clone();
                    std::thread::spawn(move || {
                        let mut rng = Rng::seeded(round as u64 * 10 + k);
                        for i in 0..per_due {
                            due.send(job("d")).expect("workers there");
                            if i % 53 == 0 {
                                std::thread::sleep(Duration::from_micros(rng.below(400)));
                            }
                        }
                    })
                })
                .collect();
            let reader = reader_thread.join().unwrap();
            for t in due_threads {
                t.join().unwrap();
            }
            let total = (per_reader + 3 * per_due) as usize;
            let deadline = Instant::now() + Duration::from_secs(10);
            while taken.load(SeqCst) < total {
                assert!(
                    Instant::now() < deadline,
                    "width {width}: {} of {total} taken, the rest stranded: {}",
                    taken.load(SeqCst),
                    state(&jobs)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // The last wake is taken up: it cannot stay counted and block the
            // next one.
            while jobs.0.lock().waking > 0 {
                assert!(
                    Instant::now() < deadline,
                    "a wake never taken up: {}",
                    state(&jobs)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            done.store(true, SeqCst);
            let looks = checker
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("width {width}: {e}"));
            assert!(looks > 0);
            // A new job on either lane is taken at once by a sleeping worker.
            for on_due in [true, false] {
                let before = taken.load(SeqCst);
                if on_due {
                    due.send(job("p")).unwrap();
                } else {
                    reader.send_timeout(job("p"), Duration::ZERO).unwrap();
                }
                while taken.load(SeqCst) == before {
                    assert!(
                        Instant::now() < deadline,
                        "probe stranded: {}",
                        state(&jobs)
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            drop((reader, due));
            // Every worker ends; replacements may still be starting.
            loop {
                let next = spawned.lock().unwrap().pop();
                match next {
                    Some(w) => w.join().unwrap(),
                    None => break,
                }
            }
            assert_eq!(taken.load(SeqCst), total + 2, "each job taken once");
        }
    }

    /// Slow calls: eight workers each holding what it takes until a release
    /// lets one call (any) return, bursts of random size on random lanes, and
    /// random releases, so some workers run calls while others sleep, and a
    /// freed worker comes back to find jobs waiting. After every step, as many
    /// calls must run as the pool can: a waiting job does not wait behind a
    /// held call while a worker sleeps.
    #[test]
    fn held_calls_never_keep_a_waiting_job_from_a_sleeping_worker() {
        let n = 8;
        let (reader, due, jobs) = handoff(n);
        // Calls running, releases not yet used, calls finished.
        let state_ = Arc::new((Mutex::new((0usize, 0usize, 0usize)), Condvar::new()));
        let workers: Vec<_> = (0..n)
            .map(|_| {
                let (jobs, state_) = (jobs.clone(), state_.clone());
                std::thread::spawn(move || {
                    let (lock, cv) = &*state_;
                    while jobs.recv().is_some() {
                        let mut s = lock.lock().unwrap();
                        s.0 += 1;
                        cv.notify_all();
                        while s.1 == 0 {
                            s = cv.wait(s).unwrap();
                        }
                        s.1 -= 1;
                        s.0 -= 1;
                        s.2 += 1;
                        cv.notify_all();
                    }
                })
            })
            .collect();
        let (lock, cv) = &*state_;
        let mut rng = Rng::seeded(42);
        let (mut outstanding, mut sent) = (0usize, 0usize);
        for step in 0..400 {
            let running = lock.lock().unwrap().0;
            if running > 0 && rng.below(2) == 0 {
                let k = 1 + rng.below(running as u64) as usize;
                let mut s = lock.lock().unwrap();
                let target = s.2 + k;
                s.1 += k;
                cv.notify_all();
                let deadline = Instant::now() + Duration::from_secs(5);
                while s.2 < target {
                    assert!(Instant::now() < deadline, "released calls do not finish");
                    s = cv.wait_timeout(s, Duration::from_millis(5)).unwrap().0;
                }
                outstanding -= k;
            }
            let burst = rng.below(5) as usize;
            for _ in 0..burst {
                // Half on the due lane, and there too when the reader's is full.
                if rng.below(2) == 0 || reader.send_timeout(job("r"), Duration::ZERO).is_err() {
                    due.send(job("d")).unwrap();
                }
                outstanding += 1;
                sent += 1;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut s = lock.lock().unwrap();
            while s.0 < outstanding.min(n) {
                assert!(
                    Instant::now() < deadline,
                    "step {step}: {} running of {outstanding} sent, with workers asleep: {}",
                    s.0,
                    state(&jobs)
                );
                s = cv.wait_timeout(s, Duration::from_millis(5)).unwrap().0;
            }
            drop(s);
            check(&jobs).unwrap_or_else(|e| panic!("step {step}: {e}"));
        }
        let mut s = lock.lock().unwrap();
        s.1 = usize::MAX / 2;
        cv.notify_all();
        drop(s);
        drop((reader, due));
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(lock.lock().unwrap().2, sent, "each job run once");
    }

    #[test]
    fn workers_end_once_a_lane_closes_but_not_before_the_waiting_jobs() {
        let (reader, due, jobs) = handoff(2);
        reader.send_timeout(job("a"), Duration::ZERO).unwrap();
        let sleeper = {
            let j = jobs.clone();
            std::thread::spawn(move || {
                let first = j.recv().map(|j| func(&j));
                (first, j.recv().is_none())
            })
        };
        let other = due.clone();
        drop(other);
        drop(reader);
        let (first, ended) = sleeper.join().unwrap();
        assert_eq!(first, Some(("a".into(), true)), "the waiting job first");
        assert!(ended, "then the end, the reader being gone");
        // The due lane is still open; its last jobs are taken without waiting.
        due.send(job("late")).unwrap();
        assert!(jobs.try_recv_due().is_some());
        assert!(jobs.try_recv_due().is_none());
    }

    #[test]
    fn the_last_due_sender_gone_ends_a_sleeping_worker() {
        let (_reader, due, jobs) = handoff(2);
        let worker = std::thread::spawn(move || jobs.recv().is_none());
        let clone = due.clone();
        drop(due);
        drop(clone);
        assert!(worker.join().unwrap());
    }

    #[test]
    fn with_every_worker_gone_sends_fail_and_what_waited_is_dropped() {
        let (reader, due, jobs) = handoff(1);
        let (tx, rx) = crossbeam_channel::bounded(1);
        due.send(Job {
            reply_to: ReplyTo::Local(tx, Claim::default()),
            body: Ok(Request::new("a", serde_json::Map::new())),
            waited: false,
        })
        .unwrap();
        drop(jobs);
        assert!(
            matches!(
                rx.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            ),
            "its caller sees the job dropped"
        );
        assert!(due.send(job("b")).is_err());
        assert!(matches!(
            reader.send_timeout(job("c"), Duration::ZERO),
            Err(NotHanded::Closed)
        ));
    }
}
