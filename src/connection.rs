//! Redis connections: opening them with timeouts, re-opening them with capped
//! back-off when they break (logging once when an outage starts and once when it
//! ends), the start-up check that tells a Redis that is away (wait) from one that
//! can never serve the configuration (stop), and the small pool that lends
//! connections to users' functions.
//! Not for: what is sent on them (each thread owns its own commands).

use crate::error::{Error, FnError};
use crate::shutdown::Shutdown;
use crossbeam_channel::{Receiver, Sender};
use redis::{Client, Connection, ErrorKind, RedisError};
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Opens a connection whose reads give up after `read_timeout`.
pub fn open(client: &Client, read_timeout: Duration) -> Result<Connection, RedisError> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(read_timeout))?;
    Ok(conn)
}

/// Keeps one thread connected: [`Connector::connect`] retries with capped back-off
/// until it succeeds or shutdown is triggered.
pub(crate) struct Connector {
    client: Client,
    who: &'static str,
    read_timeout: Duration,
    down_since: Option<Instant>,
}

impl Connector {
    pub(crate) fn new(client: Client, who: &'static str, read_timeout: Duration) -> Self {
        Connector {
            client,
            who,
            read_timeout,
            down_since: None,
        }
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
        if self.down_since.is_none() {
            log::warn!("{}: redis unavailable, retrying: {e}", self.who);
            self.down_since = Some(Instant::now());
        }
    }
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
        let checked = open(client, CONNECT_TIMEOUT).and_then(|mut c| {
            redis::cmd("INFO")
                .arg("server")
                .query::<String>(&mut c)
                .map(|info| redis_version(&info))
        });
        match checked {
            Ok(Some(v)) if v < MIN_REDIS_VERSION => {
                return Err(Error::Unusable(format!(
                    "Redis {}.{} is too old: cerbas needs {}.{} or later (BLMOVE, LMOVE)",
                    v.0, v.1, MIN_REDIS_VERSION.0, MIN_REDIS_VERSION.1
                )))
            }
            Ok(v) => {
                if v.is_none() {
                    log::warn!("redis did not say its version; going on");
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

/// A small pool of connections for users' functions, opened on first use.
#[derive(Clone)]
pub struct ConnectionPool {
    client: Client,
    // A slot is a token: `None` means "may open a new connection".
    give: Sender<Option<Connection>>,
    take: Receiver<Option<Connection>>,
}

impl ConnectionPool {
    /// A pool of at most `size` connections to `client`.
    pub fn new(client: Client, size: usize) -> Self {
        let (give, take) = crossbeam_channel::bounded(size);
        for _ in 0..size {
            let _ = give.send(None);
        }
        ConnectionPool { client, give, take }
    }

    /// Borrows a connection, waiting for one until `deadline`. It returns to the pool
    /// when dropped, unless it broke.
    pub fn get(&self, deadline: Instant) -> Result<PooledConnection, FnError> {
        let slot = self
            .take
            .recv_deadline(deadline)
            .map_err(|_| FnError::from("no Redis connection free before the deadline"))?;
        let conn = match slot {
            Some(c) => c,
            None => match open(&self.client, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => {
                    let _ = self.give.send(None);
                    return Err(e.into());
                }
            },
        };
        Ok(PooledConnection {
            conn: Some(conn),
            home: self.give.clone(),
        })
    }
}

/// A connection borrowed from a [`ConnectionPool`]; use it as a `redis::Connection`.
pub struct PooledConnection {
    conn: Option<Connection>,
    home: Sender<Option<Connection>>,
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
        let conn = self.conn.take().filter(redis::ConnectionLike::is_open);
        let _ = self.home.send(conn);
    }
}
