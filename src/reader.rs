//! The reader thread: takes request ids from the queue and hands jobs to the
//! workers. It takes only what its idle workers can start now: each worker
//! announces on `ready` when it is free, and the reader takes at most that many
//! ids, waiting for a free worker before it asks Redis for anything. Everything
//! else waits in Redis for whichever instance is free, and a request's deadline
//! starts only when a worker picks it.
//! One script ([`TAKE`]) moves the ids from the queue to this instance's
//! processing list, and only while this instance's heartbeat is alive in Redis: an
//! instance that was silent past its heartbeat (another instance may have returned
//! its requests to the queue and forgotten it) registers again before it takes
//! more, so nothing lands in a processing list nobody would recover. When the
//! queue is empty the reader waits on it with a `BLMOVE` of the queue onto itself,
//! which takes nothing. Bodies come from one more script ([`FETCH`]) that learns
//! each body's size first: a body over `max_request_bytes` is refused from its
//! size, never downloaded, and one round trip brings a few MiB at most.
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
use crate::job::{Backlog, InHand, Job, ReplyTo, Stats, Unanswered};
use crate::protocol::{describe_entry, parse_queue_entry, parse_request, Keys};
use crate::shutdown::Shutdown;
use crossbeam_channel::{select, Receiver, SendTimeoutError, Sender};
use redis::{Connection, RedisResult, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long one wait on the queue blocks; bounds how late the reader notices
/// shutdown. The socket's read timeout must stay well above it (DESIGN §8).
pub(crate) const BLOCK: Duration = Duration::from_millis(500);

/// Most bytes of bodies one [`FETCH`] brings back (a single body up to
/// `max_request_bytes` always comes, even when it is larger).
const FETCH_BYTES: usize = 4 << 20;

/// KEYS: queue, processing, heartbeat (of this instance). ARGV: most ids to take.
/// Moves up to ARGV[1] ids from the queue to the processing list in one step,
/// stopping at the first empty pop, but only while the heartbeat exists: `RECOVER`
/// (scheduler.rs) empties a processing list only once its heartbeat is gone, so
/// what is taken here is recovered if this instance dies. Nil without heartbeat.
pub(crate) const TAKE: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not v then break end
  out[#out + 1] = v
end
return out
";

/// KEYS: for each request, its key and its fallback key (`P-REQUEST-…`, read only
/// where `P-REQ-…` is missing). ARGV: largest body, byte budget. For each request
/// in order, until the budget is spent (at least one): `{0}` missing, `{1, body}`,
/// `{2, size}` too large (not sent), `{3, key, error}` not a string. The common
/// case costs two calls: `STRLEN`, then `GET`.
pub(crate) const FETCH: &str = r"
local out = {}
local max = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local spent = 0
for i = 1, #KEYS, 2 do
  local key = KEYS[i]
  local n = redis.pcall('STRLEN', key)
  if n == 0 and redis.call('EXISTS', key) == 0 then
    key = KEYS[i + 1]
    n = redis.pcall('STRLEN', key)
    if n == 0 and redis.call('EXISTS', key) == 0 then n = nil end
  end
  if n == nil then
    out[#out + 1] = {0}
  elseif type(n) == 'table' then
    out[#out + 1] = {3, key, n.err}
  elseif n > max then
    out[#out + 1] = {2, n}
  else
    if #out > 0 and spent + n > budget then break end
    spent = spent + n
    out[#out + 1] = {1, redis.call('GET', key)}
  end
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

/// One request's answer from [`FETCH`].
#[derive(Debug, PartialEq)]
enum Fetched {
    Missing,
    Body(Vec<u8>),
    TooLarge(usize),
    WrongType { key: String, error: String },
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
            _ => None,
        }
    }
}

/// Settings of the reader thread.
pub(crate) struct Reader {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) processing: String,
    pub(crate) max_request_bytes: usize,
    pub(crate) jobs: Sender<Job>,
    /// One message per worker that has become free (pool.rs).
    pub(crate) ready: Receiver<()>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) shutdown: Shutdown,
    pub(crate) in_hand: InHand,
    pub(crate) unanswered: Unanswered,
    /// Replies waiting for the publisher: no taking while it is full.
    pub(crate) backlog: Arc<Backlog>,
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

impl Reader {
    fn run(mut self) {
        let scripts = Scripts {
            take: redis::Script::new(TAKE),
            fetch: redis::Script::new(FETCH),
        };
        let mut conn: Option<Connection> = None;
        // Whether everything in the processing list is known to be in hand: false
        // after a reconnect, or after a failure between a take and its hand-over.
        let mut synced = false;
        // Free workers not yet given a job: announced on `ready`, spent by
        // `hand_over`. Below zero after handing over requests found in the
        // processing list, which were taken before.
        let mut free: i64 = 0;
        while !self.shutdown.is_triggered() {
            if synced && free <= 0 {
                self.wait_for_workers(&mut free);
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
            let step = if synced {
                self.take(c, &scripts, &mut free, &mut synced)
            } else {
                self.recover_lost(c, &scripts, &mut free)
                    .inspect(|_| synced = true)
            };
            match step {
                Ok(true) => self.connector.recovered(),
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
    fn wait_for_workers(&self, free: &mut i64) {
        select! {
            recv(self.ready) -> msg => match msg {
                Ok(()) => *free += 1,
                // Every worker has gone: only shutdown is left to wait for.
                Err(_) => {
                    self.shutdown.wait_timeout(BLOCK);
                }
            },
            recv(self.shutdown.receiver()) -> _ => {}
            default(BLOCK) => {}
        }
    }

    /// Takes up to `free` requests and hands them over; when the queue is empty,
    /// waits up to [`BLOCK`] for it to fill. False once shutdown stops it.
    fn take(
        &self,
        c: &mut Connection,
        scripts: &Scripts,
        free: &mut i64,
        synced: &mut bool,
    ) -> RedisResult<bool> {
        *free += self.ready.try_iter().count() as i64;
        let queue = self.keys.queue();
        let taken: Option<Vec<Vec<u8>>> = scripts
            .take
            .key(&queue)
            .key(&self.processing)
            .key(self.keys.heartbeat(&self.instance))
            .arg(*free)
            .invoke(c)?;
        match taken {
            None => {
                crate::scheduler::beat(c, &self.keys, &self.instance)?;
                log::warn!(
                    "this instance's heartbeat had lapsed (silent for over {:?}); another \
                     instance may have returned its requests to the queue. Registered again \
                     before taking more",
                    crate::scheduler::HEARTBEAT_TTL
                );
                Ok(true)
            }
            Some(entries) if entries.is_empty() => {
                // Wait for the queue to fill. Moving its last entry onto its own
                // end changes nothing, and blocks like a take would.
                let _: Option<Vec<u8>> = redis::cmd("BLMOVE")
                    .arg(&queue)
                    .arg(&queue)
                    .arg("RIGHT")
                    .arg("RIGHT")
                    .arg(BLOCK.as_secs_f64())
                    .query(c)?;
                Ok(true)
            }
            Some(entries) => {
                // Until all are handed over, a failure leaves some in the list
                // unserved: the next step compares the list with `InHand`.
                *synced = false;
                let going = self.serve(c, scripts, entries, free)?;
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
        free: &mut i64,
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
        let lost = lost_entries(listed, known);
        if !lost.is_empty() {
            log::warn!(
                "serving {} requests taken before the connection broke",
                lost.len()
            );
        }
        self.serve(c, scripts, lost, free)
    }

    /// Fetches the bodies of `entries` (already in the processing list) a few
    /// MiB at a time and hands each lot to the workers. False once shutdown stops it.
    fn serve(
        &self,
        c: &mut Connection,
        scripts: &Scripts,
        entries: Vec<Vec<u8>>,
        free: &mut i64,
    ) -> RedisResult<bool> {
        let mut ids = Vec::with_capacity(entries.len());
        let mut bad = Vec::new();
        for entry in entries {
            match parse_queue_entry(&entry) {
                Some(id) => ids.push(id),
                None => bad.push(entry),
            }
        }
        if !bad.is_empty() {
            self.drop_bad_entries(c, bad)?;
        }
        let mut rest = &ids[..];
        while !rest.is_empty() {
            let jobs = self.fetch(c, &scripts.fetch, rest)?;
            let (done, left) = rest.split_at(jobs.len().min(rest.len()));
            self.in_hand.add(done.iter().copied());
            rest = left;
            if !self.hand_over(jobs, free) {
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
        Ok(ids
            .iter()
            .zip(answers)
            .map(|(id, answer)| Job {
                reply_to: ReplyTo::Redis { id: *id },
                body: self.body(*id, answer),
                waited: false,
            })
            .collect())
    }

    fn body(&self, id: u64, answer: Value) -> Result<crate::protocol::Request, RequestError> {
        match Fetched::decode(answer) {
            Some(Fetched::Body(b)) => parse_request(&b, self.max_request_bytes),
            Some(Fetched::Missing) => Err(RequestError::NotFound(self.keys.request(id))),
            Some(Fetched::TooLarge(size)) => Err(RequestError::TooLarge {
                size,
                limit: self.max_request_bytes,
            }),
            Some(Fetched::WrongType { key, error }) => Err(RequestError::Unreadable(key, error)),
            None => Err(RequestError::Unreadable(
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
    fn hand_over(&self, jobs: Vec<Job>, free: &mut i64) -> bool {
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
                        *free -= 1;
                        break;
                    }
                    Err(SendTimeoutError::Timeout(j)) => job = j,
                    Err(SendTimeoutError::Disconnected(_)) => {
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
    fn lost_entries_count_repeats_and_keep_what_is_not_an_id() {
        let known = HashMap::from([(7, 1), (9, 2)]);
        assert_eq!(
            lost_entries(entries(&["7", "7", "9", "x", "9", "5"]), known),
            entries(&["7", "x", "5"])
        );
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
