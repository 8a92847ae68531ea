//! The wire protocol of DESIGN.md §2, kept compatible with the original CERBAS:
//! key and channel names, queue entries, request bodies, and reply encoding (JSON
//! and msgpack). Pure: no I/O, no clock, so all of it is unit-tested without Redis.
//! Not for: deciding what to do with a request (that is `dispatch.rs`).

use crate::error::RequestError;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The key prefix the original used and every existing client expects.
pub const DEFAULT_PREFIX: &str = "CERBAS";

/// How deep arrays and objects may nest in a request body, the body's own object
/// counting as level 1. It keeps a hostile body from exhausting the reader's stack.
/// (serde_json's built-in limit would refuse level 128 itself; we count the levels
/// first and parse without it.)
pub const MAX_DEPTH: usize = 128;

/// Names of every key and channel for one prefix and Redis database.
///
/// ```
/// let keys = cerbas::Keys::new("CERBAS", 1);
/// assert_eq!(keys.request(7), "CERBAS-REQ-0000000007");
/// assert_eq!(keys.reply_channel(7), "CERBAS-RESPONSE-1-0000000007");
/// assert_eq!(keys.msgpack_channel(7), "MSGPACK:CERBAS-RESPONSE-1-0000000007");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    db: i64,
    // What precedes an id in the names made once per request, made once here.
    request: String,
    fallback: String,
    reply: String,
}

/// What precedes the padded id in a request's key, its fallback key and its
/// JSON reply channel (the msgpack channel adds `MSGPACK:` before).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdPrefixes<'a> {
    pub(crate) request: &'a str,
    pub(crate) fallback: &'a str,
    pub(crate) reply: &'a str,
}

impl Keys {
    /// Keys for `prefix` (normally [`DEFAULT_PREFIX`]) in database `db`.
    pub fn new(prefix: &str, db: i64) -> Self {
        Keys {
            prefix: prefix.to_string(),
            db,
            request: format!("{prefix}-REQ-"),
            fallback: format!("{prefix}-REQUEST-"),
            reply: format!("{prefix}-RESPONSE-{db}-"),
        }
    }

    /// The Redis database number, part of every reply channel's name.
    pub fn db(&self) -> i64 {
        self.db
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P-COUNTER`: clients `INCR` it to get a request id.
    pub fn counter(&self) -> String {
        format!("{}-COUNTER", self.prefix)
    }

    /// `P-QUEUE`: the list of request ids waiting to be served.
    pub fn queue(&self) -> String {
        format!("{}-QUEUE", self.prefix)
    }

    /// `P-REQ-{id:010}`: where a client stores the request body.
    pub fn request(&self, id: u64) -> String {
        format!("{}{id:010}", self.request)
    }

    /// `P-REQ-`: what [`Keys::request`] puts before the padded id (cron's claim
    /// script writes request keys itself).
    pub fn request_prefix(&self) -> String {
        self.request.clone()
    }

    /// `P-REQUEST-{id:010}`: the name later versions of the original's Python client
    /// use; read only when [`Keys::request`] is missing.
    pub fn request_fallback(&self, id: u64) -> String {
        format!("{}{id:010}", self.fallback)
    }

    /// What precedes the padded id in [`Keys::request`] and
    /// [`Keys::request_fallback`], for the reader's script, which names the keys
    /// of the ids it takes itself.
    ///
    /// ```
    /// let keys = cerbas::Keys::new("CERBAS", 1);
    /// let (key, fallback) = keys.request_prefixes();
    /// assert_eq!(format!("{key}0000000042"), keys.request(42));
    /// assert_eq!(format!("{fallback}0000000042"), keys.request_fallback(42));
    /// ```
    pub fn request_prefixes(&self) -> (String, String) {
        (self.request.clone(), self.fallback.clone())
    }

    /// `P-RESPONSE-{db}-{id:010}`: the channel the JSON reply is published on.
    pub fn reply_channel(&self, id: u64) -> String {
        format!("{}{id:010}", self.reply)
    }

    /// What precedes the padded id in [`Keys::request`], [`Keys::request_fallback`]
    /// and [`Keys::reply_channel`], borrowed: for commands packed by hand.
    pub(crate) fn id_prefixes(&self) -> IdPrefixes<'_> {
        IdPrefixes {
            request: &self.request,
            fallback: &self.fallback,
            reply: &self.reply,
        }
    }

    /// `MSGPACK:P-RESPONSE-{db}-{id:010}`: the channel of the msgpack reply.
    pub fn msgpack_channel(&self, id: u64) -> String {
        format!("MSGPACK:{}", self.reply_channel(id))
    }

    /// A `PUBSUB CHANNELS` glob matching both reply channels of every id (and
    /// maybe more: [`Keys::reply_channel_id`] sorts the answer), with the prefix's
    /// glob characters escaped.
    ///
    /// ```
    /// let keys = cerbas::Keys::new("A*B", 0);
    /// assert_eq!(keys.reply_channel_pattern(), r"*A\*B-RESPONSE-0-*");
    /// ```
    pub fn reply_channel_pattern(&self) -> String {
        let mut p = String::from("*");
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push_str(&format!("-RESPONSE-{}-*", self.db));
        p
    }

    /// The id whose reply `channel` is (JSON or msgpack), or `None` for any other
    /// channel.
    ///
    /// ```
    /// let keys = cerbas::Keys::new("CERBAS", 1);
    /// assert_eq!(keys.reply_channel_id(b"MSGPACK:CERBAS-RESPONSE-1-0000000007"), Some(7));
    /// assert_eq!(keys.reply_channel_id(b"CERBAS-RESPONSE-2-0000000007"), None);
    /// ```
    pub fn reply_channel_id(&self, channel: &[u8]) -> Option<u64> {
        // The JSON channel first: a prefix may itself start with `MSGPACK:`.
        let json = self.reply_id(channel);
        json.or_else(|| self.reply_id(channel.strip_prefix(b"MSGPACK:")?))
    }

    /// The id whose JSON reply channel is `channel`.
    fn reply_id(&self, channel: &[u8]) -> Option<u64> {
        let rest = channel.strip_prefix(self.reply.as_bytes())?;
        // `{id:010}`: at least ten digits, more only without a leading zero.
        let well_formed = rest.len() >= 10
            && rest.iter().all(u8::is_ascii_digit)
            && (rest.len() == 10 || rest[0] != b'0');
        if !well_formed {
            return None;
        }
        std::str::from_utf8(rest).ok()?.parse().ok()
    }

    /// `P-PROCESSING-{instance}`: the ids one server instance has taken from the
    /// queue and not yet answered (the reliable-queue pattern of DESIGN §4).
    pub fn processing(&self, instance: &str) -> String {
        format!("{}-PROCESSING-{instance}", self.prefix)
    }

    /// `P-{name}`: a key under the prefix, for functions that keep state in Redis.
    pub fn key(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `P-HEARTBEAT-{instance}`: exists (with a short expiry) while the instance lives.
    pub fn heartbeat(&self, instance: &str) -> String {
        format!("{}-HEARTBEAT-{instance}", self.prefix)
    }

    /// `P-PAUSED-{instance}`: exists while the dashboard has paused the instance
    /// (it takes no requests).
    pub fn paused(&self, instance: &str) -> String {
        format!("{}-PAUSED-{instance}", self.prefix)
    }

    /// `P-INSTANCES`: the set of instances that may hold requests.
    pub fn instances(&self) -> String {
        format!("{}-INSTANCES", self.prefix)
    }

    /// `P-DELAYED`: delayed request ids, scored by due time (ms since the epoch, by
    /// the Redis server's clock).
    pub fn delayed(&self) -> String {
        format!("{}-DELAYED", self.prefix)
    }

    /// `P-CRON-TICK-{entry}-{tick}`: the claim of one tick of one cron entry (an
    /// entry's id is a hash of its line, the tick in unix seconds). The instance
    /// that creates it turns the tick into a request; it expires on its own.
    pub fn cron_claim(&self, entry: &str, tick: i64) -> String {
        format!("{}-CRON-TICK-{entry}-{tick}", self.prefix)
    }

    /// `P-CRON-LAST-{entry}`: a hash with the last outcome of a cron entry (and
    /// counts of its runs), for `cerbas cron list`, metrics and dashboards.
    pub fn cron_last(&self, entry: &str) -> String {
        format!("{}-CRON-LAST-{entry}", self.prefix)
    }

    /// `P-CACHE-{func}-{hash}`: a cached ok reply of `func` for `args`. The value
    /// holds the function and arguments too ([`cache_entry`]), so a hash collision
    /// is detected, never served.
    pub fn cache(&self, func: &str, args: &Map<String, Value>) -> String {
        format!(
            "{}-CACHE-{func}-{:016x}",
            self.prefix,
            fnv1a(&canonical_args(args))
        )
    }
}

/// The arguments as text with object keys sorted at every level, so `{"a":1,"b":2}`
/// and `{"b":2,"a":1}` are the same call.
pub fn canonical_args(args: &Map<String, Value>) -> String {
    // serde_json's Map is a BTreeMap here (no `preserve_order`): keys come sorted.
    serde_json::to_string(args).unwrap_or_default()
}

/// What a cache entry holds: the call and its reply's data.
pub fn cache_entry(func: &str, args: &Map<String, Value>, data: &Value) -> String {
    serde_json::json!({"func": func, "args": canonical_args(args), "data": data}).to_string()
}

/// The cached data in `entry` if it is for this very call.
pub fn cache_hit(entry: &[u8], func: &str, args: &Map<String, Value>) -> Option<Value> {
    let Value::Object(mut e) = serde_json::from_slice(entry).ok()? else {
        return None;
    };
    let same = e.get("func").and_then(Value::as_str) == Some(func)
        && e.get("args").and_then(Value::as_str) == Some(canonical_args(args).as_str());
    if same {
        e.remove("data")
    } else {
        None
    }
}

/// A 64-bit FNV-1a hash: cache keys and cron entry ids (stable across builds and
/// machines, unlike `std`'s hasher).
pub(crate) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Parses a queue entry into a request id. Only the decimal form of a `u64`, as
/// `INCR` writes it, is an id: `abc`, ``, `-3`, `+3`, `007` and a 40-digit number
/// are not. (The form must be canonical: the ack removes the id by its text.)
///
/// ```
/// assert_eq!(cerbas::protocol::parse_queue_entry(b"42"), Some(42));
/// assert_eq!(cerbas::protocol::parse_queue_entry(b"-3"), None);
/// ```
pub fn parse_queue_entry(entry: &[u8]) -> Option<u64> {
    if entry.is_empty()
        || !entry.iter().all(u8::is_ascii_digit)
        || (entry.len() > 1 && entry[0] == b'0')
    {
        return None;
    }
    std::str::from_utf8(entry).ok()?.parse().ok()
}

/// How much of a queue entry that is not an id the log shows.
pub const ENTRY_SHOWN: usize = 64;

/// A queue entry that is not an id, as the log shows it: its first
/// [`ENTRY_SHOWN`] bytes (lossy UTF-8, quoted) and its size when longer, so a
/// 20 MB entry costs a line, not 20 MB of log.
///
/// ```
/// use cerbas::protocol::describe_entry;
/// assert_eq!(describe_entry(b"abc"), r#""abc""#);
/// assert_eq!(describe_entry(&[b'x'; 100]), format!("{:?}… (100 bytes)", "x".repeat(64)));
/// ```
pub fn describe_entry(entry: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&entry[..entry.len().min(ENTRY_SHOWN)]);
    if entry.len() > ENTRY_SHOWN {
        format!("{shown:?}… ({} bytes)", entry.len())
    } else {
        format!("{shown:?}")
    }
}

/// A request body that passed every syntactic check.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Name of the function to run.
    pub func: String,
    /// Its arguments (an absent or `null` `args` is an empty object).
    pub args: Map<String, Value>,
    /// The registered user who asks.
    pub user: Option<String>,
    /// The registered kind of program that asks.
    pub source: Option<String>,
    /// Run no earlier than this many milliseconds after the request was read.
    pub delay_ms: Option<u64>,
    /// For a request parsed with a `delay`: its body without the delay, every other
    /// member's value as the client's own bytes. It is what is stored while the
    /// request waits, so it comes due exactly as sent (`9e15` stays `9e15`) and
    /// never larger than the body that was accepted.
    pub body_without_delay: Option<String>,
    /// Whether the client wants the reply published: `"reply": false` (a one-way
    /// call) says no; absent or `null` is yes, as old clients expect.
    pub reply: bool,
    /// Set on the requests cron writes (`"cron": {"entry": …, "tick": …}`): which
    /// entry and tick the run is for, so its outcome is recorded for the entry.
    /// (Boxed: most requests have none, and jobs are moved between threads.)
    pub cron: Option<Box<CronTag>>,
}

/// Which cron entry, and which of its ticks, a request runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronTag {
    /// The entry's id: 16 hex digits, a hash of its CRONTAB line.
    pub entry: String,
    /// The tick, in unix seconds.
    pub tick: i64,
}

impl CronTag {
    /// The tag as the request's `cron` member.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"entry": self.entry, "tick": self.tick})
    }

    fn parse(v: Value) -> Result<CronTag, RequestError> {
        let Value::Object(mut o) = v else {
            return Err(RequestError::BadCron);
        };
        let entry = match o.remove("entry") {
            Some(Value::String(e))
                if !e.is_empty()
                    && e.len() <= 64
                    && e.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                e
            }
            _ => return Err(RequestError::BadCron),
        };
        let tick = o
            .remove("tick")
            .and_then(|t| t.as_i64())
            .ok_or(RequestError::BadCron)?;
        Ok(CronTag { entry, tick })
    }
}

impl Request {
    /// A request for `func` with `args`, as HTTP, cron and tests build them.
    pub fn new(func: &str, args: Map<String, Value>) -> Self {
        Request {
            func: func.to_string(),
            args,
            user: None,
            source: None,
            delay_ms: None,
            body_without_delay: None,
            reply: true,
            cron: None,
        }
    }

    /// The request as a JSON body without its `delay`: what is stored for a delayed
    /// request, so that when it comes due it runs as an ordinary one. The client's
    /// own bytes when the request was parsed from a body; otherwise built from the
    /// fields.
    pub fn to_json_without_delay(&self) -> String {
        if let Some(body) = &self.body_without_delay {
            return body.clone();
        }
        let mut obj = Map::new();
        obj.insert("func".into(), Value::String(self.func.clone()));
        obj.insert("args".into(), Value::Object(self.args.clone()));
        for (field, v) in [("user", &self.user), ("source", &self.source)] {
            if let Some(v) = v {
                obj.insert(field.into(), Value::String(v.clone()));
            }
        }
        if !self.reply {
            obj.insert("reply".into(), Value::Bool(false));
        }
        if let Some(tag) = &self.cron {
            obj.insert("cron".into(), tag.to_json());
        }
        Value::Object(obj).to_string()
    }
}

/// Parses and checks a request body (DESIGN §2), from raw bytes as they come out of
/// Redis. Every failure is a [`RequestError`] whose text is the reply's message.
///
/// ```
/// use cerbas::protocol::parse_request;
/// let r = parse_request(br#"{"func":"sum","args":{"a":1,"b":2},"user":"tom","source":"web"}"#, 1024).unwrap();
/// assert_eq!(r.func, "sum");
/// assert_eq!(parse_request(b"[1]", 1024).unwrap_err().to_string(), "request must be a JSON object");
/// ```
pub fn parse_request(body: &[u8], max_bytes: usize) -> Result<Request, RequestError> {
    if body.len() > max_bytes {
        return Err(RequestError::TooLarge {
            size: body.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    if nests_deeper_than(body, MAX_DEPTH) {
        return Err(RequestError::TooDeep(MAX_DEPTH));
    }
    // An object's members are read into their own slots (no map of the whole
    // body: a tenth of the reader's CPU at W2 went into building one and taking
    // it apart); anything else is parsed whole, for its error.
    let mut obj = if text.trim_start_matches(JSON_SPACE).starts_with('{') {
        from_str_nested::<Members>(text).map_err(|e| RequestError::Malformed(e.to_string()))?
    } else {
        // Malformed (its error), or a value that is not an object.
        from_str_nested::<Value>(text).map_err(|e| RequestError::Malformed(e.to_string()))?;
        return Err(RequestError::NotAnObject);
    };
    request_from(&mut obj, text)
}

/// The request of a body `text` whose top level is an object of `obj`.
fn request_from(obj: &mut Members, text: &str) -> Result<Request, RequestError> {
    let func = match obj.remove("func") {
        None | Some(Value::Null) => return Err(RequestError::Missing("func")),
        Some(Value::String(f)) => f,
        Some(_) => return Err(RequestError::NotAString("func")),
    };
    let args = match obj.remove("args") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return Err(RequestError::ArgsNotObject),
    };
    let user = optional_string(obj, "user")?;
    let source = optional_string(obj, "source")?;
    let delay_ms = match obj.remove("delay") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().ok_or(RequestError::BadDelay)?),
        Some(_) => return Err(RequestError::BadDelay),
    };
    // Only a request that will wait needs its body kept; parsed a second time,
    // cheaply: each member's value is only checked, not built.
    let body_without_delay = match delay_ms {
        Some(ms) if ms > 0 => Some(strip_delay(text)?),
        _ => None,
    };
    let reply = match obj.remove("reply") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(RequestError::ReplyNotBool),
    };
    let cron = match obj.remove("cron") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Box::new(CronTag::parse(v)?)),
    };
    Ok(Request {
        func,
        args,
        user,
        source,
        delay_ms,
        body_without_delay,
        reply,
        cron,
    })
}

/// What JSON counts as whitespace between tokens.
const JSON_SPACE: [char; 4] = [' ', '\t', '\n', '\r'];

/// The top-level members of a request body that mean something, each the last
/// value given for it (a repeated member's last value wins, as in a JSON
/// object read into a map); other members are read and dropped.
struct Members([Option<Value>; MEMBERS.len()]);

const MEMBERS: [&str; 7] = ["func", "args", "user", "source", "delay", "reply", "cron"];

impl Members {
    /// The value of member `name` (one of [`MEMBERS`]), taken out.
    fn remove(&mut self, name: &str) -> Option<Value> {
        let i = MEMBERS.iter().position(|m| *m == name)?;
        self.0[i].take()
    }
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

impl<'de> serde::de::Visitor<'de> for MembersVisitor {
    type Value = Members;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
        let mut members = Members(Default::default());
        while let Some(MemberName(slot)) = map.next_key()? {
            match slot {
                Some(i) => members.0[i] = Some(map.next_value()?),
                // Read whole all the same: skipping it would let through
                // what a value refuses (a number out of range, a lone
                // surrogate), which the body was refused for before.
                None => {
                    map.next_value::<Value>()?;
                }
            }
        }
        Ok(members)
    }
}

/// A member's name, as its place in [`MEMBERS`] (`None`: not one of them),
/// read without a copy of the name.
struct MemberName(Option<usize>);

impl<'de> serde::Deserialize<'de> for MemberName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = MemberName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<MemberName, E> {
                Ok(MemberName(MEMBERS.iter().position(|m| *m == name)))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// `text` (a JSON object that parsed) without its top-level `delay`. Each value is
/// the client's bytes; keys are written again (escaped minimally, so never longer).
/// A repeated key keeps its last value, as the parse above does.
fn strip_delay(text: &str) -> Result<String, RequestError> {
    let members: BTreeMap<String, Box<RawValue>> =
        from_str_nested(text).map_err(|e| RequestError::Malformed(e.to_string()))?;
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (key, value) in members.iter().filter(|(k, _)| k.as_str() != "delay") {
        if out.len() > 1 {
            out.push(',');
        }
        // Serializing a string cannot fail.
        out.push_str(&serde_json::to_string(key).unwrap_or_default());
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Ok(out)
}

/// Whether arrays and objects in `body` nest deeper than `max` levels. Brackets
/// inside strings don't count; the text need not be valid JSON (then the parse
/// that follows says what is wrong with it).
fn nests_deeper_than(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses JSON without serde_json's recursion limit (it stops one level short of
/// ours); only for text that [`nests_deeper_than`] has bounded.
fn from_str_nested<'a, T: serde::Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

fn optional_string(obj: &mut Members, field: &'static str) -> Result<Option<String>, RequestError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RequestError::NotAString(field)),
    }
}

/// A reply to a request: `{"status":"ok","data":…}` or `{"status":"error","data":"…"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The function's value.
    Ok(Value),
    /// An error message.
    Error(String),
}

#[derive(Serialize)]
struct Wire<'a> {
    status: &'static str,
    data: &'a Value,
}

impl Reply {
    fn wire<R>(&self, encode: impl FnOnce(&Wire) -> R) -> R {
        match self {
            Reply::Ok(v) => encode(&Wire {
                status: "ok",
                data: v,
            }),
            Reply::Error(m) => encode(&Wire {
                status: "error",
                data: &Value::String(m.clone()),
            }),
        }
    }

    /// The JSON form, published on the reply channel.
    ///
    /// ```
    /// use cerbas::Reply;
    /// assert_eq!(Reply::Ok("hi".into()).to_json(), br#"{"status":"ok","data":"hi"}"#);
    /// ```
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a Value with string keys cannot fail.
        self.wire(|w| serde_json::to_vec(w).unwrap_or_default())
    }

    /// The msgpack form (a map with string keys), published on the `MSGPACK:` channel.
    pub fn to_msgpack(&self) -> Vec<u8> {
        self.wire(|w| rmp_serde::to_vec_named(w).unwrap_or_default())
    }

    /// Parses the JSON form back, as clients do.
    pub fn from_json(bytes: &[u8]) -> Result<Reply, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Self::from_value(v)
    }

    /// Parses the msgpack form back, as clients do.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Reply, String> {
        let v: Value = rmp_serde::from_slice(bytes).map_err(|e| e.to_string())?;
        Self::from_value(v)
    }

    fn from_value(v: Value) -> Result<Reply, String> {
        let Value::Object(mut obj) = v else {
            return Err("reply is not an object".into());
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        match obj.get("status").and_then(Value::as_str) {
            Some("ok") => Ok(Reply::Ok(data)),
            Some("error") => match data {
                Value::String(m) => Ok(Reply::Error(m)),
                other => Ok(Reply::Error(other.to_string())),
            },
            _ => Err("reply has no valid status".into()),
        }
    }
}

impl From<RequestError> for Reply {
    fn from(e: RequestError) -> Self {
        Reply::Error(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// How parse_request read a body before it read members into slots: the
    /// whole body into a map, each member then taken out of it.
    fn parse_via_map(body: &[u8]) -> Result<Request, RequestError> {
        let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
        let value: Value =
            from_str_nested(text).map_err(|e| RequestError::Malformed(e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(RequestError::NotAnObject);
        };
        let mut obj = Members(MEMBERS.map(|m| map.remove(m)));
        request_from(&mut obj, text)
    }

    /// Members read into slots give what the map gave: repeated members (the
    /// last wins, valid or not), escaped names, unknown members of any shape,
    /// nulls, JSON whitespace, and every kind of top level and malformed body.
    #[test]
    fn members_read_into_slots_parse_as_the_whole_map_did() {
        let bodies = [
            r#"{"func":"echo","args":{"m":1},"user":"tom","source":"web"}"#,
            r#"{"func":1,"func":"echo"}"#,
            r#"{"func":"echo","func":1}"#,
            r#"{"func":"echo","args":[1],"args":{"a":{"b":[1,{"c":null}]}}}"#,
            r#"{"fu\u006ec":"echo","\u0061rgs":null}"#,
            r#"{"func":"echo","other":{"deep":[[[{"x":"y"}]]]},"more":[1,2,"3"]}"#,
            r#"{"func":null}"#,
            r#"{"func":"echo","user":null,"source":null,"reply":null,"cron":null}"#,
            r#"{"func":"echo","delay":1500,"delay":null}"#,
            r#"{"func":"echo" , "delay":5,"args":{"m":[9e15,1E300,-0]},"delay":7}"#,
            r#"{"func":"echo","delay":-1}"#,
            r#"{"func":"echo","reply":"no"}"#,
            r#"{"func":"echo","user":["tom"]}"#,
            r#"{"func":"echo","cron":{"entry":"00112233445566aa","tick":1}}"#,
            r#"{"func":"echo","cron":7}"#,
            " \t\r\n{\"func\":\"echo\"} \n",
            "{}",
            "[1]",
            "\"func\"",
            "17",
            "null",
            "",
            "{",
            r#"{"func":"echo",}"#,
            r#"{"func":"echo"} x"#,
            r#"{"func":"echo","a":1e999}"#,
            r#"{"func":"echo","a":"\ud800"}"#,
            "\u{a0}{\"func\":\"echo\"}",
            "\u{c}{\"func\":\"echo\"}",
        ];
        for body in bodies {
            assert_eq!(
                parse_request(body.as_bytes(), 1 << 20),
                parse_via_map(body.as_bytes()),
                "{body:?}"
            );
        }
    }

    #[test]
    fn key_names_match_the_original() {
        let k = Keys::new("CERBAS", 8);
        assert_eq!(k.counter(), "CERBAS-COUNTER");
        assert_eq!(k.queue(), "CERBAS-QUEUE");
        assert_eq!(k.request(1), "CERBAS-REQ-0000000001");
        assert_eq!(k.request_fallback(1), "CERBAS-REQUEST-0000000001");
        assert_eq!(k.reply_channel(12345), "CERBAS-RESPONSE-8-0000012345");
        assert_eq!(
            k.msgpack_channel(12345),
            "MSGPACK:CERBAS-RESPONSE-8-0000012345"
        );
        assert_eq!(k.processing("h-1"), "CERBAS-PROCESSING-h-1");
        // Ids past ten digits are not truncated.
        assert_eq!(k.request(12_345_678_901), "CERBAS-REQ-12345678901");
        assert_eq!(k.request_prefix() + "0000000001", k.request(1));
        assert_eq!(k.cron_claim("00ff", 60), "CERBAS-CRON-TICK-00ff-60");
        assert_eq!(k.cron_last("00ff"), "CERBAS-CRON-LAST-00ff");
    }

    #[test]
    fn a_reply_channel_gives_back_its_id_and_no_other_channel_does() {
        let k = Keys::new("CERBAS", 8);
        for id in [0, 7, 12345, 9_999_999_999, 12_345_678_901, u64::MAX] {
            assert_eq!(k.reply_channel_id(k.reply_channel(id).as_bytes()), Some(id));
            assert_eq!(
                k.reply_channel_id(k.msgpack_channel(id).as_bytes()),
                Some(id)
            );
        }
        for other in [
            "CERBAS-RESPONSE-9-0000000007",           // another db
            "OTHER-RESPONSE-8-0000000007",            // another prefix
            "CERBAS-RESPONSE-8-000000007",            // nine digits
            "CERBAS-RESPONSE-8-00000000007",          // a padded eleven
            "CERBAS-RESPONSE-8-000000000x",           // not digits
            "CERBAS-RESPONSE-8-99999999999999999999", // past u64
            "MSGPACK:MSGPACK:CERBAS-RESPONSE-8-0000000007",
            "xCERBAS-RESPONSE-8-0000000007",
            "CERBAS-RESPONSE-8-",
        ] {
            assert_eq!(k.reply_channel_id(other.as_bytes()), None, "{other}");
        }
        // A prefix that starts like the msgpack channels: both still found.
        let m = Keys::new("MSGPACK:X", 0);
        assert_eq!(m.reply_channel_id(m.reply_channel(7).as_bytes()), Some(7));
        assert_eq!(m.reply_channel_id(m.msgpack_channel(7).as_bytes()), Some(7));
        assert_eq!(m.reply_channel_id(b"X-RESPONSE-0-0000000007"), None);
    }

    #[test]
    fn the_reply_channel_pattern_matches_both_forms_with_the_prefix_escaped() {
        assert_eq!(
            Keys::new("CERBAS", 0).reply_channel_pattern(),
            "*CERBAS-RESPONSE-0-*"
        );
        assert_eq!(
            Keys::new(r"a?[b]\", 3).reply_channel_pattern(),
            r"*a\?\[b\]\\-RESPONSE-3-*"
        );
    }

    #[test]
    fn a_cron_tag_is_read_and_a_bad_one_refused() {
        let r = parse_request(
            br#"{"func":"hello","reply":false,"cron":{"entry":"0123abcd","tick":1764415500}}"#,
            1024,
        )
        .unwrap();
        assert_eq!(
            r.cron.as_deref(),
            Some(&CronTag {
                entry: "0123abcd".into(),
                tick: 1_764_415_500
            })
        );
        let again = parse_request(r.to_json_without_delay().as_bytes(), 1024).unwrap();
        assert_eq!(again.cron, r.cron);
        for bad in [
            r#"{"func":"f","cron":1}"#,
            r#"{"func":"f","cron":{"entry":"ab"}}"#,
            r#"{"func":"f","cron":{"entry":"a b","tick":1}}"#,
            r#"{"func":"f","cron":{"entry":"","tick":1}}"#,
            r#"{"func":"f","cron":{"entry":"ab","tick":1.5}}"#,
        ] {
            assert_eq!(
                parse_request(bad.as_bytes(), 1024).unwrap_err().to_string(),
                r#""cron" must be {"entry": "<entry id>", "tick": <unix seconds>}"#,
                "{bad}"
            );
        }
    }

    #[test]
    fn queue_entries() {
        assert_eq!(parse_queue_entry(b"1"), Some(1));
        assert_eq!(parse_queue_entry(b"0"), Some(0));
        for bad in [
            &b"abc"[..],
            b"",
            b"-3",
            b"+3",
            b" 3",
            b"3.0",
            b"0000000012",
            b"1234567890123456789012345678901234567890",
        ] {
            assert_eq!(parse_queue_entry(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_a_full_request() {
        let r = parse_request(
            br#"{"func":"sum","args":{"a":1},"user":"tom","source":"web","delay":250}"#,
            1 << 20,
        )
        .unwrap();
        assert_eq!(r.func, "sum");
        assert_eq!(r.args.get("a"), Some(&json!(1)));
        assert_eq!(r.user.as_deref(), Some("tom"));
        assert_eq!(r.source.as_deref(), Some("web"));
        assert_eq!(r.delay_ms, Some(250));
    }

    #[test]
    fn reply_is_wanted_unless_the_client_says_false() {
        for (body, want) in [
            (&br#"{"func":"a"}"#[..], true),
            (br#"{"func":"a","reply":null}"#, true),
            (br#"{"func":"a","reply":true}"#, true),
            (br#"{"func":"a","reply":false}"#, false),
        ] {
            assert_eq!(parse_request(body, 100).unwrap().reply, want);
        }
        // A delayed one-way request stays one-way when it comes due.
        let r = parse_request(br#"{"func":"a","delay":5,"reply":false}"#, 100).unwrap();
        assert!(
            !parse_request(r.to_json_without_delay().as_bytes(), 100)
                .unwrap()
                .reply
        );
    }

    #[test]
    fn args_absent_or_null_is_empty() {
        let r = parse_request(br#"{"func":"hello"}"#, 100).unwrap();
        assert!(r.args.is_empty());
        let r = parse_request(br#"{"func":"hello","args":null}"#, 100).unwrap();
        assert!(r.args.is_empty());
        assert_eq!(r.user, None);
    }

    fn err(body: &[u8]) -> String {
        parse_request(body, 64).unwrap_err().to_string()
    }

    #[test]
    fn every_bad_body_has_its_message() {
        assert_eq!(err(&[b' '; 65]), "request too large: 65 bytes (limit 64)");
        assert_eq!(err(b"\xff\xfe{}"), "request is not valid UTF-8");
        assert!(err(b"{nope").starts_with("malformed JSON: "));
        assert_eq!(err(b"\"hi\""), "request must be a JSON object");
        assert_eq!(err(b"{}"), "missing \"func\"");
        assert_eq!(err(br#"{"func":3}"#), "\"func\" must be a string");
        assert_eq!(
            err(br#"{"func":"a","args":[1]}"#),
            "\"args\" must be an object"
        );
        assert_eq!(
            err(br#"{"func":"a","user":1}"#),
            "\"user\" must be a string"
        );
        assert_eq!(
            err(br#"{"func":"a","source":[]}"#),
            "\"source\" must be a string"
        );
        for r in ["0", "\"no\"", "[]"] {
            let body = format!(r#"{{"func":"a","reply":{r}}}"#);
            assert_eq!(err(body.as_bytes()), "\"reply\" must be true or false");
        }
        for d in ["-1", "1.5", "\"10\""] {
            let body = format!(r#"{{"func":"a","delay":{d}}}"#);
            assert_eq!(
                err(body.as_bytes()),
                "\"delay\" must be a whole number of milliseconds, 0 or more"
            );
        }
    }

    /// A body whose own object is level 1 and whose innermost array is `depth`.
    fn nested(depth: usize) -> Vec<u8> {
        let inner = depth - 3; // levels 1 to 3: the body, "args", "message"'s array.
        format!(
            r#"{{"func":"echo","args":{{"message":[{}"[]"{}]}},"delay":1}}"#,
            "[".repeat(inner),
            "]".repeat(inner)
        )
        .into_bytes()
    }

    #[test]
    fn the_documented_depth_is_accepted_and_one_more_refused() {
        let r = parse_request(&nested(MAX_DEPTH), 1 << 20).expect("128 levels");
        // Delayed: its stored body parses again at the same depth.
        parse_request(r.to_json_without_delay().as_bytes(), 1 << 20).expect("stored");
        assert_eq!(
            parse_request(&nested(MAX_DEPTH + 1), 1 << 20)
                .unwrap_err()
                .to_string(),
            "request nested too deeply (limit 128 levels)"
        );
        // Brackets inside strings are text, not nesting.
        let text = format!(
            r#"{{"func":"echo","args":{{"message":"{}\"{}"}}}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        parse_request(text.as_bytes(), 1 << 20).expect("brackets in a string");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let body = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            parse_request(body.as_bytes(), 1 << 20)
                .unwrap_err()
                .to_string(),
            "request nested too deeply (limit 128 levels)"
        );
    }

    #[test]
    fn replies_round_trip_in_both_forms() {
        let values = [
            json!("hello world!"),
            json!(null),
            json!({"nested": {"list": [1, -2, 3.5, "ü€😀"]}, "empty": {}, "e": []}),
            json!(u64::MAX),
            json!(i64::MIN),
        ];
        for v in values {
            let r = Reply::Ok(v);
            assert_eq!(Reply::from_json(&r.to_json()).unwrap(), r);
            assert_eq!(Reply::from_msgpack(&r.to_msgpack()).unwrap(), r);
        }
        let e = Reply::Error("timeout".into());
        assert_eq!(e.to_json(), br#"{"status":"error","data":"timeout"}"#);
        assert_eq!(Reply::from_msgpack(&e.to_msgpack()).unwrap(), e);
    }

    #[test]
    fn a_delayed_request_is_stored_without_its_delay() {
        let r = parse_request(
            br#"{"func":"f","args":{"x":[1]},"user":"u","source":"s","delay":5}"#,
            1024,
        )
        .unwrap();
        let again = parse_request(r.to_json_without_delay().as_bytes(), 1024).unwrap();
        assert_eq!(again.delay_ms, None);
        assert_eq!(
            again,
            Request {
                delay_ms: None,
                body_without_delay: None,
                ..r.clone()
            }
        );
        // Built in process (no body): written from the fields.
        let built = Request {
            body_without_delay: None,
            ..r
        };
        assert_eq!(
            parse_request(built.to_json_without_delay().as_bytes(), 1024).unwrap(),
            again
        );
    }

    #[test]
    fn a_delayed_body_keeps_the_clients_bytes() {
        let body = br#"{"func":"echo" , "delay":5,"args":{"message":[9e15,1E300,0.10,-0,"\u00e9"]},"user":"u","source":"s"}"#;
        let r = parse_request(body, 1024).unwrap();
        let kept = r.to_json_without_delay();
        assert_eq!(
            kept,
            r#"{"args":{"message":[9e15,1E300,0.10,-0,"\u00e9"]},"func":"echo","source":"s","user":"u"}"#
        );
        assert!(kept.len() <= body.len());
        // A repeated key keeps its last value, as the parse does.
        let r = parse_request(br#"{"func":"a","func":"b","delay":1,"delay":2}"#, 1024).unwrap();
        assert_eq!(r.func, "b");
        assert_eq!(r.delay_ms, Some(2));
        assert_eq!(r.to_json_without_delay(), r#"{"func":"b"}"#);
        // No delay, nothing kept.
        let r = parse_request(br#"{"func":"a","delay":0}"#, 1024).unwrap();
        assert_eq!(r.body_without_delay, None);
    }

    #[test]
    fn cache_keys_ignore_argument_order_and_separate_functions() {
        let k = Keys::new("CERBAS", 1);
        let a = json!({"a": 1, "b": {"y": 2, "x": 1}});
        let b = json!({"b": {"x": 1, "y": 2}, "a": 1});
        let (Value::Object(a), Value::Object(b)) = (a, b) else {
            unreachable!()
        };
        assert_eq!(k.cache("f", &a), k.cache("f", &b));
        assert_ne!(k.cache("f", &a), k.cache("g", &a));
        assert!(k.cache("f", &a).starts_with("CERBAS-CACHE-f-"));
        let entry = cache_entry("f", &a, &json!(42));
        assert_eq!(cache_hit(entry.as_bytes(), "f", &b), Some(json!(42)));
        // A colliding key with another call's entry is a miss, not a wrong answer.
        assert_eq!(cache_hit(entry.as_bytes(), "g", &a), None);
        assert_eq!(cache_hit(entry.as_bytes(), "f", &Map::new()), None);
        assert_eq!(cache_hit(b"garbage", "f", &a), None);
    }

    /// A float sent as the shortest text that names it (what every JSON encoder
    /// writes) comes back as the same double, in both reply forms.
    fn float_comes_back_unchanged(x: f64) {
        let text = serde_json::to_string(&x).expect("a finite float");
        let body = format!(r#"{{"func":"echo","args":{{"message":{text}}}}}"#);
        let r = parse_request(body.as_bytes(), 1024).expect("a valid request");
        let got = r.args["message"].as_f64().expect("a number");
        assert_eq!(got.to_bits(), x.to_bits(), "{text} parsed as {got}");
        let reply = Reply::Ok(r.args["message"].clone());
        for back in [
            Reply::from_json(&reply.to_json()).expect("json"),
            Reply::from_msgpack(&reply.to_msgpack()).expect("msgpack"),
        ] {
            let Reply::Ok(v) = back else {
                panic!("not ok: {back:?}")
            };
            let y = v.as_f64().expect("a number");
            assert_eq!(y.to_bits(), x.to_bits(), "{text} came back as {y}");
        }
        // The JSON reply carries the very text the client sent.
        let json = String::from_utf8(reply.to_json()).expect("utf-8");
        assert!(json.contains(&format!(":{text}}}")), "{json} for {text}");
    }

    #[test]
    fn the_issues_float_comes_back_unchanged() {
        float_comes_back_unchanged(0.9424502837770503);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn every_finite_float_comes_back_unchanged(bits in proptest::prelude::any::<u64>()) {
            let x = f64::from_bits(bits);
            proptest::prop_assume!(x.is_finite());
            float_comes_back_unchanged(x);
        }

        #[test]
        fn floats_between_0_and_1_come_back_unchanged(x in 0.0f64..1.0) {
            float_comes_back_unchanged(x);
        }
    }

    #[test]
    fn msgpack_reply_is_a_map_with_string_keys() {
        let bytes = Reply::Ok(json!(1)).to_msgpack();
        // fixmap of 2, then fixstr "status".
        assert_eq!(bytes[0], 0x82);
        assert_eq!(&bytes[1..8], b"\xa6status");
    }
}
