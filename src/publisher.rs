//! The publisher thread: owns one Redis connection and sends every reply. Per
//! batch, one pipeline: `PUBLISH` the JSON and the msgpack forms, then acknowledge
//! each request (remove its id from this instance's processing list and delete its
//! request key). A reply nobody was subscribed to (the seed's client subscribes
//! after its `RPUSH`) is published again with back-off for `reply_grace_ms`.
//! On `Finish` it flushes, then moves whatever this instance still holds back to
//! the queue, so a shutdown loses nothing. Not for: encoding replies (the workers
//! do that) or deciding them (`dispatch.rs`).

use crate::connection::Connector;
use crate::protocol::Keys;
use crate::reader::InHand;
use crate::scheduler::SCHEDULE;
use crate::shutdown::Shutdown;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Connection, RedisResult};
use std::collections::BinaryHeap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A reply in both wire forms.
pub(crate) struct Encoded {
    pub(crate) json: Vec<u8>,
    pub(crate) msgpack: Vec<u8>,
}

/// What the publisher is asked to do.
pub(crate) enum Outgoing {
    /// Publish (unless `encoded` is `None`: a "no reply") and acknowledge request `id`.
    Reply { id: u64, encoded: Option<Encoded> },
    /// Store request `id` in `P-DELAYED` with `body` (its request without the delay),
    /// due `delay_ms` from now, and release it from this instance.
    Delay {
        id: u64,
        body: String,
        delay_ms: u64,
    },
    /// Flush everything before this, requeue what is still held, and stop.
    Finish,
}

/// One request's outcome in a batch.
enum Done {
    Reply(Option<Encoded>),
    Delay { body: String, delay_ms: u64 },
}

const MAX_BATCH: usize = 512;
const FIRST_RETRY: Duration = Duration::from_millis(2);
const RETRY_FACTOR: u32 = 3;
/// On shutdown, how long replies nobody has received yet are still retried.
const FINISH_GRACE: Duration = Duration::from_secs(1);

/// A reply published to nobody, to be published again.
struct Retry {
    due: Instant,
    wait: Duration,
    give_up: Instant,
    id: u64,
    encoded: Encoded,
}

impl PartialEq for Retry {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Retry {}
impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Retry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

/// Settings of the publisher thread.
pub(crate) struct Publisher {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) processing: String,
    pub(crate) grace: Duration,
    pub(crate) in_hand: InHand,
    /// Triggered by the server just before `Finish`: from then on Redis is waited
    /// for only until a deadline, so a stop never hangs on an outage.
    pub(crate) stopping: Shutdown,
}

/// Starts the publisher thread reading `rx`.
pub(crate) fn start(p: Publisher, rx: Receiver<Outgoing>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-publisher".into())
        .spawn(move || p.run(rx))
}

impl Publisher {
    fn run(mut self, rx: Receiver<Outgoing>) {
        // The publisher stops on `Finish`, after the workers, not when shutdown is
        // triggered: its reconnects wait on deadlines and on this, which nobody
        // triggers.
        let never = Shutdown::new();
        let mut conn: Option<Connection> = None;
        let mut retries: BinaryHeap<Retry> = BinaryHeap::new();
        let mut finish_by: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut batch = Vec::new();
            // Adds a message to the batch; false once it says to finish.
            let mut take = |msg: Option<Outgoing>| match msg {
                Some(Outgoing::Reply { id, encoded }) => {
                    batch.push((id, Done::Reply(encoded)));
                    true
                }
                Some(Outgoing::Delay { id, body, delay_ms }) => {
                    batch.push((id, Done::Delay { body, delay_ms }));
                    true
                }
                Some(Outgoing::Finish) | None => false,
            };
            if finish_by.is_none() {
                let wait = retries
                    .peek()
                    .map(|r| r.due.saturating_duration_since(now))
                    .unwrap_or(Duration::from_secs(1));
                let mut going = match rx.recv_timeout(wait) {
                    Ok(msg) => take(Some(msg)),
                    Err(RecvTimeoutError::Disconnected) => take(None),
                    Err(RecvTimeoutError::Timeout) => true,
                };
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(msg) if going => going = take(Some(msg)),
                        _ => break,
                    }
                }
                if !going {
                    finish_by = Some(Instant::now() + FINISH_GRACE.min(self.grace));
                }
            } else if let Some(r) = retries.peek() {
                std::thread::sleep(r.due.saturating_duration_since(now));
            }
            let now = Instant::now();
            let mut again = Vec::new();
            while retries.peek().is_some_and(|r| r.due <= now) {
                again.extend(retries.pop());
            }
            if !batch.is_empty() || !again.is_empty() {
                let Some(received) = self.send(&never, &mut conn, &batch, &again, finish_by) else {
                    log::warn!("redis unavailable at shutdown: replies not published");
                    return;
                };
                self.in_hand.remove(batch.iter().map(|(id, _)| *id));
                self.schedule_retries(&mut retries, batch, again, received);
            }
            if let Some(by) = finish_by {
                if retries.is_empty() || Instant::now() >= by {
                    self.requeue_held(&never, &mut conn, by + Duration::from_secs(5));
                    return;
                }
            }
        }
    }

    /// Sends one pipeline, reconnecting until it goes through (or, when finishing,
    /// until shortly after `finish_by`). Returns, for each reply in `batch` then
    /// `again`, whether anybody received it.
    fn send(
        &mut self,
        never: &Shutdown,
        conn: &mut Option<Connection>,
        batch: &[(u64, Done)],
        again: &[Retry],
        finish_by: Option<Instant>,
    ) -> Option<Vec<bool>> {
        let mut pipe = redis::pipe();
        let mut publish = |id: u64, e: &Encoded| {
            pipe.cmd("PUBLISH")
                .arg(self.keys.reply_channel(id))
                .arg(&e.json)
                .cmd("PUBLISH")
                .arg(self.keys.msgpack_channel(id))
                .arg(&e.msgpack);
        };
        for (id, done) in batch {
            if let Done::Reply(Some(e)) = done {
                publish(*id, e);
            }
        }
        for r in again {
            publish(r.id, &r.encoded);
        }
        let publishes = pipe.len();
        for (id, done) in batch {
            match done {
                Done::Reply(_) => pipe
                    .cmd("LREM")
                    .arg(&self.processing)
                    .arg(1)
                    .arg(id.to_string())
                    .cmd("DEL")
                    .arg(self.keys.request(*id))
                    .arg(self.keys.request_fallback(*id)),
                // A script in a pipeline is not loaded for us (DESIGN §8): EVAL.
                Done::Delay { body, delay_ms } => pipe
                    .cmd("EVAL")
                    .arg(SCHEDULE)
                    .arg(4)
                    .arg(self.keys.delayed())
                    .arg(self.keys.request(*id))
                    .arg(self.keys.request_fallback(*id))
                    .arg(&self.processing)
                    .arg(delay_ms)
                    .arg(id)
                    .arg(body),
            };
        }
        // A command Redis refuses (an ack under OOM or MISCONF, say) fails alone: the
        // replies it follows are not published again for it.
        pipe.ignore_errors();
        let mut give_up = finish_by.map(|by| by + Duration::from_secs(5));
        let mut pause = Duration::from_millis(50);
        loop {
            if give_up.is_none() && self.stopping.is_triggered() {
                give_up = Some(Instant::now() + FINISH_GRACE + Duration::from_secs(5));
            }
            // Until the server stops, wait for Redis as long as it takes; after, only
            // until `give_up`.
            let signal = if give_up.is_some() {
                never
            } else {
                &self.stopping
            };
            if conn.is_none() {
                match self.connector.connect_until(signal, give_up) {
                    Some(c) => *conn = Some(c),
                    None if give_up.is_none() => continue,
                    None => return None,
                }
            }
            let c = conn.as_mut()?;
            let result: RedisResult<Vec<RedisResult<i64>>> = pipe.query(c);
            match result {
                Ok(results) => {
                    if let Some(Err(e)) = results[publishes.min(results.len())..]
                        .iter()
                        .find(|r| r.is_err())
                    {
                        log::warn!("redis refused an acknowledgement: {e}");
                    }
                    return Some(
                        results[..publishes.min(results.len())]
                            .chunks(2)
                            .map(|p| {
                                p.iter().map(|r| r.as_ref().map_or(0, |n| *n)).sum::<i64>() > 0
                            })
                            .collect(),
                    );
                }
                Err(e) => {
                    self.connector.broken(&e);
                    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                        *conn = None;
                    } else if give_up.is_some_and(|g| Instant::now() >= g) {
                        return None;
                    } else {
                        // Redis answers but refuses: don't hammer it.
                        signal.wait_timeout(pause);
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    fn schedule_retries(
        &self,
        retries: &mut BinaryHeap<Retry>,
        batch: Vec<(u64, Done)>,
        again: Vec<Retry>,
        received: Vec<bool>,
    ) {
        let now = Instant::now();
        let fresh = batch.into_iter().filter_map(|(id, done)| match done {
            Done::Reply(Some(encoded)) => Some(Retry {
                due: now,
                wait: FIRST_RETRY / RETRY_FACTOR,
                give_up: now + self.grace,
                id,
                encoded,
            }),
            _ => None,
        });
        for (r, got) in fresh.chain(again).zip(received) {
            let wait = r.wait * RETRY_FACTOR;
            if !got && now + wait <= r.give_up {
                retries.push(Retry {
                    due: now + wait,
                    wait,
                    ..r
                });
            }
        }
    }

    /// Moves every id still in this instance's processing list back to the head of
    /// the queue, oldest first in line.
    fn requeue_held(&mut self, never: &Shutdown, conn: &mut Option<Connection>, give_up: Instant) {
        let mut moved = 0u64;
        loop {
            if conn.is_none() {
                match self.connector.connect_until(never, Some(give_up)) {
                    Some(c) => *conn = Some(c),
                    None => break,
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let r: RedisResult<Option<String>> = redis::cmd("LMOVE")
                .arg(&self.processing)
                .arg(self.keys.queue())
                .arg("RIGHT")
                .arg("LEFT")
                .query(c);
            match r {
                Ok(Some(_)) => moved += 1,
                Ok(None) => {
                    if moved > 0 {
                        log::info!("returned {moved} unfinished requests to the queue");
                    }
                    if let Err(e) = crate::scheduler::retire(c, &self.keys, &self.instance) {
                        log::warn!("could not remove this instance's heartbeat: {e}");
                    }
                    return;
                }
                Err(e) => {
                    self.connector.broken(&e);
                    *conn = None;
                    if Instant::now() >= give_up {
                        break;
                    }
                    never.wait_timeout(Duration::from_millis(100));
                }
            }
        }
        log::warn!(
            "could not return unfinished requests to the queue; they stay in {}",
            self.processing
        );
    }
}
