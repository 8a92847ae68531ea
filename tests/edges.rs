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
