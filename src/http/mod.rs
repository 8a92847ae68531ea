//! The Plug: the HTTP server (tiny_http, no async runtime). A fixed number of
//! handler threads (`http.threads`, named `cerbas-http-N`) take requests from one
//! tiny_http server and route them: `/api/…` to functions through the one
//! dispatch path (`api.rs`, via `caller.rs`), configured prefixes to other web apps
//! (`proxy.rs`, each target behind its `breaker.rs`), `/health` and `/metrics`
//! (`health.rs`), `/dashboard` (`dashboard.rs`). Started by `server.rs` after the
//! workers, stopped after the drain: new calls get 503 as soon as the stop begins,
//! calls in flight finish (or get 503 at the drain deadline), then each thread is
//! woken and joined.
//!
//! Limits: tiny_http reads each connection's request head on a thread of its own
//! and hands complete heads to our handler threads (through `accept.rs`'s pumps),
//! so a client that sends its head slowly never holds a handler thread. Every
//! accepted socket inherits the listener's read and write timeouts
//! (`http.read_timeout_ms`, `http.write_timeout_ms`; Linux copies them on
//! `accept`): an idle or stalled connection is closed after that long, and a body
//! that trickles in is cut off at the same total time (`api.rs`). tiny_http starts
//! a thread per connection and has no cap on connections; the read timeout is
//! what bounds them (a connection that sends nothing for that long is closed). Bodies past `http.max_body_bytes` get 413.
//! Malformed request lines and headers get 400 from tiny_http itself.
//! Not for: what a route does (its own file).

mod accept;
mod api;
mod auth;
mod breaker;
mod dashboard;
mod health;
mod proxy;

use crate::caller::Caller;
use crate::config::{HttpConfig, ProxyTarget};
use crate::error::Error;
use crate::job::{InHand, Stats};
use crate::protocol::Keys;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::{Header, Response, StatusCode};

/// Everything the handler threads share.
pub(crate) struct Plug {
    pub(crate) config: HttpConfig,
    pub(crate) proxy: Vec<ProxyTarget>,
    pub(crate) caller: Caller,
    pub(crate) stats: Arc<Stats>,
    /// For `/health` and the gauges of `/metrics`.
    pub(crate) redis: redis::Client,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) in_hand: InHand,
    /// This instance's pause (the dashboard's action; `/health` says it).
    pub(crate) paused: crate::job::Paused,
    /// This instance's CRONTAB entries (the dashboard shows and runs them).
    pub(crate) cron: crate::job::CronTable,
    /// The dashboard's CSRF secret, new at each start.
    pub(crate) secret: crate::dashboard::actions::Secret,
}

/// The running plug: its handler threads.
pub(crate) struct Running {
    threads: Vec<JoinHandle<()>>,
    closing: Arc<AtomicBool>,
}

/// Binds `config.listen` (before any thread starts, so a taken port stops the
/// start cleanly), with the socket timeouts every connection inherits.
pub(crate) fn bind(config: &HttpConfig) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| Error::Config(format!("http.listen {}: {e}", config.listen)))?;
    socket_timeouts(
        &listener,
        Duration::from_millis(config.read_timeout_ms),
        Duration::from_millis(config.write_timeout_ms),
    )?;
    Ok(listener)
}

/// Starts the handler threads on `listener` (from [`bind`]).
pub(crate) fn start(listener: TcpListener, plug: Plug) -> Result<Running, Error> {
    let config = &plug.config;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && config.tokens.is_empty() {
        log::warn!(
            "the HTTP plug listens on {addr}, beyond loopback, without [http.tokens]: anyone who reaches it calls as user {:?}",
            config.user
        );
    }
    let threads_n = config.threads;
    let read_timeout = Duration::from_millis(config.read_timeout_ms);
    let (requests, incoming) = crossbeam_channel::bounded(threads_n);
    let closing = Arc::new(AtomicBool::new(false));
    accept::start(accept::Accept {
        listener,
        requests,
        closing: closing.clone(),
        read_timeout,
        retire_after: 2 * read_timeout
            + Duration::from_millis(config.proxy_read_timeout_ms)
            + Duration::from_millis(config.write_timeout_ms),
    })?;
    let routes = Arc::new(Routes::new(plug));
    let mut threads = Vec::with_capacity(threads_n);
    for i in 1..=threads_n {
        let (incoming, routes) = (incoming.clone(), routes.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("cerbas-http-{i}"))
                .spawn(move || {
                    // Ends when every pump has gone (the plug is stopping).
                    for rq in incoming {
                        routes.handle(rq);
                    }
                })?,
        );
    }
    log::info!("HTTP plug listening on http://{addr} ({threads_n} threads)");
    Ok(Running { threads, closing })
}

impl Running {
    /// Stops accepting: the handler threads end once their requests are
    /// answered. Returns at once.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Waits for the handler threads until `by`; says whether all have stopped
    /// (a thread still streaming a proxied body is left behind).
    pub(crate) fn join(self, by: Instant) -> bool {
        self.close();
        loop {
            if self.threads.iter().all(|t| t.is_finished()) {
                for t in self.threads {
                    let _ = t.join();
                }
                return true;
            }
            if Instant::now() >= by {
                log::warn!("HTTP threads still busy at the stop deadline; left behind");
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sets the read and write timeouts of `listener`; on Linux every accepted socket
/// inherits them, which is the only way to give tiny_http's sockets timeouts
/// (`accept.rs` says what else that takes).
fn socket_timeouts(listener: &TcpListener, read: Duration, write: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for (opt, d) in [(libc::SO_RCVTIMEO, read), (libc::SO_SNDTIMEO, write)] {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid socket fd, a timeval that lives across the call and
        // its exact size.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The routes and what they need.
struct Routes {
    plug: Plug,
    proxy: proxy::Proxy,
    started: Instant,
    dashboard: dashboard::Dashboard,
}

impl Routes {
    fn new(plug: Plug) -> Self {
        let proxy = proxy::Proxy::new(&plug.config, &plug.proxy);
        Routes {
            plug,
            proxy,
            started: Instant::now(),
            dashboard: dashboard::Dashboard::default(),
        }
    }

    fn handle(&self, mut rq: tiny_http::Request) {
        let url = rq.url().to_string();
        // Only origin-form targets ("/path?query"): an absolute URI
        // ("http://elsewhere/") or "*" would make this an open proxy.
        if !url.starts_with('/') {
            let status = 400;
            self.plug.stats.metrics.http_request("bad_request", status);
            return send(rq, text(status, "bad request target"));
        }
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        if let Some(target) = self.proxy.route(path) {
            let status = self.proxy.forward(rq, target, &self.plug);
            self.plug.stats.metrics.http_request("proxy", status);
            return;
        }
        let (route, response) = match path {
            "/" if is_get(&rq) => ("root", text(200, "OK")),
            "/health" if is_get(&rq) => ("health", health::health(&self.plug, self.started)),
            "/metrics" if is_get(&rq) => ("metrics", health::metrics(&self.plug)),
            "/" | "/health" | "/metrics" => ("method", method_not_allowed("GET")),
            p if p == "/dashboard" || p.starts_with("/dashboard/") => (
                "dashboard",
                dashboard::handle(
                    &self.plug,
                    &self.dashboard,
                    &mut rq,
                    p,
                    self.proxy.targets(),
                ),
            ),
            p if p == "/api" || p.starts_with("/api/") => {
                let (route, response) = api::handle(&self.plug, &mut rq, path, query);
                // The body (if any) was read from `rq` by `api::handle`.
                let status = response.status_code().0;
                self.plug.stats.metrics.http_request(route, status);
                return send(rq, response);
            }
            _ => ("not_found", text(404, "NOT FOUND")),
        };
        self.plug
            .stats
            .metrics
            .http_request(route, response.status_code().0);
        send(rq, response)
    }
}

fn is_get(rq: &tiny_http::Request) -> bool {
    matches!(
        rq.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    )
}

/// A response with a body held in memory.
pub(crate) type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// A response of `status` with `body` of type `content_type`.
pub(crate) fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
    let r = Response::from_data(body).with_status_code(StatusCode(status));
    match header("Content-Type", content_type) {
        Some(h) => r.with_header(h),
        None => r,
    }
}

/// A plain-text response.
pub(crate) fn text(status: u16, body: &str) -> Reply {
    respond(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

/// Adds a header (one whose name and value are ours, never a client's).
pub(crate) fn with(r: Reply, name: &str, value: &str) -> Reply {
    match header(name, value) {
        Some(h) => r.with_header(h),
        None => r,
    }
}

fn method_not_allowed(allow: &str) -> Reply {
    with(text(405, "method not allowed"), "Allow", allow)
}

/// Sends `response`; a client that went away is not an error worth more than a
/// debug line.
pub(crate) fn send<R: std::io::Read>(rq: tiny_http::Request, response: Response<R>) {
    if let Err(e) = rq.respond(response) {
        log::debug!("HTTP: could not send a response: {e}");
    }
}
