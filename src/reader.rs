//! The reader thread: takes request ids from the queue and hands jobs to the
//! workers. It blocks on `BLMOVE` (the queue to this instance's processing list),
//! then takes what else is waiting in one pipeline, up to the room left in the
//! jobs channel, and fetches the bodies in one more. The bounded jobs channel is
//! the back-pressure: when the workers are busy, requests wait in Redis.
//! It stops taking as soon as shutdown is triggered; what it took but did not hand
//! over is still in the processing list, which the publisher returns to the queue.
//! Ids it holds are recorded in [`InHand`] until the publisher acks them; after
//! every reconnect the reader compares the processing list with that record and
//! serves the ids whose `BLMOVE` reply was lost with the connection.
//! Not for: parsing beyond the protocol (`protocol.rs`) or running requests.

use crate::connection::Connector;
use crate::dispatch::{Job, ReplyTo, Stats};
use crate::error::RequestError;
use crate::protocol::{parse_queue_entry, parse_request, Keys};
use crate::shutdown::Shutdown;
use crossbeam_channel::{SendTimeoutError, Sender};
use redis::{Connection, RedisResult};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long one `BLMOVE` blocks; bounds how late the reader notices shutdown.
/// The socket's read timeout must stay well above it (DESIGN §8).
pub(crate) const BLOCK: Duration = Duration::from_millis(500);

const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Moves up to ARGV[1] ids from the queue to the processing list in one round
/// trip, stopping at the first empty pop (so an empty queue costs nothing).
const TAKE_MORE: &str = r"
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not v then break end
  out[#out + 1] = v
end
return out
";

/// The request ids this instance has taken and not yet acknowledged: the reader
/// adds, the publisher removes once the ack is in Redis.
#[derive(Clone, Default)]
pub(crate) struct InHand(Arc<Mutex<HashSet<u64>>>);

impl InHand {
    fn add(&self, ids: impl IntoIterator<Item = u64>) {
        if let Ok(mut set) = self.0.lock() {
            set.extend(ids);
        }
    }

    pub(crate) fn remove(&self, ids: impl IntoIterator<Item = u64>) {
        if let Ok(mut set) = self.0.lock() {
            for id in ids {
                set.remove(&id);
            }
        }
    }

    fn snapshot(&self) -> HashSet<u64> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
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
    pub(crate) stats: Arc<Stats>,
    pub(crate) shutdown: Shutdown,
    pub(crate) in_hand: InHand,
    /// Replies waiting for the publisher: no taking while it is full.
    pub(crate) backlog: Arc<crate::publisher::Backlog>,
}

/// Starts the reader thread.
pub(crate) fn start(r: Reader) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-reader".into())
        .spawn(move || r.run())
}

impl Reader {
    fn run(mut self) {
        let take_more = redis::Script::new(TAKE_MORE);
        let mut conn: Option<Connection> = None;
        while !self.shutdown.is_triggered() {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connector.connect(&self.shutdown) {
                    Some(mut c) => match self.recover_lost(&mut c) {
                        Ok(jobs) => {
                            if !self.hand_over(jobs) {
                                break;
                            }
                            conn.insert(c)
                        }
                        Err(e) => {
                            self.connector.broken(&e);
                            self.shutdown.wait_timeout(ERROR_PAUSE);
                            continue;
                        }
                    },
                    None => break,
                },
            };
            // While the publisher is behind, requests wait in Redis.
            if !self.backlog.wait_room(ERROR_PAUSE) {
                continue;
            }
            match self.take_batch(c, &take_more) {
                Ok(jobs) => {
                    if !self.hand_over(jobs) {
                        break;
                    }
                }
                Err(e) => {
                    self.connector.broken(&e);
                    conn = None;
                    // Not every error is a broken socket (a wrong-typed key, say):
                    // don't spin on one.
                    self.shutdown.wait_timeout(ERROR_PAUSE);
                }
            }
        }
    }

    /// Takes up to the jobs channel's free room of requests; none if the queue
    /// stays empty for [`BLOCK`].
    fn take_batch(&self, c: &mut Connection, take_more: &redis::Script) -> RedisResult<Vec<Job>> {
        let queue = self.keys.queue();
        let first: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(&queue)
            .arg(&self.processing)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(BLOCK.as_secs_f64())
            .query(c)?;
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let capacity = self.jobs.capacity().unwrap_or(64);
        let room = capacity.saturating_sub(self.jobs.len());
        let mut entries = vec![first];
        if room > 1 {
            let more: Vec<Vec<u8>> = take_more
                .key(&queue)
                .key(&self.processing)
                .arg(room - 1)
                .invoke(c)?;
            entries.extend(more);
        }
        self.fetch_bodies(c, entries)
    }

    /// Ids in the processing list that this instance does not know it holds: their
    /// `BLMOVE` or `GET` reply was lost with a broken connection. They have not been
    /// served, so they are served now.
    fn recover_lost(&self, c: &mut Connection) -> RedisResult<Vec<Job>> {
        // Snapshot first: the publisher only removes an id after its ack is in
        // Redis, so an id missing from the snapshot and present in the list is lost.
        crate::scheduler::beat(c, &self.keys, &self.instance)?;
        let known = self.in_hand.snapshot();
        let listed: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&self.processing)
            .arg(0)
            .arg(-1)
            .query(c)?;
        let lost: Vec<Vec<u8>> = listed
            .into_iter()
            .filter(|e| parse_queue_entry(e).is_none_or(|id| !known.contains(&id)))
            .collect();
        if !lost.is_empty() {
            log::warn!(
                "serving {} requests taken before the connection broke",
                lost.len()
            );
        }
        self.fetch_bodies(c, lost)
    }

    fn fetch_bodies(&self, c: &mut Connection, entries: Vec<Vec<u8>>) -> RedisResult<Vec<Job>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(entries.len());
        let mut bad = Vec::new();
        for entry in entries {
            match parse_queue_entry(&entry) {
                Some(id) => {
                    pipe.cmd("GET").arg(self.keys.request(id));
                    ids.push(id);
                }
                None => bad.push(entry),
            }
        }
        if !bad.is_empty() {
            self.drop_bad_entries(c, bad)?;
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // A key of the wrong type fails its own GET, not the batch: that request gets
        // an error reply and the others go on.
        let mut bodies: Vec<RedisResult<Option<Vec<u8>>>> = pipe.ignore_errors().query(c)?;
        // Later versions of the original's Python client write P-REQUEST-…; read it
        // only where P-REQ-… is missing.
        let missing: Vec<usize> = (0..ids.len())
            .filter(|i| matches!(bodies[*i], Ok(None)))
            .collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for i in &missing {
                pipe.cmd("GET").arg(self.keys.request_fallback(ids[*i]));
            }
            let fallback: Vec<RedisResult<Option<Vec<u8>>>> = pipe.ignore_errors().query(c)?;
            for (i, body) in missing.into_iter().zip(fallback) {
                bodies[i] = body;
            }
        }
        self.in_hand.add(ids.iter().copied());
        Ok(ids
            .into_iter()
            .zip(bodies)
            .map(|(id, body)| Job {
                reply_to: ReplyTo::Redis { id },
                body: match body {
                    Ok(Some(b)) => parse_request(&b, self.max_request_bytes),
                    Ok(None) => Err(RequestError::NotFound(self.keys.request(id))),
                    Err(e) => Err(RequestError::Unreadable(
                        self.keys.request(id),
                        e.to_string(),
                    )),
                },
                waited: false,
            })
            .collect())
    }

    /// Logs, counts and removes queue entries that are not request ids.
    fn drop_bad_entries(&self, c: &mut Connection, bad: Vec<Vec<u8>>) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for entry in bad {
            self.stats.bad_entries.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "skipped a queue entry that is not a request id: {:?}",
                String::from_utf8_lossy(&entry)
            );
            pipe.cmd("LREM")
                .arg(&self.processing)
                .arg(1)
                .arg(entry)
                .ignore();
        }
        pipe.query(c)
    }

    /// Hands jobs to the workers; false once shutdown stops it.
    fn hand_over(&self, jobs: Vec<Job>) -> bool {
        for mut job in jobs {
            loop {
                if self.shutdown.is_triggered() {
                    return false;
                }
                match self.jobs.send_timeout(job, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(SendTimeoutError::Timeout(j)) => job = j,
                    Err(SendTimeoutError::Disconnected(_)) => return false,
                }
            }
        }
        true
    }
}
