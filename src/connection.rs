//! Redis connections: opening them with timeouts, re-opening them with capped
//! back-off when they break (logging once when an outage starts and once when it
//! ends), telling a lost connection from a command Redis refused (MISCONF, OOM, a
//! wrong-typed key: the connection stays, the thread backs off and logs the spell
//! once), the start-up check that tells a Redis that is away (wait) from one that
//! can never serve the configuration (stop), and the small pool that lends
//! connections to users' functions, checking one that may have broken while it
//! waited before lending it.
//! Not for: what is sent on them (each thread owns its own commands).

use crate::error::{Error, FnError};
use crate::shutdown::Shutdown;

use redis::{Client, Connection, ErrorKind, RedisError};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How many answers redis-rs reads, each with the connect timeout, while it sets
/// up a connection: `SELECT` (a db other than 0) and two `CLIENT SETINFO` (a
/// password adds an `AUTH`: a call may then be a third of its time left late).
const SETUP_ANSWERS: u32 = 3;
/// Read timeout of the connections lent to functions.
const POOL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection whose reads give up after `read_timeout`.
pub fn open(client: &Client, read_timeout: Duration) -> Result<Connection, RedisError> {
    open_within(client, CONNECT_TIMEOUT, read_timeout)
}

/// As [`open`], giving up on connecting after `connect_timeout`, and on each of
/// Redis's answers to the set-up commands after as long again (redis-rs reads
/// every answer of its set-up pipeline, each with that timeout: see
/// [`SETUP_ANSWERS`]).
fn open_within(
    client: &Client,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<Connection, RedisError> {
    let conn = client.get_connection_with_timeout(connect_timeout)?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(read_timeout))?;
    Ok(conn)
}

/// Whether `e` means the connection is gone or out of step with Redis (an I/O
/// error, a timeout: redis-rs then skips the next reply, DESIGN §8; a reply it
/// could not parse), so it must be replaced. An error Redis answered with
/// (`MISCONF`, `OOM`, `WRONGTYPE`, `LOADING`, a script error) leaves the connection
/// in step and fit for the next command: reconnecting would not help.
pub(crate) fn is_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.kind() == ErrorKind::Parse
}

/// Sends `pipe` in one write and reads its answers one at a time, each as its
/// own result (an error Redis answered is that command's), giving up at the first
/// that shows the connection lost. A pipeline's own `query` reads every answer
/// even after a timeout, each with its own read timeout: a stalled Redis held a
/// thread for one read timeout per command.
pub(crate) fn query_each(c: &mut Connection, pipe: &redis::Pipeline) -> Answers {
    c.send_packed_command(&pipe.get_packed_pipeline())?;
    recv_each(c, pipe.len())
}

/// As [`query_each`], for commands packed by hand (`resp::Packed`).
pub(crate) fn query_packed(c: &mut Connection, packed: &crate::resp::Packed) -> Answers {
    c.send_packed_command(packed.bytes())?;
    recv_each(c, packed.len())
}

/// Each command's answer, or the error that lost the connection.
pub(crate) type Answers = Result<Vec<Result<redis::Value, RedisError>>, RedisError>;

fn recv_each(c: &mut Connection, n: usize) -> Answers {
    let mut answers = Vec::with_capacity(n);
    while answers.len() < n {
        match c.recv_response().and_then(redis::Value::extract_error) {
            Err(e) if is_lost(&e) => return Err(e),
            // RESP3 out-of-band data is no answer.
            Ok(redis::Value::Push { .. }) => {}
            answer => answers.push(answer),
        }
    }
    Ok(answers)
}

/// What a thread should do after a command failed (see [`Connector::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection is lost: drop it; [`Connector::connect`] opens another.
    Lost,
    /// Redis refused the command: keep the connection and wait this long first.
    Refused(Duration),
}

/// Keeps one thread connected: [`Connector::connect`] retries with capped back-off
/// until it succeeds or shutdown is triggered. It also paces the retries of
/// commands Redis refuses ([`Connector::refused`], [`Connector::recovered`]), so a
/// lasting refusal costs one log line and a few commands a second, not a
/// reconnect and a log line per try.
pub(crate) struct Connector {
    client: Client,
    who: &'static str,
    read_timeout: Duration,
    down_since: Option<Instant>,
    refused_since: Option<Instant>,
    refused_pause: Duration,
}

impl Connector {
    pub(crate) fn new(client: Client, who: &'static str, read_timeout: Duration) -> Self {
        Connector {
            client,
            who,
            read_timeout,
            down_since: None,
            refused_since: None,
            refused_pause: FIRST_BACKOFF,
        }
    }

    /// Sorts out a failed command: a lost connection is recorded as
    /// [`Connector::broken`], a refusal as [`Connector::refused`].
    pub(crate) fn failed(&mut self, e: &RedisError) -> Failure {
        if is_lost(e) {
            self.broken(e);
            Failure::Lost
        } else {
            Failure::Refused(self.refused(e))
        }
    }

    /// Records that Redis answered a command with an error while the connection
    /// stays fine; logs only when such a spell starts. Returns how long to wait
    /// before trying again: 50 ms, doubling to 2 s while the refusals last.
    pub(crate) fn refused(&mut self, e: &RedisError) -> Duration {
        if self.refused_since.is_none() {
            log::warn!(
                "{}: redis refuses a command, retrying with back-off: {e}",
                self.who
            );
            self.refused_since = Some(Instant::now());
        }
        let pause = self.refused_pause;
        self.refused_pause = (pause * 2).min(MAX_BACKOFF);
        pause
    }

    /// Records that commands go through: ends a spell of refusals (logged once)
    /// and resets their back-off. Cheap enough to call after every success.
    pub(crate) fn recovered(&mut self) {
        if let Some(since) = self.refused_since.take() {
            log::warn!(
                "{}: redis accepts commands again after {:.1}s",
                self.who,
                since.elapsed().as_secs_f64()
            );
        }
        self.refused_pause = FIRST_BACKOFF;
    }

    /// A live connection, or `None` once shutdown is triggered while Redis is away.
    pub(crate) fn connect(&mut self, shutdown: &Shutdown) -> Option<Connection> {
        self.connect_until(shutdown, None)
    }

    /// As [`Connector::connect`], giving up at `deadline` too.
    pub(crate) fn connect_until(
        &mut self,
        shutdown: &Shutdown,
        deadline: Option<Instant>,
    ) -> Option<Connection> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match open(&self.client, self.read_timeout) {
                Ok(conn) => {
                    self.connected();
                    return Some(conn);
                }
                Err(e) => self.broken(&e),
            }
            let past_deadline = deadline.is_some_and(|d| Instant::now() + backoff > d);
            if past_deadline || shutdown.wait_timeout(backoff) {
                return None;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Records that a connection is up; logs when that ends an outage.
    fn connected(&mut self) {
        if let Some(since) = self.down_since.take() {
            log::warn!(
                "{}: redis is back after {:.1}s",
                self.who,
                since.elapsed().as_secs_f64()
            );
        }
    }

    /// Records that the connection broke; logs only at the start of an outage.
    pub(crate) fn broken(&mut self, e: &RedisError) {
        LOSSES.fetch_add(1, Ordering::Relaxed);
        if self.down_since.is_none() {
            log::warn!("{}: redis unavailable, retrying: {e}", self.who);
            self.down_since = Some(Instant::now());
        }
    }
}

/// Which run of Redis `c` talks to (`run_id` of `INFO server`, new at each
/// restart), or `None` if Redis does not say (an ACL without `INFO`, a renamed
/// `INFO`). An error when the connection is lost on the way ([`is_lost`]) or
/// Redis refuses for a while ([`refuses_for_now`]): that says nothing of which
/// Redis it was, and taking it for "would not say" made a killed connection, or
/// a script past `busy-reply-threshold`, look like a restart.
pub(crate) fn run_id(c: &mut Connection) -> Result<Option<String>, RedisError> {
    match redis::cmd("INFO").arg("server").query::<String>(c) {
        Ok(info) => Ok(parse_run_id(&info)),
        Err(e) if is_lost(&e) || refuses_for_now(&e) => Err(e),
        Err(_) => Ok(None),
    }
}

/// Whether Redis answered `e` to a command it will take once a passing state
/// ends: a script or function past `busy-reply-threshold` (`BUSY`), a dump
/// being loaded, a replica whose master is down, a cluster in flux. Any other
/// refusal is taken as lasting, so a thread that must decide is not stuck
/// waiting for an answer that never comes.
pub(crate) fn refuses_for_now(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("BUSY" | "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN")
    )
}

fn parse_run_id(info: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// The oldest Redis that has every command the server sends (`BLMOVE`, `LMOVE`).
pub const MIN_REDIS_VERSION: (u32, u32) = (6, 2);

/// At start-up: waits until Redis answers (retrying what can heal, as a refused
/// connection), then checks that it can ever serve this configuration. An error
/// for what waiting will not mend: a db it does not have, a password it refuses or
/// requires, a version older than [`MIN_REDIS_VERSION`]. `Ok(false)` when shutdown
/// came first.
pub(crate) fn check_at_start(client: &Client, db: i64, shutdown: &Shutdown) -> Result<bool, Error> {
    let mut connector = Connector::new(client.clone(), "start-up", CONNECT_TIMEOUT);
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Connecting (with its AUTH and SELECT) tells what can never work; the
        // version is read with INFO, which an operator may have renamed away or
        // denied by ACL: then it is not known, and the server goes on.
        let checked = open(client, CONNECT_TIMEOUT).and_then(|mut c| {
            match redis::cmd("INFO").arg("server").query::<String>(&mut c) {
                Ok(info) => Ok(redis_version(&info).ok_or("no redis_version line".into())),
                Err(e) if is_lost(&e) => Err(e),
                Err(e) => Ok(Err(e.to_string())),
            }
        });
        match checked {
            Ok(Ok(v)) if v < MIN_REDIS_VERSION => {
                return Err(Error::Unusable(format!(
                    "Redis {}.{} is too old: cerbas needs {}.{} or later (BLMOVE, LMOVE)",
                    v.0, v.1, MIN_REDIS_VERSION.0, MIN_REDIS_VERSION.1
                )))
            }
            Ok(v) => {
                if let Err(why) = v {
                    log::warn!(
                        "could not read the Redis version ({why}); going on: cerbas needs {}.{} or later",
                        MIN_REDIS_VERSION.0,
                        MIN_REDIS_VERSION.1
                    );
                }
                connector.connected();
                return Ok(true);
            }
            Err(e) => match never_heals(&e, db) {
                Some(why) => return Err(Error::Unusable(why)),
                None => connector.broken(&e),
            },
        }
        if shutdown.wait_timeout(backoff) {
            return Ok(false);
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `(major, minor)` from the `redis_version:` line of `INFO server`.
fn redis_version(info: &str) -> Option<(u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Why `e`, met while connecting, will recur on every try; `None` when it may
/// heal (refused, reset, timed out, loading, ...).
fn never_heals(e: &RedisError, db: i64) -> Option<String> {
    let text = e.to_string();
    let code = e.code().unwrap_or("");
    if e.kind() == ErrorKind::AuthenticationFailed || code == "WRONGPASS" {
        Some(
            "Redis refused the password in redis_url (a wrong password, or a password \
             given to a Redis that has none)"
                .into(),
        )
    } else if code == "NOAUTH"
        || text.contains("NOAUTH")
        || text.contains("Authentication required")
    {
        Some("Redis requires a password: put it in redis_url (redis://:PASSWORD@host:port)".into())
    } else if text.contains("refused to switch database") {
        Some(format!(
            "Redis refused to select db {db}: {}",
            e.detail().unwrap_or("out of range")
        ))
    } else if e.kind() == ErrorKind::InvalidClientConfig || code == "NOPERM" {
        Some(text)
    } else {
        None
    }
}

/// How many times a thread of this process found its connection lost, or failed
/// to open one. A pooled connection that came back to the pool before the latest
/// loss may be broken too (a Redis restart breaks them all at once), so it is
/// checked before it is lent. The server's own threads notice a restart first:
/// the reader and the scheduler talk to Redis all the time.
static LOSSES: AtomicU64 = AtomicU64::new(0);

/// Redis connection losses this process has seen (each is followed by a
/// reconnect); for `/metrics`.
pub(crate) fn losses() -> u64 {
    LOSSES.load(Ordering::Relaxed)
}

/// A pooled connection idle this long is checked before it is lent even when no
/// loss was seen: Redis may have closed it alone (its `timeout`, `CLIENT KILL`).
const CHECK_IDLE: Duration = Duration::from_secs(1);

/// A connection waiting in the pool.
struct Idle {
    conn: Connection,
    since: Instant,
    /// [`LOSSES`] when it came back.
    losses: u64,
    /// Its last loan lasted [`CHECK_IDLE`] or more.
    long_loan: bool,
}

impl Idle {
    fn new(conn: Connection, loan: Duration) -> Self {
        Idle {
            conn,
            since: Instant::now(),
            losses: LOSSES.load(Ordering::Relaxed),
            long_loan: loan >= CHECK_IDLE,
        }
    }

    /// Whether it may have broken while it waited (a loss was seen since, or it
    /// waited long) or in a long loan: then it is checked with a `PING` before it
    /// is lent. A busy pool of short calls lends without the round trip. A loan
    /// that long may have ended in a read timeout: behind `CLIENT REPLY OFF`
    /// left by an earlier borrower, every later borrower's command timed out in
    /// turn, and only the check closes it (no `PONG` comes).
    fn suspect(&self) -> bool {
        self.long_loan
            || self.losses != LOSSES.load(Ordering::Relaxed)
            || self.since.elapsed() >= CHECK_IDLE
    }
}

/// A pool of connections for users' functions, each opened on first use; an open
/// one is lent before a new one is opened, so as many are open as were used at
/// once (the default size is the default worker count: a function never waits
/// for another's connection). A connection waiting in the pool can break without
/// anyone noticing (a Redis restart closes it): one that may have broken while it
/// waited (see `Idle::suspect`) is checked with a `PING` before it is lent, and a
/// broken one is replaced, so a Redis restart does not fail one call per pooled
/// connection. (One closed while it was in use less than a second ago, `CHECK_IDLE`,
/// still fails a call.)
///
/// Callers waiting for a connection sleep on a condition variable: a crossbeam
/// channel of slots spun and yielded the CPU (`sched_yield`) in every waiting
/// receive, and at W3 (100 workers, 8 connections, one `INCR` each) that was a
/// quarter of the server's CPU.
#[derive(Clone)]
pub struct ConnectionPool {
    client: Client,
    slots: Arc<Slots>,
}

/// The pool's slots: each a token, `None` meaning "may open a new connection".
/// Generic over what an open slot holds so its bookkeeping is tested without
/// Redis (the pool's is [`Idle`]).
struct Slots<T = Idle> {
    free: Mutex<Free<T>>,
    returned: Condvar,
}

struct Free<T> {
    /// Open connections waiting, the last returned at the back (lent first).
    idle: Vec<T>,
    /// Slots with no connection (never opened, or theirs broke or was closed).
    unopened: usize,
    /// Slots with a connection: waiting in `idle`, or lent.
    open: usize,
    /// Callers asleep on `returned`: a wake, a system call, only for them.
    waiting: usize,
    /// Of `waiting`, those Redis refused a new connection: they wait for an open
    /// one only, so a slot given back unopened wakes every waiter (one of those
    /// woken alone would leave it unused).
    waiting_open: usize,
}

impl<T> Free<T> {
    /// Slots free to lend.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.len() + self.unopened
    }
}

impl<T> Slots<T> {
    fn new(size: usize) -> Self {
        Slots {
            free: Mutex::new(Free {
                idle: Vec::new(),
                unopened: size,
                open: 0,
                waiting: 0,
                waiting_open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Free<T>> {
        // Each change under the lock is one push, pop or count.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts back a slot as it was taken (an open one with its connection),
    /// waking a caller that waits for it.
    fn put(&self, slot: Option<T>) {
        let mut free = self.lock();
        let all = match slot {
            Some(idle) => {
                free.idle.push(idle);
                false
            }
            None => {
                free.unopened += 1;
                free.waiting_open > 0
            }
        };
        self.wake(free, all);
    }

    /// A slot taken unopened now holds a connection.
    fn opened(&self) {
        self.lock().open += 1;
    }

    /// A slot taken open lost its connection (closed or broken): it is free to
    /// open again. Waiters for an open connection give up once none is left.
    fn closed(&self) {
        let mut free = self.lock();
        free.open -= 1;
        free.unopened += 1;
        let all = free.waiting_open > 0;
        self.wake(free, all);
    }

    /// Gives back a slot held without a connection: `closed` if it was taken
    /// open (its connection failed the check), else `put` unopened.
    fn release(&self, was_open: bool) {
        match was_open {
            true => self.closed(),
            false => self.put(None),
        }
    }

    fn wake(&self, free: MutexGuard<'_, Free<T>>, all: bool) {
        let wake = free.waiting > 0;
        drop(free);
        match (wake, all) {
            (false, _) => {}
            (true, false) => self.returned.notify_one(),
            (true, true) => self.returned.notify_all(),
        }
    }

    /// A slot, waiting for one until `deadline`. Without `may_open`, only an open
    /// one (`Some`): `None` at once when the pool has none open, lent or idle.
    fn take(&self, deadline: Instant, may_open: bool) -> Option<Option<T>> {
        let mut free = self.lock();
        loop {
            // An open connection before a new one, so a pool as wide as the
            // workers opens only as many as are used at once. The last returned
            // first: a light load after a burst keeps reusing the few it needs,
            // each idle less than `CHECK_IDLE`, and lends without a `PING`. (The
            // longest idle first cycled through all the burst had opened, each
            // idle past `CHECK_IDLE`: a `PING` before every call.)
            if let Some(idle) = free.idle.pop() {
                return Some(Some(idle));
            }
            if !may_open && free.open == 0 {
                return None;
            }
            if may_open && free.unopened > 0 {
                free.unopened -= 1;
                return Some(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            free.waiting += 1;
            free.waiting_open += usize::from(!may_open);
            free = self
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            free.waiting -= 1;
            free.waiting_open -= usize::from(!may_open);
        }
    }
}

impl ConnectionPool {
    /// A pool of at most `size` connections to `client`.
    pub fn new(client: Client, size: usize) -> Self {
        ConnectionPool {
            client,
            slots: Arc::new(Slots::new(size)),
        }
    }

    /// Borrows a connection, waiting for one (and for Redis, to check or open it)
    /// until `deadline`. It returns to the pool when dropped, unless it broke or
    /// its thread is panicking. When Redis refuses a new connection (`maxclients`,
    /// down) while the pool has others open, the caller waits for one of those
    /// until its deadline instead of failing at once: a pool as wide as the
    /// workers may want more connections than Redis lets it open.
    pub fn get(&self, deadline: Instant) -> Result<PooledConnection, FnError> {
        let late = || FnError::from("no Redis connection free before the deadline");
        // Why Redis refused this caller a new connection: it then opens no other.
        let mut refused: Option<FnError> = None;
        loop {
            let Some(slot) = self.slots.take(deadline, refused.is_none()) else {
                return Err(refused.unwrap_or_else(late));
            };
            let was_open = slot.is_some();
            let checked = match slot {
                Some(idle) if !idle.suspect() => Some(idle.conn),
                // The check and the open below wait on Redis at most until the
                // deadline: a stalled Redis (SIGSTOP) held callers for a whole
                // read timeout past it.
                slot => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.slots.put(slot);
                        return Err(refused.unwrap_or_else(late));
                    }
                    slot.and_then(|idle| checked(idle.conn, left))
                }
            };
            if let Some(conn) = checked {
                return Ok(self.lend(conn));
            }
            // Unopened, or broken (dropped here): open a fresh one, once.
            if refused.is_some() {
                self.slots.release(was_open);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let opened = match left.is_zero() {
                true => Err(late()),
                false => {
                    // Each of the set-up's answers may take its whole timeout.
                    open_within(
                        &self.client,
                        CONNECT_TIMEOUT.min(left / SETUP_ANSWERS),
                        POOL_READ_TIMEOUT,
                    )
                    .map_err(FnError::no_connection)
                }
            };
            match opened {
                Ok(conn) => {
                    if !was_open {
                        self.slots.opened();
                    }
                    return Ok(self.lend(conn));
                }
                Err(e) => {
                    self.slots.release(was_open);
                    refused = Some(e);
                }
            }
        }
    }

    fn lend(&self, conn: Connection) -> PooledConnection {
        PooledConnection {
            conn: Some(conn),
            home: self.slots.clone(),
            lent: Instant::now(),
        }
    }
}

/// `conn`, if it still reaches Redis within `within` (its read timeout is then
/// set back to the pool's).
fn checked(mut conn: Connection, within: Duration) -> Option<Connection> {
    conn.set_read_timeout(Some(within)).ok()?;
    let fit = alive(&mut conn) && conn.set_read_timeout(Some(POOL_READ_TIMEOUT)).is_ok();
    fit.then_some(conn)
}

/// `conn` with the pool's timeouts again, whatever its borrower set (two system
/// calls a loan): the next borrower's commands wait as long as anyone's, and a
/// command a short timeout cut short is skipped by redis-rs (it reads and drops
/// that late answer before the next) instead of failing the next borrower too.
/// `None` if the socket refuses (it is then closed).
fn reset(conn: Connection) -> Option<Connection> {
    conn.set_read_timeout(Some(POOL_READ_TIMEOUT)).ok()?;
    conn.set_write_timeout(Some(POOL_READ_TIMEOUT)).ok()?;
    Some(conn)
}

/// Whether `conn` still reaches Redis, in the state a borrower expects. A refusal
/// (`LOADING`, say) counts as alive: the connection is in step, and the function
/// will get Redis's own answer. Any answer but `PONG` means an earlier borrower
/// left it changed (`QUEUED`: inside `MULTI`; an array: subscribed), and no
/// answer in time may mean `CLIENT REPLY OFF`: each is closed, not lent on.
fn alive(conn: &mut Connection) -> bool {
    match redis::cmd("PING").query::<redis::Value>(conn) {
        Ok(redis::Value::SimpleString(pong)) => pong == "PONG",
        Ok(_) => false,
        Err(e) => !is_lost(&e),
    }
}

/// A connection borrowed from a [`ConnectionPool`]; use it as a `redis::Connection`.
pub struct PooledConnection {
    conn: Option<Connection>,
    home: Arc<Slots>,
    lent: Instant,
}

impl Deref for PooledConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // Only `drop` takes it out.
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        // Only here is it taken out: its slot counts as open until now.
        let Some(c) = self.conn.take() else {
            return;
        };
        let idle = if std::thread::panicking() {
            // A borrower that panicked may have left it in any state (inside
            // `MULTI`, subscribed, another db selected): the next borrower's
            // commands would be queued or run elsewhere. It is closed; the slot
            // opens a fresh one.
            None
        } else if redis::ConnectionLike::is_open(&c) {
            reset(c).map(|c| Idle::new(c, self.lent.elapsed()))
        } else {
            // It broke in a function's hands: the others may have too.
            LOSSES.fetch_add(1, Ordering::Relaxed);
            None
        };
        match idle {
            Some(idle) => self.home.put(Some(idle)),
            None => self.home.closed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_waits_for_a_returned_slot_and_gives_up_at_its_deadline() {
        let slots = slots(1);
        let first = slots.take(Instant::now(), true).expect("a free slot");
        assert!(first.is_none(), "an unopened slot");
        let t0 = Instant::now();
        assert!(
            slots.take(t0 + Duration::from_millis(50), true).is_none(),
            "none free"
        );
        assert!(t0.elapsed() >= Duration::from_millis(50), "waited its time");
        let waiter = {
            let slots = slots.clone();
            std::thread::spawn(move || slots.take(Instant::now() + Duration::from_secs(10), true))
        };
        while slots.lock().waiting == 0 {
            std::thread::yield_now();
        }
        slots.put(None);
        let got = waiter.join().expect("the waiter returns");
        assert!(
            got.is_some(),
            "woken by the return, long before its deadline"
        );
        assert_eq!(slots.lock().waiting, 0);
    }

    /// Slots whose open connections are numbers.
    fn slots(n: usize) -> Arc<Slots<u32>> {
        Arc::new(Slots::new(n))
    }

    /// Waits until `n` callers sleep in `take`.
    fn until_waiting(slots: &Slots<u32>, n: usize) {
        while slots.lock().waiting < n {
            std::thread::yield_now();
        }
    }

    /// Open connections are lent before unopened slots, the one returned last
    /// first; an unopened slot is lent only when no open one waits.
    #[test]
    fn the_connection_returned_last_is_lent_first_and_unopened_slots_after() {
        let slots = slots(3);
        let now = Instant::now;
        for _ in 0..2 {
            assert_eq!(slots.take(now(), true), Some(None), "unopened at first");
            slots.opened();
        }
        slots.put(Some(1));
        slots.put(Some(2));
        assert_eq!(slots.take(now(), true), Some(Some(2)));
        assert_eq!(slots.take(now(), true), Some(Some(1)));
        assert_eq!(slots.take(now(), true), Some(None));
        assert_eq!(slots.take(now(), true), None, "all three lent");
        let free = slots.lock();
        assert_eq!((free.len(), free.open), (0, 2));
    }

    /// A caller Redis refused a new connection waits for an open one (another
    /// caller's, returned) instead of failing; with none open it fails at once.
    #[test]
    fn a_refused_caller_waits_for_an_open_connection_and_only_if_one_exists() {
        let slots = slots(2);
        let t0 = Instant::now();
        assert_eq!(
            slots.take(t0 + Duration::from_secs(5), false),
            None,
            "nothing open to wait for"
        );
        assert!(t0.elapsed() < Duration::from_secs(1), "failed at once");
        assert_eq!(slots.take(Instant::now(), true), Some(None));
        slots.opened();
        let waiter = {
            let slots = slots.clone();
            std::thread::spawn(move || slots.take(Instant::now() + Duration::from_secs(5), false))
        };
        until_waiting(&slots, 1);
        // An unopened slot does not satisfy it (the other slot is still free).
        slots.put(Some(7));
        assert_eq!(waiter.join().expect("the waiter"), Some(Some(7)));
        let free = slots.lock();
        assert_eq!((free.unopened, free.open, free.waiting_open), (1, 1, 0));
    }

    /// A refused caller waiting for an open connection gives up as soon as the
    /// last one closes (it would wait in vain); a caller that may open, asleep
    /// beside it, gets the slot the close frees (not lost to the refused one's
    /// wake).
    #[test]
    fn a_close_of_the_last_open_connection_wakes_both_kinds_of_waiter() {
        for round in 0..100 {
            let slots = slots(1);
            assert_eq!(slots.take(Instant::now(), true), Some(None));
            slots.opened();
            let spawn = |may_open| {
                let slots = slots.clone();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let got = slots.take(t0 + Duration::from_secs(5), may_open);
                    (got, t0.elapsed())
                })
            };
            let (refused, opener) = (spawn(false), spawn(true));
            until_waiting(&slots, 2);
            slots.closed();
            let (got, took) = refused.join().expect("the refused caller");
            assert_eq!(got, None, "round {round}");
            assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
            let (got, took) = opener.join().expect("the opener");
            assert_eq!(got, Some(None), "round {round}: the freed slot");
            assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
        }
    }

    /// Every kind of step at once from 16 threads on 3 slots: open ones lent and
    /// returned or closed, unopened ones opened or refused (then waiting for an
    /// open one), deadlines from microseconds to seconds. No slot is lost or made
    /// up: afterwards all 3 are free, as many open as idle, nobody waiting.
    #[test]
    fn no_slot_is_lost_in_a_storm_of_opens_refusals_and_closes() {
        let n = 3;
        let slots = slots(n);
        let callers: Vec<_> = (0..16u32)
            .map(|t| {
                let slots = slots.clone();
                std::thread::spawn(move || {
                    for i in 0..3_000u32 {
                        let wait = match (t + i) % 3 {
                            0 => Duration::from_micros(u64::from(i % 40)),
                            1 => Duration::from_millis(5),
                            _ => Duration::from_secs(5),
                        };
                        let deadline = Instant::now() + wait;
                        let mut may_open = true;
                        loop {
                            match slots.take(deadline, may_open) {
                                None => break,
                                Some(Some(_)) if i % 5 == 0 => {
                                    slots.closed();
                                    break;
                                }
                                Some(Some(c)) => {
                                    slots.put(Some(c));
                                    break;
                                }
                                // Refused: wait for an open one, as `get` does.
                                Some(None) if i % 4 == 0 => {
                                    slots.release(false);
                                    may_open = false;
                                }
                                Some(None) => {
                                    slots.opened();
                                    slots.put(Some(i));
                                    break;
                                }
                            }
                        }
                        {
                            let free = slots.lock();
                            assert!(free.open <= n && free.len() <= n, "more than {n}");
                        }
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().expect("a caller returns");
        }
        let free = slots.lock();
        assert_eq!(free.len(), n, "slots free at the end");
        assert_eq!(free.open, free.idle.len(), "open connections all idle");
        assert_eq!((free.waiting, free.waiting_open), (0, 0));
    }

    /// Lost wake-ups: every slot is held and as many callers sleep for one; the
    /// holders return theirs at once, from their own threads, and no caller takes
    /// more than one. Each sleeping caller must be woken by those returns alone
    /// (no later return rescues a caller whose wake was lost).
    #[test]
    fn every_sleeping_caller_is_woken_when_all_slots_return_at_once() {
        let n = 4;
        for round in 0..200 {
            let slots = slots(n);
            let held: Vec<_> = (0..n)
                .map(|_| slots.take(Instant::now(), true).expect("a free slot"))
                .collect();
            let waiters: Vec<_> = (0..n)
                .map(|_| {
                    let slots = slots.clone();
                    std::thread::spawn(move || {
                        let t0 = Instant::now();
                        let got = slots.take(t0 + Duration::from_secs(5), true);
                        (got.is_some(), t0.elapsed())
                    })
                })
                .collect();
            while slots.lock().waiting < n {
                std::thread::yield_now();
            }
            let holders: Vec<_> = held
                .into_iter()
                .map(|slot| {
                    let slots = slots.clone();
                    std::thread::spawn(move || slots.put(slot))
                })
                .collect();
            for h in holders {
                h.join().expect("a holder returns");
            }
            for w in waiters {
                let (got, took) = w.join().expect("a waiter returns");
                assert!(got, "round {round}: a caller slept to its deadline");
                assert!(
                    took < Duration::from_secs(2),
                    "round {round}: woken only after {took:?}"
                );
            }
            let free = slots.lock();
            assert_eq!((free.len(), free.waiting), (0, 0), "round {round}");
        }
    }

    /// A storm of callers, half of them giving up within microseconds (their
    /// timeouts race the returns), half patient: no slot is lost or made up, no
    /// patient caller gives up, and nobody is left counted as waiting.
    #[test]
    fn no_slot_is_lost_when_timeouts_race_returns() {
        let n = 3;
        let slots = slots(n);
        let callers: Vec<_> = (0..16u64)
            .map(|t| {
                let slots = slots.clone();
                std::thread::spawn(move || {
                    let (mut got, mut missed) = (0, 0);
                    for i in 0..3_000u64 {
                        let wait = if t % 2 == 0 {
                            Duration::from_micros(i % 40)
                        } else {
                            Duration::from_secs(10)
                        };
                        match slots.take(Instant::now() + wait, true) {
                            Some(slot) => {
                                got += 1;
                                if i % 4 == 0 {
                                    std::thread::yield_now();
                                }
                                slots.put(slot);
                            }
                            None if t % 2 == 0 => missed += 1,
                            None => panic!("a patient caller gave up"),
                        }
                    }
                    (got, missed)
                })
            })
            .collect();
        let mut total = 0;
        for c in callers {
            let (got, missed) = c.join().expect("a caller returns");
            total += got + missed;
        }
        assert_eq!(total, 16 * 3_000);
        let free = slots.lock();
        assert_eq!((free.len(), free.waiting), (n, 0));
    }

    #[test]
    fn the_run_id_comes_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:5d1c0e2f9a\r\ntcp_port:6379\r\n";
        assert_eq!(parse_run_id(info).as_deref(), Some("5d1c0e2f9a"));
        assert_eq!(parse_run_id("# Server\r\nrun_id:\r\n"), None);
        assert_eq!(parse_run_id("redis_version:7.0.15\r\n"), None);
    }

    fn connector() -> Connector {
        let client = Client::open("redis://127.0.0.1:1").expect("a URL");
        Connector::new(client, "test", Duration::from_secs(1))
    }

    #[test]
    fn a_refusal_keeps_the_connection_and_backs_off_until_recovered() {
        let mut c = connector();
        let misconf = RedisError::from((ErrorKind::Extension, "MISCONF"));
        let pauses: Vec<Duration> = (0..8)
            .map(|_| match c.failed(&misconf) {
                Failure::Refused(p) => p,
                Failure::Lost => panic!("a refusal is not a lost connection"),
            })
            .collect();
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        c.recovered();
        assert_eq!(c.refused(&misconf), FIRST_BACKOFF);
    }

    #[test]
    fn io_errors_lose_the_connection() {
        let mut c = connector();
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::WouldBlock,
            std::io::ErrorKind::ConnectionReset,
        ] {
            let e = RedisError::from(std::io::Error::new(kind, "gone"));
            assert_eq!(c.failed(&e), Failure::Lost, "{kind:?}");
        }
        let parse = RedisError::from((ErrorKind::Parse, "garbage"));
        assert!(is_lost(&parse));
    }
}
