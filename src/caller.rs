//! The one in-process entry point to the dispatch path: a [`Caller`] turns a
//! [`Request`] into a [`Job`] with [`ReplyTo::Local`], hands it to the worker pool
//! and waits for its reply. The HTTP plug uses it (cron needs none: its ticks are
//! requests in Redis): access checks, deadlines, panics, the cache and the
//! counters are the dispatcher's, run on a worker exactly as for a request from
//! Redis. Runs on the caller's thread (an HTTP handler thread). Not for: what a
//! caller does with the reply (the HTTP status is `http/api.rs`'s business).
//!
//! Two interactions with the rest of the server, on purpose:
//! - The wait for a worker. A call waits at most [`Caller::wait`] (the default
//!   deadline, `timeout_ms`) for a worker to take it; if every worker stays
//!   busy that long, the caller withdraws the job ([`Claim`]) and gives up with
//!   [`NotRun::NoWorker`]: the function is then never run. Once a worker has
//!   taken the job, the function's own deadline bounds the rest.
//! - The drain. Each call counts in [`Unanswered`] from before it is handed over
//!   until its reply is back, so a graceful stop waits for in-flight local calls
//!   as for requests from Redis. Once the stop is triggered no new call is taken
//!   ([`Stopping`]); a call still waiting when the drain deadline passes (the
//!   server sets `abandon`) gives up with [`Stopping`] too.
//! - The reader's "ready" count. Jobs go on the workers' due lane (the one the
//!   timer uses, `handoff.rs`), not on the reader's lane: a worker that takes a
//!   due job does not announce itself free again afterwards (`pool.rs`),
//!   so the reader's count of idle workers never grows past the pool. While a
//!   worker runs a local call, the reader may still count it idle and take one
//!   request from Redis for it; that request waits in the bounded reader's lane
//!   (its deadline not yet started) until a worker is free. So with H local calls
//!   running, at most H requests wait in this instance instead of in Redis.

use crate::job::{Claim, Job, LocalReply, ReplyTo, Unanswered};
use crate::protocol::Request;
use crate::shutdown::Shutdown;
use crossbeam_channel::RecvTimeoutError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a waiting call looks at the drain deadline.
const POLL: Duration = Duration::from_millis(50);

/// Why a call got no reply from its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRun {
    /// The server is stopping: the call was not taken, or was given up at the
    /// drain deadline.
    Stopping,
    /// No worker took the call within this long (every one was busy); it was
    /// withdrawn and will not run.
    NoWorker(Duration),
}

/// Hands requests to the worker pool and waits for their replies. Cheap to
/// clone; one per thread that calls.
#[derive(Clone)]
pub(crate) struct Caller {
    /// The workers' `due` channel.
    pub(crate) jobs: crate::handoff::DueLane,
    pub(crate) unanswered: Unanswered,
    /// The server's shutdown: once triggered, no new calls.
    pub(crate) shutdown: Shutdown,
    /// Set by the server at the drain deadline: stop waiting.
    pub(crate) abandon: Arc<AtomicBool>,
    /// How long a call waits for a worker to take it.
    pub(crate) wait: Duration,
}

/// Counts a call in [`Unanswered`] until dropped, whichever way the call ends.
struct Counted(Unanswered);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.done(1);
    }
}

impl Caller {
    /// Runs `request` through the dispatch path and returns its reply (or why it
    /// was refused, typed). Blocks until a worker has answered: up to
    /// [`Caller::wait`] for a worker to take the job, then the function's
    /// deadline bounds the rest.
    pub(crate) fn call(&self, request: Request) -> Result<LocalReply, NotRun> {
        if self.shutdown.is_triggered() {
            return Err(NotRun::Stopping);
        }
        self.unanswered.add(1);
        let _counted = Counted(self.unanswered.clone());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let claim = Claim::default();
        let job = Job {
            reply_to: ReplyTo::Local(tx, claim.clone()),
            body: Ok(request),
            waited: false,
        };
        if self.jobs.send(job).is_err() {
            return Err(NotRun::Stopping);
        }
        let give_up = Instant::now() + self.wait;
        loop {
            let poll = give_up
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), POLL);
            match rx.recv_timeout(poll) {
                Ok(reply) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) if self.abandon.load(Ordering::SeqCst) => {
                    return Err(NotRun::Stopping)
                }
                // No worker took it in time: withdrawn, unless one just did.
                Err(RecvTimeoutError::Timeout) if Instant::now() >= give_up && claim.withdraw() => {
                    return Err(NotRun::NoWorker(self.wait))
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The job was dropped unanswered (the workers are gone).
                Err(RecvTimeoutError::Disconnected) => return Err(NotRun::Stopping),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Reply;
    use serde_json::Map;

    /// A caller, the workers' end of its jobs, and the reader's lane, held
    /// open as long as the test needs the workers' end.
    fn caller() -> (Caller, crate::handoff::Jobs, crate::handoff::ReaderLane) {
        let (reader, jobs, rx) = crate::handoff::handoff(1);
        (
            Caller {
                jobs,
                unanswered: Unanswered::default(),
                shutdown: Shutdown::new(),
                abandon: Arc::default(),
                wait: Duration::from_secs(10),
            },
            rx,
            reader,
        )
    }

    #[test]
    fn a_call_counts_until_its_reply_is_back() {
        let (c, jobs, _reader) = caller();
        let worker = {
            let unanswered = c.unanswered.clone();
            std::thread::spawn(move || {
                let (job, _) = jobs.recv_timeout(Duration::from_secs(10)).expect("a job");
                assert!(!unanswered.is_zero(), "counted while it runs");
                if let ReplyTo::Local(tx, _) = job.reply_to {
                    let _ = tx.send(Ok(Some(Reply::Ok("hi".into()))));
                }
            })
        };
        let reply = c.call(Request::new("hello", Map::new()));
        assert_eq!(reply, Ok(Ok(Some(Reply::Ok("hi".into())))));
        assert!(c.unanswered.is_zero());
        worker.join().expect("worker");
    }

    #[test]
    fn no_call_is_taken_once_stopping_and_waits_end_at_the_drain_deadline() {
        let (c, jobs, _reader) = caller();
        c.abandon.store(true, Ordering::SeqCst);
        assert_eq!(
            c.call(Request::new("hello", Map::new())),
            Err(NotRun::Stopping)
        );
        assert!(jobs.try_recv_due().is_some(), "it was handed over");
        assert!(c.unanswered.is_zero(), "and no longer counted");
        c.shutdown.trigger();
        assert_eq!(
            c.call(Request::new("hello", Map::new())),
            Err(NotRun::Stopping)
        );
        assert!(jobs.try_recv_due().is_none(), "nothing handed over");
        assert!(c.unanswered.is_zero());
    }

    #[test]
    fn a_call_no_worker_takes_in_time_is_withdrawn_and_never_runs() {
        let (mut c, jobs, _reader) = caller();
        c.wait = Duration::from_millis(30);
        let t = Instant::now();
        assert_eq!(
            c.call(Request::new("hello", Map::new())),
            Err(NotRun::NoWorker(c.wait))
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(c.unanswered.is_zero());
        match jobs.try_recv_due().map(|j| j.reply_to) {
            Some(ReplyTo::Local(_, claim)) => assert!(!claim.take(), "a worker must not run it"),
            _ => panic!("the job was handed over"),
        }
    }

    #[test]
    fn a_job_dropped_unanswered_ends_the_wait() {
        let (c, jobs, _reader) = caller();
        drop(jobs);
        assert_eq!(
            c.call(Request::new("hello", Map::new())),
            Err(NotRun::Stopping)
        );
        assert!(c.unanswered.is_zero());
    }
}
