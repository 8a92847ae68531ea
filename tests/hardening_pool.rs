//! Attacks on the connection pool lent to functions (`connection::ConnectionPool`,
//! commit 1198b0f: slots under a mutex and a condition variable), against a real
//! redis-server: connections broken in a borrower's hands, panics, Redis down,
//! stopped or restarted while connections are held and waited for. After each
//! storm the pool must still lend all its connections at once, and Redis must see
//! no more of them than the pool's size.
//! Not for: the slots' own logic without Redis (unit tests in src/connection.rs).

mod common;

use cerbas::connection::{ConnectionPool, PooledConnection};
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pool(redis: &Redis, size: usize) -> ConnectionPool {
    let client = redis::Client::open(redis.url_db(1).as_str()).expect("a URL");
    ConnectionPool::new(client, size)
}

fn incr(c: &mut PooledConnection, key: &str) -> redis::RedisResult<i64> {
    redis::cmd("INCR").arg(key).query(&mut **c)
}

/// Clients connected to Redis besides `admin` (which asks).
fn others(admin: &mut redis::Connection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(admin)
        .expect("CLIENT LIST");
    list.lines().count() - 1
}

/// The pool lends `size` connections at once, each of which works, and Redis
/// sees at most `size` connections besides `admin`.
fn assert_lends_all(pool: &ConnectionPool, size: usize, admin: &mut redis::Connection) {
    let held: Vec<PooledConnection> = (0..size)
        .map(|i| {
            let mut c = pool
                .get(Instant::now() + Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i} of {size} not lent: {e}"));
            incr(&mut c, "after").expect("a lent connection works");
            c
        })
        .collect();
    let seen = others(admin);
    assert!(
        seen <= size,
        "{seen} connections from a pool of {size} while it lends all of them"
    );
    drop(held);
    assert!(others(admin) <= size);
}

/// A function that panics inside `MULTI` (its transaction open on a pooled
/// connection) must not hand the open transaction to the next borrower: that
/// borrower's commands would be queued (`QUEUED`), not run, and a later `EXEC`
/// by anyone would run the dead function's half-done writes.
#[test]
fn a_panic_inside_a_transaction_is_not_handed_to_the_next_borrower() {
    let redis = Redis::start();
    let mut admin = redis.conn();
    let pool = pool(&redis, 1);
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let mut c = pool
            .get(Instant::now() + Duration::from_secs(3))
            .expect("a connection");
        redis::cmd("MULTI").query::<()>(&mut *c).expect("MULTI");
        redis::cmd("SET")
            .arg("half-done")
            .arg(1)
            .query::<()>(&mut *c)
            .expect("SET queued");
        panic!("the function panics with its transaction open");
    }));
    assert!(panicked.is_err());
    let mut c = pool
        .get(Instant::now() + Duration::from_secs(3))
        .expect("a connection after the panic");
    let n = incr(&mut c, "next");
    assert_eq!(n.ok(), Some(1), "the next borrower's INCR did not run");
    let _ = redis::cmd("EXEC").query::<redis::Value>(&mut *c);
    drop(c);
    let half: Option<i64> = redis::cmd("GET")
        .arg("half-done")
        .query(&mut admin)
        .expect("GET");
    assert_eq!(half, None, "the panicked function's write ran");
    assert_lends_all(&pool, 1, &mut admin);
}

/// Every held connection is killed (`CLIENT KILL TYPE normal`) while waiters
/// queue for them; each breaks in its borrower's hands. The pool then opens
/// fresh ones: it lends all, and no more than its size.
#[test]
fn connections_killed_in_borrowers_hands_are_replaced_not_lost() {
    let redis = Redis::start();
    let mut admin = redis.conn();
    let size = 4;
    let pool = pool(&redis, size);
    for round in 0..5 {
        let held: Vec<PooledConnection> = (0..size)
            .map(|_| {
                let mut c = pool
                    .get(Instant::now() + Duration::from_secs(3))
                    .expect("a connection");
                incr(&mut c, "warm").expect("INCR");
                c
            })
            .collect();
        // Waiters for the held connections, with deadlines well past the kill.
        let waiters: Vec<_> = (0..2 * size)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let mut c = pool.get(Instant::now() + Duration::from_secs(5))?;
                    incr(&mut c, "waiter").map_err(cerbas::FnError::from)
                })
            })
            .collect();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query::<()>(&mut admin)
            .expect("CLIENT KILL");
        for mut c in held {
            assert!(incr(&mut c, "killed").is_err(), "round {round}: not killed");
        }
        let mut failed = 0;
        for w in waiters {
            if w.join().expect("a waiter returns").is_err() {
                failed += 1;
            }
        }
        // A connection returned by a borrower that saw it break is replaced; the
        // others were checked (a loss was seen) before they were lent.
        assert_eq!(failed, 0, "round {round}: waiters failed after the kill");
        assert_lends_all(&pool, size, &mut admin);
    }
}

/// Callers keep borrowing while Redis is down (a restart): every `open` fails,
/// and each failure must give its slot back.
#[test]
fn failed_opens_while_redis_is_down_give_their_slots_back() {
    let mut redis = Redis::start();
    let size = 3;
    let pool = pool(&redis, size);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(0usize));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (pool, stop, errors) = (pool.clone(), stop.clone(), errors.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let ok = pool
                        .get(Instant::now() + Duration::from_millis(300))
                        .map_err(|e| e.to_string())
                        .and_then(|mut c| incr(&mut c, "storm").map_err(|e| e.to_string()));
                    if ok.is_err() {
                        *errors.lock().expect("errors") += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();
    wait_for("calls before the restart", Duration::from_secs(10), || {
        let mut admin = redis.conn();
        (get_int(&mut admin, "storm") > 100).then_some(())
    });
    redis.restart(Duration::from_millis(1_500));
    let mut admin = redis.conn();
    let before = get_int(&mut admin, "storm");
    wait_for("calls after the restart", Duration::from_secs(10), || {
        (get_int(&mut admin, "storm") > before + 100).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.join().expect("a caller returns");
    }
    let errors = *errors.lock().expect("errors");
    println!("{errors} calls failed while Redis was down");
    assert!(errors > 0, "no call saw Redis down");
    assert_lends_all(&pool, size, &mut admin);
}

/// Redis stopped (`SIGSTOP`) while callers hold and wait for connections. A
/// caller must not be held by the pool far past its deadline (the `PING` of a
/// suspect connection and the `open` of a new one), and once Redis resumes the
/// pool lends all its connections.
#[test]
fn a_stopped_redis_does_not_hold_callers_far_past_their_deadline() {
    let redis = Redis::start();
    let size = 2;
    let pool = pool(&redis, size);
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(true));
    let worst = Arc::new(Mutex::new(Duration::ZERO));
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let (pool, stop, go) = (pool.clone(), stop.clone(), go.clone());
            let worst = worst.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if !go.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    let deadline = Instant::now() + Duration::from_millis(300);
                    let got = pool.get(deadline);
                    let late = Instant::now().saturating_duration_since(deadline);
                    let mut w = worst.lock().expect("worst");
                    *w = (*w).max(late);
                    drop(w);
                    if let Ok(mut c) = got {
                        let _ = incr(&mut c, "stalled");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    wait_for("calls before the stop", Duration::from_secs(10), || {
        let mut admin = redis.conn();
        (get_int(&mut admin, "stalled") > 10).then_some(())
    });
    // Idle connections: past a second in the pool, each is checked (`PING`)
    // before it is lent.
    go.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1_200));
    redis.pause();
    go.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(4));
    redis.resume();
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.join().expect("a caller returns");
    }
    let worst = *worst.lock().expect("worst");
    println!("worst time a get() returned past its deadline: {worst:?}");
    let mut admin = redis.conn();
    assert_lends_all(&pool, size, &mut admin);
    assert!(
        worst < Duration::from_millis(500),
        "a caller got its answer from the pool {worst:?} past its deadline"
    );
}
