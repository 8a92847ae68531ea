//! The one path every request takes, whatever brought it (the Redis queue today;
//! HTTP and cron later): parse errors become replies, a delayed request goes to the
//! timer, then access checks, argument decoding, the call with its deadline, panics,
//! and the counters. Each call is answered once: by the function when it
//! returns in time, or by the timer at the deadline ([`Pending`]); the publisher
//! may then publish that answer more than once to reach a late subscriber. Runs on the worker
//! threads. Not for: fetching requests (`reader.rs`) or talking to Redis
//! (`publisher.rs`).

use crate::config::Access;
use crate::context::{Context, Origin, Services};
use crate::error::{FnError, RequestError};
use crate::protocol::{cache_entry, cache_hit, Reply, Request};
use crate::publisher::{Encoded, Outbox, Outgoing};
use crate::registry::{Answer, Registry};
use crate::timer::TimerEvent;
use crossbeam_channel::Sender;
use serde_json::{Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a job's reply goes.
#[derive(Clone, Debug)]
pub(crate) enum ReplyTo {
    /// Published on the request's channels by the publisher, which also acks it.
    Redis { id: u64 },
    /// A request from Redis whose client wants no reply (`"reply": false`): the
    /// publisher acks it and publishes nothing.
    RedisSilent { id: u64 },
    /// Sent to an in-process caller; `None` is "no reply". The HTTP plug and cron
    /// (next issues) use it; today only the tests do.
    #[cfg_attr(not(test), allow(dead_code))]
    Local(Sender<Option<Reply>>),
}

impl ReplyTo {
    /// Where a reply goes when the client asked for none: nowhere, for a request
    /// from Redis (it is still acknowledged); an in-process caller always gets it.
    fn silenced(self) -> Self {
        match self {
            ReplyTo::Redis { id } => ReplyTo::RedisSilent { id },
            other => other,
        }
    }
}

/// One request on its way to a worker.
pub(crate) struct Job {
    pub(crate) reply_to: ReplyTo,
    pub(crate) body: Result<Request, RequestError>,
    /// Set once a delayed request has waited its delay.
    pub(crate) waited: bool,
}

/// Counters of what the server did, for logs and (later) metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests that reached a worker (a delayed request twice: when it was read,
    /// and again when it came due).
    pub requests: AtomicU64,
    /// Requests put off by their `delay`.
    pub delayed: AtomicU64,
    /// Replies with `status: ok`.
    pub ok: AtomicU64,
    /// Replies with `status: error` (timeouts included).
    pub errors: AtomicU64,
    /// Calls that ran past their deadline.
    pub timeouts: AtomicU64,
    /// Calls that panicked.
    pub panics: AtomicU64,
    /// Queue entries that were not request ids.
    pub bad_entries: AtomicU64,
    /// Replies served from the result cache.
    pub cache_hits: AtomicU64,
    /// Replies held for late subscribers that were dropped because
    /// `republish_max_bytes` was reached (the oldest go first).
    pub replies_dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Workers stuck in calls past their deadline, and how to replace them.
pub(crate) struct Hung {
    count: AtomicUsize,
    cap: usize,
    replace: Sender<()>,
}

impl Hung {
    pub(crate) fn new(cap: usize, replace: Sender<()>) -> Self {
        Hung {
            count: AtomicUsize::new(0),
            cap,
            replace,
        }
    }

    /// Asks for a replacement worker unless `cap` are already hung; says which.
    fn replace(&self, func: &str) -> bool {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.cap {
            self.count.fetch_sub(1, Ordering::SeqCst);
            log::warn!("{func}: still running past its deadline; {} workers hung already (max_hung_workers), no replacement", self.cap);
            return false;
        }
        log::warn!(
            "{func}: still running past its deadline; started a replacement worker ({n} hung)"
        );
        let _ = self.replace.send(());
        true
    }

    /// A replaced worker's call has returned: that worker retires.
    pub(crate) fn returned(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A call in progress: whoever answers first (the function or its deadline)
/// delivers the reply; the other finds it answered.
pub(crate) struct Pending {
    answered: AtomicBool,
    /// Set when the deadline passed with the call still running and a replacement
    /// worker was started: the worker running it retires when it returns.
    replaced: AtomicBool,
    hung: Option<Arc<Hung>>,
    func: String,
    reply_to: ReplyTo,
    out: Outbox,
    stats: Arc<Stats>,
}

impl Pending {
    /// Delivers `answer` unless the call was answered already; says which.
    pub(crate) fn answer(&self, answer: Answer) -> bool {
        if self.answered.swap(true, Ordering::AcqRel) {
            return false;
        }
        let reply = match answer {
            Answer::Value(v) => {
                bump(&self.stats.ok);
                Some(Reply::Ok(v))
            }
            Answer::Error(m) => {
                bump(&self.stats.errors);
                Some(Reply::Error(m))
            }
            Answer::NoReply => None,
        };
        deliver(&self.reply_to, &self.out, reply);
        true
    }

    /// The deadline passed: answer `timeout` if the function has not answered.
    pub(crate) fn expire(&self) {
        if self.answer(Answer::Error(RequestError::Timeout.to_string())) {
            bump(&self.stats.timeouts);
            log::warn!("{}: timed out; the caller got a timeout reply", self.func);
            if let Some(hung) = &self.hung {
                if hung.replace(&self.func) {
                    self.replaced.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

fn deliver(reply_to: &ReplyTo, out: &Outbox, reply: Option<Reply>) {
    match reply_to {
        ReplyTo::Redis { id } => {
            let encoded = reply.map(|r| Encoded {
                json: r.to_json(),
                msgpack: r.to_msgpack(),
            });
            let _ = out.send(Outgoing::Reply { id: *id, encoded });
        }
        ReplyTo::RedisSilent { id } => {
            let _ = out.send(Outgoing::Reply {
                id: *id,
                encoded: None,
            });
        }
        ReplyTo::Local(tx) => {
            let _ = tx.send(reply);
        }
    }
}

/// Everything a worker needs to run a job.
pub(crate) struct Dispatcher {
    pub(crate) registry: Arc<Registry>,
    pub(crate) access: Access,
    pub(crate) default_timeout: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) services: Arc<Services>,
    pub(crate) out: Outbox,
    pub(crate) stats: Arc<Stats>,
    pub(crate) hung: Option<Arc<Hung>>,
}

impl Dispatcher {
    /// Runs `job` to its reply. Blocks the calling worker for the function's run.
    /// Returns true when a replacement took this worker's place meanwhile (its call
    /// ran past the deadline): the worker should then retire.
    pub(crate) fn handle(&self, mut job: Job) -> bool {
        bump(&self.stats.requests);
        let mut request = match job.body {
            Ok(r) => r,
            Err(e) => {
                self.refuse(&job.reply_to, e);
                return false;
            }
        };
        if !request.reply {
            job.reply_to = job.reply_to.silenced();
        }
        // Checked before a delay too, so a bad request is told at once.
        if let Err(e) = self.check_access(&request) {
            self.refuse(&job.reply_to, e);
            return false;
        }
        let Some(function) = self.registry.get(&request.func) else {
            self.refuse(&job.reply_to, RequestError::UnknownFunction(request.func));
            return false;
        };
        if let (Some(ms), false) = (request.delay_ms.filter(|ms| *ms > 0), job.waited) {
            self.delay(job.reply_to, request, ms);
            return false;
        }
        log::debug!(
            "{} from user {:?} source {:?}",
            request.func,
            request.user,
            request.source
        );
        let deadline = Instant::now() + function.options.timeout.unwrap_or(self.default_timeout);
        let cache = self.cache(&request, function.options.cache_secs, deadline);
        if let Some(Ok(data)) = &cache {
            bump(&self.stats.cache_hits);
            bump(&self.stats.ok);
            deliver(&job.reply_to, &self.out, Some(Reply::Ok(data.clone())));
            return false;
        }
        let pending = Arc::new(Pending {
            answered: AtomicBool::new(false),
            replaced: AtomicBool::new(false),
            hung: self.hung.clone(),
            func: request.func.clone(),
            reply_to: job.reply_to.clone(),
            out: self.out.clone(),
            stats: self.stats.clone(),
        });
        if let Some(timer) = &self.services.timer {
            timer.schedule(deadline, TimerEvent::Deadline(pending.clone()));
        }
        let ctx = Context {
            user: request.user,
            source: request.source,
            origin: match job.reply_to {
                ReplyTo::Redis { id } | ReplyTo::RedisSilent { id } => Origin::Redis { id },
                ReplyTo::Local(_) => Origin::Local,
            },
            deadline,
            services: self.services.clone(),
        };
        // The arguments are needed after the call only to store a cached reply.
        let args = match &cache {
            Some(_) => request.args.clone(),
            None => std::mem::take(&mut request.args),
        };
        let answer = match catch_unwind(AssertUnwindSafe(|| (function.handler)(args, &ctx))) {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Answer::Error(e.to_string()),
            Err(_) => {
                bump(&self.stats.panics);
                log::warn!("{}: panicked", pending.func);
                Answer::Error(RequestError::Panicked(pending.func.clone()).to_string())
            }
        };
        if let (Some(Err(key)), Answer::Value(data)) = (&cache, &answer) {
            self.cache_store(
                key,
                &pending.func,
                &request.args,
                data,
                function.options.cache_secs,
            );
        }
        if !pending.answer(answer) {
            log::warn!(
                "{}: finished {:.1}s after its deadline; its result was dropped",
                pending.func,
                deadline.elapsed().as_secs_f64()
            );
        }
        pending.replaced.load(Ordering::SeqCst)
    }

    /// For a cached function: `Ok(data)` on a hit, `Err(key)` (where to store the
    /// reply) on a miss; `None` when the function is not cached. A cache that
    /// cannot be read is a miss: the function runs.
    fn cache(
        &self,
        request: &Request,
        secs: Option<u64>,
        deadline: Instant,
    ) -> Option<Result<Value, String>> {
        secs.filter(|s| *s > 0)?;
        let pool = self.services.pool.as_ref()?;
        let key = self.services.keys.cache(&request.func, &request.args);
        let hit = pool.get(deadline).ok().and_then(|mut c| {
            let entry: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut *c).ok()?;
            cache_hit(&entry?, &request.func, &request.args)
        });
        Some(hit.ok_or(key))
    }

    fn cache_store(
        &self,
        key: &str,
        func: &str,
        args: &Map<String, Value>,
        data: &Value,
        secs: Option<u64>,
    ) {
        let (Some(pool), Some(secs)) = (&self.services.pool, secs) else {
            return;
        };
        let stored = pool
            .get(Instant::now() + Duration::from_secs(1))
            .and_then(|mut c| {
                redis::cmd("SET")
                    .arg(key)
                    .arg(cache_entry(func, args, data))
                    .arg("EX")
                    .arg(secs)
                    .query::<()>(&mut *c)
                    .map_err(FnError::from)
            });
        if let Err(e) = stored {
            log::warn!("{func}: could not cache the reply: {e}");
        }
    }

    fn refuse(&self, reply_to: &ReplyTo, e: RequestError) {
        log::debug!("refused: {e}");
        bump(&self.stats.errors);
        deliver(reply_to, &self.out, Some(e.into()));
    }

    /// A request from Redis waits in Redis (`P-DELAYED`, via the publisher), so it
    /// survives restarts; an in-process caller's waits on the timer.
    fn delay(&self, reply_to: ReplyTo, request: Request, ms: u64) {
        let delay = Duration::from_millis(ms);
        let due = Instant::now().checked_add(delay);
        if delay > self.max_delay {
            return self.refuse(
                &reply_to,
                RequestError::DelayTooLong(self.max_delay.as_millis() as u64),
            );
        }
        match (&reply_to, &self.services.timer, due) {
            (ReplyTo::Redis { id } | ReplyTo::RedisSilent { id }, _, _) => {
                bump(&self.stats.delayed);
                let _ = self.out.send(Outgoing::Delay {
                    id: *id,
                    body: request.to_json_without_delay(),
                    delay_ms: ms,
                });
            }
            (_, Some(timer), Some(due)) => {
                let job = Job {
                    reply_to,
                    body: Ok(request),
                    waited: true,
                };
                bump(&self.stats.delayed);
                timer.schedule(due, TimerEvent::Due(job));
            }
            _ => self.refuse(
                &reply_to,
                RequestError::DelayTooLong(self.max_delay.as_millis() as u64),
            ),
        }
    }

    fn check_access(&self, r: &Request) -> Result<(), RequestError> {
        let user = r.user.as_deref().ok_or(RequestError::Missing("user"))?;
        if !self.access.users.iter().any(|u| u == user) {
            return Err(RequestError::UnknownUser(user.to_string()));
        }
        let source = r.source.as_deref().ok_or(RequestError::Missing("source"))?;
        if !self.access.sources.iter().any(|s| s == source) {
            return Err(RequestError::UnknownSource(source.to_string()));
        }
        let allowed = self
            .registry
            .get(&r.func)
            .and_then(|f| f.options.users.as_ref());
        match allowed {
            Some(users) if !users.iter().any(|u| u == user) => Err(RequestError::NotAllowed {
                user: user.to_string(),
                func: r.func.clone(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FnError;
    use crate::protocol::Keys;
    use crate::registry::NoArgs;
    use crate::shutdown::Shutdown;
    use serde_json::{json, Map, Value};

    struct Fixture {
        dispatcher: Dispatcher,
        timer: crate::timer::TimerHandle,
        thread: Option<std::thread::JoinHandle<()>>,
        due: crossbeam_channel::Receiver<Job>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.timer.stop();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn fixture() -> Fixture {
        let mut registry = Registry::new();
        registry.register("hello", |_: NoArgs, _: &Context| -> Result<&str, FnError> {
            Ok("hello world!")
        });
        registry.register("boom", |_: NoArgs, _: &Context| -> Result<(), FnError> {
            panic!("boom")
        });
        registry
            .register("nap", |_: NoArgs, _: &Context| -> Result<(), FnError> {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
            .timeout_ms(20);
        registry
            .register("secret", |_: NoArgs, _: &Context| -> Result<i32, FnError> {
                Ok(42)
            })
            .users(["foo"]);
        registry.register("quiet", |_: NoArgs, _: &Context| Answer::NoReply);
        let (due_tx, due) = crossbeam_channel::unbounded();
        let (timer, thread) = crate::timer::start(due_tx, Shutdown::new()).unwrap();
        let (out, _out_rx) = crossbeam_channel::unbounded();
        let dispatcher = Dispatcher {
            registry: Arc::new(registry),
            access: Access {
                users: vec!["tom".into(), "foo".into()],
                sources: vec!["web".into()],
            },
            default_timeout: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
            services: Arc::new(Services {
                keys: Keys::new("CERBAS", 1),
                pool: None,
                timer: Some(timer.clone()),
            }),
            out: out.into(),
            stats: Arc::default(),
            hung: None,
        };
        Fixture {
            dispatcher,
            timer,
            thread: Some(thread),
            due,
        }
    }

    fn request(func: &str, user: &str, source: &str) -> Request {
        Request {
            user: Some(user.into()),
            source: Some(source.into()),
            ..Request::new(func, Map::new())
        }
    }

    fn run(f: &Fixture, body: Result<Request, RequestError>) -> Option<Reply> {
        let (tx, rx) = crossbeam_channel::unbounded();
        f.dispatcher.handle(Job {
            reply_to: ReplyTo::Local(tx),
            body,
            waited: false,
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a reply or no-reply")
    }

    fn error(f: &Fixture, body: Result<Request, RequestError>) -> String {
        match run(f, body) {
            Some(Reply::Error(m)) => m,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_registered_caller_gets_the_value() {
        let f = fixture();
        assert_eq!(
            run(&f, Ok(request("hello", "tom", "web"))),
            Some(Reply::Ok(json!("hello world!")))
        );
        assert_eq!(run(&f, Ok(request("quiet", "tom", "web"))), None);
    }

    #[test]
    fn access_is_checked_before_the_function_runs() {
        let f = fixture();
        assert_eq!(
            error(&f, Ok(request("hello", "eve", "web"))),
            "user not registered: eve"
        );
        assert_eq!(
            error(&f, Ok(request("hello", "tom", "cli"))),
            "source not registered: cli"
        );
        assert_eq!(
            error(&f, Ok(request("secret", "tom", "web"))),
            "user tom may not call secret"
        );
        assert_eq!(
            run(&f, Ok(request("secret", "foo", "web"))),
            Some(Reply::Ok(json!(42)))
        );
        assert_eq!(
            error(&f, Ok(request("nope", "tom", "web"))),
            "unknown function: nope"
        );
        assert_eq!(
            error(&f, Ok(Request::new("hello", Map::new()))),
            "missing \"user\""
        );
    }

    #[test]
    fn parse_errors_are_replied() {
        let f = fixture();
        assert_eq!(
            error(&f, Err(RequestError::NotAnObject)),
            "request must be a JSON object"
        );
    }

    #[test]
    fn a_panic_becomes_an_error_reply() {
        let f = fixture();
        assert_eq!(
            error(&f, Ok(request("boom", "tom", "web"))),
            "internal error: function boom panicked"
        );
        assert_eq!(f.dispatcher.stats.panics.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_deadline_answers_timeout_once() {
        let f = fixture();
        assert_eq!(error(&f, Ok(request("nap", "tom", "web"))), "timeout");
        assert_eq!(f.dispatcher.stats.timeouts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_delayed_request_waits_on_the_timer_then_runs() {
        let f = fixture();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut r = request("hello", "tom", "web");
        r.delay_ms = Some(30);
        let start = Instant::now();
        f.dispatcher.handle(Job {
            reply_to: ReplyTo::Local(tx),
            body: Ok(r),
            waited: false,
        });
        assert!(rx.try_recv().is_err(), "nothing before the delay");
        let job = f.due.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
        f.dispatcher.handle(job);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Some(Reply::Ok(Value::from("hello world!")))
        );
        let mut r = request("nope", "tom", "web");
        r.delay_ms = Some(10_000);
        assert_eq!(error(&f, Ok(r)), "unknown function: nope", "told at once");
        let mut r = request("hello", "tom", "web");
        r.delay_ms = Some(u64::MAX);
        assert_eq!(error(&f, Ok(r)), "\"delay\" must be at most 60000 ms");
    }
}
