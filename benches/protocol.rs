//! Benchmarks of the pure hot path of `src/protocol.rs`: what the reader, the
//! workers and the publisher do for every single request, with no Redis and no
//! threads involved: parsing a queue entry, parsing a request body (a typical
//! small one and a ~10 KiB one), naming its keys and channels, and encoding its
//! reply as JSON and msgpack.
//!
//! Why: a round trip costs tens of microseconds in Redis (BENCH.md's cost model),
//! so this CPU work must stay a small fraction of it. If a change to the protocol
//! code makes any of these take more than a few microseconds, it shows here long
//! before it shows in the noisy end-to-end workloads of `examples/loadgen.rs`.
//!
//! Run: `cargo bench --bench protocol` (or `-- --quick` for a short run). Criterion
//! is built without its default features, so it prints text only (no plots or
//! HTML reports); its data goes to `target/criterion/`.

use cerbas::protocol::{parse_queue_entry, parse_request, Keys, Reply, DEFAULT_PREFIX};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};
use std::hint::black_box;

/// The limit the server applies by default (1 MiB), so no body here is refused.
const MAX_BYTES: usize = 1 << 20;

/// What the project's own clients send for a small call.
const SMALL_BODY: &[u8] = br#"{"func":"sum","args":{"a":1,"b":2},"user":"tom","source":"web"}"#;

/// A data value of mixed records whose JSON form is at least `bytes` long.
fn records(bytes: usize) -> Value {
    let mut items = Vec::new();
    let mut len = 0;
    let mut i = 0u64;
    while len < bytes {
        let item = json!({
            "id": i,
            "name": format!("item-{i}"),
            "price": 1.25 * i as f64,
            "tags": ["alpha", "beta", "ü€"],
            "active": i.is_multiple_of(2),
            "parent": null,
        });
        len += item.to_string().len() + 1;
        items.push(item);
        i += 1;
    }
    json!({ "items": items })
}

/// A request body of about 10 KiB: an `echo` whose message is a list of records.
fn large_body() -> Vec<u8> {
    json!({
        "func": "echo",
        "args": { "message": records(10 * 1024) },
        "user": "tom",
        "source": "web",
    })
    .to_string()
    .into_bytes()
}

fn bench_parse_request(c: &mut Criterion) {
    let large = large_body();
    let mut g = c.benchmark_group("parse_request");
    for (name, body) in [("small", SMALL_BODY), ("10KiB", large.as_slice())] {
        // Sanity: the bodies are valid, so we measure the success path.
        parse_request(body, MAX_BYTES).expect("benchmark body must parse");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new(name, body.len()), body, |b, body| {
            b.iter(|| parse_request(black_box(body), MAX_BYTES))
        });
    }
    g.finish();
}

fn bench_parse_queue_entry(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_queue_entry");
    for entry in [&b"12345"[..], b"0000012345", b"not-an-id"] {
        let name = String::from_utf8_lossy(entry).into_owned();
        g.bench_with_input(BenchmarkId::from_parameter(name), entry, |b, entry| {
            b.iter(|| parse_queue_entry(black_box(entry)))
        });
    }
    g.finish();
}

fn bench_reply(c: &mut Criterion) {
    let replies = [
        ("hello", Reply::Ok(json!("hello world!"))),
        ("error", Reply::Error("unexpected error".into())),
        ("10KiB", Reply::Ok(records(10 * 1024))),
    ];
    let mut g = c.benchmark_group("reply");
    for (name, reply) in &replies {
        g.bench_with_input(BenchmarkId::new("to_json", name), reply, |b, r| {
            b.iter(|| black_box(r).to_json())
        });
        g.bench_with_input(BenchmarkId::new("to_msgpack", name), reply, |b, r| {
            b.iter(|| black_box(r).to_msgpack())
        });
    }
    g.finish();
}

fn bench_keys(c: &mut Criterion) {
    let keys = Keys::new(DEFAULT_PREFIX, 1);
    let mut g = c.benchmark_group("keys");
    g.bench_function("request", |b| b.iter(|| keys.request(black_box(1_234_567))));
    g.bench_function("reply_channel", |b| {
        b.iter(|| keys.reply_channel(black_box(1_234_567)))
    });
    g.bench_function("msgpack_channel", |b| {
        b.iter(|| keys.msgpack_channel(black_box(1_234_567)))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_parse_request,
    bench_parse_queue_entry,
    bench_reply,
    bench_keys
);
criterion_main!(benches);
