//! A circuit breaker for one proxy target, as a pure state machine: every method
//! takes the time (`now`) from its caller, so the tests drive it with a made-up
//! clock. `failures` failures within `window` open it; while open, requests are
//! refused at once (the proxy answers 503 with `Retry-After`); after `open_for`
//! one trial request is let through (half-open) and decides: success closes it,
//! failure opens it again. Not for: what counts as a failure (`proxy.rs` decides:
//! connect errors, timeouts, 5xx) or any I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the breaker says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: go ahead.
    Go,
    /// Half-open: this request is the trial; report its result.
    Trial,
    /// Open (or a trial is running): refuse now, try again after this long.
    Refuse(Duration),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Times of the recent failures, oldest first, all within the window.
    Closed(VecDeque<Instant>),
    Open {
        until: Instant,
    },
    /// The trial started at this time; if its result never comes (the request
    /// was lost), another trial is let through `open_for` later.
    HalfOpen {
        since: Instant,
    },
}

/// One target's breaker.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    failures: usize,
    window: Duration,
    open_for: Duration,
    state: State,
    counts: Counts,
}

/// What a breaker has seen since the start (the dashboard shows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Requests let through whose result was reported.
    pub(crate) requests: u64,
    /// Of those, the failures.
    pub(crate) failures: u64,
    /// Requests refused at once (open, or a trial running).
    pub(crate) refused: u64,
}

impl Breaker {
    /// A closed breaker that opens after `failures` failures within `window`,
    /// for `open_for`.
    pub(crate) fn new(failures: u32, window: Duration, open_for: Duration) -> Self {
        Breaker {
            failures: failures.max(1) as usize,
            window,
            open_for,
            state: State::Closed(VecDeque::new()),
            counts: Counts::default(),
        }
    }

    /// What it has seen since the start.
    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// `closed`, `open` or `half-open`.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.code() {
            0 => "closed",
            1 => "open",
            _ => "half-open",
        }
    }

    /// Whether a request may go to the target now.
    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        let admit = self.decide(now);
        if let Admit::Refuse(_) = admit {
            self.counts.refused += 1;
        }
        admit
    }

    fn decide(&mut self, now: Instant) -> Admit {
        match &self.state {
            State::Closed(_) => Admit::Go,
            State::Open { until } if now < *until => Admit::Refuse(round_up(*until - now)),
            State::HalfOpen { since } if now.duration_since(*since) < self.open_for => {
                Admit::Refuse(Duration::from_secs(1))
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                self.state = State::HalfOpen { since: now };
                Admit::Trial
            }
        }
    }

    /// Reports how a request that was let through ended.
    pub(crate) fn record(&mut self, now: Instant, ok: bool) {
        self.counts.requests += 1;
        self.counts.failures += u64::from(!ok);
        match &mut self.state {
            State::Closed(recent) => {
                if ok {
                    return;
                }
                while recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    recent.pop_front();
                }
                recent.push_back(now);
                if recent.len() >= self.failures {
                    self.state = State::Open {
                        until: now + self.open_for,
                    };
                }
            }
            State::HalfOpen { .. } => {
                self.state = if ok {
                    State::Closed(VecDeque::new())
                } else {
                    State::Open {
                        until: now + self.open_for,
                    }
                };
            }
            // A request let through before the breaker opened, ending late: the
            // breaker is already open, the trial will decide.
            State::Open { .. } => {}
        }
    }

    /// For the metrics: 0 closed, 1 open, 2 half-open.
    pub(crate) fn code(&self) -> i64 {
        match self.state {
            State::Closed(_) => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }
}

/// `Retry-After` is in whole seconds: never say 0 while still open.
fn round_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn breaker() -> (Breaker, Instant) {
        (Breaker::new(2, 3000 * MS, 10_000 * MS), Instant::now())
    }

    #[test]
    fn two_failures_within_the_window_open_it() {
        let (mut b, t0) = breaker();
        assert_eq!(b.admit(t0), Admit::Go);
        b.record(t0, false);
        assert_eq!(b.code(), 0, "one failure is not enough");
        b.record(t0 + 2999 * MS, false);
        assert_eq!(b.code(), 1);
        assert_eq!(
            b.admit(t0 + 3000 * MS),
            Admit::Refuse(Duration::from_secs(10))
        );
        assert_eq!(
            b.admit(t0 + 12_000 * MS),
            Admit::Refuse(Duration::from_secs(1)),
            "rounded up, never 0 while open"
        );
    }

    #[test]
    fn failures_further_apart_than_the_window_do_not() {
        let (mut b, t0) = breaker();
        b.record(t0, false);
        b.record(t0 + 3000 * MS, false);
        assert_eq!(b.code(), 0);
        b.record(t0 + 3001 * MS, false);
        assert_eq!(b.code(), 1, "the second and third are within 3 s");
    }

    #[test]
    fn successes_do_not_open_it() {
        let (mut b, t0) = breaker();
        for i in 0..10 {
            b.record(t0 + i * MS, true);
        }
        assert_eq!(b.admit(t0), Admit::Go);
    }

    #[test]
    fn after_open_for_one_trial_decides() {
        let (mut b, t0) = breaker();
        b.record(t0, false);
        b.record(t0, false);
        let later = t0 + 10_000 * MS;
        assert_eq!(b.admit(later), Admit::Trial);
        assert_eq!(b.code(), 2);
        assert!(
            matches!(b.admit(later), Admit::Refuse(_)),
            "one trial at a time"
        );
        b.record(later + MS, true);
        assert_eq!(b.code(), 0);
        assert_eq!(b.admit(later + MS), Admit::Go);
    }

    #[test]
    fn a_failed_trial_opens_it_again_for_the_full_time() {
        let (mut b, t0) = breaker();
        b.record(t0, false);
        b.record(t0, false);
        let trial = t0 + 10_000 * MS;
        assert_eq!(b.admit(trial), Admit::Trial);
        b.record(trial, false);
        assert_eq!(b.code(), 1);
        assert_eq!(
            b.admit(trial + 9_999 * MS),
            Admit::Refuse(Duration::from_secs(1))
        );
        assert_eq!(b.admit(trial + 10_000 * MS), Admit::Trial);
    }

    #[test]
    fn a_lost_trial_is_replaced_after_open_for() {
        let (mut b, t0) = breaker();
        b.record(t0, false);
        b.record(t0, false);
        assert_eq!(b.admit(t0 + 10_000 * MS), Admit::Trial);
        assert!(matches!(b.admit(t0 + 19_999 * MS), Admit::Refuse(_)));
        assert_eq!(b.admit(t0 + 20_000 * MS), Admit::Trial);
    }

    #[test]
    fn requests_failures_and_refusals_are_counted() {
        let (mut b, t0) = breaker();
        assert_eq!(b.state_name(), "closed");
        b.record(t0, true);
        b.record(t0, false);
        b.record(t0, false);
        assert_eq!(b.state_name(), "open");
        assert!(matches!(b.admit(t0), Admit::Refuse(_)));
        assert_eq!(
            b.counts(),
            Counts {
                requests: 3,
                failures: 2,
                refused: 1
            }
        );
        assert_eq!(b.admit(t0 + 10_000 * MS), Admit::Trial);
        assert_eq!(b.state_name(), "half-open");
    }

    #[test]
    fn a_late_result_while_open_changes_nothing() {
        let (mut b, t0) = breaker();
        b.record(t0, false);
        b.record(t0, false);
        b.record(t0 + MS, true);
        assert_eq!(b.code(), 1);
    }
}
