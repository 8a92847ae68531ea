//! Concurrency limits from the configuration (`[limits] per_user`,
//! `[functions.NAME] max_concurrent`): how many calls one user, or one function,
//! may have running at once, so one caller cannot take every worker. Checked on the
//! dispatch path once a request is about to run (after access checks and its
//! delay); a call over a limit is refused at once with a `busy: …` error rather
//! than made to wait, since a waiting call would itself hold a worker.
//! A call counts from the moment it is admitted until its function returns, past
//! its deadline too: a hung call still holds its thread.
//! Not for: access rules (`dispatch.rs`) or the width of the pool (`pool.rs`).

use crate::config::Config;
use crate::error::RequestError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// The limits and the calls running under them; shared by every worker.
#[derive(Debug, Default)]
pub(crate) struct Concurrency {
    per_user: Option<usize>,
    per_function: BTreeMap<String, usize>,
    running: Mutex<Running>,
}

#[derive(Debug, Default)]
struct Running {
    users: HashMap<String, usize>,
    functions: HashMap<String, usize>,
}

impl Concurrency {
    /// The limits the configuration sets (none: nothing is counted).
    pub(crate) fn from_config(config: &Config) -> Self {
        Concurrency {
            per_user: config.limits.per_user,
            per_function: config
                .functions
                .iter()
                .filter_map(|(name, f)| f.max_concurrent.map(|n| (name.clone(), n)))
                .collect(),
            running: Mutex::default(),
        }
    }

    /// Admits one call of `func` by `user`, or says which limit it would pass.
    /// The call counts until the returned [`Slot`] drops.
    pub(crate) fn enter(&self, func: &str, user: Option<&str>) -> Result<Slot<'_>, RequestError> {
        let user = user.filter(|_| self.per_user.is_some());
        let func_limit = self.per_function.get(func).copied();
        if user.is_none() && func_limit.is_none() {
            return Ok(Slot {
                owner: self,
                user: None,
                func: None,
            });
        }
        // A poisoned lock only means a worker panicked while counting; the counts
        // themselves are whole (each change is one statement).
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(user), Some(limit)) = (user, self.per_user) {
            if running.users.get(user).copied().unwrap_or(0) >= limit {
                return Err(RequestError::BusyUser {
                    user: user.to_string(),
                    limit,
                });
            }
        }
        if let Some(limit) = func_limit {
            if running.functions.get(func).copied().unwrap_or(0) >= limit {
                return Err(RequestError::BusyFunction {
                    func: func.to_string(),
                    limit,
                });
            }
        }
        if let Some(user) = user {
            *running.users.entry(user.to_string()).or_default() += 1;
        }
        if func_limit.is_some() {
            *running.functions.entry(func.to_string()).or_default() += 1;
        }
        Ok(Slot {
            owner: self,
            user: user.map(str::to_string),
            func: func_limit.map(|_| func.to_string()),
        })
    }

    fn leave(&self, user: Option<&str>, func: Option<&str>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Running { users, functions } = &mut *running;
        for (map, key) in [(users, user), (functions, func)] {
            if let Some(key) = key {
                if let Some(n) = map.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(key);
                    }
                }
            }
        }
    }
}

/// One admitted call; dropping it (when the function returns, or panics) frees
/// its place.
pub(crate) struct Slot<'a> {
    owner: &'a Concurrency,
    user: Option<String>,
    func: Option<String>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.user.is_some() || self.func.is_some() {
            self.owner.leave(self.user.as_deref(), self.func.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_user: Option<usize>, functions: &[(&str, usize)]) -> Concurrency {
        Concurrency {
            per_user,
            per_function: functions.iter().map(|(f, n)| (f.to_string(), *n)).collect(),
            running: Mutex::default(),
        }
    }

    #[test]
    fn a_user_over_its_limit_is_refused_until_a_call_returns() {
        let c = limits(Some(2), &[]);
        let a = c.enter("f", Some("tom")).unwrap();
        let _b = c.enter("g", Some("tom")).unwrap();
        assert_eq!(
            c.enter("f", Some("tom")).err().map(|e| e.to_string()),
            Some("busy: user tom is at its limit of 2 running calls (limits.per_user); try again later".into())
        );
        // Others are not held back by tom.
        let _other = c.enter("f", Some("foo")).unwrap();
        drop(a);
        let _c = c.enter("f", Some("tom")).unwrap();
    }

    #[test]
    fn a_function_over_its_limit_is_refused_for_everyone() {
        let c = limits(None, &[("sleep", 1)]);
        let first = c.enter("sleep", Some("tom")).unwrap();
        assert_eq!(
            c.enter("sleep", Some("foo")).err().map(|e| e.to_string()),
            Some("busy: function sleep is at its limit of 1 running calls (functions.sleep.max_concurrent); try again later".into())
        );
        let _unlimited: Vec<_> = (0..100)
            .map(|_| c.enter("hello", Some("foo")).unwrap())
            .collect();
        drop(first);
        let _again = c.enter("sleep", Some("foo")).unwrap();
    }

    #[test]
    fn a_refused_call_takes_no_place() {
        let c = limits(Some(1), &[("f", 5)]);
        let _held = c.enter("g", Some("tom")).unwrap();
        assert!(c.enter("f", Some("tom")).is_err());
        // tom's refused call of f did not count against f.
        let _f: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|u| c.enter("f", Some(u)).unwrap())
            .collect();
        assert!(c.enter("f", Some("z")).is_err());
        drop(_f);
        assert!(c.running.lock().unwrap().functions.is_empty());
    }
}
