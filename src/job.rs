//! The data that travels between the server's threads, below all of them: a job
//! on its way from the reader (or the timer) to a worker and where its reply goes
//! ([`Job`], [`ReplyTo`]); what the workers ask of the publisher ([`Outgoing`],
//! [`Encoded`]), sent through an [`Outbox`] that counts what waits for it
//! ([`Backlog`]: the reader takes nothing while too much does); the request ids this instance holds until their acks are in Redis
//! ([`InHand`]: the reader adds, the publisher removes); the jobs handed over and
//! not yet answered ([`Unanswered`]: the reader counts up, the dispatcher down,
//! the stop waits for 0); the outcome of each cron run ([`CronRun`]: the
//! dispatcher sends, the cron thread records it in Redis); and the server's
//! counters ([`Stats`]). Each thread
//! depends on this module, not on another thread's. Not for: behaviour (the
//! threads own it) or the wire format (`protocol.rs`).

use crate::error::RequestError;
use crate::protocol::{CronTag, Reply, Request};
use crossbeam_channel::{SendError, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a job's reply goes.
#[derive(Clone, Debug)]
pub(crate) enum ReplyTo {
    /// Published on the request's channels by the publisher, which also acks it;
    /// `epoch` is that of its take ([`InHand::epoch`]).
    Redis { id: u64, epoch: u64 },
    /// A request from Redis whose client wants no reply (`"reply": false`): the
    /// publisher acks it and publishes nothing.
    RedisSilent { id: u64, epoch: u64 },
    /// Sent to an in-process caller (the HTTP plug through `caller.rs`; cron next).
    /// It gets the error as a type, not only as a message, so it can tell a
    /// refusal from a timeout (the HTTP status). The [`Claim`] lets the caller
    /// withdraw the job while no worker has taken it.
    Local(Sender<LocalReply>, Claim),
}

/// Who has a local call's job: a worker takes it before running it, or the
/// caller withdraws it when no worker took it in time (the call is then not
/// run at all). Whichever comes first wins; the other learns it lost.
#[derive(Clone, Debug, Default)]
pub(crate) struct Claim(Arc<AtomicU8>);

impl Claim {
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const WITHDRAWN: u8 = 2;

    /// A worker takes the job: false when the caller has withdrawn it.
    pub(crate) fn take(&self) -> bool {
        self.swap_from_waiting(Self::TAKEN)
    }

    /// The caller withdraws the job: false when a worker has taken it.
    pub(crate) fn withdraw(&self) -> bool {
        self.swap_from_waiting(Self::WITHDRAWN)
    }

    fn swap_from_waiting(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Self::WAITING, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// What an in-process caller gets: the function's reply (`None` for "no reply";
/// a function's own error is `Some(Reply::Error)`), or why the request was
/// refused or failed (bad request, access, timeout, panic). The reply message of
/// an `Err` is its `Display` text, as for a Redis client.
pub(crate) type LocalReply = Result<Option<Reply>, RequestError>;

impl ReplyTo {
    /// Where a reply goes when the client asked for none: nowhere, for a request
    /// from Redis (it is still acknowledged); an in-process caller always gets it.
    pub(crate) fn silenced(self) -> Self {
        match self {
            ReplyTo::Redis { id, epoch } => ReplyTo::RedisSilent { id, epoch },
            other => other,
        }
    }
}

/// One request on its way to a worker.
pub(crate) struct Job {
    pub(crate) reply_to: ReplyTo,
    pub(crate) body: Result<Request, RequestError>,
    /// Set once a delayed request has waited its delay.
    pub(crate) waited: bool,
}

/// A reply in both wire forms.
pub(crate) struct Encoded {
    pub(crate) json: Vec<u8>,
    pub(crate) msgpack: Vec<u8>,
}

impl Encoded {
    pub(crate) fn len(&self) -> usize {
        self.json.len() + self.msgpack.len()
    }
}

/// What the publisher is asked to do.
pub(crate) enum Outgoing {
    /// Publish (unless `encoded` is `None`: a "no reply", or a client that asked
    /// for none) and acknowledge request `id` (taken in `epoch`).
    Reply {
        id: u64,
        epoch: u64,
        encoded: Option<Encoded>,
    },
    /// Store request `id` in `P-DELAYED` with `body` (its request without the delay),
    /// due `delay_ms` from now, and release it from this instance.
    Delay {
        id: u64,
        epoch: u64,
        body: String,
        delay_ms: u64,
    },
    /// Flush everything before this, requeue what is still held, and stop.
    Finish,
}

impl Outgoing {
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Outgoing::Reply { encoded, .. } => encoded.as_ref().map_or(0, Encoded::len),
            Outgoing::Delay { body, .. } => body.len(),
            Outgoing::Finish => 0,
        }
    }
}

/// Most messages, and bytes, waiting for the publisher before the reader stops
/// taking requests.
const BACKLOG_COUNT: usize = 4096;
const BACKLOG_BYTES: usize = 8 << 20;

/// What waits for the publisher in its channel. The reader takes no more requests
/// while it is over [`BACKLOG_COUNT`] or [`BACKLOG_BYTES`], so when the publisher
/// falls behind (a slow Redis, a flood of replies nobody hears) requests wait in
/// Redis, not in this process's memory. (The channel itself stays unbounded: the
/// timer, which sends timeout replies, must never block.)
///
/// The publisher also sleeps here ([`Backlog::wait_more`]) rather than in the
/// channel: crossbeam's blocking receive spins and yields the CPU
/// (`sched_yield`) a few times before it sleeps, several system calls per reply
/// for a publisher that is idle between replies.
#[derive(Default)]
pub(crate) struct Backlog {
    load: Mutex<Load>,
    room: Condvar,
    more: Condvar,
}

#[derive(Default)]
struct Load {
    count: usize,
    bytes: usize,
    /// The publisher sleeps in [`Backlog::wait_more`]: only then is a wake sent.
    waiting: bool,
    /// How many wait in [`Backlog::wait_room`] (the reader): a wake, a system
    /// call, is sent only to someone waiting.
    short_of_room: usize,
}

impl Load {
    fn over(&self) -> bool {
        self.count > BACKLOG_COUNT || self.bytes > BACKLOG_BYTES
    }
}

impl Backlog {
    /// Counts one more message; says whether the publisher sleeps, to be woken
    /// ([`Backlog::wake`]) once the message is in the channel: woken before, it
    /// found the channel empty and waited in crossbeam's receive, which spins
    /// and yields the CPU; woken under this lock, it blocked on the lock at once.
    fn add(&self, bytes: usize) -> bool {
        match self.load.lock() {
            Ok(mut load) => {
                load.count += 1;
                load.bytes += bytes;
                std::mem::take(&mut load.waiting)
            }
            Err(_) => false,
        }
    }

    fn wake(&self) {
        self.more.notify_one();
    }

    pub(crate) fn taken(&self, count: usize, bytes: usize) {
        if let Ok(mut load) = self.load.lock() {
            load.count = load.count.saturating_sub(count);
            load.bytes = load.bytes.saturating_sub(bytes);
            if load.short_of_room > 0 && !load.over() {
                drop(load);
                self.room.notify_all();
            }
        }
    }

    /// Waits up to `timeout` for the backlog to be within its bounds; says whether
    /// it is.
    pub(crate) fn wait_room(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut load) = self.load.lock() else {
            return true;
        };
        while load.over() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            load.short_of_room += 1;
            load = match self.room.wait_timeout(load, left) {
                Ok((load, _)) => load,
                Err(_) => return true,
            };
            load.short_of_room -= 1;
        }
        true
    }

    /// Waits until something was sent that the publisher has not counted as
    /// [`taken`](Backlog::taken), or until `deadline`; says whether something was.
    /// It may still be on its way into the channel: it was counted just before.
    pub(crate) fn wait_more(&self, deadline: Instant) -> bool {
        let Ok(mut load) = self.load.lock() else {
            return true;
        };
        while load.count == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                load.waiting = false;
                return false;
            }
            load.waiting = true;
            load = match self.more.wait_timeout(load, left) {
                Ok((load, _)) => load,
                Err(_) => return true,
            };
        }
        load.waiting = false;
        true
    }
}

/// The sending end of the publisher's channel, counting what it sends into the
/// [`Backlog`].
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: Sender<Outgoing>,
    backlog: Arc<Backlog>,
}

impl Outbox {
    pub(crate) fn new(tx: Sender<Outgoing>, backlog: Arc<Backlog>) -> Self {
        Outbox { tx, backlog }
    }

    pub(crate) fn send(&self, msg: Outgoing) -> Result<(), SendError<Outgoing>> {
        // Counted first: the publisher takes what it receives off the count, and
        // must never take off what was not counted yet.
        let asleep = self.backlog.add(msg.bytes());
        let sent = self.tx.send(msg);
        if asleep {
            self.backlog.wake();
        }
        sent
    }
}

impl From<Sender<Outgoing>> for Outbox {
    /// An outbox with a backlog of its own (nobody waits on it), for tests.
    fn from(tx: Sender<Outgoing>) -> Self {
        Outbox::new(tx, Arc::default())
    }
}

/// The request ids this instance has taken and not yet acknowledged, each with
/// how many times it is held: the reader adds, the publisher removes once the ack
/// is in Redis. A count, not a set: the same id can be taken again before the ack
/// of its first take is removed (a `delay` request moved back by `MOVE_DUE`, a
/// duplicated queue entry), and that ack must not make the second take look lost.
///
/// It also knows which takes are orphans: ids held here that the processing list
/// no longer lists (Redis restarted without them, or another instance recovered
/// them). Their id may come back as another request (a restarted Redis hands out
/// its ids again) and be taken here again; an orphan's ack would then remove that
/// new take from the list and publish the old reply to the new caller. So each
/// take carries the epoch it was taken in ([`InHand::epoch`]), the reader records
/// the orphans it finds ([`InHand::orphaned`]), which closes the epoch, and the
/// publisher sends nothing for an orphan's reply ([`InHand::is_orphan`]).
#[derive(Clone, Default)]
pub(crate) struct InHand(Arc<Mutex<Takes>>);

#[derive(Default)]
struct Takes {
    counts: HashMap<u64, usize>,
    epoch: u64,
    /// Per orphaned id: the last epoch its orphans may have been taken in, and
    /// how many there are.
    orphans: HashMap<u64, (u64, usize)>,
}

impl InHand {
    pub(crate) fn add(&self, ids: impl IntoIterator<Item = u64>) {
        if let Ok(mut held) = self.0.lock() {
            for id in ids {
                *held.counts.entry(id).or_default() += 1;
            }
        }
    }

    pub(crate) fn remove(&self, ids: impl IntoIterator<Item = u64>) {
        if let Ok(mut held) = self.0.lock() {
            for id in ids {
                if let Some(n) = held.counts.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        held.counts.remove(&id);
                        // No take of it is left: nor is an orphan.
                        held.orphans.remove(&id);
                    }
                }
            }
        }
    }

    pub(crate) fn snapshot(&self) -> HashMap<u64, usize> {
        self.0.lock().map(|s| s.counts.clone()).unwrap_or_default()
    }

    /// The epoch of takes made now.
    pub(crate) fn epoch(&self) -> u64 {
        self.0.lock().map(|s| s.epoch).unwrap_or_default()
    }

    /// Records `ids` (with repeats) as orphans: held here, taken in this epoch
    /// or before, and no longer in the processing list. Ends the epoch, so later
    /// takes of the same ids are told apart. An id already recorded keeps its
    /// record. Returns how many it recorded.
    pub(crate) fn orphaned(&self, ids: impl IntoIterator<Item = u64>) -> usize {
        let mut recorded = 0;
        if let Ok(mut held) = self.0.lock() {
            let epoch = held.epoch;
            let mut found: HashMap<u64, usize> = HashMap::new();
            for id in ids {
                *found.entry(id).or_default() += 1;
            }
            for (id, n) in found {
                // Only what is still held: an ack that went through since the
                // reader's snapshot leaves nothing to tell apart.
                let n = n.min(held.counts.get(&id).copied().unwrap_or(0));
                if n > 0 && !held.orphans.contains_key(&id) {
                    held.orphans.insert(id, (epoch, n));
                    recorded += n;
                }
            }
            held.epoch += 1;
        }
        recorded
    }

    /// Whether the reply to `id`, taken in `epoch`, is an orphan's: then it is
    /// counted off, and no longer held (nothing is to be sent for it).
    pub(crate) fn is_orphan(&self, id: u64, epoch: u64) -> bool {
        let Ok(mut held) = self.0.lock() else {
            return false;
        };
        let orphan = match held.orphans.get_mut(&id) {
            Some((last, n)) if epoch <= *last && *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if orphan {
            drop(held);
            self.remove([id]);
        }
        orphan
    }
}

/// Requests from Redis handed to the workers and not yet answered: the reader
/// counts one up before it hands a job over, the dispatcher counts it down when
/// the job's reply (or its delay) goes to the publisher. A graceful stop waits for
/// this to reach 0, not for worker threads: a worker stuck in a call whose caller
/// already has `timeout` holds nothing.
#[derive(Clone, Default)]
pub(crate) struct Unanswered(Arc<AtomicI64>);

impl Unanswered {
    pub(crate) fn add(&self, n: usize) {
        self.0.fetch_add(n as i64, Ordering::SeqCst);
    }

    pub(crate) fn done(&self, n: usize) {
        self.0.fetch_sub(n as i64, Ordering::SeqCst);
    }

    /// How many jobs handed over are not answered yet (for the dashboard).
    pub(crate) fn count(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Whether every job handed over has been answered.
    pub(crate) fn is_zero(&self) -> bool {
        self.0.load(Ordering::SeqCst) <= 0
    }
}

/// Whether this instance takes requests. The dashboard pauses an instance by
/// writing `P-PAUSED-{instance}` in Redis; the scheduler reads it with each
/// heartbeat and sets this (this instance's own dashboard sets it at once too).
/// While it is set the reader takes nothing new (what it holds is still served)
/// and the queue keeps filling for the other instances.
#[derive(Clone, Default)]
pub(crate) struct Paused(Arc<std::sync::atomic::AtomicBool>);

impl Paused {
    pub(crate) fn set(&self, paused: bool) {
        self.0.store(paused, Ordering::Relaxed);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// This instance's CRONTAB entries and their next ticks, as the cron thread last
/// saw them: the dashboard shows them and runs one now on demand.
#[derive(Clone, Default)]
pub(crate) struct CronTable(Arc<Mutex<Vec<CronLine>>>);

/// A CRONTAB entry and its next tick (unix seconds; `None`: never again).
pub(crate) type CronLine = (crate::cron::Entry, Option<i64>);

impl CronTable {
    /// Replaces what is shown (the cron thread, after a reload or a claim).
    pub(crate) fn set(&self, entries: Vec<CronLine>) {
        if let Ok(mut t) = self.0.lock() {
            *t = entries;
        }
    }

    /// The entries and their next ticks (unix seconds).
    pub(crate) fn get(&self) -> Vec<CronLine> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// How a cron run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The function answered a value (or "no reply").
    Ok,
    /// An error reply: the function's message, or why the request was refused.
    Error(String),
    /// The function ran past its deadline.
    Timeout,
}

/// The outcome of one cron run, from the dispatcher (a worker, or the timer at a
/// deadline) to the cron thread, which records it for the entry in Redis.
#[derive(Debug, Clone)]
pub(crate) struct CronRun {
    pub(crate) tag: CronTag,
    pub(crate) func: String,
    pub(crate) outcome: Outcome,
    /// When it ended, in ms since the epoch.
    pub(crate) at_ms: i64,
    /// From the worker taking it to its answer.
    pub(crate) duration: Duration,
}

/// Now, in ms since the epoch (as [`CronRun::at_ms`] counts).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counters of what the server did, for logs and (later) metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests that reached a worker (a delayed request twice: when it was read,
    /// and again when it came due).
    pub requests: AtomicU64,
    /// Requests put off by their `delay`.
    pub delayed: AtomicU64,
    /// Replies with `status: ok`.
    pub ok: AtomicU64,
    /// Replies with `status: error` (timeouts included).
    pub errors: AtomicU64,
    /// Calls that ran past their deadline.
    pub timeouts: AtomicU64,
    /// Calls that panicked.
    pub panics: AtomicU64,
    /// Queue entries that were not request ids.
    pub bad_entries: AtomicU64,
    /// Replies served from the result cache.
    pub cache_hits: AtomicU64,
    /// Replies held for late subscribers that were dropped because
    /// `republish_max_bytes` was reached (the oldest go first).
    pub replies_dropped: AtomicU64,
    /// The Prometheus metrics (`/metrics`), beside these counters so that every
    /// thread that counts can reach them.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Error replies not yet written to Redis for the dashboard (at most 100; the
    /// scheduler writes them with the snapshot).
    pub(crate) recent_errors: crate::dashboard::errors::Recent,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the publisher sleeps in [`Backlog::wait_more`].
    fn asleep(backlog: &Backlog) -> bool {
        backlog.load.lock().is_ok_and(|l| l.waiting)
    }

    /// The publisher, asleep on the count, is woken only once the message is in
    /// the channel: what it then receives without waiting is there. (A waiter
    /// that comes between the count and the send does not sleep, and may find
    /// the message still on its way, as `wait_more` says: the test sent at
    /// random and asserted a `try_recv` there too, and failed in about one run
    /// of ten, at `make test`.)
    #[test]
    fn a_sleeping_publisher_is_woken_with_the_message_already_in_the_channel() {
        let backlog = Arc::new(Backlog::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let outbox = Outbox::new(tx, backlog.clone());
        for round in 0..1000 {
            // Sent while the waiter sleeps in half the rounds, before it looks
            // in the others.
            let sleeping = round % 2 == 0;
            if !sleeping {
                outbox.send(Outgoing::Finish).expect("the channel is open");
            }
            let waiter = {
                let backlog = backlog.clone();
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let woke = backlog.wait_more(Instant::now() + Duration::from_secs(10));
                    let got = rx.try_recv().is_ok();
                    backlog.taken(usize::from(got), 0);
                    (woke, got)
                })
            };
            if sleeping {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !asleep(&backlog) {
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: the waiter sleeps"
                    );
                    std::thread::yield_now();
                }
                outbox.send(Outgoing::Finish).expect("the channel is open");
            }
            let (woke, got) = waiter.join().expect("the waiter returns");
            assert!(woke, "round {round}: woken by the send");
            assert!(got, "round {round}: the message was there when it woke");
        }
        assert!(backlog.wait_room(Duration::ZERO), "all taken off the count");
    }
}
