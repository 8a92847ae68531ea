//! The shutdown signal every loop watches. Triggering it is one-way and idempotent;
//! it wakes every thread waiting on it at once (its channel disconnects), so loops
//! sleep with [`Shutdown::wait_timeout`] or `select!` on [`Shutdown::receiver`]
//! instead of `thread::sleep`. Not for: the order in which threads stop (that is
//! `server.rs`) or catching OS signals (that is `main.rs`).

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A cloneable handle: any clone can trigger, every clone sees it.
///
/// ```
/// let s = cerbas::Shutdown::new();
/// let s2 = s.clone();
/// assert!(!s.is_triggered());
/// s2.trigger();
/// assert!(s.wait_timeout(std::time::Duration::from_secs(5)));
/// ```
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    // Dropping the only sender disconnects `rx`, waking every receiver at once.
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Shutdown {
            inner: Arc::new(Inner {
                flag: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
                rx,
            }),
        }
    }

    /// Asks everything to stop. Safe to call from any thread, any number of times.
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
    }

    /// Whether [`Shutdown::trigger`] has been called.
    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`; returns early, with `true`, once shutdown is triggered.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        match self.inner.rx.recv_timeout(d) {
            Err(RecvTimeoutError::Disconnected) => true,
            _ => self.is_triggered(),
        }
    }

    /// Blocks until shutdown is triggered.
    pub fn wait(&self) {
        let _ = self.inner.rx.recv();
    }

    /// A receiver that becomes ready (disconnected) on shutdown, for `select!`.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.inner.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn wait_times_out_when_not_triggered() {
        let s = Shutdown::new();
        assert!(!s.wait_timeout(Duration::from_millis(1)));
    }

    #[test]
    fn trigger_wakes_a_waiting_thread() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            assert!(s2.wait_timeout(Duration::from_secs(30)));
            start.elapsed()
        });
        s.trigger();
        s.trigger();
        assert!(t.join().unwrap() < Duration::from_secs(30));
    }
}
