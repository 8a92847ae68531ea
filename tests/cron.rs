//! Cron against a real redis-server and real `cerbas` processes (issue 9): a
//! seconds-field entry runs; three instances run each tick of a 1-second entry
//! exactly once; a tick whose claimant is killed with `kill -9` still runs once;
//! an edited CRONTAB takes effect within 2 s; a missing file never stops the
//! server; `cerbas cron check` and `cerbas cron list`.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Writes a CRONTAB with `text` in a scratch directory.
fn crontab(text: &str) -> PathBuf {
    let path = scratch("cron").join("CRONTAB");
    std::fs::write(&path, text).expect("write CRONTAB");
    path
}

fn tally_line(schedule: &str, name: &str) -> String {
    format!("{schedule} | {{\"func\": \"tally\", \"args\": {{\"name\": \"{name}\"}}, \"source\": \"foo\"}}\n")
}

/// A server on `redis` running `tab`, logging each claim (debug), ready.
fn cron_server(redis: &Redis, tab: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--crontab", tab.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let s = Server::spawn(redis, &args, &[("RUST_LOG", "info,cerbas::cron=debug")]);
    s.wait_ready(redis);
    s
}

fn keys(conn: &mut redis::Connection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS").arg(pattern).query(conn).expect("KEYS")
}

/// The ticks claimed so far (of every entry), sorted.
fn claimed_ticks(conn: &mut redis::Connection) -> Vec<i64> {
    let mut ticks: Vec<i64> = keys(conn, "CERBAS-CRON-TICK-*")
        .iter()
        .filter_map(|k| k.rsplit('-').next()?.parse().ok())
        .collect();
    ticks.sort();
    ticks
}

/// The one entry's last-outcome hash.
fn last(conn: &mut redis::Connection) -> HashMap<String, String> {
    let found = keys(conn, "CERBAS-CRON-LAST-*");
    match found.as_slice() {
        [key] => redis::cmd("HGETALL").arg(key).query(conn).expect("HGETALL"),
        _ => HashMap::new(),
    }
}

fn runs(conn: &mut redis::Connection) -> i64 {
    last(conn)
        .get("runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Empties the CRONTAB, waits until every server dropped its entry, then until
/// every tick they claimed was served.
fn stop_ticks(tab: &std::path::Path, servers: &[&Server], conn: &mut redis::Connection) {
    std::fs::write(tab, "").expect("empty CRONTAB");
    for s in servers {
        s.wait_log("cron: removed line 1", 1);
    }
    wait_for("every claimed tick served", Duration::from_secs(20), || {
        all_served(conn).then_some(())
    });
}

/// Nothing waits in the queue and no request key is left: every claimed tick
/// was served.
fn all_served(conn: &mut redis::Connection) -> bool {
    let queued: i64 = redis::cmd("LLEN")
        .arg("CERBAS-QUEUE")
        .query(conn)
        .expect("LLEN");
    queued == 0 && keys(conn, "CERBAS-REQ-*").is_empty()
}

#[test]
fn a_seconds_field_entry_runs_on_a_real_server() {
    let redis = Redis::start();
    let tab = crontab(&tally_line("*/1 * * * * *", "sec"));
    let config = config_with("cron_tz = \"America/New_York\"");
    let s = cron_server(
        &redis,
        &tab,
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let mut conn = redis.conn();
    wait_for("three runs", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-sec") >= 3).then_some(())
    });
    s.wait_log("): ok in ", 3);
    let log = s.log_text();
    assert!(log.contains("times in America/New_York"), "{log}");
    assert!(log.contains("cron tally (entry "), "{log}");
    let l = last(&mut conn);
    assert_eq!(l.get("outcome").map(String::as_str), Some("ok"), "{l:?}");
    assert_eq!(l.get("func").map(String::as_str), Some("tally"));
    assert!(runs(&mut conn) >= 3);
    // Cron's requests are one-way and deleted once served, like a client's.
    wait_for("served", Duration::from_secs(5), || {
        all_served(&mut conn).then_some(())
    });
}

/// Three instances share one Redis and one CRONTAB with a 1-second entry for
/// over 10 s: every tick is claimed by exactly one of them, and runs once.
#[test]
fn three_instances_run_each_tick_exactly_once() {
    let redis = Redis::start();
    let tab = crontab(&tally_line("* * * * * *", "three"));
    let servers: Vec<Server> = (0..3).map(|_| cron_server(&redis, &tab, &[])).collect();
    let mut conn = redis.conn();
    wait_for("over 10 s of ticks", Duration::from_secs(40), || {
        let t = claimed_ticks(&mut conn);
        (t.len() >= 12 && t[t.len() - 1] - t[0] >= 11).then_some(())
    });
    // Stop the ticks: every instance drops the entry on reload.
    stop_ticks(&tab, &servers.iter().collect::<Vec<_>>(), &mut conn);
    let ticks = claimed_ticks(&mut conn);
    let expected = ticks[ticks.len() - 1] - ticks[0] + 1;
    let seen = get_int(&mut conn, "CERBAS-TALLY-three");
    let claims: Vec<usize> = servers
        .iter()
        .map(|s| s.log_text().matches("cron: claimed tick ").count())
        .collect();
    eprintln!(
        "three instances: {expected} ticks over {} s; claimed {} (per instance {claims:?}); runs seen {seen}",
        expected - 1,
        ticks.len()
    );
    assert_eq!(ticks.len() as i64, expected, "no tick missing: {ticks:?}");
    assert_eq!(
        claims.iter().sum::<usize>() as i64,
        expected,
        "claimed once"
    );
    assert_eq!(seen, expected, "each tick ran exactly once");
    assert_eq!(runs(&mut conn), expected, "each run recorded once");
}

/// The instance that claimed a tick (and took its request) is killed with
/// `kill -9` while the function runs: the tick still runs, once, on another
/// instance, when the dead one's requests are recovered.
#[test]
fn a_tick_whose_claimant_is_killed_still_runs_once() {
    let redis = Redis::start();
    let tab = crontab(
        "*/3 * * * * * | {\"func\": \"sleep\", \"args\": {\"ms\": 4000}, \"source\": \"foo\"}\n",
    );
    let mut a = cron_server(&redis, &tab, &[]);
    a.wait_log("cron: claimed tick ", 1);
    // "cron: claimed tick {tick} of line 1 (sleep) as request {id}"
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("cron: claimed tick "))
        .expect("claim line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |w: &str| {
        let i = words.iter().position(|x| *x == w).expect("word");
        words[i + 1].to_string()
    };
    let tick = at("tick");
    let id: u64 = at("request").parse().expect("id");
    let mut conn = redis.conn();
    // A is the only instance: its reader takes the request and sleeps in it.
    wait_for("A holds the tick", Duration::from_secs(5), || {
        let lists = keys(&mut conn, "CERBAS-PROCESSING-*");
        lists
            .iter()
            .any(|l| {
                let held: Vec<String> = redis::cmd("LRANGE")
                    .arg(l)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .expect("LRANGE");
                held.contains(&id.to_string())
            })
            .then_some(())
    });
    a.kill();
    let b = cron_server(&redis, &tab, &[]);
    // B recovers A's requests once A's heartbeat lapses (5 s), and runs the tick.
    let ran = format!("tick {tick}): ok in ");
    b.wait_log(&ran, 1);
    // Stop the ticks, then let everything claimed be served.
    stop_ticks(&tab, &[&b], &mut conn);
    let claims = claimed_ticks(&mut conn).len() as i64;
    wait_for("every run recorded", Duration::from_secs(5), || {
        (runs(&mut conn) >= claims).then_some(())
    });
    eprintln!(
        "kill -9: tick {tick} (request {id}) claimed by A, A killed mid-run; B ran it {} time(s); {claims} ticks claimed, {} runs recorded",
        b.log_text().matches(&ran).count(),
        runs(&mut conn)
    );
    assert_eq!(
        b.log_text().matches(&ran).count(),
        1,
        "the killed tick ran once"
    );
    assert!(!a.log_text().contains(&ran), "A died before answering it");
    assert_eq!(runs(&mut conn), claims, "each claimed tick ran once");
    assert!(b
        .log_text()
        .contains("is gone: returned its 1 unfinished requests"));
}

#[test]
fn an_edited_crontab_takes_effect_within_2_s_and_keeps_its_good_lines() {
    let redis = Redis::start();
    let tab = crontab(&tally_line("* * * * * *", "before"));
    let s = cron_server(&redis, &tab, &[]);
    let mut conn = redis.conn();
    wait_for("a run", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-before") >= 1).then_some(())
    });
    let edited = format!(
        "# edited\n{}not a cron line\n",
        tally_line("* * * * * *", "after")
    );
    std::fs::write(&tab, edited).expect("edit CRONTAB");
    let edited_at = Instant::now();
    s.wait_log("cron: added line 2", 1);
    let took = edited_at.elapsed();
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    let log = s.log_text();
    assert!(
        log.contains("cron: removed line 1: * * * * * * | "),
        "{log}"
    );
    assert!(
        log.contains("line 3: no \"|\" between the schedule and the request"),
        "{log}"
    );
    wait_for("the new entry runs", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-after") >= 2).then_some(())
    });
    let before = get_int(&mut conn, "CERBAS-TALLY-before");
    let after = get_int(&mut conn, "CERBAS-TALLY-after");
    wait_for("two more runs", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-after") >= after + 2).then_some(())
    });
    assert_eq!(
        get_int(&mut conn, "CERBAS-TALLY-before"),
        before,
        "the removed entry stopped"
    );
}

#[test]
fn a_missing_crontab_is_logged_once_and_read_when_it_appears() {
    let redis = Redis::start();
    let tab = scratch("cron").join("CRONTAB");
    let s = cron_server(&redis, &tab, &[]);
    s.wait_log("CRONTAB: not found; no entries run until it can be read", 1);
    std::fs::write(&tab, tally_line("* * * * * *", "late")).expect("write");
    let mut conn = redis.conn();
    wait_for("the entry runs", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-late") >= 2).then_some(())
    });
    assert_eq!(s.log_text().matches("not found").count(), 1);
    s.wait_log("cron: added line 1", 1);
}

/// `--crontab ""` turns cron off, as `crontab = ""` in the configuration does
/// (clap's path parser refused an empty value).
#[test]
fn an_empty_crontab_flag_turns_cron_off() {
    let redis = Redis::start();
    let s = Server::start_args(&redis, &["--crontab", ""]);
    s.wait_log("cron is off (crontab = \"\")", 1);
}

fn cerbas(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .args(["--config", &repo_file("cerbas.toml")])
        .args(args)
        .env_remove("CERBAS_REDIS_URL")
        .env_remove("CERBAS_ENV")
        .output()
        .expect("cerbas");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn cron_check_and_list_report_on_a_file() {
    let (code, out) = cerbas(&["cron", "check", &repo_file("CRONTAB")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.ends_with("CRONTAB: 2 entries ok, 0 bad lines\n"),
        "{out}"
    );
    let bad = crontab(&format!(
        "{}61 * * * * | {{\"func\": \"hello\", \"source\": \"foo\"}}\n* * * * * | {{\"func\": \"nope\", \"source\": \"foo\"}}\n",
        tally_line("@hourly", "x")
    ));
    let (code, out) = cerbas(&["cron", "check", bad.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":2: schedule: minute 61 is out of range (0 to 59)\n"),
        "{out}"
    );
    assert!(out.contains(":3: unknown function: nope\n"), "{out}");
    assert!(out.contains("1 entries ok, 2 bad lines"), "{out}");
    let (code, out) = cerbas(&["cron", "check", "/nonexistent/CRONTAB"]);
    assert_eq!(code, 2, "{out}");

    // list: the next three runs, and the last outcome from Redis.
    let redis = Redis::start();
    let tab = crontab(&tally_line("* * * * * *", "listed"));
    let s = cron_server(&redis, &tab, &[]);
    s.wait_log("): ok in ", 1);
    let (code, out) = cerbas(&[
        "--redis",
        &redis.url(),
        "cron",
        "list",
        tab.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("line 1  * * * * * *  {\"args\":{\"name\":\"listed\"},\"func\":\"tally\",\"source\":\"foo\",\"user\":\"cron\"}\n"), "{out}");
    assert!(out.matches(" UTC").count() >= 4, "{out}");
    assert!(out.contains("  last: ok at "), "{out}");
    // Without Redis, list still prints the schedule.
    drop(s);
    drop(redis);
    let (code, out) = cerbas(&["cron", "list", &repo_file("CRONTAB")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("line 2  * * * * *  {\"args\":{\"message\":\"yes, sir\"},\"func\":\"echo\""),
        "{out}"
    );
}

/// Keys Redis refuses to write: a wrong-typed outcome record is logged and the
/// ticks go on; a wrong-typed queue refuses the claim whole (no claim without its
/// request), and the ticks resume once the queue is mended.
#[test]
fn keys_redis_refuses_lose_no_tick() {
    let redis = Redis::start();
    let tab = crontab(&tally_line("* * * * * *", "refused"));
    let s = cron_server(&redis, &tab, &[]);
    let mut conn = redis.conn();
    wait_for("a recorded run", Duration::from_secs(10), || {
        (runs(&mut conn) >= 1).then_some(())
    });
    let last_key = keys(&mut conn, "CERBAS-CRON-LAST-*").remove(0);
    redis::pipe()
        .cmd("DEL")
        .arg(&last_key)
        .cmd("SET")
        .arg(&last_key)
        .arg("not a hash")
        .query::<()>(&mut conn)
        .expect("wrong-typed record");
    s.wait_log("was not recorded: ", 1);
    let ran = get_int(&mut conn, "CERBAS-TALLY-refused");
    wait_for("runs go on", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-refused") >= ran + 2).then_some(())
    });
    redis::cmd("SET")
        .arg("CERBAS-QUEUE")
        .arg("not a list")
        .query::<()>(&mut conn)
        .expect("wrong-typed queue");
    s.wait_log("cron: redis refuses a command", 1);
    redis::cmd("DEL")
        .arg("CERBAS-QUEUE")
        .query::<()>(&mut conn)
        .expect("mend the queue");
    let ran = get_int(&mut conn, "CERBAS-TALLY-refused");
    wait_for("runs resume", Duration::from_secs(15), || {
        (get_int(&mut conn, "CERBAS-TALLY-refused") >= ran + 2).then_some(())
    });
    stop_ticks(&tab, &[&s], &mut conn);
    assert_eq!(
        claimed_ticks(&mut conn).len() as i64,
        get_int(&mut conn, "CERBAS-TALLY-refused"),
        "each claim became a request that ran"
    );
}

/// A graceful stop in the middle of cron runs: the runs in hand finish, their
/// outcomes are recorded before the process exits, and it exits promptly.
#[test]
fn a_graceful_stop_records_the_outcomes_of_the_drain() {
    let redis = Redis::start();
    let tab = crontab(
        "* * * * * * | {\"func\": \"sleep\", \"args\": {\"ms\": 1500}, \"source\": \"foo\"}\n",
    );
    let mut s = cron_server(&redis, &tab, &[]);
    // The second claim comes while the first tick's call still sleeps.
    s.wait_log("cron: claimed tick ", 2);
    s.signal(libc::SIGTERM);
    let status = s
        .wait_exit(Duration::from_secs(15))
        .expect("stopped in time");
    assert!(status.success(), "{status:?}");
    let log = s.log_text();
    let ran = log.matches("): ok in ").count() as i64;
    let drained = log.split("shutting down").nth(1).unwrap_or_default();
    assert!(
        drained.contains("): ok in "),
        "a run ended in the drain: {log}"
    );
    let mut conn = redis.conn();
    assert_eq!(runs(&mut conn), ran, "every run of the drain recorded");
}

/// Redis restarts (with its AOF) while a 1-second entry runs: the ticks that
/// came while it was down are claimed late, once, when it is back (they are
/// within the minute of catch-up), and every tick runs once.
#[test]
fn a_redis_restart_loses_no_tick() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"], None);
    let tab = crontab(&tally_line("* * * * * *", "restart"));
    let s = cron_server(&redis, &tab, &[]);
    let mut conn = redis.conn();
    wait_for("runs", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-restart") >= 2).then_some(())
    });
    redis.restart(Duration::from_millis(2500));
    let mut conn = redis.conn();
    s.wait_log("cron: redis is back", 1);
    let ran = get_int(&mut conn, "CERBAS-TALLY-restart");
    wait_for("runs go on", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-restart") >= ran + 2).then_some(())
    });
    stop_ticks(&tab, &[&s], &mut conn);
    let ticks = claimed_ticks(&mut conn);
    let expected = ticks[ticks.len() - 1] - ticks[0] + 1;
    assert_eq!(ticks.len() as i64, expected, "no tick missing: {ticks:?}");
    assert_eq!(get_int(&mut conn, "CERBAS-TALLY-restart"), expected);
}

/// A slow entry holds a worker like any request: the other entries and the
/// queue go on at their pace meanwhile.
#[test]
fn a_slow_entry_delays_neither_other_entries_nor_the_queue() {
    let redis = Redis::start();
    let tab = crontab(&format!(
        "* * * * * * | {{\"func\": \"sleep\", \"args\": {{\"ms\": 4000}}, \"source\": \"foo\"}}\n{}",
        tally_line("* * * * * *", "fast")
    ));
    let s = cron_server(&redis, &tab, &[]);
    // Four slow calls are running at once…
    wait_for("four slow calls", Duration::from_secs(20), || {
        (s.log_text().matches("(sleep) as request").count() >= 5).then_some(())
    });
    let mut conn = redis.conn();
    let fast = get_int(&mut conn, "CERBAS-TALLY-fast");
    // …while the fast entry runs every second and a client is answered at once.
    let asked = Instant::now();
    let c = redis.client();
    assert_eq!(
        c.request("hello", serde_json::Value::Null).ok(),
        Some(cerbas::Reply::Ok("hello world!".into()))
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    wait_for("the fast entry goes on", Duration::from_secs(5), || {
        (get_int(&mut conn, "CERBAS-TALLY-fast") >= fast + 2).then_some(())
    });
    // Each slow call took its 4 s; none waited for another.
    s.wait_log("cron sleep (entry ", 2);
    for line in s
        .log_text()
        .lines()
        .filter(|l| l.contains("cron sleep (entry "))
    {
        let ms: u64 = line
            .split("): ok in ")
            .nth(1)
            .and_then(|r| r.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("not ok: {line}"));
        assert!((4000..4900).contains(&ms), "{line}");
    }
}

/// Attack on the 1 MiB cap of CRONTAB: it was checked on the file's size, and a
/// path with no size (`/dev/zero`, a named pipe) was read to its end, twice a
/// second: all the memory there was (an allocation failure, or the OOM killer).
/// A pipe nobody writes to blocked the cron thread in `open` for good. Now the
/// first is refused with a clear line and memory stays small; the second reads
/// as empty; the server serves and stops in time.
#[test]
fn a_crontab_that_is_no_regular_file_is_refused_without_reading_it_all() {
    let redis = Redis::start();
    let mut s = Server::spawn(&redis, &["--crontab", "/dev/zero"], &[]);
    let mut hwm = 0;
    wait_for("the refusal", Duration::from_secs(20), || {
        // Stop at once if it reads on (the memory of the machine is shared).
        hwm = vm_hwm_kib(s.pid());
        if hwm > 256 << 10 {
            s.kill();
            panic!("the server read /dev/zero to {hwm} KiB");
        }
        s.log_text()
            .contains("cron: /dev/zero: larger than 1048576 bytes; no entries run")
            .then_some(())
    });
    s.wait_ready(&redis);
    assert!(hwm < 64 << 10, "server VmHWM {hwm} KiB");
    assert!(vm_hwm_kib(s.pid()) < 64 << 10);
    drop(s);

    let fifo = scratch("cron").join("CRONTAB");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let mut s = cron_server(&redis, &fifo, &[]);
    // Opened without blocking, a pipe without a writer reads as empty.
    s.wait_log("CRONTAB: 0 entries, 0 bad lines", 1);
    let (code, out) = cerbas(&["cron", "check", "/dev/zero"]);
    assert_ne!(code, 0);
    assert!(
        out.contains("/dev/zero: larger than 1048576 bytes"),
        "{out}"
    );
    // The cron thread is not stuck: the stop records and ends in time.
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(15)).is_some());
}

/// CPU time (user and system) a process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

/// Attack on cron under Redis faults: two instances, a 1-second entry, Redis
/// stalled (SIGSTOP) for 4 s, then refusing every write (MISCONF) for 4 s. Every
/// tick from the first to the last is claimed once and runs once (the stalled
/// and refused ones late, within the minute of catch-up), and neither instance
/// spins or floods its log meanwhile.
#[test]
fn stalls_and_refused_writes_lose_no_tick_and_cost_little() {
    let redis = Redis::start();
    let tab = crontab(&tally_line("* * * * * *", "faults"));
    let a = cron_server(&redis, &tab, &[]);
    let b = cron_server(&redis, &tab, &[]);
    let mut conn = redis.conn();
    wait_for("a run", Duration::from_secs(10), || {
        (get_int(&mut conn, "CERBAS-TALLY-faults") >= 1).then_some(())
    });
    let cpu = |s: &Server| cpu_ticks(s.pid());
    let before = (cpu(&a), cpu(&b));
    redis.pause();
    // A bare sleep is the fault itself here: Redis is stopped for this long.
    std::thread::sleep(Duration::from_secs(4));
    redis.resume();
    start_misconf(&redis, &mut conn);
    a.wait_log("cron: redis refuses a command", 1);
    std::thread::sleep(Duration::from_secs(4));
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("stop-writes-on-bgsave-error")
        .arg("no")
        .query::<()>(&mut conn)
        .expect("end MISCONF");
    let ran = get_int(&mut conn, "CERBAS-TALLY-faults");
    wait_for("runs resume", Duration::from_secs(15), || {
        (get_int(&mut conn, "CERBAS-TALLY-faults") >= ran + 2).then_some(())
    });
    let used = (cpu(&a) - before.0, cpu(&b) - before.1);
    stop_ticks(&tab, &[&a, &b], &mut conn);
    let ticks = claimed_ticks(&mut conn);
    let (first, last) = (ticks[0], ticks[ticks.len() - 1]);
    let missing: Vec<i64> = (first..=last).filter(|t| !ticks.contains(t)).collect();
    assert!(missing.is_empty(), "ticks never claimed: {missing:?}");
    assert_eq!(
        ticks.len() as i64,
        get_int(&mut conn, "CERBAS-TALLY-faults"),
        "each claim ran once"
    );
    for s in [&a, &b] {
        let log = s.log_text();
        let warnings = log.matches(" WARN ").count();
        assert!(warnings < 20, "{warnings} warnings:\n{log}");
    }
    // About 10 s of faults: a spinning thread would use most of that.
    println!("CPU ticks during the faults: {used:?}");
    assert!(used.0 < 200 && used.1 < 200, "{used:?}");
}
