//! The dashboard (issue 11) over real HTTP on loopback, with a real redis-server
//! and two `cerbas` processes: both instances in `/dashboard/state.json` on
//! either of them, hostile request bodies escaped in the server-rendered page,
//! the security headers, a `kill -9`ed instance shown dead, a graceful stop
//! leaving the page, tokens, bad requests and Redis not answering. The browser
//! test (headless Chromium running the page's script) is `browser_*` at the end.

mod common;

use common::{config_with, free_port, submit_many, wait_for, Redis, Server};
use serde_json::{json, Value};
use std::time::Duration;

const SECS: Duration = Duration::from_secs(1);
const XSS_ARG: &str = "<img src=x onerror=alert(1)>";
const XSS_FUNC: &str = "<script>alert(1)</script>";

type Answer = (u16, ureq::http::HeaderMap, Vec<u8>);

fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(10 * SECS))
        .build()
        .into();
    let mut rq = agent.get(url);
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    let mut r = rq.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = r.body_mut().read_to_vec().expect("body");
    (r.status().as_u16(), r.headers().clone(), body)
}

fn get(url: &str) -> Answer {
    get_with(url, &[])
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.1.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn body(a: &Answer) -> String {
    String::from_utf8_lossy(&a.2).into_owned()
}

/// A cerbas process with its HTTP plug on a port of its own.
struct Node {
    server: Server,
    port: u16,
}

impl Node {
    fn start(redis: &Redis, config: &std::path::Path, workers: &str) -> Node {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = config.to_string_lossy().into_owned();
        let server = Server::start_args(
            redis,
            &["--config", &config, "--http", &addr, "--workers", workers],
        );
        Node { server, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn state(&self) -> Value {
        let a = get(&self.url("/dashboard/state.json"));
        assert_eq!(a.0, 200, "{}", body(&a));
        serde_json::from_slice(&a.2).expect("state.json is JSON")
    }

    /// Waits until the state satisfies `ok`, and returns it.
    fn wait_state(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, 20 * SECS, || Some(self.state()).filter(|s| ok(s)))
    }
}

/// `sleep` may run 30 s here, so a few of them keep every worker busy.
fn long_sleep_config() -> std::path::PathBuf {
    config_with("[functions.sleep]\ntimeout_ms = 30000\n")
}

fn instance<'a>(state: &'a Value, name: &str) -> Option<&'a Value> {
    state["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

/// The instances alive whose snapshot is in (an instance registers before its
/// first snapshot: for a moment it shows with its name only).
fn alive_names(state: &Value) -> Vec<String> {
    state["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["alive"] == true && i["pid"].as_u64().is_some_and(|p| p > 0))
                .filter_map(|i| i["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn body_of(func: &str, args: Value, extra: Value) -> String {
    let mut b =
        json!({"func": func, "args": args, "user": "foo", "source": "cerbastest", "reply": false});
    if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(extra.clone());
    }
    b.to_string()
}

/// Two instances with one worker each, both kept busy by a 20 s `sleep`, a
/// delayed request, and two hostile requests waiting in the queue behind them.
fn busy_cluster(redis: &Redis) -> (Node, Node) {
    let config = long_sleep_config();
    let a = Node::start(redis, &config, "1");
    let b = Node::start(redis, &config, "1");
    a.wait_state("both instances alive", |s| alive_names(s).len() == 2);
    let mut c = redis.conn();
    submit_many(
        &mut c,
        &[body_of("hello", json!({}), json!({"delay": 600_000}))],
    );
    a.wait_state("the delayed request stored", |s| {
        s["delayed"].as_array().is_some_and(|d| d.len() == 1)
    });
    let sleeper = body_of("sleep", json!({"ms": 20_000}), json!({}));
    submit_many(&mut c, &[sleeper.clone(), sleeper]);
    a.wait_state("both workers busy", |s| s["totals"]["workers_busy"] == 2);
    submit_many(
        &mut c,
        &[
            body_of("echo", json!({"message": XSS_ARG}), json!({})),
            body_of(XSS_FUNC, json!({"a": 1}), json!({})),
        ],
    );
    (a, b)
}

#[test]
fn both_instances_the_queue_and_the_delayed_show_on_either_instance() {
    let redis = Redis::start();
    let (a, b) = busy_cluster(&redis);
    let names = alive_names(&a.state());
    let s = b.wait_state("two requests waiting", |s| {
        s["waiting"].as_array().is_some_and(|w| w.len() == 2)
    });
    assert_eq!(alive_names(&s), names, "{s:#}");
    for name in &names {
        let i = instance(&s, name).expect("instance");
        assert_eq!(i["workers_total"], 1, "{i}");
        assert_eq!(i["workers_busy"], 1, "{i}");
        assert_eq!(i["version"], env!("CARGO_PKG_VERSION"));
        assert!(i["pid"].as_u64().is_some_and(|p| p > 0));
        assert!(i["heartbeat_age_ms"].as_i64().is_some_and(|h| h <= 5_000));
    }
    let pids: Vec<u64> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    let mut expected = vec![a.server.pid() as u64, b.server.pid() as u64];
    expected.sort();
    let mut pids = pids;
    pids.sort();
    assert_eq!(pids, expected);
    assert_eq!(s["totals"]["queue_length"], 2);
    assert!(s["totals"]["oldest_waiting_ms"]
        .as_i64()
        .is_some_and(|a| a >= 0));
    let w = &s["waiting"];
    assert_eq!(w[0]["func"], "echo");
    assert_eq!(w[0]["user"], "foo");
    assert_eq!(w[0]["source"], "cerbastest");
    assert_eq!(w[0]["args"], json!({"message": XSS_ARG}).to_string());
    assert_eq!(w[1]["func"], XSS_FUNC);
    let d = &s["delayed"][0];
    assert_eq!(d["func"], "hello");
    let due_in = d["due_in_ms"].as_i64().expect("due_in_ms");
    assert!((500_000..=600_000).contains(&due_in), "{d}");
    assert_eq!(s["totals"]["delayed"], 1);
}

#[test]
fn hostile_requests_are_escaped_in_the_page_and_headers_are_strict() {
    let redis = Redis::start();
    let (a, _b) = busy_cluster(&redis);
    a.wait_state("two requests waiting", |s| {
        s["waiting"].as_array().is_some_and(|w| w.len() == 2)
    });
    let page = get(&a.url("/dashboard"));
    assert_eq!(page.0, 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    let html = body(&page);
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<img"), "{html}");
    assert_eq!(html.matches("<script").count(), 1, "only app.js: {html}");
    // Both instances, rendered by the server (scripts off).
    assert_eq!(html.matches("<tr class=\"alive\">").count(), 2, "{html}");
    for path in [
        "/dashboard",
        "/dashboard/state.json",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ] {
        let r = get(&a.url(path));
        assert_eq!(r.0, 200, "{path}");
        let csp = header(&r, "content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        assert_eq!(header(&r, "cache-control"), "no-store");
    }
    let js = get(&a.url("/dashboard/app.js"));
    assert_eq!(
        header(&js, "content-type"),
        "text/javascript; charset=utf-8"
    );
    assert!(
        !body(&js).contains("innerHTML"),
        "the script never parses data as HTML"
    );
    let css = get(&a.url("/dashboard/style.css"));
    assert_eq!(header(&css, "content-type"), "text/css; charset=utf-8");
}

#[test]
fn a_killed_instance_shows_dead_and_a_stopped_one_leaves() {
    let redis = Redis::start();
    let config = long_sleep_config();
    let a = Node::start(&redis, &config, "2");
    let mut b = Node::start(&redis, &config, "2");
    let mut c = Node::start(&redis, &config, "2");
    let s = a.wait_state("three instances alive", |s| alive_names(s).len() == 3);
    let b_name = instance_by_pid(&s, b.server.pid());
    let c_name = instance_by_pid(&s, c.server.pid());
    b.server.kill();
    let s = a.wait_state("the killed instance dead", |s| {
        instance(s, &b_name).is_some_and(|i| i["alive"] == false)
    });
    let dead = instance(&s, &b_name).unwrap();
    assert_eq!(dead["heartbeat_age_ms"], Value::Null);
    assert!(
        dead["seen_ago_ms"].as_i64().is_some_and(|a| a >= 1_000),
        "{dead}"
    );
    assert_eq!(s["totals"]["dead"], 1);
    // The page says so too, with scripts off.
    let html = body(&get(&a.url("/dashboard")));
    assert!(html.contains("<tr class=\"dead\">"), "{html}");
    // A graceful stop is not a death: the instance leaves the page.
    c.server.signal(libc::SIGTERM);
    assert!(c.server.wait_exit(20 * SECS).is_some());
    a.wait_state("the stopped instance gone", |s| {
        instance(s, &c_name).is_none()
    });
}

fn instance_by_pid(state: &Value, pid: i32) -> String {
    state["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["pid"] == pid))
        .and_then(|i| i["name"].as_str())
        .unwrap_or_else(|| panic!("no instance with pid {pid}: {state:#}"))
        .to_string()
}

#[test]
fn tokens_guard_the_dashboard() {
    let redis = Redis::start();
    let token = "dashboard-token-0123456789";
    let config = config_with(&format!("[http.tokens]\n\"{token}\" = \"tom\"\n"));
    let a = Node::start(&redis, &config, "2");
    for path in ["/dashboard", "/dashboard/state.json", "/dashboard/app.js"] {
        let r = get(&a.url(path));
        assert_eq!(r.0, 401, "{path}");
        assert!(
            header(&r, "www-authenticate").starts_with("Basic "),
            "{path}"
        );
        let r = get_with(
            &a.url(path),
            &[("Authorization", "Bearer wrong-token-0123456789")],
        );
        assert_eq!(r.0, 401, "{path}");
        let r = get_with(
            &a.url(path),
            &[("Authorization", &format!("Bearer {token}"))],
        );
        assert_eq!(r.0, 200, "{path}");
    }
    // Basic, as a browser sends it: any user name, the token as password.
    // "x:dashboard-token-0123456789"
    let basic = "Basic eDpkYXNoYm9hcmQtdG9rZW4tMDEyMzQ1Njc4OQ==";
    let r = get_with(&a.url("/dashboard"), &[("Authorization", basic)]);
    assert_eq!(r.0, 200);
    assert!(!body(&r).contains(token), "the page never shows a token");
    let r = get_with(&a.url("/dashboard"), &[("Authorization", "Basic !!!")]);
    assert_eq!(r.0, 401);
}

#[test]
fn bad_requests_and_bad_data_get_clear_answers() {
    let redis = Redis::start();
    let a = Node::start(&redis, &long_sleep_config(), "1");
    a.wait_state("the instance alive", |s| alive_names(s).len() == 1);
    assert_eq!(get(&a.url("/dashboard/nothing")).0, 404);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .post(&a.url("/dashboard"))
        .send(&b"x"[..])
        .expect("POST answered");
    assert_eq!(r.status().as_u16(), 405, "read-only");
    // Keep the worker busy, then queue what a client should not write: a body
    // that is not JSON, a hash where a body should be, an id without a body.
    let mut c = redis.conn();
    submit_many(
        &mut c,
        &[body_of("sleep", json!({"ms": 20_000}), json!({}))],
    );
    a.wait_state("the worker busy", |s| s["totals"]["workers_busy"] == 1);
    let ids = submit_many(&mut c, &["not json <b>".to_string(), "{}".to_string()]);
    redis::cmd("DEL")
        .arg(format!("CERBAS-REQ-{:010}", ids[1]))
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("HSET")
        .arg(format!("CERBAS-REQ-{:010}", ids[1]))
        .arg("a")
        .arg("b")
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg("999999")
        .query::<()>(&mut c)
        .unwrap();
    let s = a.wait_state("three waiting", |s| {
        s["waiting"].as_array().is_some_and(|w| w.len() == 3)
    });
    assert_eq!(s["waiting"][0]["func"], "(unreadable)");
    assert_eq!(s["waiting"][0]["args"], "not json <b>");
    assert_eq!(s["waiting"][1]["func"], "(body missing)");
    assert_eq!(s["waiting"][2]["func"], "(body missing)");
    // Redis not answering: 503 at once, not a hung page.
    redis.pause();
    let started = std::time::Instant::now();
    let r = get(&a.url("/dashboard/state.json"));
    let page = get(&a.url("/dashboard"));
    redis.resume();
    assert_eq!(r.0, 503, "{}", body(&r));
    assert_eq!(page.0, 503);
    assert!(started.elapsed() < 5 * SECS);
    a.wait_state("answers again", |_| true);
}

// ---- in a real browser ----

/// The Chromium binary: `CERBAS_CHROMIUM`, else `chromium` on the PATH. A
/// missing browser fails the test (it is not skipped): `make test` installs it.
fn chromium() -> String {
    let bin = std::env::var("CERBAS_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{bin} not found: the dashboard's browser test needs Debian's chromium \
         (scripts/setup.sh --clients installs it; or set CERBAS_CHROMIUM)"
    );
    bin
}

/// Runs headless Chromium on `url` with `extra` arguments until it exits (at most
/// 60 s); returns its stdout. `--virtual-time-budget` lets the page's script run
/// (and poll) for that long before the DOM is dumped.
fn run_chromium(url: &str, extra: &[&str]) -> String {
    let bin = chromium();
    let profile = common::scratch("chromium");
    let mut child = std::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=4000")
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let reader = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
            text
        })
    });
    let done = wait_for("chromium to finish", 60 * SECS, || {
        child.try_wait().ok().flatten()
    });
    if let Some(r) = reader {
        out = r.join().unwrap_or_default();
    }
    let _ = std::fs::remove_dir_all(&profile);
    assert!(done.success(), "chromium failed: {done:?}");
    out
}

#[test]
fn browser_runs_the_script_which_fills_the_page_and_runs_no_injected_code() {
    let redis = Redis::start();
    let (a, _b) = busy_cluster(&redis);
    // One more hostile argument, whose handler would mark the page if it ran.
    let marker = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">";
    submit_many(
        &mut redis.conn(),
        &[body_of("echo", json!({"message": marker}), json!({}))],
    );
    a.wait_state("three requests waiting", |s| {
        s["waiting"].as_array().is_some_and(|w| w.len() == 3)
    });
    let dom = run_chromium(&a.url("/dashboard"), &["--dump-dom"]);
    // The script fetched state.json and refilled the tables.
    assert!(dom.contains("live, updated"), "{dom}");
    assert!(!dom.contains("data-live=\"0\""), "{dom}");
    for table in ["instances", "waiting", "delayed", "functions", "cron"] {
        assert!(
            dom.contains(&format!("<tbody id=\"{table}\" data-filled=\"script\">")),
            "{table} not filled by the script: {dom}"
        );
    }
    assert_eq!(dom.matches("<tr class=\"alive\">").count(), 2, "{dom}");
    // The hostile values are text in the live DOM: no element made of them, no
    // handler run.
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<img"), "{dom}");
    // (The marker's text is in the table; the attribute it would set is not.)
    assert!(dom.contains("<body>\n"), "{dom}");
    assert!(!dom.contains("data-pwned=\"1\""), "{dom}");
    assert_eq!(dom.matches("<script").count(), 1, "{dom}");
    // The live chart, drawn by the script.
    assert!(dom.contains("<svg"), "{dom}");
    // A screenshot, kept as the test's artifact.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &a.url("/dashboard"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1200",
            "--hide-scrollbars",
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[test]
fn cron_entries_show_their_last_outcome() {
    let redis = Redis::start();
    let dir = common::scratch("crontab");
    let tab = dir.join("CRONTAB");
    std::fs::write(
        &tab,
        "* * * * * * | {\"func\": \"witherror\", \"source\": \"foo\"}\n",
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start_args(
        &redis,
        &["--http", &addr, "--crontab", &tab.to_string_lossy()],
    );
    let node_url = format!("http://127.0.0.1:{port}/dashboard/state.json");
    let s = wait_for("a cron outcome", 20 * SECS, || {
        let a = get(&node_url);
        let s: Value = serde_json::from_slice(&a.2).ok()?;
        // The outcome is recorded at once; the function's counts come with the
        // next snapshot (every second).
        let counted = s["functions"]
            .as_array()?
            .iter()
            .any(|f| f["name"] == "witherror");
        (s["cron"][0]["runs"].as_u64()? >= 1 && counted).then_some(s)
    });
    let c = &s["cron"][0];
    assert_eq!(c["func"], "witherror", "{c}");
    assert_eq!(c["outcome"], "error");
    assert_eq!(c["message"], "unexpected error");
    assert!(c["entry"].as_str().is_some_and(|e| e.len() == 16), "{c}");
    let html = body(&get(&node_url.replace("/state.json", "")));
    assert!(html.contains("<tr class=\"error\"><td>"), "{s:#}\n{html}");
    assert!(html.contains("unexpected error"));
    // The runs count per function too, with their durations.
    let f = s["functions"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "witherror"))
        .unwrap_or_else(|| panic!("witherror in functions: {s:#}"));
    assert!(f["errors"].as_u64().is_some_and(|e| e >= 1), "{f}");
    assert_eq!(f["ok"], 0);
    assert!(f["p50_ms"].as_u64().is_some(), "{f}");
    assert!(html.contains("<td>witherror</td>"), "{html}");
}

#[test]
fn a_wrong_typed_snapshot_index_costs_the_server_nothing_else() {
    let redis = Redis::start();
    let a = Node::start(&redis, &long_sleep_config(), "2");
    a.wait_state("the instance alive", |s| alive_names(s).len() == 1);
    let mut c = redis.conn();
    redis::cmd("DEL")
        .arg("CERBAS-SNAPSHOTS")
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("SET")
        .arg("CERBAS-SNAPSHOTS")
        .arg("not a sorted set")
        .query::<()>(&mut c)
        .unwrap();
    a.server
        .wait_log("dashboard: redis refuses this instance's snapshot", 1);
    // The page says why it has nothing to show.
    let r = get(&a.url("/dashboard/state.json"));
    assert_eq!(r.0, 503);
    assert!(body(&r).contains("redis refused a read"), "{}", body(&r));
    // Heartbeat and delayed requests go on at their pace for 4 s of refusals:
    // each 50 ms delay is served well within a second.
    let client = redis.client();
    let started = std::time::Instant::now();
    let mut served = 0;
    while started.elapsed() < 4 * SECS {
        let t = std::time::Instant::now();
        let body = json!({"func": "hello", "args": {}, "user": "foo", "source": "cerbastest", "delay": 50});
        let reply = client.call(body.to_string().as_bytes(), &cerbas::CallOptions::default());
        assert!(reply.is_ok(), "{reply:?}");
        assert!(t.elapsed() < SECS, "a 50 ms delay took {:?}", t.elapsed());
        served += 1;
    }
    assert!(served >= 4);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!(
            "CERBAS-HEARTBEAT-{}",
            alive_names(&a.state_after_fix(&mut c))[0]
        ))
        .query(&mut c)
        .unwrap();
    assert!(pttl > 0);
    a.server
        .wait_log("dashboard: redis takes this instance's snapshot again", 1);
    assert_eq!(
        a.server
            .log_text()
            .matches("refuses this instance's snapshot")
            .count(),
        1,
        "logged once per episode"
    );
}

impl Node {
    /// Deletes the wrong-typed index and waits for the state to come back.
    fn state_after_fix(&self, c: &mut redis::Connection) -> Value {
        redis::cmd("DEL")
            .arg("CERBAS-SNAPSHOTS")
            .query::<()>(c)
            .unwrap();
        wait_for("the state again", 20 * SECS, || {
            let a = get(&self.url("/dashboard/state.json"));
            let s: Value = serde_json::from_slice(&a.2).ok()?;
            (a.0 == 200 && alive_names(&s).len() == 1).then_some(s)
        })
    }
}
