//! The cluster's state as the dashboard shows it, put together from what
//! `http/dashboard.rs` read from Redis ([`Raw`]): instances (alive or dead, from
//! their snapshots and heartbeats), totals, the head of the queue, the next
//! delayed requests, cron entries (this instance's CRONTAB with their schedule
//! and next run, and every entry's last outcome), the recent errors, this
//! instance's proxy targets. Pure, so every case is a unit
//! test. Request bodies are the clients' (attacker-controlled): they are parsed
//! leniently, only a bounded prefix of each is read, and arguments are cut to
//! [`MAX_ARGS`] characters; escaping is the page's job (`page.rs`, `app.js`).
//! Not for: reading Redis or rendering.

use super::functions::{merge, quantile, Counts, MAX_FUNCTIONS};
use super::snapshot::Snapshot;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::collections::HashMap;

/// Most waiting (and delayed) requests shown.
pub(crate) const MAX_REQUESTS: usize = 50;
/// Most instances shown.
pub(crate) const MAX_INSTANCES: usize = 100;
/// Most cron entries shown.
pub(crate) const MAX_CRON: usize = 50;
/// Most bytes of a request body read: enough for its func, user and source and
/// the start of its arguments.
pub(crate) const BODY_PREFIX: usize = 4096;
/// Most characters of a request's arguments (or a cron message) shown.
pub(crate) const MAX_ARGS: usize = 120;

/// An instance as Redis knows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawInstance {
    pub(crate) name: String,
    /// Its snapshot's JSON, if it has not expired.
    pub(crate) snapshot: Option<String>,
    /// When it was last written (Redis clock, ms), from `P-SNAPSHOTS`.
    pub(crate) written_ms: Option<i64>,
    /// `PTTL` of its heartbeat: -2 when it has lapsed.
    pub(crate) heartbeat_pttl: i64,
}

/// A request body as read: at most [`BODY_PREFIX`] bytes of it, and its size.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawRequest {
    pub(crate) id: u64,
    pub(crate) prefix: Option<Vec<u8>>,
    pub(crate) size: u64,
    /// When it was first seen waiting (Redis clock, ms), if known.
    pub(crate) since_ms: Option<i64>,
    /// When it is due (delayed requests; Redis clock, ms).
    pub(crate) due_ms: Option<i64>,
}

/// Everything read from Redis for one state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Raw {
    /// The Redis server's clock, ms.
    pub(crate) now_ms: i64,
    /// The instance serving the page.
    pub(crate) serving: String,
    pub(crate) heartbeat_ttl_ms: i64,
    pub(crate) instances: Vec<RawInstance>,
    pub(crate) queue_length: u64,
    pub(crate) waiting: Vec<RawRequest>,
    pub(crate) delayed_count: u64,
    pub(crate) delayed: Vec<RawRequest>,
    /// `(entry id, fields of P-CRON-LAST-{entry})`.
    pub(crate) cron: Vec<(String, HashMap<String, String>)>,
    /// This instance's CRONTAB entries.
    pub(crate) crontab: Vec<RawCronLine>,
    /// `P-ERRORS`, newest first.
    pub(crate) errors: Vec<String>,
    /// This instance's proxy targets.
    pub(crate) proxies: Vec<Proxy>,
}

/// One entry of this instance's CRONTAB.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawCronLine {
    pub(crate) entry: String,
    pub(crate) func: String,
    pub(crate) schedule: String,
    /// Its next run, ms since the epoch (`None`: never again).
    pub(crate) next_ms: Option<i64>,
}

/// A proxy target of the serving instance and its circuit breaker.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub(crate) struct Proxy {
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) target: String,
    /// `closed`, `open` or `half-open`.
    pub(crate) state: String,
    /// Requests let through to the target since the start, and how many failed.
    pub(crate) requests: u64,
    pub(crate) failures: u64,
    /// Requests refused at once while the breaker was open.
    pub(crate) refused: u64,
}

/// The state `/dashboard/state.json` answers and the page shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct State {
    pub(crate) now_ms: i64,
    pub(crate) serving: String,
    pub(crate) totals: Totals,
    pub(crate) instances: Vec<Instance>,
    pub(crate) waiting: Vec<Waiting>,
    pub(crate) delayed: Vec<Waiting>,
    pub(crate) cron: Vec<Cron>,
    /// Per function, over every instance shown, busiest first.
    pub(crate) functions: Vec<Function>,
    /// The last error replies across the cluster, newest first.
    pub(crate) errors: Vec<super::errors::ErrorReply>,
    /// The serving instance's proxy targets.
    pub(crate) proxies: Vec<Proxy>,
}

/// One function's counts over the cluster since each instance's start.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Function {
    pub(crate) name: String,
    pub(crate) calls: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) panics: u64,
    pub(crate) refused: u64,
    pub(crate) cache_hits: u64,
    /// Duration quantiles, ms: upper bounds of doubling buckets (`functions.rs`).
    pub(crate) p50_ms: Option<u64>,
    pub(crate) p95_ms: Option<u64>,
    pub(crate) p99_ms: Option<u64>,
    /// The same over the last 5 minutes.
    pub(crate) recent_calls: u64,
    pub(crate) recent_errors: u64,
    pub(crate) recent_p50_ms: Option<u64>,
    pub(crate) recent_p95_ms: Option<u64>,
    pub(crate) recent_p99_ms: Option<u64>,
}

/// Sums over the instances shown, and the queue.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub(crate) struct Totals {
    pub(crate) alive: u64,
    pub(crate) dead: u64,
    pub(crate) requests: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) panics: u64,
    pub(crate) cache_hits: u64,
    pub(crate) workers_busy: u64,
    pub(crate) workers_total: u64,
    pub(crate) queue_length: u64,
    /// How long the oldest request shown has been waiting, ms.
    pub(crate) oldest_waiting_ms: Option<i64>,
    pub(crate) delayed: u64,
    /// Every call's duration over the cluster, by bucket (`functions.rs`): the
    /// page's chart takes p50 and p99 of what changed between two states.
    pub(crate) buckets: Vec<u64>,
}

/// One instance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Instance {
    pub(crate) alive: bool,
    /// How long ago its heartbeat was renewed, ms (alive instances).
    pub(crate) heartbeat_age_ms: Option<i64>,
    /// How long ago its snapshot was written, ms.
    pub(crate) seen_ago_ms: Option<i64>,
    /// Its name is the snapshot's.
    #[serde(flatten)]
    pub(crate) snapshot: Snapshot,
}

/// A waiting or delayed request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Waiting {
    pub(crate) id: u64,
    pub(crate) func: String,
    pub(crate) user: String,
    pub(crate) source: String,
    pub(crate) size: u64,
    /// Its arguments as JSON, cut to [`MAX_ARGS`] characters.
    pub(crate) args: String,
    pub(crate) age_ms: Option<i64>,
    pub(crate) due_ms: Option<i64>,
    pub(crate) due_in_ms: Option<i64>,
}

/// A cron entry: its schedule and next run (when in this instance's CRONTAB),
/// its last outcome and its counts.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub(crate) struct Cron {
    pub(crate) entry: String,
    pub(crate) func: String,
    /// Its schedule; empty when the entry is not in this instance's CRONTAB.
    pub(crate) schedule: String,
    pub(crate) next_ms: Option<i64>,
    /// Whether this instance has it (and can run it now).
    pub(crate) here: bool,
    pub(crate) outcome: String,
    pub(crate) message: String,
    pub(crate) at_ms: Option<i64>,
    pub(crate) duration_ms: Option<i64>,
    pub(crate) instance: String,
    pub(crate) runs: u64,
    pub(crate) count_ok: u64,
    pub(crate) count_error: u64,
    pub(crate) count_timeout: u64,
}

/// Puts the state together.
pub(crate) fn assemble(raw: Raw) -> State {
    let now = raw.now_ms;
    let mut instances: Vec<Instance> = raw
        .instances
        .into_iter()
        .take(MAX_INSTANCES)
        .map(|r| instance(r, now, raw.heartbeat_ttl_ms))
        .collect();
    // The living first, then by name.
    instances.sort_by(|a, b| {
        b.alive
            .cmp(&a.alive)
            .then_with(|| a.snapshot.name.cmp(&b.snapshot.name))
    });
    let mut totals = Totals {
        queue_length: raw.queue_length,
        delayed: raw.delayed_count,
        ..Totals::default()
    };
    for i in &instances {
        let s = &i.snapshot;
        match i.alive {
            true => totals.alive += 1,
            false => totals.dead += 1,
        }
        totals.requests += s.requests;
        totals.ok += s.ok;
        totals.errors += s.errors;
        totals.timeouts += s.timeouts;
        totals.panics += s.panics;
        totals.cache_hits += s.cache_hits;
        if i.alive {
            totals.workers_busy += s.workers_busy;
            totals.workers_total += s.workers_total;
        }
    }
    let waiting: Vec<Waiting> = raw
        .waiting
        .iter()
        .take(MAX_REQUESTS)
        .map(|r| request(r, now))
        .collect();
    totals.oldest_waiting_ms = waiting.iter().filter_map(|w| w.age_ms).max();
    let delayed = raw
        .delayed
        .iter()
        .take(MAX_REQUESTS)
        .map(|r| request(r, now))
        .collect();
    let mut cron: Vec<Cron> = raw
        .cron
        .into_iter()
        .take(MAX_CRON)
        .map(|(entry, h)| cron_entry(entry, &h))
        .collect();
    for line in raw.crontab.iter().take(MAX_CRON) {
        let i = match cron.iter().position(|c| c.entry == cut(&line.entry, 32)) {
            Some(i) => i,
            None => {
                cron.push(Cron {
                    entry: cut(&line.entry, 32),
                    func: cut(&line.func, MAX_ARGS),
                    outcome: "not run yet".into(),
                    ..Cron::default()
                });
                cron.len() - 1
            }
        };
        cron[i].schedule = cut(&line.schedule, MAX_ARGS);
        cron[i].next_ms = line.next_ms;
        cron[i].here = true;
    }
    cron.sort_by(|a, b| a.func.cmp(&b.func).then_with(|| a.entry.cmp(&b.entry)));
    cron.truncate(MAX_CRON);
    let functions = functions(&instances);
    for i in &instances {
        for c in i.snapshot.functions.values() {
            if totals.buckets.len() < c.buckets.len() {
                totals.buckets.resize(c.buckets.len(), 0);
            }
            for (t, n) in totals.buckets.iter_mut().zip(&c.buckets) {
                *t += n;
            }
        }
    }
    let errors = raw
        .errors
        .iter()
        .take(super::errors::MAX_ERRORS)
        .map(|e| super::errors::parse(e))
        .collect();
    // Each instance's own list is the state's `functions` now: not sent twice.
    for i in instances.iter_mut() {
        i.snapshot.functions.clear();
        i.snapshot.recent.clear();
    }
    State {
        now_ms: now,
        serving: raw.serving,
        totals,
        instances,
        waiting,
        delayed,
        cron,
        functions,
        errors,
        proxies: raw.proxies,
    }
}

fn functions(instances: &[Instance]) -> Vec<Function> {
    let mut merged: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut recent: BTreeMap<&str, Counts> = BTreeMap::new();
    for i in instances {
        for (name, c) in &i.snapshot.functions {
            merge(merged.entry(name.as_str()).or_default(), c);
        }
        for (name, c) in &i.snapshot.recent {
            merge(recent.entry(name.as_str()).or_default(), c);
        }
    }
    let mut out: Vec<Function> = merged
        .into_iter()
        .map(|(name, c)| (recent.remove(name).unwrap_or_default(), name, c))
        .map(|(r, name, c)| Function {
            recent_calls: r.calls,
            recent_errors: r.errors + r.timeouts + r.panics + r.refused,
            recent_p50_ms: quantile(&r.buckets, 0.50),
            recent_p95_ms: quantile(&r.buckets, 0.95),
            recent_p99_ms: quantile(&r.buckets, 0.99),
            name: cut(name, MAX_ARGS),
            calls: c.calls,
            ok: c.ok,
            errors: c.errors,
            timeouts: c.timeouts,
            panics: c.panics,
            refused: c.refused,
            cache_hits: c.cache_hits,
            p50_ms: quantile(&c.buckets, 0.50),
            p95_ms: quantile(&c.buckets, 0.95),
            p99_ms: quantile(&c.buckets, 0.99),
        })
        .collect();
    out.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.name.cmp(&b.name)));
    out.truncate(MAX_FUNCTIONS);
    out
}

fn instance(r: RawInstance, now: i64, ttl: i64) -> Instance {
    // A snapshot that does not parse (another version, a stray write) still
    // shows the instance, with its name.
    let mut snapshot: Snapshot = r
        .snapshot
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    snapshot.name = r.name.clone();
    if snapshot.host.is_empty() {
        snapshot.host = super::snapshot::host_of(&r.name).to_string();
    }
    // PTTL -1: a heartbeat without expiry (written by hand) is alive.
    let alive = r.heartbeat_pttl > 0 || r.heartbeat_pttl == -1;
    Instance {
        alive,
        heartbeat_age_ms: (r.heartbeat_pttl > 0).then(|| (ttl - r.heartbeat_pttl).max(0)),
        seen_ago_ms: r.written_ms.map(|w| (now - w).max(0)),
        snapshot,
    }
}

fn request(r: &RawRequest, now: i64) -> Waiting {
    let parsed: Option<Value> = r
        .prefix
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok());
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .map(|v| match v {
                Value::String(s) => cut(s, MAX_ARGS),
                other => cut(&other.to_string(), MAX_ARGS),
            })
            .unwrap_or_default()
    };
    let (func, args) = match (&parsed, &r.prefix) {
        (Some(v), _) => (
            field("func"),
            v.get("args")
                .map(|a| cut(&a.to_string(), MAX_ARGS))
                .unwrap_or_default(),
        ),
        // Not JSON, or longer than what was read: its first bytes, as text.
        (None, Some(b)) => (
            "(unreadable)".to_string(),
            cut(&String::from_utf8_lossy(b), MAX_ARGS),
        ),
        (None, None) => ("(body missing)".to_string(), String::new()),
    };
    Waiting {
        id: r.id,
        func,
        user: field("user"),
        source: field("source"),
        size: r.size,
        args,
        age_ms: r.since_ms.map(|s| (now - s).max(0)),
        due_ms: r.due_ms,
        due_in_ms: r.due_ms.map(|d| d - now),
    }
}

fn cron_entry(entry: String, h: &HashMap<String, String>) -> Cron {
    let text = |k: &str| h.get(k).map(|v| cut(v, MAX_ARGS)).unwrap_or_default();
    let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
    let count = |k: &str| int(k).unwrap_or(0).max(0) as u64;
    Cron {
        entry: cut(&entry, 32),
        func: text("func"),
        schedule: String::new(),
        next_ms: None,
        here: false,
        outcome: text("outcome"),
        message: text("message"),
        at_ms: int("at_ms"),
        duration_ms: int("duration_ms"),
        instance: text("instance"),
        runs: count("runs"),
        count_ok: count("count_ok"),
        count_error: count("count_error"),
        count_timeout: count("count_timeout"),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_json(name: &str, requests: u64, busy: u64) -> String {
        serde_json::to_string(&Snapshot {
            name: name.into(),
            host: "h".into(),
            pid: 7,
            version: "0.1.0".into(),
            requests,
            ok: requests,
            workers_busy: busy,
            workers_total: 4,
            ..Snapshot::default()
        })
        .unwrap()
    }

    fn raw() -> Raw {
        Raw {
            now_ms: 100_000,
            serving: "b-2-2".into(),
            heartbeat_ttl_ms: 5_000,
            instances: vec![
                RawInstance {
                    name: "b-2-2".into(),
                    snapshot: Some(snapshot_json("b-2-2", 10, 1)),
                    written_ms: Some(99_500),
                    heartbeat_pttl: 4_200,
                },
                RawInstance {
                    name: "a-1-1".into(),
                    snapshot: Some(snapshot_json("a-1-1", 5, 3)),
                    written_ms: Some(90_000),
                    heartbeat_pttl: -2,
                },
            ],
            queue_length: 3,
            ..Raw::default()
        }
    }

    #[test]
    fn a_lapsed_heartbeat_is_dead_and_listed_last() {
        let s = assemble(raw());
        assert_eq!(s.instances.len(), 2);
        assert_eq!(s.instances[0].snapshot.name, "b-2-2");
        assert!(s.instances[0].alive);
        assert_eq!(s.instances[0].heartbeat_age_ms, Some(800));
        assert_eq!(s.instances[0].seen_ago_ms, Some(500));
        assert!(!s.instances[1].alive);
        assert_eq!(s.instances[1].heartbeat_age_ms, None);
        assert_eq!(s.instances[1].seen_ago_ms, Some(10_000));
        assert_eq!((s.totals.alive, s.totals.dead), (1, 1));
        // Counters of the dead still count; their workers do not.
        assert_eq!(s.totals.requests, 15);
        assert_eq!((s.totals.workers_busy, s.totals.workers_total), (1, 4));
        assert_eq!(s.totals.queue_length, 3);
    }

    #[test]
    fn an_instance_without_a_readable_snapshot_is_still_shown() {
        let mut r = raw();
        r.instances[0].snapshot = Some("not json".into());
        r.instances[1].snapshot = None;
        let s = assemble(r);
        assert_eq!(s.instances[0].snapshot.name, "b-2-2");
        assert_eq!(s.instances[0].snapshot.host, "b");
        assert_eq!(s.instances[0].snapshot.requests, 0);
        assert_eq!(s.instances[1].snapshot.name, "a-1-1");
    }

    #[test]
    fn requests_are_read_leniently_and_cut() {
        let long = "x".repeat(500);
        let body = serde_json::json!({"func": "<script>alert(1)</script>", "user": "foo",
            "source": "web", "args": {"m": long}})
        .to_string();
        let mut r = raw();
        r.waiting = vec![
            RawRequest {
                id: 1,
                prefix: Some(body.clone().into_bytes()),
                size: body.len() as u64,
                since_ms: Some(97_000),
                due_ms: None,
            },
            RawRequest {
                id: 2,
                prefix: Some(b"{\"func\": \"tru".to_vec()),
                size: 1 << 20,
                since_ms: Some(99_000),
                due_ms: None,
            },
            RawRequest {
                id: 3,
                ..RawRequest::default()
            },
        ];
        r.delayed = vec![RawRequest {
            id: 4,
            prefix: Some(br#"{"func":"hello","user":1}"#.to_vec()),
            size: 25,
            since_ms: None,
            due_ms: Some(160_000),
        }];
        let s = assemble(r);
        let w = &s.waiting;
        assert_eq!(w[0].func, "<script>alert(1)</script>");
        assert_eq!((w[0].user.as_str(), w[0].source.as_str()), ("foo", "web"));
        assert_eq!(w[0].args.chars().count(), MAX_ARGS + 1);
        assert!(w[0].args.ends_with('…'));
        assert_eq!(w[0].age_ms, Some(3_000));
        assert_eq!(w[1].func, "(unreadable)");
        assert_eq!(w[1].args, "{\"func\": \"tru");
        assert_eq!(w[1].size, 1 << 20);
        assert_eq!(w[2].func, "(body missing)");
        assert_eq!(s.totals.oldest_waiting_ms, Some(3_000));
        assert_eq!(s.delayed[0].func, "hello");
        assert_eq!(s.delayed[0].user, "1");
        assert_eq!(s.delayed[0].due_in_ms, Some(60_000));
    }

    #[test]
    fn cron_entries_read_their_hash() {
        let mut r = raw();
        let h: HashMap<String, String> = [
            ("func", "hello"),
            ("outcome", "error"),
            ("message", "unexpected error"),
            ("at_ms", "99000"),
            ("duration_ms", "3"),
            ("runs", "4"),
            ("count_ok", "3"),
            ("count_error", "1"),
            ("count_timeout", "nonsense"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        r.cron = vec![("00ff00ff00ff00ff".into(), h)];
        let s = assemble(r);
        let c = &s.cron[0];
        assert_eq!((c.func.as_str(), c.outcome.as_str()), ("hello", "error"));
        assert_eq!((c.at_ms, c.duration_ms), (Some(99_000), Some(3)));
        assert_eq!(
            (c.runs, c.count_ok, c.count_error, c.count_timeout),
            (4, 3, 1, 0)
        );
    }

    #[test]
    fn functions_are_merged_across_instances() {
        let mut r = raw();
        let with = |calls: u64, bucket: usize| {
            let mut s: Snapshot = serde_json::from_str(&snapshot_json("x", 0, 0)).unwrap();
            let mut buckets = vec![0; 17];
            buckets[bucket] = calls;
            s.functions.insert(
                "hello".into(),
                Counts {
                    calls,
                    ok: calls,
                    buckets,
                    ..Counts::default()
                },
            );
            serde_json::to_string(&s).unwrap()
        };
        r.instances[0].snapshot = Some(with(90, 1));
        r.instances[1].snapshot = Some(with(10, 5));
        let s = assemble(r);
        assert_eq!(s.functions.len(), 1);
        let f = &s.functions[0];
        assert_eq!((f.name.as_str(), f.calls, f.ok), ("hello", 100, 100));
        assert_eq!(
            (f.p50_ms, f.p95_ms, f.p99_ms),
            (Some(2), Some(32), Some(32))
        );
        assert!(s
            .instances
            .iter()
            .all(|i| i.snapshot.functions.is_empty() && i.snapshot.recent.is_empty()));
    }

    #[test]
    fn cut_counts_characters_not_bytes() {
        assert_eq!(cut("héllo", 3), "hél…");
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("", 0), "");
    }
}
