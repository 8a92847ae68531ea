//! # cerbas
//!
//! A job and API server. Clients written in any language put JSON requests into
//! Redis; cerbas runs the named Rust function and publishes the JSON reply (and a
//! msgpack copy) on a Redis channel. The wire protocol is the original CERBAS's
//! (DESIGN §2, `docs/` in the repository), so its clients keep working.
//!
//! ```text
//!  Redis P-QUEUE ──BLMOVE/batch──▶ reader ──▶ jobs (bounded) ──▶ worker pool (N threads)
//!     ▲                                                              │   dispatch: access,
//!     │ due delayed ids,                     deadlines ──▶ timer     │   cache, deadline,
//!     │ dead instances' ids                  (timeout replies,       │   panics; replaces
//!  scheduler (P-DELAYED, heartbeat)           halt, hung workers)    │   hung workers
//!                                                                    ▼
//!                                                           replies (channel)
//!                                                                    │
//!                                           publisher (one connection; PUBLISH json +
//!                                           msgpack, ack, republish to late subscribers)
//!  ctrl-c / SIGTERM / halt ──▶ shutdown: stop reader → drain workers → flush publisher
//!                                        → return unfinished requests to the queue
//! ```
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | key and channel names, request parsing, reply encoding; pure |
//! | [`config`] | the configuration: file, environment, flags, validation |
//! | [`error`] | [`RequestError`] (one per bad-request case) and [`Error`] |
//! | [`registry`] | function name → typed handler and its [`Options`] |
//! | [`context`] | what a function gets: caller, deadline, Redis, shutdown |
//! | `dispatch` | the one path every request takes, and its counters |
//! | `limits` | how many calls a user or a function may run at once |
//! | `reader` | the queue reader thread |
//! | `pool` | the worker threads |
//! | [`timer`] | deadlines of running calls, delayed shutdown (in process) |
//! | `scheduler` | in Redis: delayed requests coming due, heartbeat, dead instances |
//! | `publisher` | the publisher thread: replies, acks, late subscribers |
//! | [`connection`] | connecting and reconnecting; the pool lent to functions |
//! | [`shutdown`] | the signal every loop watches |
//! | `server` | [`run`]: starts and stops the threads in order |
//! | [`client`] | a blocking Rust client |
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

pub mod client;
pub mod config;
pub mod connection;
pub mod context;
mod dispatch;
pub mod error;
mod limits;
mod pool;
pub mod protocol;
mod publisher;
mod reader;
pub mod registry;
mod scheduler;
mod server;
pub mod shutdown;
pub mod timer;

pub use client::Client;
pub use config::{Config, Env, Overrides};
pub use context::{Context, Origin};
pub use dispatch::Stats;
pub use error::{Error, FnError, RequestError};
pub use protocol::{Keys, Reply, Request};
pub use registry::{Answer, IntoAnswer, NoArgs, Options, Registry};
pub use server::run;
pub use shutdown::Shutdown;
