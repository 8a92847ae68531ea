//! Fault tests (DESIGN §4) with real processes: `kill -9` of a server with requests
//! in flight, a redis-server restart (AOF on) while requests flow, and three
//! instances sharing one queue. Each request's effect is counted in Redis by the
//! `tally` example function (one counter per request), so "served once", "lost"
//! and "duplicated" are measured, not assumed. The numbers are printed (run with
//! `--nocapture` to see them).

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tally_body(name: &str, delay: Option<u64>) -> String {
    let mut b = json!({"func": "tally", "args": {"name": name}, "user": "foo", "source": "web"});
    if let Some(d) = delay {
        b["delay"] = json!(d);
    }
    b.to_string()
}

/// The tally of each name (0 if it never ran).
fn tallies(conn: &mut redis::Connection, names: &[String]) -> Vec<i64> {
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|n| format!("CERBAS-TALLY-{n}")).collect();
        let got: Vec<Option<i64>> = redis::cmd("MGET").arg(keys).query(conn).unwrap();
        out.extend(got.into_iter().map(|v| v.unwrap_or(0)));
    }
    out
}

fn wait_all_served(conn: &mut redis::Connection, names: &[String], timeout: Duration) -> Vec<i64> {
    wait_for("every request served", timeout, || {
        let t = tallies(conn, names);
        t.iter().all(|v| *v >= 1).then_some(t)
    })
}

#[test]
fn kill_9_with_5000_requests_in_flight_loses_none() {
    let redis = Redis::start();
    let mut server = Server::start(&redis);
    let mut conn = redis.conn();
    let n = 5000;
    let names: Vec<String> = (0..n).map(|i| format!("k9-{i}")).collect();
    // A tenth delayed, by 0.3 to 0.9 s.
    let bodies: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, name)| tally_body(name, (i % 10 == 0).then_some(300 + (i as u64 % 7) * 100)))
        .collect();
    submit_many(&mut conn, &bodies);
    wait_for("the server to be busy", Duration::from_secs(20), || {
        let q: i64 = redis::cmd("LLEN")
            .arg("CERBAS-QUEUE")
            .query(&mut conn)
            .ok()?;
        (q <= n as i64 - 1000).then_some(())
    });
    server.kill();
    let killed = Instant::now();
    // What the killed instance held: taken and not yet acknowledged (running,
    // waiting for a worker, or run with its ack not yet in Redis).
    let held: i64 = {
        let lists: Vec<String> = redis::cmd("KEYS")
            .arg("CERBAS-PROCESSING-*")
            .query(&mut conn)
            .expect("KEYS");
        lists
            .iter()
            .map(|l| {
                redis::cmd("LLEN")
                    .arg(l)
                    .query::<i64>(&mut conn)
                    .expect("LLEN")
            })
            .sum()
    };
    let served_at_kill = tallies(&mut conn, &names)
        .iter()
        .filter(|v| **v > 0)
        .count();
    let _next = Server::start(&redis);
    let t = wait_all_served(&mut conn, &names, Duration::from_secs(60));
    let recovered = killed.elapsed();
    wait_for("nothing left held", Duration::from_secs(20), || {
        leftover_keys(&mut conn).is_empty().then_some(())
    });
    let duplicates: i64 = t.iter().map(|v| v - 1).sum();
    eprintln!(
        "kill -9: {n} requests ({} delayed), {served_at_kill} served before the kill, {held} held; \
         after restart served {n}, lost 0, duplicates {duplicates}, all served {:.1}s after the kill",
        n / 10,
        recovered.as_secs_f64()
    );
    // At least once: only a request the killed instance held can run twice. (A
    // fixed bound, 400, failed once at 407 with tests running in parallel: the
    // number held grows with the publisher's backlog of acks on a busy machine.)
    assert!(
        duplicates <= held,
        "{duplicates} duplicates, more than the {held} requests the killed instance held"
    );
}

#[test]
fn a_redis_restart_with_aof_loses_no_request_that_reached_redis() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"], None);
    let mut server = Server::start(&redis);
    let sent = Arc::new(AtomicUsize::new(0));
    let url = redis.url_db(1);
    let sender = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let client = redis::Client::open(url.as_str()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut ok = 0;
            while ok < 3000 && Instant::now() < deadline {
                let attempt = client.get_connection().and_then(|mut c| {
                    let id: u64 = redis::cmd("INCR").arg("CERBAS-COUNTER").query(&mut c)?;
                    let body = json!({"func": "echo", "args": {"message": id}, "user": "foo", "source": "web"});
                    redis::pipe()
                        .atomic()
                        .cmd("SET")
                        .arg(format!("CERBAS-REQ-{id:010}"))
                        .arg(body.to_string())
                        .cmd("RPUSH")
                        .arg("CERBAS-QUEUE")
                        .arg(id)
                        .query::<()>(&mut c)
                });
                match attempt {
                    Ok(()) => {
                        ok += 1;
                        sent.store(ok, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            ok
        })
    };
    wait_for("requests flowing", Duration::from_secs(20), || {
        (sent.load(Ordering::SeqCst) >= 500).then_some(())
    });
    redis.restart(Duration::from_millis(1500));
    let back = Instant::now();
    // Time to recover: until the server answers again.
    server.wait_ready(&redis);
    let recovered = back.elapsed();
    assert_eq!(sender.join().unwrap(), 3000);
    let mut conn = redis.conn();
    wait_for(
        "every stored request served",
        Duration::from_secs(60),
        || {
            let q: i64 = redis::cmd("LLEN")
                .arg("CERBAS-QUEUE")
                .query(&mut conn)
                .ok()?;
            (q == 0 && leftover_keys(&mut conn).is_empty()).then_some(())
        },
    );
    eprintln!(
        "redis restart: 3000 requests sent around a 1.5 s outage, all stored ones served; \
         answering again {:.2}s after redis came back, queue drained after {:.1}s",
        recovered.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server lives"
    );
    server.wait_ready(&redis);
    let log = server.log_text();
    assert!(log.contains("redis unavailable, retrying"), "{log}");
    assert!(log.contains("redis is back after"), "{log}");
    // Once per outage per thread, not once per retry.
    assert!(
        log.matches("reader: redis unavailable").count() <= 2,
        "{log}"
    );
}

#[test]
fn three_instances_serve_10000_requests_exactly_once() {
    let redis = Redis::start();
    let servers: Vec<Server> = (0..3).map(|_| Server::start(&redis)).collect();
    let mut conn = redis.conn();
    let n = 10_000;
    let names: Vec<String> = (0..n).map(|i| format!("three-{i}")).collect();
    let bodies: Vec<String> = names.iter().map(|name| tally_body(name, None)).collect();
    let start = Instant::now();
    submit_many(&mut conn, &bodies);
    let t = wait_all_served(&mut conn, &names, Duration::from_secs(90));
    let took = start.elapsed();
    let duplicates: i64 = t.iter().map(|v| v - 1).sum();
    let per_instance: Vec<usize> = servers
        .iter()
        .map(|s| {
            s.log_text()
                .lines()
                .filter(|l| l.contains("taking requests"))
                .count()
        })
        .collect();
    eprintln!(
        "three instances: {n} requests served in {:.1}s, lost 0, duplicates {duplicates}",
        took.as_secs_f64()
    );
    assert_eq!(per_instance, [1, 1, 1]);
    assert_eq!(duplicates, 0, "each request served exactly once");
}
