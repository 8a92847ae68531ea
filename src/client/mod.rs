//! A blocking Rust client for the protocol of docs/PROTOCOL.md, for Rust programs
//! that call cerbas functions (and the project's tests and benchmarks). One
//! [`Client`] is `Send + Sync`: share it between threads (`Arc<Client>`); all its
//! callers use one Redis connection (`link.rs`) and one reader thread. It finds
//! Redis as the server does (`CERBAS_REDIS_URL`, `CERBAS_ENV`), subscribes before
//! it pushes, reserves ids in blocks, recovers from a broken connection, and never
//! waits longer than the call's timeout.
//! Not for: the server side; test-only ways to break the protocol (tests do
//! those with plain Redis commands).

mod link;
mod wire;

use crate::config::{Config, Env};
use crate::error::ClientError;
use crate::protocol::{Keys, Reply, DEFAULT_PREFIX};
use link::Link;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// Per-call settings; what is not set comes from the [`Client`].
///
/// ```
/// use std::time::Duration;
/// let opts = cerbas::CallOptions::new()
///     .user("alice")
///     .source("web")
///     .delay(Duration::from_secs(2))
///     .timeout(Duration::from_secs(5))
///     .msgpack(true);
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallOptions {
    user: Option<String>,
    source: Option<String>,
    delay: Option<Duration>,
    timeout: Option<Duration>,
    msgpack: bool,
}

impl CallOptions {
    /// No option set: the client's user, source and timeout, no delay, JSON.
    pub fn new() -> Self {
        Self::default()
    }

    /// The user the request runs as.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The source (kind of caller) sent with the request.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Run no earlier than this after the server reads the request (whole
    /// milliseconds). Give the call a timeout longer than the delay.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// How long this call may take, every Redis command included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Wait for the msgpack reply instead of the JSON one.
    pub fn msgpack(mut self, msgpack: bool) -> Self {
        self.msgpack = msgpack;
        self
    }
}

/// A client of one cerbas deployment (a Redis URL, a db and a prefix).
///
/// It is `Send + Sync` and every call takes `&self`: share one between threads
/// with an `Arc`. Opening it and each call wait at most the timeout (10 s by
/// default; [`Client::open_timeout`] sets it for both, [`Client::timeout`] for
/// later calls) and fail with a [`ClientError`]: `Timeout`, `Connection` (Redis
/// away, or restarted while the call waited), `Refused`, `Protocol`, `Closed`,
/// or `Reply` (the function's error, from [`Client::invoke`]).
///
/// ```no_run
/// use std::sync::Arc;
/// let c = Arc::new(cerbas::Client::from_env()?.identity("foo", "web"));
/// let reply = c.request("hello", serde_json::json!({}))?;
/// assert_eq!(reply, cerbas::Reply::Ok("hello world!".into()));
/// let sum = c.invoke("sum", serde_json::json!({"a": 1, "b": 2}))?;
/// assert_eq!(sum, serde_json::json!(3));
/// let c2 = c.clone();
/// std::thread::spawn(move || c2.request("hello", serde_json::json!({})));
/// # Ok::<(), cerbas::ClientError>(())
/// ```
pub struct Client {
    link: Link,
    keys: Keys,
    user: String,
    source: String,
    timeout: Duration,
}

/// Default time a call may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects as the server would with these settings: `url`'s db if it names
    /// one, else `env`'s (dev → 1, prod → 8), with the default timeout (10 s):
    /// see [`Client::open_timeout`].
    pub fn open(url: &str, env: Env) -> Result<Client, ClientError> {
        Self::open_timeout(url, env, DEFAULT_TIMEOUT)
    }

    /// [`Client::open`] with `timeout` for the connect and for each call (as
    /// [`Client::timeout`] sets it). Fails now if Redis cannot be reached: with
    /// [`ClientError::Timeout`]`(timeout)` if the connect and its handshake take
    /// longer (an address that does not answer, a frozen Redis), with
    /// [`ClientError::Connection`] if it is refused or breaks. Once open, the
    /// client reconnects by itself.
    pub fn open_timeout(url: &str, env: Env, timeout: Duration) -> Result<Client, ClientError> {
        let config = Config {
            redis_url: url.to_string(),
            env,
            ..Config::default()
        };
        let url = config.connection_url()?;
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let keys = Keys::new(DEFAULT_PREFIX, config.db());
        let link = Link::open(info, keys.counter(), timeout)?;
        Ok(Client {
            link,
            keys,
            user: "test".into(),
            source: "test".into(),
            timeout,
        })
    }

    /// Connects using `CERBAS_REDIS_URL` and `CERBAS_ENV`, with the server's
    /// defaults and the default timeout.
    pub fn from_env() -> Result<Client, ClientError> {
        let mut config = Config::default();
        config.apply_process_env()?;
        Self::open(&config.redis_url, config.env)
    }

    /// Sets the user and source sent with each request (default `test`, `test`);
    /// [`CallOptions`] overrides them per call.
    pub fn identity(mut self, user: &str, source: &str) -> Self {
        self.user = user.into();
        self.source = source.into();
        self
    }

    /// Sets how long a later call may take (default 10 s; opening took the
    /// timeout given to [`Client::open_timeout`]); [`CallOptions::timeout`]
    /// overrides it per call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key and channel names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Calls `func` and waits for the JSON reply. A `{"status": "error"}` reply
    /// is `Ok(Reply::Error(..))`.
    pub fn request(&self, func: &str, args: Value) -> Result<Reply, ClientError> {
        self.request_with(func, args, &CallOptions::default())
    }

    /// Calls `func` and waits for the msgpack reply.
    pub fn request_msgpack(&self, func: &str, args: Value) -> Result<Reply, ClientError> {
        self.request_with(func, args, &CallOptions::new().msgpack(true))
    }

    /// Calls `func` with per-call options and waits for the reply.
    pub fn request_with(
        &self,
        func: &str,
        args: Value,
        opts: &CallOptions,
    ) -> Result<Reply, ClientError> {
        let body = self.body_with(func, args, opts, true);
        self.call(&body, opts)
    }

    /// Calls `func` and returns the reply's data; an error reply is
    /// [`ClientError::Reply`].
    pub fn invoke(&self, func: &str, args: Value) -> Result<Value, ClientError> {
        self.invoke_with(func, args, &CallOptions::default())
    }

    /// [`Client::invoke`] with per-call options.
    pub fn invoke_with(
        &self,
        func: &str,
        args: Value,
        opts: &CallOptions,
    ) -> Result<Value, ClientError> {
        match self.request_with(func, args, opts)? {
            Reply::Ok(data) => Ok(data),
            Reply::Error(message) => Err(ClientError::Reply(message)),
        }
    }

    /// Sends a one-way request (nobody waits for its reply, and the server
    /// publishes none: the body says `"reply": false`); returns its id once Redis
    /// has it.
    pub fn send(&self, func: &str, args: Value) -> Result<u64, ClientError> {
        self.send_with(func, args, &CallOptions::default())
    }

    /// [`Client::send`] with per-call options (user, source, delay, timeout).
    pub fn send_with(
        &self,
        func: &str,
        args: Value,
        opts: &CallOptions,
    ) -> Result<u64, ClientError> {
        let body = self.body_with(func, args, opts, false);
        self.submit_with(&body, opts)
    }

    /// The request body for `func` with `args`, as [`Client::request`] sends it.
    pub fn body(&self, func: &str, args: Value) -> Vec<u8> {
        self.body_with(func, args, &CallOptions::default(), true)
    }

    /// The body of a one-way request for `func` with `args`, as [`Client::send`]
    /// sends it.
    pub fn body_one_way(&self, func: &str, args: Value) -> Vec<u8> {
        self.body_with(func, args, &CallOptions::default(), false)
    }

    fn body_with(&self, func: &str, args: Value, opts: &CallOptions, reply: bool) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("func".into(), func.into());
        m.insert("args".into(), args);
        m.insert(
            "user".into(),
            opts.user.as_deref().unwrap_or(&self.user).into(),
        );
        m.insert(
            "source".into(),
            opts.source.as_deref().unwrap_or(&self.source).into(),
        );
        if let Some(d) = opts.delay {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            m.insert("delay".into(), ms.into());
        }
        if !reply {
            m.insert("reply".into(), false.into());
        }
        Value::Object(m).to_string().into_bytes()
    }

    /// Stores a raw request `body` and queues it, without waiting for a reply;
    /// returns its id once Redis has it.
    pub fn submit(&self, body: &[u8]) -> Result<u64, ClientError> {
        self.submit_with(body, &CallOptions::default())
    }

    fn submit_with(&self, body: &[u8], opts: &CallOptions) -> Result<u64, ClientError> {
        let timeout = opts.timeout.unwrap_or(self.timeout);
        let deadline = Instant::now() + timeout;
        let (id, call) = self
            .link
            .begin(deadline, |id| {
                let key = self.keys.request(id);
                let bytes = wire::request_commands(None, &key, body, &self.keys.queue(), id);
                (bytes, None)
            })
            .map_err(|e| timed(e, timeout))?;
        call.acknowledged(deadline).map_err(|e| timed(e, timeout))?;
        Ok(id)
    }

    /// Sends a raw request `body` and waits for its reply; of `opts`, only the
    /// timeout and msgpack apply (the body names its user, source and delay).
    pub fn call(&self, body: &[u8], opts: &CallOptions) -> Result<Reply, ClientError> {
        let timeout = opts.timeout.unwrap_or(self.timeout);
        let deadline = Instant::now() + timeout;
        let (_, call) = self
            .link
            .begin(deadline, |id| {
                let channel = if opts.msgpack {
                    self.keys.msgpack_channel(id)
                } else {
                    self.keys.reply_channel(id)
                };
                let key = self.keys.request(id);
                let bytes =
                    wire::request_commands(Some(&channel), &key, body, &self.keys.queue(), id);
                (bytes, Some(channel))
            })
            .map_err(|e| timed(e, timeout))?;
        let payload = call.reply(deadline).map_err(|e| timed(e, timeout))?;
        if opts.msgpack {
            Reply::from_msgpack(&payload)
        } else {
            Reply::from_json(&payload)
        }
        .map_err(ClientError::Protocol)
    }

    /// Whether the client's Redis connection is up now (it reconnects by itself
    /// while it is not; calls made meanwhile wait for it within their timeout).
    pub fn connected(&self) -> bool {
        self.link.is_up()
    }

    /// Closes the client: calls in flight fail at once with
    /// [`ClientError::Closed`], and so does every later call. Dropping the client
    /// closes it too.
    pub fn close(&self) {
        self.link.close();
    }
}

/// A timeout reported with the call's own timeout.
fn timed(e: ClientError, timeout: Duration) -> ClientError {
    match e {
        ClientError::Timeout(_) => ClientError::Timeout(timeout),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn a_client_is_shareable_between_threads() {
        assert_send_sync::<Client>();
    }

    #[test]
    fn options_set_what_they_name_and_nothing_else() {
        let o = CallOptions::new()
            .user("u")
            .delay(Duration::from_millis(1500));
        assert_eq!(o.user.as_deref(), Some("u"));
        assert_eq!(o.delay, Some(Duration::from_millis(1500)));
        assert_eq!((o.source, o.timeout, o.msgpack), (None, None, false));
    }

    #[test]
    fn a_timeout_names_the_calls_own_timeout() {
        let t = Duration::from_secs(3);
        assert_eq!(
            timed(ClientError::Timeout(Duration::ZERO), t),
            ClientError::Timeout(t)
        );
        assert_eq!(timed(ClientError::Closed, t), ClientError::Closed);
    }
}
