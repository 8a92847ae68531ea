//! The server's configuration: defaults, the TOML file (`cerbas.toml` documents every
//! key), environment overrides and command-line flags, in that order of precedence
//! (flags win over the environment, which wins over the file). Also the pure helpers
//! that pick the Redis database from `env` and the URL, and hide a URL's password.
//! Not for: reading flags (that is `main.rs`) or connecting (that is `connection.rs`).

use crate::error::Error;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The largest `republish_max_bytes`: the key exists to bound memory, so a value
/// that could not be meant as a bound is refused.
const MAX_REPUBLISH_BYTES: usize = 1 << 30;

/// `dev` or `prod`: chooses the Redis database (1 or 8, as the original) unless the
/// URL names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Env {
    /// Database 1.
    #[default]
    Dev,
    /// Database 8.
    Prod,
}

impl Env {
    /// The database the original used for this environment.
    pub fn default_db(self) -> i64 {
        match self {
            Env::Dev => 1,
            Env::Prod => 8,
        }
    }
}

impl std::fmt::Display for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Env::Dev => "dev",
            Env::Prod => "prod",
        })
    }
}

impl FromStr for Env {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "dev" => Ok(Env::Dev),
            "prod" => Ok(Env::Prod),
            other => Err(Error::Config(format!(
                "env must be dev or prod, not {other:?}"
            ))),
        }
    }
}

/// Who may call what: the registered users and sources (DESIGN §2).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// Users a request may name in `user`.
    pub users: Vec<String>,
    /// Sources a request may name in `source`.
    pub sources: Vec<String>,
}

/// How many calls may run at once, beyond the width of the pool (`[limits]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// If set, one user may have at most this many calls running; more are refused
    /// with a `busy: …` error.
    pub per_user: Option<usize>,
}

/// Per-function settings from `[functions.NAME]`; they override what the code
/// registered.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfig {
    /// Deadline for one call, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// If set, only these users may call the function.
    pub users: Option<Vec<String>>,
    /// If set, ok replies are cached this many seconds.
    pub cache_secs: Option<u64>,
    /// If set, at most this many calls of the function run at once; more are
    /// refused with a `busy: …` error.
    pub max_concurrent: Option<usize>,
}

/// Everything the server reads at start-up. See `cerbas.toml` for each key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Redis to connect to; a password goes in the URL (`redis://:secret@host:6379`).
    pub redis_url: String,
    /// `dev` (db 1) or `prod` (db 8), unless `redis_url` names a db.
    pub env: Env,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// Worker threads, each runs one function call at a time.
    pub workers: usize,
    /// Default deadline of a function call, in milliseconds.
    pub timeout_ms: u64,
    /// Most workers started to replace workers stuck in calls past their deadline.
    pub max_hung_workers: usize,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// On shutdown, how long requests in hand may take to finish, in milliseconds.
    pub drain_timeout_ms: u64,
    /// How long a reply nobody has subscribed to yet is published again.
    pub reply_grace_ms: u64,
    /// Most bytes of replies held meanwhile; past it the oldest are dropped.
    pub republish_max_bytes: usize,
    /// Longest `delay` a request may ask for, in milliseconds.
    pub max_delay_ms: u64,
    /// Most Redis connections lent to functions at once (`Context::redis`); each
    /// is opened when first needed, so only as many are open as calls used at once.
    pub redis_pool_size: usize,
    /// The cron file; empty turns cron off.
    pub crontab: PathBuf,
    /// The time zone of the cron schedules: `UTC`, an IANA name, or `local`.
    pub cron_tz: String,
    /// The user of cron entries that name none.
    pub cron_user: String,
    /// The HTTP plug (`[http]`; `--http ADDR` sets its `listen`).
    pub http: HttpConfig,
    /// Paths the HTTP plug forwards to other web apps (`[[proxy]]`).
    pub proxy: Vec<ProxyTarget>,
    /// Registered users and sources.
    pub access: Access,
    /// Concurrency limits.
    pub limits: Limits,
    /// Per-function overrides.
    pub functions: BTreeMap<String, FunctionConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis_url: "redis://127.0.0.1:6379".into(),
            env: Env::Dev,
            prefix: crate::protocol::DEFAULT_PREFIX.into(),
            workers: 100,
            timeout_ms: 5_000,
            max_hung_workers: 100,
            max_request_bytes: 1 << 20,
            drain_timeout_ms: 10_000,
            reply_grace_ms: 5_000,
            republish_max_bytes: 16 << 20,
            max_delay_ms: 30 * 24 * 3600 * 1000,
            redis_pool_size: 100,
            crontab: PathBuf::from("CRONTAB"),
            cron_tz: "UTC".into(),
            cron_user: "cron".into(),
            http: HttpConfig::default(),
            proxy: Vec::new(),
            access: Access::default(),
            limits: Limits::default(),
            functions: BTreeMap::new(),
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--redis URL`
    pub redis_url: Option<String>,
    /// `--env dev|prod`
    pub env: Option<Env>,
    /// `--workers N`
    pub workers: Option<usize>,
    /// `--crontab PATH`
    pub crontab: Option<PathBuf>,
    /// `--http ADDR`
    pub http: Option<String>,
}

impl Config {
    /// Parses a TOML document; unknown keys are errors, missing keys keep defaults.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Reads the file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        // Not through from_toml: its error would repeat the "configuration:" prefix.
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Applies `CERBAS_REDIS_URL` and `CERBAS_ENV`, looked up through `var` (pass
    /// `|k| std::env::var(k).ok()`; tests pass a map).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), Error> {
        if let Some(url) = var("CERBAS_REDIS_URL").filter(|u| !u.is_empty()) {
            self.redis_url = url;
        }
        if let Some(env) = var("CERBAS_ENV").filter(|e| !e.is_empty()) {
            self.env = env.parse()?;
        }
        Ok(())
    }

    /// Applies `CERBAS_REDIS_URL` and `CERBAS_ENV` from the process's environment.
    /// A value that is not UTF-8 is an error, not ignored: the operator meant it.
    pub fn apply_process_env(&mut self) -> Result<(), Error> {
        let read = |k: &str| match std::env::var(k) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::Config(format!("{k} is not valid UTF-8")))
            }
        };
        let url = read("CERBAS_REDIS_URL")?;
        let env = read("CERBAS_ENV")?;
        self.apply_env(|k| match k {
            "CERBAS_REDIS_URL" => url.clone(),
            "CERBAS_ENV" => env.clone(),
            _ => None,
        })
    }

    /// Applies command-line flags.
    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(v) = &o.redis_url {
            self.redis_url = v.clone();
        }
        if let Some(v) = o.env {
            self.env = v;
        }
        if let Some(v) = o.workers {
            self.workers = v;
        }
        if let Some(v) = &o.crontab {
            self.crontab = v.clone();
        }
        if let Some(v) = &o.http {
            self.http.listen = v.clone();
        }
    }

    /// Checks values that would make the server misbehave rather than fail. Every
    /// size and duration is bounded: a huge pool or channel would be allocated at
    /// start-up (or abort it), a huge duration would overflow a deadline.
    pub fn validate(&self) -> Result<(), Error> {
        within("workers", self.workers, 1, 10_000)?;
        within("max_hung_workers", self.max_hung_workers, 0, 10_000)?;
        within("redis_pool_size", self.redis_pool_size, 1, 1_000)?;
        // Redis strings hold at most 512 MiB.
        within("max_request_bytes", self.max_request_bytes, 64, 512 << 20)?;
        within("timeout_ms", self.timeout_ms, 1, DAY_MS)?;
        within("drain_timeout_ms", self.drain_timeout_ms, 0, DAY_MS)?;
        within("reply_grace_ms", self.reply_grace_ms, 0, HOUR_MS)?;
        within("max_delay_ms", self.max_delay_ms, 0, YEAR_MS)?;
        within(
            "republish_max_bytes",
            self.republish_max_bytes,
            0,
            MAX_REPUBLISH_BYTES,
        )?;
        if self.prefix.is_empty()
            || self.prefix.len() > 256
            || self.prefix.contains(char::is_whitespace)
        {
            return Err(Error::Config(format!(
                "prefix must be 1 to 256 bytes, without spaces: {:?}",
                self.prefix
            )));
        }
        if let Some(n) = self.limits.per_user {
            within("limits.per_user", n, 1, 10_000)?;
        }
        self.cron_zone()?;
        if self.cron_user.is_empty() {
            return Err(Error::Config("cron_user must not be empty".into()));
        }
        self.http.validate()?;
        validate_proxy(&self.proxy)?;
        url_db(&self.redis_url)?;
        redis::Client::open(self.connection_url()?.as_str())
            .map_err(|e| Error::Config(format!("redis_url: {e}")))?;
        for (name, f) in &self.functions {
            if let Some(ms) = f.timeout_ms {
                within(&format!("functions.{name}.timeout_ms"), ms, 1, DAY_MS)?;
            }
            if let Some(n) = f.max_concurrent {
                within(&format!("functions.{name}.max_concurrent"), n, 1, 10_000)?;
            }
            if let Some(secs) = f.cache_secs {
                within(
                    &format!("functions.{name}.cache_secs"),
                    secs,
                    0,
                    YEAR_MS / 1000,
                )?;
            }
        }
        Ok(())
    }

    /// `cron_tz` as a zone.
    pub fn cron_zone(&self) -> Result<crate::cron::Zone, Error> {
        self.cron_tz
            .parse()
            .map_err(|e| Error::Config(format!("cron_tz: {e}")))
    }

    /// The Redis database in use: the URL's, else the environment's.
    pub fn db(&self) -> i64 {
        url_db(&self.redis_url)
            .ok()
            .flatten()
            .unwrap_or(self.env.default_db())
    }

    /// The URL to connect with: `redis_url` with the database filled in.
    pub fn connection_url(&self) -> Result<String, Error> {
        Ok(match url_db(&self.redis_url)? {
            Some(_) => self.redis_url.clone(),
            None => with_db(&self.redis_url, self.db()),
        })
    }

    /// One line for the start-up log: where, which db, how wide.
    pub fn summary(&self) -> String {
        format!(
            "redis={} db={} env={} prefix={} workers={} timeout_ms={} users={} sources={}",
            redact_url(&self.redis_url),
            self.db(),
            self.env,
            self.prefix,
            self.workers,
            self.timeout_ms,
            self.access.users.len(),
            self.access.sources.len()
        )
    }
}

// ---- The HTTP plug (`[http]`, `[http.tokens]`, `[[proxy]]`), issue 10 ----

/// The HTTP plug's settings (`[http]`). See `cerbas.toml` for each key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:4455`; empty for no HTTP.
    pub listen: String,
    /// Handler threads: how many HTTP requests are served at once.
    pub threads: usize,
    /// The user calls run as when no tokens are configured (the `http_user`).
    pub user: String,
    /// The source of HTTP calls (unless `/api/general` names one).
    pub source: String,
    /// Largest `/api` request body, in bytes (413 past it). Proxied bodies are
    /// streamed and not limited here.
    pub max_body_bytes: usize,
    /// A client read that waits longer than this fails, in ms; so does reading a
    /// whole `/api` body.
    pub read_timeout_ms: u64,
    /// A client write that waits longer than this fails, in ms.
    pub write_timeout_ms: u64,
    /// Most connections open at once; one more gets 503 and is closed.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes (431 past it).
    pub max_head_bytes: usize,
    /// A request head must arrive whole within this many ms of its first byte
    /// (then 408 and close); also how long a new connection may stay silent.
    pub header_timeout_ms: u64,
    /// A connection idle between requests is closed after this many ms.
    pub keep_alive_ms: u64,
    /// Bearer token → user. When set, every `/api` call needs a token.
    pub tokens: BTreeMap<String, String>,
    /// Role → the users (of `tokens`) who have it. The one role is `admin`: who may
    /// take the dashboard's actions (delete, run now, pause). Without tokens, the
    /// actions are allowed from loopback only, and this is not used.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Forward the `Authorization` header to proxy targets (off: it is removed).
    pub forward_token: bool,
    /// Connecting to a proxy target may take this long, in ms (then 502).
    pub proxy_connect_timeout_ms: u64,
    /// A proxy target must answer (and each read of its body return) within
    /// this, in ms (then 504).
    pub proxy_read_timeout_ms: u64,
    /// A whole proxied exchange (request sent, response head and body back)
    /// may take this long, in ms; a response still streaming then is cut off
    /// and its connection closed.
    pub proxy_response_timeout_ms: u64,
    /// This many failures of one target ...
    pub breaker_failures: u32,
    /// ... within this many ms open its breaker ...
    pub breaker_window_ms: u64,
    /// ... for this many ms (503 at once), then one trial request decides.
    pub breaker_open_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: String::new(),
            threads: 16,
            user: "web".into(),
            source: "web".into(),
            max_body_bytes: 1 << 20,
            read_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            max_connections: 512,
            max_head_bytes: 16 << 10,
            header_timeout_ms: 10_000,
            keep_alive_ms: 5_000,
            tokens: BTreeMap::new(),
            roles: BTreeMap::new(),
            forward_token: false,
            proxy_connect_timeout_ms: 2_000,
            proxy_read_timeout_ms: 30_000,
            proxy_response_timeout_ms: 120_000,
            breaker_failures: 2,
            breaker_window_ms: 3_000,
            breaker_open_ms: 10_000,
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), Error> {
        within("http.threads", self.threads, 1, 1_000)?;
        within("http.max_body_bytes", self.max_body_bytes, 64, 512 << 20)?;
        within("http.read_timeout_ms", self.read_timeout_ms, 1, HOUR_MS)?;
        within("http.write_timeout_ms", self.write_timeout_ms, 1, HOUR_MS)?;
        within("http.max_connections", self.max_connections, 1, 100_000)?;
        within("http.max_head_bytes", self.max_head_bytes, 1024, 1 << 20)?;
        within("http.header_timeout_ms", self.header_timeout_ms, 1, HOUR_MS)?;
        within("http.keep_alive_ms", self.keep_alive_ms, 1, HOUR_MS)?;
        within(
            "http.proxy_response_timeout_ms",
            self.proxy_response_timeout_ms,
            1,
            DAY_MS,
        )?;
        within(
            "http.proxy_connect_timeout_ms",
            self.proxy_connect_timeout_ms,
            1,
            HOUR_MS,
        )?;
        within(
            "http.proxy_read_timeout_ms",
            self.proxy_read_timeout_ms,
            1,
            HOUR_MS,
        )?;
        within("http.breaker_failures", self.breaker_failures, 1, 1_000)?;
        within("http.breaker_window_ms", self.breaker_window_ms, 1, DAY_MS)?;
        within("http.breaker_open_ms", self.breaker_open_ms, 1, DAY_MS)?;
        if !self.listen.is_empty() {
            self.listen.parse::<std::net::SocketAddr>().map_err(|_| {
                Error::Config(format!(
                    "http.listen must be an address like 127.0.0.1:4455, not {:?}",
                    self.listen
                ))
            })?;
        }
        if self.user.is_empty() || self.source.is_empty() {
            return Err(Error::Config(
                "http.user and http.source must not be empty".into(),
            ));
        }
        // Tokens are never shown, not even in this message.
        if self
            .tokens
            .iter()
            .any(|(t, u)| t.len() < 16 || u.is_empty())
        {
            return Err(Error::Config(
                "http.tokens: each token must be at least 16 characters and map to a user".into(),
            ));
        }
        for (role, users) in &self.roles {
            if role != "admin" {
                return Err(Error::Config(format!(
                    "http.roles: unknown role {role:?} (the one role is \"admin\")"
                )));
            }
            if let Some(u) = users
                .iter()
                .find(|u| !self.tokens.values().any(|t| t == *u))
            {
                return Err(Error::Config(format!(
                    "http.roles.{role}: user {u:?} has no token in [http.tokens]"
                )));
            }
        }
        Ok(())
    }
}

/// One `[[proxy]]` entry: requests under `prefix` go to `target`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyTarget {
    /// A path prefix such as `/api5`; `/api5` and `/api5/…` are forwarded.
    pub prefix: String,
    /// Where to, `http://host:port` (no path).
    pub target: String,
    /// A name for the target (`flask`), used by the metrics and `proxiedhostport`;
    /// the prefix without its `/` when absent.
    pub name: Option<String>,
}

impl ProxyTarget {
    /// The target's name: `name`, else the prefix without its leading `/`.
    pub fn label(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or_else(|| self.prefix.trim_start_matches('/'))
    }

    /// The target's port (from `target`, 80 when it names none); `None` if the
    /// target is not a valid `http://` URL.
    pub fn port(&self) -> Option<u16> {
        let url = url::Url::parse(&self.target).ok()?;
        (url.scheme() == "http").then(|| url.port().unwrap_or(80))
    }
}

fn validate_proxy(targets: &[ProxyTarget]) -> Result<(), Error> {
    let mut seen = std::collections::BTreeSet::new();
    for t in targets {
        let bad = |why: &str| Error::Config(format!("[[proxy]] {}: {why}", t.prefix));
        let segment_ok = t.prefix.len() > 1
            && t.prefix.starts_with('/')
            && !t.prefix.ends_with('/')
            && !t.prefix.contains("//")
            && !t.prefix.split('/').any(|s| s == "." || s == "..")
            && t.prefix
                .chars()
                .all(|c| c.is_ascii_graphic() && c != '?' && c != '#');
        if !segment_ok {
            return Err(bad(
                "prefix must be a path like /api5 (no trailing /, ?, # or ..)",
            ));
        }
        if t.prefix == "/api"
            || t.prefix.starts_with("/api/")
            || t.prefix == "/health"
            || t.prefix == "/metrics"
        {
            return Err(bad("prefix takes a path the plug serves itself"));
        }
        let url = url::Url::parse(&t.target).map_err(|e| bad(&format!("target: {e}")))?;
        if url.scheme() != "http"
            || url.host().is_none()
            || url.path() != "/"
            || url.query().is_some()
        {
            return Err(bad("target must be http://host:port, without a path"));
        }
        if !seen.insert(t.label().to_string()) {
            return Err(bad("two targets have the same name"));
        }
    }
    Ok(())
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
const YEAR_MS: u64 = 366 * DAY_MS;

/// `name` must be `lo` to `hi`; says so with the value it got.
fn within<T: PartialOrd + std::fmt::Display>(name: &str, v: T, lo: T, hi: T) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::Config(format!(
            "{name} must be {lo} to {hi}, not {v}"
        )));
    }
    Ok(())
}

fn is_unix(url: &str) -> bool {
    url.starts_with("unix:") || url.starts_with("redis+unix:")
}

/// The database a Redis URL names, if any: the path of `redis://host:port/3`, or
/// `db=` in the query of a `unix://` URL. Read as redis-rs reads it (query keys
/// and values percent-decoded); a `db` named twice is refused, since redis-rs would
/// take the last and the reply channels might name another.
///
/// ```
/// use cerbas::config::url_db;
/// assert_eq!(url_db("redis://127.0.0.1:6379").unwrap(), None);
/// assert_eq!(url_db("redis://:pw@127.0.0.1:6379/3").unwrap(), Some(3));
/// assert!(url_db("redis://host/x").is_err());
/// assert!(url_db("unix:///run/redis.sock?db=2&db=3").is_err());
/// ```
pub fn url_db(url: &str) -> Result<Option<i64>, Error> {
    let bad = |why: &str| Error::Config(format!("redis_url {why}: {}", redact_url(url)));
    let url_no_fragment = url.split_once('#').map_or(url, |(u, _)| u);
    let (rest, query) = match url_no_fragment.split_once('?') {
        Some((r, q)) => (r, q),
        None => (url_no_fragment, ""),
    };
    let in_query: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "db")
        .map(|(_, v)| v.into_owned())
        .collect();
    let db = if is_unix(url) {
        match in_query.as_slice() {
            [] => return Ok(None),
            [db] => db.clone(),
            _ => return Err(bad("names its db more than once")),
        }
    } else {
        if !in_query.is_empty() {
            return Err(bad(
                "names its db in the query; a redis:// URL names it in the path (redis://host:6379/3)",
            ));
        }
        let after_scheme = rest.split_once("://").map(|(_, r)| r).unwrap_or(rest);
        let path = after_scheme
            .split_once('/')
            .map(|(_, p)| p.trim_end_matches('/'))
            .unwrap_or("");
        if path.is_empty() {
            return Ok(None);
        }
        path.to_string()
    };
    db.parse::<i64>()
        .ok()
        .filter(|d| *d >= 0)
        .map(Some)
        .ok_or_else(|| bad("names no valid db"))
}

fn with_db(url: &str, db: i64) -> String {
    let (rest, query) = match url.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (url, None),
    };
    if is_unix(url) {
        return match query {
            Some(q) if !q.is_empty() => format!("{url}&db={db}"),
            _ => format!("{rest}?db={db}"),
        };
    }
    let base = format!("{}/{db}", rest.trim_end_matches('/'));
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

/// The URL with every part that can carry a secret replaced by `***`, for logs and
/// error messages: the password of `redis://user:pw@host`, and every query value
/// but `db` and `protocol` (a unix-socket URL carries its password as `pass=`, its
/// user as `user=`).
///
/// ```
/// use cerbas::config::redact_url;
/// assert_eq!(redact_url("redis://u:secret@h:1/2"), "redis://u:***@h:1/2");
/// assert_eq!(
///     redact_url("redis+unix:///run/r.sock?db=3&pass=s3cret"),
///     "redis+unix:///run/r.sock?db=3&pass=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    // A fragment (`#insecure`) comes last; anything else there is not ours to show.
    let (url, fragment) = match url.split_once('#') {
        Some((u, "insecure")) => (u, "#insecure"),
        Some((u, _)) => (u, "#***"),
        None => (url, ""),
    };
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(head);
    if let Some(q) = query {
        out.push('?');
        out.push_str(&redact_query(q));
    }
    out.push_str(fragment);
    out
}

fn redact_userinfo(head: &str) -> String {
    let Some((scheme, rest)) = head.split_once("://") else {
        return head.to_string();
    };
    // A unix URL's path may hold an '@' (`/run/redis@1.sock`): only its authority,
    // before the path, can hold a user. A TCP URL's password may hold an unescaped
    // '/' (invalid, but then printed in the error): take its last '@'.
    let userinfo_end = if is_unix(head) {
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        authority.rfind('@')
    } else {
        rest.rfind('@')
    };
    match userinfo_end {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
            match userinfo.split_once(':') {
                Some((u, _)) => format!("{scheme}://{u}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        }
        None => head.to_string(),
    }
}

fn redact_query(query: &str) -> String {
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            // Compare the key as redis-rs reads it: percent-decoded.
            let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let key = url::form_urlencoded::parse(raw_key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if pair.is_empty() || matches!(key.as_str(), "db" | "protocol") {
                pair.to_string()
            } else if pair.contains('=') {
                format!("{raw_key}=***")
            } else {
                "***".to_string()
            }
        })
        .collect();
    pairs.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_match_the_original() {
        let c = Config::default();
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.db(), 1);
        assert_eq!(c.timeout_ms, 5_000);
        assert_eq!(c.max_request_bytes, 1 << 20);
        assert_eq!(c.connection_url().unwrap(), "redis://127.0.0.1:6379/1");
        c.validate().unwrap();
    }

    #[test]
    fn roles_name_users_with_tokens_and_only_admin() {
        let mut h = HttpConfig::default();
        h.tokens
            .insert("tom-secret-token-0123456789".into(), "tom".into());
        h.roles.insert("admin".into(), vec!["tom".into()]);
        h.validate().unwrap();
        h.roles.insert("admin".into(), vec!["ann".into()]);
        let e = h.validate().unwrap_err().to_string();
        assert!(e.contains("user \"ann\" has no token"), "{e}");
        h.roles.clear();
        h.roles.insert("root".into(), vec!["tom".into()]);
        let e = h.validate().unwrap_err().to_string();
        assert!(e.contains("unknown role \"root\""), "{e}");
    }

    #[test]
    fn env_picks_the_db_unless_the_url_names_one() {
        let mut c = Config {
            env: Env::Prod,
            ..Config::default()
        };
        assert_eq!(c.db(), 8);
        c.redis_url = "redis://h:1/0".into();
        assert_eq!(c.db(), 0);
        assert_eq!(c.connection_url().unwrap(), "redis://h:1/0");
        c.redis_url = "redis://h:1/?protocol=resp2".into();
        assert_eq!(c.connection_url().unwrap(), "redis://h:1/8?protocol=resp2");
        c.redis_url = "unix:///run/redis.sock".into();
        assert_eq!(c.connection_url().unwrap(), "unix:///run/redis.sock?db=8");
        c.redis_url = "unix:///run/redis.sock?db=2".into();
        assert_eq!(c.db(), 2);
    }

    #[test]
    fn bad_db_in_url_is_a_config_error() {
        for u in ["redis://h/abc", "redis://h/-1"] {
            let c = Config {
                redis_url: u.into(),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{u}");
        }
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact_url("redis://:pw@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("redis://h:6379/1"), "redis://h:6379/1");
        assert_eq!(redact_url("rediss://tok@h"), "rediss://***@h");
        for (url, want) in [
            (
                "redis+unix:///tmp/r.sock?db=3&pass=s3cret",
                "redis+unix:///tmp/r.sock?db=3&pass=***",
            ),
            (
                "unix:///tmp/r.sock?user=u&pass=s3cret",
                "unix:///tmp/r.sock?user=***&pass=***",
            ),
            // redis-rs decodes the key: `%70ass` is `pass`.
            (
                "unix:///tmp/r.sock?%70ass=s3cret",
                "unix:///tmp/r.sock?%70ass=***",
            ),
            ("unix:///tmp/r.sock?s3cret", "unix:///tmp/r.sock?***"),
            ("unix:///run/r@1.sock?db=2", "unix:///run/r@1.sock?db=2"),
            ("redis://:pa/s3cret@h:6379/1", "redis://:***@h:6379/1"),
            (
                "redis://u:s3cret@h/1?protocol=resp3",
                "redis://u:***@h/1?protocol=resp3",
            ),
            ("rediss://:s3cret@h#insecure", "rediss://:***@h#insecure"),
            ("redis://h#s3cret", "redis://h#***"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
        let c = Config {
            redis_url: "redis://:hunter2@h:6379".into(),
            ..Config::default()
        };
        assert!(!c.summary().contains("hunter2"));
    }

    #[test]
    fn flags_win_over_env_which_wins_over_file() {
        let mut c = Config::from_toml(
            "redis_url = \"redis://file:1\"\nenv = \"prod\"\nworkers = 3\n[access]\nusers=[\"tom\"]\n[functions.halt]\nusers=[\"foo\"]\n",
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.access.users, vec!["tom"]);
        assert_eq!(c.functions["halt"].users, Some(vec!["foo".to_string()]));
        let env: HashMap<&str, &str> =
            [("CERBAS_REDIS_URL", "redis://env:2"), ("CERBAS_ENV", "dev")].into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.redis_url, "redis://env:2");
        assert_eq!(c.env, Env::Dev);
        c.apply_overrides(&Overrides {
            redis_url: Some("redis://flag:3".into()),
            workers: Some(7),
            ..Overrides::default()
        });
        assert_eq!(c.redis_url, "redis://flag:3");
        assert_eq!(c.workers, 7);
        assert_eq!(c.env, Env::Dev);
    }

    #[test]
    fn bad_files_and_values_are_refused_with_a_reason() {
        let e = Config::from_toml("wrokers = 3").unwrap_err().to_string();
        assert!(e.contains("wrokers"), "{e}");
        assert!(Config::from_toml("workers = \"many\"").is_err());
        let mut c = Config::default();
        assert!(c
            .apply_env(|k| (k == "CERBAS_ENV").then(|| "staging".to_string()))
            .is_err());
        for bad in [
            Config {
                workers: 0,
                ..Config::default()
            },
            Config {
                prefix: "A B".into(),
                ..Config::default()
            },
            Config {
                timeout_ms: 0,
                ..Config::default()
            },
            Config {
                redis_url: "http://nope".into(),
                ..Config::default()
            },
            Config {
                republish_max_bytes: (1 << 30) + 1,
                ..Config::default()
            },
            Config {
                cron_tz: "Mars/Olympus".into(),
                ..Config::default()
            },
            Config {
                cron_user: String::new(),
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_size_and_duration_is_bounded() {
        for (toml, key) in [
            ("redis_pool_size = 9223372036854775807", "redis_pool_size"),
            ("redis_pool_size = 10000000000", "redis_pool_size"),
            ("redis_pool_size = 100000000", "redis_pool_size"),
            ("workers = 100000000", "workers"),
            ("max_hung_workers = 100000000", "max_hung_workers"),
            (
                "max_request_bytes = 9223372036854775807",
                "max_request_bytes",
            ),
            ("timeout_ms = 9223372036854775807", "timeout_ms"),
            ("drain_timeout_ms = 9223372036854775807", "drain_timeout_ms"),
            ("reply_grace_ms = 9223372036854775807", "reply_grace_ms"),
            ("max_delay_ms = 9223372036854775807", "max_delay_ms"),
            ("prefix = \"P\"\nredis_pool_size = 0", "redis_pool_size"),
            ("[limits]\nper_user = 0", "limits.per_user"),
            ("[limits]\nper_user = 100000", "limits.per_user"),
            (
                "[functions.f]\nmax_concurrent = 0",
                "functions.f.max_concurrent",
            ),
            (
                "[functions.f]\ntimeout_ms = 9223372036854775807",
                "functions.f.timeout_ms",
            ),
            (
                "[functions.f]\ncache_secs = 9223372036854775807",
                "functions.f.cache_secs",
            ),
        ] {
            let c = Config::from_toml(toml).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("{key} must be ")), "{toml}: {e}");
        }
    }

    #[test]
    fn a_url_names_its_db_once_as_redis_rs_reads_it() {
        assert_eq!(url_db("unix:///r.sock?db=2").unwrap(), Some(2));
        assert_eq!(url_db("unix:///r.sock?%64b=2").unwrap(), Some(2));
        assert_eq!(url_db("redis://h:1/3#insecure").unwrap(), Some(3));
        for u in [
            "unix:///r.sock?db=2&db=3",
            "redis+unix:///r.sock?db=2&%64b=3",
            "unix:///r.sock?db=",
            "redis://h:1?db=3",
        ] {
            let e = url_db(u).unwrap_err().to_string();
            assert!(e.starts_with("configuration: redis_url "), "{u}: {e}");
        }
    }

    #[test]
    fn a_toml_error_says_configuration_once() {
        let dir = std::env::temp_dir().join(format!("cerbas-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "workers = \"many\"\n").unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.matches("configuration").count(), 1, "{e}");
        assert!(e.contains("bad.toml") && e.contains("workers"), "{e}");
    }

    #[test]
    fn the_shipped_file_parses_and_registers_the_originals_examples() {
        let c = Config::from_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/cerbas.toml"
        )))
        .unwrap();
        c.validate().unwrap();
        for u in ["tom", "foo", "test"] {
            assert!(c.access.users.iter().any(|x| x == u), "{u}");
        }
        for s in ["cerbastest", "foo", "bar", "web", "tom", "test"] {
            assert!(c.access.sources.iter().any(|x| x == s), "{s}");
        }
        assert_eq!(c.functions["halt"].users, Some(vec!["foo".to_string()]));
        // Cron runs entries without a user as `cron`, which is registered.
        assert_eq!((c.cron_user.as_str(), c.cron_tz.as_str()), ("cron", "UTC"));
        assert!(c.access.users.contains(&c.cron_user));
        // Every other key keeps its documented default.
        let defaults = Config::default();
        assert_eq!(c.workers, defaults.workers);
        assert_eq!(c.timeout_ms, defaults.timeout_ms);
        assert_eq!(c.reply_grace_ms, defaults.reply_grace_ms);
        assert_eq!(c.republish_max_bytes, defaults.republish_max_bytes);
    }
}
