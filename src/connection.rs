//! Redis connections: opening them with timeouts, re-opening them with capped
//! back-off when they break (logging once when an outage starts and once when it
//! ends), and the small pool that lends connections to users' functions.
//! Not for: what is sent on them (each thread owns its own commands).

use crate::error::FnError;
use crate::shutdown::Shutdown;
use crossbeam_channel::{Receiver, Sender};
use redis::{Client, Connection, RedisError};
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
                    if let Some(since) = self.down_since.take() {
                        log::warn!(
                            "{}: redis is back after {:.1}s",
                            self.who,
                            since.elapsed().as_secs_f64()
                        );
                    }
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

    /// Records that the connection broke; logs only at the start of an outage.
    pub(crate) fn broken(&mut self, e: &RedisError) {
        if self.down_since.is_none() {
            log::warn!("{}: redis unavailable, retrying: {e}", self.who);
            self.down_since = Some(Instant::now());
        }
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
