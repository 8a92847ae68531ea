//! The worker pool: a fixed number of named threads, each taking one job at a time
//! from the hand-off (`handoff.rs`: the reader's jobs, and due jobs from the timer
//! and the HTTP plug) and running it through the dispatcher. A panicking function
//! does not kill its worker (the dispatcher catches it). A call past its deadline
//! keeps its thread (threads cannot be killed), so the pool's supervisor thread
//! starts a replacement when asked (`dispatch::Hung`), and the stuck worker retires
//! when its call returns: the pool keeps its width. (A replacement says it is free
//! at once only if the hung call came from the reader: otherwise the hung worker's
//! "free" still stands.) A worker says on `ready` when it is free to start a job
//! from the reader (once when it starts, and after each such job), so the reader
//! takes from Redis only what the pool can start now. Workers exit when the reader
//! has gone and its lane is empty, or when the drain deadline has passed.
//! Not for: deadlines (the timer) or replies (the publisher).

use crate::dispatch::{AfterCall, Dispatcher};
use crate::shutdown::Shutdown;
use crossbeam_channel::{select, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The channels and flags every worker shares.
#[derive(Clone)]
pub(crate) struct Worker {
    pub(crate) dispatcher: Arc<Dispatcher>,
    /// Jobs from the reader and due jobs (the timer, the HTTP plug).
    pub(crate) jobs: crate::handoff::Jobs,
    /// One message each time this worker is free for a job from `jobs`.
    pub(crate) ready: Sender<()>,
    /// Set at the drain deadline: take no more jobs.
    pub(crate) abandon: Arc<AtomicBool>,
}

/// Starts `n` workers named `cerbas-worker-1` … `cerbas-worker-n`, and the
/// supervisor that starts one more for each message on `replace` until shutdown
/// (saying it is free at once if the message says so, `dispatch::Hung`).
pub(crate) fn start(
    n: usize,
    worker: Worker,
    replace: Receiver<bool>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    for i in 1..=n {
        spawn(i, worker.clone(), true)?;
    }
    std::thread::Builder::new()
        .name("cerbas-pool".into())
        .spawn(move || {
            let mut next = n + 1;
            loop {
                select! {
                    recv(replace) -> msg => {
                        let Ok(announce) = msg else {
                            return;
                        };
                        if let Err(e) = spawn(next, worker.clone(), announce) {
                            log::warn!("cannot start a replacement worker: {e}");
                        }
                        next += 1;
                    }
                    recv(shutdown.receiver()) -> _ => return,
                }
            }
        })?;
    Ok(())
}

fn spawn(i: usize, w: Worker, announce: bool) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("cerbas-worker-{i}"))
        .spawn(move || w.run(announce))
        .map(|_| ())
}

impl Worker {
    /// `announce`: whether to say at once that it is free (not for a
    /// replacement whose hung predecessor's "free" still stands).
    fn run(self, announce: bool) {
        // A delayed job from the timer was not counted by the reader: after one,
        // this worker's last "free" still stands, so it is not said again.
        let mut announce = announce;
        while !self.abandon.load(Ordering::SeqCst) {
            if announce {
                let _ = self.ready.send(());
            }
            match self.jobs.recv() {
                Some((job, from_reader)) => {
                    announce = from_reader;
                    // A replacement took this worker's place while its call ran
                    // past the deadline (the dispatcher has counted it back).
                    if self.dispatcher.handle(job, from_reader) == AfterCall::Retire {
                        return;
                    }
                }
                // The reader (or the timer) has stopped: nothing more will come
                // from it. Local calls (HTTP) already handed over on `due` are
                // still served, so their callers are not left waiting for the
                // drain deadline.
                None => {
                    while let Some(job) = self.jobs.try_recv_due() {
                        if self.dispatcher.handle(job, false) == AfterCall::Retire {
                            return;
                        }
                    }
                    break;
                }
            }
        }
    }
}
