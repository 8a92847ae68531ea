//! The reader thread: takes request ids from the queue and hands jobs to the
//! workers. It blocks on `BLMOVE` (the queue to this instance's processing list),
//! then takes what else is waiting in one pipeline, up to the room left in the
//! jobs channel, and fetches the bodies in one more. The bounded jobs channel is
//! the back-pressure: when the workers are busy, requests wait in Redis.
//! It stops taking as soon as shutdown is triggered; what it took but did not hand
//! over is still in the processing list, which the publisher returns to the queue.
//! Not for: parsing beyond the protocol (`protocol.rs`) or running requests.

use crate::connection::Connector;
use crate::dispatch::{Job, ReplyTo, Stats};
use crate::error::RequestError;
use crate::protocol::{parse_queue_entry, parse_request, Keys};
use crate::shutdown::Shutdown;
use crossbeam_channel::{SendTimeoutError, Sender};
use redis::{Connection, RedisResult};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long one `BLMOVE` blocks; bounds how late the reader notices shutdown.
/// The socket's read timeout must stay well above it (DESIGN §8).
pub(crate) const BLOCK: Duration = Duration::from_millis(500);

/// Settings of the reader thread.
pub(crate) struct Reader {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) processing: String,
    pub(crate) max_request_bytes: usize,
    pub(crate) jobs: Sender<Job>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) shutdown: Shutdown,
}

/// Starts the reader thread.
pub(crate) fn start(r: Reader) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-reader".into())
        .spawn(move || r.run())
}

impl Reader {
    fn run(mut self) {
        let mut conn: Option<Connection> = None;
        while !self.shutdown.is_triggered() {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connector.connect(&self.shutdown) {
                    Some(c) => conn.insert(c),
                    None => break,
                },
            };
            match self.take_batch(c) {
                Ok(jobs) => {
                    if !self.hand_over(jobs) {
                        break;
                    }
                }
                Err(e) => {
                    self.connector.broken(&e);
                    conn = None;
                }
            }
        }
    }

    /// Takes up to the jobs channel's free room of requests; none if the queue
    /// stays empty for [`BLOCK`].
    fn take_batch(&self, c: &mut Connection) -> RedisResult<Vec<Job>> {
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
            let mut pipe = redis::pipe();
            for _ in 1..room {
                pipe.cmd("LMOVE")
                    .arg(&queue)
                    .arg(&self.processing)
                    .arg("LEFT")
                    .arg("RIGHT");
            }
            let more: Vec<Option<Vec<u8>>> = pipe.query(c)?;
            entries.extend(more.into_iter().flatten());
        }
        self.fetch_bodies(c, entries)
    }

    fn fetch_bodies(&self, c: &mut Connection, entries: Vec<Vec<u8>>) -> RedisResult<Vec<Job>> {
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            match parse_queue_entry(&entry) {
                Some(id) => {
                    pipe.cmd("GET").arg(self.keys.request(id));
                    ids.push(id);
                }
                None => {
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
            }
        }
        let mut bodies: Vec<Option<Vec<u8>>> = pipe.query(c)?;
        // Later versions of the original's Python client write P-REQUEST-…; read it
        // only where P-REQ-… is missing.
        let missing: Vec<usize> = (0..ids.len()).filter(|i| bodies[*i].is_none()).collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for i in &missing {
                pipe.cmd("GET").arg(self.keys.request_fallback(ids[*i]));
            }
            let fallback: Vec<Option<Vec<u8>>> = pipe.query(c)?;
            for (i, body) in missing.into_iter().zip(fallback) {
                bodies[i] = body;
            }
        }
        Ok(ids
            .into_iter()
            .zip(bodies)
            .map(|(id, body)| Job {
                reply_to: ReplyTo::Redis { id },
                body: match body {
                    Some(b) => parse_request(&b, self.max_request_bytes),
                    None => Err(RequestError::NotFound(self.keys.request(id))),
                },
                waited: false,
            })
            .collect())
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
