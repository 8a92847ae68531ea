//! The edges a fuzzing campaign found (issue 8), each closed with a test against a
//! real redis-server and real cerbas processes: secrets in unix-socket URLs, delayed
//! bodies kept byte for byte, settings that can never work, the smaller ones, and
//! concurrency limits. Not for: the generated-input property tests (`fuzz.rs`) or
//! the pure parts (unit tests beside the code).

mod common;

use cerbas::Reply;
use common::*;
use serde_json::json;
use std::time::Duration;

fn ok(v: serde_json::Value) -> Reply {
    Reply::Ok(v)
}

/// A redis-server with a password that also listens on a unix socket.
fn redis_on_a_socket(password: &str) -> (Redis, String) {
    let dir = scratch("sock");
    let sock = dir.join("redis.sock").to_string_lossy().into_owned();
    let redis = Redis::start_with(
        &["--unixsocket", &sock, "--unixsocketperm", "700"],
        Some(password),
    );
    (redis, sock)
}

#[test]
fn a_password_in_a_unix_socket_url_never_reaches_the_log() {
    let (redis, sock) = redis_on_a_socket("s3cret-pw");
    for url in [
        format!("redis+unix://{sock}?db=1&pass=s3cret-pw"),
        format!("unix://{sock}?user=default&pass=s3cret-pw"),
    ] {
        let mut server = Server::start_args(&redis, &["--redis", &url]);
        assert_eq!(
            redis.client().request("hello", json!({})).unwrap(),
            ok(json!("hello world!"))
        );
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(20)).is_some());
        let log = server.log_text();
        assert!(log.contains("starting: redis="), "{log}");
        assert!(!log.contains("s3cret"), "{url} leaked:\n{log}");
    }
}

/// Reads `CERBAS-COUNTER`'s next value, as a client does before storing a request.
fn next_id(conn: &mut redis::Connection) -> u64 {
    redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(conn)
        .expect("INCR")
}

#[test]
fn a_delayed_request_is_stored_as_the_client_sent_it_and_served_when_due() {
    let redis = Redis::start();
    // `9e15` written again from the parsed value is `9000000000000000.0`: a body at
    // the size limit would then be refused as too large when it comes due.
    let nines = vec!["9e15"; 40].join(",");
    let fields =
        format!(r#""args":{{"message":[{nines}]}},"func":"echo","source":"web","user":"foo""#);
    let body = format!(r#"{{{fields},"delay":2000}}"#);
    let config = config_with(&format!("max_request_bytes = {}", body.len()));
    let _server = Server::start_args(&redis, &["--config", config.to_str().unwrap()]);
    let mut conn = redis.conn();
    let id = next_id(&mut conn);
    let mut stored = None;
    let reply = redis
        .client()
        .call_id(
            id,
            |_| {
                redis::pipe()
                    .cmd("SET")
                    .arg(format!("CERBAS-REQ-{id:010}"))
                    .arg(&body)
                    .cmd("RPUSH")
                    .arg("CERBAS-QUEUE")
                    .arg(id)
                    .query::<()>(&mut conn)
                    .expect("queue the request");
                // While it waits in CERBAS-DELAYED, its body is what is stored.
                wait_for("the request to be put off", Duration::from_secs(20), || {
                    let score: Option<f64> = redis::cmd("ZSCORE")
                        .arg("CERBAS-DELAYED")
                        .arg(id)
                        .query(&mut conn)
                        .expect("ZSCORE");
                    score.map(|_| ())
                });
                stored = redis::cmd("GET")
                    .arg(format!("CERBAS-REQ-{id:010}"))
                    .query::<Option<String>>(&mut conn)
                    .expect("GET");
                Ok(())
            },
            cerbas::client::Mode::default(),
        )
        .expect("a reply");
    assert_eq!(reply, ok(json!(vec![9e15; 40])));
    assert_eq!(stored, Some(format!("{{{fields}}}")));
}
