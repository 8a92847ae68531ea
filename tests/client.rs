//! The Rust client (`src/client/`) against a real redis-server and a real cerbas
//! server: one client shared by many threads, Redis restarted, killed
//! connections, a frozen Redis (also behind a big write that blocks), close,
//! replies published the moment a request is queued or before a reconnected
//! client subscribed again (the server's republish), a connect to an address
//! that does not answer, and each kind of error.
//! Not for: the server's own behaviour (server.rs).

mod common;

use cerbas::{CallOptions, Client, ClientError, Env, Reply};
use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Channels the client is subscribed to now (as Redis sees them).
fn reply_channels(redis: &Redis) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("*CERBAS-RESPONSE-*")
        .query(&mut redis.conn())
        .expect("PUBSUB CHANNELS")
}

/// Waits until `n` calls wait for their replies (subscribed, and the server
/// has taken their requests).
fn wait_in_flight(redis: &Redis, n: usize) {
    wait_for("calls in flight", Duration::from_secs(10), || {
        let queued: i64 = redis::cmd("LLEN")
            .arg("CERBAS-QUEUE")
            .query(&mut redis.conn())
            .ok()?;
        (reply_channels(redis).len() == n && queued == 0).then_some(())
    });
}

#[test]
fn sixteen_threads_sharing_one_client_each_get_their_own_replies() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut redis.conn())
        .expect("CONFIG RESETSTAT");
    let threads: Vec<JoinHandle<()>> = (0..16)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for n in 0..50 {
                    let message = format!("thread {t} call {n}");
                    let reply = c.request("echo", json!({ "message": message }));
                    assert_eq!(reply, Ok(Reply::Ok(json!(message))));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a caller thread");
    }
    // 800 calls took 8 blocks of 100 ids: one INCRBY per 100 requests.
    let incrby = info_field(&mut redis.conn(), "commandstats", "cmdstat_incrby");
    assert!(incrby.starts_with("calls=8,"), "{incrby}");
    // An idle client holds no subscriptions.
    wait_for("no subscriptions left", Duration::from_secs(5), || {
        reply_channels(&redis).is_empty().then_some(())
    });
}

#[test]
fn a_redis_restart_fails_calls_in_flight_at_once_and_the_client_recovers() {
    let mut redis = Redis::start();
    let _server = Server::start(&redis);
    let a = Arc::new(redis.client());
    let waiting = {
        let a = a.clone();
        std::thread::spawn(move || {
            let r = a.request("sleep", json!({"ms": 4000}));
            (r, Instant::now())
        })
    };
    wait_in_flight(&redis, 1);
    redis.restart(Duration::from_millis(200));
    let back = Instant::now();
    // The counter set back: the next request of any client reuses the waiting
    // call's id 1, and its reply goes to the same channel.
    redis::cmd("SET")
        .arg("CERBAS-COUNTER")
        .arg(0)
        .query::<()>(&mut redis.conn())
        .expect("set the counter back");
    let b = redis.client();
    assert_eq!(
        b.request("echo", json!({"message": "B"})),
        Ok(Reply::Ok(json!("B")))
    );
    let (got, at) = waiting.join().expect("the waiting caller");
    assert!(
        matches!(&got, Err(ClientError::Connection(m)) if m.contains("restarted")),
        "{got:?}"
    );
    assert!(
        at.saturating_duration_since(back) < Duration::from_secs(2),
        "failed {:?} after Redis came back",
        at.saturating_duration_since(back)
    );
    // The same client goes on, with ids of a new block (101 and up: B has 1-100).
    for n in 0..5 {
        let message = format!("A again {n}");
        assert_eq!(
            a.request("echo", json!({ "message": message })),
            Ok(Reply::Ok(json!(message)))
        );
    }
    assert_eq!(get_int(&mut redis.conn(), "CERBAS-COUNTER"), 200);
}

#[test]
fn an_id_taken_before_a_restart_is_not_sent_to_the_restarted_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let a = redis.client();
    assert_eq!(a.send("hello", json!({})), Ok(1)); // ids 1-100 in hand
    let (down_tx, down_rx) = std::sync::mpsc::channel();
    let restarter = std::thread::spawn(move || {
        let mut redis = redis;
        redis.restart(Duration::from_millis(1000));
        let _ = down_tx.send(());
        redis
    });
    wait_for(
        "the client to see Redis go",
        Duration::from_secs(10),
        || (!a.connected()).then_some(()),
    );
    // While Redis is away a call fails at its deadline with a connection error.
    let start = Instant::now();
    let short = CallOptions::new().timeout(Duration::from_millis(200));
    assert!(matches!(
        a.request_with("hello", json!({}), &short),
        Err(ClientError::Connection(m)) if m.contains("unavailable")
    ));
    assert!(start.elapsed() < Duration::from_millis(400));
    // Taken from the old block (id 3), it waits for the connection; the restarted
    // Redis counts from 0 again, so id 3 would be anyone's: a new block is taken.
    let id = a.send("hello", json!({}));
    down_rx.recv().expect("the restart");
    let redis = restarter.join().expect("the restarter");
    assert_eq!(id, Ok(1));
    assert_eq!(get_int(&mut redis.conn(), "CERBAS-COUNTER"), 100);
    assert!(a.connected());
    assert_eq!(redis.url(), url);
}

#[test]
fn a_killed_connection_to_the_same_redis_keeps_the_calls_that_were_queued() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let waiting = {
        let c = c.clone();
        std::thread::spawn(move || c.request("sleep", json!({"ms": 1000})))
    };
    wait_in_flight(&redis, 1);
    // By its id: Redis 7.0 counts a RESP3 connection with subscriptions as
    // `pubsub` (`TYPE normal` killed only the server's connections here).
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "ID", &subscribed_client_id(&redis)])
        .query(&mut redis.conn())
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    assert_eq!(
        waiting.join().expect("the waiting caller"),
        Ok(Reply::Ok(json!(1000)))
    );
    assert_eq!(
        c.request("hello", json!({})),
        Ok(Reply::Ok(json!("hello world!")))
    );
}

#[test]
fn a_frozen_redis_gets_the_callers_own_timeout() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let warm = redis.client();
    assert!(warm.request("hello", json!({})).is_ok());
    let fresh = redis.client(); // no id block yet: its first call needs INCRBY
    redis.pause();
    let second = Duration::from_secs(1);
    let opts = CallOptions::new().timeout(second);
    for c in [&warm, &fresh] {
        let start = Instant::now();
        let got = c.request_with("hello", json!({}), &opts);
        let took = start.elapsed();
        assert_eq!(got, Err(ClientError::Timeout(second)));
        assert!(
            took >= second && took < second + Duration::from_millis(500),
            "{took:?}"
        );
    }
    redis.resume();
    assert!(warm.request("hello", json!({})).is_ok());
    assert!(fresh.request("hello", json!({})).is_ok());
}

#[test]
fn closing_fails_calls_in_flight_at_once_and_every_later_call() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let callers: Vec<JoinHandle<(Result<Reply, ClientError>, Instant)>> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || (c.request("sleep", json!({"ms": 3000})), Instant::now()))
        })
        .collect();
    wait_in_flight(&redis, 4);
    let closed = Instant::now();
    c.close();
    for t in callers {
        let (got, at) = t.join().expect("a caller");
        assert_eq!(got, Err(ClientError::Closed));
        assert!(at.saturating_duration_since(closed) < Duration::from_millis(500));
    }
    let start = Instant::now();
    assert_eq!(c.request("hello", json!({})), Err(ClientError::Closed));
    assert_eq!(c.send("hello", json!({})), Err(ClientError::Closed));
    assert!(start.elapsed() < Duration::from_millis(100));
    c.close(); // twice is fine
}

/// A stand-in server with no republish: takes each queued id and publishes
/// `payload(id)` on its reply channel at once, recording how many subscribers
/// received it. Stops when `stop` is set.
fn responder(
    redis: &Redis,
    stop: Arc<AtomicBool>,
    payload: fn(u64) -> Vec<u8>,
) -> (JoinHandle<()>, Arc<Mutex<Vec<i64>>>) {
    let mut conn = redis.conn();
    let receivers = Arc::new(Mutex::new(Vec::new()));
    let got = receivers.clone();
    let handle = std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let taken: Option<(String, u64)> = redis::cmd("BLPOP")
                .arg("CERBAS-QUEUE")
                .arg(0.2)
                .query(&mut conn)
                .expect("BLPOP");
            let Some((_, id)) = taken else { continue };
            let n: i64 = redis::cmd("PUBLISH")
                .arg(format!("CERBAS-RESPONSE-1-{id:010}"))
                .arg(payload(id))
                .query(&mut conn)
                .expect("PUBLISH");
            got.lock().expect("the list").push(n);
        }
    });
    (handle, receivers)
}

#[test]
fn a_reply_published_the_moment_the_request_is_queued_is_never_lost() {
    let redis = Redis::start();
    let stop = Arc::new(AtomicBool::new(false));
    let (fake, receivers) = responder(&redis, stop.clone(), |id| {
        format!(r#"{{"status":"ok","data":{id}}}"#).into_bytes()
    });
    let c = Arc::new(redis.client().timeout(Duration::from_secs(5)));
    let callers: Vec<JoinHandle<Vec<u64>>> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| match c.request("hello", json!({})) {
                        Ok(Reply::Ok(v)) => v.as_u64().expect("an id"),
                        other => panic!("{other:?}"),
                    })
                    .collect()
            })
        })
        .collect();
    let mut ids: Vec<u64> = callers
        .into_iter()
        .flat_map(|t| t.join().expect("a caller"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    fake.join().expect("the responder");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 400, "every caller got its own reply");
    let receivers = receivers.lock().expect("the list");
    assert_eq!(receivers.len(), 400);
    assert!(
        receivers.iter().all(|&n| n == 1),
        "each reply, published once, had its subscriber"
    );
}

#[test]
fn each_failure_has_its_own_error_type() {
    let redis = Redis::start();
    // Nothing listens there: a connection error, not an I/O error.
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    assert!(matches!(
        Client::open(&nowhere, Env::Dev),
        Err(ClientError::Connection(_))
    ));
    assert!(matches!(
        Client::open("redis://127.0.0.1:6379/x", Env::Dev),
        Err(ClientError::Config(_))
    ));
    // A reply that is not JSON.
    let stop = Arc::new(AtomicBool::new(false));
    let (fake, _) = responder(&redis, stop.clone(), |_| b"not json".to_vec());
    let c = redis.client();
    assert!(matches!(
        c.request("hello", json!({})),
        Err(ClientError::Protocol(_))
    ));
    stop.store(true, Ordering::SeqCst);
    fake.join().expect("the responder");
    // Redis refuses: the queue is not a list.
    let mut conn = redis.conn();
    redis::cmd("SET")
        .arg("CERBAS-QUEUE")
        .arg("x")
        .query::<()>(&mut conn)
        .expect("SET");
    assert!(matches!(
        c.request("hello", json!({})),
        Err(ClientError::Refused(m)) if m.contains("WRONGTYPE")
    ));
    redis::cmd("DEL")
        .arg("CERBAS-QUEUE")
        .query::<()>(&mut conn)
        .expect("DEL");
    // ... or the counter is not a number (a fresh client needs a block).
    redis::cmd("SET")
        .arg("CERBAS-COUNTER")
        .arg("abc")
        .query::<()>(&mut conn)
        .expect("SET");
    assert!(matches!(
        redis.client().send("hello", json!({})),
        Err(ClientError::Refused(_))
    ));
    redis::cmd("DEL")
        .arg("CERBAS-COUNTER")
        .query::<()>(&mut conn)
        .expect("DEL");
    // With a server: the function's own error, and a timeout.
    let _server = Server::start(&redis);
    let c = redis.client();
    assert_eq!(c.invoke("sum", json!({"a": 1, "b": 2})), Ok(json!(3)));
    assert_eq!(
        c.invoke("witherror", json!({})),
        Err(ClientError::Reply("unexpected error".into()))
    );
    let short = Duration::from_millis(300);
    assert_eq!(
        c.request_with(
            "sleep",
            json!({"ms": 2000}),
            &CallOptions::new().timeout(short)
        ),
        Err(ClientError::Timeout(short))
    );
}

#[test]
fn user_source_and_delay_are_per_call() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = redis.client();
    let nobody = CallOptions::new().user("nobody");
    assert_eq!(
        c.request_with("hello", json!({}), &nobody),
        Ok(Reply::Error("user not registered: nobody".into()))
    );
    let bad_source = CallOptions::new().user("tom").source("elsewhere");
    assert_eq!(
        c.request_with("hello", json!({}), &bad_source),
        Ok(Reply::Error("source not registered: elsewhere".into()))
    );
    let start = Instant::now();
    let later = CallOptions::new()
        .delay(Duration::from_millis(400))
        .msgpack(true);
    assert_eq!(
        c.request_with("hello", json!({}), &later),
        Ok(Reply::Ok(json!("hello world!")))
    );
    assert!(start.elapsed() >= Duration::from_millis(400));
    // The client's own identity still applies to the next call.
    assert_eq!(
        c.request("hello", json!({})),
        Ok(Reply::Ok(json!("hello world!")))
    );
}

#[test]
fn a_unix_socket_url_works() {
    let dir = scratch("unix");
    let path = dir.join("redis.sock");
    let redis = Redis::start_with(&["--unixsocket", path.to_str().expect("a path")], None);
    let _server = Server::start(&redis);
    let url = format!("redis+unix://{}?db=1", path.display());
    let c = Client::open(&url, Env::Dev).expect("a client over the socket");
    assert_eq!(
        c.request("echo", json!({"message": "unix"})),
        Ok(Reply::Ok(json!("unix")))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bytes waiting in the send queues of the TCP connections to Redis on `port`
/// (from /proc/net/tcp): how much a writer has pushed that a frozen Redis has
/// not read.
fn unsent_to(port: u16) -> u64 {
    tcp_sockets()
        .iter()
        .filter(|s| s.remote_port == port)
        .map(|s| s.tx_queue)
        .sum()
}

/// Bytes this process's connections to Redis on `port` sent that Redis has not
/// read yet (its ends' receive queues).
fn unread_by_redis_from_here(port: u16) -> u64 {
    let sockets = tcp_sockets();
    let own = own_socket_inodes();
    let mine: std::collections::HashSet<u16> = sockets
        .iter()
        .filter(|s| s.remote_port == port && own.contains(&s.inode))
        .map(|s| s.local_port)
        .collect();
    sockets
        .iter()
        .filter(|s| s.local_port == port && mine.contains(&s.remote_port))
        .map(|s| s.rx_queue)
        .sum()
}

/// With the test's Redis frozen, a 32 MB `echo` (more than the loopback socket
/// buffers hold) on `c` with `timeout`: returns once its write blocks, with the
/// call's thread (its result and when it ended).
fn a_big_write_blocked_on(
    redis: &Redis,
    c: &Arc<Client>,
    timeout: Duration,
) -> JoinHandle<(Result<Reply, ClientError>, Instant)> {
    let big = {
        let c = c.clone();
        std::thread::spawn(move || {
            let message = "x".repeat(32 << 20);
            let opts = CallOptions::new().timeout(timeout);
            let got = c.request_with("echo", json!({ "message": message }), &opts);
            (got, Instant::now())
        })
    };
    wait_for("the big write blocks", Duration::from_secs(10), || {
        (unsent_to(redis.port) > 1 << 20).then_some(())
    });
    big
}

/// A call whose big request blocks on the socket of a frozen Redis holds the
/// connection's writer until its own deadline: a later call on the same client
/// with a shorter deadline must still get its own timeout at its deadline, not
/// wait on the writer's lock until the big call gives up.
#[test]
fn a_call_behind_a_big_write_to_a_frozen_redis_gets_its_own_timeout() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    assert!(c.request("hello", json!({})).is_ok(), "warm: ids in hand");
    redis.pause();
    let big = a_big_write_blocked_on(&redis, &c, Duration::from_secs(6));
    let second = Duration::from_secs(1);
    let start = Instant::now();
    let got = c.request_with("hello", json!({}), &CallOptions::new().timeout(second));
    let took = start.elapsed();
    assert_eq!(got, Err(ClientError::Timeout(second)), "after {took:?}");
    assert!(
        took >= second && took < second + Duration::from_millis(500),
        "its own deadline, not the big call's: {took:?}"
    );
    assert_eq!(
        big.join().expect("the big caller").0,
        Err(ClientError::Timeout(Duration::from_secs(6)))
    );
    redis.resume();
    assert!(c.request("hello", json!({})).is_ok(), "recovers");
}

/// Whether thread `tid` of this process is blocked in `futex(2)` (waiting on a
/// lock or a condition variable), from /proc/self/task/TID/syscall.
fn in_futex(tid: i32) -> bool {
    let futex = libc::SYS_futex.to_string();
    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
        .is_ok_and(|s| s.split_whitespace().next() == Some(futex.as_str()))
}

/// `close()` while a big request blocks on the socket of a frozen Redis and
/// three calls wait for their turn to write behind it: the close returns at
/// once and every one of them gets `Closed` at once, not when the big write
/// times out.
#[test]
fn closing_during_a_big_write_to_a_frozen_redis_ends_it_at_once() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    assert!(c.request("hello", json!({})).is_ok(), "warm: ids in hand");
    redis.pause();
    let big = a_big_write_blocked_on(&redis, &c, Duration::from_secs(8));
    let behind: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                // SAFETY: gettid has no memory effects.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let opts = CallOptions::new().timeout(Duration::from_secs(8));
                (c.request_with("hello", json!({}), &opts), Instant::now())
            });
            let tid = tid_rx.recv().expect("its thread id");
            wait_for(
                "a call waiting for its turn",
                Duration::from_secs(10),
                || in_futex(tid).then_some(()),
            );
            t
        })
        .collect();
    let start = Instant::now();
    c.close();
    let close_took = start.elapsed();
    let (got, at) = big.join().expect("the big caller");
    let behind: Vec<_> = behind
        .into_iter()
        .map(|t| t.join().expect("a caller behind"))
        .collect();
    redis.resume();
    for (got, at) in behind {
        assert_eq!(got, Err(ClientError::Closed));
        let after = at.saturating_duration_since(start);
        assert!(
            after < Duration::from_millis(500),
            "ended {after:?} after the close"
        );
    }
    assert!(
        close_took < Duration::from_millis(500),
        "close took {close_took:?}"
    );
    assert_eq!(got, Err(ClientError::Closed));
    assert!(
        at.saturating_duration_since(start) < Duration::from_millis(500),
        "the big caller ended {:?} after the close",
        at.saturating_duration_since(start)
    );
}

/// Sixteen threads share one client, mixing one-way requests (which wait for
/// Redis's acknowledgements) and requests waiting for their replies. Redis is
/// then frozen with one call of each thread in flight, each with a deadline of
/// its own: each gets `Timeout` at its own deadline, not before and not much
/// later; after `SIGCONT` every thread's calls succeed again.
#[test]
fn sixteen_threads_mixing_one_way_and_replies_each_time_out_on_their_own_through_a_frozen_redis() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let threads = 16;
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let mixed = |c: &Client, t: usize, n: usize| {
        if (t + n).is_multiple_of(2) {
            assert!(c.send("hello", json!({})).is_ok(), "a one-way request");
        } else {
            let message = format!("{t}/{n}");
            let reply = c.request("echo", json!({ "message": message }));
            assert_eq!(reply, Ok(Reply::Ok(json!(message))));
        }
    };
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (c, barrier) = (c.clone(), barrier.clone());
            std::thread::spawn(move || {
                for n in 0..20 {
                    mixed(&c, t, n);
                }
                barrier.wait(); // then Redis is frozen
                barrier.wait();
                let own = Duration::from_millis(600 + 50 * t as u64);
                let opts = CallOptions::new().timeout(own);
                let start = Instant::now();
                let got = if t % 2 == 0 {
                    c.send_with("hello", json!({}), &opts).map(|_| ())
                } else {
                    c.request_with("hello", json!({}), &opts).map(|_| ())
                };
                let took = start.elapsed();
                barrier.wait(); // then Redis runs again
                barrier.wait();
                for n in 0..20 {
                    mixed(&c, t, n);
                }
                (got, own, took)
            })
        })
        .collect();
    barrier.wait();
    redis.pause();
    barrier.wait();
    barrier.wait();
    redis.resume();
    barrier.wait();
    for w in workers {
        let (got, own, took) = w.join().expect("a caller thread");
        assert_eq!(got, Err(ClientError::Timeout(own)), "after {took:?}");
        assert!(
            took >= own && took < own + Duration::from_millis(500),
            "{took:?} for a deadline of {own:?}"
        );
    }
}

/// With the test's Redis frozen, a small `hello` in flight on `c` (deadline
/// `own`), then a big request whose write blocks and times out at its 1 s
/// deadline: the client cuts the shared connection (part of the big command is
/// written). Returns the small call's thread (its result and how long it took)
/// once the big call has failed.
fn a_small_call_behind_a_cut(
    redis: &Redis,
    c: &Arc<Client>,
    own: Duration,
) -> JoinHandle<(Result<Reply, ClientError>, Duration)> {
    assert!(c.request("hello", json!({})).is_ok(), "warm: ids in hand");
    // Built before the deadline starts: 32 MB, more than the socket buffers.
    let big = c.body("echo", json!({ "message": "x".repeat(32 << 20) }));
    redis.pause();
    let small = {
        let c = c.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let got = c.request_with("hello", json!({}), &CallOptions::new().timeout(own));
            (got, start.elapsed())
        })
    };
    // Written: its bytes wait, unread, in the frozen Redis's end of one of this
    // process's connections (the client's). Not the client's unacknowledged
    // bytes: loopback acknowledges at once, so those showed only by luck.
    wait_for("the small call is written", Duration::from_secs(5), || {
        (unread_by_redis_from_here(redis.port) > 0).then_some(())
    });
    let second = Duration::from_secs(1);
    let got = c.call(&big, &CallOptions::new().timeout(second));
    assert_eq!(got, Err(ClientError::Timeout(second)));
    small
}

/// A call in flight when a big write times out on a frozen Redis and the client
/// cuts the shared connection: its request is whole in Redis's socket, so it is
/// not failed early with a connection error; Redis staying frozen, it gets its
/// own `Timeout` at its own deadline.
#[test]
fn a_big_write_timing_out_on_a_frozen_redis_leaves_the_other_calls_their_own_timeout() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let own = Duration::from_secs(4);
    let small = a_small_call_behind_a_cut(&redis, &c, own);
    let (got, took) = small.join().expect("the small call");
    redis.resume();
    assert_eq!(got, Err(ClientError::Timeout(own)), "after {took:?}");
    assert!(took >= own, "{took:?}");
}

/// The same cut, and Redis wakes before the small call's deadline: its request
/// runs then (its bytes were in Redis's socket), the client reconnects and
/// subscribes to its channel again, and it gets its reply.
#[test]
fn a_call_in_flight_across_a_cut_gets_its_reply_once_redis_wakes() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let own = Duration::from_secs(10);
    let small = a_small_call_behind_a_cut(&redis, &c, own);
    redis.resume();
    let (got, took) = small.join().expect("the small call");
    assert_eq!(got, Ok(Reply::Ok(json!("hello world!"))), "after {took:?}");
    assert!(
        c.request("hello", json!({})).is_ok(),
        "the client works after"
    );
}

/// A cut on a frozen Redis, then `close()`: the call in flight, which the cut
/// left waiting for its deadline, fails at once with `Closed`, and so does a
/// later call.
#[test]
fn closing_after_a_cut_fails_the_call_in_flight_at_once() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let own = Duration::from_secs(15);
    let small = a_small_call_behind_a_cut(&redis, &c, own);
    c.close();
    let (got, took) = small.join().expect("the small call");
    redis.resume();
    assert_eq!(got, Err(ClientError::Closed), "after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(c.request("hello", json!({})), Err(ClientError::Closed));
}

/// A cut on a frozen Redis, then Redis killed and started again (empty): the
/// call in flight does not wait for its own deadline; it fails once the client
/// reconnects to the new Redis (its id may be given again there), and the
/// client works after.
#[test]
fn a_redis_killed_while_frozen_after_a_cut_fails_the_call_in_flight_at_the_reconnect() {
    let mut redis = Redis::start();
    let _server = Server::start(&redis);
    let c = Arc::new(redis.client());
    let pid: i32 = info_field(&mut redis.conn(), "server", "process_id")
        .parse()
        .expect("process_id");
    let own = Duration::from_secs(15);
    let small = a_small_call_behind_a_cut(&redis, &c, own);
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    redis.restart(Duration::ZERO);
    let (got, took) = small.join().expect("the small call");
    assert!(
        matches!(&got, Err(ClientError::Connection(e)) if e.contains("restarted")),
        "{got:?} after {took:?}"
    );
    assert!(took < own, "{took:?}");
    let works = wait_for("the client works", Duration::from_secs(10), || {
        c.request("hello", json!({})).ok()
    });
    assert_eq!(works, Reply::Ok(json!("hello world!")));
}

/// Redis healthy, but the client's connection stalls on the way (a relay stops
/// passing on what the client sends) so a big write times out and cuts it: a
/// later call gets a new connection and its reply, within its own timeout.
#[test]
fn after_a_cut_of_a_stalled_connection_to_a_healthy_redis_later_calls_work() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let relay = Relay::start(redis.port);
    let c = Client::open(&relay.url(), Env::Dev).expect("client through the relay");
    assert!(c.request("hello", json!({})).is_ok(), "warm: ids in hand");
    let held = relay.hold(b"stall-here");
    let big = c.body("echo", json!({ "message": "stall-here".repeat(3 << 20) }));
    let second = Duration::from_secs(1);
    let got = c.call(&big, &CallOptions::new().timeout(second));
    assert_eq!(got, Err(ClientError::Timeout(second)));
    held.recv_timeout(Duration::from_secs(5))
        .expect("the relay holds");
    let later = Duration::from_secs(5);
    let got = c.request_with("hello", json!({}), &CallOptions::new().timeout(later));
    relay.release();
    assert_eq!(got, Ok(Reply::Ok(json!("hello world!"))));
}

/// The id of the one client Redis sees subscribed to a channel (`sub=` in
/// `CLIENT LIST`): the client under test, whatever type this Redis version
/// gives a RESP3 connection with subscriptions.
fn subscribed_client_id(redis: &Redis) -> String {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.conn())
        .expect("CLIENT LIST");
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f.starts_with("sub=") && f != "sub=0"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 1, "one subscribed client:\n{list}");
    ids[0].clone()
}

/// The late-subscriber guarantee for this client: a call in flight when its
/// connection is killed, and its re-subscription on the new connection held
/// back (a relay) until the server has published the reply to nobody. The
/// server holds it and publishes it again once the `SUBSCRIBE` reaches Redis:
/// the call gets its own reply, published to it once.
#[test]
fn a_reply_published_before_the_resubscribe_comes_by_the_servers_republish_once() {
    let redis = Redis::start();
    // Long enough for the steps between the publish and the release on a busy
    // machine; the test watches it all.
    let grace = Duration::from_millis(3000);
    let config = config_with(&format!("reply_grace_ms = {}", grace.as_millis()));
    let _server = Server::start_args(&redis, &["--config", config.to_str().expect("a path")]);
    let relay = Relay::start(redis.port);
    let c = Arc::new(
        Client::open(&relay.url(), Env::Dev)
            .expect("client through the relay")
            .identity("foo", "cerbastest"),
    );
    let waiting = {
        let c = c.clone();
        std::thread::spawn(move || c.request("sleep", json!({"ms": 600})))
    };
    wait_in_flight(&redis, 1);
    let channel = reply_channels(&redis).remove(0);
    let id: u64 = channel
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("an id");
    let key = c.keys().request(id);
    let held = relay.hold(b"SUBSCRIBE");
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "ID", &subscribed_client_id(&redis)])
        .query(&mut redis.conn())
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    held.recv_timeout(Duration::from_secs(10))
        .expect("the reconnected client's SUBSCRIBE is held");
    // The REPLY script deletes the request key where it publishes: gone, the
    // reply went out, to nobody (the re-subscription is still held).
    let mut conn = redis.conn();
    wait_for("the reply published", Duration::from_secs(10), || {
        let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).ok()?;
        (exists == 0).then_some(())
    });
    let published = Instant::now();
    assert!(reply_channels(&redis).is_empty(), "nobody subscribed");
    assert!(!waiting.is_finished(), "no reply before the SUBSCRIBE");
    // Hears by pattern, which the server's look for subscribers does not see.
    let heard = Replies::listen(&redis, "CERBAS");
    relay.release();
    let got = waiting.join().expect("the waiting caller");
    assert_eq!(got, Ok(Reply::Ok(json!(600))));
    // Published to the client once: watched until the grace of the held reply
    // is over (no event marks that no further republish comes).
    let grace_over = published + grace + Duration::from_millis(300);
    std::thread::sleep(grace_over.saturating_duration_since(Instant::now()));
    let heard = heard.stop();
    assert_eq!(
        heard.get(&id).map(Vec::len),
        Some(1),
        "times the reply was published after the SUBSCRIBE"
    );
    assert_eq!(
        c.request("echo", json!({"message": "after"})),
        Ok(Reply::Ok(json!("after")))
    );
}

/// Opens a client on `url` with `timeout`: the error, and how long it took.
fn open_failing(url: &str, timeout: Duration) -> (ClientError, Duration) {
    let start = Instant::now();
    let got = Client::open_timeout(url, Env::Dev, timeout);
    let took = start.elapsed();
    match got {
        Ok(_) => panic!("opened {url}"),
        Err(e) => (e, took),
    }
}

/// Opening a client waits for the connect and its handshake as long as the
/// timeout it is given, shorter or longer than the 2 s a reconnect takes:
/// a listening socket nobody accepts on (the kernel completes the connect;
/// nothing answers `HELLO`), a frozen Redis. The error is the client's
/// `Timeout` with that timeout, and the timeout is the client's for its calls.
#[test]
fn opening_against_an_address_that_does_not_answer_fails_at_the_callers_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = silent.local_addr().expect("its address").port();
    let short = Duration::from_millis(300);
    let (e, took) = open_failing(&format!("redis://127.0.0.1:{port}"), short);
    assert_eq!(e, ClientError::Timeout(short), "after {took:?}");
    assert!(
        took >= short && took < short + Duration::from_millis(500),
        "{took:?}"
    );
    drop(silent);
    let redis = Redis::start();
    redis.pause();
    let long = Duration::from_millis(2500);
    let (e, took) = open_failing(&redis.url(), long);
    redis.resume();
    assert_eq!(e, ClientError::Timeout(long), "after {took:?}");
    assert!(
        took >= long && took < long + Duration::from_millis(500),
        "{took:?}"
    );
    // No time at all: not even a working Redis is reached.
    assert_eq!(
        Client::open_timeout(&redis.url(), Env::Dev, Duration::ZERO).err(),
        Some(ClientError::Timeout(Duration::ZERO))
    );
    let own = Duration::from_millis(700);
    let c = Client::open_timeout(&redis.url(), Env::Dev, own).expect("opens once Redis runs");
    redis.pause();
    let start = Instant::now();
    let got = c.send("hello", json!({}));
    let took = start.elapsed();
    redis.resume();
    assert_eq!(got, Err(ClientError::Timeout(own)), "after {took:?}");
    assert!(
        took >= own && took < own + Duration::from_millis(500),
        "{took:?}"
    );
}
