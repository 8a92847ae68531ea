//! # cerbas
//!
//! A job and API server. Clients written in any language put JSON requests into
//! Redis; cerbas runs the named Rust function and publishes the JSON reply (and a
//! msgpack copy) on a Redis channel. The wire protocol is the original CERBAS's
//! (DESIGN §2, `docs/` in the repository), so its clients keep working.
//!
//! ```text
//!  Redis P-QUEUE ──TAKE (only for idle workers)──▶ reader ──▶ jobs (bounded) ──▶ worker pool
//!     ▲                                             ▲ "ready"        │   dispatch: access,
//!     │ due delayed ids,                            └─ idle workers  │   limits, cache,
//!     │ dead instances' ids        deadlines ──▶ timer               │   deadline, panics;
//!  scheduler (P-DELAYED,           (timeout replies, halt,           │   replaces hung
//!  heartbeat, recovery)             hung-worker replacement)         ▼   workers
//!                                                           replies (channel)
//!                                                                    │
//!                                           publisher (one connection; one script per
//!                                           reply: ack, then PUBLISH json + msgpack;
//!                                           republish to late subscribers)
//!  CRONTAB ──▶ cron thread ──each tick, claimed once (SET NX + request + RPUSH,
//!              one script)──▶ P-QUEUE; outcomes of cron runs ◀── dispatch
//!  HTTP handler threads (the Plug) ──caller: a job on the due lane──▶ workers
//!        (reply on a channel; /health, /metrics, reverse proxy beside it)
//!  ctrl-c / SIGTERM / halt ──▶ shutdown: stop taking → wait for unanswered calls
//!        (drain_timeout_ms) → flush publisher → return unfinished requests to the
//!        queue; all within drain_timeout_ms + 5 s
//! ```
//!
//! The data that travels between these threads (jobs, replies, the ids in hand,
//! the counters) lives in `job`, below them all: each thread depends on data, not
//! on another thread.
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | key and channel names, request parsing, reply encoding; pure |
//! | [`config`] | the configuration: file, environment, flags, validation |
//! | [`error`] | [`RequestError`] (one per bad-request case), [`Error`] and [`ClientError`] |
//! | [`registry`] | function name → typed handler and its [`Options`] |
//! | [`context`] | what a function gets: caller, deadline, Redis, shutdown |
//! | `job` | data between threads: jobs, replies, ids in hand, counters |
//! | `dispatch` | the one path every request takes |
//! | `caller` | its in-process entry point (HTTP, cron): request in, reply out, a bounded wait for a worker |
//! | `metrics` | the Prometheus registry every thread counts into |
//! | `http` | the Plug: its own HTTP/1.1 front (std::net + httparse: connection cap, head limits, keep-alive), `/api` routes, tokens, proxy, breaker, health, dashboard routes |
//! | `dashboard` | each instance's snapshot in Redis; the dashboard's state and page (pure); its actions |
//! | `limits` | how many calls a user or a function may run at once |
//! | `reader` | the queue reader thread |
//! | `handoff` | how jobs reach the workers: the reader's lane and the due lane, one lock |
//! | `pool` | the worker threads |
//! | [`timer`] | deadlines of running calls, delayed shutdown (in process) |
//! | `scheduler` | in Redis: delayed requests coming due, heartbeat, dead instances |
//! | `publisher` | the publisher thread: replies, acks, late subscribers |
//! | [`connection`] | connecting and reconnecting; the pool lent to functions |
//! | `resp` | the reader's and the publisher's per-batch commands, packed by hand into a reused buffer |
//! | [`shutdown`] | the signal every loop watches |
//! | `server` | [`run`]: starts and stops the threads in order |
//! | [`client`] | a blocking Rust client, shareable between threads (`src/client/`) |
//! | [`cron`] | CRONTAB: schedules, the file, the cron thread (`src/cron/`) |
//!
//! The binary (`src/main.rs`) adds flags, logging and signals, and registers the
//! example functions of `src/functions.rs`, which use only this public API.
//!
//! ## Adding a function
//!
//! ```
//! use cerbas::{Context, FnError, Registry};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Greet { name: String }
//!
//! fn greet(args: Greet, _ctx: &Context) -> Result<String, FnError> {
//!     Ok(format!("hello {}", args.name))
//! }
//!
//! let mut registry = Registry::new();
//! registry.register("greet", greet).timeout_ms(1_000);
//! ```

mod caller;
pub mod client;
pub mod config;
pub mod connection;
pub mod context;
pub mod cron;
mod dashboard;
mod dispatch;
pub mod error;
mod handoff;
mod http;
mod job;
mod limits;
mod metrics;
mod pool;
pub mod protocol;
mod publisher;
mod reader;
pub mod registry;
mod resp;
mod scheduler;
mod server;
pub mod shutdown;
pub mod timer;

pub use client::{CallOptions, Client};
pub use config::{Config, Env, Overrides};
pub use context::{Context, Origin};
pub use error::{ClientError, Error, FnError, RequestError};
pub use job::Stats;
pub use protocol::{Keys, Reply, Request};
pub use registry::{Answer, IntoAnswer, NoArgs, Options, Registry};
pub use server::run;
pub use shutdown::Shutdown;
