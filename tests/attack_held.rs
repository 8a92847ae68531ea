//! Attacks on one change, 7d68876 (src/publisher.rs): replies held for late
//! subscribers kept in groups that share a schedule, a byte-limited take that
//! splits a group, the cap dropping the first group's first reply. Each test runs
//! a real redis-server and a real `cerbas`, and checks what a client sees: every
//! late subscriber within the grace gets its own reply once per channel, the cap
//! keeps the youngest and counts every drop, and faults (a stall, killed
//! connections, a lost look, a restart, a stop) lose no held reply the README
//! promises and repeat none. Also the publisher's question, on each new
//! connection, of which run of Redis it reached (2d58192, d12e82b): lost,
//! refused for now (`BUSY`), timed out, or in a storm of killed connections, it
//! decides nothing; a restart behind it, or a user denied `INFO`, drops and
//! counts each held reply once.
//! Not for: the schedule's arithmetic (unit tests in src/publisher.rs) or the
//! behaviour before the change (tests/hardening_publish.rs).

mod common;

use cerbas::Reply;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How late a look due at a given moment may run: the publisher gets the CPU
/// when it can, and under `make test` on two shared cores a look at the grace's
/// end found a client that subscribed 300 ms after it. Listening ends this
/// long after the last look is due; a client counts as past the grace this
/// long after it.
const LATE: Duration = Duration::from_millis(1_500);

/// An `echo` of `message` by user `foo`, source `web`.
fn echo(message: &str) -> String {
    json!({"func": "echo", "args": {"message": message}, "user": "foo", "source": "web"})
        .to_string()
}

/// A server on `redis` with `extra` config keys and an HTTP port; its base URL.
fn server_with(redis: &Redis, extra: &str) -> (Server, String) {
    server_args(redis, extra, &[])
}

/// As [`server_with`], with more command-line arguments.
fn server_args(redis: &Redis, extra: &str, args: &[&str]) -> (Server, String) {
    let config = config_with(extra);
    let config = config.to_str().expect("a UTF-8 path");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["--config", config, "--http", &addr];
    all.extend_from_slice(args);
    let server = Server::spawn(redis, &all, &[]);
    server.wait_ready(redis);
    (server, format!("http://{addr}"))
}

/// The sum of the `/metrics` samples whose name (with labels) starts with
/// `prefix`.
fn metric(base: &str, prefix: &str) -> u64 {
    let mut answer = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("GET /metrics");
    let text = answer.body_mut().read_to_string().expect("a /metrics body");
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

/// `cerbas_replies_dropped_total` from `/metrics`.
fn dropped(base: &str) -> u64 {
    metric(base, "cerbas_replies_dropped_total ")
}

/// The JSON channel of request `id` (db 1, the `dev` server's).
fn channel(id: u64) -> String {
    format!("CERBAS-RESPONSE-1-{id:010}")
}

/// Stores one request per body (not queued yet); their ids.
fn store_all(conn: &mut redis::Connection, bodies: &[String]) -> Vec<u64> {
    bodies.iter().map(|b| store(conn, b.as_bytes())).collect()
}

/// Queues `ids` with one `RPUSH`; the instant just before it.
fn push(conn: &mut redis::Connection, ids: &[u64]) -> Instant {
    let pushed = Instant::now();
    redis::cmd("RPUSH")
        .arg("CERBAS-QUEUE")
        .arg(ids)
        .query::<()>(conn)
        .expect("RPUSH");
    pushed
}

/// Every message of `channels` heard by a subscriber that subscribes (one
/// `SUBSCRIBE` for all) at `at` and listens until `until`: (channel, payload).
type Heard = Vec<(String, Vec<u8>)>;

/// A subscriber on its own thread (see [`Heard`]); `at` in the past subscribes
/// at once. Returns once it is connected.
fn subscriber(
    redis: &Redis,
    channels: Vec<String>,
    at: Instant,
    until: Instant,
) -> JoinHandle<Heard> {
    let mut conn = redis.conn();
    std::thread::spawn(move || {
        // The moment to subscribe is the test's stimulus, not a synchronisation.
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let mut ps = conn.as_pubsub();
        ps.subscribe(&channels).expect("SUBSCRIBE");
        let mut heard = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return heard;
            }
            ps.set_read_timeout(Some(left)).expect("a read timeout");
            match ps.get_message() {
                Ok(m) => heard.push((
                    m.get_channel_name().to_string(),
                    m.get_payload_bytes().to_vec(),
                )),
                Err(e) if e.is_timeout() => return heard,
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    })
}

/// The reply a payload heard on `channel` decodes to.
fn decode(channel: &str, payload: &[u8]) -> Reply {
    if channel.starts_with("MSGPACK:") {
        Reply::from_msgpack(payload)
    } else {
        Reply::from_json(payload)
    }
    .unwrap_or_else(|e| panic!("{channel}: a malformed reply: {e}"))
}

/// Checks that `heard` is exactly one reply `want` on each of `channels`;
/// returns what is wrong, if anything.
fn once_each(heard: &Heard, channels: &[String], want: &Reply) -> Option<String> {
    let mut per: HashMap<&str, usize> = HashMap::new();
    for (c, payload) in heard {
        if !channels.contains(c) {
            return Some(format!("a message on {c}, not subscribed"));
        }
        let got = decode(c, payload);
        if &got != want {
            return Some(format!("{c}: {got:?}"));
        }
        *per.entry(c.as_str()).or_default() += 1;
    }
    channels
        .iter()
        .find(|c| per.get(c.as_str()).copied().unwrap_or(0) != 1)
        .map(|c| {
            format!(
                "{c}: {} messages",
                per.get(c.as_str()).copied().unwrap_or(0)
            )
        })
}

/// Who listens to a request of the load test, and when.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Listener {
    /// Subscribed before the push.
    Early,
    /// Subscribed this long after the push (within the grace).
    Late(Duration),
    /// Nobody.
    Nobody,
    /// Subscribed past the grace (from the moment all are answered): must hear
    /// nothing.
    TooLate,
}

/// Mixed load: 300 `echo` calls, most small, some of 300 KB and some near 1 MiB
/// (a take of at most 1 MiB splits the groups they are in), queued by one push.
/// 180 clients subscribe 1 ms .. 4.9 s after the push (to both channels, the
/// JSON one or the msgpack one), 40 before it, 60 never, 20 only after the grace:
/// every client within the grace gets its own reply exactly once on each channel
/// it subscribed, those after the grace nothing, and nothing is dropped.
#[test]
fn late_subscribers_under_mixed_load_get_their_own_reply_once_per_channel() {
    let redis = Redis::start();
    // The cap is raised so that the near-1-MiB replies (about 1.8 MB held each)
    // never push out a late subscriber's: drops are another test's subject.
    let (server, base) = server_with(
        &redis,
        "reply_grace_ms = 5000\nrepublish_max_bytes = 67108864",
    );
    let grace = Duration::from_millis(5000);
    let mut conn = redis.conn();
    let n = 300usize;
    let size = |i: usize| match i % 50 {
        7 => 900_000,
        3 | 13 | 23 | 33 | 43 => 300_000,
        _ => 10 + (i * 37) % 2000,
    };
    let messages: Vec<String> = (0..n)
        .map(|i| format!("{i}:{}", "x".repeat(size(i))))
        .collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = store_all(&mut conn, &bodies);
    drop(bodies);
    let listeners: Vec<Listener> = (0..n)
        .map(|i| match i % 15 {
            0 | 1 => Listener::Early,
            2..=4 => Listener::Nobody,
            5 if i % 2 == 1 => Listener::TooLate,
            5 => Listener::Nobody,
            // 1 ms .. 4.9 s, spread over the late ones.
            _ => Listener::Late(Duration::from_millis(1 + (i as u64 * 4_899) / n as u64)),
        })
        .collect();
    // Both channels, the JSON one alone, or the msgpack one alone.
    let channels_of = |i: usize, id: u64| -> Vec<String> {
        match i % 3 {
            0 => vec![channel(id), format!("MSGPACK:{}", channel(id))],
            1 => vec![channel(id)],
            _ => vec![format!("MSGPACK:{}", channel(id))],
        }
    };
    let start = Instant::now();
    // A late subscriber of the last moment hears the republish at the grace's
    // end (its first publish is after the push); then nothing more may come.
    // All are answered within this of the push (checked below): every grace
    // ends by then plus the grace.
    let answering = Duration::from_millis(2_000);
    // The early ones listen as long as the late ones: a republish to them would
    // be a second message. (The push is well within a second of the start.)
    let end = start + Duration::from_secs(1) + answering + grace + LATE;
    let mut waiting = Vec::new();
    for (i, (&id, listener)) in ids.iter().zip(&listeners).enumerate() {
        if *listener == Listener::Early {
            let chans = channels_of(i, id);
            waiting.push((i, chans.clone(), subscriber(&redis, chans, start, end)));
        }
    }
    // The early ones are subscribed once Redis counts their channels.
    let early: usize = waiting.iter().map(|(_, c, _)| c.len()).sum();
    wait_for("early subscriptions", Duration::from_secs(10), || {
        (info_field(&mut conn, "stats", "pubsub_channels") == early.to_string()).then_some(())
    });
    let pushed = push(&mut conn, &ids);
    let until = pushed + answering + grace + LATE;
    let mut late = Vec::new();
    for (i, (&id, listener)) in ids.iter().zip(&listeners).enumerate() {
        if let Listener::Late(after) = *listener {
            let chans = channels_of(i, id);
            let h = subscriber(&redis, chans.clone(), pushed + after, until);
            late.push((i, chans, h));
        }
    }
    // Every reply has been published once all are answered: the graces all end
    // before this plus the grace.
    wait_answered(&mut conn);
    let answered = Instant::now();
    assert!(
        answered < pushed + answering,
        "the machine is too slow for this test: answered {:?} after the push",
        answered - pushed
    );
    let past = answered + grace + LATE;
    for (i, (&id, listener)) in ids.iter().zip(&listeners).enumerate() {
        if *listener == Listener::TooLate {
            let chans = channels_of(i, id);
            let h = subscriber(&redis, chans.clone(), past, past + Duration::from_secs(1));
            late.push((i, chans, h));
        }
    }
    let mut wrong = Vec::new();
    for (i, chans, h) in waiting.into_iter().chain(late) {
        let heard = h.join().expect("subscriber thread");
        let want = Reply::Ok(Value::String(messages[i].clone()));
        let problem = if listeners[i] == Listener::TooLate {
            (!heard.is_empty()).then(|| format!("{} messages past the grace", heard.len()))
        } else {
            once_each(&heard, &chans, &want)
        };
        if let Some(p) = problem {
            wrong.push(format!("#{i} ({:?}, {} B): {p}", listeners[i], size(i)));
        }
    }
    let done = start.elapsed();
    eprintln!(
        "{n} requests, {} wrong, {:.1} s",
        wrong.len(),
        done.as_secs_f64()
    );
    assert!(wrong.is_empty(), "{wrong:#?}\nlog:\n{}", server.log_text());
    assert_eq!(dropped(&base), 0, "nothing dropped under the cap");
    assert_eq!(leftover_keys(&mut conn), Vec::<String>::new());
}

/// Waits until every request stored is answered and acknowledged.
fn wait_answered(conn: &mut redis::Connection) {
    wait_for("every request answered", Duration::from_secs(60), || {
        leftover_keys(conn).is_empty().then_some(())
    });
}

/// `CLIENT KILL` of every normal connection but the caller's (the server's
/// reader, publisher and pool; not subscribers): how many.
fn kill_normal_clients(conn: &mut redis::Connection) -> u64 {
    redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query(conn)
        .expect("CLIENT KILL")
}

/// Both channels of each of `ids`.
fn both_channels(ids: &[u64]) -> Vec<Vec<String>> {
    ids.iter()
        .map(|&id| vec![channel(id), format!("MSGPACK:{}", channel(id))])
        .collect()
}

/// Clients of `ids` (both channels each) subscribing at `at(i)` for the `i`th
/// and listening until `until` (see [`subscriber`]), for [`wrong_replies`].
fn late_clients(
    redis: &Redis,
    ids: &[u64],
    at: impl Fn(usize) -> Instant,
    until: Instant,
) -> Vec<(usize, Vec<String>, JoinHandle<Heard>)> {
    both_channels(ids)
        .into_iter()
        .enumerate()
        .map(|(i, chans)| (i, chans.clone(), subscriber(redis, chans, at(i), until)))
        .collect()
}

/// Joins subscribers of request `i` of `messages` and lists those that did not
/// hear exactly their own reply once per channel.
fn wrong_replies(
    subscribers: Vec<(usize, Vec<String>, JoinHandle<Heard>)>,
    messages: &[String],
) -> Vec<String> {
    subscribers
        .into_iter()
        .filter_map(|(i, chans, h)| {
            let heard = h.join().expect("subscriber thread");
            let want = Reply::Ok(Value::String(messages[i].clone()));
            once_each(&heard, &chans, &want).map(|p| format!("#{i}: {p}"))
        })
        .collect()
}

/// Queues `n` `echo` calls of `size` bytes and more nobody hears (5 s grace),
/// waits until all are answered, then one client subscribes to every JSON
/// channel until the grace has passed: the index of each reply it heard (each
/// checked to be its own), in the order heard.
fn heard_late_by_json(
    redis: &Redis,
    conn: &mut redis::Connection,
    n: usize,
    size: usize,
) -> Vec<usize> {
    let messages: Vec<String> = (0..n)
        .map(|i| format!("{i:05}:{}", "y".repeat(size)))
        .collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(conn, &bodies);
    drop(bodies);
    wait_answered(conn);
    // The youngest were published just now: their last look is within the
    // grace from here.
    let answered = Instant::now();
    let chans: Vec<String> = ids.iter().map(|&id| channel(id)).collect();
    let heard = subscriber(
        redis,
        chans,
        answered,
        answered + Duration::from_millis(5_000) + LATE,
    )
    .join()
    .expect("subscriber thread");
    heard
        .iter()
        .map(|(c, payload)| {
            let i = ids
                .iter()
                .position(|&id| *c == channel(id))
                .expect("one of ours");
            assert_eq!(
                decode(c, payload),
                Reply::Ok(Value::String(messages[i].clone())),
                "{c}"
            );
            i
        })
        .collect()
}

/// Asserts that each of `subs` heard its own reply once per channel (see
/// [`wrong_replies`]) and that `server` (at `base`) dropped nothing.
fn each_heard_once(
    subs: Vec<(usize, Vec<String>, JoinHandle<Heard>)>,
    messages: &[String],
    server: &Server,
    base: &str,
) {
    let wrong = wrong_replies(subs, messages);
    assert!(wrong.is_empty(), "{wrong:#?}\nlog:\n{}", server.log_text());
    assert_eq!(dropped(base), 0, "nothing dropped");
}

/// The cap at 1 MiB, 3,000 replies of 32 KB nobody hears (96 MB in all) from one
/// worker (so they are held in the order of their ids): the server's memory stays
/// bounded, the replies kept are exactly the youngest (a contiguous run of the
/// last ids, each heard once by a late subscriber), every other is counted
/// dropped, and the episode is logged once.
#[test]
fn the_cap_keeps_exactly_the_youngest_replies_and_counts_every_drop() {
    let redis = Redis::start();
    let cap = 1 << 20;
    let (server, base) = server_with(
        &redis,
        &format!("workers = 1\nreply_grace_ms = 5000\nrepublish_max_bytes = {cap}"),
    );
    let mut conn = redis.conn();
    let n = 3000usize;
    let mut got = heard_late_by_json(&redis, &mut conn, n, 16_000);
    got.sort_unstable();
    let kept = got.len();
    let youngest: Vec<usize> = (n - kept..n).collect();
    let peak = vm_hwm_kib(server.pid());
    let drops = dropped(&base);
    eprintln!(
        "kept {kept} of {n}, {drops} dropped, peak RSS {} MiB",
        peak / 1024
    );
    assert_eq!(got, youngest, "the youngest kept, each heard once");
    // Each costs its two forms (32 KB) and a little more: the cap holds about 32.
    assert!((25..=32).contains(&kept), "{kept} kept under a 1 MiB cap");
    assert_eq!(
        drops,
        (n - kept) as u64,
        "every other reply counted dropped"
    );
    let log = server.log_text();
    assert_eq!(
        log.matches("republish_max_bytes (1048576 bytes) reached")
            .count(),
        1,
        "one episode, logged once:\n{log}"
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}

/// The publisher's look for a late subscriber is held back on its way to Redis
/// and every connection of the server is killed meanwhile: the look's answer is
/// lost, the reply stays held (not dropped, not given up), and a client that
/// subscribes afterwards gets it once on each channel.
#[test]
fn a_look_whose_answer_is_lost_keeps_its_replies_held() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let url = relay.url();
    let (server, base) = server_args(&redis, "reply_grace_ms = 5000", &["--redis", &url]);
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..20).map(|i| format!("lost look {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let held = relay.hold(b"PUBSUB");
    let ids = submit_many(&mut conn, &bodies);
    let pushed = Instant::now();
    held.recv_timeout(Duration::from_secs(10))
        .expect("the publisher looking for late subscribers");
    assert!(
        kill_normal_clients(&mut conn) >= 1,
        "the server's connections killed"
    );
    relay.release();
    let until = pushed + Duration::from_millis(5_000) + LATE;
    let subs = late_clients(&redis, &ids, |_| Instant::now(), until);
    each_heard_once(subs, &messages, &server, &base);
}

/// The publisher reconnects and asks which run of Redis it reached (`INFO
/// server`), and that connection is killed before the answer: nothing is
/// decided, it is no restart, the replies stay held and late clients get them
/// once. (It was taken for a Redis that would not say, hence another run, and
/// every held reply was dropped: seen in CI when `CLIENT KILL`s came in a row.)
#[test]
fn a_reconnect_lost_before_redis_says_its_run_is_no_restart() {
    asked_its_run("run asked", 8_000, |_, relay, _, conn| {
        assert!(
            kill_normal_clients(conn) >= 1,
            "the asking connection killed"
        );
        relay.release();
    });
}

/// As [`a_reconnect_lost_before_redis_says_its_run_is_no_restart`], but Redis
/// answers the publisher's `INFO server` with `BUSY` (a script past
/// `busy-reply-threshold`): a refusal that heals says nothing of which run of
/// Redis it is either, so it is no restart. (`BUSY` was taken for a Redis that
/// would not say, and every held reply was dropped.)
#[test]
fn a_busy_redis_asked_its_run_is_no_restart() {
    asked_its_run("busy asked", 8_000, |redis, relay, server, conn| {
        // A script that runs until killed, past the threshold: Redis answers
        // every other command `BUSY` meanwhile.
        redis::cmd("CONFIG")
            .arg(&["SET", "busy-reply-threshold", "10"])
            .query::<()>(conn)
            .expect("CONFIG SET");
        let mut busy = redis.conn();
        let mut probe = redis.conn();
        let script = std::thread::spawn(move || {
            redis::cmd("EVAL")
                .arg("local i = 0 while true do i = i + 1 end")
                .arg(0)
                .query::<()>(&mut busy)
        });
        wait_for("Redis busy", Duration::from_secs(10), || {
            let pong = redis::cmd("PING").query::<String>(&mut probe);
            pong.err().filter(|e| e.code() == Some("BUSY"))
        });
        relay.release();
        // The publisher has its answer once it logs what it made of it.
        wait_for("the publisher's answer", Duration::from_secs(10), || {
            let log = server.log_text();
            (log.contains("another run") || log.contains("publisher: redis refuses")).then_some(())
        });
        redis::cmd("SCRIPT")
            .arg("KILL")
            .query::<()>(conn)
            .expect("SCRIPT KILL");
        let killed = script.join().expect("the script's thread");
        assert!(killed.is_err(), "the script ran until killed");
    });
}

/// As [`a_reconnect_lost_before_redis_says_its_run_is_no_restart`], but Redis
/// stalls (`SIGSTOP`) while the publisher asks, past its read timeout: a
/// question timed out is no restart either.
#[test]
fn a_redis_stalled_while_asked_its_run_is_no_restart() {
    // The grace covers the read timeout (11 s) and the rest of the test.
    asked_its_run("stall asked", 20_000, |redis, relay, server, _| {
        redis.pause();
        relay.release();
        // The first loss was the kill's; the second, the question's timeout.
        server.wait_log("publisher: redis unavailable", 2);
        redis.resume();
    });
}

/// 20 replies nobody hears yet are held (`grace_ms`), every connection of the
/// server is killed, and the publisher's `INFO server` on its new connection
/// is held at a relay; `meanwhile` gets Redis, the relay, the server and a
/// connection, and must release the relay. Then late clients each get their
/// own reply once, nothing is dropped, and the log names no other run.
fn asked_its_run(
    tag: &str,
    grace_ms: u64,
    meanwhile: impl FnOnce(&Redis, &Relay, &Server, &mut redis::Connection),
) {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let url = relay.url();
    let grace = format!("reply_grace_ms = {grace_ms}");
    let (server, base) = server_args(&redis, &grace, &["--redis", &url]);
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..20).map(|i| format!("{tag} {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    let pushed = Instant::now();
    wait_answered(&mut conn);
    hold_the_run_question(&relay, &mut conn);
    meanwhile(&redis, &relay, &server, &mut conn);
    wait_answered(&mut conn);
    late_now_each_heard_once(
        &redis,
        &ids,
        &messages,
        &server,
        &base,
        pushed + Duration::from_millis(grace_ms),
    );
}

/// Holds the publisher's next `INFO server` (its question of which run of
/// Redis it reached) at `relay`: kills the server's connections and queues one
/// request so that it reconnects, and returns once the question is held.
fn hold_the_run_question(relay: &Relay, conn: &mut redis::Connection) {
    // `INFO server` is the publisher's question, and only its: `INFO stats` it
    // pipelines does not match.
    let held = relay.hold(b"$6\r\nserver");
    assert!(
        kill_normal_clients(conn) >= 1,
        "the server's connections killed"
    );
    submit_many(conn, &[echo("after the kill")]);
    held.recv_timeout(Duration::from_secs(10))
        .expect("the publisher asking which run of Redis it reached");
}

/// Late clients of `ids` subscribe now, while `server` (at `base`) still holds
/// their replies (until `held_until`): each hears its own once, nothing is
/// dropped, and the log names no other run of Redis.
fn late_now_each_heard_once(
    redis: &Redis,
    ids: &[u64],
    messages: &[String],
    server: &Server,
    base: &str,
    held_until: Instant,
) {
    let subscribed = Instant::now();
    let until = held_until + LATE;
    assert!(
        subscribed + LATE < until,
        "the machine is too slow for this test: subscribing {:?} before the replies go",
        held_until.saturating_duration_since(subscribed)
    );
    let subs = late_clients(redis, ids, |_| subscribed, until);
    each_heard_once(subs, messages, server, base);
    let log = server.log_text();
    assert!(!log.contains("another run"), "log:\n{log}");
}

/// Redis restarts (`appendonly yes`: the same data, another run) while the
/// publisher asks which run of Redis it reached: the question is lost, the
/// next one finds the new run, and the held replies are dropped and counted
/// once each, the restart logged once.
#[test]
fn a_restart_while_asked_its_run_drops_and_counts_each_held_reply_once() {
    let mut redis = Redis::start_with(&["--appendonly", "yes"], None);
    let relay = Relay::start(redis.port);
    let url = relay.url();
    let (server, base) = server_args(&redis, "reply_grace_ms = 60000", &["--redis", &url]);
    let mut conn = redis.conn();
    let n = 50;
    let bodies: Vec<String> = (0..n)
        .map(|i| echo(&format!("restart asked {i}")))
        .collect();
    submit_many(&mut conn, &bodies);
    wait_answered(&mut conn);
    hold_the_run_question(&relay, &mut conn);
    redis.restart(Duration::from_millis(100));
    relay.release();
    server.wait_log(
        "replies held for late subscribers dropped (redis restarted)",
        1,
    );
    let mut conn = redis.conn();
    // Served on the new Redis: nothing more is dropped.
    submit_many(&mut conn, &[echo("after the restart")]);
    wait_answered(&mut conn);
    assert_eq!(dropped(&base), n as u64, "log:\n{}", server.log_text());
    let log = server.log_text();
    assert_eq!(log.matches("another run").count(), 1, "log:\n{log}");
}

/// A Redis user denied `INFO` (an ACL): Redis cannot say which run it is, so
/// each reconnect of the publisher is taken for a restart, as the README says.
/// The held replies are dropped and counted once each, and the log says why,
/// not that Redis restarted.
#[test]
fn a_user_denied_info_drops_held_replies_at_a_reconnect_and_says_why() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    redis::cmd("ACL")
        .arg(&[
            "SETUSER", "cerbas", "on", ">secret", "~*", "&*", "+@all", "-info",
        ])
        .query::<()>(&mut conn)
        .expect("ACL SETUSER");
    let url = format!("redis://cerbas:secret@127.0.0.1:{}", redis.port);
    let (server, base) = server_args(&redis, "reply_grace_ms = 60000", &["--redis", &url]);
    let bodies: Vec<String> = (0..5).map(|i| echo(&format!("no info {i}"))).collect();
    submit_many(&mut conn, &bodies);
    wait_answered(&mut conn);
    assert!(
        kill_normal_clients(&mut conn) >= 1,
        "the server's connections killed"
    );
    // The publisher reconnects when it has something to send.
    submit_many(&mut conn, &[echo("after the kill")]);
    server.wait_log("does not say which run it is", 1);
    wait_for(
        "the held replies counted dropped",
        Duration::from_secs(10),
        || (dropped(&base) == 5).then_some(()),
    );
    let log = server.log_text();
    assert!(!log.contains("another run than before"), "log:\n{log}");
}

/// Every connection of the server is killed in a tight loop for 2 s while
/// requests keep coming (so the publisher reconnects and asks which run of
/// Redis it reached again and again), with 20 replies held: late clients each
/// get their own reply once, nothing is dropped, no other run is seen.
#[test]
fn a_storm_of_killed_connections_drops_no_held_reply() {
    let redis = Redis::start();
    let (server, base) = server_with(&redis, "reply_grace_ms = 10000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..20).map(|i| format!("storm {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    let pushed = Instant::now();
    wait_answered(&mut conn);
    // The connection that kills is spared, and queues the requests.
    let storm = Instant::now() + Duration::from_secs(2);
    let mut kills = 0;
    let mut more = 0;
    while Instant::now() < storm {
        kills += kill_normal_clients(&mut conn);
        if kills > more * 20 {
            submit_many(&mut conn, &[echo("during the storm")]);
            more += 1;
        }
    }
    assert!(kills >= 20, "{kills} connections killed");
    wait_answered(&mut conn);
    late_now_each_heard_once(
        &redis,
        &ids,
        &messages,
        &server,
        &base,
        pushed + Duration::from_millis(10_000),
    );
}

/// 3,000 replies nobody hears and 20 whose clients come late are held when Redis
/// stalls (`SIGSTOP`) for 2 s, then every connection of the server is killed five
/// times: the late clients, subscribing after that, each get their own reply once
/// per channel, and nothing is dropped.
#[test]
fn held_replies_outlive_a_redis_stall_and_killed_connections() {
    let redis = Redis::start();
    // Long enough to cover answering 3,020 calls on a busy machine, the stall
    // and the kills.
    let grace = Duration::from_millis(8_000);
    let (server, base) = server_with(&redis, "reply_grace_ms = 8000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..20).map(|i| format!("late after a stall {i}")).collect();
    let mut bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    bodies.extend((0..3000).map(|i| echo(&format!("nobody {i}"))));
    let ids = submit_many(&mut conn, &bodies);
    drop(bodies);
    let pushed = Instant::now();
    wait_answered(&mut conn);
    let answered = Instant::now();
    redis.pause();
    std::thread::sleep(Duration::from_secs(2));
    redis.resume();
    for _ in 0..5 {
        kill_normal_clients(&mut conn);
        std::thread::sleep(Duration::from_millis(50));
    }
    let subscribed = Instant::now();
    assert!(
        subscribed < pushed + grace - Duration::from_secs(1),
        "the machine is too slow for this test: {:?} after the push",
        subscribed - pushed
    );
    // The last look is due at the grace's end after the first publish (before
    // `answered`).
    let until = answered + grace + LATE;
    let subs = late_clients(&redis, &ids[..20], |_| subscribed, until);
    each_heard_once(subs, &messages, &server, &base);
    // Not a restart: the same run of Redis.
    assert!(!server.log_text().contains("redis restarted"));
}

/// 500 replies held when Redis restarts (empty): every one is dropped, and
/// counted once.
#[test]
fn a_redis_restart_drops_and_counts_each_held_reply_once() {
    let mut redis = Redis::start();
    let (server, base) = server_with(&redis, "reply_grace_ms = 10000");
    let mut conn = redis.conn();
    let n = 500;
    let bodies: Vec<String> = (0..n).map(|i| echo(&format!("restart {i}"))).collect();
    submit_many(&mut conn, &bodies);
    wait_answered(&mut conn);
    redis.restart(Duration::from_millis(100));
    server.wait_log(
        "replies held for late subscribers dropped (redis restarted)",
        1,
    );
    assert_eq!(dropped(&base), n as u64, "log:\n{}", server.log_text());
    // Served again on the new Redis: nothing more is counted.
    let c = redis.client();
    assert_eq!(
        c.request("hello", Value::Null).ok(),
        Some(Reply::Ok("hello world!".into()))
    );
    assert_eq!(dropped(&base), n as u64);
}

/// `reply_grace_ms = 0`, then `republish_max_bytes = 0`: nothing is held, so
/// nothing is looked for, a late client hears nothing, and nothing counts as
/// dropped.
#[test]
fn nothing_is_held_with_a_grace_or_a_cap_of_zero() {
    for extra in ["reply_grace_ms = 0", "republish_max_bytes = 0"] {
        let redis = Redis::start();
        let (server, base) = server_with(&redis, extra);
        let mut conn = redis.conn();
        let bodies: Vec<String> = (0..50).map(|i| echo(&format!("zero {i}"))).collect();
        let ids = submit_many(&mut conn, &bodies);
        wait_answered(&mut conn);
        let chans: Vec<String> = ids.iter().map(|&id| channel(id)).collect();
        let now = Instant::now();
        let heard = subscriber(&redis, chans, now, now + Duration::from_millis(500))
            .join()
            .expect("subscriber thread");
        assert!(heard.is_empty(), "{extra}: {} messages", heard.len());
        assert_eq!(calls_of(&mut conn, "pubsub"), 0, "{extra}: no look");
        assert_eq!(dropped(&base), 0, "{extra}");
        drop(server);
    }
}

/// A grace of an hour and a few replies: a client 2.5 s late (the back-off has
/// reached 4.4 s between looks) gets its reply at the next look, once per
/// channel; a stop does not wait for the hour.
#[test]
fn an_hour_of_grace_reaches_a_late_client_and_does_not_hold_a_stop() {
    let redis = Redis::start();
    let (mut server, base) = server_with(&redis, "reply_grace_ms = 3600000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..6).map(|i| format!("an hour {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    wait_answered(&mut conn);
    let answered = Instant::now();
    // 2, 8, 26, 80, 242, 728, 2186, then 6560 ms after the first publish.
    let at = answered + Duration::from_millis(2_500);
    let until = answered + Duration::from_millis(6_560) + LATE;
    let subs = late_clients(&redis, &ids[..3], |_| at, until);
    each_heard_once(subs, &messages, &server, &base);
    // Three are still held, for the rest of the hour.
    let stop = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("stopped");
    assert!(status.success(), "{status:?}");
    assert!(
        stop.elapsed() < Duration::from_secs(5),
        "{:?}",
        stop.elapsed()
    );
}

/// `MISCONF` (Redis refuses writes) while replies are held: looking and
/// publishing are not writes, so a late client still gets its reply once.
#[test]
fn a_late_client_gets_its_reply_while_redis_refuses_writes() {
    let redis = Redis::start();
    let (server, base) = server_with(&redis, "reply_grace_ms = 5000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..5).map(|i| format!("misconf {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    let pushed = Instant::now();
    wait_answered(&mut conn);
    start_misconf(&redis, &mut conn);
    let until = pushed + Duration::from_millis(5_000) + LATE;
    let subs = late_clients(&redis, &ids, |_| Instant::now(), until);
    each_heard_once(subs, &messages, &server, &base);
}

/// A stop (`SIGTERM`) while 200 replies are held and 5 `sleep` calls run: the
/// calls are answered once each (their clients subscribed first), nothing goes
/// back to the queue, and the stop takes about a second, not the grace. The
/// calls count as running once the instance's snapshot (written every second)
/// says 5 workers are busy: an empty queue only says they were taken, and under
/// `make test` a stop came before they started once (they went back to the
/// queue, as they should, and the test failed).
#[test]
fn a_stop_with_replies_held_answers_what_runs_and_requeues_nothing() {
    let redis = Redis::start();
    let (mut server, _base) = server_with(&redis, "reply_grace_ms = 5000");
    let mut conn = redis.conn();
    let nobody: Vec<String> = (0..200).map(|i| echo(&format!("stop {i}"))).collect();
    submit_many(&mut conn, &nobody);
    wait_answered(&mut conn);
    let sleeps: Vec<String> = (0..5)
        .map(|_| {
            json!({"func": "sleep", "args": {"ms": 2500}, "user": "foo", "source": "web"})
                .to_string()
        })
        .collect();
    let ids = store_all(&mut conn, &sleeps);
    let start = Instant::now();
    let until = start + Duration::from_secs(8);
    let subs: Vec<_> = both_channels(&ids)
        .into_iter()
        .map(|chans| (chans.clone(), subscriber(&redis, chans, start, until)))
        .collect();
    wait_for("early subscriptions", Duration::from_secs(10), || {
        (info_field(&mut conn, "stats", "pubsub_channels") == "10").then_some(())
    });
    push(&mut conn, &ids);
    wait_for("the sleeps running", Duration::from_secs(10), || {
        (workers_busy(&mut conn) >= 5).then_some(())
    });
    let stop = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15)).expect("stopped");
    let took = stop.elapsed();
    assert!(status.success(), "{status:?}");
    for (chans, h) in subs {
        let heard = h.join().expect("subscriber thread");
        assert_eq!(
            once_each(&heard, &chans, &Reply::Ok(json!(2500))),
            None,
            "log:\n{}",
            server.log_text()
        );
    }
    assert_eq!(leftover_keys(&mut conn), Vec::<String>::new());
    // What is left of the sleeps' 2.5 s, then at most a second of looks for
    // late subscribers.
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
}

/// Workers busy, as the (only) instance's latest snapshot says.
fn workers_busy(conn: &mut redis::Connection) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("CERBAS-SNAPSHOT-*")
        .query(conn)
        .expect("KEYS");
    let Some(key) = keys.first() else { return 0 };
    let snapshot: Option<String> = redis::cmd("GET").arg(key).query(conn).expect("GET");
    snapshot
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["workers_busy"].as_u64())
        .unwrap_or(0)
}

/// Clients subscribed when the server is told to stop, to replies held 2.4 s
/// (their next look due at the grace's end, 5 s): the server looks for them
/// during its last second, so they get their replies before it exits, once per
/// channel.
#[test]
fn clients_subscribed_when_the_server_stops_get_their_held_replies() {
    let redis = Redis::start();
    let (mut server, _base) = server_with(&redis, "reply_grace_ms = 5000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..3).map(|i| format!("held at the stop {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    wait_answered(&mut conn);
    // The stimulus: past the look at 2,186 ms; the next is at 5,000 ms.
    std::thread::sleep(Duration::from_millis(2_400));
    let until = Instant::now() + Duration::from_secs(6);
    let subs = late_clients(&redis, &ids, |_| Instant::now(), until);
    wait_for("the late subscriptions", Duration::from_secs(10), || {
        (info_field(&mut conn, "stats", "pubsub_channels") == "6").then_some(())
    });
    let stop = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("stopped");
    let took = stop.elapsed();
    assert!(status.success(), "{status:?}");
    let wrong = wrong_replies(subs, &messages);
    assert!(wrong.is_empty(), "{wrong:#?}\nlog:\n{}", server.log_text());
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert_eq!(leftover_keys(&mut conn), Vec::<String>::new());
}

/// 40 replies of 1.8 MB (two forms of a 900 KB `echo`) nobody hears, under a
/// 4 MiB cap: at most two are kept, the others counted dropped, a late client
/// of a kept one still gets it, and the server's memory stays bounded (72 MB
/// went through it).
#[test]
fn replies_near_a_mebibyte_past_a_small_cap_keep_memory_bounded() {
    let redis = Redis::start();
    let (server, base) = server_with(
        &redis,
        "workers = 4\nreply_grace_ms = 5000\nrepublish_max_bytes = 4194304",
    );
    let mut conn = redis.conn();
    let n = 40usize;
    let mut got = heard_late_by_json(&redis, &mut conn, n, 900_000);
    let kept = got.len();
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), kept, "each kept reply heard once");
    let drops = dropped(&base);
    let peak = vm_hwm_kib(server.pid());
    eprintln!(
        "kept {kept} of {n}, {drops} dropped, peak RSS {} MiB",
        peak / 1024
    );
    assert!((1..=2).contains(&kept), "{kept} kept under a 4 MiB cap");
    assert_eq!(drops, (n - kept) as u64);
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB");
}

/// Looks for late subscribers, by name or all at once (from `INFO commandstats`).
fn looks(conn: &mut redis::Connection) -> u64 {
    calls_of(conn, "pubsub|channels") + calls_of(conn, "pubsub|numsub")
}

/// 200 replies of 40 KB held 2.4 s when the server is told to stop (8 takes of
/// 1 MiB each look at once, then each again at the stop's end): a client that
/// subscribes after the looks at once, to the youngest reply (the last take),
/// gets it from the last look, before the server exits.
#[test]
fn the_last_look_of_a_stop_covers_every_held_reply() {
    let redis = Redis::start();
    let (mut server, _base) = server_with(&redis, "reply_grace_ms = 5000");
    let mut conn = redis.conn();
    let messages: Vec<String> = (0..200)
        .map(|i| format!("{i:03}:{}", "s".repeat(20_000)))
        .collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = submit_many(&mut conn, &bodies);
    drop(bodies);
    wait_answered(&mut conn);
    // The stimulus: past the look at 2,186 ms; the next is at 5,000 ms.
    std::thread::sleep(Duration::from_millis(2_400));
    let before = looks(&mut conn);
    server.signal(libc::SIGTERM);
    wait_for("the looks at the stop", Duration::from_secs(10), || {
        (looks(&mut conn) >= before + 8).then_some(())
    });
    let sig = Instant::now();
    eprintln!("looks {before} -> {}", looks(&mut conn));
    let youngest = ids.len() - 1;
    let chans = vec![channel(ids[youngest])];
    let sub = subscriber(
        &redis,
        chans.clone(),
        Instant::now(),
        Instant::now() + Duration::from_secs(5),
    );
    let status = server.wait_exit(Duration::from_secs(10)).expect("stopped");
    eprintln!("exit {:?} after; looks {}", sig.elapsed(), looks(&mut conn));
    assert!(status.success(), "{status:?}");
    let wrong = wrong_replies(vec![(youngest, chans, sub)], &messages);
    assert!(wrong.is_empty(), "{wrong:#?}\nlog:\n{}", server.log_text());
}

/// Two instances share the queue, each holding the replies it published to
/// nobody and looking at the same Redis channels: 200 clients 1 ms .. 4 s late
/// each get their own reply once per channel (the other instance does not
/// publish it), and nothing is dropped.
#[test]
fn two_instances_each_republish_only_their_own_held_replies() {
    let redis = Redis::start();
    let (one, base_one) = server_with(&redis, "reply_grace_ms = 5000");
    let (two, base_two) = server_with(&redis, "reply_grace_ms = 5000");
    let mut conn = redis.conn();
    let n = 200;
    let messages: Vec<String> = (0..n).map(|i| format!("two instances {i}")).collect();
    let bodies: Vec<String> = messages.iter().map(|m| echo(m)).collect();
    let ids = store_all(&mut conn, &bodies);
    // Both readers waiting in their take, so that the push wakes both and each
    // serves some (one still starting would leave the other all 200: seen in
    // `make test` on a busy machine).
    wait_for("both readers waiting", Duration::from_secs(10), || {
        (info_field(&mut conn, "clients", "blocked_clients") == "2").then_some(())
    });
    let pushed = push(&mut conn, &ids);
    let until = pushed + Duration::from_millis(2_000 + 5_000) + LATE;
    let at = |i: usize| pushed + Duration::from_millis(1 + (i as u64 * 3_999) / n as u64);
    let subs = late_clients(&redis, &ids, at, until);
    wait_answered(&mut conn);
    assert!(
        pushed.elapsed() < Duration::from_secs(2),
        "the machine is too slow for this test: answered {:?} after the push",
        pushed.elapsed()
    );
    let wrong = wrong_replies(subs, &messages);
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\nlogs:\n{}\n{}",
        one.log_text(),
        two.log_text()
    );
    assert_eq!(dropped(&base_one) + dropped(&base_two), 0);
    let served = |base: &str| metric(base, "cerbas_requests_total{");
    let (a, b) = (served(&base_one), served(&base_two));
    eprintln!("served {a} and {b}");
    assert!(a > 0 && b > 0, "both instances served: {a}, {b}");
}
