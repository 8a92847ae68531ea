//! Error types. `RequestError` is everything that can go wrong with one request; its
//! `Display` text is exactly the message the caller gets in `{"status":"error"}`.
//! `Error` is what stops the server itself (bad configuration, Redis unreachable at a
//! point where we cannot wait). Turning errors into replies happens in one place:
//! `impl From<RequestError> for Reply` in `protocol.rs`. `HttpError` is what the HTTP
//! plug refuses on its own (tokens, body shape, stopping); `http/api.rs` turns it
//! into a status and a reply.

use thiserror::Error;

/// Why a request got an error reply instead of running its function.
///
/// The messages are part of the protocol (clients may match on them), so change
/// them with care and update `docs` when you do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The queue named an id whose request key does not exist.
    #[error("request not found: {0}")]
    NotFound(String),
    /// The request key exists but cannot be read as a string (a hash, say).
    #[error("request {0} cannot be read: {1}")]
    Unreadable(String, String),
    /// The body is larger than `max_request_bytes`.
    #[error("request too large: {size} bytes (limit {limit})")]
    TooLarge { size: usize, limit: usize },
    /// The body is not UTF-8, so it cannot be JSON.
    #[error("request is not valid UTF-8")]
    NotUtf8,
    /// The body nests arrays or objects deeper than we parse.
    #[error("request nested too deeply (limit {0} levels)")]
    TooDeep(usize),
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// The body is JSON but not an object.
    #[error("request must be a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing \"{0}\"")]
    Missing(&'static str),
    /// A field that must be a string is something else.
    #[error("\"{0}\" must be a string")]
    NotAString(&'static str),
    /// `args` is present and neither an object nor null.
    #[error("\"args\" must be an object")]
    ArgsNotObject,
    /// `delay` is not a whole number of milliseconds ≥ 0.
    #[error("\"delay\" must be a whole number of milliseconds, 0 or more")]
    BadDelay,
    /// `reply` is present and neither a boolean nor null.
    #[error("\"reply\" must be true or false")]
    ReplyNotBool,
    /// `cron` is present and not `{"entry": id, "tick": seconds}`.
    #[error("\"cron\" must be {{\"entry\": \"<entry id>\", \"tick\": <unix seconds>}}")]
    BadCron,
    /// `delay` is longer than the configured maximum.
    #[error("\"delay\" must be at most {0} ms")]
    DelayTooLong(u64),
    /// No function is registered under this name.
    #[error("unknown function: {0}")]
    UnknownFunction(String),
    /// The request's user is not in the configuration's `access.users`.
    #[error("user not registered: {0}")]
    UnknownUser(String),
    /// The request's source is not in the configuration's `access.sources`.
    #[error("source not registered: {0}")]
    UnknownSource(String),
    /// The function restricts its callers and this user is not one of them.
    #[error("user {user} may not call {func}")]
    NotAllowed { user: String, func: String },
    /// The user already runs as many calls as `[limits] per_user` allows.
    #[error("busy: user {user} is at its limit of {limit} running calls (limits.per_user); try again later")]
    BusyUser { user: String, limit: usize },
    /// The function already runs as many calls as its `max_concurrent` allows.
    #[error("busy: function {func} is at its limit of {limit} running calls (functions.{func}.max_concurrent); try again later")]
    BusyFunction { func: String, limit: usize },
    /// The arguments did not decode into the function's argument type.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The function did not answer before its deadline.
    #[error("timeout")]
    Timeout,
    /// The function panicked.
    #[error("internal error: function {0} panicked")]
    Panicked(String),
}

/// Why the HTTP plug answered an `/api` request with an error of its own, before
/// (or instead of) a call; the reply is `{"status":"error","data":<this text>}`.
/// The HTTP status of each is in `http/api.rs` (and the README's table).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// Tokens are configured and the request has no bearer token.
    #[error("missing bearer token (Authorization: Bearer <token>)")]
    MissingToken,
    /// The bearer token is not one of the configured tokens.
    #[error("invalid token")]
    InvalidToken,
    /// A query-string argument is given twice.
    #[error("argument {0:?} given more than once")]
    RepeatedArgument(String),
    /// The function name in the path does not decode to UTF-8.
    #[error("function name is not valid UTF-8")]
    NameNotUtf8,
    /// A `POST /api/{func}` body that is JSON but not an object.
    #[error("body must be a JSON object of arguments")]
    BodyNotArguments,
    /// A `POST /api/general` body without its `request` object.
    #[error("body must be {{\"request\": {{\"func\", \"args\", \"source\"}}}}")]
    NotGeneral,
    /// `delay` in an HTTP call (the caller waits for the reply).
    #[error("\"delay\" is not supported over HTTP")]
    DelayOverHttp,
    /// The body did not arrive whole within the read timeout.
    #[error("request body too slow")]
    SlowBody,
    /// Reading the body failed.
    #[error("cannot read the body: {0}")]
    Unreadable(String),
    /// The route does not take this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The server is stopping.
    #[error("stopping: try again later")]
    Stopping,
    /// Every worker stayed busy for as long as the call may wait (ms): it was
    /// not run.
    #[error("no worker free within {0} ms: try again later")]
    NoWorker(u64),
}

/// The error a user's function returns: its message becomes the reply's `data`.
///
/// Anything that is `Display` converts into it, so `?` works on Redis and serde
/// errors inside a function:
///
/// ```
/// use cerbas::FnError;
/// fn check(n: i64) -> Result<i64, FnError> {
///     if n < 0 { return Err("n must be positive".into()); }
///     Ok(n)
/// }
/// assert_eq!(check(-1).unwrap_err().to_string(), "n must be positive");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FnError(pub String);

impl std::fmt::Display for FnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for FnError {
    fn from(s: &str) -> Self {
        FnError(s.to_string())
    }
}

impl From<String> for FnError {
    fn from(s: String) -> Self {
        FnError(s)
    }
}

impl FnError {
    /// The pool could not open a connection for the function (Redis down, or at
    /// its `maxclients`: Redis then closes the connection, and redis-rs often
    /// reports only that, not Redis's reason).
    pub(crate) fn no_connection(e: redis::RedisError) -> Self {
        FnError(format!(
            "could not open a Redis connection (Redis down, or at its maxclients?): {e}"
        ))
    }
}

impl From<redis::RedisError> for FnError {
    fn from(e: redis::RedisError) -> Self {
        FnError(format!("redis: {e}"))
    }
}

impl From<serde_json::Error> for FnError {
    fn from(e: serde_json::Error) -> Self {
        FnError(format!("json: {e}"))
    }
}

/// What stops the server, or a client, from working at all.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration (file, environment or flags) is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The Redis server can never work with this configuration (a db it does not
    /// have, a password it refuses, a version too old): waiting will not help.
    #[error("cannot use this Redis: {0}")]
    Unusable(String),
    /// Redis refused or broke a connection where we could not wait it out.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A thread could not be started, or a file could not be read.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a [`Client`](crate::Client) call did not return a reply. Every failure of the
/// client is one of these: no Redis or I/O error type leaks out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    /// No reply within the call's timeout (the server is slow or down, Redis is
    /// frozen, or the function answers nothing). The request may still run.
    /// Opening a client: Redis did not answer the connect and its handshake
    /// within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// Redis cannot be reached (refused, or away for the whole call), the
    /// connection broke before Redis acknowledged the request, or Redis
    /// restarted while the call waited (its reply is lost).
    #[error("connection: {0}")]
    Connection(String),
    /// Redis answered a command with an error (`OOM`, `MISCONF`, `NOPERM`, ...).
    #[error("redis refused: {0}")]
    Refused(String),
    /// A reply or a Redis answer that cannot be decoded.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The function answered `{"status": "error"}` with this message (only from
    /// the calls that turn replies into results, such as
    /// [`Client::invoke`](crate::Client::invoke)).
    #[error("error reply: {0}")]
    Reply(String),
    /// The client was closed (before or during the call).
    #[error("the client is closed")]
    Closed,
    /// The URL or the environment does not name a usable Redis.
    #[error("configuration: {0}")]
    Config(String),
}

impl From<Error> for ClientError {
    fn from(e: Error) -> Self {
        match e {
            Error::Config(m) | Error::Unusable(m) => ClientError::Config(m),
            other => ClientError::Connection(other.to_string()),
        }
    }
}
