//! The protocol floor: a yardstick, NOT a server. It does the least any server
//! can do per request under the wire protocol of docs/PROTOCOL.md, so that
//! `make bench` can put cerbas's latency and CPU next to what the protocol itself
//! costs on the same machine, in the same run (issue 12: "show the measurement
//! that bounds it").
//!
//! One thread, one blocking Redis connection, and per batch ONE write and one
//! wait: the last batch's `PUBLISH` ×2 (JSON and msgpack, the same bytes cerbas
//! publishes: the public `Reply` encoders) and `DEL` of its request keys, then
//! `BLMOVE` of the next id from the queue to a list of its own (`P-FLOOR-HAND`), then a script
//! (`TAKE`) that pops that id and up to `--batch` more and returns them with
//! their bodies. Redis runs a connection's commands in order, so the script runs
//! as soon as the `BLMOVE` is served, in the same turn: the queue holds only
//! ids, yet the server gets ids and bodies without a round trip of its own for
//! the `GET`s. (Against `BLMPOP` + `MGET`, measured in turns on this VM: server
//! CPU per W2 round trip 11-13 µs against 14, Redis's 23-25 µs against 21-22 (the
//! script's `GET`s cost more than `MGET`'s), W1 p50 the same within the noise.
//! The server's share is what issue 12's targets bound, so the floor spares it.)
//! It answers `hello`, `echo` and `tally` inline, as
//! `src/functions.rs` does: `tally` makes one sequential `INCR` per request, as
//! the function does from a worker (`--pipeline-functions` sends a batch's
//! `INCR`s in one pipeline instead, which no user function could: the floor of
//! the protocol alone). One-way requests (`"reply": false`) get no reply. The
//! shipped clients work against it unchanged.
//!
//! `--threads` (with `--workers N`, 100 as in cerbas.toml) is the same floor in
//! cerbas's thread shape (DESIGN §3), to measure what the thread hand-offs
//! alone cost (futex wakes, context switches), which no change inside that
//! shape removes: a reader thread takes as above on its own connection and
//! hands each parsed request to N worker threads (a locked queue bounded by N
//! and a condition variable, one wake of a sleeping worker in flight at a time,
//! passed on by the woken worker while jobs wait, as `src/handoff.rs`); a
//! worker runs the function (`tally`'s `INCR` on a connection of a pool of 100,
//! cerbas's own `ConnectionPool`, as cerbas lends one to a function) and sends
//! the encoded reply to a publisher thread (a crossbeam channel plus a count
//! the publisher sleeps on, as cerbas's `Outbox` and `Backlog`); the publisher
//! takes whatever waits and sends its `PUBLISH` ×2 per reply and one `DEL` of
//! the request keys in one write on its own connection, then reads the
//! answers. So the threads and hand-offs are cerbas's while the Redis work per
//! request stays the floor's (the take script, one write of replies and
//! `DEL`s, no processing list, no acks). It leaves out all of the list below,
//! and of cerbas's threads also: the workers' "ready" announcements and the
//! reader's pacing by them (the bounded queue is its only back-pressure), the
//! timer, the scheduler, the due lane. `--wake-per-job` wakes a sleeping worker
//! for every job instead, as cerbas did before 51d1f96: with 100 mostly idle
//! workers, about one worker context switch per request.
//!
//! What it leaves out, so never serve anything with it: the lossless guarantees
//! (a request it has popped is lost if it dies: no processing list, no acks, no
//! recovery of dead instances), deadlines and timeouts, panics caught, access
//! checks (user, source, per-function users), limits, the cache, delayed
//! requests (answered with an error, not stored), the late-subscriber republish
//! (a reply nobody hears is gone), a request key that is not a string (read as
//! missing), reconnecting (it stops when its Redis goes away), heartbeat,
//! snapshots, metrics, cron, HTTP.
//!
//! ```text
//! cargo run --release --example floor -- --redis redis://127.0.0.1:6379/2
//! cargo run --release --example floor -- --redis redis://127.0.0.1:6379/2 --threads --workers 100
//! ```
//!
//! Prints `floor: ready ...` on stdout once it serves; stops on SIGINT/SIGTERM
//! (after sending the replies of the batch in hand; with `--threads`, of every
//! request the reader took) or when Redis goes away.
//! Its tests are `tests/floor.rs` (they need a real redis-server); that is why
//! the items they use are `pub`.

use cerbas::connection::ConnectionPool;
use cerbas::protocol::{describe_entry, parse_queue_entry, parse_request, Request};
use cerbas::{Config, Keys, Reply, RequestError};
use clap::Parser;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use redis::Connection;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "The protocol floor: the least a server can do per request (a yardstick)")]
pub struct Args {
    /// Redis URL (its db, else CERBAS_ENV's: dev 1, prod 8).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Most requests taken from the queue at once.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Send a batch's `tally` INCRs in one pipeline rather than one at a time.
    #[arg(long)]
    pipeline_functions: bool,
    /// cerbas's thread shape: a reader thread, `--workers` worker threads, a
    /// publisher thread (each with its own connection).
    #[arg(long, conflicts_with = "pipeline_functions")]
    threads: bool,
    /// With `--threads`: how many worker threads (cerbas.toml's `workers`).
    #[arg(long, default_value_t = 100, requires = "threads")]
    workers: usize,
    /// With `--threads`: every job wakes a sleeping worker (cerbas's hand-off
    /// before 51d1f96), rather than one wake at a time passed on while jobs wait.
    #[arg(long, requires = "threads")]
    wake_per_job: bool,
}

/// How long one `BLMOVE` waits before the loop looks at the stop flag again.
const POLL_SECS: f64 = 0.1;
/// Read timeout of the connection: longer than any `BLMOVE` wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// With `--threads`: the connections lent to `tally` (cerbas.toml's `redis_pool_size`).
pub const POOL_SIZE: usize = 100;
/// With `--threads`: how long a worker waits for a pooled connection (cerbas's
/// default `timeout_ms`).
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes what the `BLMOVE` put in the hand list (KEYS[1]; normally one id, or
/// none after a timeout; more if an earlier floor stopped between the two) and
/// up to ARGV[1] ids in all from the queue (KEYS[2]); returns `{entry, body}`
/// pairs, the body of ARGV[2] .. the id padded to 10 digits (false when it is
/// missing or not a string, or the entry is not an id: Rust sorts those out).
pub const TAKE: &str = r#"
local taken = redis.call('LPOP', KEYS[1], 64) or {}
local more = tonumber(ARGV[1]) - #taken
if more > 0 then
  for _, e in ipairs(redis.call('LPOP', KEYS[2], more) or {}) do
    taken[#taken + 1] = e
  end
end
local out = {}
for i, e in ipairs(taken) do
  local body = false
  if string.match(e, '^[1-9]%d*$') or e == '0' then
    local id = e
    if #id < 10 then id = string.rep('0', 10 - #id) .. id end
    body = redis.pcall('GET', ARGV[2] .. id)
    if type(body) == 'table' then body = false end
  end
  out[i] = {e, body}
end
return out
"#;

/// What [`TAKE`] answers: each queue entry with its body, if it has one.
type Taken = Vec<(Vec<u8>, Option<Vec<u8>>)>;

#[derive(Deserialize)]
struct Echo {
    message: Value,
}

#[derive(Deserialize)]
struct Tally {
    name: String,
}

/// What one request needs after its body is read.
pub enum Work {
    /// Its reply is known.
    Done(Reply),
    /// `INCR` of this key; the new count is the reply.
    Incr(String),
}

/// One request of a batch: its id, whether it wants a reply, its work.
pub struct Job {
    pub id: u64,
    pub reply: bool,
    pub work: Work,
}

fn decode<T: serde::de::DeserializeOwned>(args: Map<String, Value>) -> Result<T, RequestError> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| RequestError::InvalidArguments(e.to_string()))
}

/// A request body (None: the key is missing) parsed, as cerbas's reader does.
pub fn read_body(
    keys: &Keys,
    id: u64,
    body: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Request, RequestError> {
    body.ok_or_else(|| RequestError::NotFound(keys.request(id)))
        .and_then(|b| parse_request(b, max_bytes))
}

/// A request body (None: the key is missing) into its work, with the same error
/// texts as cerbas for what the floor checks.
pub fn plan(keys: &Keys, id: u64, body: Option<&[u8]>, max_bytes: usize) -> Job {
    work_for(keys, id, read_body(keys, id, body, max_bytes))
}

/// What a parsed request asks for: its function run (all but `tally`'s `INCR`),
/// as a worker of cerbas runs it.
pub fn work_for(keys: &Keys, id: u64, request: Result<Request, RequestError>) -> Job {
    let r = match request {
        Ok(r) => r,
        Err(e) => {
            return Job {
                id,
                reply: true,
                work: Work::Done(e.into()),
            }
        }
    };
    let work = match (r.func.as_str(), r.delay_ms) {
        (_, Some(ms)) if ms > 0 => Work::Done(Reply::Error(
            "delayed requests are not served by the floor (a yardstick, not a server)".into(),
        )),
        ("hello", _) => Work::Done(Reply::Ok(json!("hello world!"))),
        ("echo", _) => match decode::<Echo>(r.args) {
            Ok(a) => Work::Done(Reply::Ok(a.message)),
            Err(e) => Work::Done(e.into()),
        },
        ("tally", _) => match decode::<Tally>(r.args) {
            Ok(a) => Work::Incr(keys.key(&format!("TALLY-{}", a.name))),
            Err(e) => Work::Done(e.into()),
        },
        (other, _) => Work::Done(RequestError::UnknownFunction(other.to_string()).into()),
    };
    Job {
        id,
        reply: r.reply,
        work,
    }
}

/// Runs the `INCR`s of `jobs`, one round trip each or one pipeline for all.
fn run_functions(c: &mut Connection, jobs: &mut [Job], pipelined: bool) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for job in jobs.iter_mut() {
        if let Work::Incr(key) = &job.work {
            if pipelined {
                pipe.cmd("INCR").arg(key);
            } else {
                let n: i64 = redis::cmd("INCR").arg(key).query(c)?;
                job.work = Work::Done(Reply::Ok(json!(n)));
            }
        }
    }
    if pipelined && !pipe.is_empty() {
        let mut counts = pipe.query::<Vec<i64>>(c)?.into_iter();
        for job in jobs.iter_mut() {
            if matches!(job.work, Work::Incr(_)) {
                job.work = Work::Done(Reply::Ok(json!(counts.next().unwrap_or(0))));
            }
        }
    }
    Ok(())
}

/// What one take brought: the ids (bad queue entries already dropped), each
/// one's body, and whether that body was read under the old key name (which
/// must be deleted too).
struct Batch {
    ids: Vec<u64>,
    bodies: Vec<Option<Vec<u8>>>,
    old_name: Vec<bool>,
}

/// How both modes take requests: `BLMOVE` then [`TAKE`] in one write.
struct Taker {
    queue: String,
    hand: String,
    script: String,
    batch: usize,
}

impl Taker {
    fn new(c: &mut Connection, keys: &Keys, batch: usize) -> redis::RedisResult<Taker> {
        Ok(Taker {
            queue: keys.queue(),
            hand: keys.key("FLOOR-HAND"),
            script: redis::cmd("SCRIPT").arg("LOAD").arg(TAKE).query(c)?,
            batch: batch.max(1),
        })
    }

    /// Sends `pending` (what the last batch still owes Redis), the wait and the
    /// take in one write, and reads the missing bodies under the old key name.
    fn take(
        &self,
        c: &mut Connection,
        keys: &Keys,
        mut pending: redis::Pipeline,
    ) -> redis::RedisResult<Batch> {
        pending
            .cmd("BLMOVE")
            .arg(&self.queue)
            .arg(&self.hand)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(POLL_SECS)
            .ignore()
            .cmd("EVALSHA")
            .arg(&self.script)
            .arg(2)
            .arg(&self.hand)
            .arg(&self.queue)
            .arg(self.batch)
            .arg(keys.request_prefix());
        let (taken,): (Taken,) = pending.query(c)?;
        let mut ids = Vec::with_capacity(taken.len());
        let mut bodies = Vec::with_capacity(taken.len());
        for (entry, body) in taken {
            match parse_queue_entry(&entry) {
                Some(id) => {
                    ids.push(id);
                    bodies.push(body);
                }
                None => eprintln!("floor: dropped queue entry {}", describe_entry(&entry)),
            }
        }
        // The original's later Python client writes P-REQUEST-…: read only when missing.
        let old_name: Vec<bool> = bodies.iter().map(Option::is_none).collect();
        let missing: Vec<usize> = (0..ids.len()).filter(|i| old_name[*i]).collect();
        if !missing.is_empty() {
            let fallbacks: Vec<String> = missing
                .iter()
                .map(|i| keys.request_fallback(ids[*i]))
                .collect();
            let found: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&fallbacks).query(c)?;
            for (i, body) in missing.iter().zip(found) {
                bodies[*i] = body;
            }
        }
        Ok(Batch {
            ids,
            bodies,
            old_name,
        })
    }
}

/// Adds `PUBLISH` of `reply` on both of request `id`'s channels to `pipe`.
fn publish(pipe: &mut redis::Pipeline, keys: &Keys, id: u64, json: &[u8], msgpack: &[u8]) {
    pipe.cmd("PUBLISH")
        .arg(keys.reply_channel(id))
        .arg(json)
        .ignore()
        .cmd("PUBLISH")
        .arg(keys.msgpack_channel(id))
        .arg(msgpack)
        .ignore();
}

/// Serves until `stop` is set, counting the requests it answers in `served`.
pub fn serve(
    c: &mut Connection,
    keys: &Keys,
    args: &Args,
    stop: &AtomicBool,
    served: &mut u64,
) -> redis::RedisResult<()> {
    let max_bytes = Config::default().max_request_bytes;
    let taker = Taker::new(c, keys, args.batch)?;
    // The last batch's replies and DEL, sent in the same write as the next take.
    let mut pending = redis::pipe();
    loop {
        if stop.load(Ordering::Relaxed) {
            if !pending.is_empty() {
                pending.query::<()>(c)?;
            }
            return Ok(());
        }
        let Batch {
            ids,
            bodies,
            old_name,
        } = taker.take(c, keys, std::mem::replace(&mut pending, redis::pipe()))?;
        if ids.is_empty() {
            continue;
        }
        let names: Vec<String> = ids.iter().map(|id| keys.request(*id)).collect();
        let fallbacks: Vec<String> = (0..ids.len())
            .filter(|i| old_name[*i])
            .map(|i| keys.request_fallback(ids[i]))
            .collect();
        if !fallbacks.is_empty() {
            pending.cmd("DEL").arg(fallbacks).ignore();
        }
        let mut jobs: Vec<Job> = ids
            .iter()
            .zip(&bodies)
            .map(|(id, body)| plan(keys, *id, body.as_deref(), max_bytes))
            .collect();
        run_functions(c, &mut jobs, args.pipeline_functions)?;
        for job in &jobs {
            let (Work::Done(reply), true) = (&job.work, job.reply) else {
                continue;
            };
            publish(
                &mut pending,
                keys,
                job.id,
                &reply.to_json(),
                &reply.to_msgpack(),
            );
        }
        pending.cmd("DEL").arg(names).ignore();
        *served += jobs.len() as u64;
    }
}

// ---- The threaded mode (`--threads`): cerbas's thread shape, nothing more. ----

/// A request on its way from the reader to a worker: its id, its parsed body
/// (or why it has none), whether its body was under the old key name.
struct Handed {
    id: u64,
    request: Result<Request, RequestError>,
    old_name: bool,
}

/// A request on its way from a worker to the publisher: its reply encoded
/// both ways (none for a one-way request) and the keys to delete.
struct Answered {
    id: u64,
    reply: Option<(Vec<u8>, Vec<u8>)>,
    old_name: bool,
}

/// The reader's hand-off to the workers, as `src/handoff.rs` (crate-private,
/// so this is the same idea in short): a queue under a lock, bounded by the
/// pool's width, and a condition variable the idle workers sleep on; a push
/// wakes one only if one sleeps (a futex wake is a system call). Not a
/// crossbeam channel, for handoff.rs's reason: its blocking receive spins and
/// yields before it sleeps, and its wakers cost more system calls per job.
pub struct Lane<T> {
    state: Mutex<LaneState<T>>,
    /// Idle workers wait here.
    arrived: Condvar,
    /// The reader waits here while the lane is full.
    room: Condvar,
}

struct LaneState<T> {
    items: VecDeque<T>,
    width: usize,
    closed: bool,
    asleep: usize,
    /// Wakes sent and not yet taken up by a sleeper.
    waking: usize,
    /// Wake one worker at a time: a push wakes one only if none is on its way,
    /// and a worker that takes an item and leaves more wakes the next.
    chain: bool,
    pusher_waits: bool,
}

impl<T> Lane<T> {
    /// A lane holding at most `width` items.
    pub fn new(width: usize) -> Self {
        Self::with_wakes(width, false)
    }

    /// A lane holding at most `width` items, waking one sleeper at a time if
    /// `chain` (the default of `--threads`; see `--wake-per-job`).
    pub fn with_wakes(width: usize, chain: bool) -> Self {
        Lane {
            state: Mutex::new(LaneState {
                items: VecDeque::with_capacity(width),
                width: width.max(1),
                closed: false,
                asleep: 0,
                waking: 0,
                chain,
                pusher_waits: false,
            }),
            arrived: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LaneState<T>> {
        // Each change under the lock is one push, pop or flag.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `item`, waiting while the lane is full; gives it back once the lane
    /// is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut s = self.lock();
        while s.items.len() >= s.width && !s.closed {
            s.pusher_waits = true;
            s = self.room.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.pusher_waits = false;
        }
        if s.closed {
            return Err(item);
        }
        s.items.push_back(item);
        let wake = s.asleep > 0 && !(s.chain && s.waking > 0);
        if wake {
            s.waking += 1;
        }
        drop(s);
        if wake {
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// The next item, waiting for one; `None` once the lane is closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                let wake = s.pusher_waits;
                // With `chain`: more waits and nobody else is on the way.
                let next = s.chain && !s.items.is_empty() && s.asleep > 0 && s.waking == 0;
                if next {
                    s.waking += 1;
                }
                drop(s);
                if wake {
                    self.room.notify_one();
                }
                if next {
                    self.arrived.notify_one();
                }
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s.asleep += 1;
            s = self.arrived.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.asleep -= 1;
            s.waking = s.waking.saturating_sub(1);
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Nothing more will be pushed: the sleepers wake, and what waits is still
    /// popped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
        self.room.notify_all();
    }
}

/// The workers' end of the replies, as cerbas's `Outbox` (src/job.rs): a
/// crossbeam channel, plus a count the publisher sleeps on when nothing waits
/// (cerbas's `Backlog`: crossbeam's blocking receive spins and yields first),
/// so a worker sends a wake only when the publisher sleeps.
pub struct Outbox {
    tx: Sender<Answered>,
    bell: Arc<Bell>,
}

/// What waits for the publisher, counted; the publisher sleeps on it.
#[derive(Default)]
pub struct Bell {
    /// Sent and not yet taken, and whether the publisher sleeps.
    count: Mutex<(usize, bool)>,
    more: Condvar,
}

impl Outbox {
    fn send(&self, a: Answered) {
        {
            let mut c = self
                .bell
                .count
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.0 += 1;
            if std::mem::take(&mut c.1) {
                self.bell.more.notify_one();
            }
        }
        // The publisher is gone only after it failed: the reply is lost with it.
        let _ = self.tx.send(a);
    }
}

impl Bell {
    /// Waits up to `timeout` for something sent and not yet taken; says whether
    /// there is (it may still be on its way into the channel).
    fn wait_more(&self, timeout: Duration) -> bool {
        let mut c = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        if c.0 == 0 {
            c.1 = true;
            c = self
                .more
                .wait_timeout(c, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            c.1 = false;
        }
        c.0 > 0
    }

    fn taken(&self, n: usize) {
        let mut c = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        c.0 = c.0.saturating_sub(n);
    }
}

/// Ends the pool if a worker panics (a bug): the reader's next push fails
/// rather than waiting for workers that are gone.
struct PanicGuard<'a> {
    jobs: &'a Lane<Handed>,
    halt: &'a AtomicBool,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.halt.store(true, Ordering::Relaxed);
            self.jobs.close();
        }
    }
}

/// A worker: runs each job it pops (`tally`'s `INCR` on a connection of
/// `pool`, as cerbas lends one to a function) and sends the reply on.
fn work(
    keys: &Keys,
    jobs: &Lane<Handed>,
    pool: &ConnectionPool,
    outbox: Outbox,
    halt: &AtomicBool,
) {
    let _guard = PanicGuard { jobs, halt };
    while let Some(h) = jobs.pop() {
        let job = work_for(keys, h.id, h.request);
        let reply = match job.work {
            Work::Done(r) => r,
            Work::Incr(key) => {
                let n = pool
                    .get(Instant::now() + FUNCTION_TIMEOUT)
                    .and_then(|mut c| Ok(redis::cmd("INCR").arg(&key).query::<i64>(&mut *c)?));
                match n {
                    Ok(n) => Reply::Ok(json!(n)),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
        };
        outbox.send(Answered {
            id: h.id,
            reply: job.reply.then(|| (reply.to_json(), reply.to_msgpack())),
            old_name: h.old_name,
        });
    }
}

/// The publisher: gathers what the workers sent (waiting for the first, then
/// whatever else waits) and sends its `PUBLISH` ×2 per reply and one `DEL` of
/// the request keys in one write on its own connection. Ends once every worker
/// has gone and all is sent, or at its first Redis error.
fn publish_replies(
    c: &mut Connection,
    keys: &Keys,
    rx: &Receiver<Answered>,
    bell: &Bell,
    served: &mut u64,
) -> redis::RedisResult<()> {
    let mut batch = Vec::new();
    loop {
        let first = if bell.wait_more(Duration::from_secs_f64(POLL_SECS)) {
            rx.recv().ok()
        } else {
            match rx.try_recv() {
                Ok(a) => Some(a),
                Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => None,
            }
        };
        let Some(first) = first else {
            return Ok(());
        };
        batch.push(first);
        batch.extend(rx.try_iter());
        bell.taken(batch.len());
        let mut pipe = redis::pipe();
        let mut names = Vec::with_capacity(batch.len());
        for a in &batch {
            if let Some((json, msgpack)) = &a.reply {
                publish(&mut pipe, keys, a.id, json, msgpack);
            }
            names.push(keys.request(a.id));
            if a.old_name {
                names.push(keys.request_fallback(a.id));
            }
        }
        pipe.cmd("DEL").arg(names).ignore();
        pipe.query::<()>(c)?;
        *served += batch.len() as u64;
        batch.clear();
    }
}

/// The reader: takes as [`serve`] does, on its own connection, and hands each
/// request, parsed, to the workers. Stops when `stop` or `halt` is set, after
/// handing over what it took.
fn read(
    c: &mut Connection,
    keys: &Keys,
    args: &Args,
    jobs: &Lane<Handed>,
    stop: &AtomicBool,
    halt: &AtomicBool,
) -> redis::RedisResult<()> {
    let max_bytes = Config::default().max_request_bytes;
    let taker = Taker::new(c, keys, args.batch)?;
    while !stop.load(Ordering::Relaxed) && !halt.load(Ordering::Relaxed) {
        let batch = taker.take(c, keys, redis::pipe())?;
        for ((id, body), old_name) in batch.ids.into_iter().zip(batch.bodies).zip(batch.old_name) {
            let request = read_body(keys, id, body.as_deref(), max_bytes);
            let handed = Handed {
                id,
                request,
                old_name,
            };
            if jobs.push(handed).is_err() {
                // Every worker has gone (a panic): what was taken is lost, as
                // anything the floor holds when it dies.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Serves as [`serve`] does, in cerbas's thread shape (DESIGN §3): this thread
/// reads, `--workers` threads run the functions, one thread publishes; each
/// thread that talks to Redis has its own connection (the workers share a
/// pool of [`POOL_SIZE`]). Calls `ready` once its threads run. Stops when
/// `stop` is set, after the requests in hand are answered; `served` counts the
/// requests answered.
pub fn serve_threaded(
    client: &redis::Client,
    keys: &Keys,
    args: &Args,
    stop: &AtomicBool,
    served: &mut u64,
    ready: impl FnOnce(),
) -> redis::RedisResult<()> {
    let mut reader = cerbas::connection::open(client, READ_TIMEOUT)?;
    let mut publisher = cerbas::connection::open(client, READ_TIMEOUT)?;
    let pool = ConnectionPool::new(client.clone(), POOL_SIZE);
    let workers = args.workers.max(1);
    let jobs = Lane::with_wakes(workers, !args.wake_per_job);
    let bell = Arc::new(Bell::default());
    let (tx, rx) = crossbeam_channel::unbounded();
    let halt = AtomicBool::new(false);
    // Named, so that `perf stat --per-thread` tells the kinds apart (the reader
    // is the calling thread).
    std::thread::scope(|s| {
        let publisher = std::thread::Builder::new()
            .name("floor-publisher".into())
            .spawn_scoped(s, || {
                let mut n = 0;
                let r = publish_replies(&mut publisher, keys, &rx, &bell, &mut n);
                if r.is_err() {
                    halt.store(true, Ordering::Relaxed);
                }
                (n, r)
            })?;
        let mut pool_threads = Vec::with_capacity(workers);
        let mut not_spawned = None;
        for i in 0..workers {
            let outbox = Outbox {
                tx: tx.clone(),
                bell: bell.clone(),
            };
            let (jobs, pool, halt) = (&jobs, &pool, &halt);
            match std::thread::Builder::new()
                .name(format!("floor-worker-{i}"))
                .spawn_scoped(s, move || work(keys, jobs, pool, outbox, halt))
            {
                Ok(t) => pool_threads.push(t),
                Err(e) => {
                    not_spawned = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let read = match not_spawned {
            Some(e) => Err(e.into()),
            None => {
                ready();
                read(&mut reader, keys, args, &jobs, stop, &halt)
            }
        };
        // The workers finish what waits, then the publisher what they sent.
        jobs.close();
        let mut panicked = false;
        for t in pool_threads {
            panicked |= t.join().is_err();
        }
        let (n, published) = publisher
            .join()
            .unwrap_or_else(|_| (0, Err(panicked_error("publisher"))));
        *served += n;
        read.and(published).and(if panicked {
            Err(panicked_error("worker"))
        } else {
            Ok(())
        })
    })
}

fn panicked_error(who: &'static str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "a thread panicked",
        who.to_string(),
    ))
}

/// Keeps SIGINT and SIGTERM off this thread (ctrlc's own thread, started
/// before, still takes them): a signal would interrupt the blocked read, which
/// is not restarted on a socket with a timeout, and the loop would stop with an
/// error instead of at its next look at the flag.
fn block_stop_signals() {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use; the
    // calls only change this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn run(args: &Args) -> Result<u64, String> {
    let mut config = Config::default();
    config.apply_process_env().map_err(|e| e.to_string())?;
    config.redis_url = args.redis.clone();
    let url = config.connection_url().map_err(|e| e.to_string())?;
    let keys = Keys::new(&config.prefix, config.db());
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).map_err(|e| e.to_string())?;
    // Before any thread of ours starts: they inherit the mask.
    block_stop_signals();
    let ready = || {
        println!(
            "floor: ready, redis={} db={} queue={} pid={}{}",
            cerbas::config::redact_url(&url),
            keys.db(),
            keys.queue(),
            std::process::id(),
            if args.threads {
                format!(" (threads: reader, {} workers, publisher)", args.workers)
            } else if args.pipeline_functions {
                " (functions pipelined)".into()
            } else {
                String::new()
            }
        );
        let _ = std::io::stdout().flush();
    };
    let mut served = 0;
    let served_or = if args.threads {
        serve_threaded(&client, &keys, args, &stop, &mut served, ready)
    } else {
        let mut conn =
            cerbas::connection::open(&client, READ_TIMEOUT).map_err(|e| e.to_string())?;
        ready();
        serve(&mut conn, &keys, args, &stop, &mut served)
    };
    match served_or {
        Ok(()) => Ok(served),
        Err(_) if stop.load(Ordering::Relaxed) => Ok(served),
        Err(e) => Err(format!("redis: {e}")),
    }
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(served) => eprintln!("floor: stopped, {served} requests answered"),
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::exit(1);
        }
    }
}
