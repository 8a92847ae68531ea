//! The snapshot one instance writes of itself to Redis every second (from the
//! scheduler thread, beside its heartbeat) so that the dashboard of any instance
//! shows them all: `P-SNAPSHOT-{instance}` (a small JSON object, expiring after
//! [`SNAPSHOT_TTL`]) and its name in the sorted set `P-SNAPSHOTS` (scored by the
//! Redis server's clock when it was written, so a lapsed instance is told apart
//! without synchronized clocks). Building the snapshot ([`Live::build`]) reads
//! only this process's counters; [`write`] and [`forget`] are the Redis side.
//! Not for: reading snapshots back (`state.rs`, `http/dashboard.rs`).

use super::functions::Counts;
use crate::dispatch::Hung;
use crate::job::{InHand, Paused, Stats, Unanswered};
use crate::protocol::Keys;
use redis::{Connection, RedisResult};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a snapshot outlives its last write: a killed instance is shown dead
/// for this long, then forgotten.
pub(crate) const SNAPSHOT_TTL: Duration = Duration::from_secs(60);

/// Longest instance name or host kept in a snapshot, in bytes: the snapshot's
/// size is bounded whatever the host is called.
const MAX_NAME: usize = 200;

/// What one instance says of itself. Every field is a number, a bounded string
/// or the counts of at most 50 functions (twice: since the start and over the
/// last 5 minutes), so the encoded snapshot stays under 72 KiB at worst (about
/// 1 KiB with a few functions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub(crate) struct Snapshot {
    pub(crate) name: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) version: String,
    pub(crate) uptime_secs: u64,
    /// Workers running a call (or about to start one), at most `workers_total`.
    pub(crate) workers_busy: u64,
    pub(crate) workers_total: u64,
    /// Workers replaced because their call ran past its deadline and is still running.
    pub(crate) hung: u64,
    /// Requests taken from Redis and not yet acknowledged.
    pub(crate) in_hand: u64,
    pub(crate) requests: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) panics: u64,
    pub(crate) cache_hits: u64,
    pub(crate) delayed: u64,
    /// Whether the dashboard paused it (it takes no requests).
    pub(crate) paused: bool,
    /// The busiest functions' counts since the start (at most 50).
    pub(crate) functions: BTreeMap<String, Counts>,
    /// The same functions' counts over the last 5 minutes (those with calls).
    pub(crate) recent: BTreeMap<String, Counts>,
}

/// Where a running instance's snapshot comes from: its counters, shared with
/// the threads that count.
pub(crate) struct Live {
    pub(crate) stats: Arc<Stats>,
    pub(crate) in_hand: InHand,
    pub(crate) unanswered: Unanswered,
    pub(crate) hung: Arc<Hung>,
    pub(crate) workers: usize,
    pub(crate) started: Instant,
    /// Whether Redis refuses the snapshot now (logged once per episode).
    pub(crate) refused: AtomicBool,
    /// Set from `P-PAUSED-{instance}` at each write.
    pub(crate) paused: Paused,
    /// Past counts, for the last 5 minutes' numbers.
    pub(crate) history: super::functions::History,
}

impl Live {
    /// Writes this instance's snapshot. Only a lost connection is an error: a
    /// write Redis refuses (a wrong-typed `P-SNAPSHOTS`, `MISCONF`) is logged when
    /// the refusals start and end, and must not slow the scheduler's other work
    /// (its heartbeat, due delayed requests).
    pub(crate) fn publish(
        &self,
        c: &mut Connection,
        keys: &Keys,
        instance: &str,
    ) -> RedisResult<()> {
        let mut errors = self.stats.recent_errors.take();
        for e in errors.iter_mut() {
            e.instance = bounded(instance);
        }
        let written = match write(c, keys, instance, &self.build(instance), &errors) {
            Err(e) if crate::connection::is_lost(&e) => {
                // Sent again with the next write.
                self.stats.recent_errors.restore(errors);
                return Err(e);
            }
            // The script itself refused (MISCONF before it ran, BUSY).
            Err(e) => Written {
                paused: self.paused.is_set(),
                refused: Some(e.to_string()),
            },
            Ok(w) => w,
        };
        if self.paused.is_set() != written.paused {
            log::info!(
                "dashboard: this instance is {} (P-PAUSED-{instance})",
                if written.paused {
                    "paused: it takes no requests"
                } else {
                    "resumed"
                }
            );
            self.paused.set(written.paused);
        }
        match written.refused {
            Some(why) => {
                if !self.refused.swap(true, Ordering::Relaxed) {
                    log::warn!("dashboard: redis refuses this instance's snapshot: {why}");
                }
            }
            None => {
                if self.refused.swap(false, Ordering::Relaxed) {
                    log::info!("dashboard: redis takes this instance's snapshot again");
                }
            }
        }
        Ok(())
    }

    /// This instance's snapshot now.
    pub(crate) fn build(&self, instance: &str) -> Snapshot {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        let held: usize = self.in_hand.snapshot().values().sum();
        let functions = s.metrics.functions.snapshot();
        let recent = self.history.recent(Instant::now(), &functions);
        Snapshot {
            name: bounded(instance),
            host: bounded(host_of(instance)),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            workers_busy: (self.unanswered.count().max(0) as u64).min(self.workers as u64),
            workers_total: self.workers as u64,
            hung: self.hung.count() as u64,
            in_hand: held as u64,
            requests: load(&s.requests),
            ok: load(&s.ok),
            errors: load(&s.errors),
            timeouts: load(&s.timeouts),
            panics: load(&s.panics),
            cache_hits: load(&s.cache_hits),
            delayed: load(&s.delayed),
            paused: self.paused.is_set(),
            functions,
            recent,
        }
    }
}

/// The host part of an instance name (`{host}-{pid}-{start ms}`, `server.rs`).
pub(crate) fn host_of(instance: &str) -> &str {
    let mut parts = instance.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(host)) => host,
        _ => instance,
    }
}

/// At most [`MAX_NAME`] bytes of `s`, cut on a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `P-SNAPSHOT-{instance}`.
pub(crate) fn key(keys: &Keys, instance: &str) -> String {
    keys.key(&format!("SNAPSHOT-{instance}"))
}

/// `P-SNAPSHOTS`: instance names scored by when their snapshot was last written.
pub(crate) fn index(keys: &Keys) -> String {
    keys.key("SNAPSHOTS")
}

/// `P-ERRORS`: the last error replies across the cluster, newest first.
pub(crate) fn errors_key(keys: &Keys) -> String {
    keys.key("ERRORS")
}

/// KEYS: snapshot, index, paused, errors. ARGV: instance, json, life in ms, most
/// errors kept, then the new error replies (oldest first). Reads whether the
/// instance is paused first, and runs each write with `pcall`, so a write Redis
/// refuses (a wrong-typed key, `MISCONF`) neither hides a pause nor stops the
/// other writes. Writes the snapshot, scores the instance by the Redis server's
/// clock, and drops names whose snapshots have expired, so the index stays as
/// small as the cluster; pushes the errors and trims their list. Returns
/// `{paused (1 or 0), why the first refused write was refused, or ''}`.
const WRITE: &str = r"
local paused = redis.call('EXISTS', KEYS[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local why = ''
local function try(...)
  local r = redis.pcall(...)
  if why == '' and type(r) == 'table' and r.err then why = r.err end
end
try('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
try('ZADD', KEYS[2], now, ARGV[1])
try('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if #ARGV > 4 then
  for i = 5, #ARGV do try('LPUSH', KEYS[4], ARGV[i]) end
  try('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
end
return {paused, why}
";

/// What a write found.
#[derive(Debug, PartialEq)]
pub(crate) struct Written {
    /// Whether the instance is paused (`P-PAUSED-{instance}` exists).
    pub(crate) paused: bool,
    /// Why Redis refused a write, if it did.
    pub(crate) refused: Option<String>,
}

/// Writes `snapshot` for `instance` and pushes `errors` onto `P-ERRORS`; says
/// whether the instance is paused and whether a write was refused.
pub(crate) fn write(
    c: &mut Connection,
    keys: &Keys,
    instance: &str,
    snapshot: &Snapshot,
    errors: &[super::errors::ErrorReply],
) -> RedisResult<Written> {
    // Serializing numbers and strings cannot fail.
    let json = serde_json::to_string(snapshot).unwrap_or_default();
    let script = redis::Script::new(WRITE);
    let mut call = script.prepare_invoke();
    call.key(key(keys, instance))
        .key(index(keys))
        .key(keys.paused(instance))
        .key(errors_key(keys))
        .arg(instance)
        .arg(json)
        .arg(SNAPSHOT_TTL.as_millis() as u64)
        .arg(super::errors::MAX_ERRORS);
    for e in errors {
        call.arg(serde_json::to_string(e).unwrap_or_default());
    }
    let (paused, why): (i64, String) = call.invoke(c)?;
    Ok(Written {
        paused: paused == 1,
        refused: (!why.is_empty()).then_some(why),
    })
}

/// Adds to `pipe` what removes `instance`'s snapshot (and its pause): a graceful
/// stop is not a death, so a stopped instance leaves the dashboard at once.
pub(crate) fn forget(pipe: &mut redis::Pipeline, keys: &Keys, instance: &str) {
    pipe.cmd("DEL")
        .arg(key(keys, instance))
        .arg(keys.paused(instance))
        .ignore()
        .cmd("ZREM")
        .arg(index(keys))
        .arg(instance)
        .ignore();
}

#[cfg(test)]
mod tests {
    use super::super::functions::{BUCKETS, MAX_FUNCTIONS};
    use super::*;

    fn live(workers: usize) -> Live {
        let (tx, _rx) = crossbeam_channel::unbounded();
        Live {
            stats: Arc::new(Stats::default()),
            in_hand: InHand::default(),
            unanswered: Unanswered::default(),
            hung: Arc::new(Hung::new(10, tx)),
            workers,
            started: Instant::now(),
            refused: AtomicBool::new(false),
            paused: Paused::default(),
            history: Default::default(),
        }
    }

    #[test]
    fn the_snapshot_reads_the_counters() {
        let l = live(4);
        l.stats.requests.store(7, Ordering::Relaxed);
        l.stats.ok.store(5, Ordering::Relaxed);
        l.stats.errors.store(2, Ordering::Relaxed);
        l.in_hand.add([1, 2, 2]);
        l.unanswered.add(9);
        let s = l.build("web-1-4242-1700000000000");
        assert_eq!(s.name, "web-1-4242-1700000000000");
        assert_eq!(s.host, "web-1");
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
        assert_eq!((s.requests, s.ok, s.errors), (7, 5, 2));
        assert_eq!(s.in_hand, 3);
        // More handed over than there are workers: the rest wait for one.
        assert_eq!((s.workers_busy, s.workers_total), (4, 4));
        assert_eq!(s.hung, 0);
    }

    #[test]
    fn the_snapshot_is_small_whatever_the_host_is_called() {
        let l = live(100);
        l.stats.requests.store(u64::MAX, Ordering::Relaxed);
        let name = format!("{}-1-2", "é".repeat(5_000));
        let s = l.build(&name);
        assert!(s.name.len() <= MAX_NAME && s.host.len() <= MAX_NAME);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.len() < 1024, "{} bytes", json.len());
        // The most functions, each with every count and bucket at its largest.
        let full = Counts {
            calls: u64::MAX,
            ok: u64::MAX,
            errors: u64::MAX,
            timeouts: u64::MAX,
            panics: u64::MAX,
            refused: u64::MAX,
            cache_hits: u64::MAX,
            buckets: vec![u64::MAX; BUCKETS],
        };
        let mut s = s;
        // Registered names are short; 64 characters is generous.
        s.functions = (0..MAX_FUNCTIONS)
            .map(|i| (format!("{i:064}"), full.clone()))
            .collect();
        s.recent = s.functions.clone();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.len() < 72 * 1024, "{} bytes", json.len());
        // It reads back as written.
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
    }

    #[test]
    fn host_of_takes_what_is_before_pid_and_start() {
        assert_eq!(host_of("h-1-2"), "h");
        assert_eq!(host_of("my-host-name-99-1700"), "my-host-name");
        assert_eq!(host_of("odd"), "odd");
        assert_eq!(host_of("a-b"), "a-b");
    }

    #[test]
    fn a_snapshot_missing_fields_still_reads() {
        let s: Snapshot = serde_json::from_str(r#"{"name":"x","extra":1}"#).unwrap();
        assert_eq!(s.name, "x");
        assert_eq!(s.workers_total, 0);
    }
}
