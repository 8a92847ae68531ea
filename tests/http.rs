//! The HTTP plug over real HTTP on loopback (issue 10): every route and status,
//! tokens, the reverse proxy against a real upstream (a tiny_http server started
//! here), the circuit breaker, slow clients and oversized bodies, /metrics parsed
//! as Prometheus text, /health with Redis stopped, and the graceful stop. Most
//! tests run the server in this process (`cerbas::run` with a registry of their
//! own, so a function can panic or report that it started); the shipped binary
//! and configuration are checked at the end.

mod common;

use cerbas::config::{Access, HttpConfig, ProxyTarget};
use cerbas::{Config, Context, FnError, NoArgs, Registry, Shutdown};
use common::{bin, free_port, repo_file, wait_for, Redis, Server};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(1);

// ---- the server under test, in this process ----

/// A cerbas server run in this process with [`registry`], stopped on drop.
struct Plug {
    port: u16,
    shutdown: Shutdown,
    thread: Option<JoinHandle<Result<(), cerbas::Error>>>,
}

#[derive(Deserialize)]
struct Foo {
    foo: Value,
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

/// The functions the tests call; `started` hears each `sleep` begin.
fn registry(started: crossbeam_channel::Sender<()>) -> Registry {
    let mut r = Registry::new();
    r.register("hello", |_: NoArgs, _: &Context| -> Result<&str, FnError> {
        Ok("hello world!")
    });
    r.register(
        "withargs",
        |a: Foo, _: &Context| -> Result<Value, FnError> { Ok(a.foo) },
    );
    r.register("echo", |a: Value, _: &Context| -> Result<Value, FnError> {
        Ok(a)
    });
    r.register("fail", |_: NoArgs, _: &Context| -> Result<(), FnError> {
        Err("unexpected error".into())
    });
    r.register("boom", |_: NoArgs, _: &Context| -> Result<(), FnError> {
        panic!("boom")
    });
    r.register("quiet", |_: NoArgs, _: &Context| cerbas::Answer::NoReply);
    r.register("nap", |_: NoArgs, _: &Context| -> Result<(), FnError> {
        std::thread::sleep(Duration::from_millis(1500));
        Ok(())
    })
    .timeout_ms(200);
    r.register("secret", |_: NoArgs, _: &Context| -> Result<i32, FnError> {
        Ok(42)
    })
    .users(["tom"]);
    r.register(
        "sleep",
        move |a: Sleep, _: &Context| -> Result<u64, FnError> {
            let _ = started.send(());
            std::thread::sleep(Duration::from_millis(a.ms));
            Ok(a.ms)
        },
    )
    .timeout_ms(10_000);
    r
}

fn config(redis: &Redis, port: u16) -> Config {
    Config {
        redis_url: redis.url(),
        workers: 4,
        drain_timeout_ms: 5_000,
        access: Access {
            users: vec!["web".into(), "tom".into()],
            sources: vec!["web".into(), "other".into()],
        },
        http: HttpConfig {
            listen: format!("127.0.0.1:{port}"),
            threads: 4,
            max_body_bytes: 1024,
            read_timeout_ms: 1_000,
            write_timeout_ms: 1_000,
            header_timeout_ms: 1_000,
            proxy_connect_timeout_ms: 500,
            proxy_read_timeout_ms: 500,
            breaker_open_ms: 1_000,
            ..HttpConfig::default()
        },
        ..Config::default()
    }
}

impl Plug {
    fn start(
        redis: &Redis,
        tweak: impl FnOnce(&mut Config),
    ) -> (Plug, crossbeam_channel::Receiver<()>) {
        let port = free_port();
        let mut config = config(redis, port);
        tweak(&mut config);
        let (tx, started) = crossbeam_channel::unbounded();
        let shutdown = Shutdown::new();
        let thread = {
            let shutdown = shutdown.clone();
            let registry = registry(tx);
            std::thread::spawn(move || cerbas::run(config, registry, shutdown))
        };
        let plug = Plug {
            port,
            shutdown,
            thread: Some(thread),
        };
        wait_for("the HTTP plug", 20 * SECS, || {
            (get(&plug.url("/")).ok()?.0 == 200).then_some(())
        });
        (plug, started)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Stops the server; says how long `run` took to return.
    fn stop(&mut self) -> Duration {
        let t = Instant::now();
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("run").expect("run ok");
        }
        t.elapsed()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---- an HTTP client ----

type Answer = (u16, ureq::http::HeaderMap, Vec<u8>);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(30 * SECS))
        .build()
        .into()
}

fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Answer, ureq::Error> {
    let mut r = r?;
    let body = r.body_mut().with_config().limit(64 << 20).read_to_vec()?;
    Ok((r.status().as_u16(), r.headers().clone(), body))
}

fn get(url: &str) -> Result<Answer, ureq::Error> {
    finish(agent().get(url).call())
}

fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut rq = agent().get(url);
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    finish(rq.call()).expect("an answer")
}

fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut rq = agent().post(url);
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    finish(rq.send(body)).expect("an answer")
}

fn must_get(url: &str) -> Answer {
    get(url).expect("an answer")
}

fn json_of(a: &Answer) -> Value {
    serde_json::from_slice(&a.2)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&a.2)))
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.1.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Sends `raw` on a new connection and reads what comes back until the server
/// closes it or `within` passes.
fn raw(port: u16, raw: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(within)).expect("timeout");
    s.write_all(raw).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// ---- routes and statuses ----

#[test]
fn the_originals_routes_and_the_general_form() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    let root = must_get(&plug.url("/"));
    assert_eq!((root.0, &root.2[..]), (200, &b"OK"[..]));
    assert!(header(&root, "content-type").starts_with("text/plain"));

    let hello = must_get(&plug.url("/api/hello"));
    assert_eq!(hello.0, 200);
    assert_eq!(hello.2, br#"{"status":"ok","data":"hello world!"}"#);
    assert_eq!(header(&hello, "content-type"), "application/json");

    let hello2 = must_get(&plug.url("/api/hello2"));
    assert_eq!(json_of(&hello2), json!({"status": "ok", "data": "hello2"}));

    let foo = must_get(&plug.url("/api/foo?var1=a%20b&var2=2"));
    assert_eq!(
        (foo.0, json_of(&foo)),
        (200, json!({"var1": "a b", "var2": "2"}))
    );
    assert_eq!(header(&foo, "content-type"), "application/json");
    let no_vars = must_get(&plug.url("/api/foo?var1=a"));
    assert_eq!(
        (no_vars.0, &no_vars.2[..]),
        (403, &b"must use var1 and var2"[..])
    );

    let general = post(
        &plug.url("/api/general"),
        &[],
        br#"{"request": {"func": "withargs", "args": {"foo": [1, 2]}, "source": "other"}}"#,
    );
    assert_eq!(
        (general.0, json_of(&general)),
        (200, json!({"status": "ok", "data": [1, 2]}))
    );
    let bad_source = post(
        &plug.url("/api/general"),
        &[],
        br#"{"request": {"func": "hello", "source": "elsewhere"}}"#,
    );
    assert_eq!(bad_source.0, 403);
    assert_eq!(post(&plug.url("/api/general"), &[], b"{}").0, 400);
    assert_eq!(
        post(
            &plug.url("/api/general"),
            &[],
            br#"{"request": {"func": "hello", "delay": 5}}"#
        )
        .0,
        400
    );

    // Query arguments: JSON when they parse, else strings.
    let q = must_get(&plug.url("/api/echo?n=3&s=x&b=true&o=%7B%22k%22%3A1%7D"));
    assert_eq!(
        json_of(&q)["data"],
        json!({"n": 3, "s": "x", "b": true, "o": {"k": 1}})
    );
    assert_eq!(
        must_get(&plug.url("/api/echo?n=1&n=2")).0,
        400,
        "a repeated key"
    );
    // POST with a JSON object body.
    let p = post(
        &plug.url("/api/echo"),
        &[("Content-Type", "application/json")],
        br#"{"a":[1,"x"]}"#,
    );
    assert_eq!(
        (p.0, json_of(&p)),
        (200, json!({"status": "ok", "data": {"a": [1, "x"]}}))
    );
    assert_eq!(
        post(&plug.url("/api/echo"), &[], b"[1]").0,
        400,
        "not an object"
    );
    assert_eq!(
        post(&plug.url("/api/echo"), &[], b"{nope").0,
        400,
        "not JSON"
    );

    let nf = must_get(&plug.url("/nothing/here"));
    assert_eq!((nf.0, &nf.2[..]), (404, &b"NOT FOUND"[..]));
    assert_eq!(must_get(&plug.url("/api")).0, 404);
    assert_eq!(must_get(&plug.url("/api/a/b")).0, 404);
    let put = finish(agent().put(&plug.url("/api/hello")).send(&b"{}"[..])).expect("answer");
    assert_eq!(put.0, 405);
    assert!(!header(&put, "allow").is_empty());
}

/// The status table of README ("HTTP"): one call per row.
#[test]
fn each_outcome_has_its_status() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    let cases: &[(&str, u16, Value)] = &[
        (
            "/api/hello",
            200,
            json!({"status": "ok", "data": "hello world!"}),
        ),
        (
            "/api/fail",
            200,
            json!({"status": "error", "data": "unexpected error"}),
        ),
        (
            "/api/withargs",
            400,
            json!({"status": "error", "data": "invalid arguments: missing field `foo`"}),
        ),
        (
            "/api/nope",
            404,
            json!({"status": "error", "data": "unknown function: nope"}),
        ),
        (
            "/api/secret",
            403,
            json!({"status": "error", "data": "user web may not call secret"}),
        ),
        (
            "/api/nap",
            504,
            json!({"status": "error", "data": "timeout"}),
        ),
        (
            "/api/boom",
            500,
            json!({"status": "error", "data": "internal error: function boom panicked"}),
        ),
    ];
    for (path, status, body) in cases {
        let a = must_get(&plug.url(path));
        assert_eq!((a.0, json_of(&a)), (*status, body.clone()), "{path}");
        assert_eq!(header(&a, "content-type"), "application/json", "{path}");
    }
    let quiet = must_get(&plug.url("/api/quiet"));
    assert_eq!((quiet.0, quiet.2.len()), (204, 0), "no reply");
}

#[test]
fn over_a_concurrency_limit_is_429() {
    let redis = Redis::start();
    let (plug, started) = Plug::start(&redis, |c| {
        c.functions.insert(
            "sleep".into(),
            cerbas::config::FunctionConfig {
                max_concurrent: Some(1),
                ..Default::default()
            },
        );
    });
    let url = plug.url("/api/sleep?ms=800");
    let first = std::thread::spawn(move || must_get(&url));
    started.recv_timeout(10 * SECS).expect("the call started");
    let busy = must_get(&plug.url("/api/sleep?ms=1"));
    assert_eq!(busy.0, 429);
    assert_eq!(header(&busy, "retry-after"), "1");
    assert!(json_of(&busy)["data"]
        .as_str()
        .unwrap_or("")
        .starts_with("busy: function sleep"));
    assert_eq!(first.join().expect("first").0, 200);
}

// ---- tokens ----

#[test]
fn with_tokens_every_api_call_needs_one() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.http.tokens = [
            ("tom-token-0123456789".to_string(), "tom".to_string()),
            ("web-token-0123456789".to_string(), "web".to_string()),
        ]
        .into();
        c.proxy = vec![upstream.target("/api5", "flask")];
    });
    let none = must_get(&plug.url("/api/hello"));
    assert_eq!(none.0, 401);
    assert_eq!(header(&none, "www-authenticate"), "Bearer");
    assert_eq!(json_of(&none)["status"], "error");
    let wrong = get_with(
        &plug.url("/api/hello"),
        &[("Authorization", "Bearer tom-token-012345678")],
    );
    assert_eq!(wrong.0, 401);
    assert_eq!(
        get_with(&plug.url("/api/foo?var1=1&var2=2"), &[]).0,
        401,
        "the original's routes too"
    );
    let web = get_with(
        &plug.url("/api/secret"),
        &[("Authorization", "Bearer web-token-0123456789")],
    );
    assert_eq!(web.0, 403);
    let tom = get_with(
        &plug.url("/api/secret"),
        &[("Authorization", "Bearer tom-token-0123456789")],
    );
    assert_eq!((tom.0, json_of(&tom)["data"].clone()), (200, json!(42)));
    // /api/general cannot choose its user.
    let general = post(
        &plug.url("/api/general"),
        &[("Authorization", "Bearer web-token-0123456789")],
        br#"{"request": {"func": "secret", "user": "tom"}}"#,
    );
    assert_eq!(general.0, 403);
    // Not forwarded to a proxy target.
    let proxied = get_with(
        &plug.url("/api5/x"),
        &[("Authorization", "Bearer tom-token-0123456789")],
    );
    assert_eq!(proxied.0, 200);
    assert!(
        echoed_headers(&proxied).get("authorization").is_none(),
        "{:?}",
        echoed_headers(&proxied)
    );
    assert!(
        get(&plug.url("/")).expect("root").0 == 200,
        "no token needed outside /api"
    );
}

// ---- the upstream: a tiny_http server that echoes what it gets ----

struct Upstream {
    port: u16,
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> (Upstream, u16) {
        Self::on(0)
    }

    /// Listens on `port` (0: any); echoes method, URL and headers in response
    /// headers and the body as the body. `/…/status/N` answers N, `/…/slow`
    /// answers after 1.5 s.
    fn on(port: u16) -> (Upstream, u16) {
        let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("upstream"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let (server, stop) = (server.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(rq) = server.recv() else { continue };
                        echo(rq);
                    }
                })
            })
            .collect();
        (
            Upstream {
                port,
                server,
                stop,
                threads,
            },
            port,
        )
    }

    fn target(&self, prefix: &str, name: &str) -> ProxyTarget {
        ProxyTarget {
            prefix: prefix.into(),
            target: format!("http://127.0.0.1:{}", self.port),
            name: Some(name.into()),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn echo(mut rq: tiny_http::Request) {
    let url = rq.url().to_string();
    let mut body = Vec::new();
    let _ = rq.as_reader().read_to_end(&mut body);
    if url.contains("/slow") {
        std::thread::sleep(Duration::from_millis(1500));
    }
    let status = url
        .split_once("/status/")
        .and_then(|(_, s)| s.parse::<u16>().ok())
        .unwrap_or(200);
    let headers: serde_json::Map<String, Value> = rq
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                Value::String(h.value.as_str().into()),
            )
        })
        .collect();
    let h = |k: &str, v: &str| {
        tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("header")
    };
    let response = tiny_http::Response::from_data(body)
        .with_status_code(status)
        .with_header(h("Content-Type", "application/octet-stream"))
        .with_header(h("X-Echo-Method", rq.method().as_str()))
        .with_header(h("X-Echo-Url", &url))
        .with_header(h("X-Echo-Headers", &Value::Object(headers).to_string()))
        .with_header(h("X-Upstream-Custom", "kept"))
        .with_header(h("Keep-Alive", "timeout=5"));
    let _ = rq.respond(response);
}

fn echoed_headers(a: &Answer) -> serde_json::Map<String, Value> {
    match serde_json::from_str(header(a, "x-echo-headers")) {
        Ok(Value::Object(m)) => m,
        _ => panic!("no echoed headers in {:?}", a.1),
    }
}

// ---- the proxy ----

#[test]
fn the_proxy_passes_everything_through() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![upstream.target("/api5", "flask")]
    });

    // A GET with a query string and custom headers.
    let a = get_with(
        &plug.url("/api5/some/path?x=1&y=%20two"),
        &[
            ("X-Custom", "value 1"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "dropped"),
        ],
    );
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-echo-method"), "GET");
    assert_eq!(header(&a, "x-echo-url"), "/api5/some/path?x=1&y=%20two");
    assert_eq!(
        header(&a, "x-upstream-custom"),
        "kept",
        "the upstream's headers come back"
    );
    assert_eq!(header(&a, "keep-alive"), "", "hop-by-hop headers do not");
    let seen = echoed_headers(&a);
    assert_eq!(seen["x-custom"], "value 1");
    assert!(
        seen.get("x-hop").is_none(),
        "a header named by Connection is hop-by-hop: {seen:?}"
    );
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], format!("127.0.0.1:{}", plug.port));
    assert_eq!(
        seen["host"],
        format!("127.0.0.1:{}", upstream.port),
        "the target's own host"
    );

    // A binary POST body, every byte value.
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let b = post(
        &plug.url("/api5/upload?k=v"),
        &[("Content-Type", "application/octet-stream")],
        &binary,
    );
    assert_eq!((b.0, header(&b, "x-echo-method")), (200, "POST"));
    assert_eq!(header(&b, "x-echo-url"), "/api5/upload?k=v");
    assert!(b.2 == binary, "binary body changed");

    // 10 MB, both ways.
    let big: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    let c = post(&plug.url("/api5/big"), &[], &big);
    assert_eq!(c.0, 200);
    assert_eq!(c.2.len(), big.len());
    assert!(c.2 == big, "10 MB body changed");
    eprintln!("10 MB through the proxy and back: {:?}", t.elapsed());

    // The upstream's status comes back unchanged.
    assert_eq!(must_get(&plug.url("/api5/status/418")).0, 418);
    assert_eq!(must_get(&plug.url("/api5/status/404")).0, 404);
    // The prefix alone, and a path that only starts like it.
    assert_eq!(must_get(&plug.url("/api5")).0, 200);
    assert_eq!(must_get(&plug.url("/api55")).0, 404);
}

#[test]
fn the_proxy_is_not_an_open_proxy() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![upstream.target("/api5", "flask")]
    });
    let absolute = format!(
        "GET http://127.0.0.1:{}/api5/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        upstream.port
    );
    assert!(raw(plug.port, absolute.as_bytes(), 5 * SECS).starts_with("HTTP/1.1 400"));
    for path in ["/api5/../api/hello", "/api5/%2e%2E/x", "/api5/a%2Fb"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let got = raw(plug.port, req.as_bytes(), 5 * SECS);
        assert!(got.starts_with("HTTP/1.1 400"), "{path}: {got}");
    }
    // A Host header does not choose where the request goes.
    let a = get_with(&plug.url("/api5/h"), &[("Host", "evil.example:80")]);
    assert_eq!(a.0, 200);
    let seen = echoed_headers(&a);
    assert_eq!(seen["host"], format!("127.0.0.1:{}", upstream.port));
    assert_eq!(seen["x-forwarded-host"], "evil.example:80");
    let garbage = raw(plug.port, b"NONSENSE\r\n\r\n", 5 * SECS);
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
}

#[test]
fn requests_the_client_got_wrong_do_not_open_the_breaker() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![upstream.target("/api5", "flask")]
    });
    let twice = b"POST /api5/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    for _ in 0..3 {
        let got = raw(plug.port, twice, 5 * SECS);
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    }
    assert_eq!(
        must_get(&plug.url("/api5/x")).0,
        200,
        "the breaker is still closed"
    );
    // Any method goes through.
    let got = raw(
        plug.port,
        b"PROPFIND /api5/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        5 * SECS,
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("x-echo-method: propfind"),
        "{got}"
    );
}

#[test]
fn upstream_failures_are_502_and_504() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let dead = free_port();
    let (plug, _) = Plug::start(&redis, |c| {
        c.http.breaker_failures = 100;
        c.proxy = vec![
            upstream.target("/api5", "flask"),
            ProxyTarget {
                prefix: "/api6".into(),
                target: format!("http://127.0.0.1:{dead}"),
                name: Some("express".into()),
            },
        ];
    });
    assert_eq!(must_get(&plug.url("/api6/x")).0, 502);
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api5/slow")).0, 504);
    assert!(
        t.elapsed() < 1400 * Duration::from_millis(1),
        "504 at the read timeout, {:?}",
        t.elapsed()
    );
}

#[test]
fn the_breaker_opens_answers_at_once_and_recovers_per_target() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let dead = free_port();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![
            upstream.target("/api5", "flask"),
            ProxyTarget {
                prefix: "/api6".into(),
                target: format!("http://127.0.0.1:{dead}"),
                name: Some("express".into()),
            },
        ];
    });
    let timed = |path: &str| {
        let t = Instant::now();
        let a = must_get(&plug.url(path));
        (a, t.elapsed())
    };
    let (first, t1) = timed("/api6/x");
    let (second, t2) = timed("/api6/x");
    assert_eq!((first.0, second.0), (502, 502));
    let (open, t3) = timed("/api6/x");
    assert_eq!(open.0, 503, "open after two failures");
    assert_eq!(header(&open, "retry-after"), "1");
    assert!(t3 < Duration::from_millis(400), "503 at once: {t3:?}");
    eprintln!("breaker: failures took {t1:?} and {t2:?}; while open, 503 took {t3:?}");
    // Another target is not affected.
    assert_eq!(must_get(&plug.url("/api5/ok")).0, 200);
    let metrics = scrape(&plug);
    assert_eq!(
        sample(&metrics, "cerbas_breaker_state", &[("target", "express")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "cerbas_breaker_state", &[("target", "flask")]),
        Some(0.0)
    );
    // Bring the target up; after breaker_open_ms one trial closes it again.
    let (_revived, _) = Upstream::on(dead);
    let opened = Instant::now();
    let recovered = wait_for("the trial request", 10 * SECS, || {
        let a = must_get(&plug.url("/api6/x"));
        (a.0 == 200).then_some(opened.elapsed())
    });
    eprintln!("breaker: closed again {recovered:?} after the target came back");
    assert!(
        recovered >= Duration::from_millis(700),
        "still open meanwhile: {recovered:?}"
    );
    assert_eq!(must_get(&plug.url("/api6/y")).0, 200, "closed");
    let metrics = scrape(&plug);
    assert_eq!(
        sample(&metrics, "cerbas_breaker_state", &[("target", "express")]),
        Some(0.0)
    );
    assert!(
        sample(
            &metrics,
            "cerbas_proxy_requests_total",
            &[("target", "express"), ("status", "503")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[test]
fn a_slow_target_is_cut_off_by_its_breaker() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![upstream.target("/api5", "flask")]
    });
    let timed = |path: &str| {
        let t = Instant::now();
        (must_get(&plug.url(path)).0, t.elapsed())
    };
    let (s1, t1) = timed("/api5/slow");
    let (s2, t2) = timed("/api5/slow");
    let (s3, t3) = timed("/api5/slow");
    eprintln!("breaker on timeouts: {s1} in {t1:?}, {s2} in {t2:?}, then {s3} in {t3:?}");
    assert_eq!((s1, s2, s3), (504, 504, 503));
    assert!(t1 >= Duration::from_millis(450) && t2 >= Duration::from_millis(450));
    // Well before the target's 500 ms read timeout, even on a loaded machine.
    assert!(t3 < Duration::from_millis(400), "503 at once: {t3:?}");
}

#[test]
fn five_hundreds_count_and_a_failed_trial_opens_it_again() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.proxy = vec![upstream.target("/api7", "tornado")]
    });
    assert_eq!(
        must_get(&plug.url("/api7/status/500")).0,
        500,
        "passed through"
    );
    assert_eq!(must_get(&plug.url("/api7/status/503")).0, 503);
    let refused = must_get(&plug.url("/api7/ok"));
    assert_eq!(refused.0, 503);
    assert!(std::str::from_utf8(&refused.2)
        .unwrap_or("")
        .contains("circuit open"));
    // The trial fails: open again for the full time.
    wait_for("the trial", 10 * SECS, || {
        let a = must_get(&plug.url("/api7/status/500"));
        (a.0 == 500).then_some(())
    });
    assert_eq!(must_get(&plug.url("/api7/ok")).0, 503, "open again");
}

// ---- limits ----

#[test]
fn slow_clients_do_not_hold_the_handler_threads() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |c| c.http.threads = 2);
    // More half-sent request heads than handler threads.
    let heads: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", plug.port)).expect("connect");
            s.write_all(b"GET /api/hello HTTP/1.1\r\nHost: x\r\n")
                .expect("write");
            s
        })
        .collect();
    // tiny_http's connection pool can queue a connection that arrives in the same
    // burst behind the slow ones (it counts a thread already woken as idle): then
    // it waits until their read timeout (1 s) frees a thread. Never longer.
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    assert!(t.elapsed() < 2 * SECS, "served after {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "served at once: {:?}",
        t.elapsed()
    );
    // Bodies that trickle: each holds a handler thread at most read_timeout_ms.
    let bodies: Vec<std::thread::JoinHandle<(String, Duration)>> = (0..3)
        .map(|_| {
            let port = plug.port;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(10 * SECS)).expect("timeout");
                let t = Instant::now();
                s.write_all(
                    b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":",
                )
                .expect("write");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
            })
        })
        .collect();
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    let waited = t.elapsed();
    assert!(
        waited < 3 * SECS,
        "slow bodies held the threads: {waited:?}"
    );
    for b in bodies {
        let (got, took) = b.join().expect("slow body");
        assert!(got.starts_with("HTTP/1.1 408") || got.is_empty(), "{got}");
        assert!(took < 4 * SECS, "cut off after {took:?}");
    }
    // The half-sent heads are closed by the head timeout.
    for mut s in heads {
        s.set_read_timeout(Some(5 * SECS)).expect("timeout");
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(t.elapsed() < 4 * SECS, "closed after {:?}", t.elapsed());
    }
}

#[test]
fn oversized_bodies_get_413() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    // Refused from its Content-Length, before it is sent.
    let got = raw(
        plug.port,
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        5 * SECS,
    );
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(
        got.contains("request too large: 5000 bytes (limit 1024)"),
        "{got}"
    );
    // Chunked, without a length: refused once past the limit.
    let mut chunked =
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let got = raw(plug.port, &chunked, 5 * SECS);
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    // At the limit is fine.
    let mut body = br#"{"a":""#.to_vec();
    body.resize(1022, b'x');
    body.extend_from_slice(br#""}"#);
    assert_eq!(post(&plug.url("/api/echo"), &[], &body).0, 200);
}

// ---- health and metrics ----

/// One sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus/OpenMetrics text exposition, checked line by line.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "{line}");
            let name = parts.next().unwrap_or("");
            assert!(valid_name(name), "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "info", "unknown"].contains(&t),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels = l
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(valid_name(k), "{line}");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n, labels)
            }
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "{line}");
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && !n.starts_with(|c: char| c.is_ascii_digit())
}

fn scrape(plug: &Plug) -> Vec<Sample> {
    let a = must_get(&plug.url("/metrics"));
    assert_eq!(a.0, 200);
    assert!(header(&a, "content-type").starts_with("application/openmetrics-text"));
    parse_metrics(&String::from_utf8(a.2).expect("utf-8"))
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.2)
}

#[test]
fn metrics_are_prometheus_text_and_count_what_happened() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    for _ in 0..3 {
        assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    }
    assert_eq!(must_get(&plug.url("/api/nap")).0, 504);
    assert_eq!(must_get(&plug.url("/nowhere")).0, 404);
    // A request from Redis counts on the same path.
    let client = redis.client().identity("tom", "web");
    assert!(client.request("hello", json!({})).is_ok());
    let mut conn = redis.conn();
    let _: () = redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg("not-an-id")
        .query(&mut conn)
        .expect("rpush");
    let m = scrape(&plug);
    assert_eq!(
        sample(
            &m,
            "cerbas_requests_total",
            &[("function", "hello"), ("outcome", "ok")]
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &m,
            "cerbas_requests_total",
            &[("function", "nap"), ("outcome", "timeout")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "cerbas_call_duration_seconds_count",
            &[("function", "hello")]
        ),
        Some(4.0)
    );
    assert!(sample(
        &m,
        "cerbas_call_duration_seconds_bucket",
        &[("function", "hello"), ("le", "+Inf")]
    )
    .is_some());
    assert_eq!(
        sample(
            &m,
            "cerbas_http_requests_total",
            &[("route", "api"), ("status", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &m,
            "cerbas_http_requests_total",
            &[("route", "not_found"), ("status", "404")]
        ),
        Some(1.0)
    );
    for gauge in [
        "cerbas_queue_length",
        "cerbas_requests_in_hand",
        "cerbas_delayed_waiting",
        "cerbas_replies_dropped_total",
        "cerbas_redis_reconnects_total",
    ] {
        assert!(sample(&m, gauge, &[]).is_some(), "{gauge}");
    }
    // A request from an old client that subscribes after its push: its reply is
    // published again once it listens, and counted.
    assert_eq!(sample(&m, "cerbas_republishes_total", &[]), Some(0.0));
    let id: u64 = redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(&mut conn)
        .expect("incr");
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(client.keys().request(id))
        .arg(client.body("hello", json!({})))
        .cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(id)
        .query(&mut conn)
        .expect("push");
    let key = client.keys().request(id);
    wait_for("the request acknowledged", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).ok()?;
        (n == 0).then_some(())
    });
    redis
        .first_message(&client.keys().reply_channel(id), Duration::from_secs(8))
        .expect("the reply, published again");
    wait_for("a republish counted", Duration::from_secs(10), || {
        let m = scrape(&plug);
        (sample(&m, "cerbas_republishes_total", &[]).unwrap_or(0.0) >= 1.0).then_some(())
    });
}

#[test]
fn health_says_whether_redis_answers() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    let ok = must_get(&plug.url("/health"));
    assert_eq!(ok.0, 200);
    let body = json_of(&ok);
    assert_eq!(body["redis"], true);
    assert_eq!(body["queue_length"], 0);
    assert!(body["instance"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(body["uptime_secs"].is_u64());
    redis.pause();
    let t = Instant::now();
    let down = must_get(&plug.url("/health"));
    let took = t.elapsed();
    // A function that does not use Redis is still served over HTTP meanwhile.
    let hello = must_get(&plug.url("/api/hello"));
    redis.resume();
    assert_eq!(hello.0, 200);
    assert_eq!(down.0, 503);
    assert_eq!(json_of(&down)["redis"], false);
    assert!(took < 3 * SECS, "answered in {took:?}");
    wait_for("health again", 10 * SECS, || {
        (must_get(&plug.url("/health")).0 == 200).then_some(())
    });
}

/// Queues 8 requests that sleep 300 ms and returns the most requests the
/// server held at once (sampled from /metrics) while it served them.
fn most_in_hand_serving_sleeps(plug: &Plug, conn: &mut redis::Connection) -> f64 {
    let bodies: Vec<String> = (0..8)
        .map(|_| {
            json!({"func": "sleep", "args": {"ms": 300}, "user": "tom", "source": "web"})
                .to_string()
        })
        .collect();
    common::submit_many(conn, &bodies);
    let mut most_in_hand = 0.0f64;
    wait_for("the sleeps to be served", 20 * SECS, || {
        let m = scrape(plug);
        let in_hand = sample(&m, "cerbas_requests_in_hand", &[]).unwrap_or(0.0);
        most_in_hand = most_in_hand.max(in_hand);
        let served = sample(
            &m,
            "cerbas_requests_total",
            &[("function", "sleep"), ("outcome", "ok")],
        );
        (served == Some(8.0)).then_some(())
    });
    assert!(most_in_hand >= 1.0, "sampled while running");
    most_in_hand
}

/// HTTP calls run on the workers without inflating the reader's count of idle
/// workers: after many HTTP calls, the reader still takes from Redis only what
/// the pool can start (caller.rs, "the reader's ready count").
#[test]
fn http_calls_leave_the_readers_count_of_idle_workers_right() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |c| c.workers = 2);
    for _ in 0..50 {
        assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    }
    let mut conn = redis.conn();
    let most_in_hand = most_in_hand_serving_sleeps(&plug, &mut conn);
    // In hand: 2 running, at most one taken ahead per busy worker, and on a
    // loaded machine one finished whose ack is still on its way (the inflated
    // count took all 8 at once).
    assert!(
        most_in_hand <= 5.0,
        "the reader took {most_in_hand} at once for 2 workers"
    );
}

/// Attack on the reader's count of idle workers: an HTTP call that runs past
/// its deadline leaves its worker hung, and a replacement starts and says it is
/// free. The hung worker's own "free", said before it took the HTTP call, stood
/// for good: the reader counted one idle worker more for each such call, and
/// took that many requests more from Redis than the pool could start (here, 5
/// at once for 1 worker after 3 hung HTTP calls and a hung delayed request,
/// which reaches a worker on the same channel).
#[test]
fn hung_http_calls_leave_the_readers_count_of_idle_workers_right() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |c| c.workers = 1);
    for _ in 0..3 {
        // `nap` sleeps 1.5 s past its 200 ms deadline.
        assert_eq!(must_get(&plug.url("/api/nap")).0, 504);
    }
    // A delayed request reaches a worker on the same channel as HTTP calls.
    let mut conn = redis.conn();
    let delayed =
        json!({"func": "nap", "user": "tom", "source": "web", "delay": 10, "reply": false});
    common::submit_many(&mut conn, &[delayed.to_string()]);
    wait_for("the delayed nap's timeout", 20 * SECS, || {
        let m = scrape(&plug);
        let timeouts = sample(
            &m,
            "cerbas_requests_total",
            &[("function", "nap"), ("outcome", "timeout")],
        );
        (timeouts == Some(4.0)).then_some(())
    });
    let most_in_hand = most_in_hand_serving_sleeps(&plug, &mut conn);
    // 1 running, 1 ahead, 1 whose ack is on its way (the bug took 5).
    assert!(
        most_in_hand <= 3.0,
        "the reader took {most_in_hand} at once for 1 worker"
    );
}

// ---- the graceful stop ----

#[test]
fn a_stop_lets_calls_in_flight_finish_and_refuses_new_ones() {
    let redis = Redis::start();
    let (mut plug, started) = Plug::start(&redis, |_| {});
    let url = plug.url("/api/sleep?ms=1000");
    let in_flight = std::thread::spawn(move || must_get(&url));
    started.recv_timeout(10 * SECS).expect("the call started");
    plug.shutdown.trigger();
    let refused = must_get(&plug.url("/api/hello"));
    assert_eq!(refused.0, 503);
    assert_eq!(json_of(&refused)["data"], "stopping: try again later");
    let stopped = plug.stop();
    let done = in_flight.join().expect("in flight");
    assert_eq!((done.0, json_of(&done)["data"].clone()), (200, json!(1000)));
    assert!(stopped < 5 * SECS, "stopped in {stopped:?}");
    assert!(get(&plug.url("/")).is_err(), "no longer listening");
}

#[test]
fn a_call_past_the_drain_deadline_gets_503() {
    let redis = Redis::start();
    let (mut plug, started) = Plug::start(&redis, |c| c.drain_timeout_ms = 300);
    let url = plug.url("/api/sleep?ms=4000");
    let in_flight = std::thread::spawn(move || {
        let t = Instant::now();
        (must_get(&url), t.elapsed())
    });
    started.recv_timeout(10 * SECS).expect("the call started");
    let stopped = plug.stop();
    let (done, took) = in_flight.join().expect("in flight");
    assert_eq!(done.0, 503);
    assert!(
        took < 3 * SECS,
        "503 at the drain deadline, not at the call's end: {took:?}"
    );
    assert!(stopped < 6 * SECS, "stopped in {stopped:?}");
}

// ---- the binary and the shipped configuration ----

#[test]
fn the_binary_serves_the_shipped_configuration() {
    let redis = Redis::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start_args(&redis, &["--http", &addr]);
    let hello = must_get(&format!("http://{addr}/api/hello"));
    assert_eq!(hello.2, br#"{"status":"ok","data":"hello world!"}"#);
    let port_of = |server: &str| {
        let a = must_get(&format!(
            "http://{addr}/api/proxiedhostport?server={server}"
        ));
        json_of(&a)["data"].clone()
    };
    assert_eq!(port_of("flask"), json!(5000));
    assert_eq!(port_of("sinatra"), json!(9494));
    assert_eq!(port_of("pyramid"), json!(6543));
    assert_eq!(
        json_of(&must_get(&format!(
            "http://{addr}/api/proxiedhostport?server=rails"
        )))["status"],
        "error"
    );
    // Only `foo` may halt (the shipped [functions.halt]); web may not.
    assert_eq!(must_get(&format!("http://{addr}/api/halt")).0, 403);
    let shipped = std::fs::read_to_string(repo_file("cerbas.toml")).expect("cerbas.toml");
    assert!(shipped.contains("listen = \"127.0.0.1:4455\""));
}

#[test]
fn tokens_are_never_logged_and_wide_listening_is_warned_about() {
    let redis = Redis::start();
    let port = free_port();
    let config = common::config_with("[http.tokens]\n\"tom-secret-token-0123456789\" = \"tom\"\n");
    let server = Server::spawn(
        &redis,
        &[
            "--config",
            config.to_str().expect("path"),
            "--http",
            &format!("0.0.0.0:{port}"),
        ],
        &[("RUST_LOG", "debug")],
    );
    server.wait_ready(&redis);
    let url = format!("http://127.0.0.1:{port}/api/hello");
    let right = get_with(
        &url,
        &[("Authorization", "Bearer tom-secret-token-0123456789")],
    );
    assert_eq!(right.0, 200);
    let wrong = get_with(
        &url,
        &[("Authorization", "Bearer wrong-secret-token-0123456789")],
    );
    assert_eq!(wrong.0, 401);
    let log = server.log_text();
    assert!(!log.contains("secret-token"), "a token in the log:\n{log}");
    assert!(
        !log.contains("beyond loopback"),
        "tokens are set: no warning"
    );

    let port = free_port();
    // Not wait_ready: the first server, on the same Redis, could answer that.
    let wide = Server::spawn(&redis, &["--http", &format!("0.0.0.0:{port}")], &[]);
    let url = format!("http://127.0.0.1:{port}/api/hello");
    let hello = wait_for("the second server", 20 * SECS, || get(&url).ok());
    assert_eq!(hello.0, 200);
    assert!(wide
        .log_text()
        .contains("beyond loopback, without [http.tokens]"));
}

#[test]
fn bad_http_settings_stop_the_start() {
    let out = std::process::Command::new(bin())
        .args([
            "--config",
            &repo_file("cerbas.toml"),
            "--http",
            "not an address",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("http.listen must be an address like 127.0.0.1:4455"));
    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let redis = Redis::start();
    let out = std::process::Command::new(bin())
        .args([
            "--config",
            &repo_file("cerbas.toml"),
            "--redis",
            &redis.url(),
            "--http",
            &addr,
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("http.listen {addr}")), "{err}");
    // Proxy entries are checked.
    let config =
        common::config_with("[[proxy]]\nprefix = \"/api/x\"\ntarget = \"http://127.0.0.1:1\"\n");
    let out = std::process::Command::new(bin())
        .args(["--config", config.to_str().expect("path")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("prefix takes a path the plug serves itself")
    );
}

// ---- the front: limits tiny_http did not have (issue 10's last defects) ----

/// Sends `raw` on a new connection (a write the server cuts short is not an
/// error: it may refuse before reading everything) and reads until it closes
/// or `within` passes; says how long that took.
fn lenient(port: u16, raw: &[u8], within: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(within)).expect("timeout");
    let t = Instant::now();
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

/// Reads one response from `s`: its head (status line and headers) and its
/// body (by Content-Length; none without it).
fn one_response(s: &mut std::io::BufReader<TcpStream>) -> (String, Vec<u8>) {
    use std::io::BufRead;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = s.read_line(&mut line).expect("a response line");
        assert!(n > 0, "closed after {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("the body");
    (head, body)
}

fn connect(port: u16) -> (TcpStream, std::io::BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(10 * SECS)).expect("timeout");
    let r = std::io::BufReader::new(s.try_clone().expect("clone"));
    (s, r)
}

/// Whether the server closed `s` within `within` (reading nothing more).
fn closed_within(r: &mut std::io::BufReader<TcpStream>, within: Duration) -> Option<Duration> {
    r.get_ref().set_read_timeout(Some(within)).expect("timeout");
    let t = Instant::now();
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Some(t.elapsed()),
        _ => None,
    }
}

#[test]
fn connections_beyond_the_cap_get_503_and_cost_no_thread() {
    let redis = Redis::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let shipped = std::fs::read_to_string(repo_file("cerbas.toml")).expect("cerbas.toml");
    let text = shipped
        .replacen("\nmax_connections = 512\n", "\nmax_connections = 50\n", 1)
        .replacen(
            "\nheader_timeout_ms = 10000\n",
            "\nheader_timeout_ms = 60000\n",
            1,
        );
    assert_eq!(
        (text.matches("= 50\n").count(), text.contains("= 60000\n")),
        (1, true),
        "the shipped configuration sets both"
    );
    let path = common::scratch("cap").join("cerbas.toml");
    std::fs::write(&path, text).expect("write config");
    let server = Server::start_args(
        &redis,
        &["--config", path.to_str().expect("path"), "--http", &addr],
    );
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", server.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = threads();
    // 2,000 idle connections: 50 are held, the others answered 503 and closed.
    let mut conns: Vec<Option<TcpStream>> = (0..2000)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_nonblocking(true).expect("nonblocking");
            Some(s)
        })
        .collect();
    let (mut refused, mut closed) = (0, 0);
    let mut buf = [0u8; 512];
    wait_for(
        "the connections over the cap to be closed",
        30 * SECS,
        || {
            for slot in conns.iter_mut() {
                let Some(s) = slot else { continue };
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let got = String::from_utf8_lossy(&buf[..n]);
                        if got.starts_with("HTTP/1.1 503") && got.contains("Connection: close") {
                            refused += 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    // The server's end (a 503 read earlier, or a plain close).
                    _ => {
                        closed += 1;
                        *slot = None;
                    }
                }
            }
            (closed >= 1950).then_some(())
        },
    );
    let held = threads();
    eprintln!(
        "2,000 connections, cap 50: {refused} got 503, {closed} closed; threads {before} -> {held}"
    );
    assert_eq!(closed, 1950, "exactly the cap is held");
    assert!(refused >= 1900, "nearly all were told why: {refused}");
    assert!(
        held <= before + 50 + 5,
        "a thread per held connection at most: {before} -> {held}"
    );
    // The held ones are served, and a place freed is taken by the next.
    let mut open: Vec<TcpStream> = conns.into_iter().flatten().collect();
    let mut first = open.pop().expect("a held connection");
    first.set_nonblocking(false).expect("blocking");
    first.set_read_timeout(Some(10 * SECS)).expect("timeout");
    first
        .write_all(b"GET /api/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    let _ = first.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(first);
    wait_for("a freed place", 10 * SECS, || {
        let a = get(&format!("http://{addr}/api/hello")).ok()?;
        (a.0 == 200).then_some(())
    });
    drop(open);
}

#[test]
fn a_huge_request_head_gets_431() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    let mut big = b"GET /api/hello HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(big.len() + (1 << 20), b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let (got, took) = lenient(plug.port, &big, 10 * SECS);
    assert!(got.starts_with("HTTP/1.1 431"), "{got:.200}");
    assert!(took < 2 * SECS, "answered after {took:?}");
    let many: String = (0..150).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let (got, _) = lenient(
        plug.port,
        format!("GET /api/hello HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        10 * SECS,
    );
    assert!(got.starts_with("HTTP/1.1 431"), "{got:.200}");
    assert!(got.contains("too many header lines"), "{got}");
    // A head just under the limit is fine.
    let near = format!(
        "GET /api/hello HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(15 << 10)
    );
    let (got, _) = lenient(plug.port, near.as_bytes(), 10 * SECS);
    assert!(got.starts_with("HTTP/1.1 200"), "{got:.200}");
}

#[test]
fn a_request_line_that_is_not_utf8_gets_400() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    let (got, took) = lenient(
        plug.port,
        b"GET /api/\xff\xfehello HTTP/1.1\r\nHost: x\r\n\r\n",
        5 * SECS,
    );
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(got.contains("Connection: close"), "{got}");
    assert!(took < SECS, "{took:?}");
    let (got, _) = lenient(plug.port, b"\x00\x01\x02 garbage\r\n\r\n", 5 * SECS);
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200, "still serving");
}

#[test]
fn conflicting_body_lengths_get_400_at_once() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |_| {});
    for framing in [
        "Content-Length: 7\r\nContent-Length: 8",
        "Content-Length: 7, 8",
        "Content-Length: 7\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 7",
    ] {
        let (got, took) = lenient(
            plug.port,
            format!("POST /api/echo HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n{{\"a\":1}}")
                .as_bytes(),
            5 * SECS,
        );
        assert!(got.starts_with("HTTP/1.1 400"), "{framing}: {got:?}");
        assert!(
            took < Duration::from_millis(700),
            "{framing}: after {took:?}"
        );
    }
    // The same length twice is one length.
    let (got, _) = lenient(
        plug.port,
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}",
        5 * SECS,
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
}

#[test]
fn a_head_trickled_byte_by_byte_gets_408_at_the_head_deadline() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |c| c.http.threads = 1);
    let mut s = TcpStream::connect(("127.0.0.1", plug.port)).expect("connect");
    s.set_read_timeout(Some(10 * SECS)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    // A byte every 300 ms: each read is well within the read timeout (1 s).
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = w.write_all(b"GET /api/hello HTTP/1.1\r\nX-Slow: ");
            while !stop.load(Ordering::SeqCst) && w.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = trickle.join();
    let got = String::from_utf8_lossy(&out);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?} after {took:?}");
    assert!(took < 3 * SECS, "cut off after {took:?}");
    // The only handler thread was never held.
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
}

#[test]
fn an_api_call_gets_503_when_no_worker_frees_within_its_deadline() {
    let redis = Redis::start();
    let (plug, started) = Plug::start(&redis, |c| {
        c.workers = 1;
        c.timeout_ms = 500;
    });
    let url = plug.url("/api/sleep?ms=3000");
    let busy = std::thread::spawn(move || must_get(&url));
    started.recv_timeout(10 * SECS).expect("the sleep started");
    let t = Instant::now();
    let waited = must_get(&plug.url("/api/hello"));
    let took = t.elapsed();
    assert_eq!(waited.0, 503, "{:?}", String::from_utf8_lossy(&waited.2));
    assert_eq!(
        json_of(&waited)["data"],
        "no worker free within 500 ms: try again later"
    );
    assert_eq!(header(&waited, "retry-after"), "1");
    assert!(
        took < 2 * SECS,
        "503 after its deadline, not the sleep's end: {took:?}"
    );
    assert_eq!(busy.join().expect("sleep").0, 200);
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    // The withdrawn call never ran: one hello in all.
    let samples = scrape(&plug);
    let hellos = sample(
        &samples,
        "cerbas_requests_total",
        &[("function", "hello"), ("outcome", "ok")],
    );
    assert_eq!(hellos, Some(1.0));
}

/// An upstream that answers one request at once with a chunked body of one
/// byte every 100 ms for 5 s (flushed each time, which tiny_http does not do).
fn trickling_upstream() -> (u16, JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let thread = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if s.write_all(b"1\r\n.\r\n").is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    (port, thread)
}

#[test]
fn a_trickling_upstream_response_is_cut_off_at_its_deadline() {
    let redis = Redis::start();
    let (port, upstream) = trickling_upstream();
    let (plug, _) = Plug::start(&redis, |c| {
        c.http.proxy_response_timeout_ms = 1_000;
        c.http.threads = 1;
        c.proxy = vec![ProxyTarget {
            prefix: "/api5".into(),
            target: format!("http://127.0.0.1:{port}"),
            name: Some("flask".into()),
        }];
    });
    let (got, took) = lenient(
        plug.port,
        b"GET /api5/trickle HTTP/1.1\r\nHost: x\r\n\r\n",
        10 * SECS,
    );
    eprintln!("a trickling upstream: cut off after {took:?}");
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.contains("Transfer-Encoding: chunked"), "{got}");
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "the client sees a cut-off body: {got:?}"
    );
    assert!(
        took < 3 * SECS,
        "cut off after {took:?}, not at the trickle's end (5 s)"
    );
    // The only handler thread is free again.
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    assert!(t.elapsed() < SECS);
    upstream.join().expect("upstream");
}

#[test]
fn the_front_speaks_http_1_1() {
    let redis = Redis::start();
    let (plug, _) = Plug::start(&redis, |c| c.http.keep_alive_ms = 500);
    // Pipelined requests on one connection, HEAD without a body among them.
    let (mut w, mut r) = connect(plug.port);
    w.write_all(
        b"GET /api/hello HTTP/1.1\r\nHost: x\r\n\r\nHEAD /api/hello HTTP/1.1\r\nHost: x\r\n\r\nGET /api/foo?var1=a&var2=b HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    let (head, body) = one_response(&mut r);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, br#"{"status":"ok","data":"hello world!"}"#);
    let (head, body) = one_response(&mut r);
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("Content-Length: 37"),
        "{head}"
    );
    // (one_response read 37 bytes of "body": the next response's head.)
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "HEAD sent no body: {:?}",
        String::from_utf8_lossy(&body)
    );
    // An idle keep-alive connection is closed after keep_alive_ms.
    let (mut w, mut r) = connect(plug.port);
    w.write_all(b"GET /api/hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert!(one_response(&mut r).0.starts_with("HTTP/1.1 200"));
    let idle = closed_within(&mut r, 5 * SECS).expect("closed");
    assert!(idle < 2 * SECS, "idle connection closed after {idle:?}");
    // HTTP/1.0 closes, unless it asks for keep-alive.
    let (got, took) = lenient(plug.port, b"GET /api/hello HTTP/1.0\r\n\r\n", 5 * SECS);
    assert!(
        got.starts_with("HTTP/1.0 200") && got.contains("Connection: close"),
        "{got}"
    );
    assert!(took < SECS);
    let (mut w, mut r) = connect(plug.port);
    for _ in 0..2 {
        w.write_all(b"GET /api/hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .expect("write");
        let (head, _) = one_response(&mut r);
        assert!(
            head.starts_with("HTTP/1.0 200") && head.contains("Connection: keep-alive"),
            "{head}"
        );
    }
    // Expect: 100-continue: the body is asked for, then answered.
    let (mut w, mut r) = connect(plug.port);
    w.write_all(
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("write");
    let (head, _) = one_response(&mut r);
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    w.write_all(br#"{"a":1}"#).expect("write");
    let (head, body) = one_response(&mut r);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, br#"{"status":"ok","data":{"a":1}}"#);
    // A refusal before the body does not ask for it, and closes.
    w.write_all(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .expect("write");
    let (head, _) = one_response(&mut r);
    assert!(
        head.starts_with("HTTP/1.1 413") && head.contains("Connection: close"),
        "{head}"
    );
    // A chunked body is decoded.
    let (got, _) = lenient(
        plug.port,
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":2}\r\n0\r\n\r\n",
        5 * SECS,
    );
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with(r#"{"status":"ok","data":{"a":2}}"#),
        "{got}"
    );
    let (got, _) = lenient(
        plug.port,
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        5 * SECS,
    );
    assert!(
        got.starts_with("HTTP/1.1 400") && got.contains("chunked body"),
        "{got}"
    );
}

#[test]
fn a_client_killed_mid_body_frees_its_handler_thread() {
    let redis = Redis::start();
    let (upstream, _) = Upstream::start();
    let (plug, _) = Plug::start(&redis, |c| {
        c.http.threads = 2;
        c.http.read_timeout_ms = 30_000;
        c.proxy = vec![upstream.target("/api5", "flask")];
    });
    // Two clients, each killed (SIGKILL) in the middle of its body: one to a
    // function, one through the proxy. The read timeout is long, so only the
    // closed connection can free the threads.
    let script = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.argv[2].encode() + b"0123456789")
print("sent", flush=True)
time.sleep(60)
"#;
    let mut children = Vec::new();
    for head in [
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
        "POST /api5/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    ] {
        let mut child = std::process::Command::new("python3")
            .args(["-c", script, &plug.port.to_string(), head])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("sent");
        assert_eq!(line.trim(), "sent");
        children.push(child);
    }
    // Both handler threads now wait for bodies.
    wait_for("both bodies to be waited for", 10 * SECS, || {
        let t = Instant::now();
        let r = agent()
            .get(&plug.url("/api/hello"))
            .config()
            .timeout_global(Some(Duration::from_millis(300)))
            .build()
            .call();
        (r.is_err() || t.elapsed() >= Duration::from_millis(250)).then_some(())
    });
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let t = Instant::now();
    assert_eq!(must_get(&plug.url("/api/hello")).0, 200);
    assert!(
        t.elapsed() < 2 * SECS,
        "served {:?} after the kills",
        t.elapsed()
    );
    // The client's failure did not count against the target.
    assert_eq!(must_get(&plug.url("/api5/ok")).0, 200);
    assert_eq!(must_get(&plug.url("/api5/ok")).0, 200);
}
