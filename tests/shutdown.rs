//! Stopping: `halt`, SIGINT and SIGTERM stop gracefully with exit 0; requests the
//! server had not finished go back to the queue and the next start serves them, so
//! none is lost; a second ctrl-c exits at once.

mod common;

use cerbas::Reply;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn halt_answers_then_the_server_exits_0() {
    let redis = Redis::start();
    let mut server = Server::start(&redis);
    let c = redis.client();
    let start = Instant::now();
    let reply = redis.call_mode(
        &c,
        c.body("halt", json!({"delay": 1000})).as_slice(),
        late(false),
    );
    assert_eq!(reply, Reply::Ok(json!("")));
    let status = server.wait_exit(Duration::from_secs(15)).expect("exit");
    assert_eq!(status.code(), Some(0));
    assert!(start.elapsed() >= Duration::from_millis(1000));
}

/// Queues `n` one-way tally requests, signals the server once some are served,
/// and checks that it exits 0 and that a second server serves the rest: every
/// request is counted exactly once.
fn signal_under_load(sig: i32) {
    let redis = Redis::start();
    let mut server = Server::start(&redis);
    let c = redis.client();
    let n = 3000;
    let name = format!("sig{sig}");
    let key = format!("CERBAS-TALLY-{name}");
    for _ in 0..n {
        c.send("tally", json!({"name": name})).unwrap();
    }
    let mut conn = redis.conn();
    wait_for("some requests served", Duration::from_secs(20), || {
        (get_int(&mut conn, &key) >= 50).then_some(())
    });
    server.signal(sig);
    let status = server.wait_exit(Duration::from_secs(30)).expect("exit");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log_text());
    let served_before = get_int(&mut conn, &key);
    let queued: i64 = redis::cmd("LLEN")
        .arg("CERBAS-QUEUE")
        .query(&mut conn)
        .unwrap();
    assert_eq!(served_before + queued, n, "served + still queued = sent");
    let beats: Vec<String> = redis::cmd("KEYS")
        .arg("CERBAS-HEARTBEAT-*")
        .query(&mut conn)
        .unwrap();
    assert!(beats.is_empty(), "a graceful stop retires its heartbeat");
    let _next = Server::start(&redis);
    wait_for("all requests served", Duration::from_secs(60), || {
        (get_int(&mut conn, &key) >= n).then_some(())
    });
    // Give the second server's acks a moment to land, then check exactness.
    wait_for("acks", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    assert_eq!(get_int(&mut conn, &key), n, "each request served once");
}

#[test]
fn sigterm_under_load_exits_0_and_loses_nothing() {
    signal_under_load(libc::SIGTERM);
}

#[test]
fn sigint_under_load_exits_0_and_loses_nothing() {
    signal_under_load(libc::SIGINT);
}

#[test]
fn calls_past_the_drain_deadline_go_back_to_the_queue() {
    let redis = Redis::start();
    let config = config_with("drain_timeout_ms = 300");
    let mut server = Server::spawn(
        &redis,
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
    );
    server.wait_ready(&redis);
    let c = redis.client();
    let ids: Vec<u64> = (0..3)
        .map(|_| c.send("sleep", json!({"ms": 4000})).unwrap())
        .collect();
    let mut conn = redis.conn();
    server.wait_log("sleep from user", 3);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(0));
    let mut queued: Vec<u64> = redis::cmd("LRANGE")
        .arg("CERBAS-QUEUE")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    queued.sort();
    assert_eq!(queued, ids, "unfinished requests are back in the queue");
    for id in ids {
        let body: Option<String> = redis::cmd("GET")
            .arg(format!("CERBAS-REQ-{id:010}"))
            .query(&mut conn)
            .unwrap();
        assert!(body.is_some(), "request {id} keeps its body");
    }
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    let redis = Redis::start();
    let mut server = Server::spawn(&redis, &[], &[("RUST_LOG", "debug")]);
    server.wait_ready(&redis);
    let c = redis.client();
    for _ in 0..3 {
        c.send("slow", json!({})).unwrap();
    }
    server.wait_log("slow from user", 3);
    server.signal(libc::SIGINT);
    // The first signal waits for the slow calls (6 s, drain up to 10 s); the
    // second must not.
    wait_for("shutdown to begin", Duration::from_secs(10), || {
        server.log_text().contains("shutting down").then_some(())
    });
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(4))
        .expect("prompt exit");
    assert_eq!(status.code(), Some(130));
}

#[test]
fn a_stop_while_redis_is_down_does_not_hang() {
    let redis = Redis::start();
    let mut server = Server::spawn(&redis, &[], &[("RUST_LOG", "debug")]);
    server.wait_ready(&redis);
    let c = redis.client();
    c.send("sleep", json!({"ms": 1000})).unwrap();
    wait_for("the sleep to start", Duration::from_secs(10), || {
        server.log_text().contains("sleep from user").then_some(())
    });
    drop(redis);
    // The sleep's reply now waits for Redis in the publisher.
    std::thread::sleep(Duration::from_millis(1500));
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(30)).expect("no hang");
    assert_eq!(status.code(), Some(0));
    assert!(server.log_text().contains("redis unavailable at shutdown"));
}
