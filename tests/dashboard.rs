//! The dashboard (issue 11) over real HTTP on loopback, with a real redis-server
//! and two `cerbas` processes: both instances in `/dashboard/state.json` on
//! either of them, hostile request bodies escaped in the server-rendered page,
//! the security headers, a `kill -9`ed instance shown dead, a graceful stop
//! leaving the page, tokens, bad requests and Redis not answering; each action
//! (delete, run now, cron now, pause and resume across instances), who may take
//! them, recent errors and proxy breakers. The browser test (headless Chromium
//! running the page's script after ok, error, refused, timed-out and cron calls,
//! reading its counts and tables, and clicking *delete* over the DevTools
//! protocol; its screenshot kept at target/tmp/dashboard.png) is `browser_*`.

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
        Node::start_args(redis, config, workers, &[])
    }

    /// [`Node::start`] running `crontab` (its text) too.
    fn start_with_crontab(
        redis: &Redis,
        config: &std::path::Path,
        workers: &str,
        crontab: &str,
    ) -> Node {
        let tab = crontab_file(crontab);
        Node::start_args(redis, config, workers, &["--crontab", &tab])
    }

    fn start_args(redis: &Redis, config: &std::path::Path, workers: &str, extra: &[&str]) -> Node {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = config.to_string_lossy().into_owned();
        let mut args = vec!["--config", &config, "--http", &addr, "--workers", workers];
        args.extend_from_slice(extra);
        let server = Server::start_args(redis, &args);
        Node { server, port }
    }

    /// A node with the shipped configuration running `crontab` (its text).
    fn with_crontab(redis: &Redis, crontab: &str) -> Node {
        let tab = crontab_file(crontab);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let server = Server::start_args(redis, &["--http", &addr, "--crontab", &tab]);
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

/// A scratch CRONTAB holding `text`; its path.
fn crontab_file(text: &str) -> String {
    let tab = common::scratch("crontab").join("CRONTAB");
    std::fs::write(&tab, text).expect("write CRONTAB");
    tab.to_string_lossy().into_owned()
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
    make_busy(redis, &a);
    (a, b)
}

/// What [`busy_cluster`] does once its two one-worker instances are started
/// (`a` one of them): the delayed request, both workers busy, the hostile
/// requests waiting.
fn make_busy(redis: &Redis, a: &Node) {
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

/// Headless Chromium driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: it reads commands on fd 3 and writes answers and
/// events on fd 4, each a JSON message ending in a NUL byte), so the test can
/// click a button as a user would. Messages are read on a thread of their own,
/// so every wait has a deadline.
struct Browser {
    child: std::process::Child,
    to: std::fs::File,
    from: std::sync::mpsc::Receiver<Value>,
    next: u64,
    session: String,
    profile: std::path::PathBuf,
}

impl Browser {
    fn open(url: &str) -> Browser {
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        // Two pipes, each end at fd 10 or above and closed on exec, so that the
        // child's dup2 onto 3 and 4 never lands on one of them.
        let pipe = || {
            let mut fds = [0; 2];
            // SAFETY: a two-int array, as pipe(2) wants.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            fds.map(|fd| {
                // SAFETY: fd is a pipe end just made; the original is closed.
                let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
                unsafe { libc::close(fd) };
                assert!(high >= 10);
                high
            })
        };
        let [in_read, in_write] = pipe();
        let [out_read, out_write] = pipe();
        let profile = common::scratch("chromium-cdp");
        let mut cmd = std::process::Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-pipe",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(in_read, 3) < 0 || libc::dup2(out_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        // SAFETY: the child has its copies; these ends are the parent's alone.
        let (to, from) = unsafe {
            libc::close(in_read);
            libc::close(out_write);
            (
                std::fs::File::from_raw_fd(in_write),
                std::fs::File::from_raw_fd(out_read),
            )
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut from = std::io::BufReader::new(from);
            loop {
                let mut msg = Vec::new();
                match std::io::BufRead::read_until(&mut from, 0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        msg.pop();
                        if let Ok(v) = serde_json::from_slice(&msg) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to,
            from: rx,
            next: 0,
            session: String::new(),
            profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": url }));
        let target = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        b
    }

    /// Sends one command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({ "id": self.next, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        std::io::Write::write_all(&mut self.to, &bytes).expect("write to chromium");
        let deadline = std::time::Instant::now() + 30 * SECS;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if v["id"] == self.next {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of `expression` in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits (20 s at most) until `expression` is true in the page (an
    /// exception, as while the page loads, counts as false).
    fn wait_true(&mut self, what: &str, expression: &str) {
        let deadline = std::time::Instant::now() + 20 * SECS;
        let guarded = format!(
            "(function () {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        );
        while self.eval(&guarded) != json!(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn close(mut self) {
        self.session.clear();
        self.next += 1;
        let msg = format!("{{\"id\":{},\"method\":\"Browser.close\"}}\0", self.next);
        let _ = std::io::Write::write_all(&mut self.to, msg.as_bytes());
        let _ = wait_for("chromium to exit", 20 * SECS, || {
            self.child.try_wait().ok().flatten()
        });
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A once-a-year cron entry: it runs during a test only when its action asks.
const YEARLY_HELLO: &str = "0 0 1 1 * | {\"func\": \"hello\", \"source\": \"foo\"}\n";
/// An unknown function with a hostile name: its error reply names it.
const ERR_FUNC: &str = "<img src=y onerror=alert(2)>";

/// [`busy_cluster`] after some traffic, all of it answered and counted first:
/// an ok call (`hello`), an error reply (`witherror`), an unknown function
/// named [`ERR_FUNC`], a timeout (`slow`, past a 200 ms deadline here), and
/// [`YEARLY_HELLO`] (the first instance's CRONTAB) run once by its action.
fn busy_cluster_after_traffic(redis: &Redis) -> (Node, Node) {
    let config = config_with(
        "[functions.sleep]\ntimeout_ms = 30000\n\n[functions.slow]\ntimeout_ms = 200\n",
    );
    let a = Node::start_with_crontab(redis, &config, "1", YEARLY_HELLO);
    let b = Node::start(redis, &config, "1");
    let s = a.wait_state("both instances alive, the cron entry shown", |s| {
        alive_names(s).len() == 2 && s["cron"].as_array().is_some_and(|c| c.len() == 1)
    });
    let entry = s["cron"][0]["entry"]
        .as_str()
        .expect("an entry id")
        .to_string();
    submit_many(
        &mut redis.conn(),
        &[
            body_of("hello", json!({}), json!({})),
            body_of("witherror", json!({}), json!({})),
            body_of(ERR_FUNC, json!({}), json!({})),
            body_of("slow", json!({}), json!({})),
        ],
    );
    let (status, answer) = a.act(json!({"action": "cron", "entry": entry}));
    assert_eq!(status, 200, "{answer}");
    a.wait_state("the traffic answered and counted", |s| {
        let t = &s["totals"];
        let listed = |list: &str, key: &str, name: &str| {
            s[list]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x[key] == name))
        };
        t["ok"].as_u64() >= Some(2)
            && t["errors"].as_u64() >= Some(1)
            && t["timeouts"].as_u64() >= Some(1)
            && t["queue_length"] == 0
            && t["workers_busy"] == 0
            && s["cron"][0]["runs"] == 1
            && ["hello", "witherror", "slow"]
                .iter()
                .all(|f| listed("functions", "name", f))
            && listed("errors", "func", "witherror")
            && listed("errors", "func", ERR_FUNC)
    });
    make_busy(redis, &a);
    (a, b)
}

/// The text of every cell of tbody `id`, row by row, in the browser's page.
fn rows_in(browser: &mut Browser, id: &str) -> Vec<Vec<String>> {
    let v = browser.eval(&format!(
        "Array.from(document.querySelectorAll('#{id} tr')).map(function (r) {{ \
           return Array.from(r.cells).map(function (c) {{ return c.textContent; }}); }})"
    ));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("rows of {id}: {e}: {v}"))
}

/// The first of `rows` whose `column` is `text`.
fn row_where<'a>(rows: &'a [Vec<String>], column: usize, text: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r.get(column).is_some_and(|c| c == text))
        .unwrap_or_else(|| panic!("a row with {text:?} in column {column}: {rows:?}"))
}

/// The number a totals cell of the browser's page shows.
fn total_in(browser: &mut Browser, id: &str) -> u64 {
    let v = browser.eval(&format!("document.getElementById('t-{id}').textContent"));
    v.as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("t-{id} is a number: {v}"))
}

#[test]
fn browser_runs_the_script_which_fills_the_page_and_runs_no_injected_code() {
    let redis = Redis::start();
    let (a, _b) = busy_cluster_after_traffic(&redis);
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
    // The live chart, drawn by the script: requests/s and call durations.
    assert!(dom.contains("<svg"), "{dom}");
    for line in ["line-ok", "line-errors", "line-p50", "line-p99"] {
        assert!(dom.contains(&format!("class=\"{line}\"")), "{line}: {dom}");
    }
    for table in ["errors", "proxies"] {
        assert!(
            dom.contains(&format!("<tbody id=\"{table}\" data-filled=\"script\">")),
            "{table} not filled by the script: {dom}"
        );
    }
    // An action, clicked in the browser: delete the first waiting request.
    let s = a.state();
    let victim = s["waiting"][0]["id"].as_u64().expect("a waiting id");
    let mut browser = Browser::open(&a.url("/dashboard"));
    browser.wait_true(
        "the script's rows with their buttons",
        &format!(
            "document.getElementById('status').getAttribute('data-live') !== '0' && \
             !!document.querySelector('#waiting button[data-action=\"delete\"][data-id=\"{victim}\"]')"
        ),
    );
    // What the script put in the page: the counts, each function that ran, the
    // cron entry and its run, the recent errors (a hostile name as text).
    assert!(total_in(&mut browser, "errors") >= 1);
    assert!(total_in(&mut browser, "timeouts") >= 1);
    assert!(total_in(&mut browser, "ok") >= 2);
    assert_eq!(total_in(&mut browser, "alive"), 2);
    assert_eq!(total_in(&mut browser, "queue_length"), 3);
    assert_eq!(total_in(&mut browser, "delayed"), 1);
    let functions = rows_in(&mut browser, "functions");
    let function = |name: &str| row_where(&functions, 0, name);
    // Columns: name, calls, ok, errors, timeouts, …
    let count = |row: &[String], column: usize| row[column].parse::<u64>().unwrap_or(0);
    assert!(count(function("hello"), 2) >= 2, "{functions:?}");
    assert!(count(function("witherror"), 3) >= 1, "{functions:?}");
    assert!(count(function("slow"), 4) >= 1, "{functions:?}");
    let cron = rows_in(&mut browser, "cron");
    assert_eq!(cron.len(), 1, "{cron:?}");
    // Columns: entry, func, schedule, next, outcome, message, at, duration,
    // instance, runs, and its run-now button.
    let c = &cron[0];
    assert_eq!(
        (c[1].as_str(), c[2].as_str()),
        ("hello", "0 0 1 1 *"),
        "{c:?}"
    );
    assert_eq!(c[4], "ok", "{c:?}");
    assert!(c[6].ends_with(" UTC"), "when it ran: {c:?}");
    assert!(c[9].starts_with("1 (1 ok, 0 errors"), "{c:?}");
    let recent = rows_in(&mut browser, "errors");
    // Columns: at, id, func, user, message, instance.
    let error = |func: &str| row_where(&recent, 2, func);
    assert_eq!(error("witherror")[4], "unexpected error");
    let hostile = error(ERR_FUNC);
    assert!(hostile[4].contains("unknown function"), "{hostile:?}");
    assert!(hostile[4].contains(ERR_FUNC), "{hostile:?}");
    assert_eq!(
        browser.eval("document.querySelectorAll('img, script:not([src])').length"),
        json!(0)
    );
    let clicked = browser.eval(&format!(
        "document.querySelector('#waiting button[data-action=\"delete\"][data-id=\"{victim}\"]').click(); true"
    ));
    assert_eq!(clicked, json!(true));
    browser.wait_true(
        "the page to say the request was deleted and drop its row",
        &format!(
            "document.getElementById('action-status').textContent.indexOf('request {victim} deleted') === 0 && \
             !document.querySelector('#waiting button[data-id=\"{victim}\"]') && \
             document.querySelectorAll('#waiting tr').length === 2"
        ),
    );
    assert_eq!(
        browser.eval("document.body.hasAttribute('data-pwned')"),
        json!(false)
    );
    browser.close();
    let s = a.wait_state("two waiting", |s| s["totals"]["queue_length"] == 2);
    assert!(
        s["waiting"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["id"] != victim),
        "{s:#}"
    );
    assert!(!exists(
        &mut redis.conn(),
        &format!("CERBAS-REQ-{victim:010}")
    ));
    // A screenshot, kept as the test's artifact.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &a.url("/dashboard"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000",
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
    let node = Node::with_crontab(
        &redis,
        "* * * * * * | {\"func\": \"witherror\", \"source\": \"foo\"}\n",
    );
    let node_url = node.url("/dashboard/state.json");
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
    // All within the last 5 minutes too.
    assert!(f["recent_calls"].as_u64() >= Some(1), "{f}");
    assert!(f["recent_errors"].as_u64() >= Some(1), "{f}");
    assert!(f["recent_p99_ms"].as_u64().is_some(), "{f}");
    assert!(html.contains("<td>witherror</td>"), "{html}");
}

#[test]
fn a_wrong_typed_snapshot_index_costs_the_server_nothing_else() {
    let redis = Redis::start();
    let a = Node::start(&redis, &long_sleep_config(), "2");
    a.wait_state("the instance alive", |s| alive_names(s).len() == 1);
    let mut c = redis.conn();
    snapshot_index_of_the_wrong_type(&mut c);
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

/// Makes every snapshot write fail: `CERBAS-SNAPSHOTS` a string.
fn snapshot_index_of_the_wrong_type(c: &mut redis::Connection) {
    redis::cmd("DEL")
        .arg("CERBAS-SNAPSHOTS")
        .query::<()>(c)
        .unwrap();
    redis::cmd("SET")
        .arg("CERBAS-SNAPSHOTS")
        .arg("not a sorted set")
        .query::<()>(c)
        .unwrap();
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

// ---- actions ----

/// The CSRF token a page carries (only a page whose user may act has one).
fn csrf(html: &str) -> Option<String> {
    let start = html.find("<meta name=\"cerbas-csrf\" content=\"")? + 34;
    let end = start + html[start..].find('"')?;
    Some(html[start..end].to_string())
}

/// POSTs `action` to `/dashboard/action` with `headers` (the CSRF token, an
/// Origin, a token…), as JSON unless a Content-Type is among them.
fn post_action(node: &Node, action: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(10 * SECS))
        .build()
        .into();
    let mut rq = agent.post(&node.url("/dashboard/action"));
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        rq = rq.header("Content-Type", "application/json");
    }
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    let mut r = rq
        .send(action.to_string().as_bytes())
        .expect("POST answered");
    let bytes = r.body_mut().read_to_vec().expect("body");
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "text": String::from_utf8_lossy(&bytes) }));
    (r.status().as_u16(), json)
}

impl Node {
    /// The CSRF token of this node's page (no tokens configured: loopback acts).
    fn token(&self) -> String {
        csrf(&body(&get(&self.url("/dashboard")))).expect("a page with actions")
    }

    /// Takes `action` as the page's script would; returns the status and answer.
    fn act(&self, action: Value) -> (u16, Value) {
        self.act_with(&self.token(), action)
    }

    /// [`Node::act`] with a token read before.
    fn act_with(&self, token: &str, action: Value) -> (u16, Value) {
        let origin = format!("http://127.0.0.1:{}", self.port);
        post_action(
            self,
            &action,
            &[
                ("X-Cerbas-Csrf", token),
                ("Origin", &origin),
                ("Sec-Fetch-Site", "same-origin"),
            ],
        )
    }

    fn health(&self) -> Value {
        serde_json::from_slice(&get(&self.url("/health")).2).expect("health is JSON")
    }
}

/// Both forms of the reply published on request `id`'s channels while `during`
/// runs (subscribed before it), within 10 s.
fn heard(redis: &Redis, id: u64, during: impl FnOnce()) -> (Option<String>, Option<Vec<u8>>) {
    let mut conn = redis.conn();
    let mut ps = conn.as_pubsub();
    let json_channel = format!("CERBAS-RESPONSE-1-{id:010}");
    ps.subscribe(&json_channel).expect("SUBSCRIBE");
    ps.subscribe(format!("MSGPACK:{json_channel}"))
        .expect("SUBSCRIBE");
    during();
    let deadline = std::time::Instant::now() + 10 * SECS;
    let (mut json, mut msgpack) = (None, None);
    while json.is_none() || msgpack.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        ps.set_read_timeout(Some(left)).expect("read timeout");
        let Ok(msg) = ps.get_message() else { break };
        match msg.get_channel_name().starts_with("MSGPACK:") {
            true => msgpack = Some(msg.get_payload_bytes().to_vec()),
            false => json = Some(String::from_utf8_lossy(msg.get_payload_bytes()).into_owned()),
        }
    }
    (json, msgpack)
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(c).unwrap() == 1
}

#[test]
fn deleting_a_waiting_or_delayed_request_answers_its_caller_cancelled_and_loses_nothing_else() {
    let redis = Redis::start();
    let (a, b) = busy_cluster(&redis);
    let s = b.wait_state("two requests waiting", |s| {
        s["waiting"].as_array().is_some_and(|w| w.len() == 2)
    });
    let first = s["waiting"][0]["id"].as_u64().expect("an id");
    let second = s["waiting"][1]["id"].as_u64().expect("an id");
    let delayed = s["delayed"][0]["id"].as_u64().expect("a delayed id");
    // From instance B's page: the action is cluster-wide.
    let (json_reply, msgpack) = heard(&redis, first, || {
        let (status, answer) = b.act(json!({"action": "delete", "id": first}));
        assert_eq!(status, 200, "{answer}");
        assert!(
            answer["done"].as_str().unwrap().contains("deleted"),
            "{answer}"
        );
    });
    assert_eq!(
        json_reply.as_deref(),
        Some(r#"{"status":"error","data":"cancelled"}"#)
    );
    let m = cerbas::Reply::from_msgpack(&msgpack.expect("the msgpack form")).unwrap();
    assert_eq!(m, cerbas::Reply::Error("cancelled".into()));
    let mut c = redis.conn();
    assert!(!exists(&mut c, &format!("CERBAS-REQ-{first:010}")));
    // The other waiting request and the delayed one are untouched.
    assert!(exists(&mut c, &format!("CERBAS-REQ-{second:010}")));
    let s = a.wait_state("one waiting", |s| s["totals"]["queue_length"] == 1);
    assert_eq!(s["waiting"][0]["id"], second);
    assert_eq!(s["totals"]["delayed"], 1);
    // Again: nothing to delete, and it says so.
    let (status, answer) = a.act(json!({"action": "delete", "id": first}));
    assert_eq!(status, 404, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("neither waiting nor delayed"));
    // A delayed request.
    let (json_reply, _) = heard(&redis, delayed, || {
        let (status, answer) = a.act(json!({"action": "delete", "id": delayed}));
        assert_eq!(status, 200, "{answer}");
    });
    assert_eq!(
        json_reply.as_deref(),
        Some(r#"{"status":"error","data":"cancelled"}"#)
    );
    assert!(!exists(&mut c, &format!("CERBAS-REQ-{delayed:010}")));
    a.wait_state("none delayed", |s| s["totals"]["delayed"] == 0);
    assert_eq!(
        redis::cmd("LLEN")
            .arg("CERBAS-QUEUE")
            .query::<i64>(&mut c)
            .unwrap(),
        1
    );
}

#[test]
fn a_delayed_request_runs_now_on_demand() {
    let redis = Redis::start();
    let a = Node::start(&redis, &long_sleep_config(), "2");
    a.wait_state("the instance alive", |s| alive_names(s).len() == 1);
    let mut c = redis.conn();
    let body = json!({"func": "echo", "args": {"message": "early"}, "user": "foo",
        "source": "cerbastest", "delay": 600_000})
    .to_string();
    let id = submit_many(&mut c, &[body])[0];
    a.wait_state("the delayed request stored", |s| {
        s["totals"]["delayed"] == 1
    });
    let started = std::time::Instant::now();
    let (reply, _) = heard(&redis, id, || {
        let (status, answer) = a.act(json!({"action": "run", "id": id}));
        assert_eq!(status, 200, "{answer}");
    });
    assert_eq!(
        reply.as_deref(),
        Some(r#"{"status":"ok","data":"early"}"#),
        "answered, not cancelled"
    );
    assert!(started.elapsed() < 5 * SECS);
    // Not delayed any more.
    let (status, answer) = a.act(json!({"action": "run", "id": id}));
    assert_eq!(status, 404, "{answer}");
}

#[test]
fn a_cron_entry_runs_now_on_demand_without_taking_a_ticks_place() {
    let redis = Redis::start();
    // Once a year: it would not run during the test by itself.
    let a = Node::with_crontab(
        &redis,
        "0 0 1 1 * | {\"func\": \"echo\", \"args\": {\"message\": \"now\"}, \"source\": \"foo\"}\n",
    );
    let s = a.wait_state("the entry shown", |s| {
        s["cron"].as_array().is_some_and(|c| c.len() == 1)
    });
    let c = &s["cron"][0];
    assert_eq!(c["here"], true, "{c}");
    assert_eq!(c["schedule"], "0 0 1 1 *", "{c}");
    assert_eq!(c["outcome"], "not run yet", "{c}");
    assert!(c["next_ms"].as_i64().is_some_and(|n| n > 0), "{c}");
    let entry = c["entry"].as_str().unwrap().to_string();
    let (status, answer) = a.act(json!({"action": "cron", "entry": entry}));
    assert_eq!(status, 200, "{answer}");
    let s = a.wait_state("the run recorded", |s| s["cron"][0]["runs"] == 1);
    assert_eq!(s["cron"][0]["outcome"], "ok", "{s:#}");
    let (status, answer) = a.act(json!({"action": "cron", "entry": "0000000000000000"}));
    assert_eq!(status, 404, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("no cron entry"));
}

#[test]
fn a_paused_instance_takes_nothing_while_the_queue_fills_and_resumes_from_another_page() {
    let redis = Redis::start();
    let config = long_sleep_config();
    let a = Node::start(&redis, &config, "2");
    let b = Node::start(&redis, &config, "2");
    let s = a.wait_state("both alive", |s| alive_names(s).len() == 2);
    let name_of = |node: &Node| instance_by_pid(&s, node.server.pid());
    let (name_a, name_b) = (name_of(&a), name_of(&b));
    // A's page pauses B (cluster-wide), then A itself.
    let (status, answer) = a.act(json!({"action": "pause", "instance": name_b}));
    assert_eq!(status, 200, "{answer}");
    wait_for("B says paused", 5 * SECS, || {
        (b.health()["status"] == "paused").then_some(())
    });
    assert_eq!(b.health()["paused"], true);
    let (status, answer) = a.act(json!({"action": "pause", "instance": name_a}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        a.health()["status"],
        "paused",
        "at once on its own instance"
    );
    let s = a.wait_state("both shown paused", |s| {
        s["instances"]
            .as_array()
            .is_some_and(|i| i.iter().all(|i| i["paused"] == true))
    });
    let served = |s: &Value, name: &str| instance(s, name).map(|i| i["requests"].clone());
    let before_a = served(&s, &name_a);
    let mut c = redis.conn();
    let bodies: Vec<String> = (0..5)
        .map(|_| json!({"func": "hello", "user": "foo", "source": "cerbastest"}).to_string())
        .collect();
    submit_many(&mut c, &bodies);
    // The queue keeps them for 2 s: nobody takes.
    std::thread::sleep(2 * SECS);
    let s = a.state();
    assert_eq!(s["totals"]["queue_length"], 5, "{s:#}");
    // B's own page resumes B; B serves them all, A still nothing.
    let (status, answer) = b.act(json!({"action": "resume", "instance": name_b}));
    assert_eq!(status, 200, "{answer}");
    a.wait_state("the queue drained", |s| s["totals"]["queue_length"] == 0);
    assert_eq!(b.health()["status"], "ok");
    assert_eq!(a.health()["status"], "paused");
    let s = a.wait_state("B counted them", |s| {
        instance(s, &name_b).is_some_and(|i| i["requests"].as_u64() >= Some(5))
    });
    assert_eq!(served(&s, &name_a), before_a, "A took nothing");
    // An instance nobody knows.
    let (status, answer) = a.act(json!({"action": "pause", "instance": "nobody-1-2"}));
    assert_eq!(status, 404, "{answer}");
    // Resumed, the key is gone.
    let (status, _) = a.act(json!({"action": "resume", "instance": name_a}));
    assert_eq!(status, 200);
    assert!(!exists(&mut c, &format!("CERBAS-PAUSED-{name_a}")));
    // A paused instance killed: its pause goes with its recovery.
    let (status, _) = b.act(json!({"action": "pause", "instance": name_a}));
    assert_eq!(status, 200);
    assert!(exists(&mut c, &format!("CERBAS-PAUSED-{name_a}")));
    let mut a = a;
    a.server.kill();
    wait_for("A's pause forgotten with A", 20 * SECS, || {
        (!exists(&mut c, &format!("CERBAS-PAUSED-{name_a}"))).then_some(())
    });
    // A paused instance stopped gracefully forgets its pause.
    let (status, _) = b.act(json!({"action": "pause", "instance": name_b}));
    assert_eq!(status, 200);
    let mut b = b;
    b.server.signal(libc::SIGTERM);
    b.server.wait_exit(20 * SECS).expect("B stops");
    assert!(!exists(&mut c, &format!("CERBAS-PAUSED-{name_b}")));
}

#[test]
fn only_admins_act_from_the_page_itself_with_its_token() {
    let redis = Redis::start();
    let (tom, ann) = ("tom-token-0123456789abc", "ann-token-0123456789abc");
    let config = config_with(&format!(
        "[http.tokens]\n\"{tom}\" = \"tom\"\n\"{ann}\" = \"ann\"\n[http.roles]\nadmin = [\"tom\"]\n"
    ));
    let a = Node::start(&redis, &config, "1");
    let mut c = redis.conn();
    let delayed = json!({"func": "hello", "user": "foo", "source": "cerbastest", "delay": 600_000})
        .to_string();
    let id = submit_many(&mut c, &[delayed])[0];
    let bearer = |t: &str| format!("Bearer {t}");
    let page = |t: &str| {
        body(&get_with(
            &a.url("/dashboard"),
            &[("Authorization", &bearer(t))],
        ))
    };
    wait_for("the delayed request shown", 20 * SECS, || {
        page(tom).contains("data-action=\"delete\"").then_some(())
    });
    // Ann may look, not act: no buttons, no token.
    let ann_page = page(ann);
    assert!(ann_page.contains(&format!("<td>{id}</td>")), "{ann_page}");
    assert!(!ann_page.contains("<button"), "{ann_page}");
    assert!(csrf(&ann_page).is_none());
    let token = csrf(&page(tom)).expect("tom's page has the token");
    let delete = json!({"action": "delete", "id": id});
    let tom_auth = bearer(tom);
    let ann_auth = bearer(ann);
    // (what, headers, status, what the answer says)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no token at all", vec![], 401, ""),
        (
            "ann, with tom's CSRF token",
            vec![("Authorization", &ann_auth), ("X-Cerbas-Csrf", &token)],
            403,
            "admin role",
        ),
        (
            "tom, without the CSRF token",
            vec![("Authorization", &tom_auth)],
            403,
            "X-Cerbas-Csrf",
        ),
        (
            "tom, with a wrong CSRF token",
            vec![("Authorization", &tom_auth), ("X-Cerbas-Csrf", "0000")],
            403,
            "X-Cerbas-Csrf",
        ),
        (
            "tom, from another site",
            vec![
                ("Authorization", &tom_auth),
                ("X-Cerbas-Csrf", &token),
                ("Origin", "http://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            403,
            "own page",
        ),
        (
            "tom, as a form would post",
            vec![
                ("Authorization", &tom_auth),
                ("X-Cerbas-Csrf", &token),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            415,
            "application/json",
        ),
    ];
    for (what, headers, status, says) in &cases {
        let (got, answer) = post_action(&a, &delete, headers);
        assert_eq!(got, *status, "{what}: {answer}");
        assert!(answer.to_string().contains(says), "{what}: {answer}");
        assert!(exists(&mut c, &format!("CERBAS-REQ-{id:010}")), "{what}");
    }
    let ok_headers = [
        ("Authorization", tom_auth.as_str()),
        ("X-Cerbas-Csrf", &token),
    ];
    for (bad, says) in [
        (json!({"action": "explode"}), "unknown action"),
        (json!({"action": "delete", "id": "x"}), "request id"),
        (json!([1, 2]), "\"action\" is missing"),
    ] {
        let (got, answer) = post_action(&a, &bad, &ok_headers);
        assert_eq!(got, 400, "{bad}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
    }
    let (got, answer) = post_action(
        &a,
        &json!({"action": "delete", "id": id, "pad": "x".repeat(5000)}),
        &ok_headers,
    );
    assert_eq!(got, 413, "{answer}");
    assert_eq!(
        get_with(&a.url("/dashboard/action"), &[("Authorization", &tom_auth)]).0,
        405
    );
    // Redis not answering: 503 at once, and nothing done.
    redis.pause();
    let started = std::time::Instant::now();
    let (got, answer) = post_action(&a, &delete, &ok_headers);
    redis.resume();
    assert_eq!(got, 503, "{answer}");
    assert!(started.elapsed() < 5 * SECS);
    assert!(exists(&mut c, &format!("CERBAS-REQ-{id:010}")));
    // Tom, properly: done.
    let (got, answer) = post_action(&a, &delete, &ok_headers);
    assert_eq!(got, 200, "{answer}");
    assert!(!exists(&mut c, &format!("CERBAS-REQ-{id:010}")));
    // The token is this process's: another instance's page's token is refused.
    let b = Node::start(&redis, &config, "1");
    wait_for("B serves HTTP", 20 * SECS, || {
        std::net::TcpStream::connect(("127.0.0.1", b.port)).ok()
    });
    let (got, _) = post_action(
        &b,
        &delete,
        &[("Authorization", &tom_auth), ("X-Cerbas-Csrf", &token)],
    );
    assert_eq!(got, 403);
}

#[test]
fn error_replies_show_in_recent_errors_across_instances_escaped() {
    let redis = Redis::start();
    let a = Node::start(&redis, &long_sleep_config(), "2");
    let b = Node::start(&redis, &long_sleep_config(), "2");
    a.wait_state("both alive", |s| alive_names(s).len() == 2);
    let mut c = redis.conn();
    submit_many(
        &mut c,
        &[
            body_of("witherror", json!({}), json!({})),
            body_of(XSS_FUNC, json!({}), json!({})),
        ],
    );
    let s = b.wait_state("two recent errors", |s| {
        s["errors"].as_array().is_some_and(|e| e.len() >= 2)
    });
    let errors = s["errors"].as_array().unwrap();
    let by_func = |f: &str| errors.iter().find(|e| e["func"] == f).cloned();
    let e = by_func("witherror").unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(e["message"], "unexpected error");
    assert_eq!(e["user"], "foo");
    assert!(
        e["id"].as_u64().is_some() && e["at_ms"].as_i64() > Some(0),
        "{e}"
    );
    let x = by_func(XSS_FUNC).unwrap_or_else(|| panic!("{s:#}"));
    assert!(
        x["message"].as_str().unwrap().contains("unknown function"),
        "{x}"
    );
    let html = body(&get(&a.url("/dashboard")));
    assert!(html.contains("<tbody id=\"errors\">"), "{html}");
    assert!(html.contains("unexpected error"));
    assert!(!html.contains(XSS_FUNC), "escaped: {html}");
    // The list is capped.
    let many: Vec<String> = (0..150)
        .map(|_| body_of("witherror", json!({}), json!({})))
        .collect();
    submit_many(&mut c, &many);
    wait_for("the list capped at 100", 20 * SECS, || {
        let n: i64 = redis::cmd("LLEN").arg("CERBAS-ERRORS").query(&mut c).ok()?;
        let s = a.state();
        (n == 100 && s["errors"].as_array()?.len() == 100 && s["totals"]["errors"].as_u64()? >= 152)
            .then_some(())
    });
}

#[test]
fn proxy_targets_show_their_breaker() {
    let redis = Redis::start();
    let dead = free_port();
    let config = config_with(&format!(
        "[[proxy]]\nprefix = \"/gone\"\ntarget = \"http://127.0.0.1:{dead}\"\nname = \"gone\"\n"
    ));
    let a = Node::start(&redis, &config, "1");
    a.wait_state("alive", |s| alive_names(s).len() == 1);
    for _ in 0..3 {
        get(&a.url("/gone/x"));
    }
    let s = a.state();
    let p = s["proxies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "gone").cloned())
        .unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(p["state"], "open", "{p}");
    assert_eq!(p["failures"], 2, "{p}");
    assert_eq!(p["refused"], 1, "{p}");
    assert_eq!(p["prefix"], "/gone");
    let html = body(&get(&a.url("/dashboard")));
    assert!(html.contains("<tr class=\"open\"><td>gone</td>"), "{html}");
}

#[test]
fn a_wrong_typed_snapshot_index_or_error_list_hides_no_pause() {
    let redis = Redis::start();
    let config = long_sleep_config();
    let a = Node::start(&redis, &config, "1");
    let b = Node::start(&redis, &config, "1");
    let s = a.wait_state("both alive", |s| alive_names(s).len() == 2);
    let name_b = instance_by_pid(&s, b.server.pid());
    let mut c = redis.conn();
    redis::cmd("SET")
        .arg("CERBAS-ERRORS")
        .arg("not a list")
        .query::<()>(&mut c)
        .unwrap();
    submit_many(&mut c, &[body_of("witherror", json!({}), json!({}))]);
    // The page reads what it can: the list is not shown, the rest is.
    let s = a.wait_state("the error counted", |s| s["totals"]["errors"] == 1);
    assert_eq!(s["errors"], json!([]), "{s:#}");
    // Every snapshot write refused from now on (and the page has nothing to
    // show: its token is read before).
    let token = a.token();
    snapshot_index_of_the_wrong_type(&mut c);
    b.server
        .wait_log("dashboard: redis refuses this instance's snapshot", 1);
    let (status, answer) = a.act_with(&token, json!({"action": "pause", "instance": name_b}));
    assert_eq!(status, 200, "{answer}");
    wait_for("B paused all the same", 5 * SECS, || {
        (b.health()["status"] == "paused").then_some(())
    });
}

/// A call answered from the result cache counts as a cache hit of its
/// function, in the per-function table as in the totals.
#[test]
fn cache_hits_show_per_function() {
    let redis = Redis::start();
    let config = config_with("[functions.echo]\ncache_secs = 60\n");
    let a = Node::start(&redis, &config, "2");
    a.wait_state("the instance alive", |s| alive_names(s).len() == 1);
    let client = redis.client();
    for _ in 0..3 {
        let reply = client.request("echo", json!({"message": "again"}));
        assert_eq!(reply.expect("a reply"), cerbas::Reply::Ok(json!("again")));
    }
    let s = a.wait_state("two cache hits of echo", |s| {
        s["functions"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == "echo"))
            .is_some_and(|f| f["cache_hits"] == 2 && f["calls"] == 3)
    });
    assert_eq!(s["totals"]["cache_hits"], 2, "{s:#}");
}
