//! The publisher's half of issue 7, each defect proved with real processes and
//! faults made by the test itself: a reply in flight during a Redis stall longer
//! than the read timeout is published once (item 2); an ack Redis refuses
//! (`MISCONF`) never makes a request run again (item 3); late subscribers are
//! covered for the whole `reply_grace_ms` (item 4); one-way requests cost bounded
//! memory, and none of it nor any `PUBLISH` with `"reply": false` (item 10).
//! Not for: the reader's, dispatcher's or shutdown's items of that issue.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn body(func: &str, args: serde_json::Value) -> String {
    json!({"func": func, "args": args, "user": "foo", "source": "web"}).to_string()
}

/// A subscriber on its own thread: every message on channels matching `pattern`
/// arrives on the returned receiver as (channel, payload). Subscribed (confirmed by
/// Redis) when this returns. The thread ends at `until`.
fn listen(redis: &Redis, pattern: &str, until: Instant) -> mpsc::Receiver<(String, Vec<u8>)> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let url = redis.url_db(1);
    let pattern = pattern.to_string();
    std::thread::spawn(move || {
        let mut conn = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("subscriber connection");
        let mut ps = conn.as_pubsub();
        ps.psubscribe(&pattern).expect("PSUBSCRIBE");
        let _ = ready_tx.send(());
        while Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let _ = ps.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match ps.get_message() {
                Ok(m) => {
                    let msg = (
                        m.get_channel_name().to_string(),
                        m.get_payload_bytes().to_vec(),
                    );
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                // A timeout ends the listening; so does the test's redis going away.
                Err(_) => return,
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("subscription confirmed");
    rx
}

/// Messages received so far, per channel.
fn counts(rx: &mpsc::Receiver<(String, Vec<u8>)>, into: &mut HashMap<String, usize>) {
    while let Ok((channel, _)) = rx.try_recv() {
        *into.entry(channel).or_default() += 1;
    }
}

fn llen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(conn).expect("LLEN")
}

/// Length of the server's processing list (there is one instance).
fn in_processing(conn: &mut redis::Connection) -> i64 {
    let lists: Vec<String> = redis::cmd("KEYS")
        .arg("CERBAS-PROCESSING-*")
        .query(conn)
        .expect("KEYS");
    lists.iter().map(|l| llen(conn, l)).sum()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the pid of a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The pid of the test's own redis-server (asked before it is stopped).
fn redis_pid(redis: &Redis) -> i32 {
    let mut c = redis.conn();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut c)
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("process_id in INFO")
}

/// A process's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// `calls` of `cmdstat_<cmd>` in INFO commandstats (0 if never called).
fn command_calls(conn: &mut redis::Connection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO");
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn request_keys(conn: &mut redis::Connection) -> usize {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("CERBAS-REQ-*")
        .query(conn)
        .expect("KEYS");
    keys.len()
}

/// Item 2: the reply's pipeline reaches a stopped Redis, whose answer comes after
/// the publisher's read timeout (10.5 s); the publisher reconnects and sends again.
/// The subscriber, subscribed before the push, must see one message per channel.
#[test]
fn a_reply_in_flight_across_a_13s_stall_is_published_once() {
    let redis = Redis::start();
    let server = Server::spawn(&redis, &[], &[("RUST_LOG", "debug")]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let until = Instant::now() + Duration::from_secs(60);
    let rx = listen(&redis, "*CERBAS-RESPONSE-1-*", until);
    let pid = redis_pid(&redis);
    let ids = submit_many(&mut conn, &[body("sleep", json!({"ms": 500}))]);
    server.wait_log("sleep from user", 1);
    // The call returns 0.5 s from now: its reply goes out while Redis is stopped,
    // and the publisher's read of the answer times out 10.5 s later.
    signal(pid, libc::SIGSTOP);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(13));
    signal(pid, libc::SIGCONT);
    eprintln!("redis stopped {:.1}s", stopped.elapsed().as_secs_f64());
    // A round trip after the stall goes through the publisher after any resend.
    let client = redis.client();
    wait_for("a hello after the stall", Duration::from_secs(30), || {
        client.request("hello", serde_json::Value::Null).ok()
    });
    wait_for("the request acknowledged", Duration::from_secs(20), || {
        (request_keys(&mut conn) == 0 && in_processing(&mut conn) == 0).then_some(())
    });
    let mut got = HashMap::new();
    // Let any duplicate arrive (it would come with the resend, already done).
    std::thread::sleep(Duration::from_millis(500));
    counts(&rx, &mut got);
    let json_channel = format!("CERBAS-RESPONSE-1-{:010}", ids[0]);
    let msgpack_channel = format!("MSGPACK:{json_channel}");
    eprintln!(
        "messages per channel: {got:?}; sent again after the stall: {}",
        server.log_text().contains("no longer held here")
    );
    assert_eq!(got.get(&json_channel), Some(&1), "json: {got:?}");
    assert_eq!(got.get(&msgpack_channel), Some(&1), "msgpack: {got:?}");
}

/// Item 3: the acks of calls in flight are refused with `MISCONF` for ~3 s while
/// `PUBLISH` is accepted, and the reader reconnects meanwhile. Each request must
/// be answered exactly once.
#[test]
fn a_refused_ack_never_runs_a_request_again() {
    // Writes are refused after a failed BGSAVE only if saving is configured.
    let redis = Redis::start_with(
        &["--save", "3600 1", "--enable-protected-configs", "yes"],
        None,
    );
    let server = Server::spawn(&redis, &[], &[("RUST_LOG", "debug")]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let until = Instant::now() + Duration::from_secs(60);
    let rx = listen(&redis, "CERBAS-RESPONSE-1-*", until);
    let n = 20;
    let bodies: Vec<String> = (0..n).map(|_| body("sleep", json!({"ms": 1500}))).collect();
    let ids = submit_many(&mut conn, &bodies);
    server.wait_log("sleep from user", n);
    // A BGSAVE into a directory that no longer exists fails: MISCONF from now on.
    let doomed = scratch("doomed");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("dir")
        .arg(doomed.to_str().expect("utf-8 path"))
        .query::<()>(&mut conn)
        .expect("CONFIG SET dir");
    std::fs::remove_dir_all(&doomed).expect("rm dir");
    redis::cmd("BGSAVE").query::<()>(&mut conn).expect("BGSAVE");
    wait_for("writes refused", Duration::from_secs(10), || {
        redis::cmd("SET")
            .arg("probe")
            .arg(1)
            .query::<()>(&mut conn)
            .err()
            .filter(|e| e.code() == Some("MISCONF"))
    });
    let refused = Instant::now();
    // The calls return and are published meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("dir")
        .arg(redis.dir.to_str().expect("utf-8 path"))
        .query::<()>(&mut conn)
        .expect("CONFIG SET dir back");
    redis::cmd("BGSAVE").query::<()>(&mut conn).expect("BGSAVE");
    wait_for("writes accepted", Duration::from_secs(10), || {
        redis::cmd("SET")
            .arg("probe")
            .arg(1)
            .query::<()>(&mut conn)
            .ok()
    });
    eprintln!("writes refused for {:.1}s", refused.elapsed().as_secs_f64());
    wait_for(
        "every request acknowledged",
        Duration::from_secs(30),
        || (request_keys(&mut conn) == 0 && in_processing(&mut conn) == 0).then_some(()),
    );
    // A round trip after heal: the publisher has sent whatever a rerun would send.
    let client = redis.client();
    wait_for("a hello after the heal", Duration::from_secs(30), || {
        client.request("hello", serde_json::Value::Null).ok()
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut got = HashMap::new();
    counts(&rx, &mut got);
    let runs = server.log_text().matches("sleep from user").count();
    let replies: Vec<usize> = ids
        .iter()
        .map(|id| {
            got.get(&format!("CERBAS-RESPONSE-1-{id:010}"))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    eprintln!("runs of {n} requests: {runs}; replies per request: {replies:?}");
    assert!(replies.iter().all(|r| *r == 1), "replies: {replies:?}");
    assert_eq!(runs, n, "each request runs once");
}

/// Item 4: clients that subscribe 1 s, 2.5 s and 4.5 s after their push (the
/// seed's order) all get their reply within the 5 s grace (the default).
#[test]
fn late_subscribers_are_covered_for_the_whole_grace() {
    let redis = Redis::start();
    let config = config_with("reply_grace_ms = 5000");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::spawn(&redis, &["--config", config], &[]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let offsets = [1000u64, 2500, 4500];
    let bodies: Vec<String> = offsets.iter().map(|_| body("hello", json!({}))).collect();
    let ids = submit_many(&mut conn, &bodies);
    let pushed = Instant::now();
    let waiters: Vec<_> = ids
        .iter()
        .zip(offsets)
        .map(|(id, after)| {
            let url = redis.url_db(1);
            let channel = format!("CERBAS-RESPONSE-1-{id:010}");
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .expect("subscriber connection");
                std::thread::sleep(
                    (pushed + Duration::from_millis(after))
                        .saturating_duration_since(Instant::now()),
                );
                let mut ps = c.as_pubsub();
                ps.subscribe(&channel).expect("SUBSCRIBE");
                let subscribed = pushed.elapsed();
                ps.set_read_timeout(Some(Duration::from_secs(8)))
                    .expect("timeout");
                let got = ps
                    .get_message()
                    .ok()
                    .map(|m| m.get_payload_bytes().to_vec());
                (after, subscribed, got)
            })
        })
        .collect();
    let mut missed = Vec::new();
    for w in waiters {
        let (after, subscribed, got) = w.join().expect("subscriber thread");
        eprintln!(
            "subscribed {:.2}s after the push: {}",
            subscribed.as_secs_f64(),
            if got.is_some() { "got it" } else { "missed it" }
        );
        match got {
            Some(p) => assert_eq!(p, br#"{"status":"ok","data":"hello world!"}"#),
            None => missed.push(after),
        }
    }
    assert!(missed.is_empty(), "subscribed at {missed:?} ms: no reply");
}

/// Item 10a: 2,000 one-way `echo` calls of 50 KB each, sent as old clients send
/// them (no `reply` field): replies held for late subscribers are capped, so the
/// server's peak RSS stays under 64 MiB.
#[test]
fn one_way_replies_held_for_late_subscribers_are_capped() {
    let redis = Redis::start();
    // 16 workers, not the shipped 100: with 100, the calls in flight alone (up to
    // 100 bodies in the reader's batch, 100 in the jobs channel, 100 running, each
    // 50 KB in and 128 KB out) peak at 40-57 MiB; that is the reader's batch bound
    // (issue 7, item 12), not the republish buffer this test is about.
    let config = config_with("workers = 16");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::spawn(&redis, &["--config", config], &[]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let message = "x".repeat(50 * 1024);
    let n = 2000;
    let bodies: Vec<String> = (0..n)
        .map(|_| body("echo", json!({ "message": message })))
        .collect();
    submit_many(&mut conn, &bodies);
    drop(bodies);
    wait_for(
        "every request acknowledged",
        Duration::from_secs(120),
        || (request_keys(&mut conn) == 0 && in_processing(&mut conn) == 0).then_some(()),
    );
    let peak = peak_rss(server.pid());
    eprintln!("peak RSS: {:.1} MiB", peak as f64 / (1 << 20) as f64);
    assert!(peak < 64 << 20, "peak RSS {peak} bytes");
}

/// Item 10b: with `"reply": false` the server publishes nothing (the requests still
/// run and are acknowledged), whether the body is written by hand or by the Rust
/// client's one-way `send`; a non-boolean `reply` is an error reply.
#[test]
fn reply_false_publishes_nothing() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let client = redis.client();
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut conn)
        .expect("RESETSTAT");
    let n = 200;
    let names: Vec<String> = (0..n).map(|i| format!("quiet-{i}")).collect();
    let (by_hand, by_client) = names.split_at(n / 2);
    let bodies: Vec<String> = by_hand
        .iter()
        .map(|name| {
            json!({"func": "tally", "args": {"name": name}, "user": "foo", "source": "web", "reply": false})
                .to_string()
        })
        .collect();
    submit_many(&mut conn, &bodies);
    for name in by_client {
        client
            .send("tally", json!({ "name": name }))
            .expect("one-way send");
    }
    wait_for(
        "every request acknowledged",
        Duration::from_secs(60),
        || (request_keys(&mut conn) == 0 && in_processing(&mut conn) == 0).then_some(()),
    );
    let ran = names
        .iter()
        .filter(|name| get_int(&mut conn, &format!("CERBAS-TALLY-{name}")) == 1)
        .count();
    let publishes = command_calls(&mut conn, "publish");
    eprintln!("{ran} of {n} ran; PUBLISH calls: {publishes}");
    assert_eq!(ran, n, "every one-way request runs once");
    assert_eq!(publishes, 0, "nothing published for reply: false");
    // A reply that is not a boolean is refused like any bad field.
    let bad = json!({"func": "hello", "user": "foo", "source": "web", "reply": "no"});
    let reply = client
        .call(bad.to_string().as_bytes(), &Default::default())
        .expect("a reply");
    assert_eq!(
        reply,
        cerbas::Reply::Error("\"reply\" must be true or false".into())
    );
    drop(server);
}

/// Looks for a late subscriber: `PUBSUB NUMSUB` by name, or one `PUBSUB
/// CHANNELS` for all.
fn looks(conn: &mut redis::Connection) -> (u64, u64) {
    (
        calls_of(conn, "pubsub|numsub"),
        calls_of(conn, "pubsub|channels"),
    )
}

/// Starts a server holding replies 600 ms, sends one request nobody subscribes
/// to, and waits for its six looks (about 2, 8, 26, 80, 242 and 600 ms after
/// its first publish). Returns the looks made, by name and by `CHANNELS`, and how
/// often it was published.
fn looks_for_one_unheard_reply(redis: &Redis) -> ((u64, u64), u64) {
    let config = config_with("reply_grace_ms = 600");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::spawn(redis, &["--config", config], &[]);
    server.wait_ready(redis);
    let mut conn = redis.conn();
    let published = calls_of(&mut conn, "publish");
    let made = looks_for_a_new_request(&mut conn, 6);
    (made, calls_of(&mut conn, "publish") - published)
}

/// Sends one `hello` nobody subscribes to and waits for `n` looks for its late
/// subscriber; returns them (by name, by `CHANNELS`).
fn looks_for_a_new_request(conn: &mut redis::Connection, n: u64) -> (u64, u64) {
    let before = looks(conn);
    submit_many(conn, &[body("hello", json!({}))]);
    wait_for(
        "the server to look for late subscribers",
        Duration::from_secs(10),
        || {
            let now = looks(conn);
            let made = (now.0 - before.0, now.1 - before.1);
            (made.0 + made.1 >= n).then_some(made)
        },
    )
}

/// A reply nobody subscribes to (an old one-way client) is not published again
/// and again for the grace: the server looks for a subscriber instead, which
/// costs Redis far less. With few channels in Redis, by one `PUBSUB CHANNELS`
/// per look while its count of them is fresh (under 100 ms old: the looks at
/// about 8, 26 and 80 ms; those that count, at 2, 242 and 600 ms, are by name).
#[test]
fn a_reply_nobody_hears_is_looked_for_not_published_again() {
    let redis = Redis::start();
    let ((by_name, by_channels), published) = looks_for_one_unheard_reply(&redis);
    assert_eq!(
        published, 2,
        "published once on each channel, and never again"
    );
    // Timing decides exactly which (a slow machine may count more often).
    assert!(
        by_channels >= 1,
        "{by_name} looks by name, {by_channels} by PUBSUB CHANNELS"
    );
}

/// Redis with many channels of other apps (an ActionCable neighbour): one
/// `PUBSUB CHANNELS` would cost it a walk over all of them at every look, so the
/// server looks by name.
#[test]
fn held_replies_are_looked_for_by_name_where_redis_has_many_channels() {
    let redis = Redis::start();
    let neighbour = neighbour_with_2000_channels(&redis);
    let ((by_name, by_channels), published) = looks_for_one_unheard_reply(&redis);
    assert_eq!(published, 2);
    assert_eq!(
        (by_name, by_channels),
        (6, 0),
        "every look by name, none by PUBSUB CHANNELS"
    );
    drop(neighbour);
}

/// Redis's channel count, read while the server looked for a reply nobody
/// heard, is stale after a quiet spell: a neighbour subscribed many channels
/// meanwhile (a million make one `PUBSUB CHANNELS` block Redis for about 0.4 s).
/// The next unheard reply is looked for by name until the count is read again.
#[test]
fn a_stale_count_of_redis_channels_is_not_trusted() {
    let redis = Redis::start();
    let config = config_with("reply_grace_ms = 300");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::spawn(&redis, &["--config", config], &[]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    submit_many(&mut conn, &[body("hello", json!({}))]);
    // Counted (no channels) at its first look; then looked for by CHANNELS.
    wait_for(
        "a look by PUBSUB CHANNELS, the channels counted",
        Duration::from_secs(10),
        || (looks(&mut conn).1 >= 1).then_some(()),
    );
    let counted = Instant::now();
    let neighbour = neighbour_with_2000_channels(&redis);
    // The first reply's grace (300 ms) is over and the server's last count is
    // older than its 100 ms period once this has passed (the behaviour under
    // test is the count's age, so the wait is on time itself).
    wait_for("the count stale", Duration::from_secs(10), || {
        (counted.elapsed() > Duration::from_millis(1100)).then_some(())
    });
    assert_eq!(
        looks_for_a_new_request(&mut conn, 5),
        (5, 0),
        "(by name, by PUBSUB CHANNELS): never a walk over the neighbour's channels"
    );
    drop((neighbour, server));
}

/// A late subscriber to the msgpack channel alone is found, and gets the
/// msgpack form.
#[test]
fn a_late_subscriber_to_the_msgpack_channel_alone_gets_its_reply() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let ids = submit_many(&mut conn, &[body("hello", json!({}))]);
    // Published to nobody once its key is gone (the ack and the first publish
    // are one script).
    wait_for("the request acknowledged", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    let channel = format!("MSGPACK:CERBAS-RESPONSE-1-{:010}", ids[0]);
    let got = redis
        .first_message(&channel, Duration::from_secs(8))
        .expect("the reply, republished");
    let reply: serde_json::Value =
        rmp_serde::from_slice(got.get_payload_bytes()).expect("msgpack reply");
    assert_eq!(reply, json!({"status": "ok", "data": "hello world!"}));
}

/// Replies held for late subscribers on a Redis that then restarts (empty, its
/// counter set back) are never published on the new one, where their ids go to
/// new requests: each new caller gets its own reply, not the old one.
#[test]
fn replies_held_across_a_redis_restart_never_reach_new_requests_with_their_ids() {
    let mut redis = Redis::start();
    let config = config_with("reply_grace_ms = 10000");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::spawn(&redis, &["--config", config], &[]);
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let said = |what: &str, i: usize| body("echo", json!({"message": format!("{what}-{i}")}));
    let ids = submit_many(
        &mut conn,
        &(0..3).map(|i| said("old", i)).collect::<Vec<_>>(),
    );
    wait_for("the old requests answered", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    redis.restart(Duration::from_millis(100));
    // Subscribed on the new Redis to the channels of the old ids.
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready) = mpsc::channel();
    let url = redis.url_db(1);
    let channels: Vec<String> = ids
        .iter()
        .map(|id| format!("CERBAS-RESPONSE-1-{id:010}"))
        .collect();
    let listener = std::thread::spawn(move || {
        let mut c = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("subscriber connection");
        let mut ps = c.as_pubsub();
        for ch in &channels {
            ps.subscribe(ch).expect("SUBSCRIBE");
        }
        ps.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let _ = ready_tx.send(());
        for _ in 0..channels.len() {
            let Ok(m) = ps.get_message() else { return };
            let _ = tx.send((
                m.get_channel_name().to_string(),
                m.get_payload_bytes().to_vec(),
            ));
        }
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    // The publisher finds the new Redis at its next look for subscribers.
    server.wait_log(
        "replies held for late subscribers dropped (redis restarted)",
        1,
    );
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("CERBAS-COUNTER")
        .arg(ids[0] - 1)
        .query(&mut conn)
        .expect("counter set back");
    let again = submit_many(
        &mut conn,
        &(0..3).map(|i| said("new", i)).collect::<Vec<_>>(),
    );
    assert_eq!(again, ids, "the new requests got the old ids");
    for _ in 0..ids.len() {
        let (channel, payload) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a reply to each new request");
        let i = ids
            .iter()
            .position(|id| channel.ends_with(&format!("{id:010}")))
            .expect("one of ours");
        let reply: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
        assert_eq!(reply["data"], json!(format!("new-{i}")), "on {channel}");
    }
    listener.join().expect("listener");
}

/// A server whose Redis user may `PUBLISH` but not `PUBSUB` (an ACL written
/// for the commands cerbas used to send): it cannot look for late subscribers,
/// so it publishes held replies again on their schedule, and a late subscriber
/// still gets its reply.
#[test]
fn a_late_subscriber_gets_its_reply_when_the_acl_denies_pubsub() {
    late_reply_as_a_user_denied("-pubsub", |_| ());
}

/// A Redis user allowed `PUBSUB NUMSUB` but not `PUBSUB CHANNELS`: the server
/// looks by name instead, and a late subscriber gets its reply.
#[test]
fn a_late_subscriber_gets_its_reply_when_the_acl_denies_pubsub_channels() {
    let (server, published) = late_reply_as_a_user_denied("-pubsub|channels", |conn| {
        // Past the refused CHANNELS look (at about 8 ms) and the next by name.
        wait_for(
            "a look by name after the refusal",
            Duration::from_secs(10),
            || (calls_of(conn, "pubsub|numsub") >= 2).then_some(()),
        );
    });
    server.wait_log("refuses PUBSUB CHANNELS", 1);
    assert_eq!(
        published, 4,
        "never published blind: twice to nobody, then twice once a subscriber came"
    );
}

/// A Redis user denied `INFO`: Redis's channel count cannot be read, so held
/// replies are looked for by name, never by a `PUBSUB CHANNELS` whose cost is
/// unknown, and a late subscriber gets its reply.
#[test]
fn held_replies_are_looked_for_by_name_when_the_acl_denies_info() {
    let (_server, published) = late_reply_as_a_user_denied("-info", |conn| {
        wait_for("three looks by name", Duration::from_secs(10), || {
            (calls_of(conn, "pubsub|numsub") >= 3).then_some(())
        });
        assert_eq!(calls_of(conn, "pubsub|channels"), 0);
    });
    assert_eq!(
        published, 4,
        "never published blind: twice to nobody, then twice once a subscriber came"
    );
}

/// Runs a server as a Redis user denied `denied` (an ACL), sends one `hello`
/// nobody subscribes to, calls `meanwhile` once it is acknowledged, then
/// subscribes late and checks that the reply arrives. Returns the server (for
/// its log) and how many `PUBLISH` Redis ran from the request on.
fn late_reply_as_a_user_denied(
    denied: &str,
    meanwhile: impl FnOnce(&mut redis::Connection),
) -> (Server, u64) {
    let redis = Redis::start();
    let mut conn = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "cerbas", "on", ">secret", "~*", "&*", "+@all", denied,
        ])
        .query(&mut conn)
        .expect("ACL SETUSER");
    let url = format!("redis://cerbas:secret@127.0.0.1:{}", redis.port);
    let server = Server::spawn(&redis, &["--redis", &url], &[]);
    server.wait_ready(&redis);
    let published = calls_of(&mut conn, "publish");
    let ids = submit_many(&mut conn, &[body("hello", json!({}))]);
    wait_for("the request acknowledged", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    meanwhile(&mut conn);
    let channel = format!("CERBAS-RESPONSE-1-{:010}", ids[0]);
    let got = redis
        .first_message(&channel, Duration::from_secs(8))
        .unwrap_or_else(|e| {
            panic!(
                "no reply for a late subscriber ({e}); log:\n{}",
                server.log_text()
            )
        });
    assert_eq!(
        got.get_payload_bytes(),
        br#"{"status":"ok","data":"hello world!"}"#
    );
    (server, calls_of(&mut conn, "publish") - published)
}

/// A request still running when Redis restarts empty (its counter set back):
/// the restarted Redis gives its id to a new request, which this instance takes
/// while the old one runs. The old request's reply must not be published to the
/// new request's caller, nor its ack take the new request out of the processing
/// list: the new caller gets its own reply.
#[test]
fn a_request_running_across_a_redis_restart_never_answers_the_new_request_with_its_id() {
    let mut redis = Redis::start();
    let server = Server::start(&redis);
    let mut conn = redis.conn();
    let sleep = |ms: u64| body("sleep", json!({ "ms": ms }));
    let old = submit_many(&mut conn, &[sleep(2500)])[0];
    wait_for("the old request taken", Duration::from_secs(10), || {
        (llen(&mut conn, "CERBAS-QUEUE") == 0 && in_processing(&mut conn) == 1).then_some(())
    });
    redis.restart(Duration::from_millis(100));
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("CERBAS-COUNTER")
        .arg(old - 1)
        .query(&mut conn)
        .expect("counter set back");
    let reply = redis.reply_for(old, false, || {
        let new = submit_many(&mut conn, &[sleep(3000)])[0];
        assert_eq!(new, old, "the new request got the old id");
    });
    assert_eq!(
        reply,
        cerbas::Reply::Ok(json!(3000)),
        "log:\n{}",
        server.log_text()
    );
    wait_for("nothing left in Redis", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
}

/// The publisher's pipeline of several commands (here the two `PUBLISH` of a
/// held reply whose late subscriber it found) meets a Redis that stops
/// answering: the publisher gives the connection up after one read timeout
/// (10.5 s), not one per command (a pipeline's query read every answer after
/// the first timed out: 21 s), and the subscriber still gets its reply.
#[test]
fn a_stalled_pipeline_is_given_up_after_one_read_timeout() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let url = relay.url();
    let config = config_with("reply_grace_ms = 60000");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::start_args(&redis, &["--redis", &url, "--config", config]);
    let mut conn = redis.conn();
    let id = submit_many(&mut conn, &[body("hello", json!({}))])[0];
    wait_for("the request acknowledged", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    // The republish to the late subscriber is held back.
    let held = relay.hold(b"PUBLISH");
    let mut c = redis::Client::open(redis.url_db(1).as_str())
        .and_then(|c| c.get_connection())
        .expect("subscriber connection");
    let mut ps = c.as_pubsub();
    ps.subscribe(format!("CERBAS-RESPONSE-1-{id:010}"))
        .expect("SUBSCRIBE");
    held.recv_timeout(Duration::from_secs(10))
        .expect("the publisher publishing again");
    let since = Instant::now();
    let noticed = wait_for("the publisher to give up", Duration::from_secs(17), || {
        server
            .log_text()
            .contains("publisher: redis unavailable")
            .then(|| since.elapsed())
    });
    relay.release();
    assert!(noticed >= Duration::from_secs(9), "{noticed:?}");
    ps.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let got = ps.get_message().expect("the reply, published again");
    assert_eq!(
        got.get_payload_bytes(),
        br#"{"status":"ok","data":"hello world!"}"#
    );
}
