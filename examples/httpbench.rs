//! HTTP round trips per second through the Plug, as a ratio against a plain
//! tiny_http "hello" server measured in the same run (DESIGN §6: ratios, never a
//! lone absolute number).
//!
//! ```text
//! cargo run --release --example httpbench -- [--url http://127.0.0.1:4455/api/hello]
//!     [--clients 16] [--secs 5] [--rounds 2]
//! ```
//!
//! It assumes a cerbas server answers `--url`. It starts the reference itself: a
//! tiny_http server on a free loopback port with as many handler threads as
//! clients, answering `{"status":"ok","data":"hello world!"}`. Each client is a
//! thread with its own keep-alive connection doing sequential GETs; cerbas and the
//! reference take turns (`--rounds` each) so both sample the same moments of a
//! noisy machine. Prints round trips/s of each turn and the ratio of the totals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    url: String,
    clients: usize,
    secs: u64,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:4455/api/hello".into(),
        clients: 16,
        secs: 5,
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--url" => a.url = value,
            "--clients" => a.clients = value.parse().expect("--clients N"),
            "--secs" => a.secs = value.parse().expect("--secs N"),
            "--rounds" => a.rounds = value.parse().expect("--rounds N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// The reference: a plain tiny_http server answering hello; returns its URL.
fn reference(threads: usize) -> String {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("reference server"));
    let port = server.server_addr().to_ip().expect("ip").port();
    for _ in 0..threads {
        let server = server.clone();
        std::thread::spawn(move || {
            let ct =
                tiny_http::Header::from_bytes("Content-Type", "application/json").expect("header");
            for rq in server.incoming_requests() {
                let r = tiny_http::Response::from_data(
                    br#"{"status":"ok","data":"hello world!"}"#.to_vec(),
                )
                .with_header(ct.clone());
                let _ = rq.respond(r);
            }
        });
    }
    format!("http://127.0.0.1:{port}/api/hello")
}

/// Round trips per second of `clients` sequential clients for `secs`.
fn measure(url: &str, clients: usize, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, stop, done, errors) =
                (url.to_string(), stop.clone(), done.clone(), errors.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                while !stop.load(Ordering::Relaxed) {
                    match agent.get(&url).call() {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_vec();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("{url}: {e} errors");
    }
    done.load(Ordering::Relaxed) as f64 / elapsed
}

fn main() {
    let a = args();
    let plain = reference(a.clients);
    let (mut cerbas_total, mut plain_total) = (0.0, 0.0);
    for round in 1..=a.rounds {
        let c = measure(&a.url, a.clients, a.secs);
        let p = measure(&plain, a.clients, a.secs);
        println!("round {round}: cerbas {c:.0} rt/s, plain tiny_http {p:.0} rt/s");
        cerbas_total += c;
        plain_total += p;
    }
    println!(
        "{} clients, {} s x {} rounds: cerbas {:.0} rt/s, plain tiny_http {:.0} rt/s, ratio {:.2}",
        a.clients,
        a.secs,
        a.rounds,
        cerbas_total / a.rounds as f64,
        plain_total / a.rounds as f64,
        cerbas_total / plain_total
    );
}
