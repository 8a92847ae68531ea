//! Cron: functions run on a schedule from CRONTAB, once per tick across every
//! instance on one Redis. The parts:
//!
//! | file | owns |
//! |---|---|
//! | `schedule.rs` | the five (or six) fields, shorthands, zones, the next run; pure |
//! | `parse.rs` | the file: entries, bad lines and why; pure |
//! | `runner.rs` | the cron thread: reload, claim each tick as a request, record outcomes |
//! | here | what `cerbas cron check` and `cerbas cron list` print |
//!
//! A claimed tick is an ordinary request in Redis (tagged with its entry), so the
//! dispatcher runs it like any other and reports its outcome back.
//! Not for: running functions (`dispatch.rs`).

mod parse;
pub(crate) mod runner;
mod schedule;

pub use parse::{parse_crontab, Crontab, Entry, Known, LineError};
pub use schedule::{Schedule, Zone};

use crate::config::Config;
use crate::registry::Registry;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

impl Known {
    /// What entries are checked against: `registry` (with the configuration's
    /// `[functions]` applied), `[access]` and `cron_user`.
    pub fn new(config: &Config, registry: &Registry) -> Known {
        Known {
            functions: registry
                .names()
                .into_iter()
                .map(|n| {
                    let users = registry.options(n).and_then(|o| o.users.clone());
                    (n.to_string(), users)
                })
                .collect(),
            access: config.access.clone(),
            user: config.cron_user.clone(),
        }
    }
}

/// Largest CRONTAB read, in bytes: the server reads it twice a second.
pub(crate) const MAX_FILE: u64 = 1 << 20;

/// The text of CRONTAB, refused past [`MAX_FILE`] bytes. The read itself stops
/// there: a path that is no regular file (`/dev/zero`, a pipe) has no size to
/// check first, and reading it to its end took all the memory there was. Opened
/// without blocking, so a named pipe nobody writes to is an error, not a cron
/// thread stuck in `open`.
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let too_large =
        |size: String| std::io::Error::other(format!("larger than {MAX_FILE} bytes{size}"));
    if let Ok(m) = file.metadata() {
        if m.len() > MAX_FILE {
            return Err(too_large(format!(" ({})", m.len())));
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(too_large(String::new()));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8"))
}

/// Reads and parses the file at `path`.
pub fn read(path: &Path, known: &Known) -> Result<Crontab, String> {
    read_text(path)
        .map(|text| parse_crontab(&text, known))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What `cerbas cron check` prints: every bad line with its number, reason and
/// text, then a count. The bool says whether every line is good.
pub fn check_report(path: &Path, tab: &Crontab) -> (String, bool) {
    let mut out = String::new();
    for e in &tab.errors {
        let _ = writeln!(
            out,
            "{}:{}: {}\n    {}",
            path.display(),
            e.line,
            e.reason,
            e.text
        );
    }
    let _ = writeln!(
        out,
        "{}: {} entries ok, {} bad lines",
        path.display(),
        tab.entries.len(),
        tab.errors.len()
    );
    (out, tab.errors.is_empty())
}

/// An entry's last run as kept in `P-CRON-LAST-{entry}` (field → value).
pub type Last = HashMap<String, String>;

/// Looks up an entry's [`Last`] by its id.
pub type LastOf<'a> = &'a dyn Fn(&str) -> Option<Last>;

/// What `cerbas cron list` prints for each entry: line, schedule, request, the
/// next three runs after `now` (unix seconds) in `zone`, and the last outcome if
/// `last` knows it (`None`: Redis was not reachable).
pub fn list_report(tab: &Crontab, zone: &Zone, now: i64, last: Option<LastOf>) -> String {
    let mut out = String::new();
    for e in &tab.entries {
        let request = serde_json::Value::Object(e.request.clone());
        let _ = writeln!(out, "line {}  {}  {}", e.line, e.schedule.text(), request);
        let next: Vec<String> = e
            .schedule
            .upcoming(now, zone, 3)
            .into_iter()
            .map(|t| zone.format(t))
            .collect();
        let _ = writeln!(out, "  next: {}", next.join(", "));
        let shown = match last {
            None => "unknown (redis not reachable)".to_string(),
            Some(get) => match get(&e.id) {
                None => "never run".to_string(),
                Some(l) => describe_last(&l, zone),
            },
        };
        let _ = writeln!(out, "  last: {shown}");
    }
    for e in &tab.errors {
        let _ = writeln!(out, "line {}  skipped: {}: {}", e.line, e.reason, e.text);
    }
    if tab.entries.is_empty() && tab.errors.is_empty() {
        out.push_str("no entries\n");
    }
    out
}

fn describe_last(l: &Last, zone: &Zone) -> String {
    let field = |k: &str| l.get(k).map(String::as_str).unwrap_or("");
    let at = field("at_ms")
        .parse::<i64>()
        .map(|ms| zone.format(ms.div_euclid(1000)))
        .unwrap_or_else(|_| "?".into());
    let outcome = match (field("outcome"), field("message")) {
        ("error", m) => format!("error ({m})"),
        (o, _) => o.to_string(),
    };
    format!(
        "{outcome} at {at}, took {} ms, on {}; runs: {} (ok {}, errors {}, timeouts {})",
        field("duration_ms"),
        field("instance"),
        field("runs"),
        l.get("count_ok").map_or("0", String::as_str),
        l.get("count_error").map_or("0", String::as_str),
        l.get("count_timeout").map_or("0", String::as_str),
    )
}

/// `cerbas cron list`: the report for the file at `path`, reading last outcomes
/// from the configured Redis if it answers within a second.
pub fn list(config: &Config, known: &Known, path: &Path) -> Result<String, String> {
    let tab = read(path, known)?;
    let zone = config.cron_zone().map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let keys = crate::protocol::Keys::new(&config.prefix, config.db());
    let conn = config
        .connection_url()
        .ok()
        .and_then(|url| redis::Client::open(url.as_str()).ok())
        .and_then(|c| crate::connection::open(&c, Duration::from_secs(1)).ok())
        .map(std::cell::RefCell::new);
    let get = |entry: &str| -> Option<Last> {
        let conn = conn.as_ref()?;
        let l: Last = redis::cmd("HGETALL")
            .arg(keys.cron_last(entry))
            .query(&mut *conn.borrow_mut())
            .ok()?;
        (!l.is_empty()).then_some(l)
    };
    let last: Option<LastOf> = match conn {
        Some(_) => Some(&get),
        None => None,
    };
    let mut out = format!("{}: times in {zone}\n", path.display());
    out.push_str(&list_report(&tab, &zone, now, last));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Access;

    fn known() -> Known {
        Known {
            functions: [("hello".to_string(), None)].into(),
            access: Access {
                users: vec!["cron".into()],
                sources: vec!["foo".into()],
            },
            user: "cron".into(),
        }
    }

    #[test]
    fn check_lists_each_bad_line_and_fails() {
        let tab = parse_crontab(
            "* * * * * | {\"func\":\"hello\",\"source\":\"foo\"}\n\n61 * * * * | {}\n",
            &known(),
        );
        let (out, ok) = check_report(Path::new("CRONTAB"), &tab);
        assert!(!ok);
        assert_eq!(
            out,
            "CRONTAB:3: schedule: minute 61 is out of range (0 to 59)\n    61 * * * * | {}\n\
             CRONTAB: 1 entries ok, 1 bad lines\n"
        );
        let good = parse_crontab("@daily | {\"func\":\"hello\",\"source\":\"foo\"}", &known());
        assert!(check_report(Path::new("C"), &good).1);
    }

    #[test]
    fn list_shows_the_next_three_runs_and_the_last_outcome() {
        let tab = parse_crontab(
            "*/20 * * * * * | {\"func\":\"hello\",\"source\":\"foo\"}\nbad\n",
            &known(),
        );
        let now = 1_780_000_000; // 2026-05-28 20:26:40 UTC
        let unknown = list_report(&tab, &Zone::Utc, now, None);
        assert_eq!(
            unknown,
            "line 1  */20 * * * * *  {\"func\":\"hello\",\"source\":\"foo\",\"user\":\"cron\"}\n\
             \x20 next: 2026-05-28 20:27:00 UTC, 2026-05-28 20:27:20 UTC, 2026-05-28 20:27:40 UTC\n\
             \x20 last: unknown (redis not reachable)\n\
             line 2  skipped: no \"|\" between the schedule and the request (`* * * * * | {\"func\": \"hello\"}`): bad\n"
        );
        let never = |_: &str| None;
        assert!(list_report(&tab, &Zone::Utc, now, Some(&never)).contains("  last: never run\n"));
        let id = tab.entries[0].id.clone();
        let some = move |e: &str| {
            (e == id).then(|| {
                [
                    ("outcome", "error"),
                    ("message", "boom"),
                    ("at_ms", "1780000000500"),
                    ("duration_ms", "12"),
                    ("instance", "h-1"),
                    ("runs", "3"),
                    ("count_ok", "2"),
                    ("count_error", "1"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
            })
        };
        assert!(list_report(&tab, &Zone::Utc, now, Some(&some)).contains(
            "  last: error (boom) at 2026-05-28 20:26:40 UTC, took 12 ms, on h-1; runs: 3 (ok 2, errors 1, timeouts 0)\n"
        ));
    }
}
