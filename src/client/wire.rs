//! What the client sends and how it reads what Redis answers, without I/O: the
//! handshake, the commands of one request, the id blocks, and the sorting of the
//! frames read from the connection. Pure, so it is tested here.
//! Not for: sockets, threads or waiting (that is `link.rs`).

use redis::{PushKind, Value};
use std::ops::Range;

/// How many ids one `INCRBY` on the counter reserves. Ids need only be unique
/// (docs/PROTOCOL.md), so a client takes them in blocks to save a round trip.
pub(crate) const ID_BLOCK: u64 = 100;

/// The handshake sent on each new connection, in one write: RESP3 (so one
/// connection both subscribes and sends commands, in order), the password, the db,
/// and `INFO server` for the `run_id` that tells a restarted Redis. Three replies.
pub(crate) fn handshake(username: Option<&str>, password: Option<&str>, db: i64) -> Vec<u8> {
    let mut hello = redis::cmd("HELLO");
    hello.arg(3);
    if let Some(pass) = password {
        hello
            .arg("AUTH")
            .arg(username.unwrap_or("default"))
            .arg(pass);
    }
    let mut out = hello.get_packed_command();
    out.extend(redis::cmd("SELECT").arg(db).get_packed_command());
    out.extend(redis::cmd("INFO").arg("server").get_packed_command());
    out
}

/// The `run_id:` of an `INFO server` answer.
pub(crate) fn run_id(info: &Value) -> Option<String> {
    let text = match info {
        Value::VerbatimString { text, .. } => text.clone(),
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    text.lines()
        .find_map(|l| l.trim().strip_prefix("run_id:"))
        .map(str::to_string)
}

/// The error text of an answer, if it is an error.
pub(crate) fn error_text(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(e.to_string()),
        _ => None,
    }
}

/// What to make of a handshake reply that is an error: a short explanation.
pub(crate) fn handshake_error(step: &str, e: &str) -> String {
    if step == "HELLO" && e.contains("unknown command") {
        format!("Redis 6 or later is needed (RESP3): {e}")
    } else {
        format!("{step} refused: {e}")
    }
}

/// The commands of one request, in one write: subscribe to its reply channel (on
/// this same RESP3 connection Redis runs them in order, so the subscription is in
/// place before the request is queued: no extra round trip, no race), store the
/// body, queue the id. `channel` is `None` for a one-way request.
pub(crate) fn request_commands(
    channel: Option<&str>,
    key: &str,
    body: &[u8],
    queue: &str,
    id: u64,
) -> Vec<u8> {
    let mut out = match channel {
        Some(c) => redis::cmd("SUBSCRIBE").arg(c).get_packed_command(),
        None => Vec::new(),
    };
    out.extend(redis::cmd("SET").arg(key).arg(body).get_packed_command());
    out.extend(redis::cmd("RPUSH").arg(queue).arg(id).get_packed_command());
    out
}

/// `SUBSCRIBE` (or `UNSUBSCRIBE`) for several channels; empty for none. In RESP3
/// both are answered with push frames only, never a reply in the command order.
pub(crate) fn subscription(verb: &str, channels: &[String]) -> Vec<u8> {
    if channels.is_empty() {
        return Vec::new();
    }
    redis::cmd(verb).arg(channels).get_packed_command()
}

/// The ids reserved by an `INCRBY counter ID_BLOCK` that answered `end`.
pub(crate) fn id_block(end: i64) -> Option<Range<u64>> {
    let end = u64::try_from(end).ok()?;
    let start = end.checked_sub(ID_BLOCK - 1)?;
    Some(start..end + 1)
}

/// One frame read from the connection, sorted.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    /// A published message: channel, payload.
    Message(String, Vec<u8>),
    /// Another push (subscription confirmations): nothing to do.
    OtherPush,
    /// The answer to the oldest command still waiting for one.
    Answer(Value),
}

/// Sorts a frame.
pub(crate) fn classify(v: Value) -> Frame {
    match v {
        Value::Push {
            kind: PushKind::Message,
            data,
        } => {
            let mut it = data.into_iter();
            match (it.next(), it.next()) {
                (Some(ch), Some(Value::BulkString(payload))) => match bytes(ch) {
                    Some(ch) => Frame::Message(ch, payload),
                    None => Frame::OtherPush,
                },
                _ => Frame::OtherPush,
            }
        }
        Value::Push { .. } => Frame::OtherPush,
        other => Frame::Answer(other),
    }
}

fn bytes(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Value {
        redis::parse_redis_value(bytes).expect("a RESP frame")
    }

    #[test]
    fn a_message_push_is_routed_by_its_channel() {
        let v = parse(b">3\r\n$7\r\nmessage\r\n$4\r\nCH-1\r\n$2\r\nhi\r\n");
        assert_eq!(classify(v), Frame::Message("CH-1".into(), b"hi".to_vec()));
    }

    #[test]
    fn confirmations_are_pushes_and_answers_keep_their_order() {
        let sub = parse(b">3\r\n$9\r\nsubscribe\r\n$4\r\nCH-1\r\n:1\r\n");
        assert_eq!(classify(sub), Frame::OtherPush);
        assert_eq!(classify(parse(b"+OK\r\n")), Frame::Answer(Value::Okay));
        assert_eq!(classify(parse(b":7\r\n")), Frame::Answer(Value::Int(7)));
        let err = classify(parse(b"-OOM command not allowed\r\n"));
        let Frame::Answer(e) = err else {
            panic!("an error is an answer")
        };
        assert!(error_text(&e).is_some_and(|t| t.contains("OOM")), "{e:?}");
    }

    #[test]
    fn the_run_id_comes_from_info() {
        let text = "txt:# Server\r\nrun_id:abc123\r\ntcp_port:1\r\n";
        let info = parse(format!("={}\r\n{text}\r\n", text.len()).as_bytes());
        assert_eq!(run_id(&info).as_deref(), Some("abc123"));
        assert_eq!(run_id(&Value::Int(3)), None);
        assert_eq!(
            run_id(&Value::BulkString(b"x:1\r\nrun_id:z\r\n".to_vec())).as_deref(),
            Some("z")
        );
    }

    #[test]
    fn an_id_block_is_the_hundred_ids_up_to_the_answer() {
        assert_eq!(id_block(100), Some(1..101));
        assert_eq!(id_block(250), Some(151..251));
        assert_eq!(id_block(5), None, "a counter set by hand below a block");
        assert_eq!(id_block(-1), None);
    }

    #[test]
    fn a_request_is_subscribe_set_rpush_in_one_write() {
        let out = request_commands(Some("CH"), "K", b"{}", "Q", 42);
        let text = String::from_utf8(out).unwrap();
        let sub = text.find("SUBSCRIBE").unwrap();
        let set = text.find("SET").unwrap();
        let push = text.find("RPUSH").unwrap();
        assert!(sub < set && set < push, "{text}");
        let one_way = request_commands(None, "K", b"{}", "Q", 42);
        assert!(!String::from_utf8(one_way).unwrap().contains("SUBSCRIBE"));
        assert!(subscription("UNSUBSCRIBE", &[]).is_empty());
    }

    #[test]
    fn the_handshake_names_the_password_only_when_there_is_one() {
        let plain = String::from_utf8(handshake(None, None, 1)).unwrap();
        assert!(
            plain.contains("HELLO") && !plain.contains("AUTH"),
            "{plain}"
        );
        let auth = String::from_utf8(handshake(None, Some("pw"), 3)).unwrap();
        assert!(auth.contains("default") && auth.contains("pw"), "{auth}");
        assert!(handshake_error("HELLO", "ERR unknown command 'HELLO'").contains("Redis 6"));
    }
}
