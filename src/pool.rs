//! The worker pool: a fixed number of named threads, each taking one job at a time
//! from the jobs channel (or a delayed job from the timer) and running it through
//! the dispatcher. A panicking function does not kill its worker (the dispatcher
//! catches it), so the pool keeps its width. Workers exit when the reader has gone
//! and the jobs channel is empty, or when the drain deadline has passed.
//! Not for: deadlines (the timer) or replies (the publisher).

use crate::dispatch::{Dispatcher, Job};
use crossbeam_channel::{select, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The channels and flags every worker shares.
#[derive(Clone)]
pub(crate) struct Worker {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) jobs: Receiver<Job>,
    pub(crate) due: Receiver<Job>,
    /// Set at the drain deadline: take no more jobs.
    pub(crate) abandon: Arc<AtomicBool>,
    /// Dropped when the worker exits; the server waits for all of them.
    pub(crate) _alive: Sender<()>,
}

/// Starts `n` workers named `cerbas-worker-1` … `cerbas-worker-n`.
pub(crate) fn start(n: usize, worker: Worker) -> std::io::Result<()> {
    for i in 1..=n {
        let w = worker.clone();
        std::thread::Builder::new()
            .name(format!("cerbas-worker-{i}"))
            .spawn(move || w.run())?;
    }
    Ok(())
}

impl Worker {
    fn run(self) {
        while !self.abandon.load(Ordering::SeqCst) {
            let job = select! {
                recv(self.jobs) -> job => job,
                recv(self.due) -> job => job,
            };
            match job {
                Ok(job) => self.dispatcher.handle(job),
                // The reader (or the timer) has stopped: nothing more will come.
                Err(_) => break,
            }
        }
    }
}
