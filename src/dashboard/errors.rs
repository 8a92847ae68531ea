//! The dashboard's "recent errors": each error reply this instance sends (time,
//! request id, function, user, message) is kept in memory ([`Recent`], at most
//! [`MAX_ERRORS`], the oldest dropped), off the hot path: one short lock per
//! error, no Redis. The scheduler drains it once a second into the capped list
//! `P-ERRORS` (LPUSH + LTRIM in the snapshot's script, `snapshot.rs`), so the
//! page on any instance shows the last [`MAX_ERRORS`] across the cluster.
//! Messages are cut to [`MAX_MESSAGE`] characters: a reply's message can hold
//! what a client sent. Not for: counting errors (`functions.rs`, `metrics.rs`).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Most errors kept, in memory and in `P-ERRORS`.
pub(crate) const MAX_ERRORS: usize = 100;
/// Most characters of a message kept.
pub(crate) const MAX_MESSAGE: usize = 200;

/// One error reply, as written to `P-ERRORS` (JSON) and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub(crate) struct ErrorReply {
    /// When it was sent, ms since the epoch (this instance's clock).
    pub(crate) at_ms: i64,
    /// The request's id; `None` for an in-process caller (HTTP).
    pub(crate) id: Option<u64>,
    pub(crate) func: String,
    pub(crate) user: String,
    pub(crate) message: String,
    pub(crate) instance: String,
}

/// Error replies not yet written to Redis.
#[derive(Debug, Default)]
pub(crate) struct Recent(Mutex<VecDeque<ErrorReply>>);

impl Recent {
    /// Keeps one error reply (the instance name is added when written).
    pub(crate) fn add(&self, id: Option<u64>, func: &str, user: Option<&str>, message: &str) {
        let e = ErrorReply {
            at_ms: crate::job::unix_ms(),
            id,
            func: super::state::cut(func, MAX_MESSAGE),
            user: super::state::cut(user.unwrap_or(""), MAX_MESSAGE),
            message: super::state::cut(message, MAX_MESSAGE),
            instance: String::new(),
        };
        if let Ok(mut q) = self.0.lock() {
            if q.len() >= MAX_ERRORS {
                q.pop_front();
            }
            q.push_back(e);
        }
    }

    /// Puts back what [`Recent::take`] took and could not be written (before
    /// what came since; the oldest dropped past [`MAX_ERRORS`]).
    pub(crate) fn restore(&self, taken: Vec<ErrorReply>) {
        if let Ok(mut q) = self.0.lock() {
            for e in taken.into_iter().rev() {
                q.push_front(e);
            }
            while q.len() > MAX_ERRORS {
                q.pop_front();
            }
        }
    }

    /// Takes what is kept, oldest first.
    pub(crate) fn take(&self) -> Vec<ErrorReply> {
        self.0
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// Reads one entry of `P-ERRORS`; something else there is shown as a message.
pub(crate) fn parse(entry: &str) -> ErrorReply {
    serde_json::from_str(entry).unwrap_or_else(|_| ErrorReply {
        message: super::state::cut(entry, MAX_MESSAGE),
        ..ErrorReply::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_hundred_are_kept_and_messages_are_cut() {
        let r = Recent::default();
        for i in 0..(MAX_ERRORS as u64 + 5) {
            r.add(Some(i), "f", Some("tom"), &"x".repeat(500));
        }
        let all = r.take();
        assert_eq!(all.len(), MAX_ERRORS);
        assert_eq!(all[0].id, Some(5));
        assert_eq!(all[0].message.chars().count(), MAX_MESSAGE + 1);
        assert!(r.take().is_empty(), "taken once");
        // Not written: put back before what came since, still at most 100.
        r.add(Some(1000), "f", None, "newer");
        r.restore(all);
        let again = r.take();
        assert_eq!(again.len(), MAX_ERRORS);
        assert_eq!(again[0].id, Some(6));
        assert_eq!(again[MAX_ERRORS - 1].id, Some(1000));
    }

    #[test]
    fn entries_read_back_and_junk_is_shown_as_text() {
        let r = Recent::default();
        r.add(None, "<b>f</b>", None, "cancelled");
        let e = &r.take()[0];
        let back = parse(&serde_json::to_string(e).unwrap());
        assert_eq!(&back, e);
        assert_eq!(back.user, "");
        assert_eq!(parse("<not json>").message, "<not json>");
    }
}
