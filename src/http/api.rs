//! The `/api` routes: the original's (`/api/hello2`, `/api/foo`, `/api/general`)
//! and the general form `GET|POST /api/{func}`. Each call goes through the one
//! dispatch path (`Caller::call`); this file only turns HTTP into a `Request`
//! (user from `auth.rs`, source `http.source`, arguments from the query string or
//! the body) and the reply into a status (the table in README, "HTTP"). Runs on
//! the HTTP handler threads. Not for: access, deadlines, panics or counting calls
//! (the dispatcher does those for every request).

use super::{auth, respond, text, with, Plug, Reply, Request as HttpRequest};
use crate::caller::NotRun;
use crate::error::{HttpError, RequestError};
use crate::protocol::{parse_request, Reply as Answer, Request};
use serde_json::{Map, Value};
use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

/// Handles a request whose path is `/api` or under it; says which route it took
/// (for the metrics) and what to answer.
pub(super) fn handle(
    plug: &Plug,
    rq: &mut HttpRequest,
    path: &str,
    query: &str,
) -> (&'static str, Reply) {
    let name = path.strip_prefix("/api/").unwrap_or("");
    if name.is_empty() || name.contains('/') {
        return ("not_found", text(404, "NOT FOUND"));
    }
    let user = match auth::user(
        &plug.config.tokens,
        &plug.config.user,
        rq.header("Authorization"),
    ) {
        Ok(user) => user,
        Err(denied) => {
            let e = match denied {
                auth::Denied::Missing => HttpError::MissingToken,
                auth::Denied::Invalid => HttpError::InvalidToken,
            };
            return ("api", with(refused(e), "WWW-Authenticate", "Bearer"));
        }
    };
    let get = matches!(rq.method(), "GET" | "HEAD");
    let post = rq.method() == "POST";
    match name {
        // The original's: var1 and var2 back as JSON, no function called.
        "foo" if get => ("api_foo", foo(query)),
        "hello2" if get => {
            let mut args = Map::new();
            args.insert("foo".into(), Value::String("hello2".into()));
            (
                "api_hello2",
                call(plug, request("withargs", args, &user, &plug.config.source)),
            )
        }
        "general" if post => ("api_general", general(plug, rq, &user)),
        "foo" | "hello2" => ("api", allow("GET, HEAD")),
        "general" => ("api", allow("POST")),
        _ if get => match decode(name).and_then(|f| Ok((f, query_args(query)?))) {
            Ok((func, args)) => (
                "api",
                call(plug, request(&func, args, &user, &plug.config.source)),
            ),
            Err(e) => ("api", refused(e)),
        },
        _ if post => {
            let func = match decode(name) {
                Ok(f) => f,
                Err(e) => return ("api", refused(e)),
            };
            let args = read_body(plug, rq).and_then(|body| body_args(&body));
            match args {
                Ok(args) => (
                    "api",
                    call(plug, request(&func, args, &user, &plug.config.source)),
                ),
                Err(r) => ("api", r),
            }
        }
        _ => ("api", allow("GET, HEAD, POST")),
    }
}

fn request(func: &str, args: Map<String, Value>, user: &str, source: &str) -> Request {
    Request {
        user: Some(user.to_string()),
        source: Some(source.to_string()),
        ..Request::new(func, args)
    }
}

/// Runs `request` and turns its reply into a response (the status table).
fn call(plug: &Plug, request: Request) -> Reply {
    match plug.caller.call(request) {
        Ok(Ok(Some(answer))) => json(200, &answer),
        Ok(Ok(None)) => respond(204, "application/json", Vec::new()),
        Ok(Err(e)) => {
            let r = json(status(&e), &Answer::from(e.clone()));
            match e {
                RequestError::BusyUser { .. } | RequestError::BusyFunction { .. } => {
                    with(r, "Retry-After", "1")
                }
                _ => r,
            }
        }
        Err(NotRun::Stopping) => with(refused(HttpError::Stopping), "Retry-After", "1"),
        Err(NotRun::NoWorker(waited)) => with(
            refused(HttpError::NoWorker(waited.as_millis() as u64)),
            "Retry-After",
            "1",
        ),
    }
}

/// The HTTP status of a request that did not get its function's own reply.
fn status(e: &RequestError) -> u16 {
    match e {
        RequestError::UnknownFunction(_) => 404,
        RequestError::UnknownUser(_)
        | RequestError::UnknownSource(_)
        | RequestError::NotAllowed { .. } => 403,
        RequestError::TooLarge { .. } => 413,
        RequestError::BusyUser { .. } | RequestError::BusyFunction { .. } => 429,
        RequestError::Timeout => 504,
        RequestError::Panicked(_) | RequestError::NotFound(_) | RequestError::Unreadable(..) => 500,
        RequestError::NotUtf8
        | RequestError::TooDeep(_)
        | RequestError::Malformed(_)
        | RequestError::NotAnObject
        | RequestError::Missing(_)
        | RequestError::NotAString(_)
        | RequestError::ArgsNotObject
        | RequestError::BadDelay
        | RequestError::ReplyNotBool
        | RequestError::BadCron
        | RequestError::DelayTooLong(_)
        | RequestError::InvalidArguments(_) => 400,
    }
}

fn json(status: u16, answer: &Answer) -> Reply {
    respond(status, "application/json", answer.to_json())
}

/// The plug's own error reply, with its status.
fn refused(e: HttpError) -> Reply {
    let status = match e {
        HttpError::MissingToken | HttpError::InvalidToken => 401,
        HttpError::MethodNotAllowed => 405,
        HttpError::SlowBody => 408,
        HttpError::Stopping | HttpError::NoWorker(_) => 503,
        HttpError::RepeatedArgument(_)
        | HttpError::NameNotUtf8
        | HttpError::BodyNotArguments
        | HttpError::NotGeneral
        | HttpError::DelayOverHttp
        | HttpError::Unreadable(_) => 400,
    };
    json(status, &Answer::Error(e.to_string()))
}

/// A [`RequestError`] found before the call (parsing the body), with its status.
fn refused_request(e: RequestError) -> Reply {
    json(status(&e), &e.into())
}

fn allow(methods: &str) -> Reply {
    with(refused(HttpError::MethodNotAllowed), "Allow", methods)
}

/// The original's `/api/foo`: `{"var1":…,"var2":…}`, or 403 without them.
fn foo(query: &str) -> Reply {
    let mut var1 = None;
    let mut var2 = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "var1" => var1 = Some(v.into_owned()),
            "var2" => var2 = Some(v.into_owned()),
            _ => {}
        }
    }
    match (var1, var2) {
        (Some(var1), Some(var2)) => respond(
            200,
            "application/json",
            serde_json::json!({"var1": var1, "var2": var2})
                .to_string()
                .into_bytes(),
        ),
        _ => text(403, "must use var1 and var2"),
    }
}

/// The original's `/api/general`: `{"request": {"func", "args", "source"}}`. The
/// user is the caller's (token or `http.user`), never the body's.
fn general(plug: &Plug, rq: &mut HttpRequest, user: &str) -> Reply {
    let body = match read_body(plug, rq) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let inner = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut outer)) => match outer.remove("request") {
            Some(inner @ Value::Object(_)) => inner,
            _ => return refused(HttpError::NotGeneral),
        },
        Ok(_) => return refused(HttpError::NotGeneral),
        Err(e) => return refused_request(RequestError::Malformed(e.to_string())),
    };
    let mut request = match parse_request(inner.to_string().as_bytes(), plug.config.max_body_bytes)
    {
        Ok(r) => r,
        Err(e) => return refused_request(e),
    };
    if request.delay_ms.is_some() {
        return refused(HttpError::DelayOverHttp);
    }
    request.user = Some(user.to_string());
    // Only the cron thread's own requests record outcomes for an entry.
    request.cron = None;
    if request.source.is_none() {
        request.source = Some(plug.config.source.clone());
    }
    call(plug, request)
}

/// A function name from the path, percent-decoded.
fn decode(segment: &str) -> Result<String, HttpError> {
    percent_encoding_decode(segment).ok_or(HttpError::NameNotUtf8)
}

fn percent_encoding_decode(s: &str) -> Option<String> {
    // form_urlencoded would turn '+' into a space; a path keeps it.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(b'%');
                    i += 1;
                }
            },
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Arguments from a query string: a value that parses as JSON is taken as JSON
/// (`n=3` is the number 3, `f=true` a boolean), else as a string; a key given
/// twice is an error.
fn query_args(query: &str) -> Result<Map<String, Value>, HttpError> {
    let mut args = Map::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let value =
            serde_json::from_str::<Value>(&v).unwrap_or_else(|_| Value::String(v.into_owned()));
        if args.insert(k.clone().into_owned(), value).is_some() {
            return Err(HttpError::RepeatedArgument(k.into_owned()));
        }
    }
    Ok(args)
}

/// Arguments from a POST body: a JSON object; an empty body is `{}`.
fn body_args(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(args)) => Ok(args),
        Ok(_) => Err(refused(HttpError::BodyNotArguments)),
        Err(e) => Err(refused_request(RequestError::Malformed(e.to_string()))),
    }
}

/// Reads the whole body, up to `http.max_body_bytes` (413 past it), within
/// `http.read_timeout_ms` in all (408 past it, so a client that trickles its body
/// cannot hold a handler thread).
fn read_body(plug: &Plug, rq: &mut HttpRequest) -> Result<Vec<u8>, Reply> {
    let max = plug.config.max_body_bytes;
    let too_large = |size: usize| {
        let e = RequestError::TooLarge { size, limit: max };
        with(refused_request(e), "Connection", "close")
    };
    if let Some(n) = rq.body_length().filter(|n| *n > max as u64) {
        return Err(too_large(usize::try_from(n).unwrap_or(usize::MAX)));
    }
    let deadline = Instant::now() + Duration::from_millis(plug.config.read_timeout_ms);
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let reader = rq.as_reader();
    loop {
        if Instant::now() > deadline {
            return Err(with(refused(HttpError::SlowBody), "Connection", "close"));
        }
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(body),
            Ok(n) => {
                body.extend_from_slice(&chunk[..n]);
                if body.len() > max {
                    return Err(too_large(body.len()));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(with(refused(HttpError::SlowBody), "Connection", "close"));
            }
            Err(e) => return Err(refused(HttpError::Unreadable(e.to_string()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_values_are_json_when_they_parse() {
        let args = query_args("a=1&b=x&c=true&d=%22q%22&e=&f=%7B%22k%22%3A1%7D").unwrap();
        assert_eq!(
            Value::Object(args),
            json!({"a": 1, "b": "x", "c": true, "d": "q", "e": "", "f": {"k": 1}})
        );
        assert_eq!(
            query_args("a=1&a=2").unwrap_err().to_string(),
            "argument \"a\" given more than once"
        );
        assert!(query_args("").unwrap().is_empty());
    }

    #[test]
    fn names_are_percent_decoded() {
        assert_eq!(decode("hello").unwrap(), "hello");
        assert_eq!(decode("a%20b+c").unwrap(), "a b+c");
        assert_eq!(decode("bad%zz").unwrap(), "bad%zz");
        assert!(decode("%ff").is_err());
    }

    #[test]
    fn bodies_are_objects_of_arguments() {
        assert_eq!(body_args(b"").ok(), Some(Map::new()));
        assert_eq!(
            body_args(br#"{"a":1}"#).ok().map(Value::Object),
            Some(json!({"a": 1}))
        );
        assert_eq!(body_args(b"[1]").err().map(|r| r.status()), Some(400));
        assert_eq!(body_args(b"{").err().map(|r| r.status()), Some(400));
    }

    #[test]
    fn the_plugs_own_errors_have_their_status_and_message() {
        assert_eq!(
            HttpError::NotGeneral.to_string(),
            r#"body must be {"request": {"func", "args", "source"}}"#
        );
        assert_eq!(refused(HttpError::NotGeneral).status(), 400);
        assert_eq!(refused(HttpError::MissingToken).status(), 401);
        assert_eq!(refused(HttpError::SlowBody).status(), 408);
        assert_eq!(refused(HttpError::Stopping).status(), 503);
        assert_eq!(refused(HttpError::MethodNotAllowed).status(), 405);
    }

    #[test]
    fn every_request_error_has_its_status() {
        assert_eq!(status(&RequestError::UnknownFunction("x".into())), 404);
        assert_eq!(status(&RequestError::Timeout), 504);
        assert_eq!(status(&RequestError::Panicked("x".into())), 500);
        assert_eq!(status(&RequestError::InvalidArguments("x".into())), 400);
        assert_eq!(
            status(&RequestError::NotAllowed {
                user: "a".into(),
                func: "b".into()
            }),
            403
        );
        assert_eq!(status(&RequestError::TooLarge { size: 2, limit: 1 }), 413);
    }
}
