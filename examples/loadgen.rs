//! Load generator for a running cerbas server: the workloads of DESIGN §6, each
//! quoted as a ratio against a Redis limit measured in the same run, plus a
//! protocol check in the seed's literal style.
//!
//! ```text
//! cargo run --release --example loadgen -- --redis redis://127.0.0.1:6399 \
//!     [--workload w1|w2|w3|w4|seed|delay|rss|all (or a list: w1,w3)] [--n N] [--env dev|prod]
//!     [--budget SECS] [--no-ref] [--server-pid PID]
//! ```
//!
//! It assumes a cerbas server already serves that Redis with the shipped
//! `cerbas.toml` (user and source `test`, the example functions). Workloads:
//!
//! - `w1` latency: one client, sequential `hello` round trips; p50 and p99. Against
//!   a raw `PING` on the same kind of connection, and against `ref` (below); the
//!   three take turns, so they sample the same moments of a noisy machine.
//! - `w2` throughput: 16 threads, each with its own client, sequential round trips
//!   for a fixed count; round trips/s. Against 16 threads doing `PING`, and `ref`.
//! - `w3` drain: N `tally` requests stored, then queued by one `RPUSH`; requests/s
//!   until the tally counter reaches N ("ran"), and until every request key is
//!   deleted ("acked"). Against `ref`.
//! - `w4` I/O concurrency: 200 `sleep {"ms":100}` requests, all subscribed first,
//!   queued by one `RPUSH`; seconds until all are answered, against the ideal 0.1 s.
//! - `seed`: sequential requests that subscribe *after* the `RPUSH`, as the seed's
//!   steps do, alternating JSON and msgpack over the example functions; counts
//!   wrong replies and hangs (no reply within 5 s).
//! - `delay`: N `hello` requests (user `foo`, source `web`), each with a `delay`
//!   drawn deterministically from 200..=2000 ms, all subscribed first, pushed one
//!   `RPUSH` each as fast as possible. Per reply, lateness = arrival − (instant
//!   before its `RPUSH` + delay): p50, p99, max. A reply with lateness < 0 is early
//!   (a server bug); one later than delay + 10 s counts as missing.
//! - `rss` (not in `all`; needs `--server-pid`, the pid of the cerbas process on this
//!   machine): the server's memory while N (default 1,000,000) waiting one-way
//!   `hello` requests drain, twice: as old clients send them (no `reply` field, so
//!   every reply is held for late subscribers, up to `republish_max_bytes`), then
//!   with `"reply": false`. All are stored and queued first, then the server drains
//!   them; its RSS is sampled every 50 ms. Per pass: requests/s, RSS before, peak
//!   (the sampled maximum, and VmHWM when it could be reset through
//!   `/proc/PID/clear_refs`), and after (once the grace has passed).
//!
//! `ref` is a lean reference server run inside this program on another Redis db
//! (15, or 14 if the server uses 15), speaking the same protocol with the same
//! client: one thread, `BLPOP` + `LPOP` batch, `MGET`, one pipeline of `PUBLISH`
//! ×2 + `DEL`, no access checks, no reliable queue, no retries. It answers `hello`
//! and `tally` only. It is the floor of this round-trip shape on this Redis:
//! quote cerbas as a ratio to it, not as a lone time (DESIGN §6).
//!
//! Every loop is bounded in count and in time (`--budget`, per workload), only a
//! loopback URL is accepted, and the program exits by itself. Output: one line per
//! workload on stdout, in a fixed format; notes and mismatches go to stderr.

use cerbas::protocol::{parse_queue_entry, parse_request, DEFAULT_PREFIX};
use cerbas::{Client, ClientError, Config, Env, Error, Keys, Reply};
use redis::Connection;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str =
    "usage: loadgen --redis redis://127.0.0.1:PORT [--workload w1|w2|w3|w4|seed|delay|rss|all] \
[--n N] [--env dev|prod] [--budget SECS] [--no-ref] [--server-pid PID]";

/// Callers in W2 (DESIGN §6).
const CALLERS: usize = 16;
/// How long a client waits for one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Round trips before W1 starts measuring.
const WARM_UP: u64 = 50;
/// Seed mode gives up after this many hangs (each costs `REPLY_TIMEOUT`).
const MAX_HANGS: u64 = 20;
/// After W3, wait this long before the next workload: cerbas republishes each
/// reply nobody heard for `reply_grace_ms` (5 s shipped), which would load Redis.
const SETTLE_AFTER_W3: Duration = Duration::from_secs(6);
/// The range the `delay` workload draws its delays from, in ms (inclusive).
const DELAY_MIN_MS: u64 = 200;
const DELAY_MAX_MS: u64 = 2_000;
/// In the `delay` workload, a reply later than its delay plus this is missing.
const DELAY_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    W1,
    W2,
    W3,
    W4,
    Seed,
    Delay,
    Rss,
}

impl Workload {
    fn default_n(self) -> u64 {
        match self {
            Workload::W1 => 2_000,
            Workload::W2 => 8_000,
            Workload::W3 => 20_000,
            Workload::W4 => 200,
            Workload::Seed => 10_000,
            Workload::Delay => 1_000,
            Workload::Rss => 1_000_000,
        }
    }
}

struct Opts {
    redis: String,
    env: Env,
    workloads: Vec<Workload>,
    n: Option<u64>,
    budget: Duration,
    reference: bool,
    server_pid: Option<u32>,
}

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut redis = None;
    let mut env = Env::Dev;
    let mut workloads = vec![
        Workload::W1,
        Workload::W2,
        Workload::W3,
        Workload::W4,
        Workload::Seed,
        Workload::Delay,
    ];
    let mut n = None;
    let mut budget = Duration::from_secs(120);
    let mut reference = true;
    let mut server_pid = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => redis = Some(value()?),
            "--env" => env = value()?.parse().map_err(|e: Error| e.to_string())?,
            "--n" => {
                let v: u64 = value()?.parse().map_err(|_| "--n wants a whole number")?;
                if v == 0 {
                    return Err("--n must be at least 1".into());
                }
                n = Some(v);
            }
            "--budget" => {
                let s: u64 = value()?.parse().map_err(|_| "--budget wants seconds")?;
                budget = Duration::from_secs(s.clamp(1, 3600));
            }
            "--workload" => {
                let v = value()?;
                workloads.clear();
                for w in v.split(',') {
                    match w.trim().to_ascii_lowercase().as_str() {
                        "w1" => workloads.push(Workload::W1),
                        "w2" => workloads.push(Workload::W2),
                        "w3" => workloads.push(Workload::W3),
                        "w4" => workloads.push(Workload::W4),
                        "seed" => workloads.push(Workload::Seed),
                        "delay" => workloads.push(Workload::Delay),
                        "rss" => workloads.push(Workload::Rss),
                        "all" => workloads.extend([
                            Workload::W1,
                            Workload::W2,
                            Workload::W3,
                            Workload::W4,
                            Workload::Seed,
                            Workload::Delay,
                        ]),
                        other => return Err(format!("unknown workload {other:?}")),
                    }
                }
            }
            "--no-ref" => reference = false,
            "--server-pid" => {
                server_pid = Some(value()?.parse().map_err(|_| "--server-pid wants a pid")?);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let redis = redis.ok_or("--redis is required")?;
    if workloads.contains(&Workload::Rss) && server_pid.is_none() {
        return Err("--workload rss needs --server-pid".into());
    }
    Ok(Opts {
        redis,
        env,
        workloads,
        n,
        budget,
        reference,
        server_pid,
    })
}

/// Only `redis://` on a loopback host: this program floods what it targets.
fn check_loopback(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or("only redis:// URLs are accepted")?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    match host {
        "127.0.0.1" | "localhost" | "::1" => Ok(()),
        h if h.starts_with("127.") => Ok(()),
        h => Err(format!("refusing non-loopback host {h:?}")),
    }
}

/// `url` with its db replaced by `db`.
fn with_db(url: &str, db: i64) -> String {
    let (rest, query) = match url.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (url, String::new()),
    };
    let after = rest.strip_prefix("redis://").unwrap_or(rest);
    let authority = after.split('/').next().unwrap_or(after);
    format!("redis://{authority}/{db}{query}")
}

/// Where one side of a comparison lives: its URL (with db) and env.
#[derive(Clone)]
struct Target {
    url: String,
    env: Env,
    db: i64,
}

impl Target {
    fn client(&self) -> Result<Client, String> {
        Client::open(&self.url, self.env)
            .map(|c| c.identity("test", "test").timeout(REPLY_TIMEOUT))
            .map_err(|e| format!("connect: {e}"))
    }

    fn conn(&self) -> Result<Connection, String> {
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        cerbas::connection::open(&client, Duration::from_secs(10)).map_err(|e| e.to_string())
    }

    fn keys(&self) -> Keys {
        Keys::new(DEFAULT_PREFIX, self.db)
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = check_loopback(&opts.redis) {
        eprintln!("loadgen: {e}");
        std::process::exit(2);
    }
    match run(&opts) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    let config = Config {
        redis_url: opts.redis.clone(),
        env: opts.env,
        ..Config::default()
    };
    let url = config.connection_url().map_err(|e| e.to_string())?;
    let db = config.db();
    let cerbas = Target {
        url: url.clone(),
        env: opts.env,
        db,
    };
    let ref_db = if db == 15 { 14 } else { 15 };
    let reference = Target {
        url: with_db(&url, ref_db),
        env: opts.env,
        db: ref_db,
    };
    // Fail early, and say so, if Redis or the server is not there.
    {
        let c = cerbas.client()?;
        match c.request("hello", json!({})) {
            Ok(Reply::Ok(v)) if v == json!("hello world!") => {}
            Ok(other) => return Err(format!("unexpected reply to hello: {other:?}")),
            Err(e) => return Err(format!("no cerbas server answering on db {db}: {e}")),
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "loadgen: redis={} db={db} ref_db={} cpus={cpus} budget={}s",
        cerbas::config::redact_url(&url),
        if opts.reference {
            ref_db.to_string()
        } else {
            "off".into()
        },
        opts.budget.as_secs()
    );
    let ref_server = if opts.reference {
        Some(RefServer::start(reference.clone())?)
    } else {
        None
    };
    let reference = ref_server.as_ref().map(|_| &reference);
    let mut result = Ok(());
    for (i, w) in opts.workloads.iter().enumerate() {
        let n = opts.n.unwrap_or(w.default_n());
        let r = match w {
            Workload::W1 => w1(&cerbas, reference, n, opts.budget),
            Workload::W2 => w2(&cerbas, reference, n, opts.budget),
            Workload::W3 => w3(&cerbas, reference, n, opts.budget),
            Workload::W4 => w4(&cerbas, n, opts.budget),
            Workload::Seed => seed(&cerbas, n, opts.budget),
            Workload::Delay => delay(&cerbas, n, opts.budget),
            Workload::Rss => match opts.server_pid {
                Some(pid) => rss(&cerbas, pid, n, opts.budget),
                None => Err("--server-pid is required".into()),
            },
        };
        if let Err(e) = r {
            println!("{w:?}: failed: {e}");
            result = Err(format!("{w:?} failed"));
        }
        if matches!(w, Workload::W3 | Workload::Rss) && i + 1 < opts.workloads.len() {
            eprintln!(
                "(settling {}s: cerbas republishes unheard replies)",
                SETTLE_AFTER_W3.as_secs()
            );
            std::thread::sleep(SETTLE_AFTER_W3);
        }
    }
    if let Some(s) = ref_server {
        s.stop();
    }
    result
}

// ---------------------------------------------------------------- rss

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`), as MiB.
fn proc_mib(pid: u32, field: &str) -> Result<f64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e} (is --server-pid the cerbas pid?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or(format!("no {field} in /proc/{pid}/status"))
}

/// Resets the process's VmHWM to its current RSS; false if not allowed.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// One pass of the `rss` workload: `n` one-way `hello` requests stored and queued,
/// then drained while the server's RSS is sampled.
fn rss_pass(t: &Target, pid: u32, n: u64, budget: Duration, field: bool) -> Result<(), String> {
    let client = t.client()?;
    let keys = t.keys();
    let mut c = t.conn()?;
    let body = if field {
        client.body_one_way("hello", json!({}))
    } else {
        client.body("hello", json!({}))
    };
    let before = proc_mib(pid, "VmRSS")?;
    let ids = store(&mut c, &keys, n, &body)?;
    let hwm = reset_peak(pid);
    let t0 = Instant::now();
    let deadline = t0 + budget;
    for chunk in ids.chunks(10_000) {
        redis::cmd("RPUSH")
            .arg(keys.queue())
            .arg(chunk)
            .query::<u64>(&mut c)
            .map_err(|e| e.to_string())?;
    }
    let mut peak = before;
    let mut last_check = t0;
    let mut drained = None;
    while Instant::now() < deadline {
        peak = peak.max(proc_mib(pid, "VmRSS")?);
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            let queued: u64 = redis::cmd("LLEN")
                .arg(keys.queue())
                .query(&mut c)
                .map_err(|e| e.to_string())?;
            if queued == 0 && existing(&mut c, &keys, &ids)? == 0 {
                drained = Some(t0.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the grace (5 s shipped) nothing is held for late subscribers any more.
    let settle = Instant::now() + Duration::from_secs(6);
    while Instant::now() < settle {
        peak = peak.max(proc_mib(pid, "VmRSS")?);
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = proc_mib(pid, "VmRSS")?;
    let hwm_part = if hwm {
        format!(", VmHWM {:.1} MiB", proc_mib(pid, "VmHWM")?)
    } else {
        " (VmHWM could not be reset)".into()
    };
    println!(
        "RSS drain: {n} waiting one-way hello, {}: drained {}; server RSS before {before:.1} MiB, peak {peak:.1} MiB{hwm_part}, after {after:.1} MiB",
        if field {
            "\"reply\": false"
        } else {
            "no reply field (old clients)"
        },
        rate(n, drained),
    );
    Ok(())
}

fn rss(cerbas: &Target, pid: u32, n: u64, budget: Duration) -> Result<(), String> {
    rss_pass(cerbas, pid, n, budget, false)?;
    rss_pass(cerbas, pid, n, budget, true)
}

// ---------------------------------------------------------------- measuring

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`-th percentile (nearest rank) of sorted samples.
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Latency {
    p50: Duration,
    p99: Duration,
    done: u64,
    errors: u64,
}

/// Runs each of `ops` `n` times after a warm-up (or until `budget`), timing
/// each call; an op returns false for an error. The ops take turns (one call of
/// each per round), so on a noisy machine they all sample the same moments.
fn latency(n: u64, budget: Duration, ops: &mut [&mut dyn FnMut() -> bool]) -> Vec<Latency> {
    let deadline = Instant::now() + budget;
    for _ in 0..WARM_UP.min(n) {
        for op in ops.iter_mut() {
            op();
        }
    }
    let mut samples = vec![Vec::with_capacity(n as usize); ops.len()];
    let mut errors = vec![0u64; ops.len()];
    for _ in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        for (i, op) in ops.iter_mut().enumerate() {
            let t = Instant::now();
            let ok = op();
            samples[i].push(t.elapsed());
            errors[i] += u64::from(!ok);
        }
    }
    samples
        .into_iter()
        .zip(errors)
        .map(|(mut s, errors)| {
            s.sort_unstable();
            Latency {
                p50: percentile(&s, 50.0),
                p99: percentile(&s, 99.0),
                done: s.len() as u64,
                errors,
            }
        })
        .collect()
}

struct Throughput {
    done: u64,
    errors: u64,
    elapsed: Duration,
}

impl Throughput {
    fn per_sec(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `threads` threads, each with its own state from `make`, each running `op` `per`
/// times (or until `budget`); all start together.
fn parallel<S>(
    threads: usize,
    per: u64,
    budget: Duration,
    make: impl Fn() -> Result<S, String> + Sync,
    op: impl Fn(&mut S) -> bool + Sync,
) -> Result<Throughput, String> {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let state = make();
                    barrier.wait();
                    let mut state = state?;
                    let deadline = Instant::now() + budget;
                    let (mut done, mut errors) = (0u64, 0u64);
                    while done < per && Instant::now() < deadline {
                        errors += u64::from(!op(&mut state));
                        done += 1;
                    }
                    Ok::<_, String>((done, errors))
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut total = Throughput {
            done: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        };
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok((d, e))) => {
                    total.done += d;
                    total.errors += e;
                }
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some("a thread panicked".into())),
            }
        }
        total.elapsed = t0.elapsed();
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    })
}

fn hello_ok(c: &mut Client) -> bool {
    matches!(c.request("hello", json!({})), Ok(Reply::Ok(v)) if v == json!("hello world!"))
}

fn ping_ok(c: &mut Connection) -> bool {
    redis::cmd("PING")
        .query::<String>(c)
        .is_ok_and(|p| p == "PONG")
}

// ---------------------------------------------------------------- workloads

fn w1(cerbas: &Target, reference: Option<&Target>, n: u64, budget: Duration) -> Result<(), String> {
    let mut conn = cerbas.conn()?;
    let mut c = cerbas.client()?;
    let mut ping = || ping_ok(&mut conn);
    let mut hello = || hello_ok(&mut c);
    let (l, ping, floor) = match reference {
        Some(r) => {
            let mut rc = r.client()?;
            let mut ref_hello = || hello_ok(&mut rc);
            let mut v = latency(n, budget, &mut [&mut hello, &mut ping, &mut ref_hello]);
            let f = v.pop();
            let p = v.pop();
            (v.pop(), p, f)
        }
        None => {
            let mut v = latency(n, budget, &mut [&mut hello, &mut ping]);
            let p = v.pop();
            (v.pop(), p, None)
        }
    };
    let (Some(l), Some(ping)) = (l, ping) else {
        return Err("no samples".into());
    };
    let (ref_part, ref_ratio) = match &floor {
        Some(f) => (
            format!(" | ref p50 {:.3} ms p99 {:.3} ms", ms(f.p50), ms(f.p99)),
            format!(" cerbas/ref {:.2}x", ms(l.p50) / ms(f.p50).max(1e-9)),
        ),
        None => (String::new(), String::new()),
    };
    let other_errors = floor.as_ref().map_or(0, |f| f.errors) + ping.errors;
    if other_errors > 0 {
        eprintln!("W1: {other_errors} errors in the PING or ref measurements");
    }
    println!(
        "W1 latency: {} round trips, cerbas p50 {:.3} ms p99 {:.3} ms, {} errors | PING p50 {:.3} ms p99 {:.3} ms{ref_part} | p50 ratio cerbas/PING {:.1}x{ref_ratio}",
        l.done,
        ms(l.p50),
        ms(l.p99),
        l.errors,
        ms(ping.p50),
        ms(ping.p99),
        ms(l.p50) / ms(ping.p50).max(1e-9),
    );
    Ok(())
}

fn w2(cerbas: &Target, reference: Option<&Target>, n: u64, budget: Duration) -> Result<(), String> {
    let per = (n / CALLERS as u64).max(1);
    let ping = parallel(CALLERS, per, budget, || cerbas.conn(), ping_ok)?;
    let floor = match reference {
        Some(r) => Some(parallel(CALLERS, per, budget, || r.client(), hello_ok)?),
        None => None,
    };
    let t = parallel(CALLERS, per, budget, || cerbas.client(), hello_ok)?;
    let other_errors = ping.errors + floor.as_ref().map_or(0, |f| f.errors);
    if other_errors > 0 {
        eprintln!("W2: {other_errors} errors in the PING or ref measurements");
    }
    let (ref_part, ref_ratio) = match &floor {
        Some(f) => (
            format!(" | ref {:.0} rt/s", f.per_sec()),
            format!(" cerbas/ref {:.2}", t.per_sec() / f.per_sec()),
        ),
        None => (String::new(), String::new()),
    };
    println!(
        "W2 throughput: {CALLERS} callers x {per} = {} round trips in {:.2} s, cerbas {:.0} rt/s, {} errors | PING {:.0}/s{ref_part} | ratio cerbas/PING {:.3}{ref_ratio}",
        t.done,
        t.elapsed.as_secs_f64(),
        t.per_sec(),
        t.errors,
        ping.per_sec(),
        t.per_sec() / ping.per_sec(),
    );
    Ok(())
}

struct Drain {
    ran: Option<Duration>,
    acked: Option<Duration>,
    count: i64,
    left: u64,
}

fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("loadgen-{tag}-{}-{nanos}", std::process::id())
}

/// Stores `n` request bodies under fresh ids (not yet queued); returns the ids.
fn store(c: &mut Connection, keys: &Keys, n: u64, body: &[u8]) -> Result<Vec<u64>, String> {
    let end: u64 = redis::cmd("INCRBY")
        .arg(keys.counter())
        .arg(n)
        .query(c)
        .map_err(|e| e.to_string())?;
    let ids: Vec<u64> = (end + 1 - n..=end).collect();
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("SET").arg(keys.request(*id)).arg(body).ignore();
        }
        pipe.query::<()>(c).map_err(|e| e.to_string())?;
    }
    Ok(ids)
}

/// How many of the request keys of `ids` still exist.
fn existing(c: &mut Connection, keys: &Keys, ids: &[u64]) -> Result<u64, String> {
    let mut pipe = redis::pipe();
    for chunk in ids.chunks(5000) {
        let names: Vec<String> = chunk.iter().map(|id| keys.request(*id)).collect();
        pipe.cmd("EXISTS").arg(names);
    }
    let counts: Vec<u64> = pipe.query(c).map_err(|e| e.to_string())?;
    Ok(counts.iter().sum())
}

/// Queues `n` tally requests at once and waits for them to run and be acked.
fn drain(t: &Target, n: u64, budget: Duration) -> Result<Drain, String> {
    let client = t.client()?;
    let keys = t.keys();
    let mut c = t.conn()?;
    let name = unique("tally");
    let tally_key = keys.key(&format!("TALLY-{name}"));
    let body = client.body("tally", json!({ "name": name }));
    let ids = store(&mut c, &keys, n, &body)?;
    let t0 = Instant::now();
    let deadline = t0 + budget;
    redis::cmd("RPUSH")
        .arg(keys.queue())
        .arg(&ids)
        .query::<u64>(&mut c)
        .map_err(|e| e.to_string())?;
    let mut ran = None;
    let mut count = 0;
    while Instant::now() < deadline {
        count = redis::cmd("GET")
            .arg(&tally_key)
            .query::<Option<i64>>(&mut c)
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        if count >= n as i64 {
            ran = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut acked = None;
    let mut left = n;
    while ran.is_some() && Instant::now() < deadline {
        left = existing(&mut c, &keys, &ids)?;
        if left == 0 {
            acked = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _: Result<(), _> = redis::cmd("DEL").arg(&tally_key).query(&mut c);
    Ok(Drain {
        ran,
        acked,
        count,
        left,
    })
}

fn rate(n: u64, d: Option<Duration>) -> String {
    match d {
        Some(d) => format!(
            "{:.0}/s ({:.2} s)",
            n as f64 / d.as_secs_f64(),
            d.as_secs_f64()
        ),
        None => "unfinished".into(),
    }
}

fn w3(cerbas: &Target, reference: Option<&Target>, n: u64, budget: Duration) -> Result<(), String> {
    // The reference first: cerbas keeps republishing unheard replies for a while.
    let floor = match reference {
        Some(r) => Some(drain(r, n, budget)?),
        None => None,
    };
    let d = drain(cerbas, n, budget)?;
    let ref_part = match &floor {
        Some(f) => {
            let ratio = match (d.ran, f.ran) {
                (Some(a), Some(b)) => format!("{:.2}", b.as_secs_f64() / a.as_secs_f64()),
                _ => "n/a".into(),
            };
            format!(
                " | ref ran {} | ratio ran cerbas/ref {ratio}",
                rate(n, f.ran)
            )
        }
        None => String::new(),
    };
    println!(
        "W3 drain: {n} tally requests queued at once, cerbas ran {}, acked {}, tally {} of {n}, {} request keys left{ref_part}",
        rate(n, d.ran),
        rate(n, d.acked),
        d.count,
        d.left,
    );
    Ok(())
}

fn w4(cerbas: &Target, n: u64, budget: Duration) -> Result<(), String> {
    const SLEEP_MS: u64 = 100;
    let client = cerbas.client()?;
    let keys = cerbas.keys();
    let mut c = cerbas.conn()?;
    let mut sub = cerbas.conn()?;
    let body = client.body("sleep", json!({ "ms": SLEEP_MS }));
    // Ids first (not yet stored), so every channel is subscribed before any push.
    let end: u64 = redis::cmd("INCRBY")
        .arg(keys.counter())
        .arg(n)
        .query(&mut c)
        .map_err(|e| e.to_string())?;
    let ids: Vec<u64> = (end + 1 - n..=end).collect();
    let mut ps = sub.as_pubsub();
    for chunk in ids.chunks(500) {
        let channels: Vec<String> = chunk.iter().map(|id| keys.reply_channel(*id)).collect();
        ps.subscribe(channels).map_err(|e| e.to_string())?;
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("SET").arg(keys.request(*id)).arg(&body).ignore();
    }
    pipe.query::<()>(&mut c).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let deadline = t0 + budget;
    redis::cmd("RPUSH")
        .arg(keys.queue())
        .arg(&ids)
        .query::<u64>(&mut c)
        .map_err(|e| e.to_string())?;
    let wanted: HashSet<String> = ids.iter().map(|id| keys.reply_channel(*id)).collect();
    let mut got = HashSet::new();
    let mut errors = 0;
    let mut elapsed = None;
    while got.len() < wanted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        ps.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let msg = match ps.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => break,
            Err(e) => return Err(e.to_string()),
        };
        let channel = msg.get_channel_name().to_string();
        if !wanted.contains(&channel) || !got.insert(channel) {
            continue;
        }
        match Reply::from_json(msg.get_payload_bytes()) {
            Ok(Reply::Ok(v)) if v == json!(SLEEP_MS) => {}
            other => {
                errors += 1;
                if errors <= 5 {
                    eprintln!("W4: unexpected reply {other:?}");
                }
            }
        }
        if got.len() == wanted.len() {
            elapsed = Some(t0.elapsed());
        }
    }
    let ideal = Duration::from_millis(SLEEP_MS);
    match elapsed {
        Some(e) => println!(
            "W4 io: {n} x sleep {SLEEP_MS} ms queued at once, all answered in {:.3} s, {errors} errors | ideal {:.3} s | ratio {:.2}x",
            e.as_secs_f64(),
            ideal.as_secs_f64(),
            e.as_secs_f64() / ideal.as_secs_f64()
        ),
        None => println!(
            "W4 io: {n} x sleep {SLEEP_MS} ms queued at once, only {} of {n} answered within {} s, {errors} errors",
            got.len(),
            budget.as_secs()
        ),
    }
    Ok(())
}

/// The seed's example calls and the replies the original gave.
fn seed_case(i: u64) -> (&'static str, Value, Reply) {
    match i % 7 {
        0 => ("hello", json!({}), Reply::Ok(json!("hello world!"))),
        1 => {
            let m = json!({"text": format!("message {i}"), "n": i, "list": [1, "two", null]});
            ("echo", json!({ "message": m }), Reply::Ok(m))
        }
        2 => {
            let value = format!("bar-{i}");
            ("withargs", json!({ "foo": value }), Reply::Ok(json!(value)))
        }
        3 => (
            "witherror",
            json!({}),
            Reply::Error("unexpected error".into()),
        ),
        4 => ("sum", json!({"a": 1, "b": 2}), Reply::Ok(json!(3))),
        5 => ("dummy", json!({}), Reply::Ok(Value::Null)),
        _ => ("asyncfunc", json!({}), Reply::Ok(json!(""))),
    }
}

fn seed(cerbas: &Target, n: u64, budget: Duration) -> Result<(), String> {
    let c = cerbas.client()?;
    let mut sub = cerbas.conn()?;
    let deadline = Instant::now() + budget;
    let (mut done, mut wrong, mut hangs) = (0u64, 0u64, 0u64);
    let mut stopped = None;
    let t0 = Instant::now();
    for i in 0..n {
        if Instant::now() >= deadline {
            stopped = Some("time budget spent");
            break;
        }
        if hangs >= MAX_HANGS {
            stopped = Some("too many hangs");
            break;
        }
        let (func, args, want) = seed_case(i);
        let msgpack = i % 2 == 1;
        let body = c.body(func, args);
        done += 1;
        let got = call_late(&c, &mut sub, &body, msgpack);
        if got.is_err() {
            // After a timeout the subscriber may be out of step: start afresh.
            sub = cerbas.conn()?;
        }
        match got {
            Ok(r) if r == want => {}
            Ok(r) => {
                wrong += 1;
                if wrong <= 5 {
                    eprintln!("seed: #{i} {func} msgpack={msgpack}: got {r:?}, want {want:?}");
                }
            }
            Err(ClientError::Timeout(_)) => {
                hangs += 1;
                if hangs <= 5 {
                    eprintln!(
                        "seed: #{i} {func} msgpack={msgpack}: no reply within {REPLY_TIMEOUT:?}"
                    );
                }
            }
            Err(e) => {
                wrong += 1;
                if wrong <= 5 {
                    eprintln!("seed: #{i} {func} msgpack={msgpack}: {e}");
                }
            }
        }
    }
    let note = stopped.map_or(String::new(), |s| format!(" (stopped early: {s})"));
    println!(
        "seed: {done} requests, {wrong} wrong, {hangs} hangs{note} [{:.2} s, subscribe after RPUSH, JSON/msgpack alternating]",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The seed's steps: queue the request, then subscribe (after `RPUSH`) on a plain
/// connection; the server's republish to late subscribers must cover the race.
fn call_late(
    c: &Client,
    sub: &mut Connection,
    body: &[u8],
    msgpack: bool,
) -> Result<Reply, ClientError> {
    let id = c.submit(body)?;
    let channel = if msgpack {
        c.keys().msgpack_channel(id)
    } else {
        c.keys().reply_channel(id)
    };
    let lost = |e: redis::RedisError| ClientError::Connection(e.to_string());
    let mut ps = sub.as_pubsub();
    ps.subscribe(&channel).map_err(lost)?;
    ps.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(lost)?;
    let got = match ps.get_message() {
        Ok(m) => {
            let bytes = m.get_payload_bytes();
            if msgpack {
                Reply::from_msgpack(bytes)
            } else {
                Reply::from_json(bytes)
            }
            .map_err(ClientError::Protocol)
        }
        Err(e) if e.is_timeout() => Err(ClientError::Timeout(REPLY_TIMEOUT)),
        Err(e) => Err(lost(e)),
    };
    if got.is_ok() {
        ps.unsubscribe(&channel).map_err(lost)?;
    }
    got
}

/// The delay of request `i` of the `delay` workload, in ms: one step of an LCG
/// seeded by `i` (Knuth's MMIX constants), its high bits mapped onto the range.
fn delay_of(i: u64) -> u64 {
    let x = i
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    DELAY_MIN_MS + (x >> 33) % (DELAY_MAX_MS - DELAY_MIN_MS + 1)
}

fn delay(cerbas: &Target, n: u64, budget: Duration) -> Result<(), String> {
    let keys = cerbas.keys();
    let mut c = cerbas.conn()?;
    let mut sub = cerbas.conn()?;
    // Ids first (not yet stored), so every channel is subscribed before any push.
    let end: u64 = redis::cmd("INCRBY")
        .arg(keys.counter())
        .arg(n)
        .query(&mut c)
        .map_err(|e| e.to_string())?;
    let ids: Vec<u64> = (end + 1 - n..=end).collect();
    let delays: Vec<u64> = (0..n).map(delay_of).collect();
    let mut ps = sub.as_pubsub();
    for chunk in ids.chunks(500) {
        let channels: Vec<String> = chunk.iter().map(|id| keys.reply_channel(*id)).collect();
        ps.subscribe(channels).map_err(|e| e.to_string())?;
    }
    // Bodies stored in bulk; each is queued by its own RPUSH, timed just before it.
    for (chunk, chunk_delays) in ids.chunks(1000).zip(delays.chunks(1000)) {
        let mut pipe = redis::pipe();
        for (id, d) in chunk.iter().zip(chunk_delays) {
            let body =
                json!({"func": "hello", "args": {}, "user": "foo", "source": "web", "delay": d});
            pipe.cmd("SET")
                .arg(keys.request(*id))
                .arg(body.to_string())
                .ignore();
        }
        pipe.query::<()>(&mut c).map_err(|e| e.to_string())?;
    }
    let index: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| (keys.reply_channel(*id), k))
        .collect();
    let t0 = Instant::now();
    let deadline = t0 + budget;
    // Set by the pusher when it stops: the last reply is due by then + max delay.
    let pushed_by = OnceLock::new();
    // Per request: when its reply arrived, and whether it was the right one.
    let mut arrived: Vec<Option<(Instant, bool)>> = vec![None; ids.len()];
    let mut wrong = 0u64;
    let (pushes, listened) = std::thread::scope(|s| {
        let pusher = s.spawn(|| {
            let mut pushed = Vec::with_capacity(ids.len());
            let queue = keys.queue();
            let result = ids.iter().try_for_each(|id| {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                let at = Instant::now();
                redis::cmd("RPUSH")
                    .arg(&queue)
                    .arg(id)
                    .query::<u64>(&mut c)
                    .map_err(|e| e.to_string())?;
                pushed.push(at);
                Ok::<_, String>(())
            });
            let _ = pushed_by.set(Instant::now());
            result.map(|()| pushed)
        });
        let listened = (|| {
            let mut got = 0;
            while got < ids.len() {
                let until = pushed_by.get().map_or(deadline, |t| {
                    deadline.min(*t + Duration::from_millis(DELAY_MAX_MS) + DELAY_WINDOW)
                });
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // In slices, to notice when the pusher is done.
                let slice = left.min(Duration::from_millis(200));
                ps.set_read_timeout(Some(slice))
                    .map_err(|e| e.to_string())?;
                let msg = match ps.get_message() {
                    Ok(m) => m,
                    Err(e) if e.is_timeout() => continue,
                    Err(e) => return Err(e.to_string()),
                };
                let at = Instant::now();
                let Some(&k) = index.get(msg.get_channel_name()) else {
                    continue;
                };
                if arrived[k].is_some() {
                    continue;
                }
                let ok = match Reply::from_json(msg.get_payload_bytes()) {
                    Ok(Reply::Ok(v)) if v == json!("hello world!") => true,
                    other => {
                        wrong += 1;
                        if wrong <= 5 {
                            eprintln!("delay: #{} unexpected reply {other:?}", ids[k]);
                        }
                        false
                    }
                };
                arrived[k] = Some((at, ok));
                got += 1;
            }
            Ok::<_, String>(())
        })();
        (pusher.join(), listened)
    });
    let pushes = pushes.map_err(|_| "the pusher panicked".to_string())??;
    listened?;
    if pushes.len() < ids.len() {
        // Never queued: drop their bodies.
        let unqueued: Vec<String> = ids[pushes.len()..]
            .iter()
            .map(|id| keys.request(*id))
            .collect();
        for chunk in unqueued.chunks(5000) {
            let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut c);
        }
    }
    // Lateness in ms, signed: arrival − (instant before the RPUSH + delay).
    let mut lateness = Vec::with_capacity(pushes.len());
    let mut too_late = 0u64;
    for ((pushed, d), reply) in pushes.iter().zip(&delays).zip(&arrived) {
        let due = *pushed + Duration::from_millis(*d);
        match reply {
            Some((at, _)) if *at > due + DELAY_WINDOW => too_late += 1,
            Some((at, _)) if *at >= due => lateness.push(ms(*at - due)),
            Some((at, _)) => lateness.push(-ms(due - *at)),
            None => {}
        }
    }
    if too_late > 0 {
        eprintln!(
            "delay: {too_late} replies came later than delay + {} s (counted missing)",
            DELAY_WINDOW.as_secs()
        );
    }
    lateness.sort_unstable_by(f64::total_cmp);
    let early = lateness.iter().filter(|l| **l < 0.0).count();
    let early_part = match lateness.first() {
        Some(worst) if early > 0 => format!("{early} early (worst {worst:.3} ms)"),
        _ => format!("{early} early"),
    };
    let stats = match lateness.last() {
        Some(max) => format!(
            "lateness p50 {:.1} ms p99 {:.1} ms max {max:.1} ms",
            percentile(&lateness, 50.0),
            percentile(&lateness, 99.0),
        ),
        None => "lateness n/a".into(),
    };
    let note = if pushes.len() < ids.len() {
        format!(
            " (stopped early: time budget spent, {} of {n} queued)",
            pushes.len()
        )
    } else {
        String::new()
    };
    println!(
        "delay: {n} requests (delays {DELAY_MIN_MS}-{DELAY_MAX_MS} ms), {} answered, {wrong} wrong, {early_part}, {stats}{note}",
        lateness.len(),
    );
    Ok(())
}

// ---------------------------------------------------------------- reference server

/// The lean reference server (see the file's doc): one thread on its own db.
struct RefServer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<u64, String>>,
}

impl RefServer {
    fn start(t: Target) -> Result<RefServer, String> {
        let mut conn = t.conn()?;
        let keys = t.keys();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("loadgen-ref".into())
            .spawn(move || {
                let mut served = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    served += ref_batch(&mut conn, &keys).map_err(|e| e.to_string())?;
                }
                Ok(served)
            })
            .map_err(|e| e.to_string())?;
        Ok(RefServer { stop, handle })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(Ok(served)) => eprintln!("(reference server served {served} requests)"),
            Ok(Err(e)) => eprintln!("(reference server failed: {e})"),
            Err(_) => eprintln!("(reference server panicked)"),
        }
    }
}

/// Serves what is waiting (blocking up to 0.2 s for the first); returns how many.
fn ref_batch(c: &mut Connection, keys: &Keys) -> redis::RedisResult<u64> {
    let queue = keys.queue();
    let first: Option<(String, String)> = redis::cmd("BLPOP").arg(&queue).arg(0.2).query(c)?;
    let Some((_, first)) = first else {
        return Ok(0);
    };
    let more: Option<Vec<String>> = redis::cmd("LPOP").arg(&queue).arg(511).query(c)?;
    let ids: Vec<u64> = std::iter::once(first)
        .chain(more.unwrap_or_default())
        .filter_map(|e| parse_queue_entry(e.as_bytes()))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let req_keys: Vec<String> = ids.iter().map(|id| keys.request(*id)).collect();
    let bodies: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&req_keys).query(c)?;
    let requests: Vec<Result<cerbas::Request, String>> = bodies
        .iter()
        .map(|b| match b {
            Some(b) => parse_request(b, 1 << 20).map_err(|e| e.to_string()),
            None => Err("request not found".into()),
        })
        .collect();
    // Tallies first: their replies carry the new count.
    let mut tally = redis::pipe();
    let mut tallied = 0;
    for r in requests.iter().flatten() {
        if r.func == "tally" {
            let name = r.args.get("name").and_then(Value::as_str).unwrap_or("");
            tally.cmd("INCR").arg(keys.key(&format!("TALLY-{name}")));
            tallied += 1;
        }
    }
    let mut counts = if tallied > 0 {
        tally.query::<Vec<i64>>(c)?.into_iter()
    } else {
        Vec::new().into_iter()
    };
    let mut pipe = redis::pipe();
    for (id, r) in ids.iter().zip(&requests) {
        let reply = match r {
            Ok(r) if r.func == "hello" => Reply::Ok(json!("hello world!")),
            Ok(r) if r.func == "tally" => Reply::Ok(json!(counts.next().unwrap_or(0))),
            Ok(r) => Reply::Error(format!("unknown function: {}", r.func)),
            Err(e) => Reply::Error(e.clone()),
        };
        pipe.cmd("PUBLISH")
            .arg(keys.reply_channel(*id))
            .arg(reply.to_json())
            .ignore()
            .cmd("PUBLISH")
            .arg(keys.msgpack_channel(*id))
            .arg(reply.to_msgpack())
            .ignore();
    }
    pipe.cmd("DEL").arg(&req_keys).ignore();
    pipe.query::<()>(c)?;
    Ok(ids.len() as u64)
}
