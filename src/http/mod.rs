//! The Plug: the HTTP server (our own HTTP/1.1 front, no async runtime). A fixed
//! number of handler threads (`http.threads`, named `cerbas-http-N`) take
//! requests from the front (`http/server.rs`) and route them: `/api/…` to
//! functions through the one dispatch path (`api.rs`, via `caller.rs`), configured prefixes to other web apps
//! (`proxy.rs`, each target behind its `breaker.rs`), `/health` and `/metrics`
//! (`health.rs`), `/dashboard` (`dashboard.rs`). Started by `src/server.rs` after the
//! workers, stopped after the drain: new calls get 503 as soon as the stop begins,
//! calls in flight finish (or get 503 at the drain deadline), then each thread is
//! woken and joined.
//!
//! The front itself (`http/server.rs`, on std::net, with `wire.rs` for the bytes)
//! caps connections (`http.max_connections`, 503 beyond), request heads (size,
//! lines, `http.header_timeout_ms`) and idle keep-alive connections; a client
//! that sends its head slowly holds a connection thread, never a handler thread.
//! Reading a whole `/api` body is cut off at `http.read_timeout_ms` (`api.rs`);
//! bodies past `http.max_body_bytes` get 413; a proxied exchange is cut off at
//! `http.proxy_response_timeout_ms` (`proxy.rs`).
//! Not for: what a route does (its own file).

mod api;
mod auth;
mod breaker;
mod dashboard;
mod health;
mod proxy;
mod server;
mod wire;

use crate::caller::Caller;
use crate::config::{HttpConfig, ProxyTarget};
use crate::error::Error;
use crate::job::{InHand, Stats};
use crate::protocol::Keys;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use server::{Request, Response};

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

/// The running plug: its front and handler threads.
pub(crate) struct Running {
    front: server::Front,
}

/// Binds `config.listen` (before any thread starts, so a taken port stops the
/// start cleanly).
pub(crate) fn bind(config: &HttpConfig) -> Result<TcpListener, Error> {
    TcpListener::bind(&config.listen)
        .map_err(|e| Error::Config(format!("http.listen {}: {e}", config.listen)))
}

/// Starts the front and the handler threads on `listener` (from [`bind`]).
pub(crate) fn start(listener: TcpListener, plug: Plug) -> Result<Running, Error> {
    let config = &plug.config;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && config.tokens.is_empty() {
        log::warn!(
            "the HTTP plug listens on {addr}, beyond loopback, without [http.tokens]: anyone who reaches it calls as user {:?}",
            config.user
        );
    }
    let ms = Duration::from_millis;
    let settings = server::Settings {
        threads: config.threads,
        max_connections: config.max_connections,
        max_head_bytes: config.max_head_bytes,
        header_timeout: ms(config.header_timeout_ms),
        keep_alive: ms(config.keep_alive_ms),
        read_timeout: ms(config.read_timeout_ms),
        write_timeout: ms(config.write_timeout_ms),
    };
    let stats = plug.stats.clone();
    let routes = Routes::new(plug);
    let front = server::start(listener, settings.clone(), stats, move |rq| {
        routes.handle(rq)
    })?;
    log::info!(
        "HTTP plug listening on http://{addr} ({} threads, at most {} connections)",
        settings.threads,
        settings.max_connections
    );
    Ok(Running { front })
}

impl Running {
    /// Stops accepting: the handler threads end once their requests are
    /// answered. Returns at once.
    pub(crate) fn close(&self) {
        self.front.close();
    }

    /// Waits for the threads until `by`; says whether all have stopped (a
    /// thread still streaming a proxied body is left behind).
    pub(crate) fn join(self, by: Instant) -> bool {
        self.front.join(by)
    }
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

    fn handle(&self, mut rq: Request) {
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
                // The body (if any) is read from `rq` by `api::handle`.
                api::handle(&self.plug, &mut rq, path, query)
            }
            _ => ("not_found", text(404, "NOT FOUND")),
        };
        self.plug
            .stats
            .metrics
            .http_request(route, response.status());
        send(rq, response)
    }
}

fn is_get(rq: &Request) -> bool {
    matches!(rq.method(), "GET" | "HEAD")
}

/// A response with a body held in memory.
pub(crate) type Reply = Response;

/// A response of `status` with `body` of type `content_type`.
pub(crate) fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
    Response::new(status, body).with_header("Content-Type", content_type)
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
    r.with_header(name, value)
}

fn method_not_allowed(allow: &str) -> Reply {
    with(text(405, "method not allowed"), "Allow", allow)
}

/// Sends `response`; a client that went away is not an error worth more than a
/// debug line.
pub(crate) fn send(rq: Request, response: Response) {
    if let Err(e) = rq.respond(response) {
        log::debug!("HTTP: could not send a response: {e}");
    }
}
