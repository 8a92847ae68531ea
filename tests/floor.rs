//! Tests of the protocol floor (`examples/floor.rs`, the yardstick `make bench`
//! measures cerbas against): the shipped Rust client gets the same replies from
//! it, in both forms, as from cerbas; one-way requests, bad queue entries and
//! tally's INCR (one at a time and pipelined) are served and their keys deleted.
//! The same for its threaded mode (`--threads`, cerbas's thread shape), plus
//! concurrent callers each getting their own replies, a stop answering every
//! request taken, its hand-off lane, and an end when Redis goes away.
//! Not for: its speed (`make bench` measures that).

mod common;

// The example's code itself, not a copy (its `main` is not called here).
#[allow(dead_code)]
#[path = "../examples/floor.rs"]
mod floor;

use cerbas::protocol::parse_request;
use cerbas::{Keys, Reply};
use clap::Parser;
use common::{get_int, leftover_keys, submit_many, wait_for, Redis};
use floor::{plan, serve, serve_threaded, Args, Job, Lane, Work, READ_TIMEOUT};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn reply(job: Job) -> Reply {
    match job.work {
        Work::Done(r) => r,
        Work::Incr(k) => panic!("expected a reply, got INCR {k}"),
    }
}

#[test]
fn plans_as_cerbas_answers() {
    let keys = Keys::new("CERBAS", 1);
    let plan = |body: Option<&str>| plan(&keys, 7, body.map(str::as_bytes), 1 << 20);
    assert_eq!(
        reply(plan(Some(r#"{"func":"echo","args":{"message":[1,"a"]}}"#))),
        Reply::Ok(json!([1, "a"]))
    );
    assert_eq!(
        reply(plan(Some(r#"{"func":"echo"}"#))),
        Reply::Error("invalid arguments: missing field `message`".into())
    );
    assert_eq!(
        reply(plan(Some(r#"{"func":"hello"}"#))),
        Reply::Ok(json!("hello world!"))
    );
    assert_eq!(
        reply(plan(None)),
        Reply::Error("request not found: CERBAS-REQ-0000000007".into())
    );
    assert_eq!(
        reply(plan(Some(r#"{"func":"nope"}"#))),
        Reply::Error("unknown function: nope".into())
    );
    assert_eq!(
        reply(plan(Some("{"))),
        Reply::Error(format!("{}", parse_request(b"{", 1 << 20).unwrap_err()))
    );
    let t = plan(Some(
        r#"{"func":"tally","args":{"name":"x"},"reply":false}"#,
    ));
    assert!(!t.reply);
    assert!(matches!(t.work, Work::Incr(ref k) if k == "CERBAS-TALLY-x"));
    assert!(matches!(
        reply(plan(Some(r#"{"func":"hello","delay":5}"#))),
        Reply::Error(_)
    ));
}

/// A floor serving db 1 of `redis` on a thread of its own.
struct Running {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<redis::RedisResult<u64>>,
}

impl Running {
    fn start(redis: &Redis, flags: &[&str]) -> Running {
        let args = Args::parse_from(std::iter::once("floor").chain(flags.iter().copied()));
        let client = redis::Client::open(redis.url_db(1).as_str()).expect("client");
        let keys = Keys::new("CERBAS", 1);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = if flags.contains(&"--threads") {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = std::thread::spawn(move || {
                let mut served = 0;
                let ready = move || ready_tx.send(()).expect("the test waits");
                serve_threaded(&client, &keys, &args, &flag, &mut served, ready).map(|()| served)
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the threaded floor ready");
            handle
        } else {
            let mut conn = cerbas::connection::open(&client, READ_TIMEOUT).expect("connection");
            std::thread::spawn(move || {
                let mut served = 0;
                serve(&mut conn, &keys, &args, &flag, &mut served).map(|()| served)
            })
        };
        Running { stop, handle }
    }

    /// Waits up to `within` for the floor to end on its own; its result.
    fn ended(self, within: Duration) -> redis::RedisResult<u64> {
        wait_for("the floor to end", within, || {
            self.handle.is_finished().then_some(())
        });
        self.handle.join().expect("floor thread")
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .expect("floor thread")
            .expect("floor served")
    }
}

#[test]
fn the_shipped_client_gets_both_forms_of_each_reply() {
    both_forms_of_each_reply(&[]);
}

#[test]
fn threaded_the_shipped_client_gets_both_forms_of_each_reply() {
    both_forms_of_each_reply(&["--threads", "--workers", "3"]);
}

fn both_forms_of_each_reply(flags: &[&str]) {
    let redis = Redis::start();
    let floor = Running::start(&redis, flags);
    let c = redis.client();
    let message = json!({"a": [1, 2.5, "x"], "b": null});
    assert_eq!(
        c.request("echo", json!({ "message": message })).unwrap(),
        Reply::Ok(message.clone())
    );
    assert_eq!(
        c.request_msgpack("echo", json!({ "message": message }))
            .unwrap(),
        Reply::Ok(message)
    );
    assert_eq!(
        c.request("tally", json!({"name": "t"})).unwrap(),
        Reply::Ok(json!(1))
    );
    assert_eq!(
        c.request_msgpack("nope", json!({})).unwrap(),
        Reply::Error("unknown function: nope".into())
    );
    // One-way requests are served without a reply; a bad entry is dropped.
    let mut conn = redis.conn();
    let one_way = r#"{"func":"tally","args":{"name":"t"},"reply":false}"#.to_string();
    submit_many(&mut conn, &vec![one_way; 20]);
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg("abc")
        .query::<()>(&mut conn)
        .unwrap();
    wait_for("20 one-way tallies", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-t") == 21).then_some(())
    });
    wait_for("request keys deleted", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    assert_eq!(floor.stop(), 24);
}

#[test]
fn pipelined_functions_count_each_request() {
    let redis = Redis::start();
    let floor = Running::start(&redis, &["--pipeline-functions", "--batch", "7"]);
    let mut conn = redis.conn();
    let body = r#"{"func":"tally","args":{"name":"p"},"reply":false}"#.to_string();
    let mut bodies = vec![body; 50];
    bodies.push(r#"{"func":"tally","args":{}}"#.into());
    submit_many(&mut conn, &bodies);
    wait_for("50 tallies", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-p") == 50).then_some(())
    });
    wait_for("request keys deleted", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    let c = redis.client();
    assert_eq!(
        c.request("tally", json!({"name": "p"})).unwrap(),
        Reply::Ok(json!(51))
    );
    assert_eq!(floor.stop(), 52);
}

#[test]
fn an_old_key_name_is_read_and_a_missing_or_unreadable_body_answered() {
    old_name_missing_and_unreadable(&[]);
}

#[test]
fn threaded_an_old_key_name_is_read_and_a_missing_or_unreadable_body_answered() {
    old_name_missing_and_unreadable(&["--threads", "--workers", "2"]);
}

fn old_name_missing_and_unreadable(flags: &[&str]) {
    let redis = Redis::start();
    let floor = Running::start(&redis, flags);
    let mut conn = redis.conn();
    let queue = |id: u64| {
        let mut conn = redis.conn();
        move || {
            redis::cmd("RPUSH")
                .arg("CERBAS-QUEUE")
                .arg(id)
                .query::<()>(&mut conn)
                .expect("RPUSH")
        }
    };
    // The original's later Python client writes P-REQUEST-…
    redis::cmd("SET")
        .arg("CERBAS-REQUEST-0000000041")
        .arg(r#"{"func":"echo","args":{"message":"old"}}"#)
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        redis.reply_for(41, false, queue(41)),
        Reply::Ok(json!("old"))
    );
    assert_eq!(
        redis.reply_for(42, true, queue(42)),
        Reply::Error("request not found: CERBAS-REQ-0000000042".into())
    );
    // A key that is not a string is read as missing (cerbas says "cannot be
    // read"); the take script goes on past it.
    redis::cmd("HSET")
        .arg("CERBAS-REQ-0000000043")
        .arg("f")
        .arg("v")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        redis.reply_for(43, false, queue(43)),
        Reply::Error("request not found: CERBAS-REQ-0000000043".into())
    );
    wait_for(
        "the old key and the hash deleted",
        Duration::from_secs(10),
        || leftover_keys(&mut conn).is_empty().then_some(()),
    );
    assert_eq!(floor.stop(), 3);
}

#[test]
fn threaded_concurrent_callers_each_get_their_own_replies() {
    let redis = Redis::start();
    let floor = Running::start(&redis, &["--threads", "--workers", "5"]);
    let client = Arc::new(redis.client());
    let (callers, calls) = (8, 40);
    let threads: Vec<_> = (0..callers)
        .map(|caller| {
            let c = client.clone();
            std::thread::spawn(move || {
                for i in 0..calls {
                    let message = json!({"caller": caller, "call": i});
                    let args = json!({ "message": message });
                    let got = if i % 2 == 0 {
                        c.request("echo", args)
                    } else {
                        c.request_msgpack("echo", args)
                    };
                    assert_eq!(got.expect("a reply"), Reply::Ok(message), "caller {caller}");
                    let n = c.request("tally", json!({"name": "shared"}));
                    assert!(
                        matches!(n, Ok(Reply::Ok(ref v)) if v.as_i64().is_some_and(|n| n >= 1)),
                        "a count, got {n:?}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("every caller got its own replies");
    }
    let mut conn = redis.conn();
    assert_eq!(get_int(&mut conn, "CERBAS-TALLY-shared"), callers * calls);
    wait_for("request keys deleted", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    assert_eq!(floor.stop(), 2 * (callers * calls) as u64);
}

#[test]
fn threaded_a_stop_answers_every_request_taken() {
    let redis = Redis::start();
    let floor = Running::start(&redis, &["--threads", "--workers", "2", "--batch", "5"]);
    let mut conn = redis.conn();
    let body = r#"{"func":"tally","args":{"name":"s"},"reply":false}"#.to_string();
    let ids = submit_many(&mut conn, &vec![body; 400]);
    wait_for("a first tally", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-s") > 0).then_some(())
    });
    let served = floor.stop();
    // What is still queued was never taken; everything else was answered and
    // its key deleted.
    let queued: Vec<u64> = redis::cmd("LRANGE")
        .arg("CERBAS-QUEUE")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    let left = queued.len() as u64;
    assert_eq!(served, 400 - left);
    assert_eq!(get_int(&mut conn, "CERBAS-TALLY-s") as u64, 400 - left);
    let mut expected: Vec<String> = ids[ids.len() - queued.len()..]
        .iter()
        .map(|id| format!("CERBAS-REQ-{id:010}"))
        .collect();
    assert_eq!(queued, ids[ids.len() - queued.len()..], "the queue's tail");
    if !queued.is_empty() {
        expected.push("CERBAS-QUEUE".into());
    }
    expected.sort();
    assert_eq!(leftover_keys(&mut conn), expected);
}

#[test]
fn threaded_the_floor_ends_with_an_error_when_redis_goes_away() {
    let mut redis = Redis::start();
    let floor = Running::start(&redis, &["--threads", "--workers", "2"]);
    let c = redis.client();
    assert_eq!(
        c.request("hello", json!({})).unwrap(),
        Reply::Ok(json!("hello world!"))
    );
    redis.restart(Duration::from_millis(100));
    assert!(floor.ended(Duration::from_secs(15)).is_err());
}

#[test]
fn the_lane_is_bounded_and_a_close_ends_it_after_what_waits() {
    let lane = Arc::new(Lane::new(2));
    lane.push(1).unwrap();
    lane.push(2).unwrap();
    let pusher = {
        let lane = lane.clone();
        std::thread::spawn(move || lane.push(3))
    };
    // The third push waits for room: the first pop makes it.
    assert_eq!(lane.pop(), Some(1));
    pusher.join().unwrap().expect("pushed once there was room");
    let sleeper = {
        let lane = lane.clone();
        std::thread::spawn(move || (lane.pop(), lane.pop(), lane.pop()))
    };
    lane.close();
    assert_eq!(sleeper.join().unwrap(), (Some(2), Some(3), None));
    assert_eq!(lane.push(4), Err(4), "no push after the close");
}

#[test]
fn a_chain_waking_lane_loses_no_item_to_sleeping_workers() {
    let lane = Arc::new(Lane::with_wakes(8, true));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let lane = lane.clone();
            std::thread::spawn(move || std::iter::from_fn(|| lane.pop()).collect::<Vec<u64>>())
        })
        .collect();
    for i in 0..200 {
        lane.push(i).expect("open");
    }
    // Every item is taken before the close: nobody slept through one.
    wait_for("the lane emptied", Duration::from_secs(10), || {
        lane.is_empty().then_some(())
    });
    lane.close();
    let mut all: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
}

#[test]
fn threaded_with_a_wake_per_job_concurrent_callers_get_their_own_replies() {
    let redis = Redis::start();
    let floor = Running::start(&redis, &["--threads", "--workers", "4", "--wake-per-job"]);
    let client = Arc::new(redis.client());
    let threads: Vec<_> = (0..6)
        .map(|caller| {
            let c = client.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    let message = json!([caller, i]);
                    let got = c.request("echo", json!({ "message": message }));
                    assert_eq!(got.expect("a reply"), Reply::Ok(message));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("every caller got its own replies");
    }
    assert_eq!(floor.stop(), 180);
}
