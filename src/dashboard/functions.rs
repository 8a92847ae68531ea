//! Per-function counts and call durations since the start, for the dashboard:
//! counted at the one place every answered call is counted (`Metrics::call`),
//! carried in each instance's snapshot, merged across instances and turned into
//! p50/p95/p99 here. Durations go into the same doubling buckets as the
//! Prometheus histogram (1 ms to about 33 s, and one over), so a quantile is the
//! upper bound of its bucket: coarse, but mergeable and bounded. Function names
//! are registered names or `-` (the metrics' rule), so the map is bounded by the
//! registry. Not for: the Prometheus metrics themselves (`metrics.rs`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Duration buckets: `< 1 ms · 2^i` for i in 0..16, then one for longer.
pub(crate) const BUCKETS: usize = 17;
/// Most functions a snapshot carries (the busiest).
pub(crate) const MAX_FUNCTIONS: usize = 50;

/// One function's counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) panics: u64,
    /// Refused before running (access, limits, invalid arguments).
    pub(crate) refused: u64,
    /// Answered from the result cache (counted in `calls` and `ok` too).
    pub(crate) cache_hits: u64,
    /// Calls that ran, by duration bucket.
    pub(crate) buckets: Vec<u64>,
}

/// The tally every thread counts into.
#[derive(Debug, Default)]
pub(crate) struct Tally(Mutex<BTreeMap<String, Counts>>);

impl Tally {
    /// Counts a call of `function` answered from the result cache (its call and
    /// outcome are counted by [`Tally::call`] as usual).
    pub(crate) fn cache_hit(&self, function: &str) {
        let Ok(mut map) = self.0.lock() else {
            return;
        };
        if let Some(c) = map.get_mut(function) {
            c.cache_hits += 1;
        } else {
            map.insert(
                function.to_string(),
                Counts {
                    cache_hits: 1,
                    ..Counts::default()
                },
            );
        }
    }

    /// Counts one answered call of `function` with a metrics `outcome` label.
    pub(crate) fn call(&self, function: &str, outcome: &str, took: Option<Duration>) {
        let Ok(mut map) = self.0.lock() else {
            return;
        };
        // No allocation on the hot path once the function has been seen.
        if !map.contains_key(function) {
            map.insert(function.to_string(), Counts::default());
        }
        let Some(c) = map.get_mut(function) else {
            return;
        };
        c.calls += 1;
        match outcome {
            "ok" | "no_reply" => c.ok += 1,
            "error" => c.errors += 1,
            "timeout" => c.timeouts += 1,
            "panic" => c.panics += 1,
            _ => c.refused += 1,
        }
        if let Some(took) = took {
            if c.buckets.len() != BUCKETS {
                c.buckets = vec![0; BUCKETS];
            }
            c.buckets[bucket(took)] += 1;
        }
    }

    /// The busiest [`MAX_FUNCTIONS`] functions' counts.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, Counts> {
        let Ok(map) = self.0.lock() else {
            return BTreeMap::new();
        };
        let mut all: Vec<(&String, &Counts)> = map.iter().collect();
        all.sort_by_key(|(_, c)| std::cmp::Reverse(c.calls));
        all.into_iter()
            .take(MAX_FUNCTIONS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The bucket of a duration.
fn bucket(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1000.0;
    (0..BUCKETS - 1)
        .find(|&i| ms < (1u64 << i) as f64)
        .unwrap_or(BUCKETS - 1)
}

/// Adds `b` into `a`.
pub(crate) fn merge(a: &mut Counts, b: &Counts) {
    a.calls += b.calls;
    a.ok += b.ok;
    a.errors += b.errors;
    a.timeouts += b.timeouts;
    a.panics += b.panics;
    a.refused += b.refused;
    a.cache_hits += b.cache_hits;
    if a.buckets.len() < b.buckets.len() {
        a.buckets.resize(b.buckets.len(), 0);
    }
    for (x, y) in a.buckets.iter_mut().zip(&b.buckets) {
        *x += y;
    }
}

/// `now` less `then`: what was counted between the two (a counter that went
/// down, which cannot happen within one process, counts 0).
pub(crate) fn since(now: &Counts, then: &Counts) -> Counts {
    let mut buckets = now.buckets.clone();
    for (x, y) in buckets.iter_mut().zip(&then.buckets) {
        *x = x.saturating_sub(*y);
    }
    Counts {
        calls: now.calls.saturating_sub(then.calls),
        ok: now.ok.saturating_sub(then.ok),
        errors: now.errors.saturating_sub(then.errors),
        timeouts: now.timeouts.saturating_sub(then.timeouts),
        panics: now.panics.saturating_sub(then.panics),
        refused: now.refused.saturating_sub(then.refused),
        cache_hits: now.cache_hits.saturating_sub(then.cache_hits),
        buckets,
    }
}

/// How far back "recent" looks.
pub(crate) const RECENT: Duration = Duration::from_secs(300);
/// How often a point of the history is kept: "recent" is within this of
/// [`RECENT`].
const STEP: Duration = Duration::from_secs(10);

/// Past tallies, one per [`STEP`], to tell what was counted over the last
/// [`RECENT`] (kept by the scheduler thread, which writes the snapshots).
#[derive(Debug, Default)]
pub(crate) struct History(
    Mutex<std::collections::VecDeque<(std::time::Instant, BTreeMap<String, Counts>)>>,
);

impl History {
    /// Keeps `now_counts` if a step has passed, and returns what was counted
    /// since the newest point at least [`RECENT`] old (the oldest kept, early on:
    /// since about the start).
    pub(crate) fn recent(
        &self,
        now: std::time::Instant,
        now_counts: &BTreeMap<String, Counts>,
    ) -> BTreeMap<String, Counts> {
        let Ok(mut h) = self.0.lock() else {
            return BTreeMap::new();
        };
        while h
            .get(1)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RECENT)
        {
            h.pop_front();
        }
        let empty = BTreeMap::new();
        let base = h.front().map_or(&empty, |(_, c)| c);
        let recent = now_counts
            .iter()
            .map(|(name, c)| {
                let then = base.get(name).cloned().unwrap_or_default();
                (name.clone(), since(c, &then))
            })
            .filter(|(_, c)| c.calls > 0)
            .collect();
        if h.back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= STEP)
        {
            h.push_back((now, now_counts.clone()));
        }
        recent
    }
}

/// The `q` quantile (0 to 1) of the durations, in ms: the upper bound of its
/// bucket; `None` without durations or past the last bound.
pub(crate) fn quantile(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().take(BUCKETS).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().take(BUCKETS).enumerate() {
        seen += n;
        if seen >= rank {
            return (i < BUCKETS - 1).then_some(1u64 << i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_outcome_and_duration() {
        let t = Tally::default();
        for _ in 0..98 {
            t.call("hello", "ok", Some(Duration::from_micros(300)));
        }
        t.call("hello", "error", Some(Duration::from_millis(3)));
        t.call("hello", "timeout", Some(Duration::from_secs(5)));
        t.call("-", "refused", None);
        let s = t.snapshot();
        let h = &s["hello"];
        assert_eq!((h.calls, h.ok, h.errors, h.timeouts), (100, 98, 1, 1));
        assert_eq!(quantile(&h.buckets, 0.5), Some(1));
        assert_eq!(quantile(&h.buckets, 0.99), Some(4));
        assert_eq!(quantile(&h.buckets, 1.0), Some(8192));
        assert_eq!(s["-"].refused, 1);
        assert_eq!(quantile(&s["-"].buckets, 0.5), None);
    }

    #[test]
    fn cache_hits_are_counted_per_function_and_merge_and_subtract() {
        let t = Tally::default();
        t.cache_hit("fib");
        t.call("fib", "ok", Some(Duration::from_micros(100)));
        t.cache_hit("fib");
        t.call("fib", "ok", Some(Duration::from_micros(100)));
        let then = t.snapshot();
        assert_eq!((then["fib"].calls, then["fib"].cache_hits), (2, 2));
        t.cache_hit("fib");
        let now = t.snapshot();
        assert_eq!(since(&now["fib"], &then["fib"]).cache_hits, 1);
        let mut sum = now["fib"].clone();
        merge(&mut sum, &then["fib"]);
        assert_eq!(sum.cache_hits, 5);
    }

    #[test]
    fn buckets_double_and_the_last_is_open() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_micros(999)), 0);
        assert_eq!(bucket(Duration::from_millis(1)), 1);
        assert_eq!(bucket(Duration::from_millis(40_000)), BUCKETS - 1);
        let mut b = vec![0; BUCKETS];
        b[BUCKETS - 1] = 1;
        assert_eq!(quantile(&b, 0.5), None);
    }

    #[test]
    fn merging_adds_everything() {
        let mut a = Counts {
            calls: 1,
            ok: 1,
            buckets: vec![1, 0],
            ..Counts::default()
        };
        let b = Counts {
            calls: 2,
            errors: 2,
            buckets: vec![0, 1, 1],
            ..Counts::default()
        };
        merge(&mut a, &b);
        assert_eq!((a.calls, a.ok, a.errors), (3, 1, 2));
        assert_eq!(a.buckets, vec![1, 1, 1]);
    }

    #[test]
    fn recent_is_what_was_counted_over_the_last_five_minutes() {
        let h = History::default();
        let t0 = std::time::Instant::now();
        let counts = |calls: u64| -> BTreeMap<String, Counts> {
            let mut buckets = vec![0; BUCKETS];
            buckets[3] = calls;
            [(
                "f".to_string(),
                Counts {
                    calls,
                    ok: calls,
                    buckets,
                    ..Counts::default()
                },
            )]
            .into()
        };
        // At the start, with nothing kept yet: since the start.
        assert_eq!(h.recent(t0, &counts(5))["f"].calls, 5);
        // 10 calls a minute for 10 minutes.
        let mut r = BTreeMap::new();
        for s in (10..=600).step_by(10) {
            r = h.recent(t0 + Duration::from_secs(s), &counts(5 + s / 6));
        }
        assert_eq!(r["f"].calls, 50, "five minutes of 10 a minute");
        assert_eq!(r["f"].buckets[3], 50);
        assert_eq!(quantile(&r["f"].buckets, 0.5), Some(8));
        // Nothing for the next five minutes: nothing recent.
        let r = h.recent(t0 + Duration::from_secs(910), &counts(105));
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn only_the_busiest_are_kept() {
        let t = Tally::default();
        for i in 0..(MAX_FUNCTIONS + 10) {
            for _ in 0..i {
                t.call(&format!("f{i}"), "ok", None);
            }
        }
        let s = t.snapshot();
        assert_eq!(s.len(), MAX_FUNCTIONS);
        assert!(!s.contains_key("f0") && s.contains_key(&format!("f{}", MAX_FUNCTIONS + 9)));
    }
}
