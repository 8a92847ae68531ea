//! Hardening of the intake side (issue 7, items 6, 7, 8, 11a, 11c, 12): how requests
//! get from the queue into an instance, and how its Redis connections behave
//! under faults. Each test makes its fault itself (a second instance with idle
//! workers, a redis-server restart, `MISCONF`, wrong-typed keys, a duplicated
//! queue entry and a broken connection, a recovery from under a live instance, a
//! 200 MB body) against a real redis-server and real
//! `cerbas` processes, and measures the behaviour the issue names.
//! Not for: replies, acks and republishing (the publisher's side of issue 7).

mod common;

use cerbas::Reply;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn body(func: &str, args: Value) -> Vec<u8> {
    json!({"func": func, "args": args, "user": "foo", "source": "web"})
        .to_string()
        .into_bytes()
}

fn push(conn: &mut redis::Connection, ids: &[u64]) {
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(ids)
        .query::<()>(conn)
        .expect("RPUSH");
}

/// Subscribes to the JSON reply channels of `ids`, runs `queue` (which pushes
/// them), then collects one reply per id and when it came, until all came or
/// `timeout` passed. (A `PubSub` unsubscribes when dropped, so it lives here.)
fn replies(
    redis: &Redis,
    ids: &[u64],
    queue: impl FnOnce(),
    timeout: Duration,
) -> HashMap<u64, (Reply, Instant)> {
    let mut conn = redis.conn();
    let mut ps = conn.as_pubsub();
    for id in ids {
        ps.subscribe(format!("CERBAS-RESPONSE-1-{id:010}"))
            .expect("SUBSCRIBE");
    }
    queue();
    let deadline = Instant::now() + timeout;
    let mut got = HashMap::new();
    while got.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        ps.set_read_timeout(Some(left)).expect("read timeout");
        let Ok(msg) = ps.get_message() else { break };
        let reply = Reply::from_json(msg.get_payload_bytes()).expect("a JSON reply");
        let id = msg
            .get_channel_name()
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("an id in the channel name");
        got.entry(id).or_insert((reply, Instant::now()));
    }
    got
}

fn instances(conn: &mut redis::Connection) -> Vec<String> {
    redis::cmd("SMEMBERS")
        .arg("CERBAS-INSTANCES")
        .query(conn)
        .expect("SMEMBERS")
}

fn connections_received(conn: &mut redis::Connection) -> i64 {
    info_field(conn, "stats", "total_connections_received")
        .parse()
        .expect("total_connections_received")
}

/// Log lines in `log` after its first `from` bytes that say something about Redis.
fn redis_log_lines(log: &str, from: usize) -> Vec<String> {
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.to_lowercase().contains("redis"))
        .map(str::to_string)
        .collect()
}

fn assert_serves_hello(redis: &Redis, server: &Server) {
    let reply = wait_for("hello served again", Duration::from_secs(20), || {
        redis
            .client()
            .timeout(Duration::from_secs(5))
            .request("hello", json!({}))
            .ok()
    });
    assert_eq!(
        reply,
        Reply::Ok("hello world!".into()),
        "log:\n{}",
        server.log_text()
    );
}

/// Item 6: an instance whose only worker is busy takes nothing; an idle instance
/// serves everything at once.
#[test]
fn a_saturated_instance_leaves_requests_to_idle_ones() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    let config = config_with("workers = 1\n[functions.sleep]\ntimeout_ms = 60000\n");
    let config = config.to_str().expect("utf-8 path");
    let busy = Server::spawn(
        &redis,
        &["--config", config],
        &[("RUST_LOG", "cerbas=debug")],
    );
    busy.wait_ready(&redis);
    // Its one worker sleeps 10 s.
    let sleeper = store(&mut conn, &body("sleep", json!({"ms": 10_000})));
    push(&mut conn, &[sleeper]);
    busy.wait_log("sleep from user", 1);
    let idle = Server::spawn(&redis, &["--workers", "4"], &[]);
    idle.wait_log("ready: taking requests", 1);
    wait_for("both instances registered", Duration::from_secs(20), || {
        (instances(&mut conn).len() == 2).then_some(())
    });

    let ids: Vec<u64> = (0..6)
        .map(|_| store(&mut conn, &body("hello", json!({}))))
        .collect();
    let mut pushed = Instant::now();
    let got = replies(
        &redis,
        &ids,
        || {
            pushed = Instant::now();
            push(&mut conn, &ids);
        },
        Duration::from_secs(20),
    );
    let slowest = got
        .values()
        .map(|(_, at)| at.duration_since(pushed))
        .max()
        .unwrap_or_default();
    println!(
        "{} of 6 answered; slowest after {:.2}s",
        got.len(),
        slowest.as_secs_f64()
    );
    assert_eq!(got.len(), 6, "every hello answered");
    assert!(
        got.values()
            .all(|(r, _)| *r == Reply::Ok("hello world!".into())),
        "{got:?}"
    );
    // The busy instance's worker is asleep for 10 s: a hello it took waits that long.
    assert!(
        slowest < Duration::from_secs(3),
        "slowest hello took {slowest:?}; busy log:\n{}",
        busy.log_text()
    );
}

/// Item 7: after a redis-server restart, the connections pooled for functions are
/// replaced before a function gets one.
#[test]
fn pooled_connections_are_replaced_after_a_redis_restart() {
    let mut redis = Redis::start();
    let server = Server::start(&redis);
    // Sequential calls reuse one pooled connection (an open one is lent before a
    // new one is opened); each call after the restart must find it replaced.
    let pool = 8;
    let c = redis.client();
    for i in 0..pool {
        let r = c.request("tally", json!({"name": format!("warm{i}")}));
        assert_eq!(r.expect("a reply"), Reply::Ok(json!(1)));
    }
    drop(c);
    redis.restart(Duration::from_millis(200));
    let c = redis.client();
    let mut failed = Vec::new();
    for i in 0..pool {
        match c.request("tally", json!({"name": format!("after{i}")})) {
            Ok(Reply::Ok(_)) => {}
            other => failed.push(format!("{other:?}")),
        }
    }
    println!("{} of {pool} tally calls failed: {failed:?}", failed.len());
    assert!(
        failed.is_empty(),
        "calls failed after the restart: {failed:?}; log:\n{}",
        server.log_text()
    );
}

/// Holds a fault for `hold` and returns how many connections the server opened
/// and which Redis log lines it wrote meanwhile.
fn churn_during(
    conn: &mut redis::Connection,
    server: &Server,
    hold: Duration,
) -> (i64, Vec<String>) {
    let from = server.log_text().len();
    let before = connections_received(conn);
    std::thread::sleep(hold);
    let opened = connections_received(conn) - before;
    (opened, redis_log_lines(&server.log_text(), from))
}

/// Item 8: while Redis refuses writes (`MISCONF`), the server keeps its
/// connections and logs the condition once, not once per retry.
#[test]
fn misconf_keeps_the_connections_and_logs_once() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    start_misconf(&redis, &mut conn);
    let (opened, lines) = churn_during(&mut conn, &server, Duration::from_secs(5));
    println!(
        "MISCONF for 5 s: {opened} connections opened, {} log lines: {lines:#?}",
        lines.len()
    );
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("stop-writes-on-bgsave-error")
        .arg("no")
        .query::<()>(&mut conn)
        .expect("CONFIG SET");
    assert_serves_hello(&redis, &server);
    // And one line when it ends, per thread that saw it.
    server.wait_log("accepts commands again", 1);
    assert!(opened <= 3, "{opened} connections opened under MISCONF");
    assert!(lines.len() <= 4, "{} log lines: {lines:#?}", lines.len());
}

/// Item 8: any client can SET the queue, the delayed set or the instance set to a
/// string; the server waits it out without reconnecting or flooding its log, and
/// serves again once the keys are fixed.
#[test]
fn wrong_typed_keys_cause_no_reconnects() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    for key in ["CERBAS-QUEUE", "CERBAS-DELAYED", "CERBAS-INSTANCES"] {
        redis::cmd("SET")
            .arg(key)
            .arg("oops")
            .query::<()>(&mut conn)
            .expect("SET");
    }
    let (opened, lines) = churn_during(&mut conn, &server, Duration::from_secs(5));
    println!(
        "wrong-typed keys for 5 s: {opened} connections opened, {} log lines: {lines:#?}",
        lines.len()
    );
    redis::cmd("DEL")
        .arg(&["CERBAS-QUEUE", "CERBAS-DELAYED", "CERBAS-INSTANCES"])
        .query::<()>(&mut conn)
        .expect("DEL");
    assert_serves_hello(&redis, &server);
    assert!(opened <= 3, "{opened} connections opened");
    // One line when each thread's condition starts (reader, scheduler) is fine.
    assert!(lines.len() <= 6, "{} log lines: {lines:#?}", lines.len());
}

/// Item 8: under `maxmemory` with no eviction, Redis refuses the heartbeat's SET
/// and the reader's moves; the server waits it out on the same connections.
#[test]
fn out_of_memory_refusals_cause_no_reconnects() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query::<()>(&mut conn)
        .expect("CONFIG SET maxmemory");
    let (opened, lines) = churn_during(&mut conn, &server, Duration::from_secs(4));
    println!(
        "OOM for 4 s: {opened} connections opened, {} log lines: {lines:#?}",
        lines.len()
    );
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query::<()>(&mut conn)
        .expect("CONFIG SET maxmemory");
    assert_serves_hello(&redis, &server);
    assert!(opened <= 3, "{opened} connections opened under OOM");
    assert!(lines.len() <= 6, "{} log lines: {lines:#?}", lines.len());
}

/// Item 11a: a duplicated queue entry is taken a second time while the first take
/// still runs; the first take's ack must not make the second look lost to the
/// reader, or a reconnect serves it once more (here: a `request not found` reply,
/// as the ack deleted the body).
#[test]
fn an_ack_does_not_hide_a_second_take_of_the_same_id() {
    let redis = Redis::start();
    let server = Server::spawn(&redis, &[], &[("RUST_LOG", "cerbas=debug")]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let name = wait_for("the instance registered", Duration::from_secs(20), || {
        instances(&mut conn).pop()
    });
    let processing = format!("CERBAS-PROCESSING-{name}");
    let held = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("LLEN")
            .arg(&processing)
            .query(conn)
            .expect("LLEN")
    };
    let id = store(&mut conn, &body("sleep", json!({"ms": 1000})));
    let mut sub_conn = redis.conn();
    let mut ps = sub_conn.as_pubsub();
    ps.subscribe(format!("CERBAS-RESPONSE-1-{id:010}"))
        .expect("SUBSCRIBE");
    push(&mut conn, &[id]);
    // Its body was read once its call starts.
    server.wait_log("sleep from user", 1);
    // The same id again, read with a longer sleep: it still runs when the first
    // take's ack lands.
    redis::cmd("SET")
        .arg(format!("CERBAS-REQ-{id:010}"))
        .arg(body("sleep", json!({"ms": 4000})))
        .query::<()>(&mut conn)
        .expect("SET");
    push(&mut conn, &[id]);
    wait_for("the second take", Duration::from_secs(20), || {
        (held(&mut conn) == 2).then_some(())
    });
    let mut messages = Vec::new();
    let next = |ps: &mut redis::PubSub, timeout: Duration| -> Option<Reply> {
        ps.set_read_timeout(Some(timeout)).expect("read timeout");
        let msg = ps.get_message().ok()?;
        Some(Reply::from_json(msg.get_payload_bytes()).expect("a JSON reply"))
    };
    messages.extend(next(&mut ps, Duration::from_secs(20)));
    assert_eq!(
        messages,
        vec![Reply::Ok(json!(1000))],
        "the first take's reply"
    );
    wait_for("the first ack", Duration::from_secs(20), || {
        (held(&mut conn) == 1).then_some(())
    });
    // Every server connection breaks: the reader compares its list with InHand.
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query::<()>(&mut conn)
        .expect("CLIENT KILL");
    while let Some(reply) = next(&mut ps, Duration::from_secs(20)) {
        let last = reply == Reply::Ok(json!(4000));
        messages.push(reply);
        if last {
            break;
        }
    }
    println!("replies on the channel: {messages:?}");
    assert_eq!(
        messages,
        vec![Reply::Ok(json!(1000)), Reply::Ok(json!(4000))],
        "each take served once; log:\n{}",
        server.log_text()
    );
}

/// KEYS: instances, processing. ARGV: instance. Whether the instance is registered
/// and how many ids its processing list holds, read atomically.
const REGISTERED_AND_HELD: &str = r"
return {redis.call('SISMEMBER', KEYS[1], ARGV[1]), redis.call('LLEN', KEYS[2])}
";

/// Item 11c: another instance recovers a live one (its heartbeat had lapsed). The
/// live one must not take requests into its processing list before it has
/// registered again, or a crash would leave them where nobody recovers them.
#[test]
fn a_recovered_instance_takes_nothing_until_it_is_registered_again() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let name = wait_for("the instance registered", Duration::from_secs(20), || {
        instances(&mut conn).pop()
    });
    let heartbeat = format!("CERBAS-HEARTBEAT-{name}");
    let processing = format!("CERBAS-PROCESSING-{name}");
    let check = redis::Script::new(REGISTERED_AND_HELD);
    let mut unregistered_holding = 0;
    let mut rounds = 0;
    for round in 0..3 {
        let ids: Vec<u64> = (0..3)
            .map(|_| store(&mut conn, &body("sleep", json!({"ms": 300}))))
            .collect();
        let queue = || {
            // What the scheduler's RECOVER does for a dead instance, done the
            // moment after this one's heartbeat was renewed, with requests waiting.
            wait_for("a fresh heartbeat", Duration::from_secs(20), || {
                let ttl: i64 = redis::cmd("PTTL").arg(&heartbeat).query(&mut conn).ok()?;
                (ttl > 4_900).then_some(())
            });
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&heartbeat)
                .cmd("SREM")
                .arg("CERBAS-INSTANCES")
                .arg(&name)
                .cmd("RPUSH")
                .arg("CERBAS-QUEUE")
                .arg(&ids)
                .query::<()>(&mut conn)
                .expect("recover");
            let until = Instant::now() + Duration::from_millis(1_500);
            while Instant::now() < until {
                let (member, held): (i64, i64) = check
                    .key("CERBAS-INSTANCES")
                    .key(&processing)
                    .arg(&name)
                    .invoke(&mut conn)
                    .expect("check");
                if member == 0 && held > 0 {
                    unregistered_holding += 1;
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let got = replies(&redis, &ids, queue, Duration::from_secs(20));
        assert_eq!(got.len(), ids.len(), "round {round}: every request served");
    }
    println!(
        "{unregistered_holding} of {rounds} checks saw requests held by an unregistered instance"
    );
    assert_eq!(
        unregistered_holding,
        0,
        "requests were taken while unregistered; log:\n{}",
        server.log_text()
    );
}

/// Item 11c, end to end: an instance stopped (`SIGSTOP`) past its heartbeat's
/// life while requests flow is recovered by the other; resumed, it registers
/// again before taking, and when it then crashes, what it held is recovered too:
/// every request is served, and no processing list is left to an instance that
/// is not registered.
#[test]
fn a_stalled_instance_resumes_and_crashes_without_losing_requests() {
    let redis = Redis::start();
    let mut stalled = Server::start(&redis);
    let mut conn = redis.conn();
    let name = wait_for(
        "the first instance registered",
        Duration::from_secs(20),
        || instances(&mut conn).pop(),
    );
    let processing = format!("CERBAS-PROCESSING-{name}");
    let other = Server::start(&redis);
    let check = redis::Script::new(REGISTERED_AND_HELD);
    let mut names = Vec::new();
    let mut unregistered_holding = 0;
    let started = Instant::now();
    let mut phase = 0;
    // Tally requests every few ms for 9 s: stop the first instance at 1 s, resume
    // it at 8 s (its heartbeat expired at 6 s; the other recovered it by 7 s).
    while started.elapsed() < Duration::from_secs(9) {
        let at = started.elapsed();
        if phase == 0 && at >= Duration::from_secs(1) {
            stalled.signal(libc::SIGSTOP);
            phase = 1;
        } else if phase == 1 && at >= Duration::from_secs(8) {
            stalled.signal(libc::SIGCONT);
            phase = 2;
        }
        let n = format!("stall-{}", names.len());
        let id = store(&mut conn, &body("tally", json!({"name": n})));
        push(&mut conn, &[id]);
        names.push(n);
        let (member, held): (i64, i64) = check
            .key("CERBAS-INSTANCES")
            .key(&processing)
            .arg(&name)
            .invoke(&mut conn)
            .expect("check");
        if member == 0 && held > 0 {
            unregistered_holding += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // A crash right after it resumed: the other instance recovers what it holds.
    stalled.kill();
    let keys: Vec<String> = names.iter().map(|n| format!("CERBAS-TALLY-{n}")).collect();
    let counts = wait_for("every request served", Duration::from_secs(30), || {
        let counts: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys).query(&mut conn).ok()?;
        counts.iter().all(Option::is_some).then_some(counts)
    });
    let twice = counts.iter().filter(|c| **c > Some(1)).count();
    // What it ran but had not acked when killed stays in its list until its
    // heartbeat expires (5 s) and the other instance recovers it.
    let left = wait_for(
        "the crashed instance's list recovered",
        Duration::from_secs(30),
        || {
            let left: i64 = redis::cmd("LLEN").arg(&processing).query(&mut conn).ok()?;
            (left == 0).then_some(left)
        },
    );
    println!(
        "{} requests, all served ({twice} twice, as the recovery allows); {unregistered_holding} \
         checks saw requests held while unregistered; {left} left in the crashed list",
        names.len()
    );
    assert_eq!(unregistered_holding, 0, "log:\n{}", stalled.log_text());
    assert_eq!(left, 0, "the crashed instance's list was recovered");
    drop(other);
}

/// Item 12: a body far over `max_request_bytes` is refused from its size alone,
/// without bringing it into the server's memory.
#[test]
fn an_oversized_request_is_refused_without_fetching_it() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let size = 200 << 20;
    let mut big = br#"{"func":"echo","user":"foo","source":"web","args":{"message":""#.to_vec();
    big.resize(size - 3, b'x');
    big.extend_from_slice(br#""}}"#);
    let id = store(&mut conn, &big);
    drop(big);
    let small = store(&mut conn, &body("hello", json!({})));
    let got = replies(
        &redis,
        &[id, small],
        || push(&mut conn, &[id, small]),
        Duration::from_secs(30),
    );
    let hwm = vm_hwm_kib(server.pid());
    println!("200 MB body: server VmHWM {} KiB", hwm);
    let (reply, _) = got.get(&id).expect("a reply to the big request");
    assert_eq!(
        *reply,
        Reply::Error(format!(
            "request too large: {size} bytes (limit {})",
            1 << 20
        ))
    );
    let (reply, _) = got.get(&small).expect("a reply to the small request");
    assert_eq!(*reply, Reply::Ok("hello world!".into()));
    assert!(hwm < 32 << 10, "server VmHWM {hwm} KiB");
}

/// The second request of [`change_after_the_take`], as a rule.
fn small() -> Vec<u8> {
    body("echo", json!({"message": "small"}))
}

/// A message as long as the bodies a take reads in all (`reader::TAKE_BYTES`): a first request echoing it leaves the take no room
/// for the second body, which it then only sizes.
fn filling() -> String {
    "x".repeat(64 << 10)
}

/// Runs two requests the server takes at once (it reads the first body in the
/// take, which fills what it reads, and only sizes the second), runs `change` on
/// the second's key exactly when the server is about to read it (a relay
/// between the server and Redis holds that command), and returns the second's
/// reply and how many bytes came from Redis after the change. Stops the server and checks that it served
/// three requests (its `hello` at the start and these two), each once.
fn change_after_the_take(
    second_body: &[u8],
    change: impl FnOnce(&mut redis::Connection, &str),
) -> (Reply, u64) {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let url = relay.url();
    let mut server = Server::start_args(&redis, &["--redis", &url]);
    let mut conn = redis.conn();
    let first = store(&mut conn, &body("echo", json!({"message": filling()})));
    let second = store(&mut conn, second_body);
    let key = format!("CERBAS-REQ-{second:010}");
    // The first command naming the second body's key reads it after the take.
    let held = relay.hold(key.as_bytes());
    let mut downloaded = 0;
    let got = replies(
        &redis,
        &[first, second],
        || {
            // One push: the take finds both.
            push(&mut conn, &[first, second]);
            held.recv_timeout(Duration::from_secs(10))
                .expect("the server reading the second body");
            change(&mut conn, &key);
            downloaded = relay.from_redis.load(std::sync::atomic::Ordering::SeqCst);
            relay.release();
        },
        Duration::from_secs(20),
    );
    let after = relay.from_redis.load(std::sync::atomic::Ordering::SeqCst) - downloaded;
    let (reply, _) = got.get(&first).expect("a reply to the first request");
    assert_eq!(*reply, Reply::Ok(filling().into()));
    let (reply, _) = got
        .get(&second)
        .unwrap_or_else(|| panic!("a reply to the second request; log:\n{}", server.log_text()));
    wait_for("both acked", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(15)).is_some(),
        "stopped"
    );
    let log = server.log_text();
    assert!(log.contains("stopped: 3 requests"), "log:\n{log}");
    (reply.clone(), after)
}

/// Attack on the take of e494597: the take sizes the bodies after the first,
/// and a later round trip fetches them (`MGET` did). A client that overwrote
/// such a body with a huge value in between made the server download all of it
/// (64 MiB here) before refusing it as too large: memory bounded by nothing but
/// Redis's 512 MB per value. It must still be refused, and what comes back from
/// Redis stay near `max_request_bytes`.
#[test]
fn a_body_overwritten_after_the_take_is_not_downloaded_whole() {
    let size = 64 << 20;
    let (reply, after) = change_after_the_take(&small(), |conn, key| {
        redis::cmd("SET")
            .arg(key)
            .arg(vec![b'x'; size])
            .query::<()>(conn)
            .expect("SET");
    });
    println!("after the overwrite: {after} bytes from Redis");
    assert_eq!(
        reply,
        Reply::Error(format!(
            "request too large: {size} bytes (limit {})",
            1 << 20
        ))
    );
    assert!(
        after < 4 << 20,
        "{after} bytes came from Redis after the overwrite"
    );
}

/// The other changes between the take and the read: each gets the answer it
/// would have had at the take.
#[test]
fn a_body_changed_after_the_take_gets_the_answer_of_what_is_there() {
    let (reply, _) = change_after_the_take(&small(), |conn, key| {
        redis::cmd("DEL").arg(key).query::<()>(conn).expect("DEL");
    });
    assert!(
        matches!(&reply, Reply::Error(e) if e.starts_with("request not found: CERBAS-REQ-")),
        "{reply:?}"
    );
    let (reply, _) = change_after_the_take(&small(), |conn, key| {
        redis::pipe()
            .cmd("DEL")
            .arg(key)
            .cmd("RPUSH")
            .arg(key)
            .arg("x")
            .query::<()>(conn)
            .expect("retype");
    });
    assert!(
        matches!(&reply, Reply::Error(e) if e.contains("cannot be read")),
        "{reply:?}"
    );
    let (reply, _) = change_after_the_take(&small(), |conn, key| {
        redis::cmd("SET")
            .arg(key)
            .arg(body(
                "echo",
                json!({"message": "a longer message than before"}),
            ))
            .query::<()>(conn)
            .expect("SET");
    });
    assert_eq!(reply, Reply::Ok("a longer message than before".into()));
    // An empty body deleted: its read answers as that of a missing key.
    let (reply, _) = change_after_the_take(b"", |conn, key| {
        redis::cmd("DEL").arg(key).query::<()>(conn).expect("DEL");
    });
    assert!(
        matches!(&reply, Reply::Error(e) if e.starts_with("request not found: CERBAS-REQ-")),
        "{reply:?}"
    );
}

/// Every connection of the server is cut between the take and the read of the
/// second body: the reader finds the second id in its processing list after it
/// reconnects and serves it, once (the first, handed over, is served once too).
#[test]
fn a_connection_cut_between_the_take_and_the_read_loses_and_repeats_nothing() {
    let (reply, _) = change_after_the_take(&small(), |conn, _| {
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query::<()>(conn)
            .expect("CLIENT KILL");
    });
    assert_eq!(reply, Reply::Ok("small".into()));
}

/// What a stopped server's last line says it served.
fn served(s: &Server) -> usize {
    let log = s.log_text();
    log.split("stopped: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("the stop's count; log:\n{log}"))
}

/// `n` requests of `sum`.
fn sums(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            json!({"func": "sum", "args": {"a": i, "b": 1}, "user": "foo", "source": "web"})
                .to_string()
        })
        .collect()
}

/// Attack on the take of e494597 under load: two instances share a queue of
/// fast requests (so both take ahead, and take many a round trip) while every
/// connection of the servers is cut three times and Redis is stalled twice.
/// Every request is answered exactly once and nothing is left in Redis.
#[test]
fn cut_connections_and_stalls_under_load_lose_and_repeat_nothing() {
    let redis = Redis::start();
    let mut servers = [Server::start(&redis), Server::start(&redis)];
    let mut conn = redis.conn();
    let n = 6000;
    let heard = Replies::listen(&redis, "CERBAS");
    let kill = |conn: &mut redis::Connection| {
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query::<()>(conn)
            .expect("CLIENT KILL");
    };
    let mut ids = Vec::new();
    for (round, chunk) in sums(n).chunks(n / 6).enumerate() {
        ids.extend(submit_many(&mut conn, chunk));
        match round {
            1 | 3 | 5 => kill(&mut conn),
            2 | 4 => {
                redis.pause();
                std::thread::sleep(Duration::from_millis(1500));
                redis.resume();
            }
            _ => {}
        }
    }
    wait_for("every request answered", Duration::from_secs(60), || {
        (heard.answered(&ids) == ids.len()).then_some(())
    });
    wait_for("nothing left in Redis", Duration::from_secs(20), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    // Once both have stopped, nothing more is published.
    for s in &mut servers {
        s.signal(libc::SIGTERM);
        assert!(s.wait_exit(Duration::from_secs(20)).is_some(), "stopped");
    }
    let twice = repeated(&heard.stop(), &ids);
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    // Each server counts what it served: with the two `hello`s of the start,
    // every request once.
    assert_eq!(servers.iter().map(served).sum::<usize>(), n + 2);
}

/// A graceful stop in the middle of a flood of fast requests (the reader takes
/// ahead, and may be waiting to hand a job over when the stop comes): what was
/// taken is either served before the exit or returned to the queue, and a
/// second instance serves the rest. Every request once.
#[test]
fn a_stop_amid_a_flood_returns_or_serves_what_was_taken_ahead() {
    let redis = Redis::start();
    let mut first = Server::start_args(&redis, &["--workers", "4"]);
    let mut conn = redis.conn();
    let n = 20_000;
    let heard = Replies::listen(&redis, "CERBAS");
    let ids = submit_many(&mut conn, &sums(n));
    wait_for("a few answered", Duration::from_secs(20), || {
        (heard.answered(&ids) >= 500).then_some(())
    });
    first.signal(libc::SIGTERM);
    assert!(
        first.wait_exit(Duration::from_secs(20)).is_some(),
        "stopped"
    );
    let by_first = heard.answered(&ids);
    let mut second = Server::start(&redis);
    wait_for("every request answered", Duration::from_secs(60), || {
        (heard.answered(&ids) == ids.len()).then_some(())
    });
    wait_for("nothing left in Redis", Duration::from_secs(20), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    second.signal(libc::SIGTERM);
    assert!(
        second.wait_exit(Duration::from_secs(20)).is_some(),
        "stopped"
    );
    let twice = repeated(&heard.stop(), &ids);
    println!("the first served {by_first} of {n} before its stop");
    assert!(by_first < n, "the stop came amid the flood");
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    assert_eq!(served(&first) + served(&second), n + 2);
}

/// One take of a batch that mixes what the take answers differently: queue
/// entries that are no ids (first and in the middle, so no body is read in the
/// script), bodies under the fallback key `CERBAS-REQUEST-…` (good, too large,
/// wrong-typed), a missing body and a good one. Each id gets its answer, the
/// bad entries are dropped and the processing list ends empty.
#[test]
fn a_mixed_batch_with_fallback_keys_and_bad_entries_gets_every_answer() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let next_id = |conn: &mut redis::Connection| -> u64 {
        redis::cmd("INCR")
            .arg("CERBAS-COUNTER")
            .query(conn)
            .expect("INCR")
    };
    let fallback_good = next_id(&mut conn);
    let fallback_big = next_id(&mut conn);
    let fallback_list = next_id(&mut conn);
    let missing = next_id(&mut conn);
    let fallback = |id: u64| format!("CERBAS-REQUEST-{id:010}");
    let mut big = body("echo", json!({"message": ""}));
    big.resize(2 << 20, b' ');
    redis::pipe()
        .cmd("SET")
        .arg(fallback(fallback_good))
        .arg(body("echo", json!({"message": "fallback"})))
        .cmd("SET")
        .arg(fallback(fallback_big))
        .arg(big)
        .cmd("RPUSH")
        .arg(fallback(fallback_list))
        .arg("x")
        .query::<()>(&mut conn)
        .expect("fallback keys");
    let good = store(&mut conn, &body("echo", json!({"message": "good"})));
    let ids = [fallback_good, fallback_big, fallback_list, missing, good];
    let got = replies(
        &redis,
        &ids,
        || {
            redis::cmd("RPUSH")
                .arg("CERBAS-QUEUE")
                .arg("abc")
                .arg(fallback_good)
                .arg(fallback_big)
                .arg("-3")
                .arg(fallback_list)
                .arg("007")
                .arg(missing)
                .arg(good)
                .arg("99999999999999999999")
                .query::<()>(&mut conn)
                .expect("RPUSH");
        },
        Duration::from_secs(20),
    );
    let reply = |id: u64| {
        got.get(&id)
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| panic!("no reply for {id}; log:\n{}", server.log_text()))
    };
    assert_eq!(reply(fallback_good), Reply::Ok("fallback".into()));
    assert_eq!(
        reply(fallback_big),
        Reply::Error(format!(
            "request too large: {} bytes (limit {})",
            2 << 20,
            1 << 20
        ))
    );
    assert!(
        matches!(reply(fallback_list), Reply::Error(e)
            if e.starts_with(&format!("request {} cannot be read", fallback(fallback_list)))),
        "{:?}",
        reply(fallback_list)
    );
    assert_eq!(
        reply(missing),
        Reply::Error(format!("request not found: CERBAS-REQ-{missing:010}"))
    );
    assert_eq!(reply(good), Reply::Ok("good".into()));
    server.wait_log("skipped a queue entry that is not a request id", 4);
    // The ack deletes both keys of each id, the wrong-typed one too.
    wait_for("nothing left", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
}

/// Attack on the take-ahead of e494597 (`Pace`): an instance that has just
/// served a burst of fast calls takes ahead for the pace of that burst. When
/// the next requests are slow ones and fast ones pushed together, it takes the
/// slow ones for its free workers and some fast ones ahead, and those wait
/// behind the slow calls while another instance is idle.
#[test]
fn take_ahead_after_a_burst_does_not_hoard_behind_slow_calls() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    let mut busy = Server::start_args(&redis, &["--workers", "4"]);
    let idle = Server::start_args(&redis, &["--workers", "4"]);
    wait_for("both instances registered", Duration::from_secs(20), || {
        (instances(&mut conn).len() == 2).then_some(())
    });
    // The idle instance is held still during the burst, so the busy one serves
    // all of it (and its pace is high).
    idle.signal(libc::SIGSTOP);
    let heard = Replies::listen(&redis, "CERBAS");
    let burst = submit_many(&mut conn, &sums(3000));
    wait_for("the burst answered", Duration::from_secs(20), || {
        (heard.answered(&burst) == burst.len()).then_some(())
    });
    let mut mix: Vec<u64> = (0..4)
        .map(|_| store(&mut conn, &body("sleep", json!({"ms": 4000}))))
        .collect();
    let fast: Vec<u64> = (0..8)
        .map(|_| store(&mut conn, &body("hello", json!({}))))
        .collect();
    mix.extend(&fast);
    let pushed = Instant::now();
    push(&mut conn, &mix);
    idle.signal(libc::SIGCONT);
    wait_for(
        "every fast request answered",
        Duration::from_secs(20),
        || (heard.answered(&fast) == fast.len()).then_some(()),
    );
    let took = pushed.elapsed();
    heard.stop();
    println!("the fast requests took {:.2}s", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(2),
        "fast requests waited {took:?} behind the slow calls"
    );
    // The scene was as meant: the busy instance served the whole burst.
    busy.signal(libc::SIGTERM);
    assert!(busy.wait_exit(Duration::from_secs(20)).is_some(), "stopped");
    assert!(served(&busy) >= burst.len(), "{}", busy.log_text());
}

/// The idle reader sends its next take with its wait on the queue, and Redis
/// runs it only when the wait ends: scripts flushed meanwhile (`SCRIPT FLUSH`,
/// a restart's empty script cache) make that take fail with `NOSCRIPT`. The
/// request is taken by the next take all the same, and answered.
#[test]
fn scripts_flushed_while_the_reader_waits_lose_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    server.wait_ready(&redis);
    let client = redis.client();
    let mut conn = redis.conn();
    for round in 0..3 {
        // The reader is waiting now: its take is queued in Redis behind the wait.
        wait_for(
            "the reader waiting on the queue",
            Duration::from_secs(10),
            || {
                let clients = info_field(&mut conn, "clients", "blocked_clients");
                (clients == "1").then_some(())
            },
        );
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn)
            .expect("SCRIPT FLUSH");
        let reply = client.request("echo", json!({"message": round}));
        assert_eq!(
            reply.expect("a reply"),
            Reply::Ok(json!(round)),
            "round {round}"
        );
    }
}

/// A pause set in Redis while the reader waits on the queue (another instance's
/// dashboard pausing this one) stops the take already sent behind the wait: a
/// request pushed right after stays in the queue.
#[test]
fn a_pause_set_while_the_reader_waits_takes_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let instances: Vec<String> = redis::cmd("SMEMBERS")
        .arg("CERBAS-INSTANCES")
        .query(&mut conn)
        .expect("SMEMBERS");
    assert_eq!(instances.len(), 1, "{instances:?}");
    wait_for(
        "the reader waiting on the queue",
        Duration::from_secs(10),
        || (info_field(&mut conn, "clients", "blocked_clients") == "1").then_some(()),
    );
    let _: () = redis::cmd("SET")
        .arg(format!("CERBAS-PAUSED-{}", instances[0]))
        .arg(1)
        .query(&mut conn)
        .expect("SET");
    let id = store(&mut conn, &body("hello", json!({})));
    push(&mut conn, &[id]);
    // Said by the reader's take, or by the snapshot if it saw the key first.
    wait_for("the pause noticed", Duration::from_secs(10), || {
        let log = server.log_text();
        (log.contains("paused from the dashboard") || log.contains("is paused")).then_some(())
    });
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg("CERBAS-QUEUE")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("LRANGE");
    assert_eq!(queued, vec![id.to_string()], "the request stays queued");
}

/// The reader's client id, from `CLIENT LIST`, once it waits on the queue.
fn blocked_reader(conn: &mut redis::Connection) -> String {
    wait_for(
        "the reader waiting on the queue",
        Duration::from_secs(10),
        || {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query(conn)
                .expect("CLIENT LIST");
            list.lines()
                .find(|l| l.contains("cmd=blmove"))
                .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
                .map(str::to_string)
        },
    )
}

/// The wait on the queue ends with an error (`CLIENT UNBLOCK … ERROR`, as an
/// operator's tool or a failover does) while a request is queued: the take sent
/// behind the wait still runs and moves the request to the processing list, whose
/// answer the failed wait's error hid. The reader must serve it all the same,
/// not leave it there until its next reconnect.
#[test]
fn a_wait_ended_by_an_error_still_serves_what_its_take_took() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let reader = blocked_reader(&mut conn);
    let id = store(&mut conn, &body("hello", json!({})));
    let got = replies(
        &redis,
        &[id],
        || {
            // One transaction: the request is queued and the wait ended with an
            // error before Redis serves the waiting reader, so only the take
            // behind the wait takes it.
            let _: () = redis::pipe()
                .atomic()
                .cmd("RPUSH")
                .arg("CERBAS-QUEUE")
                .arg(id)
                .ignore()
                .cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(&reader)
                .arg("ERROR")
                .ignore()
                .query(&mut conn)
                .expect("RPUSH and CLIENT UNBLOCK");
        },
        Duration::from_secs(10),
    );
    assert_eq!(
        got.get(&id).map(|(r, _)| r.clone()),
        Some(Reply::Ok("hello world!".into())),
        "log:\n{}",
        server.log_text()
    );
    wait_for("the request acked", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
}

/// Redis stalls (`SIGSTOP`) while the idle reader waits on the queue with its
/// take behind the wait: the reader gives the connection up after its read
/// timeout (10.5 s), not after one read timeout per answer it waits for (a
/// pipeline's query read the second answer after the first timed out: 21 s).
#[test]
fn a_stall_during_the_wait_is_noticed_after_one_read_timeout() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    blocked_reader(&mut conn);
    redis.pause();
    let stalled = Instant::now();
    // Give-up time: 10.5 s after the last write, at most 0.5 s (a wait) after
    // the stall began; then some room for a loaded machine.
    let noticed = std::panic::catch_unwind(|| {
        wait_for("the reader to give up", Duration::from_secs(16), || {
            server
                .log_text()
                .contains("reader: redis unavailable")
                .then(|| stalled.elapsed())
        })
    });
    redis.resume();
    let noticed = noticed.unwrap_or_else(|_| panic!("log:\n{}", server.log_text()));
    assert!(noticed >= Duration::from_secs(9), "{noticed:?}");
    assert_serves_hello(&redis, &server);
}
