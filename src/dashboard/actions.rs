//! The dashboard's actions: delete a waiting or delayed request (its caller gets
//! the error reply `cancelled`), run a delayed request now, run a cron entry now,
//! pause or resume taking requests on an instance. What may ask (pure, tested
//! here): an `admin` (`[http.roles]`) with a token, or anyone from loopback when
//! no tokens are configured ([`may_act`]); a request from the page itself, not
//! from another site ([`same_origin`]) and carrying the page's CSRF token
//! ([`Secret`], new at each start; `http/dashboard.rs` compares it in constant
//! time). What each does in Redis ([`Action::take`]), each one step (a script or
//! a single command), so an action racing the reader either happens whole or
//! finds nothing to do. The pause is `P-PAUSED-{instance}`, which that instance
//! reads with its heartbeat (`snapshot.rs`): any instance's page pauses any
//! instance. Not for: HTTP (`http/dashboard.rs`) or rendering (`page.rs`).

use crate::job::{CronTable, Paused};
use crate::protocol::{Keys, Reply};
use redis::Connection;
use serde_json::Value;

/// The per-process secret behind the CSRF token embedded in the page.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl Secret {
    /// 32 bytes from the OS (`/dev/urandom`; failing that, std's randomly
    /// seeded hasher keys), as hex.
    pub(crate) fn new() -> Self {
        let mut bytes = [0u8; 32];
        let read = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        if read.is_err() {
            use std::hash::{BuildHasher, Hasher};
            for chunk in bytes.chunks_mut(8) {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
                chunk.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        Secret(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The token the page carries and every action must present.
    pub(crate) fn token(&self) -> &str {
        &self.0
    }
}

/// Whether the caller may take actions: with tokens, a user with the `admin`
/// role; without, only from loopback (whoever reaches a loopback port is on
/// this machine).
pub(crate) fn may_act(
    tokens_configured: bool,
    user: &str,
    admins: Option<&Vec<String>>,
    from_loopback: bool,
) -> bool {
    match tokens_configured {
        true => admins.is_some_and(|a| a.iter().any(|u| u == user)),
        false => from_loopback,
    }
}

/// Whether a POST comes from the page itself: a browser says where a request
/// comes from (`Sec-Fetch-Site`, `Origin`); another site's page is refused. A
/// client that is not a browser (curl) sends neither and is judged by its token.
pub(crate) fn same_origin(
    origin: Option<&str>,
    sec_fetch_site: Option<&str>,
    host: Option<&str>,
) -> bool {
    if sec_fetch_site.is_some_and(|s| s != "same-origin" && s != "none") {
        return false;
    }
    match origin {
        None => true,
        Some(o) => host.is_some_and(|h| o == format!("http://{h}")),
    }
}

/// One action, as the page's script posts it (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Delete a waiting or delayed request; its caller gets `cancelled`.
    Delete(u64),
    /// Make a delayed request due now.
    RunNow(u64),
    /// Run a cron entry (of this instance's CRONTAB) now.
    RunCron(String),
    /// Stop (true) or start again (false) taking requests on an instance.
    Pause(String, bool),
}

/// Why an action was not taken.
#[derive(Debug)]
pub(crate) enum Failed {
    /// What it names is not there (any more) (404).
    Gone(String),
    /// Redis did not answer or refused (503).
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for Failed {
    fn from(e: redis::RedisError) -> Self {
        Failed::Redis(e)
    }
}

/// Longest action body read, in bytes.
pub(crate) const MAX_BODY: usize = 4096;

/// Reads an action: `{"action": "delete"|"run"|"cron"|"pause"|"resume", "id": N}`,
/// with `"entry"` for `cron` and `"instance"` for `pause` and `resume`.
pub(crate) fn parse(body: &[u8]) -> Result<Action, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let field = |name: &str| v.get(name);
    let text = |name: &str| -> Result<String, String> {
        match field(name) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 300 => Ok(s.clone()),
            _ => Err(format!("\"{name}\" must be a non-empty string")),
        }
    };
    let id = || -> Result<u64, String> {
        field("id")
            .and_then(|v| match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .filter(|id| *id > 0)
            .ok_or_else(|| "\"id\" must be a request id".to_string())
    };
    match field("action").and_then(Value::as_str) {
        Some("delete") => Ok(Action::Delete(id()?)),
        Some("run") => Ok(Action::RunNow(id()?)),
        Some("cron") => Ok(Action::RunCron(text("entry")?)),
        Some("pause") => Ok(Action::Pause(text("instance")?, true)),
        Some("resume") => Ok(Action::Pause(text("instance")?, false)),
        Some(other) => Err(format!("unknown action {:?}", super::state::cut(other, 40))),
        None => Err("\"action\" is missing".into()),
    }
}

/// KEYS: queue, delayed, request key, its fallback name. ARGV: id, JSON channel,
/// JSON reply, msgpack channel, msgpack reply. Removes the id from the queue
/// (every entry of it: they are the same request), or else from the delayed set; only if it was there, deletes the request and
/// publishes the reply. Returns 1 when deleted, 0 when it was neither waiting nor
/// delayed (taken by a reader meanwhile, or never there).
const CANCEL: &str = r"
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
if removed == 0 then removed = redis.call('ZREM', KEYS[2], ARGV[1]) end
if removed == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('PUBLISH', ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// The message a deleted request's caller gets.
pub(crate) const CANCELLED: &str = "cancelled";

/// Where an action runs: this instance's Redis names and state.
pub(crate) struct Here<'a> {
    pub(crate) keys: &'a Keys,
    pub(crate) instance: &'a str,
    pub(crate) paused: &'a Paused,
    pub(crate) cron: &'a CronTable,
}

impl Action {
    /// Takes the action; says what was done.
    pub(crate) fn take(&self, c: &mut Connection, here: &Here) -> Result<String, Failed> {
        let keys = here.keys;
        match self {
            Action::Delete(id) => {
                // The reply is built as every reply is (protocol.rs), in both forms.
                let reply = Reply::Error(CANCELLED.into());
                let done: i64 = redis::Script::new(CANCEL)
                    .key(keys.queue())
                    .key(keys.delayed())
                    .key(keys.request(*id))
                    .key(keys.request_fallback(*id))
                    .arg(*id)
                    .arg(keys.reply_channel(*id))
                    .arg(reply.to_json())
                    .arg(keys.msgpack_channel(*id))
                    .arg(reply.to_msgpack())
                    .invoke(c)?;
                match done {
                    1 => Ok(format!(
                        "request {id} deleted; its caller got \"{CANCELLED}\""
                    )),
                    _ => Err(Failed::Gone(format!(
                        "request {id} is neither waiting nor delayed (taken meanwhile?)"
                    ))),
                }
            }
            Action::RunNow(id) => {
                // Due at once: the scheduler of any instance moves it to the head
                // of the queue within its tick, as any request coming due.
                let changed: i64 = redis::cmd("ZADD")
                    .arg(keys.delayed())
                    .arg("XX")
                    .arg("CH")
                    .arg(0)
                    .arg(*id)
                    .query(c)?;
                match changed {
                    1 => Ok(format!("request {id} is due now")),
                    _ => Err(Failed::Gone(format!("request {id} is not delayed"))),
                }
            }
            Action::RunCron(entry) => {
                let found = here.cron.get().into_iter().find(|(e, _)| e.id == *entry);
                let Some((e, _)) = found else {
                    return Err(Failed::Gone(format!(
                        "no cron entry {:?} in this instance's CRONTAB",
                        super::state::cut(entry, 40)
                    )));
                };
                let now_ms: i64 = {
                    let (s, us): (i64, i64) = redis::cmd("TIME").query(c)?;
                    s * 1000 + us / 1000
                };
                let id = crate::cron::runner::run_now(c, keys, &e, now_ms)?;
                match id {
                    0 => Err(Failed::Gone("that run was claimed already".into())),
                    id => Ok(format!(
                        "cron entry {entry} ({}) queued as request {id}",
                        e.func()
                    )),
                }
            }
            Action::Pause(instance, pause) => {
                let known: bool = redis::cmd("SISMEMBER")
                    .arg(keys.instances())
                    .arg(instance)
                    .query(c)?;
                if !known {
                    return Err(Failed::Gone(format!(
                        "no instance {:?} is registered",
                        super::state::cut(instance, 80)
                    )));
                }
                let key = keys.paused(instance);
                match pause {
                    true => redis::cmd("SET").arg(&key).arg(1).query::<()>(c)?,
                    false => redis::cmd("DEL").arg(&key).query::<()>(c)?,
                }
                // This instance at once; another with its next heartbeat.
                if instance == here.instance {
                    here.paused.set(*pause);
                }
                Ok(format!(
                    "instance {instance} {}",
                    if *pause {
                        "paused: it takes no requests (within a second)"
                    } else {
                        "resumed (within a second)"
                    }
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse(br#"{"action":"delete","id":5}"#),
            Ok(Action::Delete(5))
        );
        assert_eq!(
            parse(br#"{"action":"run","id":"7"}"#),
            Ok(Action::RunNow(7))
        );
        assert_eq!(
            parse(br#"{"action":"cron","entry":"00ff"}"#),
            Ok(Action::RunCron("00ff".into()))
        );
        assert_eq!(
            parse(br#"{"action":"pause","instance":"h-1-2"}"#),
            Ok(Action::Pause("h-1-2".into(), true))
        );
        assert_eq!(
            parse(br#"{"action":"resume","instance":"h-1-2"}"#),
            Ok(Action::Pause("h-1-2".into(), false))
        );
        let err = |b: &[u8]| parse(b).unwrap_err();
        assert!(err(b"nope").starts_with("not JSON"));
        assert_eq!(err(b"{}"), "\"action\" is missing");
        assert_eq!(
            err(br#"{"action":"<b>x</b>"}"#),
            "unknown action \"<b>x</b>\""
        );
        assert_eq!(
            err(br#"{"action":"delete","id":0}"#),
            "\"id\" must be a request id"
        );
        assert_eq!(
            err(br#"{"action":"delete","id":-1}"#),
            "\"id\" must be a request id"
        );
        assert_eq!(
            err(br#"{"action":"pause","instance":""}"#),
            "\"instance\" must be a non-empty string"
        );
        assert_eq!(
            err(br#"{"action":"cron"}"#),
            "\"entry\" must be a non-empty string"
        );
    }

    #[test]
    fn only_admins_or_loopback_without_tokens_may_act() {
        let admins = vec!["tom".to_string()];
        assert!(may_act(true, "tom", Some(&admins), false));
        assert!(!may_act(true, "ann", Some(&admins), true));
        assert!(!may_act(true, "tom", None, true));
        assert!(may_act(false, "web", None, true));
        assert!(!may_act(false, "web", Some(&admins), false));
    }

    #[test]
    fn only_the_page_itself_may_post() {
        let host = Some("127.0.0.1:4455");
        assert!(
            same_origin(None, None, host),
            "not a browser: the token decides"
        );
        assert!(same_origin(
            Some("http://127.0.0.1:4455"),
            Some("same-origin"),
            host
        ));
        assert!(!same_origin(
            Some("http://evil.example"),
            Some("cross-site"),
            host
        ));
        assert!(!same_origin(None, Some("same-site"), host));
        assert!(!same_origin(Some("http://evil.example"), None, host));
        assert!(!same_origin(Some("http://127.0.0.1:4455"), None, None));
        assert!(!same_origin(Some("null"), None, host));
    }

    #[test]
    fn each_start_has_its_own_secret() {
        let (a, b) = (Secret::new(), Secret::new());
        assert_eq!(a.token().len(), 64);
        assert_ne!(a.token(), b.token());
    }
}
