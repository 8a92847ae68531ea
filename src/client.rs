//! A blocking Rust client for the protocol of DESIGN §2, used by the project's own
//! tests and benchmarks and by Rust programs that call cerbas functions. It finds
//! Redis as the server does (`CERBAS_REDIS_URL`, `CERBAS_ENV`), subscribes before it
//! pushes, and never waits longer than its timeout. Not for: the server side.

use crate::config::{Config, Env};
use crate::error::Error;
use crate::protocol::{Keys, Reply, DEFAULT_PREFIX};
use redis::{Connection, RedisResult};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How a request waits for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    /// Listen on the `MSGPACK:` channel and decode msgpack.
    pub msgpack: bool,
    /// Subscribe only after the `RPUSH`, as the seed's steps and its Python client
    /// do (the server must cover that race); our clients subscribe first.
    pub subscribe_late: bool,
}

/// A connection to one cerbas deployment (a Redis URL, a db and a prefix).
///
/// ```no_run
/// let mut c = cerbas::Client::from_env()?;
/// let reply = c.request("hello", serde_json::json!({}))?;
/// assert_eq!(reply, cerbas::Reply::Ok("hello world!".into()));
/// # Ok::<(), cerbas::Error>(())
/// ```
pub struct Client {
    client: redis::Client,
    conn: Connection,
    sub: Option<Connection>,
    keys: Keys,
    user: String,
    source: String,
    timeout: Duration,
}

impl Client {
    /// Connects as the server would with these settings: `url`'s db if it names
    /// one, else `env`'s (dev → 1, prod → 8).
    pub fn open(url: &str, env: Env) -> Result<Client, Error> {
        let config = Config {
            redis_url: url.to_string(),
            env,
            ..Config::default()
        };
        let client = redis::Client::open(config.connection_url()?.as_str())?;
        let conn = crate::connection::open(&client, Duration::from_secs(10))?;
        Ok(Client {
            client,
            conn,
            sub: None,
            keys: Keys::new(DEFAULT_PREFIX, config.db()),
            user: "test".into(),
            source: "test".into(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Connects using `CERBAS_REDIS_URL` and `CERBAS_ENV`, with the server's defaults.
    pub fn from_env() -> Result<Client, Error> {
        let mut config = Config::default();
        config.apply_process_env()?;
        Self::open(&config.redis_url, config.env)
    }

    /// Sets the user and source sent with each request (default `test`, `test`).
    pub fn identity(mut self, user: &str, source: &str) -> Self {
        self.user = user.into();
        self.source = source.into();
        self
    }

    /// Sets how long a request waits for its reply (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key and channel names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The request body for `func` with `args`, as this client sends it.
    pub fn body(&self, func: &str, args: Value) -> Vec<u8> {
        json!({"func": func, "args": args, "user": self.user, "source": self.source})
            .to_string()
            .into_bytes()
    }

    /// Calls `func` and waits for the JSON reply.
    pub fn request(&mut self, func: &str, args: Value) -> Result<Reply, Error> {
        let body = self.body(func, args);
        self.call(&body, Mode::default())
    }

    /// Calls `func` and waits for the msgpack reply.
    pub fn request_msgpack(&mut self, func: &str, args: Value) -> Result<Reply, Error> {
        let body = self.body(func, args);
        self.call(
            &body,
            Mode {
                msgpack: true,
                ..Mode::default()
            },
        )
    }

    /// Sends a one-way request (nobody waits for its reply, and the server publishes
    /// none: the body says `"reply": false`); returns its id.
    pub fn send(&mut self, func: &str, args: Value) -> Result<u64, Error> {
        let body = self.body_one_way(func, args);
        self.submit(&body)
    }

    /// The body of a one-way request for `func` with `args`, as [`Client::send`]
    /// sends it.
    pub fn body_one_way(&self, func: &str, args: Value) -> Vec<u8> {
        json!({"func": func, "args": args, "user": self.user, "source": self.source, "reply": false})
            .to_string()
            .into_bytes()
    }

    /// Stores `body` as a new request and queues it (steps A to E); returns its id.
    pub fn submit(&mut self, body: &[u8]) -> Result<u64, Error> {
        let id: u64 = redis::cmd("INCR")
            .arg(self.keys.counter())
            .query(&mut self.conn)?;
        self.push(id, body)?;
        Ok(id)
    }

    fn push(&mut self, id: u64, body: &[u8]) -> RedisResult<()> {
        redis::pipe()
            .cmd("SET")
            .arg(self.keys.request(id))
            .arg(body)
            .ignore()
            .cmd("RPUSH")
            .arg(self.keys.queue())
            .arg(id)
            .ignore()
            .query(&mut self.conn)
    }

    /// Sends a raw request body and waits for its reply, as `mode` says.
    pub fn call(&mut self, body: &[u8], mode: Mode) -> Result<Reply, Error> {
        let id: u64 = redis::cmd("INCR")
            .arg(self.keys.counter())
            .query(&mut self.conn)?;
        self.call_id(id, |c| c.push(id, body).map_err(Error::from), mode)
    }

    /// Waits for the reply to request `id`, running `queue` (which must put the
    /// request in Redis) after subscribing, or before if `mode.subscribe_late`.
    pub fn call_id(
        &mut self,
        id: u64,
        queue: impl FnOnce(&mut Client) -> Result<(), Error>,
        mode: Mode,
    ) -> Result<Reply, Error> {
        let channel = if mode.msgpack {
            self.keys.msgpack_channel(id)
        } else {
            self.keys.reply_channel(id)
        };
        let deadline = Instant::now() + self.timeout;
        let mut sub = match self.sub.take() {
            Some(s) => s,
            None => crate::connection::open(&self.client, self.timeout)?,
        };
        let result = (|| {
            let mut ps = sub.as_pubsub();
            if !mode.subscribe_late {
                ps.subscribe(&channel)?;
            }
            queue(self)?;
            if mode.subscribe_late {
                ps.subscribe(&channel)?;
            }
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::ReplyTimeout(self.timeout));
                }
                ps.set_read_timeout(Some(left))?;
                let msg = match ps.get_message() {
                    Ok(m) => m,
                    Err(e) if e.is_timeout() => return Err(Error::ReplyTimeout(self.timeout)),
                    Err(e) => return Err(e.into()),
                };
                if msg.get_channel_name() != channel {
                    continue;
                }
                let bytes = msg.get_payload_bytes();
                return if mode.msgpack {
                    Reply::from_msgpack(bytes)
                } else {
                    Reply::from_json(bytes)
                }
                .map_err(Error::BadReply);
            }
        })();
        // After a timeout the connection may hold a late message: start afresh.
        if result.is_ok() {
            self.sub = Some(sub);
        }
        result
    }
}
