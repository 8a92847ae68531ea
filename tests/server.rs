//! End-to-end behaviour of a real server on a real redis-server: every example
//! function in both reply forms, the seed's late subscriber, the key fallbacks,
//! delays, width of the pool, and what is left in Redis afterwards.

mod common;

use cerbas::{Env, Reply};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn ok(v: Value) -> Reply {
    Reply::Ok(v)
}

fn err(m: &str) -> Reply {
    Reply::Error(m.into())
}

#[test]
fn every_example_function_answers_in_json_and_msgpack_to_a_late_subscriber() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let cases = [
        ("hello", json!({}), ok(json!("hello world!"))),
        ("echo", json!({"message": "ü€😀"}), ok(json!("ü€😀"))),
        (
            "withargs",
            json!({"foo": {"a": [1, 2]}}),
            ok(json!({"a": [1, 2]})),
        ),
        ("witherror", json!({}), err("unexpected error")),
        ("sum", json!({"a": 1, "b": 2}), ok(json!(3))),
        ("sum", json!({"a": 1.5, "b": -2}), ok(json!(-0.5))),
        ("dummy", json!({}), ok(Value::Null)),
        ("asyncfunc", json!({}), ok(json!(""))),
        ("sleep", json!({"ms": 5}), ok(json!(5))),
        ("primes", json!({"below": 100}), ok(json!(25))),
    ];
    for (func, args, want) in cases {
        for msgpack in [false, true] {
            for mode in [
                late(msgpack),
                Mode {
                    msgpack,
                    subscribe_late: false,
                },
            ] {
                let body = c.body(func, args.clone());
                let got = redis.call_mode(&c, &body, mode);
                assert_eq!(got, want, "{func} {mode:?}");
            }
        }
    }
    let e = c.request("sum", json!({"a": "x", "b": 1})).unwrap();
    assert!(
        matches!(&e, Reply::Error(m) if m.starts_with("invalid arguments: ")),
        "{e:?}"
    );
}

#[test]
fn slow_gets_timeout_under_the_default_deadline() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let start = Instant::now();
    assert_eq!(c.request("slow", json!({})).unwrap(), err("timeout"));
    // The deadline is 5 s: not earlier.
    assert!(start.elapsed() >= Duration::from_millis(4_900));
}

#[test]
fn tally_uses_redis_through_the_context() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    for n in 1..=3 {
        assert_eq!(
            c.request("tally", json!({"name": "t"})).unwrap(),
            ok(json!(n))
        );
    }
    assert_eq!(get_int(&mut redis.conn(), "CERBAS-TALLY-t"), 3);
}

#[test]
fn a_subscriber_that_comes_late_still_gets_the_reply() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let body = c.body("hello", json!({}));
    let id = c.submit(&body).unwrap();
    // Subscribe well after the server has answered (the grace period is 5 s).
    wait_for("the request key to go", Duration::from_secs(10), || {
        let exists: bool = redis::cmd("EXISTS")
            .arg(c.keys().request(id))
            .query(&mut redis.conn())
            .ok()?;
        (!exists).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = redis.reply_for(id, false, || ());
    assert_eq!(got, ok(json!("hello world!")));
}

#[test]
fn the_request_fallback_key_is_read_when_req_is_missing() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let mut conn = redis.conn();
    let id: u64 = redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(&mut conn)
        .unwrap();
    let body = c.body("echo", json!({"message": "old client"}));
    let reply = redis.reply_for(id, false, || {
        let key = c.keys().request_fallback(id);
        let queue = c.keys().queue();
        redis::pipe()
            .cmd("SET")
            .arg(key)
            .arg(&body)
            .cmd("RPUSH")
            .arg(queue)
            .arg(id)
            .query::<()>(&mut redis.conn())
            .expect("queue it");
    });
    assert_eq!(reply, ok(json!("old client")));
    let left: bool = redis::cmd("EXISTS")
        .arg(c.keys().request_fallback(id))
        .query(&mut conn)
        .unwrap();
    assert!(!left, "the fallback key is deleted once served");
}

/// One take of many ids: the first body comes with the take, the others by size
/// and `MGET`, from either key name, and an id without a body in between gets
/// its error while the rest run.
#[test]
fn a_batch_taken_at_once_reads_both_key_names_and_skips_a_missing_body() {
    let redis = Redis::start();
    let c = redis.client();
    let mut conn = redis.conn();
    let mut missing = 0;
    for i in 0..40u64 {
        let id: u64 = redis::cmd("INCR")
            .arg("CERBAS-COUNTER")
            .query(&mut conn)
            .unwrap();
        let key = match i % 3 {
            0 => c.keys().request(id),
            _ => c.keys().request_fallback(id),
        };
        let mut pipe = redis::pipe();
        if i == 17 {
            missing = id;
        } else {
            let body = c.body("tally", json!({"name": format!("batch-{i}")}));
            pipe.cmd("SET").arg(key).arg(body).ignore();
        }
        pipe.cmd("RPUSH").arg(c.keys().queue()).arg(id).ignore();
        pipe.query::<()>(&mut conn).unwrap();
    }
    let mut listen = redis.conn();
    let mut sub = listen.as_pubsub();
    sub.subscribe(c.keys().reply_channel(missing)).unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _server = Server::start(&redis);
    let msg = sub.get_message().expect("the missing body's error reply");
    let reply: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(reply["status"], "error", "{reply}");
    assert!(
        reply["data"].as_str().unwrap_or("").contains("not found"),
        "{reply}"
    );
    for i in (0..40).filter(|i| *i != 17) {
        let key = format!("CERBAS-TALLY-batch-{i}");
        wait_for(&key, Duration::from_secs(20), || {
            (get_int(&mut conn, &key) == 1).then_some(())
        });
    }
}

#[test]
fn requests_waiting_before_start_are_served_and_the_counter_is_kept() {
    let redis = Redis::start();
    let c = redis.client();
    let ids: Vec<u64> = (0..5)
        .map(|_| c.send("tally", json!({"name": "early"})).unwrap())
        .collect();
    let _server = Server::start(&redis);
    let mut conn = redis.conn();
    wait_for("5 early requests", Duration::from_secs(20), || {
        (get_int(&mut conn, "CERBAS-TALLY-early") == 5).then_some(())
    });
    // The counter goes on from where the clients left it (hello counted one more).
    assert!(get_int(&mut conn, "CERBAS-COUNTER") > *ids.last().unwrap() as i64);
}

#[test]
fn nothing_is_left_in_redis_after_the_replies() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    for _ in 0..20 {
        c.request("hello", json!({})).unwrap();
    }
    let mut conn = redis.conn();
    wait_for("acks", Duration::from_secs(10), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
}

#[test]
fn a_delayed_request_runs_no_earlier_than_its_delay() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let body = json!({"func": "hello", "user": "foo", "source": "web", "delay": 400});
    let start = Instant::now();
    let got = c
        .call(body.to_string().as_bytes(), &cerbas::CallOptions::default())
        .unwrap();
    assert_eq!(got, ok(json!("hello world!")));
    assert!(start.elapsed() >= Duration::from_millis(400));
}

/// Redis's clock (`TIME`) in µs.
fn redis_now_us(conn: &mut redis::Connection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn).expect("TIME");
    secs * 1_000_000 + micros
}

/// A delayed request is due (its score in `CERBAS-DELAYED`, whole ms) no earlier
/// than its delay after Redis's clock read before it was queued, to the µs. The
/// score was rounded down once, and the request could run up to 1 ms early; that
/// shows within a few tries when storing takes less than a millisecond.
#[test]
fn a_delayed_request_is_due_no_earlier_than_its_delay_to_the_microsecond() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let mut conn = redis.conn();
    let delay_ms = 60_000u64;
    let body = json!({"func": "hello", "user": "foo", "source": "web", "delay": delay_ms});
    for _ in 0..100 {
        let before = redis_now_us(&mut conn);
        let id = store(&mut conn, body.to_string().as_bytes());
        redis::cmd("RPUSH")
            .arg("CERBAS-QUEUE")
            .arg(id)
            .query::<()>(&mut conn)
            .expect("RPUSH");
        let due_ms: u64 = wait_for("the request scheduled", Duration::from_secs(10), || {
            redis::cmd("ZSCORE")
                .arg("CERBAS-DELAYED")
                .arg(id)
                .query::<Option<u64>>(&mut conn)
                .expect("ZSCORE")
        });
        assert!(
            due_ms * 1000 >= before + delay_ms * 1000,
            "request {id} due at {due_ms} ms, {} µs before its delay had passed",
            before + delay_ms * 1000 - due_ms * 1000
        );
    }
}

#[test]
fn the_default_pool_runs_a_hundred_sleeping_calls_at_once() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    // 100 calls of 3 s each: with fewer than 100 workers they would take 6 s or more.
    let start = Instant::now();
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let c = redis.client();
            std::thread::spawn(move || c.request("sleep", json!({"ms": 3000})))
        })
        .collect();
    for t in callers {
        assert_eq!(t.join().unwrap().unwrap(), ok(json!(3000)));
    }
    assert!(
        start.elapsed() < Duration::from_millis(5_900),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_password_in_the_url_works_and_never_reaches_the_log() {
    let redis = Redis::start_with(&[], Some("s3cret-pw"));
    let server = Server::start(&redis);
    assert_eq!(
        redis.client().request("hello", json!({})).unwrap(),
        ok(json!("hello world!"))
    );
    let log = server.log_text();
    assert!(log.contains("redis://:***@127.0.0.1"), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
}

#[test]
fn the_environment_chooses_redis_and_db_and_flags_win() {
    let redis = Redis::start();
    // CERBAS_ENV=prod → db 8.
    let _prod = Server::spawn(
        &redis,
        &[],
        &[("CERBAS_REDIS_URL", &redis.url()), ("CERBAS_ENV", "prod")],
    );
    let c = cerbas::Client::open(&redis.url(), Env::Prod)
        .unwrap()
        .identity("foo", "web");
    assert_eq!(c.keys().reply_channel(1), "CERBAS-RESPONSE-8-0000000001");
    assert_eq!(
        c.request("hello", json!({})).unwrap(),
        ok(json!("hello world!"))
    );
    // --env dev wins over CERBAS_ENV=prod → db 1.
    let dev = Server::spawn(&redis, &["--env", "dev"], &[("CERBAS_ENV", "prod")]);
    dev.wait_ready(&redis);
}

#[test]
fn help_lists_every_flag_and_bad_flags_are_refused() {
    let out = std::process::Command::new(bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--redis",
        "--env",
        "--workers",
        "--crontab",
        "--http",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = std::process::Command::new(bin())
        .args(["--workers", "0", "--config", &repo_file("cerbas.toml")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers must be 1 to 10000"));
    let out = std::process::Command::new(bin())
        .args(["--config", "/nonexistent/cerbas.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cerbas.toml"));
}

#[test]
fn ids_taken_before_a_broken_connection_are_served_after_it() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let log = server.log_text();
    let instance = log
        .split("instance ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .expect("instance name in the log")
        .to_string();
    let c = redis.client();
    let id: u64 = redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(&mut redis.conn())
        .unwrap();
    let body = c.body("echo", json!({"message": "recovered"}));
    let reply = redis.reply_for(id, false, || {
        let mut conn = redis.conn();
        // As if BLMOVE had moved the id but its reply was lost with the socket.
        redis::pipe()
            .cmd("SET")
            .arg(c.keys().request(id))
            .arg(&body)
            .cmd("RPUSH")
            .arg(format!("CERBAS-PROCESSING-{instance}"))
            .arg(id)
            .cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query::<()>(&mut conn)
            .expect("queue it");
    });
    assert_eq!(reply, ok(json!("recovered")));
    assert!(server.log_text().contains("redis unavailable"));
}

#[test]
fn calls_stuck_past_their_deadline_do_not_shrink_the_pool() {
    let redis = Redis::start();
    let config = config_with(
        "workers = 2\ndrain_timeout_ms = 300\n[functions.sleep]\ntimeout_ms = 1000\n[functions.slow]\ntimeout_ms = 1000\n",
    );
    let server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    // Five calls that don't return in time (6 s each: `sleep` refuses to sleep
    // past its deadline), on a pool of two.
    let stuck: Vec<_> = (0..5)
        .map(|_| {
            let c = redis.client();
            std::thread::spawn(move || c.request("slow", json!({})))
        })
        .collect();
    for t in stuck {
        assert_eq!(t.join().unwrap().unwrap(), err("timeout"));
    }
    // Two calls of 700 ms under a 1 s deadline: both in time only if the pool still
    // runs two at once.
    let pair: Vec<_> = (0..2)
        .map(|_| {
            let c = redis.client();
            std::thread::spawn(move || c.request("sleep", json!({"ms": 700})))
        })
        .collect();
    for t in pair {
        assert_eq!(t.join().unwrap().unwrap(), ok(json!(700)));
    }
    let log = server.log_text();
    assert_eq!(
        log.matches("started a replacement worker").count(),
        5,
        "{log}"
    );
}

#[test]
fn replacements_stop_at_max_hung_workers() {
    let redis = Redis::start();
    let config = config_with(
        "workers = 1\nmax_hung_workers = 1\ndrain_timeout_ms = 300\n[functions.slow]\ntimeout_ms = 300\n",
    );
    let server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    let c = redis.client();
    assert_eq!(c.request("slow", json!({})).unwrap(), err("timeout"));
    assert_eq!(c.request("slow", json!({})).unwrap(), err("timeout"));
    let log = wait_for("the cap to be logged", Duration::from_secs(10), || {
        let log = server.log_text();
        log.contains("no replacement").then_some(log)
    });
    assert_eq!(
        log.matches("started a replacement worker").count(),
        1,
        "{log}"
    );
}

#[test]
fn ok_replies_are_cached_per_function_and_arguments_errors_never() {
    let redis = Redis::start();
    let config =
        config_with("[functions.tally]\ncache_secs = 1\n[functions.witherror]\ncache_secs = 60\n");
    let _server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    let mut c = redis.client();
    let call = |c: &mut cerbas::Client, body: &str| {
        c.call(
            json!({"func": "tally", "args": serde_json::from_str::<Value>(body).unwrap(), "user": "foo", "source": "web"})
                .to_string()
                .as_bytes(),
            &cerbas::CallOptions::default(),
        )
        .unwrap()
    };
    assert_eq!(call(&mut c, r#"{"name": "x", "pad": 1}"#), ok(json!(1)));
    // Same arguments in another order: served from the cache, tally not run.
    assert_eq!(call(&mut c, r#"{"pad": 1, "name": "x"}"#), ok(json!(1)));
    assert_eq!(get_int(&mut redis.conn(), "CERBAS-TALLY-x"), 1);
    // Other arguments: a miss.
    assert_eq!(call(&mut c, r#"{"name": "y"}"#), ok(json!(1)));
    // After cache_secs the function runs again.
    wait_for("the cache entry to expire", Duration::from_secs(10), || {
        (call(&mut c, r#"{"name": "x", "pad": 1}"#) == ok(json!(2))).then_some(())
    });
    // Errors are never cached.
    assert_eq!(
        c.request("witherror", json!({})).unwrap(),
        err("unexpected error")
    );
    let cached: Vec<String> = redis::cmd("KEYS")
        .arg("CERBAS-CACHE-witherror-*")
        .query(&mut redis.conn())
        .unwrap();
    assert!(cached.is_empty(), "{cached:?}");
}
