//! Every kind of bad input (DESIGN §2 "Error replies") gets its error reply on the
//! request's channel, or a log line for a queue entry that is not an id, and the
//! server serves the next request after each.

mod common;

use cerbas::Reply;
use common::*;
use serde_json::json;

fn assert_still_serving(c: &mut cerbas::Client) {
    assert_eq!(
        c.request("hello", json!({})).unwrap(),
        Reply::Ok("hello world!".into())
    );
}

fn error_for(redis: &Redis, c: &cerbas::Client, body: &[u8]) -> String {
    for mode in [Mode::default(), late(true)] {
        match redis.call_mode(c, body, mode) {
            Reply::Error(m) if mode.msgpack => return m,
            Reply::Error(_) => {}
            other => panic!("expected an error for {body:?}, got {other:?}"),
        }
    }
    unreachable!()
}

#[test]
fn every_bad_body_gets_its_error_reply_and_the_server_goes_on() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let mut c = redis.client();
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let huge = format!(
        r#"{{"func":"echo","user":"foo","source":"web","args":{{"message":"{}"}}}}"#,
        "x".repeat(1 << 20)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{nope".to_vec(), "malformed JSON: "),
        (b"[1,2]".to_vec(), "request must be a JSON object"),
        (b"\"hello\"".to_vec(), "request must be a JSON object"),
        (br#"{"args":{}}"#.to_vec(), "missing \"func\""),
        (br#"{"func":7}"#.to_vec(), "\"func\" must be a string"),
        (
            br#"{"func":"hello","args":[1]}"#.to_vec(),
            "\"args\" must be an object",
        ),
        (
            br#"{"func":"nope","user":"foo","source":"web"}"#.to_vec(),
            "unknown function: nope",
        ),
        (
            br#"{"func":"hello","user":"eve","source":"web"}"#.to_vec(),
            "user not registered: eve",
        ),
        (
            br#"{"func":"hello","user":"foo","source":"cli"}"#.to_vec(),
            "source not registered: cli",
        ),
        (
            br#"{"func":"hello","source":"web"}"#.to_vec(),
            "missing \"user\"",
        ),
        (
            br#"{"func":"halt","user":"tom","source":"web"}"#.to_vec(),
            "user tom may not call halt",
        ),
        (
            br#"{"func":"withargs","user":"foo","source":"web"}"#.to_vec(),
            "invalid arguments: missing field `foo`",
        ),
        (
            br#"{"func":"sum","args":{"a":"1","b":2},"user":"foo","source":"web"}"#.to_vec(),
            "invalid arguments: invalid type: string \"1\"",
        ),
        (
            br#"{"func":"hello","user":"foo","source":"web","delay":-5}"#.to_vec(),
            "\"delay\" must be a whole number of milliseconds, 0 or more",
        ),
        (
            br#"{"func":"hello","user":"foo","source":"web","delay":99999999999999}"#.to_vec(),
            "\"delay\" must be at most 2592000000 ms",
        ),
        (
            b"{\"func\":\"echo\",\"args\":{\"message\":\"\xff\"}}".to_vec(),
            "request is not valid UTF-8",
        ),
        (
            deep.into_bytes(),
            "request nested too deeply (limit 128 levels)",
        ),
        (
            huge.into_bytes(),
            "request too large: 1048641 bytes (limit 1048576)",
        ),
    ];
    for (body, want) in cases {
        let got = error_for(&redis, &c, &body);
        assert!(got.starts_with(want), "wanted {want:?}, got {got:?}");
        assert_still_serving(&mut c);
    }
}

/// Takes a new id, lets `setup` put whatever it likes in Redis for it (it must
/// queue the id), and waits for the reply.
fn reply_after(redis: &Redis, setup: impl FnOnce(u64) -> redis::Pipeline) -> Reply {
    let id: u64 = redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(&mut redis.conn())
        .unwrap();
    let pipe = setup(id);
    redis.reply_for(id, false, || {
        pipe.query::<()>(&mut redis.conn()).expect("set it up");
    })
}

#[test]
fn a_queued_id_without_a_request_key_gets_an_error_reply() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let mut id = 0;
    let got = reply_after(&redis, |i| {
        id = i;
        let mut pipe = redis::pipe();
        pipe.cmd("RPUSH").arg("CERBAS-QUEUE").arg(i);
        pipe
    });
    assert_eq!(
        got,
        Reply::Error(format!("request not found: CERBAS-REQ-{id:010}"))
    );
    assert_still_serving(&mut redis.client());
}

#[test]
fn queue_entries_that_are_not_ids_are_logged_skipped_and_removed() {
    let redis = Redis::start();
    let server = Server::start(&redis);
    let mut c = redis.client();
    let mut conn = redis.conn();
    let forty = "1".repeat(40);
    for entry in ["abc", "", "-3", "007", forty.as_str()] {
        redis::cmd("RPUSH")
            .arg("CERBAS-QUEUE")
            .arg(entry)
            .query::<()>(&mut conn)
            .unwrap();
        assert_still_serving(&mut c);
    }
    let log = wait_for("five log lines", std::time::Duration::from_secs(10), || {
        let log = server.log_text();
        (log.matches("not a request id").count() == 5).then_some(log)
    });
    for shown in [
        "\"abc\"",
        "\"\"",
        "\"-3\"",
        "\"007\"",
        &format!("\"{forty}\""),
    ] {
        assert!(log.contains(shown), "{shown} not in log:\n{log}");
    }
    // Nothing of them stays in Redis.
    assert_eq!(leftover_keys(&mut conn), Vec::<String>::new());
}

#[test]
fn a_request_key_of_the_wrong_type_gets_an_error_and_the_rest_go_on() {
    let redis = Redis::start();
    let _server = Server::start(&redis);
    let mut id = 0;
    let got = reply_after(&redis, |i| {
        id = i;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(format!("CERBAS-REQ-{i:010}"))
            .arg("a")
            .arg("b")
            .cmd("RPUSH")
            .arg("CERBAS-QUEUE")
            .arg(i);
        pipe
    });
    let Reply::Error(m) = got else {
        panic!("expected an error, got {got:?}")
    };
    assert!(
        m.starts_with(&format!("request CERBAS-REQ-{id:010} cannot be read: "))
            && m.contains("WRONGTYPE"),
        "{m}"
    );
    assert_still_serving(&mut redis.client());
}
