//! Attacks on three changes, each against a real redis-server and real `cerbas`
//! processes: the reader's take and the publisher's pipelines packed by hand
//! (11a97b6, src/resp.rs), a take that reads several bodies while they fit in
//! 64 KiB (96547fe), and workers that wake the publisher after their reply is in
//! its channel (4a7e602). Each test checks that every request gets exactly one
//! correct reply and that nothing is left in Redis.
//! Not for: the behaviour those changes kept (the hardening_* tests have it).

mod common;

use cerbas::Reply;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A request body of user `foo`, source `web` (allowed by the shipped config).
fn body(func: &str, args: Value) -> String {
    json!({"func": func, "args": args, "user": "foo", "source": "web"}).to_string()
}

/// Pushes `ids` (their bodies stored under prefix `CERBAS`) in one `RPUSH` with
/// a listener on, waits up to `within` for each reply, then for nothing to be
/// left in Redis; the listener is still on (a reply sent twice later counts).
fn push_and_wait(
    redis: &Redis,
    server: &Server,
    conn: &mut redis::Connection,
    ids: &[u64],
    within: Duration,
) -> Replies {
    let replies = Replies::listen(redis, "CERBAS");
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(ids)
        .query::<()>(conn)
        .expect("RPUSH");
    replies.wait_all(ids, within, || server.log_text());
    wait_nothing_left(conn, "CERBAS");
    replies
}

/// The one reply of `id` in `got`, decoded; panics if there is none or several.
fn only_reply(got: &HashMap<u64, Vec<Vec<u8>>>, id: u64) -> Reply {
    match got.get(&id).map(Vec::as_slice) {
        Some([one]) => Reply::from_json(one).expect("a JSON reply"),
        Some(many) => panic!("request {id} answered {} times", many.len()),
        None => panic!("request {id} not answered"),
    }
}

/// Keys under `prefix` (db 1) that a served request must not leave behind.
fn leftovers(conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", glob_escape(prefix)))
        .query(conn)
        .expect("KEYS");
    keys.retain(|k| {
        let rest = &k[prefix.len()..];
        !(rest == "-COUNTER"
            || rest == "-INSTANCES"
            || rest.starts_with("-HEARTBEAT-")
            || rest == "-SNAPSHOTS"
            || rest.starts_with("-SNAPSHOT-")
            || rest == "-ERRORS")
    });
    keys.sort();
    keys
}

fn wait_nothing_left(conn: &mut redis::Connection, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftovers(conn, prefix);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left in redis: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stores `bodies` under `prefix` with ids from `INCRBY` (the counter may have
/// been set high first) and pushes them all with one `RPUSH`; returns the ids.
fn push_under(conn: &mut redis::Connection, prefix: &str, bodies: &[String]) -> Vec<u64> {
    let last: u64 = redis::cmd("INCRBY")
        .arg(format!("{prefix}-COUNTER"))
        .arg(bodies.len())
        .query(conn)
        .expect("INCRBY");
    let ids: Vec<u64> = (last + 1 - bodies.len() as u64..=last).collect();
    let mut pipe = redis::pipe();
    for (id, b) in ids.iter().zip(bodies) {
        pipe.cmd("SET")
            .arg(format!("{prefix}-REQ-{id:010}"))
            .arg(b)
            .ignore();
    }
    pipe.cmd("RPUSH")
        .arg(format!("{prefix}-QUEUE"))
        .arg(&ids)
        .ignore();
    pipe.query::<()>(conn).expect("store and push");
    ids
}

/// The shipped cerbas.toml with its key `prefix` set to `prefix` (`config_with`
/// would also drop the `prefix` of each `[[proxy]]`).
fn prefixed_config(prefix: &str) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(repo_file("cerbas.toml")).expect("cerbas.toml");
    let line = format!(
        "prefix = {}",
        serde_json::to_string(prefix).expect("a TOML string")
    );
    let text = shipped.replacen("prefix = \"CERBAS\"", &line, 1);
    assert_ne!(text, shipped, "cerbas.toml sets prefix = \"CERBAS\"");
    let path = scratch("config").join("cerbas.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A server on `redis` with the configuration at `config`, ready once it has
/// registered under `prefix` (its own `hello` check uses the shipped prefix).
fn server_with(redis: &Redis, config: &std::path::Path, prefix: &str, args: &[&str]) -> Server {
    let path = config.to_str().expect("utf-8 path").to_string();
    let mut all = vec!["--config", path.as_str()];
    all.extend_from_slice(args);
    let server = Server::spawn(redis, &all, &[]);
    server.wait_log("ready: taking requests", 1);
    let mut conn = redis.conn();
    wait_for("the server registered", Duration::from_secs(20), || {
        let n: i64 = redis::cmd("SCARD")
            .arg(format!("{prefix}-INSTANCES"))
            .query(&mut conn)
            .ok()?;
        (n > 0).then_some(())
    });
    server
}

/// Stops `server` with SIGTERM, waits for its exit 0 and returns its log.
fn stop(mut server: Server) -> String {
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(30)).expect("exit");
    let log = server.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    log
}

/// 11a97b6: key prefixes with glob characters, a backslash, unicode and
/// `MSGPACK:` in them, and ids past ten digits (up to near Redis's largest
/// counter): immediate, delayed (`SCHEDULE` in the publisher's pipeline) and
/// late-subscribed replies (`PUBSUB CHANNELS`/`NUMSUB` on the prefix) each come
/// once, right, and nothing is left under the prefix.
#[test]
fn odd_prefixes_and_long_ids_get_every_reply_once() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    for (prefix, counter) in [
        ("A*B?[x]", 0u64),
        ("P\\Q", 99_999_999_990),
        ("ünï∞✓", 1_000_000_000_000_000),
        ("MSGPACK:M", 9_223_372_036_854_775_000),
    ] {
        redis::cmd("SET")
            .arg(format!("{prefix}-COUNTER"))
            .arg(counter)
            .query::<()>(&mut conn)
            .expect("SET counter");
        let server = server_with(&redis, &prefixed_config(prefix), prefix, &[]);
        let replies = Replies::listen(&redis, prefix);
        let mut bodies: Vec<String> = (0..200)
            .map(|i| body("echo", json!({"message": format!("now {i}")})))
            .collect();
        bodies.extend((0..20).map(|i| {
            json!({"func": "echo", "args": {"message": format!("later {i}")},
                   "user": "foo", "source": "web", "delay": 200 + 20 * i})
            .to_string()
        }));
        let ids = push_under(&mut conn, prefix, &bodies);
        replies.wait_all(&ids, Duration::from_secs(30), || server.log_text());
        // Nobody listens now.
        let got = replies.stop();
        // A late subscriber: published to nobody, heard 1.5 s later.
        let late = push_under(
            &mut conn,
            prefix,
            &[body("echo", json!({"message": "late"}))],
        )[0];
        std::thread::sleep(Duration::from_millis(1500));
        let mut sub = redis.conn();
        let mut ps = sub.as_pubsub();
        ps.subscribe(format!("{prefix}-RESPONSE-1-{late:010}"))
            .expect("SUBSCRIBE");
        ps.set_read_timeout(Some(Duration::from_secs(8)))
            .expect("timeout");
        let msg = ps.get_message().unwrap_or_else(|e| {
            panic!("{prefix}: no late reply ({e}); log:\n{}", server.log_text())
        });
        assert_eq!(
            Reply::from_json(msg.get_payload_bytes()).expect("JSON"),
            Reply::Ok(json!("late")),
            "{prefix}"
        );
        drop(ps);
        wait_nothing_left(&mut conn, prefix);
        stop(server);
        for (i, id) in ids.iter().enumerate() {
            let want = if i < 200 {
                format!("now {i}")
            } else {
                format!("later {}", i - 200)
            };
            assert_eq!(
                only_reply(&got, *id),
                Reply::Ok(json!(want)),
                "{prefix} {id}"
            );
        }
        assert!(ids.iter().all(|id| *id > counter), "{prefix}");
    }
}

/// An `echo` body `len` bytes long (at least its JSON frame), its message of `x`s.
fn echo_of_len(len: usize) -> (String, String) {
    let frame = body("echo", json!({"message": ""})).len();
    let message = "x".repeat(len.saturating_sub(frame));
    (body("echo", json!({"message": message})), message)
}

/// What a request of a 96547fe batch is, and the reply it must get.
enum Part {
    /// An `echo` body of about this many bytes.
    Echo(usize),
    /// An `echo` body of this many bytes under the fallback key `P-REQUEST-…`.
    Fallback(usize),
    /// An empty string.
    Empty,
    /// No key.
    Missing,
    /// A list where the body should be.
    List,
    /// Over `max_request_bytes` (1 MiB).
    Huge,
}

/// 96547fe: batches taken whole by an idle server (100 free workers), mixing
/// bodies around the take's 64 KiB: tiny, 63 KiB, exactly what is left of the
/// room, 600 KiB, empty, missing, a list, over 1 MiB, under the fallback key, in
/// several orders (the big one first, a bad one first). Each gets its one right
/// answer, and nothing is left in Redis.
#[test]
fn batches_around_the_takes_64_kib_get_every_answer_once() {
    use Part::*;
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let k = 1024;
    let batches: Vec<Vec<Part>> = vec![
        vec![
            Echo(k),
            Echo(63 * k),
            Echo(2 * k),
            Echo(600 * k),
            Empty,
            Echo(10),
        ],
        vec![
            Echo(63 * k),
            Echo(k),
            Echo(20),
            Huge,
            Echo(600 * k),
            Echo(30),
        ],
        // The second fills the room exactly; the third finds none.
        vec![Echo(k), Echo(63 * k), Echo(100), Echo(100)],
        vec![Echo(600 * k), Echo(100), Echo(63 * k), Echo(100)],
        vec![Empty, Echo(64 * k), Echo(100), Missing, List, Fallback(100)],
        vec![
            Missing,
            Echo(65 * k),
            Fallback(70 * k),
            Fallback(10),
            Empty,
            Empty,
        ],
        vec![
            List,
            Huge,
            Echo(64 * k - 1),
            Echo(2),
            Fallback(600 * k),
            Echo(1),
        ],
        vec![Huge, Echo(1000 * k), Echo(64 * k), Echo(64 * k), Echo(5)],
        vec![
            Fallback(64 * k),
            Echo(3),
            List,
            Echo(63 * k),
            Missing,
            Huge,
            Echo(7),
        ],
    ];
    for (b, batch) in batches.iter().enumerate() {
        let last: u64 = redis::cmd("INCRBY")
            .arg("CERBAS-COUNTER")
            .arg(batch.len())
            .query(&mut conn)
            .expect("INCRBY");
        let ids: Vec<u64> = (last + 1 - batch.len() as u64..=last).collect();
        let mut want = Vec::new();
        let mut pipe = redis::pipe();
        for (id, part) in ids.iter().zip(batch) {
            let key = format!("CERBAS-REQ-{id:010}");
            let fallback = format!("CERBAS-REQUEST-{id:010}");
            let body_len;
            match part {
                Echo(n) | Fallback(n) => {
                    let (text, message) = echo_of_len(*n);
                    body_len = text.len();
                    let k = if matches!(part, Echo(_)) {
                        &key
                    } else {
                        &fallback
                    };
                    pipe.cmd("SET").arg(k).arg(text).ignore();
                    want.push(Some(Reply::Ok(json!(message))));
                }
                Empty => {
                    body_len = 0;
                    pipe.cmd("SET").arg(&key).arg("").ignore();
                    want.push(None);
                }
                Missing => {
                    body_len = 0;
                    want.push(Some(Reply::Error(format!("request not found: {key}"))));
                }
                List => {
                    body_len = 0;
                    pipe.cmd("RPUSH").arg(&key).arg("x").ignore();
                    want.push(None);
                }
                Huge => {
                    let (text, _) = echo_of_len((1 << 20) + 1);
                    body_len = text.len();
                    pipe.cmd("SET").arg(&key).arg(text).ignore();
                    want.push(Some(Reply::Error(format!(
                        "request too large: {body_len} bytes (limit {})",
                        1 << 20
                    ))));
                }
            }
            let _ = body_len;
        }
        pipe.query::<()>(&mut conn).expect("store");
        let got = push_and_wait(&redis, &server, &mut conn, &ids, Duration::from_secs(20)).stop();
        for ((id, part), want) in ids.iter().zip(batch).zip(&want) {
            let reply = only_reply(&got, *id);
            match want {
                Some(w) => assert!(
                    reply == *w,
                    "batch {b}, {id}: {}",
                    match &reply {
                        Reply::Ok(v) => format!("ok of {} bytes", v.to_string().len()),
                        Reply::Error(e) => e.clone(),
                    }
                ),
                None => assert!(
                    matches!(reply, Reply::Error(_)),
                    "batch {b}, {id} ({}): {reply:?}",
                    match part {
                        Empty => "empty",
                        _ => "list",
                    }
                ),
            }
        }
    }
    // The server's own count: its `hello`, then each request once.
    stop(server);
}

/// A mixed load: fast `sum`s, `echo`s of 70 KiB (sized by the take, then
/// fetched with `GETRANGE`) and delayed `echo`s; each with the reply it must get.
fn mixed_load(n: usize) -> (Vec<String>, Vec<Reply>) {
    let big = "y".repeat(70 << 10);
    (0..n)
        .map(|i| match i % 10 {
            0..=6 => (
                body("sum", json!({"a": i, "b": 1})),
                Reply::Ok(json!(i + 1)),
            ),
            7 | 8 => (
                body("echo", json!({"message": format!("{i}{big}")})),
                Reply::Ok(json!(format!("{i}{big}"))),
            ),
            _ => (
                json!({"func": "echo", "args": {"message": format!("d{i}")},
                       "user": "foo", "source": "web", "delay": 100 + i % 500})
                .to_string(),
                Reply::Ok(json!(format!("d{i}"))),
            ),
        })
        .unzip()
}

/// Checks that each of `ids` got exactly its reply in `want`.
fn assert_each_once(got: &HashMap<u64, Vec<Vec<u8>>>, ids: &[u64], want: &[Reply]) {
    let mut wrong = Vec::new();
    for (id, w) in ids.iter().zip(want) {
        match got.get(id).map(Vec::as_slice) {
            Some([one]) if Reply::from_json(one).ok().as_ref() == Some(w) => {}
            Some(many) => wrong.push((*id, many.len())),
            None => wrong.push((*id, 0)),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} wrong (id, replies): {:?}",
        wrong.len(),
        ids.len(),
        &wrong[..wrong.len().min(20)]
    );
}

/// 11a97b6: `SCRIPT FLUSH` again and again while a mixed load runs (the take,
/// `REPLY` and `SCHEDULE` in the packed pipelines answer `NOSCRIPT`), and every
/// server connection cut twice. Each request gets its one right reply and
/// nothing is left.
#[test]
fn scripts_flushed_and_connections_cut_under_load_lose_and_repeat_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let (bodies, want) = mixed_load(3000);
    let replies = Replies::listen(&redis, "CERBAS");
    let mut ids = Vec::new();
    for (round, chunk) in bodies.chunks(300).enumerate() {
        ids.extend(submit_many(&mut conn, chunk));
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn)
            .expect("SCRIPT FLUSH");
        if round == 3 || round == 7 {
            redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
                .query::<()>(&mut conn)
                .expect("CLIENT KILL");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    replies.wait_all(&ids, Duration::from_secs(60), || server.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    let log = stop(server);
    let got = replies.stop();
    assert_each_once(&got, &ids, &want);
    // The scene was as meant: the publisher's pipeline met `NOSCRIPT`.
    assert!(log.contains("NoScript"), "log:\n{log}");
}

/// 11a97b6: replies of several MiB, in one batch and held for a late
/// subscriber, come whole and once.
#[test]
fn replies_of_several_mib_come_whole_and_once() {
    let redis = Redis::start();
    let config = config_with("max_request_bytes = 16777216");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::start_args(&redis, &["--config", config]);
    let mut conn = redis.conn();
    let sizes = [5 << 20, 2 << 20, 2 << 20, 2 << 20, 10, 3 << 20];
    let messages: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}{}", "z".repeat(*n)))
        .collect();
    let bodies: Vec<String> = messages
        .iter()
        .map(|m| body("echo", json!({"message": m})))
        .collect();
    let want: Vec<Reply> = messages.iter().map(|m| Reply::Ok(json!(m))).collect();
    let replies = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &bodies);
    replies.wait_all(&ids, Duration::from_secs(30), || server.log_text());
    let got = replies.stop();
    assert_each_once(&got, &ids, &want);
    // Held for a late subscriber: 4 MiB published to nobody, heard 1 s later.
    let message = "w".repeat(4 << 20);
    let late = store(
        &mut conn,
        body("echo", json!({"message": message})).as_bytes(),
    );
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(late)
        .query::<()>(&mut conn)
        .expect("RPUSH");
    std::thread::sleep(Duration::from_millis(1000));
    let msg = redis
        .first_message(
            &format!("CERBAS-RESPONSE-1-{late:010}"),
            Duration::from_secs(8),
        )
        .unwrap_or_else(|e| panic!("no late reply ({e}); log:\n{}", server.log_text()));
    assert_eq!(
        Reply::from_json(msg.get_payload_bytes()).expect("JSON"),
        Reply::Ok(json!(message))
    );
    wait_nothing_left(&mut conn, "CERBAS");
    stop(server);
}

/// 4a7e602: a stop (SIGTERM) amid a flood served by 100 workers, Redis stalled
/// for 2 s right after the signal (the drain's replies wait on it): the server
/// exits 0 within its drain, and with a second server every request is answered
/// exactly once, rightly, and nothing is left.
#[test]
fn a_stop_under_load_with_a_stalled_redis_publishes_every_reply_once() {
    let redis = Redis::start();
    let mut first = Server::start(&redis);
    let mut conn = redis.conn();
    let (bodies, want) = mixed_load(8000);
    let replies = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &bodies);
    wait_for("some answered", Duration::from_secs(20), || {
        (replies.answered(&ids) >= 1000).then_some(())
    });
    first.signal(libc::SIGTERM);
    redis.pause();
    std::thread::sleep(Duration::from_millis(2000));
    redis.resume();
    let status = first.wait_exit(Duration::from_secs(30)).expect("exit");
    assert_eq!(status.code(), Some(0), "log:\n{}", first.log_text());
    let by_first = replies.answered(&ids);
    assert!(by_first < ids.len(), "the stop came amid the flood");
    let second = Server::start(&redis);
    replies.wait_all(&ids, Duration::from_secs(60), || second.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    stop(second);
    let got = replies.stop();
    assert_each_once(&got, &ids, &want);
}

/// 11a97b6: writes refused (`MISCONF`) while a mixed load with delayed
/// requests runs, so takes, `REPLY` and `SCHEDULE` calls are refused and
/// retried; writes allowed again after 2 s. Each request gets its one right
/// reply and nothing is left.
#[test]
fn misconf_amid_a_load_with_delays_loses_and_repeats_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let (bodies, want) = mixed_load(2000);
    let replies = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &bodies);
    wait_for("some answered", Duration::from_secs(20), || {
        (replies.answered(&ids) >= 200).then_some(())
    });
    start_misconf(&redis, &mut conn);
    // (Replies are still published meanwhile: only their acks wait.)
    assert!(
        replies.answered(&ids) < ids.len(),
        "writes refused amid the load"
    );
    std::thread::sleep(Duration::from_millis(2000));
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("stop-writes-on-bgsave-error")
        .arg("no")
        .query::<()>(&mut conn)
        .expect("CONFIG SET");
    replies.wait_all(&ids, Duration::from_secs(60), || server.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    stop(server);
    let got = replies.stop();
    assert_each_once(&got, &ids, &want);
}

/// 11a97b6: ids from 0 up to `u64::MAX` (twenty digits, pushed by hand:
/// Redis's counter stops at `i64::MAX`), answered at once and after a `delay`.
#[test]
fn ids_up_to_u64_max_are_answered_once() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let ids = [
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        12_345_678_901,
        0,
        9_999_999_999,
    ];
    let mut want = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let b = if i % 2 == 0 {
            body("echo", json!({"message": i}))
        } else {
            json!({"func": "echo", "args": {"message": i}, "user": "foo",
                   "source": "web", "delay": 300})
            .to_string()
        };
        redis::cmd("SET")
            .arg(format!("CERBAS-REQ-{id:010}"))
            .arg(b)
            .query::<()>(&mut conn)
            .expect("SET");
        want.push(Reply::Ok(json!(i)));
    }
    let replies = push_and_wait(&redis, &server, &mut conn, &ids, Duration::from_secs(20));
    stop(server);
    assert_each_once(&replies.stop(), &ids, &want);
}

/// 96547fe: 600 requests pushed at once, bodies of sizes spread over 0-130 KiB
/// (a deterministic sequence, with sizes at the take's edges), some under the
/// fallback key: takes of every make-up. Each gets its one right reply.
#[test]
fn hundreds_of_bodies_of_spread_sizes_pushed_at_once_are_each_answered_once() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let n = 600u64;
    let last: u64 = redis::cmd("INCRBY")
        .arg("CERBAS-COUNTER")
        .arg(n)
        .query(&mut conn)
        .expect("INCRBY");
    let ids: Vec<u64> = (last + 1 - n..=last).collect();
    let mut want = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for (i, id) in ids.iter().enumerate() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = match i % 7 {
            0 => (64 << 10) - 100 + (seed % 200) as usize,
            1 | 2 => (seed % 2000) as usize,
            _ => (seed % (130 << 10)) as usize,
        };
        let (text, message) = echo_of_len(size);
        let key = if i % 11 == 5 {
            format!("CERBAS-REQUEST-{id:010}")
        } else {
            format!("CERBAS-REQ-{id:010}")
        };
        redis::cmd("SET")
            .arg(key)
            .arg(text)
            .query::<()>(&mut conn)
            .expect("SET");
        want.push(Reply::Ok(json!(message)));
    }
    let replies = push_and_wait(&redis, &server, &mut conn, &ids, Duration::from_secs(30));
    stop(server);
    assert_each_once(&replies.stop(), &ids, &want);
}

/// 96547fe and 11a97b6: Redis stalled for 12 s (past the 10.5 s read timeout)
/// while a load of big and small bodies runs (the take, `GETRANGE`s, `FETCH`
/// and the publisher's pipelines are cut mid-answer), then every connection
/// cut. Each request gets its one right reply and nothing is left.
#[test]
fn a_stall_past_the_read_timeout_amid_a_load_of_big_bodies_loses_and_repeats_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let (bodies, want) = mixed_load(3000);
    let replies = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &bodies);
    wait_for("some answered", Duration::from_secs(20), || {
        (replies.answered(&ids) >= 300).then_some(())
    });
    assert!(
        replies.answered(&ids) < ids.len(),
        "the stall comes amid the load"
    );
    redis.pause();
    std::thread::sleep(Duration::from_secs(12));
    redis.resume();
    redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query::<()>(&mut conn)
        .expect("CLIENT KILL");
    // (The listener, a pubsub client, was not cut.)
    replies.wait_all(&ids, Duration::from_secs(60), || server.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    stop(server);
    assert_each_once(&replies.stop(), &ids, &want);
}

/// 11a97b6: 16 replies published to nobody under prefix `MSGPACK:M` (its
/// msgpack channels start `MSGPACK:MSGPACK:`) and `A*B?[x]`, each subscribed
/// 1-4 s later on its JSON or its msgpack channel, with Redis holding few
/// channels (one `PUBSUB CHANNELS` with the prefix escaped) and 2,000 (`PUBSUB
/// NUMSUB` naming both channels): each subscriber gets its reply.
#[test]
fn late_subscribers_under_odd_prefixes_get_their_replies_by_either_look() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    for (prefix, many_channels) in [
        ("MSGPACK:M", false),
        ("MSGPACK:M", true),
        ("A*B?[x]", false),
        ("A*B?[x]", true),
    ] {
        let _neighbour = many_channels.then(|| neighbour_with_2000_channels(&redis));
        let server = server_with(&redis, &prefixed_config(prefix), prefix, &[]);
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut conn)
            .expect("CONFIG RESETSTAT");
        let bodies: Vec<String> = (0..16)
            .map(|i| body("echo", json!({"message": i})))
            .collect();
        let ids = push_under(&mut conn, prefix, &bodies);
        let pushed = Instant::now();
        let waiters: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let url = redis.url_db(1);
                let msgpack = i % 2 == 1;
                let channel = format!(
                    "{}{prefix}-RESPONSE-1-{id:010}",
                    if msgpack { "MSGPACK:" } else { "" }
                );
                let after = Duration::from_millis(1000 + 200 * i as u64);
                std::thread::spawn(move || {
                    let mut c = redis::Client::open(url.as_str())
                        .and_then(|c| c.get_connection())
                        .expect("subscriber connection");
                    std::thread::sleep((pushed + after).saturating_duration_since(Instant::now()));
                    let mut ps = c.as_pubsub();
                    ps.subscribe(&channel).expect("SUBSCRIBE");
                    ps.set_read_timeout(Some(Duration::from_secs(8)))
                        .expect("timeout");
                    let got = ps.get_message().ok().map(|m| {
                        let b = m.get_payload_bytes();
                        if msgpack {
                            Reply::from_msgpack(b)
                        } else {
                            Reply::from_json(b)
                        }
                        .expect("a reply")
                    });
                    (i, got)
                })
            })
            .collect();
        for w in waiters {
            let (i, got) = w.join().expect("subscriber");
            assert_eq!(
                got,
                Some(Reply::Ok(json!(i))),
                "{prefix}, {many_channels}: subscriber {i}; log:\n{}",
                server.log_text()
            );
        }
        // The scene was as meant: the looks were of the kind named.
        let (by_name, all) = (
            calls_of(&mut conn, "pubsub|numsub"),
            calls_of(&mut conn, "pubsub|channels"),
        );
        assert!(
            if many_channels { by_name > 0 } else { all > 0 },
            "{prefix}, {many_channels}: {by_name} NUMSUB, {all} CHANNELS"
        );
        wait_nothing_left(&mut conn, prefix);
        let _ = stop(server);
    }
}

/// The server's resident memory now, in KiB.
fn vm_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS")
}

/// 11a97b6 kept the publisher's packed pipeline between batches: one reply of
/// 40 MiB pinned 80 MiB more (its JSON and msgpack forms, in a buffer that
/// never shrank) for the life of the process (measured: 157 MiB resident after
/// the reply, 50-75 MiB with the buffer freed). The rest was the reader's
/// connection: redis-rs keeps its read buffer at the largest body's size, so
/// the reader replaces a connection that read a body over 4 MiB. Once the
/// reply is out, the server holds less than the reply's size.
#[test]
fn a_large_reply_leaves_no_large_buffer_behind() {
    let redis = Redis::start();
    let config = config_with("max_request_bytes = 67108864");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::start_args(&redis, &["--config", config]);
    let message = "q".repeat(40 << 20);
    let replies = Replies::listen(&redis, "CERBAS");
    let mut conn = redis.conn();
    let ids = submit_many(&mut conn, &[body("echo", json!({"message": message}))]);
    replies.wait_all(&ids, Duration::from_secs(30), || server.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    let got = replies.stop();
    assert_each_once(&got, &ids, &[Reply::Ok(json!(message))]);
    drop(message);
    // Freed within a few seconds of the reply, or never.
    let deadline = Instant::now() + Duration::from_secs(5);
    let rss = loop {
        let rss = vm_rss_kib(server.pid());
        if rss < 30 << 10 || Instant::now() >= deadline {
            break rss;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("resident after a 40 MiB reply: {} MiB", rss >> 10);
    assert!(rss < 30 << 10, "{} MiB resident", rss >> 10);
    let _ = stop(server);
}

/// The reader replaces its connection after each body over 4 MiB: bodies of
/// 5 MiB among small requests, taken in the same batches, are each answered
/// once, and nothing is left in Redis (the check of the processing list after
/// each reconnect takes nothing twice).
#[test]
fn large_bodies_among_small_ones_are_each_answered_once_across_reconnects() {
    large_bodies_answered_once(|_| {});
}

/// As above, with Redis stopped (SIGSTOP) for 2 s, then every connection of
/// the server cut (`CLIENT KILL TYPE normal`), while the large bodies are
/// being served: the reconnects the large bodies ask for and those the faults
/// force take nothing twice.
#[test]
fn large_bodies_are_each_answered_once_through_a_stall_and_cut_connections() {
    large_bodies_answered_once(|redis| {
        redis.pause();
        std::thread::sleep(Duration::from_secs(2));
        redis.resume();
        let _: redis::Value = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal"])
            .query(&mut redis.conn())
            .expect("CLIENT KILL");
    });
}

/// 60 requests, every tenth a 5 MiB echo, the rest `sum`s; `meanwhile` runs
/// once a few are answered.
fn large_bodies_answered_once(meanwhile: impl FnOnce(&Redis)) {
    let redis = Redis::start();
    let config = config_with("max_request_bytes = 16777216");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::start_args(&redis, &["--config", config]);
    let large = "L".repeat(5 << 20);
    let mut bodies = Vec::new();
    let mut want = Vec::new();
    for i in 0..60 {
        if i % 10 == 3 {
            bodies.push(body("echo", json!({ "message": large })));
            want.push(Reply::Ok(json!(large)));
        } else {
            bodies.push(body("sum", json!({"a": i, "b": 1})));
            want.push(Reply::Ok(json!(i + 1)));
        }
    }
    let replies = Replies::listen(&redis, "CERBAS");
    let mut conn = redis.conn();
    let connections = |c: &mut redis::Connection| -> u64 {
        let n = info_field(c, "stats", "total_connections_received");
        n.parse().expect("a count")
    };
    let before = connections(&mut conn);
    let ids = submit_many(&mut conn, &bodies);
    wait_for("a few answered", Duration::from_secs(20), || {
        (replies.answered(&ids) >= 5).then_some(())
    });
    meanwhile(&redis);
    // `meanwhile` may have cut this connection too.
    let mut conn = redis.conn();
    replies.wait_all(&ids, Duration::from_secs(30), || server.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    assert!(
        connections(&mut conn) > before,
        "the reader kept the connection that read the large bodies"
    );
    let got = replies.stop();
    assert_each_once(&got, &ids, &want);
    let _ = stop(server);
}

/// 4a7e602: 400 workers, most of them in short `sleep` calls when the stop
/// (SIGTERM) comes, and Redis made slow meanwhile (stopped 100 ms of every
/// 200 ms for 3 s): the drain publishes what it finished once, returns the
/// rest, and a second server answers it. Every request exactly once, rightly.
#[test]
fn a_stop_of_400_busy_workers_on_a_slow_redis_loses_and_repeats_nothing() {
    let redis = Redis::start();
    let mut first = Server::start_args(&redis, &["--workers", "400"]);
    let mut conn = redis.conn();
    // Each request of the mixed load, then a `sleep`.
    let (load, load_replies) = mixed_load(3000);
    let mut bodies = Vec::new();
    let mut want = Vec::new();
    for (i, (b, w)) in load.into_iter().zip(load_replies).enumerate() {
        bodies.push(b);
        want.push(w);
        bodies.push(body("sleep", json!({"ms": 20 + i % 40})));
        want.push(Reply::Ok(json!(20 + i % 40)));
    }
    let replies = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &bodies);
    wait_for("some answered", Duration::from_secs(20), || {
        (replies.answered(&ids) >= 1000).then_some(())
    });
    first.signal(libc::SIGTERM);
    let slow_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < slow_until {
        redis.pause();
        std::thread::sleep(Duration::from_millis(100));
        redis.resume();
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = first.wait_exit(Duration::from_secs(30)).expect("exit");
    assert_eq!(status.code(), Some(0), "log:\n{}", first.log_text());
    assert!(
        replies.answered(&ids) < ids.len(),
        "the stop came amid the load"
    );
    let second = Server::start(&redis);
    replies.wait_all(&ids, Duration::from_secs(60), || second.log_text());
    wait_nothing_left(&mut conn, "CERBAS");
    let _ = stop(second);
    assert_each_once(&replies.stop(), &ids, &want);
}
