//! `/health` and `/metrics`. `/health` asks Redis (PING, the queue's length) with
//! a short timeout: 200 with a small JSON body when it answers (its `status` is
//! `paused` while the dashboard has paused this instance), 503 when it does
//! not. `/metrics` sets the gauges read from Redis at this moment (queue, delayed
//! requests; left as they were when Redis does not answer) and from this process
//! (requests in hand), then encodes every metric (`metrics.rs`). Runs on the HTTP
//! handler threads. Not for: counting anything (the threads that see events do).

use super::{respond, Plug, Reply};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long `/health` and `/metrics` wait for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// What Redis says about the queue: its length and the delayed requests.
fn ask_redis(plug: &Plug) -> redis::RedisResult<(u64, u64)> {
    let mut c = plug.redis.get_connection_with_timeout(REDIS_TIMEOUT)?;
    c.set_read_timeout(Some(REDIS_TIMEOUT))?;
    c.set_write_timeout(Some(REDIS_TIMEOUT))?;
    redis::pipe()
        .cmd("LLEN")
        .arg(plug.keys.queue())
        .cmd("ZCARD")
        .arg(plug.keys.delayed())
        .query(&mut c)
}

pub(super) fn health(plug: &Plug, started: Instant) -> Reply {
    let asked = ask_redis(plug);
    let (status, body) = match &asked {
        Ok((queue, _)) => (
            200,
            serde_json::json!({
                "status": if plug.paused.is_set() { "paused" } else { "ok" },
                "paused": plug.paused.is_set(),
                "redis": true,
                "queue_length": queue,
                "instance": plug.instance,
                "uptime_secs": started.elapsed().as_secs(),
            }),
        ),
        Err(e) => (
            503,
            serde_json::json!({
                "status": "error",
                "redis": false,
                "error": e.to_string(),
                "instance": plug.instance,
                "uptime_secs": started.elapsed().as_secs(),
            }),
        ),
    };
    respond(status, "application/json", body.to_string().into_bytes())
}

pub(super) fn metrics(plug: &Plug) -> Reply {
    let m = &plug.stats.metrics;
    if let Ok((queue, delayed)) = ask_redis(plug) {
        m.queue_length.set(queue as i64);
        m.delayed.set(delayed as i64);
    }
    let held: usize = plug.in_hand.snapshot().values().sum();
    m.in_hand.set(held as i64);
    m.totals(
        plug.stats.replies_dropped.load(Ordering::Relaxed),
        crate::connection::losses(),
    );
    respond(
        200,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        m.encode().into_bytes(),
    )
}
