//! What a function gets besides its arguments: who called it, where the reply goes,
//! its deadline, a Redis connection from the server's pool, prefixed key names, and
//! a way to ask the server to shut down. Not for: running the call (`dispatch.rs`).

use crate::connection::{ConnectionPool, PooledConnection};
use crate::error::FnError;
use crate::protocol::{Keys, DEFAULT_PREFIX};
use crate::timer::{TimerEvent, TimerHandle};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server's shared services, one per server.
pub(crate) struct Services {
    pub(crate) keys: Keys,
    pub(crate) pool: Option<ConnectionPool>,
    pub(crate) timer: Option<TimerHandle>,
}

/// Where a request came from and where its reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A request from the Redis queue, with its id.
    Redis {
        /// The request id (`P-COUNTER` value).
        id: u64,
    },
    /// A caller inside the process (HTTP, cron, tests) waiting on a channel.
    Local,
}

/// The call's context, passed to every function.
///
/// ```
/// let ctx = cerbas::Context::detached();
/// assert_eq!(ctx.user(), None);
/// assert_eq!(ctx.key("TALLY-x"), "CERBAS-TALLY-x");
/// assert!(ctx.redis().is_err()); // a detached context has no server behind it
/// ```
pub struct Context {
    pub(crate) user: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) origin: Origin,
    pub(crate) deadline: Instant,
    pub(crate) services: Arc<Services>,
}

impl Context {
    /// A context not attached to a server, for testing functions on their own:
    /// [`Context::redis`] fails and [`Context::shutdown_after`] does nothing.
    pub fn detached() -> Self {
        Context {
            user: None,
            source: None,
            origin: Origin::Local,
            deadline: Instant::now() + Duration::from_secs(5),
            services: Arc::new(Services {
                keys: Keys::new(DEFAULT_PREFIX, 1),
                pool: None,
                timer: None,
            }),
        }
    }

    /// The registered user who called.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The registered source the call came from.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// Where the request came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The request id, for requests from Redis.
    pub fn request_id(&self) -> Option<u64> {
        match self.origin {
            Origin::Redis { id } => Some(id),
            Origin::Local => None,
        }
    }

    /// The channel the JSON reply will be published on, for requests from Redis.
    pub fn reply_channel(&self) -> Option<String> {
        self.request_id()
            .map(|id| self.services.keys.reply_channel(id))
    }

    /// When the caller stops waiting: past it, the caller has a `timeout` reply and
    /// whatever the function returns is dropped.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before [`Context::deadline`].
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// `P-{name}`: a key under the server's prefix.
    pub fn key(&self, name: &str) -> String {
        self.services.keys.key(name)
    }

    /// Borrows a Redis connection (same server and db as the queue) from the
    /// server's pool, waiting until the deadline for one to be free. Return it
    /// promptly: drop it, don't keep it past the call.
    pub fn redis(&self) -> Result<PooledConnection, FnError> {
        match &self.services.pool {
            Some(pool) => pool.get(self.deadline),
            None => Err("no Redis connection pool (detached context)".into()),
        }
    }

    /// Asks the server to shut down gracefully after `delay`, as the `halt`
    /// function does. The call itself returns at once.
    pub fn shutdown_after(&self, delay: Duration) {
        if let Some(timer) = &self.services.timer {
            timer.schedule(Instant::now() + delay, TimerEvent::Shutdown);
        }
    }
}
