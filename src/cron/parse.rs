//! The CRONTAB file, in the original's format: one entry a line, a schedule
//! (`schedule.rs`), `|`, then a JSON request as a client would write it
//! (`{"func": "hello", "args": {}, "source": "foo"}`). Blank lines and `#` comments
//! are skipped. Each bad line becomes a [`LineError`] (its number, the line, the
//! reason) and is skipped; the good ones are kept. A line is checked as the
//! dispatcher would check its request: `func` must exist, `source` and the user
//! (the entry's, or `cron_user`) must be registered and allowed.
//! Pure: text in, entries out. Not for: reading the file or running entries
//! (`runner.rs`).

use super::schedule::Schedule;
use crate::config::Access;
use crate::protocol::{fnv1a, parse_request, CronTag};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Largest line accepted, in bytes.
const MAX_LINE: usize = 64 * 1024;

/// What a line is checked against: the registered functions (with the users each
/// is restricted to, if any), the access lists, and the user of entries that name
/// none.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Function name → the only users who may call it (`None`: anyone registered).
    pub functions: BTreeMap<String, Option<Vec<String>>>,
    /// The configuration's `[access]`.
    pub access: Access,
    /// `cron_user`: the user of an entry without `user`.
    pub user: String,
}

/// One good line.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its line number, from 1.
    pub line: usize,
    /// The line, trimmed.
    pub text: String,
    /// 16 hex digits, a hash of [`Entry::text`]: the same line is the same entry on
    /// every instance and across reloads; an edited line is a new entry.
    pub id: String,
    /// When it runs.
    pub schedule: Schedule,
    /// The request as written, with `user` filled in.
    pub request: Map<String, Value>,
}

impl Entry {
    /// The request body cron writes for one tick: the entry's request, one-way
    /// (nobody listens for its reply), tagged with the entry and the tick.
    pub fn body(&self, tick: i64) -> String {
        let mut r = self.request.clone();
        r.insert("reply".into(), Value::Bool(false));
        let tag = CronTag {
            entry: self.id.clone(),
            tick,
        };
        r.insert("cron".into(), tag.to_json());
        Value::Object(r).to_string()
    }

    /// The function it calls.
    pub fn func(&self) -> &str {
        self.request
            .get("func")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Its line number, from 1.
    pub line: usize,
    /// The line, trimmed (cut at 200 bytes).
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.text)
    }
}

/// A whole file: its good entries and its bad lines, in line order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Crontab {
    /// Lines that will run.
    pub entries: Vec<Entry>,
    /// Lines that were skipped.
    pub errors: Vec<LineError>,
}

/// Parses a whole file.
pub fn parse_crontab(text: &str, known: &Known) -> Crontab {
    // Some editors start a UTF-8 file with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut tab = Crontab::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let entry = parse_line(line, trimmed, known).and_then(|e| {
            match tab.entries.iter().find(|other| other.id == e.id) {
                Some(other) => Err(format!("the same entry as line {}", other.line)),
                None => Ok(e),
            }
        });
        match entry {
            Ok(e) => tab.entries.push(e),
            Err(reason) => tab.errors.push(LineError {
                line,
                text: shorten(trimmed),
                reason,
            }),
        }
    }
    tab
}

fn shorten(text: &str) -> String {
    if text.len() <= 200 {
        return text.to_string();
    }
    let mut end = 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Parses one line that is not blank or a comment.
fn parse_line(line: usize, text: &str, known: &Known) -> Result<Entry, String> {
    if text.len() > MAX_LINE {
        return Err(format!(
            "line too long ({} bytes, limit {MAX_LINE})",
            text.len()
        ));
    }
    let Some((schedule, json)) = text.split_once('|') else {
        return Err(
            "no \"|\" between the schedule and the request (`* * * * * | {\"func\": \"hello\"}`)"
                .into(),
        );
    };
    let schedule = Schedule::parse(schedule).map_err(|e| format!("schedule: {e}"))?;
    let request =
        parse_request(json.trim().as_bytes(), MAX_LINE).map_err(|e| format!("request: {e}"))?;
    let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(json.trim()) else {
        return Err("request: must be a JSON object".into());
    };
    for (field, why) in [
        ("delay", "the schedule says when an entry runs"),
        ("reply", "nobody can listen for a cron run's reply"),
        ("cron", "the server sets it"),
    ] {
        if body.contains_key(field) {
            return Err(format!(
                "request: \"{field}\" is not allowed in an entry ({why})"
            ));
        }
    }
    let user = request.user.clone().unwrap_or_else(|| known.user.clone());
    if !known.access.users.contains(&user) {
        return Err(format!(
            "user not registered: {user} (add it to [access] users)"
        ));
    }
    let source = request
        .source
        .as_deref()
        .ok_or("request: missing \"source\"")?;
    if !known.access.sources.iter().any(|s| s == source) {
        return Err(format!(
            "source not registered: {source} (add it to [access] sources)"
        ));
    }
    match known.functions.get(&request.func) {
        None => return Err(format!("unknown function: {}", request.func)),
        Some(Some(users)) if !users.contains(&user) => {
            return Err(format!("user {user} may not call {}", request.func))
        }
        Some(_) => {}
    }
    body.insert("user".into(), Value::String(user));
    Ok(Entry {
        line,
        text: text.to_string(),
        id: format!("{:016x}", fnv1a(text)),
        schedule,
        request: body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            functions: [
                ("hello".to_string(), None),
                ("echo".to_string(), None),
                ("halt".to_string(), Some(vec!["foo".to_string()])),
            ]
            .into(),
            access: Access {
                users: vec!["cron".into(), "foo".into(), "tom".into()],
                sources: vec!["foo".into(), "web".into()],
            },
            user: "cron".into(),
        }
    }

    const ORIGINAL: &str = r#"* * * * * | {"func": "hello", "args": {}, "source": "foo" }
* * * * * | {"func": "echo", "args": {"message": "yes, sir"}, "source": "foo" }
"#;

    #[test]
    fn the_originals_two_lines_parse_and_run_as_cron_user() {
        let tab = parse_crontab(ORIGINAL, &known());
        assert_eq!(tab.errors, []);
        assert_eq!(tab.entries.len(), 2);
        let hello = &tab.entries[0];
        assert_eq!((hello.line, hello.func()), (1, "hello"));
        assert_eq!(hello.request["user"], "cron");
        assert_eq!(hello.id.len(), 16);
        assert_ne!(hello.id, tab.entries[1].id);
        let body: Value = serde_json::from_str(&hello.body(60)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"func": "hello", "args": {}, "source": "foo", "user": "cron",
                "reply": false, "cron": {"entry": hello.id, "tick": 60}})
        );
        // What cron writes is an ordinary request the reader accepts.
        let r = parse_request(hello.body(60).as_bytes(), 1024).unwrap();
        assert_eq!(r.cron.unwrap().tick, 60);
        assert!(!r.reply);
    }

    #[test]
    fn comments_blanks_seconds_shorthands_and_names() {
        let text = "# a comment\n\n   \n\t# indented comment\n\
            */5 * * * * * | {\"func\":\"hello\",\"source\":\"web\",\"user\":\"tom\"}\n\
            @daily | {\"func\":\"hello\",\"source\":\"web\"}\n\
            0 9 * jan-mar mon-fri | {\"func\":\"echo\",\"args\":{\"message\":\"m\"},\"source\":\"web\"}\n";
        let tab = parse_crontab(text, &known());
        assert_eq!(tab.errors, []);
        let lines: Vec<usize> = tab.entries.iter().map(|e| e.line).collect();
        assert_eq!(lines, [5, 6, 7]);
        assert_eq!(tab.entries[0].request["user"], "tom");
        assert!(
            !tab.entries[1].request.contains_key("args"),
            "args may be omitted"
        );
        // Windows line ends and a byte-order mark are fine too.
        let crlf = format!("\u{feff}{}", ORIGINAL.replace('\n', "\r\n"));
        let tab = parse_crontab(&crlf, &known());
        assert_eq!((tab.entries.len(), tab.errors.len()), (2, 0));
    }

    #[test]
    fn each_bad_line_is_reported_with_its_number_and_reason_and_the_rest_kept() {
        let cases = [
            ("* * * * * hello", "no \"|\" between the schedule and the request (`* * * * * | {\"func\": \"hello\"}`)"),
            ("* * * * | {\"func\":\"hello\",\"source\":\"foo\"}", "schedule: expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found 4"),
            ("61 * * * * | {\"func\":\"hello\",\"source\":\"foo\"}", "schedule: minute 61 is out of range (0 to 59)"),
            ("* * * * * | {\"func\":\"hello\",", "request: malformed JSON: EOF while parsing a value at line 1 column 16"),
            ("* * * * * | [1]", "request: request must be a JSON object"),
            ("* * * * * | {\"args\":{}}", "request: missing \"func\""),
            ("* * * * * | {\"func\":\"hello\",\"args\":[]}", "request: \"args\" must be an object"),
            ("* * * * * | {\"func\":\"nope\",\"source\":\"foo\"}", "unknown function: nope"),
            ("* * * * * | {\"func\":\"hello\"}", "request: missing \"source\""),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"cli\"}", "source not registered: cli (add it to [access] sources)"),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"foo\",\"user\":\"eve\"}", "user not registered: eve (add it to [access] users)"),
            ("* * * * * | {\"func\":\"halt\",\"source\":\"foo\"}", "user cron may not call halt"),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"foo\",\"delay\":5}", "request: \"delay\" is not allowed in an entry (the schedule says when an entry runs)"),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"foo\",\"reply\":true}", "request: \"reply\" is not allowed in an entry (nobody can listen for a cron run's reply)"),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"foo\",\"cron\":{}}", "request: \"cron\" must be {\"entry\": \"<entry id>\", \"tick\": <unix seconds>}"),
            ("* * * * * | {\"func\":\"hello\",\"source\":\"foo\",\"user\":7}", "request: \"user\" must be a string"),
        ];
        let mut text = String::from("* * * * * | {\"func\":\"hello\",\"source\":\"foo\"}\n");
        for (line, _) in &cases {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("* * * * * | {\"func\":\"hello\",\"source\":\"foo\"}\n");
        let tab = parse_crontab(&text, &known());
        assert_eq!(tab.entries.len(), 1, "the good first line is kept");
        assert_eq!(tab.errors.len(), cases.len() + 1);
        for (i, (line, reason)) in cases.iter().enumerate() {
            let e = &tab.errors[i];
            assert_eq!(
                (e.line, e.text.as_str(), e.reason.as_str()),
                (i + 2, *line, *reason)
            );
        }
        let dup = tab.errors.last().unwrap();
        assert_eq!(dup.reason, "the same entry as line 1");
        assert_eq!(
            dup.to_string(),
            format!("line {}: the same entry as line 1: * * * * * | {{\"func\":\"hello\",\"source\":\"foo\"}}", cases.len() + 2)
        );
    }

    #[test]
    fn a_huge_line_is_refused_and_shown_short() {
        let line = format!(
            "* * * * * | {{\"func\":\"hello\",\"source\":\"foo\",\"x\":\"{}\"}}",
            "é".repeat(40_000)
        );
        let tab = parse_crontab(&line, &known());
        let e = &tab.errors[0];
        assert!(e.reason.starts_with("line too long ("), "{}", e.reason);
        assert!(e.text.len() <= 204 && e.text.ends_with('…'));
    }
}
