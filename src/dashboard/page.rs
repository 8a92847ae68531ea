//! The dashboard's HTML page, rendered on the server from a [`State`] so that it
//! shows a complete snapshot with scripts off; `app.js` (served beside it) then
//! rebuilds the same tables from `/dashboard/state.json` every second. Every
//! value goes through [`escape`]: function names, users and arguments come from
//! request bodies, which anyone who can write to Redis controls. The page has no
//! inline script or style, so the Content-Security-Policy (`http/dashboard.rs`)
//! can forbid them. Action buttons (and the CSRF token, in a `<meta>` the
//! script reads) are on the page only for a user who may act; each button says
//! what it does in `data-*` attributes, which `app.js` posts. Not for: fetching
//! the state or HTTP headers.

use super::state::{State, Waiting};
use std::fmt::Write;

/// The page's script, served at `/dashboard/app.js`.
pub(crate) const APP_JS: &str = include_str!("app.js");
/// The page's stylesheet, served at `/dashboard/style.css`.
pub(crate) const STYLE_CSS: &str = include_str!("style.css");

/// `s` with the five characters that mean something in HTML (text or a quoted
/// attribute) replaced by their entities.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration in ms, as a person reads it (`app.js` has the same rules).
pub(crate) fn duration(ms: i64) -> String {
    let a = ms.unsigned_abs();
    let sign = if ms < 0 { "-" } else { "" };
    match a {
        0..=999 => format!("{sign}{a} ms"),
        1_000..=59_999 => format!("{sign}{:.1} s", a as f64 / 1000.0),
        60_000..=3_599_999 => format!("{sign}{:.1} min", a as f64 / 60_000.0),
        _ => format!("{sign}{:.1} h", a as f64 / 3_600_000.0),
    }
}

/// A time in ms since the epoch, in UTC (`app.js` has the same format).
pub(crate) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

fn opt(v: Option<i64>, f: fn(i64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

/// One table row of already-formatted cells, each escaped here.
fn row(out: &mut String, class: &str, cells: &[String]) {
    row_with(out, class, cells, None);
}

/// An action button: what it posts (`action` and one `key`: `value`) and its label.
pub(crate) struct Button<'a> {
    pub(crate) action: &'a str,
    pub(crate) key: &'a str,
    pub(crate) value: String,
    pub(crate) label: &'a str,
}

/// A row with, when actions are allowed (`buttons` is `Some`), a last cell of
/// buttons (`app.js`: `buttonCell`).
fn row_with(out: &mut String, class: &str, cells: &[String], buttons: Option<&[Button]>) {
    let _ = write!(out, "<tr class=\"{}\">", escape(class));
    for c in cells {
        let _ = write!(out, "<td>{}</td>", escape(c));
    }
    if let Some(buttons) = buttons {
        out.push_str("<td class=\"actions\">");
        for b in buttons {
            let _ = write!(
                out,
                "<button type=\"button\" data-action=\"{}\" data-{}=\"{}\">{}</button>",
                escape(b.action),
                escape(b.key),
                escape(&b.value),
                escape(b.label)
            );
        }
        out.push_str("</td>");
    }
    out.push_str("</tr>\n");
}

/// The header cells of a table, with "actions" last when they are allowed.
fn heads<'a>(head: &[&'a str], actions: bool) -> Vec<&'a str> {
    let mut h = head.to_vec();
    if actions {
        h.push("actions");
    }
    h
}

/// A table with `id` on its body (what `app.js` refills), its header cells, and
/// a row when it is empty.
fn table(out: &mut String, id: &str, head: &[&str], rows: &str) {
    let _ = write!(out, "<table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{h}</th>");
    }
    let _ = write!(out, "</tr></thead><tbody id=\"{id}\">");
    if rows.is_empty() {
        let _ = write!(
            out,
            "<tr class=\"empty\"><td colspan=\"{}\">none</td></tr>",
            head.len()
        );
    }
    out.push_str(rows);
    out.push_str("</tbody></table>\n");
}

/// The cells of a waiting request (`app.js`: `waitingCells`).
fn waiting_cells(w: &Waiting) -> Vec<String> {
    vec![
        w.id.to_string(),
        w.func.clone(),
        w.user.clone(),
        w.source.clone(),
        w.size.to_string(),
        w.args.clone(),
        opt(w.age_ms, duration),
    ]
}

/// The cells of a delayed request (`app.js`: `delayedCells`).
fn delayed_cells(w: &Waiting) -> Vec<String> {
    vec![
        w.id.to_string(),
        w.func.clone(),
        w.user.clone(),
        w.source.clone(),
        w.size.to_string(),
        w.args.clone(),
        opt(w.due_ms, time),
        opt(w.due_in_ms, duration),
    ]
}

/// The whole page for `state`; with `token` (the user may act), its action
/// buttons and the CSRF token the script sends with them.
pub(crate) fn render(state: &State, token: Option<&str>) -> String {
    let t = &state.totals;
    let acts = token.is_some();
    let mut out = String::with_capacity(16 * 1024);
    out.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>cerbas dashboard</title>",
    );
    if let Some(token) = token {
        let _ = write!(
            out,
            "<meta name=\"cerbas-csrf\" content=\"{}\">",
            escape(token)
        );
    }
    out.push_str(
        "<link rel=\"stylesheet\" href=\"/dashboard/style.css\">\
         <script src=\"/dashboard/app.js\" defer></script></head>\n<body>\n",
    );
    let _ = writeln!(
        out,
        "<header><h1>cerbas</h1><p>served by <span id=\"serving\">{}</span>; \
         <span id=\"status\" data-live=\"0\">snapshot of {}</span></p>\
         <p id=\"action-status\"></p></header>",
        escape(&state.serving),
        escape(&time(state.now_ms))
    );
    // Totals: each value's id is its key in `totals` (app.js fills them by id).
    out.push_str("<section><h2>Totals</h2><dl class=\"totals\">\n");
    let totals: [(&str, &str, String); 12] = [
        ("alive", "instances alive", t.alive.to_string()),
        ("dead", "instances dead", t.dead.to_string()),
        ("requests", "requests", t.requests.to_string()),
        ("ok", "ok", t.ok.to_string()),
        ("errors", "errors", t.errors.to_string()),
        ("timeouts", "timeouts", t.timeouts.to_string()),
        ("panics", "panics", t.panics.to_string()),
        ("cache_hits", "cache hits", t.cache_hits.to_string()),
        (
            "workers",
            "workers busy",
            format!("{}/{}", t.workers_busy, t.workers_total),
        ),
        ("queue_length", "queue length", t.queue_length.to_string()),
        (
            "oldest_waiting_ms",
            "oldest waiting",
            opt(t.oldest_waiting_ms, duration),
        ),
        ("delayed", "delayed", t.delayed.to_string()),
    ];
    for (id, label, value) in &totals {
        let _ = writeln!(
            out,
            "<div><dt>{label}</dt><dd id=\"t-{id}\">{}</dd></div>",
            escape(value)
        );
    }
    out.push_str("</dl><div id=\"chart\" class=\"chart\"></div></section>\n");

    let mut rows = String::new();
    for i in &state.instances {
        let s = &i.snapshot;
        let status = match (i.alive, s.paused) {
            (false, _) => "dead",
            (true, true) => "paused",
            (true, false) => "alive",
        };
        let pause = match s.paused {
            true => ("resume", "resume"),
            false => ("pause", "pause"),
        };
        let buttons = [Button {
            action: pause.0,
            key: "instance",
            value: s.name.clone(),
            label: pause.1,
        }];
        row_with(
            &mut rows,
            status,
            &[
                s.name.clone(),
                status.into(),
                s.host.clone(),
                s.pid.to_string(),
                s.version.clone(),
                duration(s.uptime_secs.saturating_mul(1000) as i64),
                format!("{}/{}", s.workers_busy, s.workers_total),
                s.hung.to_string(),
                s.in_hand.to_string(),
                opt(i.heartbeat_age_ms, duration),
                opt(i.seen_ago_ms, duration),
                format!("{} ({} ok, {} errors)", s.requests, s.ok, s.errors),
            ],
            match (acts, i.alive) {
                (false, _) => None,
                (true, true) => Some(&buttons[..]),
                (true, false) => Some(&[]),
            },
        );
    }
    out.push_str("<section><h2>Instances</h2>\n");
    table(
        &mut out,
        "instances",
        &heads(
            &[
                "name",
                "status",
                "host",
                "pid",
                "version",
                "uptime",
                "workers busy",
                "hung",
                "in hand",
                "heartbeat age",
                "snapshot age",
                "requests",
            ],
            acts,
        ),
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    for w in &state.waiting {
        let buttons = [Button {
            action: "delete",
            key: "id",
            value: w.id.to_string(),
            label: "delete",
        }];
        row_with(
            &mut rows,
            "",
            &waiting_cells(w),
            acts.then_some(&buttons[..]),
        );
    }
    let _ = writeln!(
        out,
        "<section><h2>Queue: first {} waiting</h2>",
        super::state::MAX_REQUESTS
    );
    table(
        &mut out,
        "waiting",
        &heads(
            &["id", "func", "user", "source", "bytes", "args", "waiting"],
            acts,
        ),
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    for w in &state.delayed {
        let buttons = [
            Button {
                action: "run",
                key: "id",
                value: w.id.to_string(),
                label: "run now",
            },
            Button {
                action: "delete",
                key: "id",
                value: w.id.to_string(),
                label: "delete",
            },
        ];
        row_with(
            &mut rows,
            "",
            &delayed_cells(w),
            acts.then_some(&buttons[..]),
        );
    }
    let _ = writeln!(
        out,
        "<section><h2>Delayed: next {} due</h2>",
        super::state::MAX_REQUESTS
    );
    table(
        &mut out,
        "delayed",
        &heads(
            &[
                "id", "func", "user", "source", "bytes", "args", "due", "due in",
            ],
            acts,
        ),
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    let ms = |v: Option<u64>| v.map_or("–".to_string(), |v| format!("≤ {v} ms"));
    for f in &state.functions {
        row(
            &mut rows,
            "",
            &[
                f.name.clone(),
                f.calls.to_string(),
                f.ok.to_string(),
                f.errors.to_string(),
                f.timeouts.to_string(),
                f.panics.to_string(),
                f.refused.to_string(),
                f.cache_hits.to_string(),
                ms(f.p50_ms),
                ms(f.p95_ms),
                ms(f.p99_ms),
                f.recent_calls.to_string(),
                f.recent_errors.to_string(),
                ms(f.recent_p50_ms),
                ms(f.recent_p95_ms),
                ms(f.recent_p99_ms),
            ],
        );
    }
    out.push_str(
        "<section><h2>Functions (since each instance's start, and over the last 5 minutes)</h2>\n",
    );
    table(
        &mut out,
        "functions",
        &[
            "function",
            "calls",
            "ok",
            "errors",
            "timeouts",
            "panics",
            "refused",
            "cache hits",
            "p50",
            "p95",
            "p99",
            "calls 5 min",
            "errors 5 min",
            "p50 5 min",
            "p95 5 min",
            "p99 5 min",
        ],
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    for c in &state.cron {
        let buttons = [Button {
            action: "cron",
            key: "entry",
            value: c.entry.clone(),
            label: "run now",
        }];
        row_with(
            &mut rows,
            &c.outcome,
            &cron_cells(c),
            acts.then_some(if c.here { &buttons[..] } else { &[] }),
        );
    }
    out.push_str("<section><h2>Cron entries</h2>\n");
    table(
        &mut out,
        "cron",
        &heads(
            &[
                "entry",
                "func",
                "schedule",
                "next run",
                "last outcome",
                "message",
                "last run",
                "took",
                "instance",
                "runs",
            ],
            acts,
        ),
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    for e in &state.errors {
        row(
            &mut rows,
            "",
            &[
                time(e.at_ms),
                e.id.map_or("(http)".into(), |id| id.to_string()),
                e.func.clone(),
                e.user.clone(),
                e.message.clone(),
                e.instance.clone(),
            ],
        );
    }
    let _ = writeln!(
        out,
        "<section><h2>Recent errors (last {}, newest first)</h2>",
        super::errors::MAX_ERRORS
    );
    table(
        &mut out,
        "errors",
        &["time", "id", "func", "user", "message", "instance"],
        &rows,
    );
    out.push_str("</section>\n");

    let mut rows = String::new();
    for p in &state.proxies {
        row(
            &mut rows,
            &p.state,
            &[
                p.name.clone(),
                p.prefix.clone(),
                p.target.clone(),
                p.state.clone(),
                p.requests.to_string(),
                p.failures.to_string(),
                p.refused.to_string(),
            ],
        );
    }
    out.push_str("<section><h2>Proxy targets (this instance)</h2>\n");
    table(
        &mut out,
        "proxies",
        &[
            "name", "prefix", "target", "breaker", "requests", "failures", "refused",
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "</section>\n<footer>{}; updates every second with scripts on</footer>\n</body></html>",
        if acts {
            "actions allowed (they need scripts on)"
        } else {
            "read-only"
        }
    );
    out
}

/// The cells of a cron entry (`app.js`: `cronCells`).
fn cron_cells(c: &super::state::Cron) -> Vec<String> {
    vec![
        c.entry.clone(),
        c.func.clone(),
        c.schedule.clone(),
        opt(c.next_ms, time),
        c.outcome.clone(),
        c.message.clone(),
        opt(c.at_ms, time),
        opt(c.duration_ms, duration),
        c.instance.clone(),
        format!(
            "{} ({} ok, {} errors, {} timeouts)",
            c.runs, c.count_ok, c.count_error, c.count_timeout
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::state::{assemble, Raw, RawRequest};
    use super::*;

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(
            escape(r#"<img src=x onerror="alert('1')">&"#),
            "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;"
        );
    }

    /// A state with one waiting request, `id` with `body`.
    fn waiting(id: u64, body: &str) -> State {
        assemble(Raw {
            waiting: vec![RawRequest {
                id,
                prefix: Some(body.as_bytes().to_vec()),
                size: body.len() as u64,
                ..RawRequest::default()
            }],
            ..Raw::default()
        })
    }

    #[test]
    fn hostile_requests_render_as_text() {
        let body = r#"{"func":"<script>alert(1)</script>","user":"<b>u</b>","source":"web","args":{"m":"<img src=x onerror=alert(1)>"}}"#;
        let mut state = waiting(5, body);
        state.now_ms = 1_700_000_000_000;
        state.serving = "<i>me</i>".into();
        let html = render(&state, None);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>u") && !html.contains("<i>me"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        // The only scripts are the page's own file.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/dashboard/app.js\" defer></script>"));
        assert!(!html.contains("style="), "{html}");
    }

    #[test]
    fn each_table_holds_its_own_rows() {
        let mut state = assemble(Raw::default());
        state.cron = vec![super::super::state::Cron {
            entry: "00ff00ff00ff00ff".into(),
            func: "cronfunc".into(),
            outcome: "ok".into(),
            runs: 1,
            count_ok: 1,
            ..Default::default()
        }];
        state.functions = vec![super::super::state::Function {
            name: "fnname".into(),
            calls: 1,
            ok: 1,
            errors: 0,
            timeouts: 0,
            panics: 0,
            refused: 0,
            cache_hits: 0,
            p50_ms: Some(1),
            p95_ms: None,
            p99_ms: None,
            recent_calls: 0,
            recent_errors: 0,
            recent_p50_ms: None,
            recent_p95_ms: None,
            recent_p99_ms: None,
        }];
        let html = render(&state, None);
        let body = |id: &str| {
            let start = html.find(&format!("<tbody id=\"{id}\">")).unwrap();
            let end = start + html[start..].find("</tbody>").unwrap();
            html[start..end].to_string()
        };
        assert!(body("cron").contains("<td>cronfunc</td>"), "{html}");
        assert!(!body("cron").contains("fnname"), "{html}");
        assert!(
            body("functions").contains("<td>fnname</td><td>1</td>"),
            "{html}"
        );
        assert!(
            body("functions").contains("<td>≤ 1 ms</td><td>–</td>"),
            "{html}"
        );
    }

    #[test]
    fn buttons_and_the_token_only_for_who_may_act() {
        let state = waiting(42, r#"{"func":"echo","user":"u","source":"web","args":{}}"#);
        let read_only = render(&state, None);
        assert!(!read_only.contains("<button"), "{read_only}");
        assert!(!read_only.contains("cerbas-csrf"), "{read_only}");
        assert!(!read_only.contains("<th>actions</th>"), "{read_only}");
        let html = render(&state, Some("t0k\"en"));
        assert!(
            html.contains("<meta name=\"cerbas-csrf\" content=\"t0k&quot;en\">"),
            "{html}"
        );
        assert!(
            html.contains(
                "<td class=\"actions\"><button type=\"button\" data-action=\"delete\" data-id=\"42\">delete</button></td>"
            ),
            "{html}"
        );
        assert!(html.contains("<th>actions</th>"), "{html}");
    }

    #[test]
    fn an_empty_cluster_renders() {
        let html = render(&assemble(Raw::default()), None);
        assert!(html.contains("<tbody id=\"instances\"><tr class=\"empty\">"));
        assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn durations_and_times_read_well() {
        assert_eq!(duration(0), "0 ms");
        assert_eq!(duration(999), "999 ms");
        assert_eq!(duration(1_500), "1.5 s");
        assert_eq!(duration(-90_000), "-1.5 min");
        assert_eq!(duration(7_200_000), "2.0 h");
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
    }
}
