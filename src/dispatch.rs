//! The one path every request takes, whatever brought it (the Redis queue, which
//! cron's ticks come through too; HTTP calls, via `caller`): parse errors become
//! replies, a delayed request goes to the timer, then access checks, argument
//! decoding, the call with its deadline, panics, and the counters. A request cron
//! wrote (its `cron` tag) also has its outcome logged and sent to the cron thread
//! ([`CronRun`]), which records it for its entry. Each call is answered once: by
//! the function when it returns in time, or by the timer at the deadline
//! ([`Pending`]); the publisher may then publish that answer more than once to
//! reach a late subscriber. Runs on the worker threads. Not for: fetching
//! requests (`reader.rs`) or talking to Redis (`publisher.rs`).

use crate::config::Access;
use crate::context::{Context, Origin, Services};
use crate::error::{FnError, RequestError};
use crate::job::{
    unix_ms, CronRun, Encoded, Job, LocalReply, Outbox, Outcome, Outgoing, ReplyTo, Stats,
    Unanswered,
};
use crate::limits::Concurrency;
use crate::protocol::{cache_entry, cache_hit, CronTag, Reply, Request};
use crate::registry::{Answer, Registry};
use crate::timer::{Expire, TimerEvent};
use crossbeam_channel::Sender;
use serde_json::{Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Workers stuck in calls past their deadline, and how to replace them.
pub(crate) struct Hung {
    count: AtomicUsize,
    cap: usize,
    /// One message per replacement: whether the new worker says on `ready`
    /// that it is free (pool.rs). Not when the hung call came on `due` (an HTTP
    /// call, a delayed request): the hung worker's last "free" still stands in
    /// the reader's count, and now stands for its replacement.
    replace: Sender<bool>,
}

impl Hung {
    pub(crate) fn new(cap: usize, replace: Sender<bool>) -> Self {
        Hung {
            count: AtomicUsize::new(0),
            cap,
            replace,
        }
    }

    /// Counts one more hung worker unless `cap` are hung already; says which.
    fn reserve(&self) -> bool {
        self.count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a place taken by [`Hung::reserve`] that was not used, or that of
    /// a replaced worker whose call has returned (it retires).
    pub(crate) fn release(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many workers are hung now (replaced, their calls still running).
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Where a call stands. Every change is one compare-and-swap, so exactly one of
/// the function (returning) and the timer (at the deadline) answers the caller,
/// and exactly one decides whether the worker is replaced.
mod state {
    /// The function is running and nobody has answered.
    pub(super) const RUNNING: u8 = 0;
    /// The function returned in time and answered.
    pub(super) const DONE: u8 = 1;
    /// The timer answered `timeout` and is deciding whether to replace the worker.
    pub(super) const EXPIRING: u8 = 2;
    /// Past its deadline, not replaced (cap reached, or no pool): the worker goes
    /// on when its call returns.
    pub(super) const EXPIRED: u8 = 3;
    /// Past its deadline and replaced: the worker retires when its call returns.
    pub(super) const REPLACED: u8 = 4;
    /// The call returned late, while the timer was still deciding: no
    /// replacement, the worker goes on.
    pub(super) const RETURNED_LATE: u8 = 5;
}

/// A cron run being watched: its outcome is logged and sent to the cron thread.
pub(crate) struct CronWatch {
    tag: CronTag,
    started: Instant,
    runs: Sender<CronRun>,
    stats: Arc<Stats>,
}

impl CronWatch {
    fn report(&self, func: &str, outcome: Outcome) {
        let duration = self.started.elapsed();
        let ms = duration.as_millis();
        let (entry, tick) = (&self.tag.entry, self.tag.tick);
        let label = match &outcome {
            Outcome::Ok => "ok",
            Outcome::Error(_) => "error",
            Outcome::Timeout => "timeout",
        };
        self.stats.metrics.cron_run(entry, label);
        match &outcome {
            Outcome::Ok => log::info!("cron {func} (entry {entry}, tick {tick}): ok in {ms} ms"),
            Outcome::Error(m) => {
                log::info!("cron {func} (entry {entry}, tick {tick}): error in {ms} ms: {m}")
            }
            Outcome::Timeout => {
                log::info!("cron {func} (entry {entry}, tick {tick}): timeout after {ms} ms")
            }
        }
        let _ = self.runs.send(CronRun {
            tag: self.tag.clone(),
            func: func.to_string(),
            outcome,
            at_ms: unix_ms(),
            duration,
        });
    }
}

/// A call in progress: whoever answers first (the function or its deadline)
/// delivers the reply; the other finds it answered.
pub(crate) struct Pending {
    state: AtomicU8,
    started: Instant,
    deadline: Instant,
    hung: Option<Arc<Hung>>,
    func: String,
    reply_to: ReplyTo,
    out: Outbox,
    unanswered: Unanswered,
    stats: Arc<Stats>,
    /// Set for a cron run.
    cron: Option<CronWatch>,
    /// Whether the job came from the reader (on `jobs`), not on `due`.
    from_reader: bool,
    /// The caller's user, for the dashboard's recent errors.
    user: Option<String>,
}

impl Expire for Pending {
    /// The deadline passed: answers `timeout` if the function has not answered,
    /// then starts a replacement worker unless the call returns meanwhile.
    fn expire(&self) {
        if self.answer_timeout() {
            self.replace_worker();
        }
    }

    fn settled(&self) -> bool {
        self.state.load(Ordering::SeqCst) != state::RUNNING
    }
}

/// What the worker does once its call has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterCall {
    /// Take the next job.
    GoOn,
    /// A replacement took this worker's place: retire.
    Retire,
}

impl Pending {
    fn new(
        deadline: Instant,
        hung: Option<Arc<Hung>>,
        func: String,
        reply_to: ReplyTo,
        out: Outbox,
        unanswered: Unanswered,
        stats: Arc<Stats>,
    ) -> Self {
        Pending {
            state: AtomicU8::new(state::RUNNING),
            started: Instant::now(),
            deadline,
            hung,
            func,
            reply_to,
            out,
            unanswered,
            stats,
            cron: None,
            from_reader: false,
            user: None,
        }
    }

    fn settle(&self, from: u8, to: u8) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The function returned with `answer`: delivers it if the deadline has not
    /// answered already, and says whether this worker goes on or retires.
    pub(crate) fn returned(&self, answer: Result<Answer, RequestError>) -> AfterCall {
        if self.settle(state::RUNNING, state::DONE) {
            self.deliver(answer);
            return AfterCall::GoOn;
        }
        log::warn!(
            "{}: finished {:.1}s after its deadline; its result was dropped",
            self.func,
            self.deadline.elapsed().as_secs_f64()
        );
        // The timer answered. If it is still deciding, returning now tells it not
        // to replace this worker; otherwise its decision stands.
        if self.settle(state::EXPIRING, state::RETURNED_LATE) {
            return AfterCall::GoOn;
        }
        if self.state.load(Ordering::SeqCst) == state::REPLACED {
            if let Some(hung) = &self.hung {
                hung.release();
            }
            return AfterCall::Retire;
        }
        AfterCall::GoOn
    }

    /// First half of [`Pending::expire`]: answers `timeout` unless answered.
    fn answer_timeout(&self) -> bool {
        if !self.settle(state::RUNNING, state::EXPIRING) {
            return false;
        }
        self.deliver(Err(RequestError::Timeout));
        bump(&self.stats.timeouts);
        log::warn!("{}: timed out; the caller got a timeout reply", self.func);
        true
    }

    /// Second half of [`Pending::expire`]: a replacement worker, unless the call
    /// returned meanwhile or `max_hung_workers` are hung already.
    fn replace_worker(&self) {
        let Some(hung) = &self.hung else {
            self.settle(state::EXPIRING, state::EXPIRED);
            return;
        };
        if !hung.reserve() {
            if self.settle(state::EXPIRING, state::EXPIRED) {
                log::warn!(
                    "{}: still running past its deadline; {} workers hung already (max_hung_workers), no replacement",
                    self.func, hung.cap
                );
            }
            return;
        }
        if self.settle(state::EXPIRING, state::REPLACED) {
            log::warn!(
                "{}: still running past its deadline; started a replacement worker ({} hung)",
                self.func,
                hung.count()
            );
            let _ = hung.replace.send(self.from_reader);
        } else {
            // The call returned while we decided: its worker goes on.
            hung.release();
        }
    }

    fn deliver(&self, answer: Result<Answer, RequestError>) {
        if let Some(cron) = &self.cron {
            let outcome = match &answer {
                Err(RequestError::Timeout) => Outcome::Timeout,
                Err(e) => Outcome::Error(e.to_string()),
                Ok(Answer::Error(m)) => Outcome::Error(m.clone()),
                Ok(Answer::Value(_) | Answer::NoReply) => Outcome::Ok,
            };
            cron.report(&self.func, outcome);
        }
        let reply = match answer {
            Ok(Answer::Value(v)) => {
                bump(&self.stats.ok);
                Ok(Some(Reply::Ok(v)))
            }
            Ok(Answer::Error(m)) => {
                bump(&self.stats.errors);
                Ok(Some(Reply::Error(m)))
            }
            Ok(Answer::NoReply) => Ok(None),
            Err(e) => {
                bump(&self.stats.errors);
                Err(e)
            }
        };
        self.stats
            .metrics
            .call(&self.func, outcome(&reply), Some(self.started.elapsed()));
        remember_error(
            &self.stats,
            &self.reply_to,
            &self.func,
            self.user.as_deref(),
            &reply,
        );
        deliver(&self.reply_to, &self.out, &self.unanswered, reply);
    }
}

/// Keeps an error reply for the dashboard's recent errors (`dashboard/errors.rs`).
fn remember_error(
    stats: &Stats,
    reply_to: &ReplyTo,
    func: &str,
    user: Option<&str>,
    reply: &LocalReply,
) {
    let message = match reply {
        Ok(Some(Reply::Error(m))) => m.clone(),
        Err(e) => e.to_string(),
        Ok(_) => return,
    };
    let id = match reply_to {
        ReplyTo::Redis { id, .. } | ReplyTo::RedisSilent { id, .. } => Some(*id),
        ReplyTo::Local(..) => None,
    };
    stats.recent_errors.add(id, func, user, &message);
}

/// The `outcome` label of a delivered reply in the metrics.
fn outcome(reply: &LocalReply) -> &'static str {
    match reply {
        Ok(Some(Reply::Ok(_))) => "ok",
        Ok(Some(Reply::Error(_))) => "error",
        Ok(None) => "no_reply",
        Err(RequestError::Timeout) => "timeout",
        Err(RequestError::Panicked(_)) => "panic",
        Err(RequestError::InvalidArguments(_)) => "invalid_arguments",
        Err(_) => "refused",
    }
}

/// Sends `reply` where it goes: to the publisher for a request from Redis (an
/// error becomes its message there, as everywhere: `From<RequestError> for
/// Reply`), as it is to an in-process caller.
fn deliver(reply_to: &ReplyTo, out: &Outbox, unanswered: &Unanswered, reply: LocalReply) {
    match reply_to {
        ReplyTo::Redis { id, epoch } => {
            let reply = reply.unwrap_or_else(|e| Some(e.into()));
            let encoded = reply.map(|r| Encoded {
                json: r.to_json(),
                msgpack: r.to_msgpack(),
            });
            let _ = out.send(Outgoing::Reply {
                id: *id,
                epoch: *epoch,
                encoded,
            });
            // After the send: a stop that sees 0 queues its `Finish` behind this.
            unanswered.done(1);
        }
        ReplyTo::RedisSilent { id, epoch } => {
            let _ = out.send(Outgoing::Reply {
                id: *id,
                epoch: *epoch,
                encoded: None,
            });
            unanswered.done(1);
        }
        ReplyTo::Local(tx, _) => {
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
    pub(crate) unanswered: Unanswered,
    pub(crate) stats: Arc<Stats>,
    pub(crate) hung: Option<Arc<Hung>>,
    /// `[limits] per_user` and `[functions.NAME] max_concurrent`.
    pub(crate) concurrency: Arc<Concurrency>,
    /// Where the outcomes of cron runs go (the cron thread records them).
    pub(crate) cron_runs: Sender<CronRun>,
}

impl Dispatcher {
    /// Runs `job` to its reply. Blocks the calling worker for the function's run,
    /// then says whether the worker goes on or retires (a replacement took its
    /// place while its call ran past the deadline). `from_reader`: the job came
    /// from the reader (on `jobs`), not on `due` (a delayed request, an
    /// in-process call), as the worker saw it (pool.rs).
    pub(crate) fn handle(&self, mut job: Job, from_reader: bool) -> AfterCall {
        // A local call its caller gave up on before any worker was free is not
        // run (the caller answered it already). A delayed job back from the
        // timer was taken before its delay.
        if let (ReplyTo::Local(_, claim), false) = (&job.reply_to, job.waited) {
            if !claim.take() {
                return AfterCall::GoOn;
            }
        }
        bump(&self.stats.requests);
        let mut request = match job.body {
            Ok(r) => r,
            Err(e) => {
                self.refuse(&job.reply_to, None, None, e);
                return AfterCall::GoOn;
            }
        };
        if !request.reply {
            job.reply_to = job.reply_to.silenced();
        }
        let started = Instant::now();
        let watch = |request: &Request| {
            request.cron.as_deref().map(|tag| CronWatch {
                tag: tag.clone(),
                started,
                runs: self.cron_runs.clone(),
                stats: self.stats.clone(),
            })
        };
        // A cron run refused before it starts is an outcome of its entry too.
        let refuse = |reply_to: &ReplyTo, request: &Request, e: RequestError| {
            if let Some(w) = watch(request) {
                w.report(&request.func, Outcome::Error(e.to_string()));
            }
            self.refuse(reply_to, Some(&request.func), request.user.as_deref(), e);
            AfterCall::GoOn
        };
        // Checked before a delay too, so a bad request is told at once.
        if let Err(e) = self.check_access(&request) {
            return refuse(&job.reply_to, &request, e);
        }
        let Some(function) = self.registry.get(&request.func) else {
            let e = RequestError::UnknownFunction(request.func.clone());
            return refuse(&job.reply_to, &request, e);
        };
        if let (Some(ms), false) = (request.delay_ms.filter(|ms| *ms > 0), job.waited) {
            self.delay(job.reply_to, request, ms);
            return AfterCall::GoOn;
        }
        // About to run: one user or one function may not hold more workers than
        // the configuration allows. The slot is held until the function returns.
        let _slot = match self
            .concurrency
            .enter(&request.func, request.user.as_deref())
        {
            Ok(slot) => slot,
            Err(e) => return refuse(&job.reply_to, &request, e),
        };
        log::debug!(
            "{} from user {:?} source {:?}",
            request.func,
            request.user,
            request.source
        );
        let deadline = Instant::now() + function.options.timeout.unwrap_or(self.default_timeout);
        let mut pending = Pending::new(
            deadline,
            self.hung.clone(),
            request.func.clone(),
            job.reply_to.clone(),
            self.out.clone(),
            self.unanswered.clone(),
            self.stats.clone(),
        );
        pending.cron = watch(&request);
        pending.from_reader = from_reader;
        pending.user = request.user.clone();
        let pending = Arc::new(pending);
        // Scheduled before anything that can block (the cache lookup waits on the
        // connection pool and on Redis), so the caller hears `timeout` in time
        // whatever happens after.
        if let Some(timer) = &self.services.timer {
            timer.schedule(deadline, TimerEvent::Deadline(pending.clone()));
        }
        let cache = self.cache(&request, function.options.cache_secs, deadline);
        if let Some(Ok(data)) = cache {
            bump(&self.stats.cache_hits);
            self.stats.metrics.cache_hit(&pending.func);
            return pending.returned(Ok(Answer::Value(data)));
        }
        let ctx = Context {
            user: request.user,
            source: request.source,
            origin: match job.reply_to {
                ReplyTo::Redis { id, .. } | ReplyTo::RedisSilent { id, .. } => Origin::Redis { id },
                ReplyTo::Local(..) => Origin::Local,
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
            Ok(answer) => answer,
            Err(_) => {
                bump(&self.stats.panics);
                log::warn!("{}: panicked", pending.func);
                Err(RequestError::Panicked(pending.func.clone()))
            }
        };
        if let (Some(Err(key)), Ok(Answer::Value(data))) = (&cache, &answer) {
            self.cache_store(
                key,
                &pending.func,
                &request.args,
                data,
                function.options.cache_secs,
            );
        }
        pending.returned(answer)
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

    /// Answers `e` without running the function (`func`, the request's function
    /// name if it has one, labels the metrics only when it is registered).
    fn refuse(&self, reply_to: &ReplyTo, func: Option<&str>, user: Option<&str>, e: RequestError) {
        log::debug!("refused: {e}");
        bump(&self.stats.errors);
        let label = func
            .filter(|f| self.registry.get(f).is_some())
            .unwrap_or("-");
        self.stats.metrics.call(label, "refused", None);
        let reply = Err(e);
        remember_error(&self.stats, reply_to, func.unwrap_or("-"), user, &reply);
        deliver(reply_to, &self.out, &self.unanswered, reply);
    }

    /// A request from Redis waits in Redis (`P-DELAYED`, via the publisher), so it
    /// survives restarts; an in-process caller's waits on the timer.
    fn delay(&self, reply_to: ReplyTo, request: Request, ms: u64) {
        let delay = Duration::from_millis(ms);
        let due = Instant::now().checked_add(delay);
        if delay > self.max_delay {
            return self.refuse(
                &reply_to,
                Some(&request.func),
                request.user.as_deref(),
                RequestError::DelayTooLong(self.max_delay.as_millis() as u64),
            );
        }
        match (&reply_to, &self.services.timer, due) {
            (ReplyTo::Redis { id, epoch } | ReplyTo::RedisSilent { id, epoch }, _, _) => {
                bump(&self.stats.delayed);
                let _ = self.out.send(Outgoing::Delay {
                    id: *id,
                    epoch: *epoch,
                    body: request.to_json_without_delay(),
                    delay_ms: ms,
                });
                self.unanswered.done(1);
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
                None,
                None,
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
        due: crate::handoff::Jobs,
        /// Held open: a closed reader lane ends the workers' end.
        _reader: crate::handoff::ReaderLane,
        cron_runs: crossbeam_channel::Receiver<CronRun>,
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
        fixture_with_pool(None)
    }

    fn fixture_with_pool(pool: Option<crate::connection::ConnectionPool>) -> Fixture {
        let mut registry = Registry::new();
        registry
            .register("cached", |_: NoArgs, _: &Context| -> Result<i32, FnError> {
                Ok(7)
            })
            .cache_secs(60)
            .timeout_ms(100);
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
        let (reader, due_tx, due) = crate::handoff::handoff(1);
        let (timer, thread) = crate::timer::start(due_tx, Shutdown::new()).unwrap();
        let (out, _out_rx) = crossbeam_channel::unbounded();
        let (cron_tx, cron_runs) = crossbeam_channel::unbounded();
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
                pool,
                timer: Some(timer.clone()),
            }),
            out: out.into(),
            unanswered: Unanswered::default(),
            stats: Arc::default(),
            hung: None,
            concurrency: Arc::default(),
            cron_runs: cron_tx,
        };
        Fixture {
            dispatcher,
            timer,
            thread: Some(thread),
            due,
            _reader: reader,
            cron_runs,
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
        f.dispatcher.handle(
            Job {
                reply_to: ReplyTo::Local(tx, Default::default()),
                body,
                waited: false,
            },
            false,
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a reply or no-reply")
            .unwrap_or_else(|e| Some(e.into()))
    }

    /// An in-process caller gets refusals, timeouts and panics as types (the
    /// HTTP plug picks its status from them); a function's own error is a reply.
    #[test]
    fn a_local_call_its_caller_withdrew_is_not_run() {
        let f = fixture();
        let (tx, rx) = crossbeam_channel::unbounded();
        let claim = crate::job::Claim::default();
        assert!(claim.withdraw());
        f.dispatcher.handle(
            Job {
                reply_to: ReplyTo::Local(tx, claim),
                body: Ok(request("hello", "tom", "web")),
                waited: false,
            },
            false,
        );
        assert!(rx.try_recv().is_err(), "no reply: it did not run");
        assert_eq!(f.dispatcher.stats.requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_local_caller_gets_errors_as_types() {
        let f = fixture();
        let typed = |body| {
            let (tx, rx) = crossbeam_channel::unbounded();
            f.dispatcher.handle(
                Job {
                    reply_to: ReplyTo::Local(tx, Default::default()),
                    body: Ok(body),
                    waited: false,
                },
                false,
            );
            rx.recv_timeout(Duration::from_secs(10)).expect("a reply")
        };
        assert_eq!(
            typed(request("nope", "tom", "web")),
            Err(RequestError::UnknownFunction("nope".into()))
        );
        assert_eq!(
            typed(request("boom", "tom", "web")),
            Err(RequestError::Panicked("boom".into()))
        );
        assert_eq!(
            typed(request("nap", "tom", "web")),
            Err(RequestError::Timeout)
        );
        let text = f.dispatcher.stats.metrics.encode();
        assert!(
            text.contains(r#"cerbas_requests_total{function="-",outcome="refused"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cerbas_requests_total{function="boom",outcome="panic"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cerbas_requests_total{function="nap",outcome="timeout"} 1"#),
            "{text}"
        );
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
    fn a_cron_run_reports_its_outcome_ok_error_refusal_and_timeout() {
        let f = fixture();
        let tagged = |func: &str, user: &str| Request {
            cron: Some(Box::new(CronTag {
                entry: "e1".into(),
                tick: 60,
            })),
            ..request(func, user, "web")
        };
        let outcome = |f: &Fixture| {
            let run = f
                .cron_runs
                .recv_timeout(Duration::from_secs(10))
                .expect("a cron outcome");
            assert_eq!((run.tag.entry.as_str(), run.tag.tick), ("e1", 60));
            assert!(run.at_ms > 0);
            (run.func, run.outcome)
        };
        run(&f, Ok(tagged("hello", "tom")));
        assert_eq!(outcome(&f), ("hello".into(), Outcome::Ok));
        run(&f, Ok(tagged("boom", "tom")));
        assert_eq!(
            outcome(&f),
            (
                "boom".into(),
                Outcome::Error("internal error: function boom panicked".into())
            )
        );
        run(&f, Ok(tagged("secret", "tom")));
        assert_eq!(
            outcome(&f),
            (
                "secret".into(),
                Outcome::Error("user tom may not call secret".into())
            )
        );
        run(&f, Ok(tagged("nope", "tom")));
        assert_eq!(
            outcome(&f),
            (
                "nope".into(),
                Outcome::Error("unknown function: nope".into())
            )
        );
        assert_eq!(error(&f, Ok(tagged("nap", "tom"))), "timeout");
        assert_eq!(outcome(&f), ("nap".into(), Outcome::Timeout));
        // Untagged requests report nothing.
        run(&f, Ok(request("hello", "tom", "web")));
        assert!(f.cron_runs.try_recv().is_err());
        let text = f.dispatcher.stats.metrics.encode();
        for line in [
            r#"cerbas_cron_runs_total{entry="e1",outcome="ok"} 1"#,
            r#"cerbas_cron_runs_total{entry="e1",outcome="error"} 3"#,
            r#"cerbas_cron_runs_total{entry="e1",outcome="timeout"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
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

    /// Issue 7 item 11b: the cache lookup of a cached function waits on the
    /// connection pool and on Redis. Against a Redis that accepts connections and
    /// never answers (a stalled server), the caller still hears `timeout` at the
    /// deadline; before, the deadline was scheduled only after the lookup.
    #[test]
    fn the_deadline_covers_the_cache_lookup() {
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let addr = stalled.local_addr().expect("address");
        let client = redis::Client::open(format!("redis://{addr}/")).expect("client");
        let f = Arc::new(fixture_with_pool(Some(
            crate::connection::ConnectionPool::new(client, 1),
        )));
        let (tx, rx) = crossbeam_channel::unbounded();
        let start = Instant::now();
        let worker = {
            let f = f.clone();
            std::thread::spawn(move || {
                f.dispatcher.handle(
                    Job {
                        reply_to: ReplyTo::Local(tx, Default::default()),
                        body: Ok(request("cached", "tom", "web")),
                        waited: false,
                    },
                    false,
                )
            })
        };
        let reply = rx.recv_timeout(Duration::from_secs(30)).expect("a reply");
        let took = start.elapsed();
        assert_eq!(reply, Err(RequestError::Timeout));
        assert!(
            took < Duration::from_secs(2),
            "timeout after {took:?}, the deadline is 100 ms"
        );
        // Closing the stalled server's socket ends the lookup.
        drop(stalled);
        let _ = worker.join();
    }

    /// A pending call with a hung-worker budget of `cap`, and the receiver of
    /// replacement requests.
    fn pending(cap: usize) -> (Pending, Arc<Hung>, crossbeam_channel::Receiver<bool>) {
        let (replace, replacements) = crossbeam_channel::unbounded();
        let hung = Arc::new(Hung::new(cap, replace));
        let (out, _) = crossbeam_channel::unbounded();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let p = Pending::new(
            Instant::now(),
            Some(hung.clone()),
            "f".into(),
            ReplyTo::Local(tx, Default::default()),
            out.into(),
            Unanswered::default(),
            Arc::default(),
        );
        (p, hung, replacements)
    }

    #[test]
    fn a_call_that_returns_in_time_is_never_replaced() {
        let (p, hung, replacements) = pending(5);
        assert_eq!(p.returned(Ok(Answer::NoReply)), AfterCall::GoOn);
        p.expire();
        assert_eq!(hung.count(), 0);
        assert!(replacements.try_recv().is_err());
    }

    /// The replacement of a worker hung on a job from `due` (here an in-process
    /// call) does not say it is free: the hung worker's "free" stands for it.
    /// One hung on a job from the reader does.
    #[test]
    fn only_the_replacement_of_a_worker_hung_on_a_readers_job_says_it_is_free() {
        let (p, _, replacements) = pending(5);
        p.expire();
        assert_eq!(replacements.try_recv(), Ok(false));
        let (mut p, _, replacements) = pending(5);
        p.from_reader = true;
        p.expire();
        assert_eq!(replacements.try_recv(), Ok(true));
    }

    #[test]
    fn a_replaced_worker_retires_and_gives_its_place_back() {
        let (p, hung, replacements) = pending(5);
        p.expire();
        assert_eq!(hung.count(), 1);
        assert!(replacements.try_recv().is_ok());
        assert_eq!(p.returned(Ok(Answer::NoReply)), AfterCall::Retire);
        assert_eq!(hung.count(), 0);
    }

    /// The interleaving that leaked a hung worker: the call returns after the
    /// timer answered `timeout` and before it decided to replace the worker.
    #[test]
    fn a_call_returning_while_the_timer_decides_keeps_its_worker() {
        let (p, hung, replacements) = pending(5);
        assert!(p.answer_timeout());
        assert_eq!(p.returned(Ok(Answer::NoReply)), AfterCall::GoOn);
        p.replace_worker();
        assert_eq!(hung.count(), 0, "no place kept for a worker that went on");
        assert!(replacements.try_recv().is_err(), "no replacement started");
    }

    #[test]
    fn past_the_cap_nobody_is_replaced_and_the_worker_goes_on() {
        let (p, hung, replacements) = pending(0);
        p.expire();
        assert_eq!(hung.count(), 0);
        assert!(replacements.try_recv().is_err());
        assert_eq!(p.returned(Ok(Answer::NoReply)), AfterCall::GoOn);
    }

    #[test]
    fn the_race_run_for_real_always_settles_the_count_to_zero() {
        for _ in 0..2000 {
            let (p, hung, _replacements) = pending(usize::MAX);
            let p = Arc::new(p);
            let timer = {
                let p = p.clone();
                std::thread::spawn(move || p.expire())
            };
            let after = p.returned(Ok(Answer::NoReply));
            timer.join().expect("timer side");
            assert_eq!(hung.count(), 0, "count after {after:?}");
        }
    }

    #[test]
    fn a_delayed_request_waits_on_the_timer_then_runs() {
        let f = fixture();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut r = request("hello", "tom", "web");
        r.delay_ms = Some(30);
        let start = Instant::now();
        f.dispatcher.handle(
            Job {
                reply_to: ReplyTo::Local(tx, Default::default()),
                body: Ok(r),
                waited: false,
            },
            false,
        );
        assert!(rx.try_recv().is_err(), "nothing before the delay");
        let (job, _) = f.due.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
        f.dispatcher.handle(job, false);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Ok(Some(Reply::Ok(Value::from("hello world!"))))
        );
        let mut r = request("nope", "tom", "web");
        r.delay_ms = Some(10_000);
        assert_eq!(error(&f, Ok(r)), "unknown function: nope", "told at once");
        let mut r = request("hello", "tom", "web");
        r.delay_ms = Some(u64::MAX);
        assert_eq!(error(&f, Ok(r)), "\"delay\" must be at most 60000 ms");
    }
}
