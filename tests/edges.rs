//! The edges a fuzzing campaign found (issue 8), each closed with a test against a
//! real redis-server and real cerbas processes: secrets in unix-socket URLs, delayed
//! bodies kept byte for byte, settings that can never work, the smaller ones, and
//! concurrency limits. Not for: the generated-input property tests (`fuzz.rs`) or
//! the pure parts (unit tests beside the code).

mod common;

use cerbas::Reply;
use common::*;
use serde_json::json;
use std::time::Duration;

fn ok(v: serde_json::Value) -> Reply {
    Reply::Ok(v)
}

/// A redis-server with a password that also listens on a unix socket.
fn redis_on_a_socket(password: &str) -> (Redis, String) {
    let dir = scratch("sock");
    let sock = dir.join("redis.sock").to_string_lossy().into_owned();
    let redis = Redis::start_with(
        &["--unixsocket", &sock, "--unixsocketperm", "700"],
        Some(password),
    );
    (redis, sock)
}

#[test]
fn a_password_in_a_unix_socket_url_never_reaches_the_log() {
    let (redis, sock) = redis_on_a_socket("s3cret-pw");
    for url in [
        format!("redis+unix://{sock}?db=1&pass=s3cret-pw"),
        format!("unix://{sock}?user=default&pass=s3cret-pw"),
    ] {
        let mut server = Server::start_args(&redis, &["--redis", &url]);
        assert_eq!(
            redis.client().request("hello", json!({})).unwrap(),
            ok(json!("hello world!"))
        );
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(20)).is_some());
        let log = server.log_text();
        assert!(log.contains("starting: redis="), "{log}");
        assert!(!log.contains("s3cret"), "{url} leaked:\n{log}");
    }
}

/// Reads `CERBAS-COUNTER`'s next value, as a client does before storing a request.
fn next_id(conn: &mut redis::Connection) -> u64 {
    redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(conn)
        .expect("INCR")
}

#[test]
fn a_delayed_request_is_stored_as_the_client_sent_it_and_served_when_due() {
    let redis = Redis::start();
    // `9e15` written again from the parsed value is `9000000000000000.0`: a body at
    // the size limit would then be refused as too large when it comes due.
    let nines = vec!["9e15"; 40].join(",");
    let fields =
        format!(r#""args":{{"message":[{nines}]}},"func":"echo","source":"web","user":"foo""#);
    let body = format!(r#"{{{fields},"delay":2000}}"#);
    let config = config_with(&format!("max_request_bytes = {}", body.len()));
    let _server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    let mut conn = redis.conn();
    let id = next_id(&mut conn);
    let mut stored = None;
    let reply = redis.reply_for(id, false, || {
        redis::pipe()
            .cmd("SET")
            .arg(format!("CERBAS-REQ-{id:010}"))
            .arg(&body)
            .cmd("RPUSH")
            .arg("CERBAS-QUEUE")
            .arg(id)
            .query::<()>(&mut conn)
            .expect("queue the request");
        // While it waits in CERBAS-DELAYED, its body is what is stored.
        wait_for("the request to be put off", Duration::from_secs(20), || {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg("CERBAS-DELAYED")
                .arg(id)
                .query(&mut conn)
                .expect("ZSCORE");
            score.map(|_| ())
        });
        stored = redis::cmd("GET")
            .arg(format!("CERBAS-REQ-{id:010}"))
            .query::<Option<String>>(&mut conn)
            .expect("GET");
    });
    assert_eq!(reply, ok(json!(vec![9e15; 40])));
    assert_eq!(stored, Some(format!("{{{fields}}}")));
}

/// Waits for a server that must refuse to start: exit code 2, and the reason in
/// its output.
fn assert_refused(mut server: Server, reason: &str) {
    let status = server.wait_exit(Duration::from_secs(30));
    let log = server.log_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "expected exit 2 ({reason}); log:\n{log}"
    );
    assert!(log.contains(reason), "expected {reason:?} in:\n{log}");
}

#[test]
fn settings_redis_can_never_accept_stop_the_start_with_the_reason() {
    let open = Redis::start();
    let locked = Redis::start_with(&[], Some("right-pw"));
    let port = |r: &Redis| r.port.to_string();
    let cases = [
        (
            format!("redis://127.0.0.1:{}/16", port(&open)),
            "Redis refused to select db 16",
        ),
        (
            format!("redis://127.0.0.1:{}/99999", port(&open)),
            "Redis refused to select db 99999",
        ),
        (
            format!("redis://:wrong-pw@127.0.0.1:{}", port(&locked)),
            "Redis refused the password",
        ),
        (
            format!("redis://:some-pw@127.0.0.1:{}", port(&open)),
            "Redis refused the password",
        ),
        (
            format!("redis://127.0.0.1:{}", port(&locked)),
            "Redis requires a password",
        ),
    ];
    for (url, reason) in cases {
        assert_refused(Server::spawn(&open, &["--redis", &url], &[]), reason);
    }
    // Nothing secret reached the output on the way.
    let server = Server::spawn(
        &open,
        &[
            "--redis",
            &format!("redis://:wrong-pw@127.0.0.1:{}", port(&locked)),
        ],
        &[],
    );
    let log_path = server.log.clone();
    assert_refused(server, "cannot use this Redis");
    let log = std::fs::read_to_string(log_path).expect("log");
    assert!(!log.contains("wrong-pw"), "{log}");
}

#[test]
fn a_repeated_db_in_the_url_is_refused() {
    let (redis, sock) = redis_on_a_socket("pw");
    assert_refused(
        Server::spawn(
            &redis,
            &["--redis", &format!("unix://{sock}?db=2&pass=pw&db=3")],
            &[],
        ),
        "redis_url names its db more than once",
    );
}

#[test]
fn a_size_setting_out_of_bounds_is_refused_not_a_panic() {
    let redis = Redis::start();
    let config = config_with("redis_pool_size = 9223372036854775807");
    assert_refused(
        Server::spawn(&redis, &["--config", config.to_str().unwrap()], &[]),
        "redis_pool_size must be 1 to 1000, not 9223372036854775807",
    );
}

/// Runs a cerbas command that should end by itself; kills it after 30 s. Its exit
/// code (`None` if killed) and stderr.
fn run_cerbas(cmd: &mut std::process::Command) -> (Option<i32>, String) {
    let err = scratch("stderr").join("stderr");
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("cerbas runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (code, std::fs::read_to_string(err).unwrap_or_default())
}

#[test]
fn a_redis_url_or_env_that_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    for var in ["CERBAS_REDIS_URL", "CERBAS_ENV"] {
        let (code, stderr) = run_cerbas(
            std::process::Command::new(bin())
                .args(["--config", &repo_file("cerbas.toml")])
                .env(
                    var,
                    std::ffi::OsStr::from_bytes(b"redis://127.0.0.1:1/\xff"),
                )
                .env("RUST_LOG", "off"),
        );
        assert_eq!(code, Some(2), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("{var} is not valid UTF-8")),
            "{var}: {stderr}"
        );
    }
}

/// A stand-in for a Redis older than 6.2: it answers every command `+OK` and
/// `INFO` with `version`. Stops (and joins its thread) when dropped.
struct FakeRedis {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRedis {
    fn start(version: &'static str) -> FakeRedis {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let serving = stop.clone();
        let serve = move |stream: std::net::TcpStream| -> std::io::Result<()> {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut out = stream.try_clone()?;
            let mut lines = BufReader::new(stream);
            let mut line = String::new();
            let mut read = |line: &mut String| -> std::io::Result<bool> {
                loop {
                    line.clear();
                    match lines.read_line(line) {
                        Ok(0) => return Ok(false),
                        Ok(_) => return Ok(true),
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            if serving.load(Ordering::SeqCst) {
                                return Ok(false);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            // Each command is an array of bulk strings: *N, then N times $len, data.
            while read(&mut line)? {
                let n: usize = line.trim_start_matches('*').trim().parse().unwrap_or(0);
                let mut args = Vec::new();
                for _ in 0..n {
                    read(&mut line)?;
                    read(&mut line)?;
                    args.push(line.trim().to_uppercase());
                }
                let reply = match args.first().map(String::as_str) {
                    Some("INFO") => {
                        let info = format!("# Server\r\nredis_version:{version}\r\n");
                        format!("${}\r\n{info}\r\n", info.len())
                    }
                    _ => "+OK\r\n".to_string(),
                };
                out.write_all(reply.as_bytes())?;
            }
            Ok(())
        };
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop_flag(&stopped) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let serve = serve.clone();
                        conns.push(std::thread::spawn(move || serve(s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        FakeRedis {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

fn stop_flag(flag: &std::sync::atomic::AtomicBool) -> bool {
    flag.load(std::sync::atomic::Ordering::SeqCst)
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_redis_older_than_6_2_is_refused_at_start() {
    let redis = Redis::start();
    let old = FakeRedis::start("6.0.16");
    assert_refused(
        Server::spawn(
            &redis,
            &["--redis", &format!("redis://127.0.0.1:{}", old.port)],
            &[],
        ),
        "Redis 6.0 is too old: cerbas needs 6.2 or later (BLMOVE, LMOVE)",
    );
}

#[test]
fn a_redis_that_is_not_there_yet_is_waited_for() {
    let live = Redis::start();
    // A port nobody listens on: taken from a redis-server that is then stopped.
    let gone = Redis::start();
    let port = gone.port;
    drop(gone);
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = Server::spawn(&live, &["--redis", &url], &[]);
    server.wait_log("redis unavailable, retrying", 1);
    // Hold the outage a while: a refused connection can heal, so it keeps trying.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.wait_exit(Duration::ZERO),
        None,
        "{}",
        server.log_text()
    );
    let dir = scratch("late-redis");
    let mut late = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let reply = wait_for(
        "the late redis-server to listen",
        Duration::from_secs(20),
        || cerbas::Client::open(&url, cerbas::Env::Dev).ok(),
    )
    .identity("foo", "web")
    .timeout(Duration::from_secs(30))
    .request("hello", json!({}));
    let _ = late.kill();
    let _ = late.wait();
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(reply.expect("a reply"), ok(json!("hello world!")));
}

#[test]
fn a_bad_configuration_is_explained_on_stderr_even_with_logging_off() {
    let config = config_with("workers = 0");
    let (code, stderr) = run_cerbas(
        std::process::Command::new(bin())
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "off"),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("configuration: workers must be 1 to 10000, not 0"),
        "{stderr:?}"
    );
}

/// A redis-server and a cerbas server on it with the shipped configuration.
fn serve(args: &[&str]) -> (Redis, Server) {
    let redis = Redis::start();
    let server = Server::start_args(&redis, args);
    (redis, server)
}

#[test]
fn sum_is_exact_over_the_64_bit_range_and_never_null() {
    let (redis, _server) = serve(&[]);
    let c = redis.client();
    assert_eq!(
        c.request("sum", json!({"a": u64::MAX, "b": -1})).unwrap(),
        ok(json!(u64::MAX - 1))
    );
    assert_eq!(
        c.request("sum", json!({"a": 1e308, "b": 1e308})).unwrap(),
        Reply::Error("the sum is too large for a float".into())
    );
}

#[test]
fn the_documented_nesting_depth_is_accepted() {
    let (redis, _server) = serve(&[]);
    // Levels 1 to 3 are the body, "args" and "message"'s array.
    let inner = 128 - 3;
    let body = format!(
        r#"{{"func":"echo","args":{{"message":[{}1{}]}},"user":"foo","source":"web"}}"#,
        "[".repeat(inner),
        "]".repeat(inner)
    );
    let reply = redis
        .client()
        .call(body.as_bytes(), &cerbas::CallOptions::default())
        .unwrap();
    assert!(matches!(reply, Reply::Ok(_)), "{reply:?}");
}

#[test]
fn a_wrong_typed_fallback_key_is_named_as_it_is() {
    let (redis, _server) = serve(&[]);
    let mut conn = redis.conn();
    let id = next_id(&mut conn);
    let reply = redis.reply_for(id, false, || {
        redis::pipe()
            .cmd("HSET")
            .arg(format!("CERBAS-REQUEST-{id:010}"))
            .arg("func")
            .arg("hello")
            .cmd("RPUSH")
            .arg("CERBAS-QUEUE")
            .arg(id)
            .query::<()>(&mut conn)
            .expect("queue it");
    });
    let Reply::Error(m) = reply else {
        panic!("expected an error, got {reply:?}")
    };
    assert!(
        m.starts_with(&format!("request CERBAS-REQUEST-{id:010} cannot be read: ")),
        "{m}"
    );
}

#[test]
fn a_huge_queue_entry_costs_one_log_line() {
    let (redis, server) = serve(&[]);
    let before = std::fs::metadata(&server.log).map(|m| m.len()).unwrap_or(0);
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(vec![b'x'; 4 << 20])
        .query::<()>(&mut redis.conn())
        .unwrap();
    server.wait_log("skipped a queue entry that is not a request id", 1);
    let grown = std::fs::metadata(&server.log).map(|m| m.len()).unwrap_or(0) - before;
    assert!(grown < 4096, "the log grew by {grown} bytes");
    assert!(server.log_text().contains("… (4194304 bytes)"));
    assert_eq!(
        redis.client().request("hello", json!({})).unwrap(),
        ok(json!("hello world!"))
    );
}

/// A client that calls as `user`, source `web`.
fn client_as(redis: &Redis, user: &str) -> cerbas::Client {
    cerbas::Client::open(&redis.url(), cerbas::Env::Dev)
        .expect("client")
        .identity(user, "web")
        .timeout(Duration::from_secs(30))
}

#[test]
fn sleep_past_its_deadline_is_refused_at_once() {
    let (redis, _server) = serve(&[]);
    let reply = redis
        .client()
        .request("sleep", json!({"ms": 3_600_000}))
        .unwrap();
    let Reply::Error(m) = reply else {
        panic!("expected an error, got {reply:?}")
    };
    assert!(
        m.starts_with("ms must be at most the call's deadline: 3600000 asked, "),
        "{m}"
    );
}

#[test]
fn one_user_cannot_take_every_worker() {
    let redis = Redis::start();
    // Four workers, no replacements for hung ones; foo may run two calls at once.
    let config = config_with(
        "workers = 4\nmax_hung_workers = 0\n[limits]\nper_user = 2\n[functions.slow]\ntimeout_ms = 300\n",
    );
    let _server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    // Six calls that hold their thread 6 s each, past their 300 ms deadline.
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let c = client_as(&redis, "foo");
            std::thread::spawn(move || c.request("slow", json!({})))
        })
        .collect();
    let replies: Vec<Reply> = callers
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let busy = Reply::Error(
        "busy: user foo is at its limit of 2 running calls (limits.per_user); try again later"
            .into(),
    );
    let timeouts = replies
        .iter()
        .filter(|r| **r == Reply::Error("timeout".into()))
        .count();
    assert_eq!(timeouts, 2, "{replies:?}");
    assert_eq!(
        replies.iter().filter(|r| **r == busy).count(),
        4,
        "{replies:?}"
    );
    // Another user is still served: foo holds two workers, not four.
    assert_eq!(
        client_as(&redis, "tom")
            .request("hello", json!({}))
            .unwrap(),
        ok(json!("hello world!"))
    );
    // Once foo's calls return (not at their deadline: they held their threads
    // until then), foo is served again.
    let foo = client_as(&redis, "foo");
    wait_for("foo's calls to return", Duration::from_secs(30), || {
        (foo.request("hello", json!({})).unwrap() == ok(json!("hello world!"))).then_some(())
    });
}

#[test]
fn a_function_limit_holds_for_every_caller() {
    let redis = Redis::start();
    let config = config_with("[functions.sleep]\nmax_concurrent = 1\n");
    let server = Server::spawn(
        &redis,
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
    );
    server.wait_ready(&redis);
    let tom = client_as(&redis, "tom");
    let first = std::thread::spawn(move || tom.request("sleep", json!({"ms": 2000})));
    server.wait_log("sleep from user", 1);
    let foo = client_as(&redis, "foo");
    assert_eq!(
        foo.request("sleep", json!({"ms": 10})).unwrap(),
        Reply::Error(
            "busy: function sleep is at its limit of 1 running calls (functions.sleep.max_concurrent); try again later"
                .into()
        )
    );
    assert_eq!(
        foo.request("hello", json!({})).unwrap(),
        ok(json!("hello world!"))
    );
    assert_eq!(first.join().unwrap().unwrap(), ok(json!(2000)));
    assert_eq!(
        foo.request("sleep", json!({"ms": 10})).unwrap(),
        ok(json!(10))
    );
}
