//! The registry: function name → typed handler and its options (timeout, who may
//! call it). Built by the embedding program before start, adjusted by the
//! configuration's `[functions.NAME]` tables, then frozen behind an `Arc`.
//! Not for: running a call (that is `dispatch.rs`, which owns access checks,
//! deadlines and panics).

use crate::config::FunctionConfig;
use crate::context::Context;
use crate::error::{FnError, RequestError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What a function answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Published as `{"status":"ok","data":value}`.
    Value(Value),
    /// Published as `{"status":"error","data":message}`.
    Error(String),
    /// Nothing is published (the original's `{:noreply}`).
    NoReply,
}

/// What a handler may return: `Result<T, FnError>` for any serializable `T`, or an
/// [`Answer`] when the function may answer "no reply".
pub trait IntoAnswer {
    /// Turns the handler's return value into an [`Answer`].
    fn into_answer(self) -> Answer;
}

impl<T: Serialize> IntoAnswer for Result<T, FnError> {
    fn into_answer(self) -> Answer {
        match self {
            Ok(v) => match serde_json::to_value(v) {
                Ok(v) => Answer::Value(v),
                Err(e) => Answer::Error(format!("cannot encode the reply: {e}")),
            },
            Err(e) => Answer::Error(e.0),
        }
    }
}

impl IntoAnswer for Answer {
    fn into_answer(self) -> Answer {
        self
    }
}

/// Arguments of a function that takes none: accepts any object, `{}` included.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct NoArgs {}

/// Per-function options; set them on what [`Registry::register`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Deadline of one call; `None` takes the server's `timeout_ms`.
    pub timeout: Option<Duration>,
    /// If set, only these users may call the function.
    pub users: Option<Vec<String>>,
    /// If set, an ok reply is kept in Redis this many seconds and served for the
    /// same arguments without calling the function again.
    pub cache_secs: Option<u64>,
}

impl Options {
    /// Caches ok replies for `secs` seconds (errors are never cached).
    pub fn cache_secs(&mut self, secs: u64) -> &mut Self {
        self.cache_secs = Some(secs);
        self
    }

    /// Sets the deadline of one call.
    pub fn timeout_ms(&mut self, ms: u64) -> &mut Self {
        self.timeout = Some(Duration::from_millis(ms));
        self
    }

    /// Restricts the function to these users.
    pub fn users<S: Into<String>>(&mut self, users: impl IntoIterator<Item = S>) -> &mut Self {
        self.users = Some(users.into_iter().map(Into::into).collect());
        self
    }
}

type Handler = dyn Fn(Map<String, Value>, &Context) -> Result<Answer, RequestError> + Send + Sync;

/// A registered function.
pub(crate) struct Function {
    pub(crate) handler: Box<Handler>,
    pub(crate) options: Options,
}

/// Function name → handler. Register functions, hand it to [`crate::run`].
///
/// ```
/// use cerbas::{Context, FnError, Registry};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Sum { a: f64, b: f64 }
///
/// let mut registry = Registry::new();
/// registry.register("sum", |Sum { a, b }: Sum, _: &Context| -> Result<f64, FnError> { Ok(a + b) });
/// registry.register("report", |_: cerbas::NoArgs, _: &Context| -> Result<&str, FnError> { Ok("done") })
///     .timeout_ms(30_000)
///     .users(["tom"]);
/// assert_eq!(registry.names(), ["report", "sum"]);
/// ```
#[derive(Default)]
pub struct Registry {
    functions: HashMap<String, Function>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `f` under `name` (replacing any function of that name). The
    /// request's `args` object is decoded into `A`; when that fails the caller gets
    /// `invalid arguments: …` and `f` is not called.
    pub fn register<A, R, F>(&mut self, name: &str, f: F) -> &mut Options
    where
        A: DeserializeOwned + 'static,
        R: IntoAnswer + 'static,
        F: Fn(A, &Context) -> R + Send + Sync + 'static,
    {
        let handler = move |args: Map<String, Value>, ctx: &Context| {
            let args: A = serde_json::from_value(Value::Object(args))
                .map_err(|e| RequestError::InvalidArguments(e.to_string()))?;
            Ok(f(args, ctx).into_answer())
        };
        let function = Function {
            handler: Box::new(handler),
            options: Options::default(),
        };
        let slot = match self.functions.entry(name.to_string()) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                o.insert(function);
                o.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(v) => v.insert(function),
        };
        &mut slot.options
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.functions.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The options of `name`, if registered.
    pub fn options(&self, name: &str) -> Option<&Options> {
        self.functions.get(name).map(|f| &f.options)
    }

    /// Applies the configuration's `[functions.NAME]` tables over what the code set.
    /// Returns the names the configuration mentions that are not registered.
    pub fn apply_config(&mut self, functions: &BTreeMap<String, FunctionConfig>) -> Vec<String> {
        let mut unknown = Vec::new();
        for (name, fc) in functions {
            let Some(f) = self.functions.get_mut(name) else {
                unknown.push(name.clone());
                continue;
            };
            if let Some(ms) = fc.timeout_ms {
                f.options.timeout_ms(ms);
            }
            if let Some(users) = &fc.users {
                f.options.users(users.iter().cloned());
            }
            if let Some(secs) = fc.cache_secs {
                f.options.cache_secs(secs);
            }
        }
        unknown
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Function> {
        self.functions.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Sum {
        a: i64,
        b: i64,
    }

    fn call(r: &Registry, name: &str, args: Value) -> Result<Answer, RequestError> {
        let Value::Object(args) = args else {
            panic!("args must be an object")
        };
        (r.get(name).expect("registered").handler)(args, &Context::detached())
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register("sum", |s: Sum, _: &Context| -> Result<i64, FnError> {
            Ok(s.a + s.b)
        });
        r.register("fails", |_: NoArgs, _: &Context| -> Result<(), FnError> {
            Err("nope".into())
        });
        r.register("quiet", |_: NoArgs, _: &Context| Answer::NoReply);
        r
    }

    #[test]
    fn typed_arguments_are_decoded() {
        let r = registry();
        assert_eq!(
            call(&r, "sum", json!({"a": 2, "b": 3})),
            Ok(Answer::Value(json!(5)))
        );
    }

    #[test]
    fn bad_arguments_become_invalid_arguments() {
        let r = registry();
        let e = call(&r, "sum", json!({"a": 2})).unwrap_err().to_string();
        assert!(e.starts_with("invalid arguments: missing field `b`"), "{e}");
        let e = call(&r, "sum", json!({"a": "x", "b": 1}))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid arguments: invalid type: string"),
            "{e}"
        );
    }

    #[test]
    fn errors_and_no_reply_pass_through() {
        let r = registry();
        assert_eq!(
            call(&r, "fails", json!({"extra": 1})),
            Ok(Answer::Error("nope".into()))
        );
        assert_eq!(call(&r, "quiet", json!({})), Ok(Answer::NoReply));
    }

    #[test]
    fn configuration_overrides_options_and_reports_unknown_names() {
        let mut r = registry();
        r.register("sum", |s: Sum, _: &Context| -> Result<i64, FnError> {
            Ok(s.a * s.b)
        })
        .timeout_ms(10);
        assert_eq!(r.names(), ["fails", "quiet", "sum"]);
        let mut cfg = BTreeMap::new();
        cfg.insert(
            "sum".to_string(),
            FunctionConfig {
                users: Some(vec!["foo".into()]),
                cache_secs: Some(9),
                ..FunctionConfig::default()
            },
        );
        cfg.insert("ghost".to_string(), FunctionConfig::default());
        assert_eq!(r.apply_config(&cfg), ["ghost"]);
        let o = r.options("sum").unwrap();
        assert_eq!(o.timeout, Some(Duration::from_millis(10)));
        assert_eq!(o.users, Some(vec!["foo".to_string()]));
        assert_eq!(o.cache_secs, Some(9));
        // The replacement registered last is the one called.
        assert_eq!(
            call(&r, "sum", json!({"a": 2, "b": 3})),
            Ok(Answer::Value(json!(6)))
        );
    }
}
