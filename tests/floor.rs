//! Tests of the protocol floor (`examples/floor.rs`, the yardstick `make bench`
//! measures cerbas against): the shipped Rust client gets the same replies from
//! it, in both forms, as from cerbas; one-way requests, bad queue entries and
//! tally's INCR (one at a time and pipelined) are served and their keys deleted.
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
use floor::{plan, serve, Args, Job, Work, READ_TIMEOUT};
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
        let mut conn = cerbas::connection::open(&client, READ_TIMEOUT).expect("connection");
        let keys = Keys::new("CERBAS", 1);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut served = 0;
            serve(&mut conn, &keys, &args, &flag, &mut served).map(|()| served)
        });
        Running { stop, handle }
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
    let redis = Redis::start();
    let floor = Running::start(&redis, &[]);
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
    let redis = Redis::start();
    let floor = Running::start(&redis, &[]);
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
