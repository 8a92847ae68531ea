//! The reverse proxy: a request whose path is a configured `[[proxy]]` prefix (or
//! under it) goes to that target only, with any method, its path and query, its
//! headers (hop-by-hop ones removed, `X-Forwarded-For`/`-Proto`/`-Host` set, the
//! bearer token removed unless `http.forward_token`) and its body streamed; the
//! target's status, headers and body come back streamed. One blocking ureq agent
//! keeps connections to each target for reuse. Each target has its own circuit
//! breaker (`breaker.rs`): a connect failure (502), a timeout (504) or a 5xx from
//! the target counts against it; while it is open the proxy answers 503 at once
//! with `Retry-After`. A whole exchange is bounded by
//! `http.proxy_response_timeout_ms`: a target that trickles its answer is cut
//! off then (the client's connection is closed mid-body), so it cannot hold a
//! handler thread for longer. Runs on the HTTP handler threads.
//! No open proxy: only origin-form request targets reach here (`mod.rs` refuses
//! absolute URIs), the URL is always the configured target's with the request's
//! path appended, the client's `Host` is never used to choose, and a path with a
//! `.` or `..` segment (even percent-encoded) or a backslash is refused.
//! Not for: which paths are the plug's own (`mod.rs`).

use super::breaker::{Admit, Breaker};
use super::{text, with, Plug, Request, Response};
use crate::config::{HttpConfig, ProxyTarget};
use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::http;

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1),
/// plus those the proxy sets itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// One configured target.
pub(super) struct Target {
    prefix: String,
    base: String,
    label: String,
    breaker: Mutex<Breaker>,
}

/// The targets and the client that reaches them.
pub(super) struct Proxy {
    targets: Vec<Target>,
    agent: ureq::Agent,
    forward_token: bool,
    body_timeout: Duration,
    response_timeout: Duration,
}

impl Proxy {
    pub(super) fn new(config: &HttpConfig, targets: &[ProxyTarget]) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(ureq::config::AutoHeaderValue::None)
            .accept(ureq::config::AutoHeaderValue::None)
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .timeout_connect(Some(Duration::from_millis(config.proxy_connect_timeout_ms)))
            .timeout_recv_response(Some(Duration::from_millis(config.proxy_read_timeout_ms)))
            .timeout_per_read(Some(Duration::from_millis(config.proxy_read_timeout_ms)))
            .allow_non_standard_methods(true)
            .max_idle_connections(config.threads * targets.len().max(1))
            .max_idle_connections_per_host(config.threads)
            .build()
            .into();
        Proxy {
            targets: targets
                .iter()
                .map(|t| Target {
                    prefix: t.prefix.clone(),
                    base: t.target.trim_end_matches('/').to_string(),
                    label: t.label().to_string(),
                    breaker: Mutex::new(Breaker::new(
                        config.breaker_failures,
                        Duration::from_millis(config.breaker_window_ms),
                        Duration::from_millis(config.breaker_open_ms),
                    )),
                })
                .collect(),
            agent,
            forward_token: config.forward_token,
            body_timeout: Duration::from_millis(config.read_timeout_ms),
            response_timeout: Duration::from_millis(config.proxy_response_timeout_ms),
        }
    }

    /// The target whose prefix `path` is, or is under (`/api5`, `/api5/x`; not
    /// `/api55`).
    pub(super) fn route(&self, path: &str) -> Option<&Target> {
        self.targets.iter().find(|t| {
            path.strip_prefix(&t.prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// Each target and its breaker, for the dashboard.
    pub(super) fn targets(&self) -> Vec<crate::dashboard::state::Proxy> {
        self.targets
            .iter()
            .map(|t| {
                let b = t.breaker.lock().unwrap_or_else(|e| e.into_inner());
                let counts = b.counts();
                crate::dashboard::state::Proxy {
                    name: t.label.clone(),
                    prefix: t.prefix.clone(),
                    target: t.base.clone(),
                    state: b.state_name().to_string(),
                    requests: counts.requests,
                    failures: counts.failures,
                    refused: counts.refused,
                }
            })
            .collect()
    }

    fn breaker(&self, t: &Target, plug: &Plug, f: impl FnOnce(&mut Breaker) -> Admit) -> Admit {
        let mut b = t.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let admit = f(&mut b);
        plug.stats.metrics.breaker(&t.label, b.code());
        admit
    }

    fn record(&self, t: &Target, plug: &Plug, ok: bool) {
        self.breaker(t, plug, |b| {
            b.record(Instant::now(), ok);
            Admit::Go
        });
    }

    /// Forwards `rq` to `t` and streams the answer back; returns the status sent.
    pub(super) fn forward(&self, rq: Request, t: &Target, plug: &Plug) -> u16 {
        let url = rq.url().to_string();
        let status = if !safe_path(url.split_once('?').map_or(&*url, |(p, _)| p)) {
            super::send(rq, text(400, "bad path"));
            400
        } else {
            match self.breaker(t, plug, |b| b.admit(Instant::now())) {
                Admit::Refuse(wait) => {
                    let r = text(503, &format!("{} is unavailable (circuit open)", t.label));
                    super::send(
                        rq,
                        with(r, "Retry-After", &wait.as_secs().max(1).to_string()),
                    );
                    503
                }
                Admit::Go | Admit::Trial => self.exchange(rq, &url, t, plug),
            }
        };
        plug.stats.metrics.proxy_request(&t.label, status);
        status
    }

    fn exchange(&self, mut req: Request, url: &str, t: &Target, plug: &Plug) -> u16 {
        let request = match self.build(&req, url, t) {
            Ok(r) => r,
            Err(e) => {
                super::send(req, text(400, &format!("cannot forward: {e}")));
                return 400;
            }
        };
        let has_body = req.has_body();
        let started = Instant::now();
        let client_failed = Arc::new(AtomicBool::new(false));
        let result = {
            let mut body = Deadline {
                inner: req.as_reader(),
                until: started + self.body_timeout,
                failed: Some(client_failed.clone()),
            };
            let (parts, ()) = request.into_parts();
            // Bound to a name so the borrowed body is released at the block's end.
            let result = if has_body {
                let send = ureq::SendBody::from_reader(&mut body);
                self.agent.run(http::Request::from_parts(parts, send))
            } else {
                self.agent
                    .run(http::Request::from_parts(parts, ureq::SendBody::none()))
            };
            result
        };
        let response = match result {
            Ok(r) => r,
            Err(_) if client_failed.load(Ordering::SeqCst) => {
                // The client's body stalled: not the target's fault.
                super::send(
                    req,
                    with(text(408, "request body too slow"), "Connection", "close"),
                );
                return 408;
            }
            Err(e) => {
                let (status, why) = match blame(&e) {
                    Blame::Request => {
                        // The client's request cannot be sent as it is: its fault,
                        // not the target's, so the breaker does not count it.
                        log::debug!("proxy {}: cannot forward this request: {e}", t.label);
                        (400, "cannot forward this request")
                    }
                    Blame::Target(status, why) => {
                        self.record(t, plug, false);
                        log::warn!("proxy {}: {why}: {e}", t.label);
                        (status, why)
                    }
                };
                super::send(req, text(status, &format!("{}: {why}", t.label)));
                return status;
            }
        };
        let status = response.status().as_u16();
        self.record(t, plug, status < 500);
        let (parts, body) = response.into_parts();
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = Deadline {
            inner: body.into_reader(),
            until: started + self.response_timeout,
            failed: None,
        };
        let label = t.label.clone();
        let body = CutOff {
            inner: body,
            label,
            said: false,
        };
        let mut answer = Response::stream(status, Box::new(body), length);
        for (name, value) in &parts.headers {
            let n = name.as_str();
            if !is_hop_by_hop(n) && n != "content-length" && !connection_names(&parts.headers, n) {
                answer = answer.with_header(n, value.as_bytes());
            }
        }
        super::send(req, answer);
        status
    }

    /// The request to send upstream: the target's URL with the request's path and
    /// query, its method, and its end-to-end headers plus `X-Forwarded-*`.
    fn build(&self, rq: &Request, url: &str, t: &Target) -> Result<http::Request<()>, String> {
        let method = http::Method::from_bytes(rq.method().as_bytes()).map_err(|e| e.to_string())?;
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{url}", t.base));
        let named_by_connection: Vec<String> = rq
            .headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Connection"))
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut forwarded_for = None;
        let mut host = None;
        for (field, value) in rq.headers() {
            let name = field.to_ascii_lowercase();
            match name.as_str() {
                "x-forwarded-for" => {
                    forwarded_for = Some(String::from_utf8_lossy(value).into_owned())
                }
                "host" => host = Some(String::from_utf8_lossy(value).into_owned()),
                "authorization" if !self.forward_token => {}
                n if is_hop_by_hop(n) || named_by_connection.iter().any(|c| c == n) => {}
                _ => b = b.header(field, value),
            }
        }
        let client = rq.remote_addr().ip().to_string();
        let chain = match forwarded_for {
            Some(prev) => format!("{prev}, {client}"),
            None => client,
        };
        b = b.header("X-Forwarded-For", chain);
        b = b.header("X-Forwarded-Proto", "http");
        if let Some(host) = host {
            b = b.header("X-Forwarded-Host", host);
        }
        b.body(()).map_err(|e| e.to_string())
    }
}

fn is_hop_by_hop(lower_name: &str) -> bool {
    HOP_BY_HOP.contains(&lower_name)
}

/// Whether the target's `Connection` header names `lower_name` (then it is
/// hop-by-hop too).
fn connection_names(headers: &http::HeaderMap, lower_name: &str) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case(lower_name))
}

/// Who a failed exchange is the fault of.
enum Blame {
    /// The client's request (a header or body framing the HTTP client refuses).
    Request,
    /// The target: the status to answer and why.
    Target(u16, &'static str),
}

/// Only the target's failures (cannot connect, timed out, broke the connection,
/// answered what is not HTTP) count against its breaker: a client must not be
/// able to open it for everyone with requests that cannot be sent.
fn blame(e: &ureq::Error) -> Blame {
    use ureq_proto::Error as P;
    match e {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            Blame::Target(502, "cannot connect")
        }
        ureq::Error::Timeout(_) => Blame::Target(504, "timed out"),
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Blame::Target(504, "timed out"),
            ErrorKind::ConnectionRefused => Blame::Target(502, "cannot connect"),
            _ => Blame::Target(502, "connection failed"),
        },
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            Blame::Target(502, "cannot connect")
        }
        ureq::Error::Protocol(
            P::ChunkLenNotAscii
            | P::ChunkLenNotANumber
            | P::ChunkExpectedCrLf
            | P::HttpParseFail(_)
            | P::HttpParseTooManyHeaders
            | P::UnsupportedVersion
            | P::HeadersWith100
            | P::BadReject100Status(_),
        ) => Blame::Target(502, "answered what is not HTTP/1.1"),
        _ => Blame::Request,
    }
}

/// Whether a path may be forwarded: no `.` or `..` segment (also percent-encoded),
/// no backslash, no control characters.
pub(super) fn safe_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains('\\') || lower.contains("%5c") || lower.bytes().any(|b| b < 0x20 || b == 0x7f)
    {
        return false;
    }
    !lower.split('/').any(|seg| {
        let seg = seg.replace("%2e", ".");
        seg == "." || seg == ".." || seg.contains("%2f")
    })
}

/// A body that fails once `until` has passed: the client's (saying so in
/// `failed`, so a slow client is told apart from a slow target) or the
/// target's (the exchange's total deadline).
struct Deadline<R> {
    inner: R,
    until: Instant,
    failed: Option<Arc<AtomicBool>>,
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let said = |e: std::io::Error| {
            if let Some(f) = &self.failed {
                f.store(true, Ordering::SeqCst);
            }
            e
        };
        if Instant::now() > self.until {
            return Err(said(std::io::Error::new(
                ErrorKind::TimedOut,
                "past the deadline",
            )));
        }
        self.inner.read(buf).map_err(said)
    }
}

/// The target's body on its way to the client: a failure (the deadline, a
/// broken or stalled target) is logged once; the client's connection is then
/// closed mid-body by the front.
struct CutOff<R> {
    inner: R,
    label: String,
    said: bool,
}

impl<R: Read> Read for CutOff<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if !std::mem::replace(&mut self.said, true) {
                log::warn!("proxy {}: response cut off: {e}", self.label);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_backslashes_are_refused() {
        assert!(safe_path("/api5/a/b.txt"));
        assert!(safe_path("/api5/..a/b"));
        assert!(!safe_path("/api5/../api/hello"));
        assert!(!safe_path("/api5/%2E%2e/x"));
        assert!(!safe_path("/api5/./x"));
        assert!(!safe_path("/api5/a%2fb"));
        assert!(!safe_path("/api5\\..\\x"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let config = HttpConfig::default();
        let p = Proxy::new(
            &config,
            &[ProxyTarget {
                prefix: "/api5".into(),
                target: "http://127.0.0.1:5000".into(),
                name: Some("flask".into()),
            }],
        );
        assert!(p.route("/api5").is_some());
        assert!(p.route("/api5/x").is_some());
        assert!(p.route("/api55").is_none());
        assert!(p.route("/api").is_none());
    }
}
