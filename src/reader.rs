//! The reader thread: takes request ids from the queue and hands jobs to the
//! workers. It takes only what its workers can start soon: each worker announces
//! on `ready` when it is free, and the reader takes that many ids, plus as many as
//! the pool has lately finished in [`AHEAD`] ([`Pace`]) but no more than it has
//! busy workers, so fast calls do not wait for the reader's round trip while a
//! pool busy with slow calls hoards nothing (nor does an idle pool, whose next
//! calls may be slow ones, after a burst of fast ones).
//! It waits for a free worker (or, with every worker busy, for one to finish)
//! before it asks Redis for anything. Everything
//! else waits in Redis for whichever instance is free, and a request's deadline
//! starts only when a worker picks it.
//! One script ([`TAKE`]) moves the ids from the queue to this instance's
//! processing list, and only while this instance's heartbeat is alive in Redis: an
//! instance that was silent past its heartbeat (another instance may have returned
//! its requests to the queue and forgotten it) registers again before it takes
//! more, so nothing lands in a processing list nobody would recover. When the
//! queue is empty the reader waits on it with a `BLMOVE` of the queue onto itself,
//! which takes nothing, with the next take in the same write (Redis runs it as
//! the wait ends). The take also reads the first body, so an idle server answers
//! in one round trip of its own, and the next while all fit in [`TAKE_BYTES`];
//! of the others it learns the sizes, and they come with a pipeline of
//! `GETRANGE`s, a few MiB a round trip, each no longer than the size the take
//! saw (a body changed since is read again by [`FETCH`]). A body over `max_request_bytes` is refused from its size, never
//! downloaded. Ids found in the processing list after a reconnect are read with
//! one more script ([`FETCH`]).
//! It stops taking as soon as shutdown is triggered; what it took but did not hand
//! over is still in the processing list, which the publisher returns to the queue.
//! Ids it holds are counted in [`InHand`] until the publisher acks them; after
//! every reconnect (or a failure after a take) the reader compares the processing
//! list with that count and serves the ids whose replies were lost on the way.
//! A command Redis refuses (`MISCONF`, a wrong-typed queue) keeps the connection
//! and is retried with back-off (`Connector::refused`).
//! Not for: parsing beyond the protocol (`protocol.rs`) or running requests.

use crate::connection::{Connector, Failure};
use crate::error::RequestError;
use crate::handoff::NotHanded;
use crate::job::{Backlog, InHand, Job, Paused, ReplyTo, Stats, Unanswered};
use crate::protocol::{describe_entry, parse_queue_entry, parse_request, Keys};
use crate::resp::{Mark, Packed};
use crate::shutdown::Shutdown;
use crossbeam_channel::{select, Receiver};
use redis::{Connection, RedisResult, Value};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one wait on the queue blocks; bounds how late the reader notices
/// shutdown. The socket's read timeout must stay well above it (DESIGN §8).
pub(crate) const BLOCK: Duration = Duration::from_millis(500);

/// How much work the reader takes beyond its free workers: what the pool has
/// lately finished in this long. A request taken ahead waits about this long for
/// a worker; when calls are slow, almost nothing is taken ahead.
pub(crate) const AHEAD: Duration = Duration::from_millis(5);

/// How far back [`Pace`] looks (the time constant of its decay).
const PACE_MEMORY: Duration = Duration::from_millis(200);

/// How many calls a second the pool has finished lately: a count of finished
/// calls that decays exponentially with [`PACE_MEMORY`]. Pure, to be tested
/// with made-up instants.
#[derive(Debug)]
struct Pace {
    count: f64,
    at: Instant,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Pace {
            count: 0.0,
            at: now,
        }
    }

    fn decay(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.count *= (-dt / PACE_MEMORY.as_secs_f64()).exp();
        self.at = self.at.max(now);
    }

    /// `n` calls finished at `now`.
    fn finished(&mut self, n: usize, now: Instant) {
        self.decay(now);
        self.count += n as f64;
    }

    /// How many requests to take beyond the free workers: the calls the pool
    /// finishes in [`AHEAD`] at its recent pace, at most `most`.
    fn ahead(&mut self, now: Instant, most: usize) -> i64 {
        self.decay(now);
        let per_second = self.count / PACE_MEMORY.as_secs_f64();
        (per_second * AHEAD.as_secs_f64()).min(most as f64) as i64
    }
}

/// Most bytes of bodies a take reads, the first counted (which comes whole
/// whatever its size, up to `max_request_bytes`); the others come with
/// `GETRANGE`s.
const TAKE_BYTES: usize = 64 << 10;

/// Most bytes of bodies one [`FETCH`] brings back (a single body up to
/// `max_request_bytes` always comes, even when it is larger).
const FETCH_BYTES: usize = 4 << 20;

/// A body larger than this replaces the reader's connection once its batch is
/// handed over: redis-rs keeps a connection's read buffer at the size of the
/// largest answer it read, so one 40 MiB body kept 40 MiB resident for the
/// life of the process. A reconnect (and the usual check of the processing
/// list after it) per such body costs nothing next to reading it.
const KEEP_READ_BYTES: usize = 4 << 20;

/// The Lua function both scripts use to learn about one request's body: its key,
/// then the fallback key (`P-REQUEST-…`, read only where `P-REQ-…` is missing).
/// Answers three values, `code, x, y`: `0` missing, `1, body`, `2, size` too
/// large (not sent), `3, key, error` not a string, `4, fallback, size` there and
/// not read (when `room` is nil; `fallback` 1 if the body is under the fallback
/// key), or, when the body would not fit in `room`, a nil code and `which, size`
/// as code 4's; then the bytes it read. Values, not a table: the scripts answer flat lists, since a table per
/// request in a script's answer cost Redis 3-4 µs more per request than the
/// commands themselves (measured: a take of 25 ids, 7.2 µs per id nested, 1.3-2.7
/// flat).
const READ_BODY: &str = r"
local function read_body(key, fallback, max, room)
  local which = 0
  local n = redis.pcall('STRLEN', key)
  if n == 0 and redis.call('EXISTS', key) == 0 then
    key = fallback
    which = 1
    n = redis.pcall('STRLEN', key)
    if n == 0 and redis.call('EXISTS', key) == 0 then return 0, 0, 0, 0 end
  end
  if type(n) == 'table' then return 3, key, n.err, 0 end
  if n > max then return 2, n, 0, 0 end
  if room == nil then return 4, which, n, 0 end
  if n > room then return nil, which, n, 0 end
  return 1, redis.call('GET', key), 0, n
end
";

/// KEYS: queue, processing, heartbeat and pause key (of this instance). ARGV:
/// most ids to take, largest body, request key prefix, fallback key prefix, bytes
/// of bodies to read ([`TAKE_BYTES`]).
/// Moves up to ARGV[1] ids from the queue to the processing list in one step,
/// stopping at the first empty pop, but only while the heartbeat exists: `RECOVER`
/// (scheduler.rs) empties a processing list only once its heartbeat is gone, so
/// what is taken here is recovered if this instance dies. Nil without heartbeat;
/// 0 while the dashboard has paused this instance (checked here, so that a take
/// sent before the pause, waiting in Redis behind the wait, takes nothing).
/// Each id comes back as four values in one flat list, `entry, code, x, y` (`code,
/// x, y` as of `read_body`, code -1 for an entry that is no id): the first
/// with its body (up to the largest), so an idle server answers a request in one
/// round trip (the wait and this, in one write), the next with theirs while all
/// fit in ARGV[5] bytes, the rest with their sizes only: a body that passes
/// through Lua costs Redis more than the `GETRANGE` the reader then sends, but
/// that is a second round trip, which costs the reader far more (a few ids per
/// take, as under steady load, come whole). The key of
/// id `n` is the prefix and `n` padded with zeros to ten digits, as
/// `Keys::request` names it (`protocol::parse_queue_entry` says what is an id).
const TAKE: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local max = tonumber(ARGV[2])
local room = tonumber(ARGV[5])
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not v then break end
  local code, x, y, n = -1, 0, 0, 0
  local entry = v
  if #v <= 20 and (v == '0' or string.find(v, '^[1-9]%d*$')) then
    if #v < 10 then v = string.rep('0', 10 - #v) .. v end
    local fits = room
    if i == 1 then fits = max elseif room <= 0 then fits = nil end
    code, x, y, n = read_body(ARGV[3] .. v, ARGV[4] .. v, max, fits)
    -- Too big for what is left: its size only (the first always fits).
    if not code then code = 4 end
    room = room - n
  end
  out[#out + 1] = entry
  out[#out + 1] = code
  out[#out + 1] = x
  out[#out + 1] = y
end
return out
";

/// KEYS: for each request, its key and its fallback key. ARGV: largest body, byte
/// budget. The answers of `read_body` for the requests in order, three values
/// each in one flat list, until the budget is spent (at least one).
const FETCH: &str = r"
local out = {}
local max = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local spent = 0
for i = 1, #KEYS, 2 do
  local room = budget - spent
  if #out == 0 then room = max end
  local code, x, y, n = read_body(KEYS[i], KEYS[i + 1], max, room)
  if not code then break end
  spent = spent + n
  out[#out + 1] = code
  out[#out + 1] = x
  out[#out + 1] = y
end
return out
";

/// The entries of a processing list (`listed`) that this instance does not know
/// it holds (`known`, from [`InHand`]), counting repeats: an id listed twice and
/// known once is lost once.
fn lost_entries(listed: Vec<Vec<u8>>, mut known: HashMap<u64, usize>) -> Vec<Vec<u8>> {
    listed
        .into_iter()
        .filter(
            |e| match parse_queue_entry(e).and_then(|id| known.get_mut(&id)) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            },
        )
        .collect()
}

/// The ids this instance knows it holds (`known`, from [`InHand`]) that the
/// processing list (`listed`) does not list, counting repeats: takes whose
/// request Redis no longer has here.
fn orphans(listed: &[Vec<u8>], mut known: HashMap<u64, usize>) -> Vec<u64> {
    for id in listed.iter().filter_map(|e| parse_queue_entry(e)) {
        if let Some(n) = known.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
    }
    known
        .into_iter()
        .flat_map(|(id, n)| std::iter::repeat_n(id, n))
        .collect()
}

/// One request's answer from `read_body` ([`TAKE`], [`FETCH`]).
#[derive(Debug, PartialEq)]
enum Fetched {
    Missing,
    Body(Vec<u8>),
    TooLarge(usize),
    WrongType {
        key: String,
        error: String,
    },
    /// There, `size` bytes, not read yet; under the fallback key if `fallback`.
    Sized {
        fallback: bool,
        size: usize,
    },
}

impl Fetched {
    fn decode(v: Value) -> Option<Fetched> {
        let Value::Array(parts) = v else {
            return None;
        };
        let mut parts = parts.into_iter();
        let Some(Value::Int(code)) = parts.next() else {
            return None;
        };
        let mut text = || match parts.next()? {
            Value::BulkString(b) => Some(b),
            _ => None,
        };
        match code {
            0 => Some(Fetched::Missing),
            1 => text().map(Fetched::Body),
            2 => match parts.next()? {
                Value::Int(n) => usize::try_from(n).ok().map(Fetched::TooLarge),
                _ => None,
            },
            3 => {
                let key = String::from_utf8_lossy(&text()?).into_owned();
                let error = String::from_utf8_lossy(&text()?).into_owned();
                Some(Fetched::WrongType { key, error })
            }
            4 => match (parts.next()?, parts.next()?) {
                (Value::Int(which), Value::Int(n)) => Some(Fetched::Sized {
                    fallback: which == 1,
                    size: usize::try_from(n).ok()?,
                }),
                _ => None,
            },
            _ => None,
        }
    }
}

/// One id [`TAKE`] moved to the processing list: the queue entry, and the answer
/// for its body when the script read it.
/// What [`TAKE`] answered.
enum TakeAnswer {
    /// This instance's heartbeat had lapsed: nothing taken.
    Lapsed,
    /// The dashboard paused this instance: nothing taken.
    Paused,
    Taken(Vec<Value>),
    /// Not an answer `TAKE` gives.
    Odd,
}

impl From<Value> for TakeAnswer {
    fn from(v: Value) -> Self {
        match v {
            Value::Nil => TakeAnswer::Lapsed,
            Value::Int(0) => TakeAnswer::Paused,
            Value::Array(taken) => TakeAnswer::Taken(taken),
            _ => TakeAnswer::Odd,
        }
    }
}

struct Taken {
    entry: Vec<u8>,
    answer: Option<Value>,
}

impl Taken {
    /// [`TAKE`]'s flat answer: four values per id, `entry, code, x, y`; the
    /// answer as one array (`code, x, y`, as [`Fetched::decode`] reads it), none
    /// for an entry that is no id (code -1).
    fn decode_all(flat: Vec<Value>) -> Option<Vec<Taken>> {
        if !flat.len().is_multiple_of(4) {
            return None;
        }
        let mut values = flat.into_iter();
        let mut taken = Vec::with_capacity(values.len() / 4);
        while let (Some(entry), Some(code), Some(x), Some(y)) =
            (values.next(), values.next(), values.next(), values.next())
        {
            let Value::BulkString(entry) = entry else {
                return None;
            };
            let answer = match code {
                Value::Int(-1) => None,
                code => Some(Value::Array(vec![code, x, y])),
            };
            taken.push(Taken { entry, answer });
        }
        Some(taken)
    }
}

/// What the reader knows of the pool: workers free for a job (below zero after
/// taking ahead, or after handing over requests found in the processing list,
/// which were taken before) and how fast they finish.
struct Workers {
    free: i64,
    pace: Pace,
    /// The pool's width: never more than this taken ahead.
    width: usize,
    /// Whether a worker has finished since the last take: with none free, the
    /// reader takes ahead only then (its workers are turning over now, not only
    /// by the pace of a while ago).
    turned_over: bool,
}

impl Workers {
    /// `n` workers said they are free.
    fn freed(&mut self, n: usize) {
        if n > 0 {
            self.free += n as i64;
            self.pace.finished(n, Instant::now());
            self.turned_over = true;
        }
    }

    /// How many requests to take now (0: none yet): one per free worker, and
    /// ahead only for the busy ones, which the pace says finish soon. An idle
    /// pool takes nothing ahead: the requests it takes next may be slow ones, and
    /// what it took ahead would wait behind them while another instance is idle.
    /// With no worker free, it takes only once a worker has finished since the
    /// last take (the pace of a burst that has just ended must not take fast
    /// requests ahead for workers now stuck in slow calls), and once what waits
    /// for a worker has fallen to half the lead: a take of one or two ids would
    /// cost a round trip each.
    fn wanted(&mut self) -> i64 {
        self.wanted_at(Instant::now())
    }

    fn wanted_at(&mut self, now: Instant) -> i64 {
        if self.free <= 0 && !self.turned_over {
            return 0;
        }
        let busy = usize::try_from(self.width as i64 - self.free.max(0)).unwrap_or(0);
        wanted(self.free, self.pace.ahead(now, busy.min(self.width)))
    }
}

/// [`Workers::wanted`] for `free` workers and a lead of `ahead`.
fn wanted(free: i64, ahead: i64) -> i64 {
    let want = free + ahead;
    if free > 0 || (ahead > 0 && 2 * want >= ahead) {
        want
    } else {
        0
    }
}

/// Settings of the reader thread.
pub(crate) struct Reader {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) processing: String,
    pub(crate) max_request_bytes: usize,
    pub(crate) jobs: crate::handoff::ReaderLane,
    /// One message per worker that has become free (pool.rs).
    pub(crate) ready: Receiver<()>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) shutdown: Shutdown,
    pub(crate) in_hand: InHand,
    pub(crate) unanswered: Unanswered,
    /// Replies waiting for the publisher: no taking while it is full.
    pub(crate) backlog: Arc<Backlog>,
    /// Set by the dashboard's pause: no taking while it is.
    pub(crate) paused: Paused,
    /// A body over [`KEEP_READ_BYTES`] was read since the last step.
    pub(crate) read_large: Cell<bool>,
}

/// Starts the reader thread.
pub(crate) fn start(r: Reader) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-reader".into())
        .spawn(move || r.run())
}

/// The scripts the reader runs.
struct Scripts {
    take: redis::Script,
    fetch: redis::Script,
}

/// The pipeline of every take, packed once but for its last arguments: the
/// wait on the queue, then the take script with everything it is told but
/// how many to take (see [`Reader::take`]).
struct TakeCommand {
    packed: Packed,
    /// Where the arguments that follow the script's keys start.
    head: Mark,
}

impl TakeCommand {
    fn new(r: &Reader, scripts: &Scripts) -> Self {
        let queue = r.keys.queue();
        let mut packed = Packed::default();
        packed
            .command(6)
            .arg("BLMOVE")
            .arg(&queue)
            .arg(&queue)
            .arg("LEFT")
            .arg("LEFT")
            .float(BLOCK.as_secs_f64());
        packed
            .command(12)
            .arg("EVALSHA")
            .arg(scripts.take.get_hash())
            .uint(4)
            .arg(&queue)
            .arg(&r.processing)
            .arg(r.keys.heartbeat(&r.instance))
            .arg(r.keys.paused(&r.instance));
        let head = packed.mark();
        TakeCommand { packed, head }
    }

    /// The pipeline of a take of at most `wanted` requests.
    fn of(&mut self, wanted: i64, max_request_bytes: usize, keys: &Keys) -> &Packed {
        let prefixes = keys.id_prefixes();
        self.packed.back_to(self.head);
        self.packed
            .int(wanted)
            .uint(max_request_bytes as u64)
            .arg(prefixes.request)
            .arg(prefixes.fallback)
            .uint(TAKE_BYTES as u64);
        &self.packed
    }
}

impl Reader {
    fn run(mut self) {
        let scripts = Scripts {
            take: redis::Script::new(&format!("{READ_BODY}{TAKE}")),
            fetch: redis::Script::new(&format!("{READ_BODY}{FETCH}")),
        };
        let mut take_command = TakeCommand::new(&self, &scripts);
        let mut conn: Option<Connection> = None;
        // Whether everything in the processing list is known to be in hand: false
        // after a reconnect, or after a failure between a take and its hand-over.
        let mut synced = false;
        // Workers announce on `ready`; `hand_over` spends them.
        let mut workers = Workers {
            free: 0,
            pace: Pace::new(Instant::now()),
            width: self.jobs.width(),
            turned_over: false,
        };
        while !self.shutdown.is_triggered() {
            // Paused from the dashboard: take nothing new (what is held is served).
            if synced && self.paused.is_set() {
                self.shutdown.wait_timeout(Duration::from_millis(100));
                continue;
            }
            if synced && workers.wanted() <= 0 {
                self.wait_for_workers(&mut workers);
                continue;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connector.connect(&self.shutdown) {
                    Some(c) => {
                        synced = false;
                        conn.insert(c)
                    }
                    None => break,
                },
            };
            // While the publisher is behind, requests wait in Redis.
            if synced && !self.backlog.wait_room(BLOCK) {
                continue;
            }
            let taking = synced;
            let step = if synced {
                self.take(c, &scripts, &mut take_command, &mut workers, &mut synced)
            } else {
                self.recover_lost(c, &scripts, &mut workers)
                    .inspect(|_| synced = true)
            };
            match step {
                // Only a take ends a spell of refusals: a refused take leaves
                // the reader unsynced, and the recovery that follows (heartbeat,
                // processing list) goes through while the queue alone is refused
                // (a client SET it to a string): ending the spell there logged
                // it twice and reset its back-off on every try.
                Ok(true) if taking => {
                    self.connector.recovered();
                    if self.read_large.take() {
                        conn = None;
                    }
                }
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => match self.connector.failed(&e) {
                    Failure::Lost => conn = None,
                    // Redis answers but refuses (a wrong-typed queue, MISCONF):
                    // same connection, after a pause that grows while it lasts.
                    Failure::Refused(pause) => {
                        self.shutdown.wait_timeout(pause);
                    }
                },
            }
        }
    }

    /// Waits (up to [`BLOCK`], or shutdown) until a worker says it is free.
    fn wait_for_workers(&self, workers: &mut Workers) {
        select! {
            recv(self.ready) -> msg => match msg {
                Ok(()) => workers.freed(1),
                // Every worker has gone: only shutdown is left to wait for.
                Err(_) => {
                    self.shutdown.wait_timeout(BLOCK);
                }
            },
            recv(self.shutdown.receiver()) -> _ => {}
            default(BLOCK) => {}
        }
    }

    /// Takes the requests `workers` wants and hands them over; when the queue is empty,
    /// waits up to [`BLOCK`] for it to fill. False once shutdown stops it.
    fn take(
        &self,
        c: &mut Connection,
        scripts: &Scripts,
        command: &mut TakeCommand,
        workers: &mut Workers,
        synced: &mut bool,
    ) -> RedisResult<bool> {
        workers.freed(self.ready.try_iter().count());
        let wanted = workers.wanted();
        workers.turned_over = false;
        // The take waits behind a wait for the queue to fill, in one write: a
        // wait on a queue that has entries returns at once, and on an empty one
        // it blocks until the first arrives, then Redis runs the take at once.
        // So a take costs one round trip whether the queue is full or empty (a
        // take sent first on its own cost an idle server a second round trip per
        // request). The wait moves the queue's first entry onto its own head,
        // which changes nothing. The first, not the last: the wait answers the
        // entry it moved, and the first is the one the take takes next (each
        // entry is downloaded by a wait at most once), where the last stays the
        // last for the whole queue, and a big bogus entry there (anyone can push
        // one) came down with every take.
        // Read one at a time (`query_packed`): a stall costs one read timeout. A
        // lost connection ends the step at once (the take's answer is unknown:
        // the next step compares the processing list with `InHand`); a wait
        // Redis ended with an error (`CLIENT UNBLOCK … ERROR`, a failover, a
        // refused write) still has its take's answer read, since the take runs
        // all the same.
        let pipe = command.of(wanted, self.max_request_bytes, &self.keys);
        let answers = crate::connection::query_packed(c, pipe)?;
        let taken = match answers.into_iter().nth(1) {
            Some(Ok(v)) => TakeAnswer::from(v),
            // A new connection's Redis, or someone flushed the scripts: load it
            // for the next step.
            Some(Err(e)) if e.code() == Some("NOSCRIPT") => {
                scripts.take.prepare_invoke().load(c)?;
                return Ok(true);
            }
            Some(Err(e)) => {
                *synced = false;
                return Err(e);
            }
            None => {
                *synced = false;
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "no answer from the take script",
                )));
            }
        };
        match taken {
            TakeAnswer::Paused => {
                // Paused from another instance's page: stop at once rather than
                // at this instance's next snapshot, which would clear it again
                // if resumed.
                if !self.paused.is_set() {
                    log::info!("paused from the dashboard: this instance takes no requests");
                    self.paused.set(true);
                }
                Ok(true)
            }
            TakeAnswer::Odd => Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected answer from the take script",
            ))),
            TakeAnswer::Lapsed => {
                crate::scheduler::beat(c, &self.keys, &self.instance)?;
                log::warn!(
                    "this instance's heartbeat had lapsed (silent for over {:?}); another \
                     instance may have returned its requests to the queue. Registered again \
                     before taking more",
                    crate::scheduler::HEARTBEAT_TTL
                );
                Ok(true)
            }
            TakeAnswer::Taken(taken) if taken.is_empty() => Ok(true),
            TakeAnswer::Taken(taken) => {
                // Until all are handed over, a failure leaves some in the list
                // unserved: the next step compares the list with `InHand`.
                *synced = false;
                let taken = Taken::decode_all(taken).ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected answer from the take script",
                    ))
                })?;
                let going = self.serve(c, scripts, taken, workers)?;
                *synced = true;
                Ok(going)
            }
        }
    }

    /// Serves the ids in the processing list that this instance does not know it
    /// holds: a reply that would have handed them over was lost (a broken
    /// connection, a failure after a take). False once shutdown stops it.
    fn recover_lost(
        &self,
        c: &mut Connection,
        scripts: &Scripts,
        workers: &mut Workers,
    ) -> RedisResult<bool> {
        crate::scheduler::beat(c, &self.keys, &self.instance)?;
        // Snapshot first: the publisher only removes an id after its ack is in
        // Redis, so an id held more often in the list than in the snapshot is lost.
        let known = self.in_hand.snapshot();
        let listed: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&self.processing)
            .arg(0)
            .arg(-1)
            .query(c)?;
        let orphans = orphans(&listed, known.clone());
        if !orphans.is_empty() {
            let n = self.in_hand.orphaned(orphans);
            if n > 0 {
                log::warn!(
                    "{n} requests in hand are no longer in {} (redis restarted without them, or \
                     another instance recovered them): their replies will not be published",
                    self.processing
                );
            }
        }
        let lost = lost_entries(listed, known);
        if !lost.is_empty() {
            log::warn!(
                "serving {} requests taken before the connection broke",
                lost.len()
            );
        }
        let lost = lost
            .into_iter()
            .map(|entry| Taken {
                entry,
                answer: None,
            })
            .collect();
        self.serve(c, scripts, lost, workers)
    }

    /// Hands over the jobs of `taken` (already in the processing list), fetching
    /// the bodies the take did not read a few MiB at a time. False once shutdown
    /// stops it.
    fn serve(
        &self,
        c: &mut Connection,
        scripts: &Scripts,
        taken: Vec<Taken>,
        workers: &mut Workers,
    ) -> RedisResult<bool> {
        let mut read = Vec::with_capacity(taken.len());
        let mut sized = Vec::new();
        let mut unread = Vec::new();
        let mut bad = Vec::new();
        for t in taken {
            let Some(id) = parse_queue_entry(&t.entry) else {
                bad.push(t.entry);
                continue;
            };
            match t.answer.map(Fetched::decode) {
                None => unread.push(id),
                Some(Some(Fetched::Sized { fallback, size })) => sized.push((id, fallback, size)),
                Some(answer) => read.push((id, answer)),
            }
        }
        if !bad.is_empty() {
            self.drop_bad_entries(c, bad)?;
        }
        if !read.is_empty() {
            self.in_hand.add(read.iter().map(|(id, _)| *id));
            let jobs = read.into_iter().map(|(id, a)| self.job(id, a)).collect();
            if !self.hand_over(jobs, workers) {
                return Ok(false);
            }
        }
        let mut rest = &sized[..];
        while !rest.is_empty() {
            // A few MiB a round trip (at least one body).
            let mut spent = 0;
            let lot = rest
                .iter()
                .take_while(|(_, _, size)| {
                    spent += size;
                    spent == *size || spent <= FETCH_BYTES
                })
                .count();
            let (lot, left) = rest.split_at(lot);
            rest = left;
            let keys: Vec<String> = lot
                .iter()
                .map(|(id, fallback, _)| match fallback {
                    false => self.keys.request(*id),
                    true => self.keys.request_fallback(*id),
                })
                .collect();
            // At most one byte more than the take saw: a body overwritten since
            // (with a value of any size), deleted or retyped is not downloaded
            // here but read again by `FETCH`, which refuses one too large from
            // its size. (`MGET` brought whatever the key held by then.)
            let mut pipe = redis::pipe();
            for (key, (_, _, size)) in keys.iter().zip(lot) {
                pipe.cmd("GETRANGE").arg(key).arg(0).arg(*size);
            }
            // One read timeout for a stall, not one per body (`query_each`).
            let bodies: Vec<RedisResult<Vec<u8>>> = crate::connection::query_each(c, &pipe)?
                .into_iter()
                .map(|b| b.and_then(|v| redis::from_redis_value(v).map_err(Into::into)))
                .collect();
            let mut jobs = Vec::with_capacity(lot.len());
            let mut ids = Vec::with_capacity(lot.len());
            for ((id, _, size), body) in lot.iter().zip(bodies) {
                match body {
                    // (An empty answer is also that of a deleted key.)
                    Ok(b) if b.len() == *size && !b.is_empty() => {
                        ids.push(*id);
                        jobs.push(self.job(*id, Some(Fetched::Body(b))));
                    }
                    _ => unread.push(*id),
                }
            }
            self.in_hand.add(ids);
            if !self.hand_over(jobs, workers) {
                return Ok(false);
            }
        }
        let mut rest = &unread[..];
        while !rest.is_empty() {
            let jobs = self.fetch(c, &scripts.fetch, rest)?;
            let (done, left) = rest.split_at(jobs.len().min(rest.len()));
            self.in_hand.add(done.iter().copied());
            rest = left;
            if !self.hand_over(jobs, workers) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The jobs of the first of `ids` whose bodies fit in one [`FETCH`] (at least one).
    fn fetch(
        &self,
        c: &mut Connection,
        fetch: &redis::Script,
        ids: &[u64],
    ) -> RedisResult<Vec<Job>> {
        let mut call = fetch.prepare_invoke();
        for id in ids {
            call.key(self.keys.request(*id))
                .key(self.keys.request_fallback(*id));
        }
        call.arg(self.max_request_bytes).arg(FETCH_BYTES);
        let answers: Vec<Value> = call.invoke(c)?;
        // Three values per request (`read_body`'s code, x, y).
        let mut values = answers.into_iter();
        let mut jobs = Vec::new();
        for id in ids {
            let (Some(code), Some(x), Some(y)) = (values.next(), values.next(), values.next())
            else {
                break;
            };
            jobs.push(self.job(*id, Fetched::decode(Value::Array(vec![code, x, y]))));
        }
        Ok(jobs)
    }

    fn job(&self, id: u64, answer: Option<Fetched>) -> Job {
        Job {
            reply_to: ReplyTo::Redis {
                id,
                epoch: self.in_hand.epoch(),
            },
            body: self.body(id, answer),
            waited: false,
        }
    }

    fn body(
        &self,
        id: u64,
        answer: Option<Fetched>,
    ) -> Result<crate::protocol::Request, RequestError> {
        match answer {
            Some(Fetched::Body(b)) => {
                if b.len() > KEEP_READ_BYTES {
                    self.read_large.set(true);
                }
                parse_request(&b, self.max_request_bytes)
            }
            Some(Fetched::Missing) => Err(RequestError::NotFound(self.keys.request(id))),
            Some(Fetched::TooLarge(size)) => Err(RequestError::TooLarge {
                size,
                limit: self.max_request_bytes,
            }),
            Some(Fetched::WrongType { key, error }) => Err(RequestError::Unreadable(key, error)),
            // `FETCH` reads every body it answers for.
            Some(Fetched::Sized { .. }) | None => Err(RequestError::Unreadable(
                self.keys.request(id),
                "unexpected answer from redis".into(),
            )),
        }
    }

    /// Logs, counts and removes queue entries that are not request ids.
    fn drop_bad_entries(&self, c: &mut Connection, bad: Vec<Vec<u8>>) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for entry in bad {
            self.stats.bad_entries.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "skipped a queue entry that is not a request id: {}",
                describe_entry(&entry)
            );
            pipe.cmd("LREM")
                .arg(&self.processing)
                .arg(1)
                .arg(entry)
                .ignore();
        }
        pipe.query(c)
    }

    /// Hands jobs to the workers, each spending one free worker; false once
    /// shutdown stops it.
    fn hand_over(&self, jobs: Vec<Job>, workers: &mut Workers) -> bool {
        for mut job in jobs {
            // Counted before the send: the worker may answer before it returns.
            self.unanswered.add(1);
            loop {
                if self.shutdown.is_triggered() {
                    self.unanswered.done(1);
                    return false;
                }
                match self.jobs.send_timeout(job, Duration::from_millis(100)) {
                    Ok(()) => {
                        workers.free -= 1;
                        break;
                    }
                    Err(NotHanded::Full(j)) => job = *j,
                    Err(NotHanded::Closed) => {
                        self.unanswered.done(1);
                        return false;
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ids: &[&str]) -> Vec<Vec<u8>> {
        ids.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    /// Issue 7, item 11a: id 7 is taken, released (a `delay` request) and taken
    /// again before the ack of its first take is removed from `InHand`. A set
    /// forgot the second take there, and a reconnect served it once more.
    #[test]
    fn the_ack_of_a_first_take_leaves_a_second_take_in_hand() {
        let in_hand = InHand::default();
        in_hand.add([7]);
        in_hand.add([7]);
        in_hand.remove([7]);
        // The processing list now holds 7 once: the second take, still running.
        assert!(lost_entries(entries(&["7"]), in_hand.snapshot()).is_empty());
        in_hand.remove([7]);
        assert!(in_hand.snapshot().is_empty(), "no count is left behind");
        assert_eq!(
            lost_entries(entries(&["7"]), in_hand.snapshot()),
            entries(&["7"])
        );
        // Removing what is not held changes nothing.
        in_hand.remove([8]);
        assert!(in_hand.snapshot().is_empty());
    }

    #[test]
    fn the_pace_takes_ahead_what_the_pool_finishes_in_a_few_ms() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut pace = Pace::new(t0);
        assert_eq!(pace.ahead(t0, 100), 0, "nothing finished: nothing ahead");
        // 10,000 calls a second for a second: about 50 in 5 ms.
        for i in 1..=1000 {
            pace.finished(10, ms(i));
        }
        let ahead = pace.ahead(ms(1000), 100);
        assert!((45..=50).contains(&ahead), "{ahead}");
        assert_eq!(pace.ahead(ms(1000), 20), 20, "never beyond the pool");
        // The pool stalls (slow calls): after a second, nothing is taken ahead.
        assert_eq!(pace.ahead(ms(2000), 100), 0);
        // A few slow calls a second are never worth taking ahead.
        let mut slow = Pace::new(t0);
        for i in 1..=20 {
            slow.finished(1, ms(i * 100));
        }
        assert_eq!(slow.ahead(ms(2000), 100), 0);
    }

    /// The attack of `take_ahead_after_a_burst_does_not_hoard_behind_slow_calls`
    /// (tests/hardening_intake.rs): after a burst of fast calls, an idle pool
    /// took ahead as many again as it had workers, behind whatever came next.
    #[test]
    fn the_take_says_lapsed_paused_or_what_it_took() {
        assert!(matches!(TakeAnswer::from(Value::Nil), TakeAnswer::Lapsed));
        assert!(matches!(
            TakeAnswer::from(Value::Int(0)),
            TakeAnswer::Paused
        ));
        assert!(matches!(
            TakeAnswer::from(Value::Array(vec![])),
            TakeAnswer::Taken(t) if t.is_empty()
        ));
        assert!(matches!(TakeAnswer::from(Value::Int(3)), TakeAnswer::Odd));
    }

    #[test]
    fn only_busy_workers_are_taken_ahead_for() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut workers = Workers {
            free: 0,
            pace: Pace::new(t0),
            width: 4,
            turned_over: true,
        };
        // A fast pool: 10,000 calls a second.
        for i in 1..=200 {
            workers.pace.finished(10, ms(i));
        }
        workers.free = 4;
        assert_eq!(workers.wanted_at(ms(200)), 4, "all idle: nothing ahead");
        workers.free = 1;
        assert_eq!(workers.wanted_at(ms(200)), 4, "three busy: three ahead");
        workers.free = -2;
        assert_eq!(
            workers.wanted_at(ms(200)),
            2,
            "already ahead: up to the width"
        );
        // Right after a take, with every worker busy (in slow calls, maybe),
        // nothing more is taken until one of them finishes.
        workers.turned_over = false;
        workers.free = 0;
        assert_eq!(workers.wanted_at(ms(200)), 0, "nobody finished: wait");
        workers.freed(1);
        assert_eq!(workers.wanted_at(ms(200)), 4, "one finished: take again");
    }

    #[test]
    fn the_lead_is_refilled_at_half_and_free_workers_always_get_work() {
        assert_eq!(wanted(0, 0), 0, "nothing free, no pace: wait");
        assert_eq!(wanted(3, 0), 3);
        assert_eq!(wanted(3, 40), 43);
        assert_eq!(wanted(-10, 40), 30, "a quarter of the lead left: refill");
        assert_eq!(wanted(-20, 40), 20, "half left: refill");
        assert_eq!(wanted(-21, 40), 0, "over half left: wait");
        assert_eq!(wanted(-5, 0), 0);
    }

    #[test]
    fn the_pace_ignores_instants_out_of_order() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0 + Duration::from_millis(10));
        pace.finished(1000, t0);
        assert_eq!(pace.ahead(t0, 100), 25, "no decay backwards in time");
    }

    #[test]
    fn orphans_are_held_ids_the_list_no_longer_has() {
        let known = HashMap::from([(7, 2), (9, 1), (5, 1)]);
        let mut got = orphans(&entries(&["7", "9", "x", "3"]), known);
        got.sort();
        assert_eq!(got, [5, 7]);
        // An orphan's reply is told from a later take of the same id.
        let in_hand = InHand::default();
        in_hand.add([5]);
        in_hand.orphaned([5]);
        let later = in_hand.epoch();
        in_hand.add([5]);
        assert!(!in_hand.is_orphan(5, later), "the new take is no orphan");
        assert!(in_hand.is_orphan(5, later - 1));
        assert!(!in_hand.is_orphan(5, later - 1), "counted off once");
        assert_eq!(in_hand.snapshot(), HashMap::from([(5, 1)]));
        // An id acked since the snapshot is no orphan.
        in_hand.orphaned([8]);
        assert!(!in_hand.is_orphan(8, 0));
    }

    #[test]
    fn lost_entries_count_repeats_and_keep_what_is_not_an_id() {
        let known = HashMap::from([(7, 1), (9, 2)]);
        assert_eq!(
            lost_entries(entries(&["7", "7", "9", "x", "9", "5"]), known),
            entries(&["7", "x", "5"])
        );
    }

    #[test]
    fn the_takes_flat_answer_decodes_four_values_an_id() {
        let int = Value::Int;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let taken = Taken::decode_all(vec![
            bulk("7"),
            int(1),
            bulk("{}"),
            int(0),
            bulk("junk"),
            int(-1),
            int(0),
            int(0),
            bulk("8"),
            int(4),
            int(1),
            int(12),
        ])
        .expect("well formed");
        assert_eq!(taken.len(), 3);
        assert_eq!(taken[0].entry, b"7");
        assert_eq!(
            taken[0].answer.clone().and_then(Fetched::decode),
            Some(Fetched::Body(b"{}".to_vec()))
        );
        assert_eq!(taken[1].entry, b"junk");
        assert!(taken[1].answer.is_none(), "no id: nothing read");
        assert_eq!(
            taken[2].answer.clone().and_then(Fetched::decode),
            Some(Fetched::Sized {
                fallback: true,
                size: 12
            })
        );
        assert!(Taken::decode_all(vec![bulk("7"), int(0)]).is_none());
        assert!(Taken::decode_all(vec![int(7), int(0), int(0), int(0)]).is_none());
    }

    #[test]
    fn fetch_answers_decode() {
        let int = Value::Int;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            Fetched::decode(Value::Array(vec![int(0)])),
            Some(Fetched::Missing)
        );
        assert_eq!(
            Fetched::decode(Value::Array(vec![int(1), bulk("{}")])),
            Some(Fetched::Body(b"{}".to_vec()))
        );
        assert_eq!(
            Fetched::decode(Value::Array(vec![int(2), int(209_715_200)])),
            Some(Fetched::TooLarge(209_715_200))
        );
        assert_eq!(
            Fetched::decode(Value::Array(vec![int(3), bulk("K"), bulk("WRONGTYPE x")])),
            Some(Fetched::WrongType {
                key: "K".into(),
                error: "WRONGTYPE x".into()
            })
        );
        assert_eq!(Fetched::decode(Value::Nil), None);
        assert_eq!(Fetched::decode(Value::Array(vec![int(2), int(-1)])), None);
        assert_eq!(Fetched::decode(Value::Array(vec![int(1)])), None);
    }
}
