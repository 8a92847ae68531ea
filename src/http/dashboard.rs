//! The dashboard's routes on the Plug: `GET /dashboard` (the page, rendered on
//! the server), `/dashboard/state.json` (what the page's script polls every
//! second), `/dashboard/app.js` and `/dashboard/style.css` (compiled in), and
//! `POST /dashboard/action` (`dashboard/actions.rs`). Reads what it shows from
//! Redis here (instances' snapshots and heartbeats, the head of the queue, the
//! next delayed requests, cron entries' last outcomes, the recent errors) with a
//! short timeout, and hands it to `dashboard/state.rs`. Every answer carries a
//! strict Content-Security-Policy (no inline script or style, nothing from
//! elsewhere) and is not cached. With `[http.tokens]` every route needs a
//! configured token, as `/api` does: `Authorization: Bearer TOKEN`, or HTTP Basic
//! with the token as password (any user name), which a browser asks for and
//! then sends with the script's requests. Actions are for admins only
//! (`actions::may_act`); the page of anyone else has no action buttons and their
//! POSTs get 403. The HTTP server's types are touched only by [`asked`],
//! [`read_body`] and the `Reply` type (`mod.rs`). Not
//! for: what is shown or how, or what an action does (`src/dashboard/`).

use super::{auth, respond, text, with, Plug, Reply, Request};
use crate::dashboard::actions::{self, Action, Failed, Here};
use crate::dashboard::page;
use crate::dashboard::snapshot;
use crate::dashboard::state::{self, Raw, RawInstance, RawRequest, State};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// How long the dashboard waits for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Most keys `SCAN` looks at for cron entries per state: a bound on the cost in
/// a large keyspace (entries beyond it are not shown).
const SCAN_BUDGET: usize = 20_000;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// What the dashboard remembers between requests: when each request at the head
/// of the queue was first seen waiting (Redis clock, ms). `OBJECT IDLETIME` gives
/// a request's age the first time, but reading its body resets it.
#[derive(Default)]
pub(super) struct Dashboard {
    seen: Mutex<HashMap<u64, i64>>,
}

/// What the dashboard reads of an HTTP request.
#[derive(Debug, Default)]
struct Asked {
    /// GET or HEAD.
    get: bool,
    post: bool,
    authorization: Option<String>,
    origin: Option<String>,
    sec_fetch_site: Option<String>,
    host: Option<String>,
    content_type: Option<String>,
    csrf: Option<String>,
    from_loopback: bool,
}

/// Reads what the dashboard needs from an HTTP request.
fn asked(rq: &Request) -> Asked {
    let header = |name: &str| rq.header(name).map(str::to_string);
    Asked {
        get: matches!(rq.method(), "GET" | "HEAD"),
        post: rq.method() == "POST",
        authorization: header("Authorization"),
        origin: header("Origin"),
        sec_fetch_site: header("Sec-Fetch-Site"),
        host: header("Host"),
        content_type: header("Content-Type"),
        csrf: header("X-Cerbas-Csrf"),
        from_loopback: rq.remote_addr().ip().is_loopback(),
    }
}

/// Reads at most `max` bytes of the request's body; `None` when it is longer.
fn read_body(rq: &mut Request, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(rq.as_reader(), max as u64 + 1),
        &mut body,
    )?;
    Ok((body.len() <= max).then_some(body))
}

/// Handles a request whose path is `/dashboard` or under it.
pub(super) fn handle(
    plug: &Plug,
    dash: &Dashboard,
    rq: &mut Request,
    path: &str,
    proxies: Vec<state::Proxy>,
) -> Reply {
    let a = asked(rq);
    let reply = match (path, a.post) {
        ("/dashboard/action", true) => match read_body(rq, actions::MAX_BODY) {
            Ok(Some(body)) => act(plug, &a, &body),
            Ok(None) => json(413, "error", "an action is at most 4 KiB"),
            Err(_) => json(400, "error", "could not read the body"),
        },
        _ => route(plug, dash, &a, path, proxies),
    };
    secure(reply)
}

/// The user the request authenticates as, or the 401 to send.
fn authenticate(plug: &Plug, a: &Asked) -> Result<String, Reply> {
    allowed(plug, a.authorization.as_deref()).map_err(|denied| {
        let why = match denied {
            auth::Denied::Missing => "a token is required",
            auth::Denied::Invalid => "invalid token",
        };
        with(
            text(401, why),
            "WWW-Authenticate",
            "Basic realm=\"cerbas dashboard\", charset=\"UTF-8\"",
        )
    })
}

/// Whether `user` (authenticated) may take actions from where it asks.
fn admin(plug: &Plug, a: &Asked, user: &str) -> bool {
    actions::may_act(
        !plug.config.tokens.is_empty(),
        user,
        plug.config.roles.get("admin"),
        a.from_loopback,
    )
}

fn route(
    plug: &Plug,
    dash: &Dashboard,
    a: &Asked,
    path: &str,
    proxies: Vec<state::Proxy>,
) -> Reply {
    if path == "/dashboard/action" {
        return with(text(405, "method not allowed"), "Allow", "POST");
    }
    if !a.get {
        return with(text(405, "method not allowed"), "Allow", "GET, HEAD");
    }
    let user = match authenticate(plug, a) {
        Ok(user) => user,
        Err(reply) => return reply,
    };
    match path {
        "/dashboard" | "/dashboard/" => match read(plug, dash, proxies) {
            Ok(s) => {
                // The token goes only to a page whose buttons will be used.
                let token = admin(plug, a, &user).then(|| plug.secret.token());
                respond(
                    200,
                    "text/html; charset=utf-8",
                    page::render(&s, token).into_bytes(),
                )
            }
            Err(e) => unavailable(&e, "text/plain; charset=utf-8"),
        },
        "/dashboard/state.json" => match read(plug, dash, proxies) {
            Ok(s) => respond(
                200,
                "application/json",
                serde_json::to_vec(&s).unwrap_or_default(),
            ),
            Err(e) => unavailable(&e, "application/json"),
        },
        "/dashboard/app.js" => respond(
            200,
            "text/javascript; charset=utf-8",
            page::APP_JS.as_bytes().to_vec(),
        ),
        "/dashboard/style.css" => respond(
            200,
            "text/css; charset=utf-8",
            page::STYLE_CSS.as_bytes().to_vec(),
        ),
        _ => text(404, "NOT FOUND"),
    }
}

/// `{"<key>": message}` with `status`.
fn json(status: u16, key: &str, message: &str) -> Reply {
    let body = serde_json::json!({ key: message }).to_string().into_bytes();
    respond(status, "application/json", body)
}

/// `POST /dashboard/action`: who, from where, with which token, then what.
fn act(plug: &Plug, a: &Asked, body: &[u8]) -> Reply {
    let user = match authenticate(plug, a) {
        Ok(user) => user,
        Err(reply) => return reply,
    };
    if !admin(plug, a, &user) {
        return json(
            403,
            "error",
            "actions are for users with the admin role ([http.roles]), or from loopback without tokens",
        );
    }
    if !actions::same_origin(
        a.origin.as_deref(),
        a.sec_fetch_site.as_deref(),
        a.host.as_deref(),
    ) {
        return json(
            403,
            "error",
            "actions are taken from the dashboard's own page",
        );
    }
    let token_ok = a
        .csrf
        .as_deref()
        .is_some_and(|t| auth::same(t.as_bytes(), plug.secret.token().as_bytes()));
    if !token_ok {
        return json(
            403,
            "error",
            "missing or stale X-Cerbas-Csrf token: reload the page",
        );
    }
    // A JSON body cannot come from a plain HTML form of another site.
    if !a
        .content_type
        .as_deref()
        .is_some_and(|t| t.starts_with("application/json"))
    {
        return json(415, "error", "an action is sent as application/json");
    }
    let action: Action = match actions::parse(body) {
        Ok(action) => action,
        Err(why) => return json(400, "error", &why),
    };
    let here = Here {
        keys: &plug.keys,
        instance: &plug.instance,
        paused: &plug.paused,
        cron: &plug.cron,
    };
    let done = connect(plug)
        .map_err(Failed::Redis)
        .and_then(|mut c| action.take(&mut c, &here));
    match done {
        Ok(what) => {
            log::info!("dashboard: user {user:?}: {what}");
            json(200, "done", &what)
        }
        Err(Failed::Gone(why)) => json(404, "error", &why),
        Err(Failed::Redis(e)) => unavailable(&e, "application/json"),
    }
}

/// A connection for one dashboard request, with short timeouts.
fn connect(plug: &Plug) -> redis::RedisResult<redis::Connection> {
    let c = plug.redis.get_connection_with_timeout(REDIS_TIMEOUT)?;
    c.set_read_timeout(Some(REDIS_TIMEOUT))?;
    c.set_write_timeout(Some(REDIS_TIMEOUT))?;
    Ok(c)
}

/// 503 when Redis does not answer or refuses a read (a wrong-typed key). The
/// page says which kind of failure; the message itself is logged, not shown.
fn unavailable(e: &redis::RedisError, content_type: &str) -> Reply {
    log::debug!("dashboard: redis: {e}");
    let why = match crate::connection::is_lost(e) || e.is_timeout() {
        true => "redis did not answer".to_string(),
        false => format!(
            "redis refused a read ({:?}); see the server's log at debug",
            e.kind()
        ),
    };
    let body = match content_type {
        "application/json" => serde_json::json!({ "error": why }).to_string().into_bytes(),
        _ => why.into_bytes(),
    };
    with(respond(503, content_type, body), "Retry-After", "1")
}

/// The headers every dashboard answer carries.
fn secure(r: Reply) -> Reply {
    let r = with(r, "Content-Security-Policy", CSP);
    let r = with(r, "X-Content-Type-Options", "nosniff");
    let r = with(r, "Referrer-Policy", "no-referrer");
    let r = with(r, "X-Frame-Options", "DENY");
    with(r, "Cache-Control", "no-store")
}

/// Whether the request may see the dashboard: anyone without `[http.tokens]`,
/// else whoever presents a configured token (Bearer, or Basic's password).
fn allowed(plug: &Plug, authorization: Option<&str>) -> Result<String, auth::Denied> {
    let bearer = authorization
        .and_then(basic_password)
        .map(|t| format!("Bearer {t}"));
    auth::user(
        &plug.config.tokens,
        &plug.config.user,
        bearer.as_deref().or(authorization),
    )
}

/// The password of an `Authorization: Basic …` header, if it is one.
fn basic_password(header: &str) -> Option<String> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64(encoded.trim())?).ok()?;
    let (_, password) = decoded.split_once(':')?;
    Some(password.to_string())
}

/// Standard base64 (RFC 4648, padding optional); `None` if malformed.
fn base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// KEYS: pairs of request keys (the key, its fallback name). ARGV: bytes to read.
/// For each pair: the size, the first bytes and `OBJECT IDLETIME` (seconds, read
/// before the body, which resets it; -1 if unknown) of whichever key exists;
/// size -1 when neither does, -2 when it is not a string.
const BODIES: &str = r"
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  if redis.call('EXISTS', k) == 0 then k = KEYS[i + 1] end
  local idle = redis.pcall('OBJECT', 'IDLETIME', k)
  if type(idle) ~= 'number' then idle = -1 end
  local size, body = -1, ''
  if redis.call('EXISTS', k) == 1 then
    size = redis.pcall('STRLEN', k)
    if type(size) == 'number' then
      body = redis.call('GETRANGE', k, 0, tonumber(ARGV[1]) - 1)
    else
      size = -2
    end
  end
  out[#out + 1] = size
  out[#out + 1] = body
  out[#out + 1] = idle
end
return out
";

type Conn = redis::Connection;

/// Reads the cluster's state from Redis.
fn read(plug: &Plug, dash: &Dashboard, proxies: Vec<state::Proxy>) -> redis::RedisResult<State> {
    let mut c = connect(plug)?;
    let keys = &plug.keys;
    let n = state::MAX_REQUESTS as isize;
    #[allow(clippy::type_complexity)]
    let ((secs, micros), queue_length, head, delayed_count, delayed, written, members): (
        (i64, i64),
        u64,
        Vec<String>,
        u64,
        Vec<(String, f64)>,
        Vec<(String, f64)>,
        Vec<String>,
    ) = redis::pipe()
        .cmd("TIME")
        .cmd("LLEN")
        .arg(keys.queue())
        .cmd("LRANGE")
        .arg(keys.queue())
        .arg(0)
        .arg(n - 1)
        .cmd("ZCARD")
        .arg(keys.delayed())
        .cmd("ZRANGE")
        .arg(keys.delayed())
        .arg(0)
        .arg(n - 1)
        .arg("WITHSCORES")
        .cmd("ZRANGE")
        .arg(snapshot::index(keys))
        .arg(0)
        .arg(state::MAX_INSTANCES as isize - 1)
        .arg("WITHSCORES")
        .cmd("SRANDMEMBER")
        .arg(keys.instances())
        .arg(state::MAX_INSTANCES)
        .query(&mut c)?;
    // A wrong-typed list hides the errors, not the page.
    let errors: Vec<String> = match redis::cmd("LRANGE")
        .arg(snapshot::errors_key(keys))
        .arg(0)
        .arg(crate::dashboard::errors::MAX_ERRORS as isize - 1)
        .query(&mut c)
    {
        Err(e) if crate::connection::is_lost(&e) || e.is_timeout() => return Err(e),
        Err(_) => Vec::new(),
        Ok(list) => list,
    };
    let now_ms = secs * 1000 + micros / 1000;
    let instances = read_instances(&mut c, plug, written, members)?;
    // Queue entries that are not ids (a client's mistake) are not shown.
    let ids: Vec<u64> = head
        .iter()
        .filter_map(|e| crate::protocol::parse_queue_entry(e.as_bytes()))
        .collect();
    let mut waiting = read_bodies(&mut c, plug, &ids)?;
    dash.first_seen(&mut waiting, now_ms);
    let due: Vec<(u64, i64)> = delayed
        .iter()
        .filter_map(|(id, score)| Some((id.parse().ok()?, *score as i64)))
        .collect();
    let mut delayed = read_bodies(&mut c, plug, &due.iter().map(|d| d.0).collect::<Vec<_>>())?;
    for (r, (_, due_ms)) in delayed.iter_mut().zip(&due) {
        r.since_ms = None;
        r.due_ms = Some(*due_ms);
    }
    let cron = read_cron(&mut c, plug)?;
    Ok(state::assemble(Raw {
        now_ms,
        serving: plug.instance.clone(),
        heartbeat_ttl_ms: crate::scheduler::HEARTBEAT_TTL.as_millis() as i64,
        instances,
        queue_length,
        waiting,
        delayed_count,
        delayed,
        cron,
        crontab: plug
            .cron
            .get()
            .into_iter()
            .map(|(e, next)| state::RawCronLine {
                func: e.func().to_string(),
                schedule: e.schedule.text().to_string(),
                entry: e.id,
                next_ms: next.map(|t| t.saturating_mul(1000)),
            })
            .collect(),
        errors,
        proxies,
    }))
}

/// Every instance with a snapshot or registered in `P-INSTANCES`, with its
/// snapshot and heartbeat.
fn read_instances(
    c: &mut Conn,
    plug: &Plug,
    written: Vec<(String, f64)>,
    members: Vec<String>,
) -> redis::RedisResult<Vec<RawInstance>> {
    let written: HashMap<String, i64> = written.into_iter().map(|(n, s)| (n, s as i64)).collect();
    let names: BTreeSet<String> = written.keys().cloned().chain(members).collect();
    let names: Vec<String> = names.into_iter().take(state::MAX_INSTANCES).collect();
    let mut pipe = redis::pipe();
    for name in &names {
        pipe.cmd("GET")
            .arg(snapshot::key(&plug.keys, name))
            .cmd("PTTL")
            .arg(plug.keys.heartbeat(name));
    }
    let answers: Vec<(Option<String>, i64)> = match names.is_empty() {
        true => Vec::new(),
        false => pipe.query(c)?,
    };
    Ok(names
        .into_iter()
        .zip(answers)
        .map(|(name, (snapshot, heartbeat_pttl))| RawInstance {
            written_ms: written.get(&name).copied(),
            name,
            snapshot,
            heartbeat_pttl,
        })
        .collect())
}

/// The first bytes, size and idle time of each request's body.
fn read_bodies(c: &mut Conn, plug: &Plug, ids: &[u64]) -> redis::RedisResult<Vec<RawRequest>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let script = redis::Script::new(BODIES);
    let mut call = script.prepare_invoke();
    for id in ids {
        call.key(plug.keys.request(*id))
            .key(plug.keys.request_fallback(*id));
    }
    let answers: Vec<redis::Value> = call.arg(state::BODY_PREFIX).invoke(c)?;
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => *n,
        _ => -1,
    };
    Ok(ids
        .iter()
        .zip(answers.chunks(3))
        .map(|(&id, a)| {
            let size = a.first().map_or(-1, int);
            let prefix = match a.get(1) {
                Some(redis::Value::BulkString(b)) if size >= 0 => Some(b.clone()),
                _ => None,
            };
            let idle = a.get(2).map_or(-1, int);
            RawRequest {
                id,
                prefix,
                size: size.max(0) as u64,
                // Idle seconds, to be turned into a time by `first_seen`.
                since_ms: (idle >= 0).then_some(idle),
                due_ms: None,
            }
        })
        .collect())
}

impl Dashboard {
    /// Turns each request's idle seconds into when it was first seen waiting: the
    /// earlier of what this dashboard remembers and what `OBJECT IDLETIME` says
    /// now. Forgets requests no longer at the head of the queue.
    fn first_seen(&self, waiting: &mut [RawRequest], now_ms: i64) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let mut kept = HashMap::with_capacity(waiting.len());
        for r in waiting.iter_mut() {
            let by_idle = r.since_ms.map(|idle| now_ms - idle * 1000);
            let since = match (seen.get(&r.id).copied(), by_idle) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(now_ms),
            };
            r.since_ms = Some(since);
            kept.insert(r.id, since);
        }
        *seen = kept;
    }
}

/// Cron entries' last outcomes (`P-CRON-LAST-*`), found with a bounded `SCAN`.
fn read_cron(
    c: &mut Conn,
    plug: &Plug,
) -> redis::RedisResult<Vec<(String, HashMap<String, String>)>> {
    let prefix = plug.keys.cron_last("");
    let pattern = format!("{}*", redis_glob_escape(&prefix));
    let mut cursor: u64 = 0;
    let mut looked = 0;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(c)?;
        found.extend(keys);
        looked += 1000;
        cursor = next;
        if cursor == 0 || looked >= SCAN_BUDGET || found.len() >= state::MAX_CRON {
            break;
        }
    }
    found.sort();
    found.dedup();
    found.truncate(state::MAX_CRON);
    let mut out = Vec::with_capacity(found.len());
    for key in found {
        // A key of another type under the name is skipped, not an error.
        if let Ok(h) = redis::cmd("HGETALL")
            .arg(&key)
            .query::<HashMap<String, String>>(c)
        {
            let entry = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            out.push((entry, h));
        }
    }
    Ok(out)
}

/// `s` with the characters that mean something in a `SCAN MATCH` pattern escaped.
fn redis_glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_what_browsers_send() {
        assert_eq!(base64("dG9tOnB3").as_deref(), Some(&b"tom:pw"[..]));
        assert_eq!(base64("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64("").as_deref(), Some(&b""[..]));
        assert_eq!(base64("Y"), None);
        assert_eq!(base64("dG9t!B3"), None);
    }

    #[test]
    fn basic_gives_its_password() {
        // "anyone:s3cret:with-colon"
        assert_eq!(
            basic_password("Basic YW55b25lOnMzY3JldDp3aXRoLWNvbG9u").as_deref(),
            Some("s3cret:with-colon")
        );
        assert_eq!(basic_password("Bearer abc"), None);
        assert_eq!(basic_password("Basic !!!"), None);
        // No colon: not user:password.
        assert_eq!(basic_password("Basic dG9t"), None);
    }

    #[test]
    fn first_seen_keeps_the_earliest_time() {
        let d = Dashboard::default();
        let mut w = vec![
            RawRequest {
                id: 1,
                since_ms: Some(10), // idle 10 s
                ..RawRequest::default()
            },
            RawRequest {
                id: 2,
                since_ms: None, // IDLETIME unknown
                ..RawRequest::default()
            },
        ];
        d.first_seen(&mut w, 100_000);
        assert_eq!(w[0].since_ms, Some(90_000));
        assert_eq!(w[1].since_ms, Some(100_000));
        // Read again a second later: reading reset the idle time to 1 s.
        let mut w = vec![RawRequest {
            id: 1,
            since_ms: Some(1),
            ..RawRequest::default()
        }];
        d.first_seen(&mut w, 101_000);
        assert_eq!(w[0].since_ms, Some(90_000));
        // Id 2 left the head of the queue: forgotten.
        assert_eq!(d.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(redis_glob_escape("A-[x]*?\\"), "A-\\[x\\]\\*\\?\\\\");
    }
}
