//! Issue 7's defects in the worker pool and the stop, each closed with a test that
//! failed before its fix: the hung-worker count that leaked when a call returned
//! just as its deadline passed, a stop that waited for calls already answered, and
//! a stop that took minutes against a hung Redis. Real redis-server, real `cerbas`
//! processes, faults made here (`SIGSTOP`/`SIGCONT` of our own redis-server).
//! Other defects of the issue are in `hardening_publish.rs` and
//! `hardening_intake.rs`.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// SIGTERM, then how long the server took to exit (it must exit 0).
fn graceful_stop(server: &mut Server) -> Duration {
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits");
    assert!(status.success(), "exit 0: {status:?}");
    start.elapsed()
}

/// Queues `n` copies of `body`; returns their ids.
fn queue(conn: &mut redis::Connection, n: usize, body: &serde_json::Value) -> Vec<u64> {
    submit_many(conn, &vec![body.to_string(); n])
}

/// Item 1: calls that return right at their deadline race the timer's decision to
/// replace their worker. Before the fix a worker could be replaced and go on
/// anyway: the pool grew past its width and the hung count never came back to 0.
#[test]
fn the_hung_worker_count_returns_to_zero_after_calls_racing_their_deadline() {
    let redis = Redis::start();
    let config = config_with("workers = 2\n[functions.sleep]\ntimeout_ms = 50\n");
    let mut server = Server::start_args(&redis, &["--config", config.to_str().expect("path")]);
    let mut conn = redis.conn();
    let body = json!({"func": "sleep", "args": {"ms": 50}, "user": "foo", "source": "web"});
    queue(&mut conn, 300, &body);
    wait_for("all 300 calls served", Duration::from_secs(120), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    // Replaced workers retire once their calls return (50 ms at most).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut threads = worker_threads(server.pid());
    while threads != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        threads = worker_threads(server.pid());
    }
    assert_eq!(threads, 2, "worker threads after the race (configured: 2)");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).is_some());
    let log = server.log_text();
    assert!(
        log.contains(", 0 hung workers"),
        "the hung count is back to 0 at the stop; log:\n{log}"
    );
}

/// Item 9: a call past its deadline whose caller already has `timeout` holds
/// nothing; a graceful stop does not wait for it (before: the whole drain time).
#[test]
fn a_stop_does_not_wait_for_a_call_already_answered() {
    let redis = Redis::start();
    let config = config_with("drain_timeout_ms = 6000\n[functions.slow]\ntimeout_ms = 200\n");
    let mut server = Server::start_args(&redis, &["--config", config.to_str().expect("path")]);
    let c = redis.client();
    assert_eq!(
        c.request("slow", json!({})).expect("reply"),
        cerbas::Reply::Error("timeout".into())
    );
    let took = graceful_stop(&mut server);
    assert!(
        took < Duration::from_secs(2),
        "stop took {took:?} with nothing in hand (drain_timeout_ms is 6 s)"
    );
}

/// Item 5: against a hung Redis a stop ends within `drain_timeout_ms` + 5 s
/// (before: every reply of the publisher's pipeline waited its own read timeout,
/// minutes for a full batch). What was not answered is recovered afterwards.
#[test]
fn a_stop_against_a_hung_redis_ends_within_the_drain_time_and_five_seconds() {
    let redis = Redis::start();
    let config = config_with("workers = 60\ndrain_timeout_ms = 2000\n");
    let mut server = Server::spawn(
        &redis,
        &["--config", config.to_str().expect("path")],
        &[("RUST_LOG", "debug")],
    );
    server.wait_ready(&redis);
    let mut conn = redis.conn();
    let body = json!({"func": "tally", "args": {"name": "hung"}, "user": "foo", "source": "web"});
    let sleepy = json!({"func": "sleep", "args": {"ms": 400}, "user": "foo", "source": "web"});
    queue(&mut conn, 50, &sleepy);
    server.wait_log("sleep from user", 50);
    // The 50 replies reach the publisher while Redis is stopped; so do the
    // tallies' connections, which hang too.
    redis.pause();
    std::thread::sleep(Duration::from_millis(600));
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let exited = server.wait_exit(Duration::from_secs(60));
    let took = start.elapsed();
    redis.resume();
    assert!(exited.is_some(), "the server exits");
    assert!(
        took < Duration::from_millis(2000 + 5000 + 1000),
        "stop took {took:?} against a hung Redis (drain 2 s + 5 s)"
    );
    // Nothing is lost: another instance serves what the stopped one held.
    let _other = Server::start(&redis);
    queue(&mut conn, 1, &body);
    wait_for(
        "every request served after recovery",
        Duration::from_secs(60),
        || leftover_keys(&mut conn).is_empty().then_some(()),
    );
}

/// A one-way request that asked for no reply (`"reply": false`) is answered like
/// any other as far as the stop is concerned: once served, a stop does not wait
/// the drain time for it.
#[test]
fn a_stop_does_not_wait_for_served_requests_that_wanted_no_reply() {
    let redis = Redis::start();
    let config = config_with("drain_timeout_ms = 6000\n");
    let mut server = Server::start_args(&redis, &["--config", config.to_str().expect("path")]);
    let mut conn = redis.conn();
    let body = json!({"func": "hello", "args": {}, "user": "foo", "source": "web", "reply": false});
    queue(&mut conn, 3, &body);
    wait_for(
        "the one-way requests served",
        Duration::from_secs(20),
        || leftover_keys(&mut conn).is_empty().then_some(()),
    );
    let took = graceful_stop(&mut server);
    assert!(
        took < Duration::from_secs(3),
        "stop took {took:?} with nothing in hand (drain_timeout_ms is 6 s)"
    );
}
