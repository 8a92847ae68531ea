//! The fuzz target kept in the project (issue 8): property tests that feed
//! generated input to the pure parsers a hostile or careless client or operator
//! reaches, and assert no panic and one answer out, plus the properties the fuzzing
//! campaign found broken: request bodies and queue entries (the request parser,
//! the delayed body kept verbatim, the reply encodings), and configurations (the
//! TOML loader, validation, the db a URL names as redis-rs reads it, redaction).
//! Case counts are bounded so the whole file runs in seconds inside `cargo test`;
//! raise `PROPTEST_CASES` to fuzz longer. Not for: anything that needs Redis
//! (`edges.rs` and the other integration tests).

use cerbas::protocol::{describe_entry, parse_queue_entry, parse_request, MAX_DEPTH};
use cerbas::{Config, Reply, RequestError};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn cases(n: u32) -> ProptestConfig {
    // Failures are reported with their shrunk input; no regression files are
    // written into the source tree.
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(n),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, nested a few levels, with the awkward leaves the campaign used:
/// big and tiny numbers, NULs, non-ASCII text.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        Just(json!("\u{0}\u{ffff}😀")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON number as a client may write it.
fn raw_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("9e15".to_string()),
        Just("1E2".to_string()),
        Just("1e-7".to_string()),
        Just("0.10".to_string()),
        Just("-0".to_string()),
        Just("-0.0".to_string()),
        Just("123456789012345678901234567890".to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// A value for one of the request's own fields: mostly the right type, often not.
fn field(right: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        5 => right.prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
}

/// A request body as text: an object with `func`, `args`, `user`, `source` and
/// `delay` of any type (or absent), extra members, sometimes a repeated key, and
/// sometimes cut short or with a byte flipped.
fn request_body() -> impl Strategy<Value = Vec<u8>> {
    let members = (
        field("[a-z]{1,8}".prop_map(Value::String).boxed()),
        prop_oneof![
            field(
                prop::collection::btree_map("[a-z]{1,4}", json_value(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect()))
                    .boxed(),
            )
            .prop_map(|v| v.map(|v| v.to_string())),
            // Arguments as the client typed them: numbers in forms a parser does
            // not write back the same way (`9e15` is written `9000000000000000.0`).
            prop::collection::vec(("[a-z]{1,3}", raw_number()), 0..8).prop_map(|members| {
                let inner: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", json!(k)))
                    .collect();
                Some(format!("{{{}}}", inner.join(",")))
            }),
        ],
        field(prop_oneof![Just(json!("tom")), Just(json!("foo"))].boxed()),
        field(Just(json!("web")).boxed()),
        field(
            prop_oneof![
                (0u64..100_000).prop_map(|n| json!(n)),
                Just(json!(9e15)),
                Just(json!(-1)),
                Just(json!(1.5)),
                Just(json!(u64::MAX)),
            ]
            .boxed(),
        ),
        prop::collection::vec((".{0,6}", json_value()), 0..3),
    );
    let text = members.prop_map(|(func, args, user, source, delay, extra)| {
        let mut parts = Vec::new();
        if let Some(args) = args {
            parts.push(format!("\"args\":{args}"));
        }
        for (k, v) in [
            ("func", func),
            ("user", user),
            ("source", source),
            ("delay", delay),
        ] {
            if let Some(v) = v {
                parts.push(format!("{}:{v}", json!(k)));
            }
        }
        for (k, v) in extra {
            parts.push(format!("{}:{v}", json!(k)));
        }
        format!("{{{}}}", parts.join(" , "))
    });
    (text, 0..4u8, any::<prop::sample::Index>(), any::<u8>()).prop_map(
        |(text, damage, at, byte)| {
            let mut bytes = text.into_bytes();
            let i = at.index(bytes.len().max(1)).min(bytes.len());
            match damage {
                1 => bytes.truncate(i),
                2 if i < bytes.len() => bytes[i] = byte,
                _ => {}
            }
            bytes
        },
    )
}

/// What must hold for any body: one answer, no panic, and for an accepted delayed
/// request a stored body that is never larger and parses to the same request.
fn check_body(body: &[u8], limit: usize) {
    match parse_request(body, limit) {
        Err(e) => {
            if body.len() > limit {
                assert!(matches!(e, RequestError::TooLarge { .. }), "{e:?}");
            }
            assert!(!e.to_string().is_empty());
            let reply = Reply::from(e);
            assert_eq!(Reply::from_json(&reply.to_json()).as_ref(), Ok(&reply));
            assert_eq!(
                Reply::from_msgpack(&reply.to_msgpack()).as_ref(),
                Ok(&reply)
            );
        }
        Ok(r) => {
            assert!(body.len() <= limit);
            let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
                // serde_json's own limit is one level short of ours: a body that
                // deep is ours to accept, and must nest exactly that far.
                return;
            };
            assert_eq!(
                obj.get("func").and_then(Value::as_str),
                Some(r.func.as_str())
            );
            if let Some(ms) = r.delay_ms.filter(|ms| *ms > 0) {
                assert_eq!(obj.get("delay").and_then(Value::as_u64), Some(ms));
                let stored = r.to_json_without_delay();
                assert!(stored.len() <= body.len(), "{stored} grew from {body:?}");
                // Every member but the delay keeps the client's bytes.
                let members = |t: &[u8]| {
                    serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(t).map(|m| {
                        m.into_iter()
                            .map(|(k, v)| (k, v.get().to_string()))
                            .collect::<BTreeMap<_, _>>()
                    })
                };
                if let Ok(mut sent) = members(body) {
                    sent.remove("delay");
                    assert_eq!(members(stored.as_bytes()).ok(), Some(sent), "{stored}");
                }
                let again = parse_request(stored.as_bytes(), limit).expect("stored body parses");
                assert_eq!(again.delay_ms, None);
                assert_eq!((&again.func, &again.args), (&r.func, &r.args));
                assert_eq!((&again.user, &again.source), (&r.user, &r.source));
            }
            let reply = Reply::Ok(Value::Object(r.args));
            assert_eq!(Reply::from_json(&reply.to_json()).as_ref(), Ok(&reply));
            assert_eq!(
                Reply::from_msgpack(&reply.to_msgpack()).as_ref(),
                Ok(&reply)
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn generated_request_bodies_get_one_answer(body in request_body(), limit in 64usize..4096) {
        check_body(&body, limit);
    }

    #[test]
    fn random_bytes_get_one_answer(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_body(&body, 1 << 20);
    }

    #[test]
    fn nesting_is_accepted_to_the_limit_and_refused_past_it(
        depth in 1usize..200,
        open in prop_oneof![Just('['), Just('{')],
    ) {
        // `args` holds `depth - 2` levels of arrays, or of objects keyed "k".
        let inner = depth.saturating_sub(2);
        let (o, c) = if open == '[' { ("[", "]") } else { ("{\"k\":", "}") };
        let args_value = format!("{}1{}", o.repeat(inner), c.repeat(inner));
        let body = if inner == 0 {
            r#"{"func":"f"}"#.to_string()
        } else if open == '[' {
            format!(r#"{{"func":"f","args":{{"a":{args_value}}}}}"#)
        } else {
            format!(r#"{{"func":"f","args":{args_value}}}"#)
        };
        let levels = match (inner, open) {
            (0, _) => 1,
            (_, '[') => inner + 2,
            _ => inner + 1,
        };
        let got = parse_request(body.as_bytes(), 1 << 20);
        if levels <= MAX_DEPTH {
            prop_assert!(got.is_ok(), "{levels} levels: {got:?}");
        } else {
            prop_assert_eq!(got.unwrap_err(), RequestError::TooDeep(MAX_DEPTH));
        }
    }

    #[test]
    fn queue_entries_are_ids_exactly_when_incr_could_have_written_them(
        entry in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..24),
            "[0-9]{0,22}".prop_map(String::into_bytes),
            any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        ]
    ) {
        match parse_queue_entry(&entry) {
            Some(id) => prop_assert_eq!(id.to_string(), String::from_utf8_lossy(&entry)),
            None => prop_assert!(
                std::str::from_utf8(&entry).ok().and_then(|s| s.parse::<u64>().ok())
                    .is_none_or(|id| id.to_string().as_bytes() != entry.as_slice())
            ),
        }
        let shown = describe_entry(&entry);
        prop_assert!(shown.len() < 64 * 4 + 64, "{shown}");
    }

    #[test]
    fn a_huge_entry_is_described_in_a_line(len in 65usize..100_000, byte in any::<u8>()) {
        let shown = describe_entry(&vec![byte; len]);
        prop_assert!(shown.len() < 64 * 10 + 40);
        let tail = format!("({len} bytes)");
        prop_assert!(shown.ends_with(&tail));
    }
}

/// A TOML value of a random type, extremes included.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..20_000).prop_map(|n| n.to_string()),
        Just("0".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-1".to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        ".{0,10}".prop_map(|s| format!("{:?}", s)),
        Just("[\"tom\", \"foo\"]".to_string()),
        Just("[1, 2]".to_string()),
        Just("{}".to_string()),
    ]
}

/// Redis URLs in every form the campaign tried: TCP and unix, passwords in the
/// userinfo or the query, dbs in the path or the query (once, twice, encoded).
fn redis_url() -> impl Strategy<Value = String> {
    let secret = "Zq[a-z0-9]{6}";
    let tcp = (
        prop_oneof![Just("redis"), Just("rediss"), Just("valkey")],
        prop_oneof![
            Just(String::new()),
            secret.prop_map(|p| format!(":{p}@")),
            secret.prop_map(|p| format!("user:{p}@")),
        ],
        prop_oneof![
            Just(String::new()),
            Just("/".to_string()),
            (0i64..20).prop_map(|d| format!("/{d}")),
            Just("/x".to_string()),
            Just("/-1".to_string()),
        ],
        prop_oneof![
            Just(String::new()),
            Just("?protocol=resp2".to_string()),
            Just("?db=3".to_string()),
        ],
    )
        .prop_map(|(scheme, auth, path, query)| {
            format!("{scheme}://{auth}127.0.0.1:6379{path}{query}")
        });
    let unix = (
        prop_oneof![Just("unix"), Just("redis+unix")],
        prop::collection::vec(
            prop_oneof![
                (0i64..20).prop_map(|d| format!("db={d}")),
                (0i64..20).prop_map(|d| format!("%64b={d}")),
                Just("db=".to_string()),
                secret.prop_map(|p| format!("pass={p}")),
                secret.prop_map(|p| format!("%70ass={p}")),
                Just("user=u".to_string()),
                Just("protocol=resp2".to_string()),
            ],
            0..4,
        ),
    )
        .prop_map(|(scheme, query)| {
            if query.is_empty() {
                format!("{scheme}:///run/redis.sock")
            } else {
                format!("{scheme}:///run/redis.sock?{}", query.join("&"))
            }
        });
    prop_oneof![tcp, unix, ".{0,20}"]
}

/// A configuration file: known keys (and some typos) at the top and in each table,
/// with values of any type.
fn config_text() -> impl Strategy<Value = String> {
    let top_key = prop_oneof![
        Just("workers"),
        Just("timeout_ms"),
        Just("max_hung_workers"),
        Just("max_request_bytes"),
        Just("drain_timeout_ms"),
        Just("reply_grace_ms"),
        Just("max_delay_ms"),
        Just("redis_pool_size"),
        Just("prefix"),
        Just("env"),
        Just("crontab"),
        Just("http"),
        Just("wrokers"),
    ];
    let line = (top_key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}"));
    let url = redis_url().prop_map(|u| format!("redis_url = {u:?}"));
    let function = (
        prop_oneof![
            Just("timeout_ms"),
            Just("cache_secs"),
            Just("max_concurrent"),
            Just("users"),
            Just("nope")
        ],
        toml_value(),
    )
        .prop_map(|(k, v)| format!("[functions.f]\n{k} = {v}"));
    let limits = toml_value().prop_map(|v| format!("[limits]\nper_user = {v}"));
    let access = toml_value().prop_map(|v| format!("[access]\nusers = {v}"));
    (
        prop::collection::vec(line, 0..5),
        prop::option::of(url),
        prop::option::of(prop_oneof![function, limits, access]),
        prop_oneof![8 => Just(String::new()), 1 => ".{0,10}"],
    )
        .prop_map(|(lines, url, table, junk)| {
            let mut text = lines.join("\n");
            if let Some(u) = url {
                text.push('\n');
                text.push_str(&u);
            }
            text.push_str(&junk);
            if let Some(t) = table {
                text.push('\n');
                text.push_str(&t);
            }
            text
        })
}

/// The password a generated URL carries (`Zq` and six of `[a-z0-9]`), if any. The
/// generated junk around it may hold a `Zq` of its own, possibly at the very end.
fn secret_in(url: &str) -> Option<String> {
    url.match_indices("Zq").find_map(|(at, _)| {
        let s = url.get(at..at + 8)?;
        s[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            .then(|| s.to_string())
    })
}

/// What must hold for any configuration: one answer, no panic; one that validates
/// is usable (its deadlines add to a clock, its db is the one redis-rs will use)
/// and prints no secret.
fn check_config(text: &str, env_url: Option<String>) {
    let Ok(mut c) = Config::from_toml(text) else {
        return;
    };
    if c.apply_env(|k| (k == "CERBAS_REDIS_URL").then(|| env_url.clone()).flatten())
        .is_err()
    {
        return;
    }
    let secret = secret_in(&c.redis_url);
    match c.validate() {
        Err(e) => {
            if let Some(s) = &secret {
                assert!(!e.to_string().contains(s.as_str()), "{e}");
            }
        }
        Ok(()) => {
            let now = std::time::Instant::now();
            for ms in [
                c.timeout_ms,
                c.drain_timeout_ms,
                c.reply_grace_ms,
                c.max_delay_ms,
            ] {
                assert!(now
                    .checked_add(std::time::Duration::from_millis(ms))
                    .is_some());
            }
            assert!(
                c.workers <= 10_000 && c.redis_pool_size <= 1_000 && c.max_hung_workers <= 10_000
            );
            let url = c
                .connection_url()
                .expect("a valid config has a connection URL");
            let client = redis::Client::open(url.as_str()).expect("redis-rs reads it");
            assert_eq!(
                client.get_connection_info().redis_settings().db(),
                c.db(),
                "{url}"
            );
            if let Some(s) = &secret {
                assert!(!c.summary().contains(s.as_str()), "{}", c.summary());
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn generated_configurations_get_one_answer(text in config_text()) {
        check_config(&text, None);
    }

    #[test]
    fn generated_urls_name_the_db_redis_rs_uses_and_hide_their_secrets(
        url in redis_url(),
        env in prop_oneof![Just("dev"), Just("prod")],
    ) {
        check_config(&format!("env = {env:?}"), Some(url.clone()));
        if let Some(s) = secret_in(&url) {
            let shown = cerbas::config::redact_url(&url);
            prop_assert!(!shown.contains(&s), "{}", shown);
        }
    }

    #[test]
    fn random_text_is_refused_or_loaded_without_a_panic(text in ".{0,200}") {
        check_config(&text, None);
    }
}

#[test]
fn the_campaigns_configurations_are_refused() {
    for text in [
        "redis_pool_size = 9223372036854775807",
        "redis_pool_size = 10000000000",
        "redis_pool_size = 100000000",
        "redis_url = \"unix:///r.sock?db=2&db=3\"",
    ] {
        let c = Config::from_toml(text).expect("parses");
        assert!(c.validate().is_err(), "{text}");
    }
}
