//! The Rust client's benchmark, per the client benchmark contract (BENCH.md):
//! W1, one caller's sequential round trips (p50/p99) beside the redis crate's own
//! PING p50; W2, many threads sharing one `Client`, round trips per second. Prints
//! exactly one JSON line on stdout (logs go to stderr). Not for: starting Redis or
//! the server, or measuring their CPU (`make bench` does that).
//!
//! ```text
//! cargo run --release --example clientbench -- --redis redis://127.0.0.1:6379 --workload w2 --callers 16 --seconds 5
//! ```

use cerbas::{Client, Config};
use clap::Parser;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Benchmark the cerbas Rust client (W1 latency, W2 throughput)")]
struct Args {
    /// Redis URL (its db, else CERBAS_ENV's: dev 1, prod 8).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// w1: one caller, sequential round trips; w2: threads sharing one client.
    #[arg(long, default_value = "w1")]
    workload: String,
    /// W2: how many threads share the client.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// W2: how long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// W1: how many measured round trips (and PINGs).
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// The function called, with args {"message": "hi"}.
    #[arg(long, default_value = "echo")]
    func: String,
}

/// This process's CPU time (user + system), in µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct we own; a zeroed rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// The `q` quantile of `samples` (sorted here), in ms.
fn quantile_ms(samples: &mut [Duration], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    Some(samples[i].as_secs_f64() * 1e3)
}

/// The redis crate's own PING p50 over `count` PINGs on a plain connection.
fn ping_p50(url: &str, count: usize) -> Result<f64, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client.get_connection().map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let t = Instant::now();
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(|e| e.to_string())?;
        samples.push(t.elapsed());
    }
    quantile_ms(&mut samples, 0.5).ok_or_else(|| "no PING".into())
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let mut config = Config::default();
    config.apply_process_env().map_err(|e| e.to_string())?;
    let client = Client::open(&args.redis, config.env).map_err(|e| e.to_string())?;
    let call_args = json!({"message": "hi"});
    match args.workload.as_str() {
        "w1" => {
            let ping = ping_p50(&args.redis, args.count)?;
            let mut errors = 0u64;
            for _ in 0..200 {
                if client.request(&args.func, call_args.clone()).is_err() {
                    errors += 1;
                }
            }
            let mut samples = Vec::with_capacity(args.count);
            let cpu0 = cpu_us();
            let t0 = Instant::now();
            for _ in 0..args.count {
                let t = Instant::now();
                match client.request(&args.func, call_args.clone()) {
                    Ok(_) => samples.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        log_error(errors, &e);
                    }
                }
            }
            let seconds = t0.elapsed().as_secs_f64();
            let cpu = cpu_us() - cpu0;
            let requests = samples.len() as f64;
            Ok(json!({
                "client": "rust", "workload": "w1", "callers": 1,
                "requests": samples.len(), "seconds": round(seconds),
                "rps": round(requests / seconds),
                "p50_ms": quantile_ms(&mut samples, 0.5).map(round),
                "p99_ms": quantile_ms(&mut samples, 0.99).map(round),
                "ping_p50_ms": round(ping),
                "client_cpu_us_per_rt": round(cpu / requests.max(1.0)),
                "errors": errors,
            }))
        }
        "w2" => {
            let client = Arc::new(client);
            let stop = Arc::new(AtomicBool::new(false));
            let errors = Arc::new(AtomicU64::new(0));
            let cpu0 = cpu_us();
            let t0 = Instant::now();
            let threads: Vec<_> = (0..args.callers.max(1))
                .map(|_| {
                    let (client, stop, errors) = (client.clone(), stop.clone(), errors.clone());
                    let (func, call_args) = (args.func.clone(), call_args.clone());
                    std::thread::spawn(move || {
                        let mut samples = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let t = Instant::now();
                            match client.request(&func, call_args.clone()) {
                                Ok(_) => samples.push(t.elapsed()),
                                Err(e) => {
                                    let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
                                    log_error(n, &e);
                                }
                            }
                        }
                        samples
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs_f64(args.seconds));
            stop.store(true, Ordering::Relaxed);
            let mut samples: Vec<Duration> = Vec::new();
            for t in threads {
                samples.extend(t.join().map_err(|_| "a caller thread panicked")?);
            }
            let seconds = t0.elapsed().as_secs_f64();
            let cpu = cpu_us() - cpu0;
            let requests = samples.len() as f64;
            Ok(json!({
                "client": "rust", "workload": "w2", "callers": args.callers,
                "requests": samples.len(), "seconds": round(seconds),
                "rps": round(requests / seconds),
                "p50_ms": quantile_ms(&mut samples, 0.5).map(round),
                "p99_ms": quantile_ms(&mut samples, 0.99).map(round),
                "ping_p50_ms": null,
                "client_cpu_us_per_rt": round(cpu / requests.max(1.0)),
                "errors": errors.load(Ordering::Relaxed),
            }))
        }
        other => Err(format!("unknown workload {other:?}: w1 or w2")),
    }
}

/// Logs the first few failed calls to stderr.
fn log_error(n: u64, e: &cerbas::ClientError) {
    if n <= 5 {
        eprintln!("clientbench: call failed: {e}");
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("clientbench: {e}");
            std::process::exit(1);
        }
    }
}
