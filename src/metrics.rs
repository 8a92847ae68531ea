//! The server's Prometheus metrics: one registry of counters, gauges and
//! histograms (the maintained `prometheus-client` crate does the encoding, not us),
//! written by the threads that see each event and read by `/metrics` (src/http/).
//! Like `job.rs`, it is data below the threads: the dispatcher records calls and
//! cron runs, the publisher its republishes, the HTTP server its requests, the
//! proxy its requests and breakers; whoever scrapes
//! sets the gauges that are read from Redis at that moment. Each call is also
//! counted for the dashboard (`dashboard/functions.rs`). Not for: serving HTTP
//! (`http/`) or deciding anything.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

/// A metric's labels, as `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// Call durations: 1 ms to about 33 s, doubling.
fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// One function's `requests` counters (by outcome) and duration histogram, taken
/// from their families once: building the label sets on every call (two `Vec`s,
/// three `String`s, then hashing them) cost a worker about 2 µs a call.
#[derive(Default)]
struct OfFunction {
    by_outcome: Vec<(&'static str, Counter)>,
    duration: Option<Histogram>,
}

/// Every metric the server exports. Cloning a metric shares it, so the registry
/// and the fields below see the same values.
pub struct Metrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    /// Shares of `calls` and `durations`, by function name (registered names and
    /// `"-"` only: a bounded set).
    of_function: RwLock<HashMap<String, OfFunction>>,
    /// `P-QUEUE`'s length, set at each scrape.
    pub(crate) queue_length: Gauge,
    /// Requests this instance holds (taken, not yet acknowledged), set at each scrape.
    pub(crate) in_hand: Gauge,
    /// Delayed requests waiting in `P-DELAYED` (all instances), set at each scrape.
    pub(crate) delayed: Gauge,
    /// Replies held for late subscribers that were dropped (counted in `Stats`),
    /// and Redis connection losses, each followed by a reconnect (counted in
    /// `connection.rs`): brought up to date at each scrape ([`Metrics::totals`]).
    replies_dropped: Counter,
    reconnects: Counter,
    /// One scrape at a time brings those up to date.
    totals: std::sync::Mutex<()>,
    http_requests: Family<Labels, Counter>,
    proxy_requests: Family<Labels, Counter>,
    breaker_state: Family<Labels, Gauge>,
    cron_runs: Family<Labels, Counter>,
    /// Replies published again for late subscribers (each republish counts).
    pub(crate) republished: Counter,
    /// Per-function counts and durations for the dashboard (not exported here).
    pub(crate) functions: crate::dashboard::functions::Tally,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cerbas");
        let m = Metrics {
            registry: Registry::default(),
            calls: Family::default(),
            durations: Family::new_with_constructor(call_histogram),
            of_function: RwLock::default(),
            queue_length: Gauge::default(),
            in_hand: Gauge::default(),
            delayed: Gauge::default(),
            replies_dropped: Counter::default(),
            reconnects: Counter::default(),
            totals: std::sync::Mutex::new(()),
            http_requests: Family::default(),
            proxy_requests: Family::default(),
            breaker_state: Family::default(),
            cron_runs: Family::default(),
            republished: Counter::default(),
            functions: Default::default(),
        };
        registry.register(
            "requests",
            "Requests by function and outcome (ok, error, no_reply, timeout, panic, invalid_arguments, refused), whatever brought them (Redis, HTTP)",
            m.calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "How long calls took, by function (timeouts count their deadline)",
            m.durations.clone(),
        );
        registry.register(
            "queue_length",
            "Request ids waiting in the queue",
            m.queue_length.clone(),
        );
        registry.register(
            "requests_in_hand",
            "Requests this instance has taken and not yet acknowledged",
            m.in_hand.clone(),
        );
        registry.register(
            "delayed_waiting",
            "Delayed requests waiting in Redis (all instances)",
            m.delayed.clone(),
        );
        registry.register(
            "replies_dropped",
            "Replies held for late subscribers that were dropped (republish_max_bytes reached, or Redis restarted)",
            m.replies_dropped.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Redis connections lost and reopened since the start (all threads)",
            m.reconnects.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "proxy_requests",
            "Proxied requests by target and status (502/503/504 are ours)",
            m.proxy_requests.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker of each proxy target: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        registry.register(
            "cron_runs",
            "Cron runs by entry (its id, as `cerbas cron list` and the log show it) and outcome (ok, error, timeout)",
            m.cron_runs.clone(),
        );
        registry.register(
            "republishes",
            "Replies published again because nobody had received them yet (late subscribers)",
            m.republished.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one answered call of a registered `function` (`"-"` when the name is
    /// not registered: client-chosen names must not grow the label set), and its
    /// duration when it ran.
    pub(crate) fn call(&self, function: &str, outcome: &'static str, took: Option<Duration>) {
        self.functions.call(function, outcome, took);
        let seen = {
            let of = self.of_function.read().unwrap_or_else(|p| p.into_inner());
            of.get(function).and_then(|f| {
                let counter = f.by_outcome.iter().find(|(o, _)| *o == outcome)?;
                let duration = match took {
                    Some(took) => Some((f.duration.as_ref()?, took)),
                    None => None,
                };
                counter.1.inc();
                if let Some((h, took)) = duration {
                    h.observe(took.as_secs_f64());
                }
                Some(())
            })
        };
        if seen.is_some() {
            return;
        }
        // First call of this function with this outcome: take its metrics from
        // the families (which create them), and keep them.
        let mut of = self.of_function.write().unwrap_or_else(|p| p.into_inner());
        let f = of.entry(function.to_string()).or_default();
        let counter = match f.by_outcome.iter().find(|(o, _)| *o == outcome) {
            Some((_, c)) => c.clone(),
            None => {
                let c = self
                    .calls
                    .get_or_create(&vec![
                        ("function", function.to_string()),
                        ("outcome", outcome.to_string()),
                    ])
                    .clone();
                f.by_outcome.push((outcome, c.clone()));
                c
            }
        };
        counter.inc();
        if let Some(took) = took {
            let duration = f.duration.get_or_insert_with(|| {
                self.durations
                    .get_or_create(&vec![("function", function.to_string())])
                    .clone()
            });
            duration.observe(took.as_secs_f64());
        }
    }

    /// Counts a call of `function` answered from the result cache.
    pub(crate) fn cache_hit(&self, function: &str) {
        self.functions.cache_hit(function);
    }

    /// Brings the counters kept elsewhere (they only grow) up to their totals.
    pub(crate) fn totals(&self, replies_dropped: u64, reconnects: u64) {
        let _one = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for (counter, total) in [
            (&self.replies_dropped, replies_dropped),
            (&self.reconnects, reconnects),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Counts one run of cron entry `entry` (its id) with `outcome`.
    pub(crate) fn cron_run(&self, entry: &str, outcome: &'static str) {
        self.cron_runs
            .get_or_create(&vec![
                ("entry", entry.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Counts one HTTP request answered with `status` on `route` (a route name,
    /// never the raw path).
    pub(crate) fn http_request(&self, route: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Counts one proxied request to `target` answered with `status`.
    pub(crate) fn proxy_request(&self, target: &str, status: u16) {
        self.proxy_requests
            .get_or_create(&vec![
                ("target", target.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Sets the breaker state of `target` (0 closed, 1 open, 2 half-open).
    pub(crate) fn breaker(&self, target: &str, state: i64) {
        self.breaker_state
            .get_or_create(&vec![("target", target.to_string())])
            .set(state);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_function_and_outcome() {
        let m = Metrics::new();
        m.call("hello", "ok", Some(Duration::from_millis(3)));
        m.call("hello", "ok", None);
        m.http_request("api", 200);
        m.breaker("flask", 1);
        let text = m.encode();
        assert!(
            text.contains(r#"cerbas_requests_total{function="hello",outcome="ok"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"cerbas_call_duration_seconds_count{function="hello"} 1"#));
        assert!(text.contains(r#"cerbas_http_requests_total{route="api",status="200"} 1"#));
        assert!(text.contains(r#"cerbas_breaker_state{target="flask"} 1"#));
        assert!(text.ends_with("# EOF\n"));
    }

    /// The counters and histograms kept per function are the exported ones:
    /// each outcome its own, a histogram only once a call took time.
    #[test]
    fn kept_metrics_count_into_the_exported_ones() {
        let m = Metrics::new();
        m.call("-", "refused", None);
        m.call("-", "refused", None);
        assert!(!m
            .encode()
            .contains(r#"call_duration_seconds_count{function="-"}"#));
        for _ in 0..3 {
            m.call("sum", "ok", Some(Duration::from_millis(1)));
        }
        m.call("sum", "error", None);
        m.call("sum", "error", Some(Duration::from_millis(2)));
        m.call("-", "timeout", Some(Duration::from_secs(5)));
        let text = m.encode();
        for line in [
            r#"cerbas_requests_total{function="-",outcome="refused"} 2"#,
            r#"cerbas_requests_total{function="sum",outcome="ok"} 3"#,
            r#"cerbas_requests_total{function="sum",outcome="error"} 2"#,
            r#"cerbas_requests_total{function="-",outcome="timeout"} 1"#,
            r#"cerbas_call_duration_seconds_count{function="sum"} 4"#,
            r#"cerbas_call_duration_seconds_count{function="-"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn totals_kept_elsewhere_are_counters_that_follow_them() {
        let m = Metrics::new();
        m.totals(3, 1);
        m.totals(5, 1);
        // A smaller total (never expected) does not take a counter back.
        m.totals(4, 0);
        let text = m.encode();
        assert!(
            text.contains("# TYPE cerbas_replies_dropped counter"),
            "{text}"
        );
        assert!(text.contains("cerbas_replies_dropped_total 5\n"), "{text}");
        assert!(text.contains("cerbas_redis_reconnects_total 1\n"), "{text}");
    }
}
