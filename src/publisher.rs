//! The publisher thread: owns one Redis connection and sends every reply. Per
//! batch, one pipeline with one script call per request: the `REPLY` script
//! acknowledges the request (removes its id from this instance's processing list,
//! deletes its request key) and publishes the JSON and msgpack forms only if that
//! removal happened, so a pipeline sent again after its answer was lost (a Redis
//! stall past the read timeout) publishes nothing twice; `SCHEDULE` does the same
//! for a delayed request. An id leaves [`InHand`] only once its ack is in Redis: an
//! ack Redis refuses (`MISCONF`, `LOADING`) is retried with back-off until it is
//! accepted, so the reader never serves it again meanwhile. A reply nobody was
//! subscribed to (the seed's client subscribes after its `RPUSH`) is held: its
//! channels are looked for a subscriber (one `PUBSUB CHANNELS` per look where
//! Redis has few channels, else `PUBSUB NUMSUB` by name) with back-off until
//! `reply_grace_ms` has passed, the last time at its end, and it is published
//! again once one is there (blind, if Redis refuses the look); at most `republish_max_bytes` of such replies are held, the oldest dropped
//! first. What waits for it is counted ([`Backlog`]): the reader takes no more
//! requests while too much does. On `Finish` it flushes, then moves whatever this
//! instance still holds back to the queue, so a shutdown loses nothing. Not for:
//! encoding replies (the workers do that) or deciding them (`dispatch.rs`).

use crate::connection::{Connector, Failure};
use crate::job::{Backlog, Encoded, InHand, Outgoing, Stats};
use crate::protocol::Keys;
use crate::resp::Packed;
use crate::scheduler::SCHEDULE;
use crate::shutdown::Shutdown;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use redis::{Connection, RedisError, RedisResult, Script, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// KEYS: the processing list, then for each request its key and its fallback key.
/// ARGV: for each request, its id, its JSON channel (empty: publish nothing), its
/// JSON reply and its msgpack reply. One call acknowledges a whole batch (a script
/// call costs Redis far more than the commands in it).
/// Each request is acknowledged and its reply published only if the ack removed the
/// id from the processing list: sent again, it does nothing. Returns, per request,
/// `acked, received, why`: acked 1 (done), 0 (the id was not held: nothing
/// published) or -1 (Redis refused the ack, `why` says how; the reply was published
/// anyway, since the request is still in hand and only its ack is left to retry).
const REPLY: &str = r"
local out = {}
for i = 0, #ARGV / 4 - 1 do
  local id, channel = ARGV[4 * i + 1], ARGV[4 * i + 2]
  local removed = redis.pcall('LREM', KEYS[1], 1, id)
  local acked, why = 1, ''
  if type(removed) == 'table' then
    acked = -1
    why = tostring(removed.err)
  elseif removed == 0 then
    acked = 0
  else
    redis.call('DEL', KEYS[2 * i + 2], KEYS[2 * i + 3])
  end
  local received = 0
  if acked ~= 0 and channel ~= '' then
    received = redis.call('PUBLISH', channel, ARGV[4 * i + 3])
      + redis.call('PUBLISH', 'MSGPACK:' .. channel, ARGV[4 * i + 4])
  end
  out[#out + 1] = acked
  out[#out + 1] = received
  out[#out + 1] = why
end
return out
";

/// What one request still needs from Redis: one script call, harmless to send
/// again after its answer was lost.
enum Ack {
    /// Acknowledge `id`, and publish `encoded` if the ack went through.
    Reply {
        id: u64,
        epoch: u64,
        encoded: Option<Encoded>,
    },
    /// Store `id` as delayed and release it.
    Delay {
        id: u64,
        epoch: u64,
        body: String,
        delay_ms: u64,
    },
}

impl Ack {
    fn id(&self) -> u64 {
        match self {
            Ack::Reply { id, .. } | Ack::Delay { id, .. } => *id,
        }
    }

    /// Whether it is the reply of a take this instance lost (see [`InHand`]):
    /// then nothing is sent for it, and it is no longer held.
    fn is_orphan(&self, in_hand: &InHand) -> bool {
        match self {
            Ack::Reply { id, epoch, .. } | Ack::Delay { id, epoch, .. } => {
                in_hand.is_orphan(*id, *epoch)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Ack::Reply { encoded, .. } => encoded.as_ref().map_or(0, Encoded::len),
            Ack::Delay { body, .. } => body.len(),
        }
    }
}

/// What Redis said to one [`Ack`].
enum Acked {
    /// Done; `received` subscribers got the reply (0 too when none was published).
    Done { received: i64 },
    /// The id was not in this instance's processing list: an earlier send whose
    /// answer was lost did the work, or another instance recovered the request.
    /// Nothing was published.
    NotHeld,
    /// The reply was published (to `received` subscribers) but Redis refused the
    /// ack: only the ack is left to do.
    AckRefused { received: i64, why: String },
    /// Redis refused the whole call (`LOADING`, `NOSCRIPT`, ...): all of it is left.
    Refused(String),
}

/// What became of one held reply in a pipeline.
#[derive(Debug, PartialEq)]
enum Republished {
    /// Published again, and somebody received it: done.
    Received,
    /// Nobody subscribes (or the answer was lost): back to its schedule.
    Nobody,
    /// Not published, but its channel has a subscriber now: publish at once.
    Heard,
}

/// What one pipeline did: Redis's answer to each ack, and what became of each
/// held reply.
type Sent = (Vec<Acked>, Vec<(Retry, Republished)>);

/// How one pipeline looks whether the channels of held replies have a subscriber
/// now (neither sees pattern subscribers).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Look {
    /// `PUBSUB NUMSUB` naming both channels of each reply looked at: Redis's cost
    /// is small, ours (naming, then reading back every name) grows with them.
    Named,
    /// One `PUBSUB CHANNELS` answering every reply channel that has a subscriber:
    /// Redis's cost grows with every channel it has, anybody's; ours is the
    /// answer's few names. Chosen when Redis has few channels (see [`look_for`]):
    /// a drain of requests nobody listens to then costs one small command per
    /// round, not two names and two answers per reply at each step of its
    /// schedule.
    All,
}

/// A `PUBSUB CHANNELS` costs Redis about as much per channel it has as a
/// `PUBSUB NUMSUB` costs both sides per reply named, over this many.
const CHANNELS_PER_REPLY: u64 = 4;
/// How often Redis's channel count is read again (`INFO stats`, about 13 µs of
/// Redis) while replies are held. Short, since a count gone stale after a
/// neighbour subscribed many channels makes each look cost Redis about 0.25 µs
/// per channel: this bounds that to about this long.
const COUNT_CHANNELS_EVERY: Duration = Duration::from_millis(100);

/// Most requests in one pipeline, and most bytes of replies and bodies: a batch of
/// large replies is sent in several pipelines rather than buffered whole.
const MAX_BATCH: usize = 512;
const MAX_BATCH_BYTES: usize = 1 << 20;
const FIRST_RETRY: Duration = Duration::from_millis(2);
const RETRY_FACTOR: u32 = 3;
/// Back-off of acks Redis refuses.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// On shutdown, how long replies nobody has received yet are still looked for
/// (once at once, then on their schedule, the last time at its end).
const FINISH_GRACE: Duration = Duration::from_secs(1);
/// What a held reply costs beyond its bytes (its record, its place in the maps and
/// the allocator's headers), so that the cap bounds memory, not only payload.
const ENTRY_OVERHEAD: usize = 256;

/// A reply published to nobody, to be published again.
struct Retry {
    due: Instant,
    wait: Duration,
    give_up: Instant,
    id: u64,
    /// The JSON form, then the msgpack form, in one allocation of the publisher's
    /// own: the workers' buffers are freed at once (held in the many workers'
    /// allocator arenas, they fragmented memory to several times the cap).
    both: Box<[u8]>,
    json_len: usize,
    /// Order of arrival: the smallest is the oldest.
    seq: u64,
    /// The last look found a subscriber: publish at once.
    heard: bool,
}

impl Retry {
    fn cost(&self) -> usize {
        self.both.len() + ENTRY_OVERHEAD
    }

    fn json(&self) -> &[u8] {
        &self.both[..self.json_len]
    }

    fn msgpack(&self) -> &[u8] {
        &self.both[self.json_len..]
    }
}

/// Replies held for late subscribers: each is published again with back-off
/// (2 ms, ×3 each time) until its grace ends, the last time at that end. At most
/// `cap` bytes are held; past it the oldest are dropped, counted, and logged once
/// per episode (an episode ends after a whole grace without a drop).
///
/// Replies that share a schedule are kept together in a [`Group`]: those one
/// pipeline published to nobody, and those put back after one look. The heap
/// orders groups, not replies: a W3 drain (20,000 replies nobody hears, each
/// looked for 6 times in its first 0.7 s) spent a tenth of the server's CPU
/// moving single replies through a heap and a map of that size.
struct Held {
    /// Groups by the arrival of their oldest reply (its `seq`): the cap drops
    /// from the first.
    groups: BTreeMap<u64, Group>,
    /// (due, key) of each group; entries whose group is gone or was rescheduled
    /// are stale and skipped.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The group the last reply joined: the next one joins it if it is
    /// scheduled alike and younger.
    forming: Option<u64>,
    bytes: usize,
    cap: usize,
    grace: Duration,
    /// The end of a stop under way: no reply is held past it, not even one
    /// published to nobody after the stop began.
    stop_by: Option<Instant>,
    next_seq: u64,
    /// Drops in the current episode and when the last happened.
    episode: Option<(u64, Instant)>,
    stats: Arc<Stats>,
}

/// Held replies due together, in order of arrival (each sorted by `seq`, with
/// the same `due`, `wait`, `give_up` and `heard`).
struct Group {
    due: Instant,
    replies: VecDeque<Retry>,
}

impl Group {
    /// Whether `r` may join: scheduled alike, and younger than the last.
    fn takes(&self, r: &Retry) -> bool {
        self.replies.back().is_some_and(|last| {
            last.due == r.due
                && last.wait == r.wait
                && last.give_up == r.give_up
                && last.heard == r.heard
                && last.seq < r.seq
        })
    }
}

impl Held {
    fn new(cap: usize, grace: Duration, stats: Arc<Stats>) -> Self {
        Held {
            groups: BTreeMap::new(),
            due: BinaryHeap::new(),
            forming: None,
            bytes: 0,
            cap,
            grace,
            stop_by: None,
            next_seq: 0,
            episode: None,
            stats,
        }
    }

    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Replies held.
    fn len(&self) -> usize {
        self.groups.values().map(|g| g.replies.len()).sum()
    }

    /// The ids held, group by group.
    #[cfg(test)]
    fn ids(&self) -> Vec<u64> {
        self.groups
            .values()
            .flat_map(|g| g.replies.iter().map(|r| r.id))
            .collect()
    }

    /// A group under `key` (its oldest reply's `seq`), due at its `due`.
    fn put_group(&mut self, key: u64, group: Group) {
        self.due.push(Reverse((group.due, key)));
        self.groups.insert(key, group);
    }

    /// Drops every held reply, and `more` taken out of it (Redis restarted),
    /// counted as dropped.
    fn clear(&mut self, more: usize) {
        let n = (self.len() + more) as u64;
        self.groups.clear();
        self.due.clear();
        self.forming = None;
        self.bytes = 0;
        if n > 0 {
            self.stats.replies_dropped.fetch_add(n, Ordering::Relaxed);
            log::info!("{n} replies held for late subscribers dropped (redis restarted)");
        }
    }

    /// A reply just published to nobody.
    fn add(&mut self, id: u64, encoded: Encoded, now: Instant) {
        // A grace or a cap of 0 turns republishing off: nothing to hold or log.
        if self.grace.is_zero() || self.cap == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut both = Vec::with_capacity(encoded.len());
        both.extend_from_slice(&encoded.json);
        both.extend_from_slice(&encoded.msgpack);
        let json_len = encoded.json.len();
        drop(encoded);
        let give_up = now + self.grace;
        self.insert(
            Retry {
                due: now + FIRST_RETRY,
                wait: FIRST_RETRY,
                give_up: self.stop_by.map_or(give_up, |by| give_up.min(by)),
                id,
                both: both.into_boxed_slice(),
                json_len,
                seq,
                heard: false,
            },
            now,
        );
    }

    /// A republish, made at `now`, that reached nobody (or whose answer was lost):
    /// again after a longer wait, but never later than the grace's end, where the
    /// last one is made.
    fn again(&mut self, mut r: Retry, now: Instant) {
        if now >= r.give_up {
            return;
        }
        r.wait *= RETRY_FACTOR;
        r.due = (now + r.wait).min(r.give_up);
        r.heard = false;
        self.insert(r, now);
    }

    /// A reply whose channel has a subscriber now: published at once.
    fn heard(&mut self, mut r: Retry, now: Instant) {
        r.due = now;
        r.heard = true;
        self.insert(r, now);
    }

    fn insert(&mut self, r: Retry, now: Instant) {
        // One reply larger than the whole cap is not held, rather than pushing out
        // every other.
        if r.cost() > self.cap {
            return self.dropped(1, now);
        }
        self.bytes += r.cost();
        let joined = self.forming.and_then(|k| self.groups.get_mut(&k));
        match joined {
            Some(g) if g.takes(&r) => g.replies.push_back(r),
            _ => {
                let key = r.seq;
                let due = r.due;
                self.put_group(
                    key,
                    Group {
                        due,
                        replies: VecDeque::from([r]),
                    },
                );
                self.forming = Some(key);
            }
        }
        let mut dropped = 0u64;
        while self.bytes > self.cap {
            let Some((key, mut g)) = self.groups.pop_first() else {
                break;
            };
            if let Some(old) = g.replies.pop_front() {
                self.bytes -= old.cost();
                dropped += 1;
            }
            // The rest keeps its due under its new oldest reply.
            let rest = g.replies.front().map(|r| r.seq);
            if self.forming == Some(key) {
                self.forming = rest;
            }
            if let Some(k) = rest {
                self.put_group(k, g);
            }
        }
        if dropped > 0 {
            self.dropped(dropped, now);
        }
        // Stale heap entries are skipped when they surface; don't let them pile up.
        if self.due.len() > 2 * self.groups.len() + 1024 {
            self.due = self
                .groups
                .iter()
                .map(|(k, g)| Reverse((g.due, *k)))
                .collect();
        }
    }

    /// Counts `n` replies dropped at `now`; logs when an episode of drops starts.
    fn dropped(&mut self, n: u64, now: Instant) {
        self.stats.replies_dropped.fetch_add(n, Ordering::Relaxed);
        match &mut self.episode {
            Some((count, last)) => {
                *count += n;
                *last = now;
            }
            None => {
                log::warn!(
                    "republish_max_bytes ({} bytes) reached: dropping the oldest replies held for late subscribers",
                    self.cap
                );
                self.episode = Some((n, now));
            }
        }
    }

    /// When the next republish is due.
    fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((due, key))) = self.due.peek() {
            if self.groups.get(key).is_some_and(|g| g.due == *due) {
                return Some(*due);
            }
            self.due.pop();
        }
        None
    }

    /// The server stops at `by`: every held reply is looked for once more at
    /// `now` (a client subscribed meanwhile may wait for the look at its grace's
    /// end, seconds after the stop), then on its schedule, the last time at `by`
    /// at the latest. Each group's replies are changed alike, so they stay one
    /// group.
    fn finish(&mut self, now: Instant, by: Instant) {
        for g in self.groups.values_mut() {
            g.due = now;
            for r in &mut g.replies {
                r.due = now;
                r.give_up = r.give_up.min(by);
            }
        }
        self.due = self.groups.keys().map(|k| Reverse((now, *k))).collect();
        self.forming = None;
        self.stop_by = Some(by);
    }

    /// Takes the replies due by `now`, about `max_bytes` of them at most (at least
    /// one; the rest stay due); ends a drop episode that has gone quiet.
    fn take_due(&mut self, now: Instant, max_bytes: usize) -> Vec<Retry> {
        if let Some((n, last)) = self.episode {
            if now >= last + self.grace {
                log::info!(
                    "replies held for late subscribers fit in republish_max_bytes again; {n} were dropped"
                );
                self.episode = None;
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        while bytes < max_bytes && self.next_due().is_some_and(|d| d <= now) {
            let Some(Reverse((_, key))) = self.due.pop() else {
                break;
            };
            let Some(mut g) = self.groups.remove(&key) else {
                continue;
            };
            while bytes < max_bytes {
                let Some(r) = g.replies.pop_front() else {
                    break;
                };
                self.bytes -= r.cost();
                bytes += r.both.len();
                out.push(r);
            }
            // What did not fit stays due, under its new oldest reply.
            if let Some(k) = g.replies.front().map(|r| r.seq) {
                self.put_group(k, g);
            }
        }
        // Replies put back start groups of their own.
        self.forming = None;
        out
    }
}

/// Settings of the publisher thread.
pub(crate) struct Publisher {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) processing: String,
    pub(crate) grace: Duration,
    /// Most bytes of replies held for late subscribers.
    pub(crate) republish_max_bytes: usize,
    pub(crate) in_hand: InHand,
    pub(crate) stats: Arc<Stats>,
    /// What the workers sent and the publisher has not taken yet.
    pub(crate) backlog: Arc<Backlog>,
    /// Triggered by the server just before `Finish`: from then on Redis is waited
    /// for only until a deadline, so a stop never hangs on an outage.
    pub(crate) stopping: Shutdown,
}

/// Starts the publisher thread reading `rx`.
pub(crate) fn start(p: Publisher, rx: Receiver<Outgoing>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-publisher".into())
        .spawn(move || Publishing::new(p).run(rx))
}

/// Acks Redis refused, retried with back-off; logged when refusals start and end.
struct Refused {
    acks: Vec<Ack>,
    retry_at: Instant,
    pause: Duration,
    since: Option<Instant>,
}

/// The publisher thread's state.
struct Publishing {
    p: Publisher,
    reply: Script,
    schedule: Script,
    /// Whether the connection has the scripts loaded (DESIGN §8: a pipeline does
    /// not load them for us).
    loaded: bool,
    /// The run of Redis (`run_id`) the held replies were published on, once
    /// connected: `Some(None)` if Redis would not say.
    redis_run: Option<Option<String>>,
    /// Held replies dropped because Redis restarted, not yet dropped from
    /// [`Held`] by [`Publishing::run`].
    restarted: bool,
    /// How many channels Redis had (`pubsub_channels` of `INFO stats`) and when
    /// that was read; `None` before, or if Redis would not say.
    channels: Option<u64>,
    counted_at: Option<Instant>,
    /// Redis refused `PUBSUB CHANNELS` (an ACL allowing only `NUMSUB`).
    channels_refused: bool,
    /// The last pipeline sent, its memory kept for the next.
    packed: Packed,
}

impl Publishing {
    fn new(p: Publisher) -> Self {
        Publishing {
            p,
            reply: Script::new(REPLY),
            schedule: Script::new(SCHEDULE),
            loaded: false,
            redis_run: None,
            restarted: false,
            channels: None,
            counted_at: None,
            channels_refused: false,
            packed: Packed::default(),
        }
    }

    fn run(mut self, rx: Receiver<Outgoing>) {
        // The publisher stops on `Finish`, after the workers, not when shutdown is
        // triggered: its reconnects wait on deadlines and on this, which nobody
        // triggers.
        let never = Shutdown::new();
        let mut conn: Option<Connection> = None;
        let mut held = Held::new(
            self.p.republish_max_bytes,
            self.p.grace,
            self.p.stats.clone(),
        );
        let mut refused = Refused {
            acks: Vec::new(),
            retry_at: Instant::now(),
            pause: FIRST_PAUSE,
            since: None,
        };
        let mut finish_by: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wake = held
                .next_due()
                .unwrap_or(now + Duration::from_secs(1))
                .min(now + Duration::from_secs(1));
            if !refused.acks.is_empty() {
                wake = wake.min(refused.retry_at);
            }
            let mut acks = Vec::new();
            match finish_by {
                None => {
                    let going = gather(&rx, &self.p.backlog, wake, &mut acks);
                    self.p
                        .backlog
                        .taken(acks.len() + usize::from(!going), bytes(&acks));
                    if !going {
                        let now = Instant::now();
                        let by = now + FINISH_GRACE.min(self.p.grace);
                        held.finish(now, by);
                        finish_by = Some(by);
                    }
                }
                Some(by) => std::thread::sleep(wake.min(by).saturating_duration_since(now)),
            }
            let now = Instant::now();
            if !refused.acks.is_empty() && now >= refused.retry_at {
                // The older ones first.
                acks.splice(0..0, refused.acks.drain(..));
            }
            self.drop_orphans(&mut acks);
            let again = held.take_due(now, MAX_BATCH_BYTES);
            let published = again.iter().filter(|r| r.heard).count();
            self.p.stats.metrics.republished.inc_by(published as u64);
            if !acks.is_empty() || !again.is_empty() {
                let Some((acked, republished)) =
                    self.send(&never, &mut conn, &mut acks, again, finish_by)
                else {
                    log::warn!("redis unavailable at shutdown: replies not published");
                    return;
                };
                let now = Instant::now();
                if std::mem::take(&mut self.restarted) {
                    // Those published on the old Redis too.
                    held.clear(republished.len());
                } else {
                    for (r, what) in republished {
                        match what {
                            Republished::Received => {}
                            Republished::Nobody => held.again(r, now),
                            Republished::Heard => held.heard(r, now),
                        }
                    }
                }
                self.settle(acks, acked, &mut held, &mut refused, now);
            }
            if let Some(by) = finish_by {
                let flushed = held.is_empty() && refused.acks.is_empty();
                // The last look, at `by`, covers every held reply, however many
                // takes that is, and those it hears are published: each is
                // dropped after that (its grace ends at `by`).
                if flushed || (Instant::now() >= by && held.is_empty()) {
                    if !refused.acks.is_empty() {
                        log::warn!(
                            "{} acknowledgements still refused at shutdown: their requests may run again",
                            refused.acks.len()
                        );
                    }
                    self.requeue_held(&never, &mut conn, by + Duration::from_secs(5));
                    let dropped = self.p.stats.replies_dropped.load(Ordering::Relaxed);
                    if dropped > 0 {
                        log::info!(
                            "{dropped} replies held for late subscribers were dropped (republish_max_bytes)"
                        );
                    }
                    return;
                }
            }
        }
    }

    /// Acts on what Redis said to each ack: ids acked leave [`InHand`], replies
    /// nobody received are held for republishing, refused acks wait for a retry.
    fn settle(
        &self,
        acks: Vec<Ack>,
        acked: Vec<Acked>,
        held: &mut Held,
        refused: &mut Refused,
        now: Instant,
    ) {
        let mut done = Vec::with_capacity(acks.len());
        let mut why: Option<String> = None;
        for (ack, result) in acks.into_iter().zip(acked) {
            match (ack, result) {
                (Ack::Reply { id, encoded, .. }, Acked::Done { received }) => {
                    done.push(id);
                    if let (Some(e), 0) = (encoded, received) {
                        held.add(id, e, now);
                    }
                }
                (Ack::Delay { id, .. }, Acked::Done { .. }) => done.push(id),
                (ack, Acked::NotHeld) => {
                    log::debug!(
                        "request {} is no longer held here (acknowledged by a send whose answer was lost, or recovered): nothing published",
                        ack.id()
                    );
                    done.push(ack.id());
                }
                (Ack::Reply { id, epoch, encoded }, Acked::AckRefused { received, why: w }) => {
                    refused.acks.push(Ack::Reply {
                        id,
                        epoch,
                        encoded: None,
                    });
                    if let (Some(e), 0) = (encoded, received) {
                        held.add(id, e, now);
                    }
                    why.get_or_insert(w);
                }
                (ack, Acked::AckRefused { why: w, .. }) => {
                    refused.acks.push(ack);
                    why.get_or_insert(w);
                }
                (ack, Acked::Refused(e)) => {
                    refused.acks.push(ack);
                    why.get_or_insert(e);
                }
            }
        }
        self.p.in_hand.remove(done);
        if refused.acks.is_empty() {
            if let Some(since) = refused.since.take() {
                log::warn!(
                    "redis accepts acknowledgements again after {:.1}s",
                    since.elapsed().as_secs_f64()
                );
            }
            refused.pause = FIRST_PAUSE;
        } else {
            if refused.since.is_none() {
                log::warn!(
                    "redis refuses acknowledgements ({}); retrying with back-off, the requests stay in hand",
                    why.as_deref().unwrap_or("?")
                );
                refused.since = Some(now);
            }
            refused.retry_at = now + refused.pause;
            refused.pause = (refused.pause * 2).min(MAX_PAUSE);
        }
    }

    /// Sends one pipeline (see [`Publishing::pipeline`]): the acks, then the
    /// republishes `again`.
    /// Reconnects until it goes through (or, when finishing, until shortly after
    /// `finish_by`). The acks are sent again after a lost answer (the scripts make
    /// that harmless); the republishes are not: they go back to their schedule as
    /// if nobody received them. Returns what Redis said to each ack, and each
    /// republish with whether anybody received it.
    fn send(
        &mut self,
        never: &Shutdown,
        conn: &mut Option<Connection>,
        acks: &mut Vec<Ack>,
        again: Vec<Retry>,
        finish_by: Option<Instant>,
    ) -> Option<Sent> {
        let mut again = again;
        let mut lost: Vec<(Retry, Republished)> = Vec::new();
        let mut give_up = finish_by.map(|by| by + Duration::from_secs(5));
        loop {
            if acks.is_empty() && again.is_empty() {
                return Some((Vec::new(), lost));
            }
            if give_up.is_none() && self.p.stopping.is_triggered() {
                give_up = Some(Instant::now() + FINISH_GRACE + Duration::from_secs(5));
            }
            // Until the server stops, wait for Redis as long as it takes; after, only
            // until `give_up`.
            let signal = if give_up.is_some() {
                never.clone()
            } else {
                self.p.stopping.clone()
            };
            if conn.is_none() {
                match self.p.connector.connect_until(&signal, give_up) {
                    Some(mut c) => {
                        match self.another_redis(&mut c) {
                            // Not for the new Redis: `run` drops them.
                            Ok(true) => {
                                lost.extend(again.drain(..).map(|r| (r, Republished::Nobody)))
                            }
                            Ok(false) => {}
                            // Lost, or refused for now, before Redis said which
                            // run it is: ask again on a new connection, a refusal
                            // after its pause.
                            Err(e) => {
                                if let Failure::Refused(pause) = self.p.connector.failed(&e) {
                                    if give_up.is_some_and(|g| Instant::now() >= g) {
                                        return None;
                                    }
                                    signal.wait_timeout(pause);
                                }
                                continue;
                            }
                        }
                        *conn = Some(c);
                        self.loaded = false;
                        // The reader may have found some gone from a restarted
                        // Redis meanwhile, and taken their ids again.
                        self.drop_orphans(acks);
                    }
                    None if give_up.is_none() => continue,
                    None => return None,
                }
            }
            let c = conn.as_mut()?;
            let unheard = again.iter().filter(|r| !r.heard).count();
            let count = unheard > 0
                && !self.channels_refused
                && self
                    .counted_at
                    .is_none_or(|at| at.elapsed() >= COUNT_CHANNELS_EVERY);
            // A count older than its period is no count: after a quiet spell a
            // neighbour may have subscribed a million channels since, and one
            // `PUBSUB CHANNELS` over them blocks Redis for most of a second. This
            // pipeline looks by name and counts again.
            let look = look_for(
                unheard,
                self.channels.filter(|_| !self.channels_refused && !count),
            );
            let result = self.load(c).and_then(|()| {
                let pipe = self.pipeline(acks, &again, look, count);
                crate::connection::query_packed(c, pipe)
            });
            // Sent: a buffer grown for a large reply is freed now, not at the
            // next batch (which an idle server may not have for hours).
            self.packed.clear();
            match result {
                Ok(results) => {
                    self.p.connector.recovered();
                    let (acked, republished) = self.read(acks, again, look, count, results);
                    lost.extend(republished);
                    return Some((acked, lost));
                }
                Err(e) => match self.p.connector.failed(&e) {
                    Failure::Lost => {
                        *conn = None;
                        // Whether they reached anybody is unknown: back to their
                        // schedule, not sent again at once.
                        lost.extend(again.drain(..).map(|r| (r, Republished::Nobody)));
                    }
                    Failure::Refused(_) if give_up.is_some_and(|g| Instant::now() >= g) => {
                        return None;
                    }
                    // Redis answers but refuses: don't hammer it.
                    Failure::Refused(pause) => {
                        signal.wait_timeout(pause);
                    }
                },
            }
        }
    }

    /// Takes out of `acks` those of requests this instance lost (`InHand::is_orphan`):
    /// nothing is sent for them.
    fn drop_orphans(&self, acks: &mut Vec<Ack>) {
        let before = acks.len();
        acks.retain(|a| !a.is_orphan(&self.p.in_hand));
        if acks.len() < before {
            log::warn!(
                "{} replies not published: their requests were lost from redis (restarted?) while they ran, and their ids may belong to new requests now",
                before - acks.len()
            );
        }
    }

    /// Whether a new connection `c` reaches another run of Redis than the last
    /// (a restart, maybe from an older dump, or a failover; or Redis would not
    /// say): then the replies held for late subscribers are dropped, since their
    /// ids may be given to new requests there, whose callers must never get
    /// them. Requests in hand are not published there either once the reader
    /// found them gone from the processing list (`InHand::is_orphan`), even if
    /// this instance took a new request with the same id meanwhile; those
    /// still listed (`appendonly yes`) are answered. An error if `c` was lost,
    /// or Redis refused for now (`BUSY`, `LOADING`), before Redis said: nothing
    /// is decided then.
    fn another_redis(&mut self, c: &mut Connection) -> RedisResult<bool> {
        let run = crate::connection::run_id(c)?;
        let another = match &self.redis_run {
            Some(before) => run.is_none() || *before != run,
            None => false,
        };
        if another && run.is_none() {
            // An ACL without `INFO` (README): every reconnect is taken for a
            // restart, and the log says why, not "restarted".
            log::warn!(
                "redis does not say which run it is (INFO denied or renamed), so it may be another run: replies held for late subscribers are dropped"
            );
            self.restarted = true;
        } else if another {
            log::warn!(
                "redis is another run than before (restarted?): replies held for late subscribers are dropped"
            );
            self.restarted = true;
        }
        self.redis_run = Some(run);
        if another {
            self.channels = None;
            self.counted_at = None;
        }
        Ok(another)
    }

    /// Loads the scripts into a new connection's Redis (or after a `NOSCRIPT`).
    fn load(&mut self, c: &mut Connection) -> RedisResult<()> {
        if !self.loaded {
            self.reply.load(c)?;
            self.schedule.load(c)?;
            self.loaded = true;
        }
        Ok(())
    }

    /// One `REPLY` call for every reply of the batch, then one `SCHEDULE` call per
    /// delayed request, then the two `PUBLISH` of each held reply whose channel was
    /// heard, then one look (`look`) for the others, then, if `count`, `INFO stats`
    /// for Redis's channel count; [`Publishing::read`] reads them in that order.
    /// Looking costs Redis far less than publishing to nobody, which a reply nobody
    /// waits for (a fire-and-forget caller) would otherwise cost at every step of
    /// its schedule.
    fn pipeline(&mut self, acks: &[Ack], again: &[Retry], look: Look, count: bool) -> &Packed {
        let keys = &self.p.keys;
        let ids = keys.id_prefixes();
        let pipe = &mut self.packed;
        pipe.clear();
        let replies = acks
            .iter()
            .filter(|a| matches!(a, Ack::Reply { .. }))
            .count();
        if replies > 0 {
            pipe.command(4 + 6 * replies)
                .arg("EVALSHA")
                .arg(self.reply.get_hash())
                .uint(1 + 2 * replies as u64)
                .arg(&self.p.processing);
            for a in acks {
                if let Ack::Reply { id, .. } = a {
                    pipe.id_key("", ids.request, *id)
                        .id_key("", ids.fallback, *id);
                }
            }
            for a in acks {
                if let Ack::Reply { id, encoded, .. } = a {
                    pipe.uint(*id);
                    match encoded {
                        Some(e) => pipe.id_key("", ids.reply, *id).arg(&e.json).arg(&e.msgpack),
                        None => pipe.arg("").arg("").arg(""),
                    };
                }
            }
        }
        for ack in acks {
            if let Ack::Delay {
                id, body, delay_ms, ..
            } = ack
            {
                pipe.command(10)
                    .arg("EVALSHA")
                    .arg(self.schedule.get_hash())
                    .uint(4)
                    .arg(keys.delayed())
                    .id_key("", ids.request, *id)
                    .id_key("", ids.fallback, *id)
                    .arg(&self.p.processing)
                    .uint(*delay_ms)
                    .uint(*id)
                    .arg(body);
            }
        }
        for r in again.iter().filter(|r| r.heard) {
            pipe.command(3)
                .arg("PUBLISH")
                .id_key("", ids.reply, r.id)
                .arg(r.json());
            pipe.command(3)
                .arg("PUBLISH")
                .id_key("MSGPACK:", ids.reply, r.id)
                .arg(r.msgpack());
        }
        let unheard = again.iter().filter(|r| !r.heard).count();
        if unheard > 0 {
            match look {
                Look::Named => {
                    pipe.command(2 + 2 * unheard).arg("PUBSUB").arg("NUMSUB");
                    for r in again.iter().filter(|r| !r.heard) {
                        pipe.id_key("", ids.reply, r.id)
                            .id_key("MSGPACK:", ids.reply, r.id);
                    }
                }
                Look::All => {
                    pipe.command(3)
                        .arg("PUBSUB")
                        .arg("CHANNELS")
                        .arg(keys.reply_channel_pattern());
                }
            }
        }
        if count {
            pipe.command(2).arg("INFO").arg("stats");
        }
        &self.packed
    }

    /// After `NOSCRIPT` (someone flushed the scripts), loads them before the next
    /// send.
    fn noscript(&mut self, e: &RedisError) {
        if e.code() == Some("NOSCRIPT") {
            self.loaded = false;
        }
    }

    /// Reads a pipeline's results: one per ack, two per publish of a held reply,
    /// then the look for the others, then Redis's channel count if `count`.
    fn read(
        &mut self,
        acks: &[Ack],
        again: Vec<Retry>,
        look: Look,
        count: bool,
        results: Vec<RedisResult<Value>>,
    ) -> Sent {
        let mut results = results.into_iter();
        let mut next = || {
            results
                .next()
                .unwrap_or_else(|| Err(RedisError::from(std::io::Error::other("missing reply"))))
        };
        let replies = acks
            .iter()
            .filter(|a| matches!(a, Ack::Reply { .. }))
            .count();
        // The one `REPLY` call answers three values per reply, in order.
        let mut of_replies: Vec<Acked> = Vec::with_capacity(replies);
        if replies > 0 {
            match next().and_then(|v| Ok(redis::from_redis_value::<Vec<Value>>(v)?)) {
                Ok(values) if values.len() == 3 * replies => {
                    for v in values.chunks(3) {
                        of_replies.push(
                            match redis::from_redis_value::<(i64, i64, String)>(Value::Array(
                                v.to_vec(),
                            )) {
                                Ok((1, received, _)) => Acked::Done { received },
                                Ok((-1, received, why)) => Acked::AckRefused { received, why },
                                Ok(_) => Acked::NotHeld,
                                Err(e) => Acked::Refused(e.to_string()),
                            },
                        );
                    }
                }
                Ok(values) => {
                    let why = format!("{} values for {replies} replies", values.len());
                    of_replies.extend((0..replies).map(|_| Acked::Refused(why.clone())));
                }
                Err(e) => {
                    self.noscript(&e);
                    let why = e.to_string();
                    of_replies.extend((0..replies).map(|_| Acked::Refused(why.clone())));
                }
            }
        }
        let mut of_replies = of_replies.into_iter();
        let mut acked = Vec::with_capacity(acks.len());
        for ack in acks {
            let outcome = match ack {
                Ack::Reply { .. } => of_replies
                    .next()
                    .unwrap_or_else(|| Acked::Refused("missing reply".into())),
                Ack::Delay { .. } => {
                    match next().and_then(|v| Ok(redis::from_redis_value::<i64>(v)?)) {
                        Ok(1) => Acked::Done { received: 0 },
                        Ok(_) => Acked::NotHeld,
                        Err(e) => {
                            self.noscript(&e);
                            Acked::Refused(e.to_string())
                        }
                    }
                }
            };
            acked.push(outcome);
        }
        let (republished, refused) = republished(again, &mut results, look, &self.p.keys);
        if refused {
            self.channels_refused = true;
        }
        if count {
            // A refused or odd answer: looked at by name until the next count.
            self.channels = results
                .next()
                .and_then(|r| r.ok())
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .and_then(|info| pubsub_channels(&info));
            self.counted_at = Some(Instant::now());
        }
        (acked, republished)
    }

    /// Moves every id still in this instance's processing list back to the head of
    /// the queue, oldest first in line.
    fn requeue_held(&mut self, never: &Shutdown, conn: &mut Option<Connection>, give_up: Instant) {
        let mut moved = 0u64;
        loop {
            if conn.is_none() {
                match self.p.connector.connect_until(never, Some(give_up)) {
                    Some(c) => *conn = Some(c),
                    None => break,
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let r: RedisResult<Option<String>> = redis::cmd("LMOVE")
                .arg(&self.p.processing)
                .arg(self.p.keys.queue())
                .arg("RIGHT")
                .arg("LEFT")
                .query(c);
            match r {
                Ok(Some(_)) => moved += 1,
                Ok(None) => {
                    if moved > 0 {
                        log::info!("returned {moved} unfinished requests to the queue");
                    }
                    if let Err(e) = crate::scheduler::retire(c, &self.p.keys, &self.p.instance) {
                        log::warn!("could not remove this instance's heartbeat: {e}");
                    }
                    return;
                }
                Err(e) => {
                    self.p.connector.broken(&e);
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
            self.p.processing
        );
    }
}

/// Whether Redis has refused a look by name (logged once per process).
static LOOK_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How to look at `unheard` replies, Redis having `channels` channels (`None`:
/// unknown).
fn look_for(unheard: usize, channels: Option<u64>) -> Look {
    match channels {
        Some(c) if c <= CHANNELS_PER_REPLY.saturating_mul(unheard as u64) => Look::All,
        _ => Look::Named,
    }
}

/// `pubsub_channels` of an `INFO stats` answer.
fn pubsub_channels(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("pubsub_channels:"))
        .and_then(|n| n.trim().parse().ok())
}

/// What became of each held reply, from its part of a pipeline's results (see
/// [`Publishing::pipeline`]): two `PUBLISH` counts for each reply that was heard,
/// then one look (`look`) for the others. A missing or unreadable answer
/// counts as nobody, so the reply goes back to its schedule. A look by name Redis
/// refused counts as heard, so the reply is published (blind) at once; a
/// `PUBSUB CHANNELS` Redis refused counts as nobody, and the second value is true:
/// look by name from then on.
fn republished(
    again: Vec<Retry>,
    results: &mut impl Iterator<Item = RedisResult<Value>>,
    look: Look,
    keys: &Keys,
) -> (Vec<(Retry, Republished)>, bool) {
    let (heard, unheard): (Vec<Retry>, Vec<Retry>) = again.into_iter().partition(|r| r.heard);
    let mut out: Vec<(Retry, Republished)> = heard
        .into_iter()
        .map(|r| {
            let received: i64 = results
                .by_ref()
                .take(2)
                .map(|p| p.ok().and_then(|v| redis::from_redis_value(v).ok()))
                .map(|n: Option<i64>| n.unwrap_or(0))
                .sum();
            let what = if received > 0 {
                Republished::Received
            } else {
                Republished::Nobody
            };
            (r, what)
        })
        .collect();
    if unheard.is_empty() {
        return (out, false);
    }
    let answer = match results.next() {
        Some(Ok(v)) => redis::from_redis_value::<Vec<Value>>(v).unwrap_or_default(),
        Some(Err(e)) if !crate::connection::is_lost(&e) && look == Look::All => {
            log::warn!("redis refuses PUBSUB CHANNELS ({e}): looking for late subscribers by name");
            out.extend(unheard.into_iter().map(|r| (r, Republished::Nobody)));
            return (out, true);
        }
        Some(Err(e)) if !crate::connection::is_lost(&e) => {
            // Redis refuses the look (an ACL without `PUBSUB`, a renamed
            // command): publish on the schedule instead, as before looks,
            // or a late subscriber would never get its reply.
            if !LOOK_REFUSED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "redis refuses PUBSUB NUMSUB ({e}): replies held for late subscribers are published again blind"
                );
            }
            out.extend(unheard.into_iter().map(|r| (r, Republished::Heard)));
            return (out, false);
        }
        _ => Vec::new(),
    };
    let subscribed: Vec<bool> = match look {
        // `[channel, count, channel, count, ...]`, two channels per reply; an
        // answer that is not that counts as nobody.
        Look::Named => {
            let counts: Vec<i64> = answer
                .into_iter()
                .skip(1)
                .step_by(2)
                .map(|n| redis::from_redis_value::<i64>(n).unwrap_or(0))
                .collect();
            (0..unheard.len())
                .map(|i| counts.get(2 * i).unwrap_or(&0) + counts.get(2 * i + 1).unwrap_or(&0) > 0)
                .collect()
        }
        // The channels that have a subscriber; names not ours are skipped.
        Look::All => {
            let ids: HashSet<u64> = answer
                .into_iter()
                .filter_map(|v| match v {
                    Value::BulkString(name) => keys.reply_channel_id(&name),
                    _ => None,
                })
                .collect();
            unheard.iter().map(|r| ids.contains(&r.id)).collect()
        }
    };
    out.extend(unheard.into_iter().zip(subscribed).map(|(r, yes)| {
        let what = if yes {
            Republished::Heard
        } else {
            Republished::Nobody
        };
        (r, what)
    }));
    (out, false)
}

/// Takes what the workers sent into `acks`: waits for the first until `wake`, then
/// takes what else is waiting, up to [`MAX_BATCH`] requests and about
/// [`MAX_BATCH_BYTES`]. False once it was told to finish.
fn gather(rx: &Receiver<Outgoing>, backlog: &Backlog, wake: Instant, acks: &mut Vec<Ack>) -> bool {
    // Asleep on the backlog's count, not in the channel (see `Backlog`).
    let first = if backlog.wait_more(wake) {
        rx.recv_deadline(wake)
    } else {
        // Nothing was counted; a closed channel is noticed here.
        rx.try_recv().map_err(|e| match e {
            TryRecvError::Empty => RecvTimeoutError::Timeout,
            TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
        })
    };
    let first = match first {
        Ok(msg) => msg,
        Err(RecvTimeoutError::Disconnected) => return false,
        Err(RecvTimeoutError::Timeout) => return true,
    };
    let Some(ack) = to_ack(first) else {
        return false;
    };

    let mut bytes = ack.bytes();
    acks.push(ack);
    while acks.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        let Ok(msg) = rx.try_recv() else { break };
        let Some(ack) = to_ack(msg) else {
            return false;
        };
        bytes += ack.bytes();
        acks.push(ack);
    }
    true
}

fn bytes(acks: &[Ack]) -> usize {
    acks.iter().map(Ack::bytes).sum()
}

/// The work a message asks for; `None` for `Finish`.
fn to_ack(msg: Outgoing) -> Option<Ack> {
    match msg {
        Outgoing::Reply { id, epoch, encoded } => Some(Ack::Reply { id, epoch, encoded }),
        Outgoing::Delay {
            id,
            epoch,
            body,
            delay_ms,
        } => Some(Ack::Delay {
            id,
            epoch,
            body,
            delay_ms,
        }),
        Outgoing::Finish => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(n: usize) -> Encoded {
        Encoded {
            json: vec![b'j'; n],
            msgpack: vec![b'm'; n],
        }
    }

    /// Publishes every due reply at its due time to nobody, until none is left;
    /// returns the times (ms after the first publish) of the republishes.
    fn schedule_of(grace_ms: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let mut held = Held::new(1 << 20, Duration::from_millis(grace_ms), Arc::default());
        held.add(1, reply(10), t0);
        let mut times = Vec::new();
        while let Some(due) = held.next_due() {
            for r in held.take_due(due, usize::MAX) {
                times.push((due - t0).as_millis() as u64);
                held.again(r, due);
            }
        }
        times
    }

    fn held_reply(id: u64, heard: bool) -> Retry {
        let now = Instant::now();
        Retry {
            due: now,
            wait: FIRST_RETRY,
            give_up: now + Duration::from_secs(5),
            id,
            both: b"jm".to_vec().into_boxed_slice(),
            json_len: 1,
            seq: id,
            heard,
        }
    }

    fn outcomes(again: Vec<Retry>, results: Vec<RedisResult<Value>>) -> Vec<(u64, Republished)> {
        republished(
            again,
            &mut results.into_iter(),
            Look::Named,
            &Keys::new("P", 0),
        )
        .0
        .into_iter()
        .map(|(r, what)| (r.id, what))
        .collect()
    }

    #[test]
    fn a_held_reply_is_published_only_once_its_channel_has_a_subscriber() {
        let channel = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        // Heard replies come first (two PUBLISH counts each), then one NUMSUB for
        // the others: a subscriber on either channel counts.
        let got = outcomes(
            vec![
                held_reply(1, false),
                held_reply(2, true),
                held_reply(3, false),
                held_reply(4, true),
            ],
            vec![
                Ok(Value::Int(0)),
                Ok(Value::Int(1)),
                Ok(Value::Int(0)),
                Ok(Value::Int(0)),
                Ok(Value::Array(vec![
                    channel("R1"),
                    Value::Int(0),
                    channel("MSGPACK:R1"),
                    Value::Int(1),
                    channel("R3"),
                    Value::Int(0),
                    channel("MSGPACK:R3"),
                    Value::Int(0),
                ])),
            ],
        );
        assert_eq!(
            got,
            vec![
                (2, Republished::Received),
                (4, Republished::Nobody),
                (1, Republished::Heard),
                (3, Republished::Nobody),
            ]
        );
    }

    #[test]
    fn a_lost_or_odd_answer_about_held_replies_counts_as_nobody() {
        let refused = || Err(RedisError::from(std::io::Error::other("gone")));
        let got = outcomes(
            vec![held_reply(1, true), held_reply(2, false)],
            vec![refused()],
        );
        assert_eq!(
            got,
            vec![(1, Republished::Nobody), (2, Republished::Nobody)]
        );
        let got = outcomes(vec![held_reply(3, false)], vec![Ok(Value::Int(7))]);
        assert_eq!(got, vec![(3, Republished::Nobody)]);
    }

    /// An ACL without `PUBSUB`: the look is refused, so the replies are
    /// published at once (blind), not held unheard until their grace ends.
    #[test]
    fn a_refused_look_publishes_the_held_replies() {
        let noperm = || {
            Err(RedisError::from((
                redis::ErrorKind::Extension,
                "NOPERM",
                "no permissions to run the 'pubsub|numsub' command".to_string(),
            )))
        };
        let got = outcomes(
            vec![held_reply(1, false), held_reply(2, false)],
            vec![noperm()],
        );
        assert_eq!(got, vec![(1, Republished::Heard), (2, Republished::Heard)]);
    }

    #[test]
    fn one_channels_look_is_chosen_only_where_redis_has_few_channels() {
        // Unknown: by name, whatever the number of replies.
        assert_eq!(look_for(1000, None), Look::Named);
        assert_eq!(look_for(1, Some(0)), Look::All);
        assert_eq!(look_for(10, Some(40)), Look::All);
        assert_eq!(look_for(10, Some(41)), Look::Named);
        assert_eq!(look_for(1, Some(u64::MAX)), Look::Named);
        assert_eq!(look_for(usize::MAX, Some(u64::MAX)), Look::All);
    }

    #[test]
    fn redis_channel_count_is_read_from_info_stats() {
        let info = "# Stats\r\ntotal_connections_received:4\r\npubsub_channels:17\r\npubsub_patterns:0\r\n";
        assert_eq!(pubsub_channels(info), Some(17));
        assert_eq!(pubsub_channels("# Stats\r\npubsub_patterns:0\r\n"), None);
        assert_eq!(pubsub_channels("pubsub_channels:many\r\n"), None);
    }

    fn all_look(again: Vec<Retry>, answer: RedisResult<Value>) -> (Vec<(u64, Republished)>, bool) {
        let keys = Keys::new("P", 0);
        let (out, refused) = republished(again, &mut vec![answer].into_iter(), Look::All, &keys);
        (
            out.into_iter().map(|(r, what)| (r.id, what)).collect(),
            refused,
        )
    }

    #[test]
    fn a_channels_look_finds_replies_by_either_channel_and_skips_other_names() {
        let keys = Keys::new("P", 0);
        let name = |s: String| Value::BulkString(s.into_bytes());
        let got = all_look(
            vec![
                held_reply(1, false),
                held_reply(2, false),
                held_reply(3, false),
            ],
            Ok(Value::Array(vec![
                name(keys.reply_channel(2)),
                name(keys.msgpack_channel(3)),
                name(Keys::new("P", 1).reply_channel(1)),
                name("actioncable:room:1".into()),
                Value::Int(1),
            ])),
        );
        assert_eq!(
            got,
            (
                vec![
                    (1, Republished::Nobody),
                    (2, Republished::Heard),
                    (3, Republished::Heard),
                ],
                false
            )
        );
    }

    /// An ACL allowing `PUBSUB NUMSUB` but not `PUBSUB CHANNELS`: nothing is
    /// published blind; the next looks are by name.
    #[test]
    fn a_refused_channels_look_falls_back_to_looking_by_name() {
        let noperm = Err(RedisError::from((
            redis::ErrorKind::Extension,
            "NOPERM",
            "no permissions to run the 'pubsub|channels' command".to_string(),
        )));
        assert_eq!(
            all_look(vec![held_reply(1, false)], noperm),
            (vec![(1, Republished::Nobody)], true)
        );
        let lost = Err(RedisError::from(std::io::Error::other("gone")));
        assert_eq!(
            all_look(vec![held_reply(1, false)], lost),
            (vec![(1, Republished::Nobody)], false)
        );
    }

    #[test]
    fn a_heard_reply_is_due_at_once_and_back_on_its_schedule_if_nobody_got_it() {
        let t0 = Instant::now();
        let mut held = Held::new(1 << 20, Duration::from_secs(5), Arc::default());
        held.add(1, reply(10), t0);
        let first = held.take_due(t0 + FIRST_RETRY, usize::MAX);
        assert_eq!(first.len(), 1);
        let later = t0 + Duration::from_millis(3);
        for r in first {
            held.heard(r, later);
        }
        assert_eq!(held.next_due(), Some(later));
        let heard = held.take_due(later, usize::MAX);
        assert!(heard.iter().all(|r| r.heard));
        for r in heard {
            held.again(r, later);
        }
        let due = held.next_due().expect("still held");
        assert!(due > later);
        assert!(held.take_due(due, usize::MAX).iter().all(|r| !r.heard));
    }

    #[test]
    fn the_last_republish_is_at_the_grace_end() {
        assert_eq!(
            schedule_of(5_000),
            [2, 8, 26, 80, 242, 728, 2186, 5000],
            "2 ms, then ×3, and once more at the end"
        );
        assert_eq!(schedule_of(100), [2, 8, 26, 80, 100]);
        assert_eq!(schedule_of(0), Vec::<u64>::new());
    }

    #[test]
    fn the_cap_drops_the_oldest_and_counts() {
        let stats = Arc::new(Stats::default());
        let t0 = Instant::now();
        let one = 2 * 1000 + ENTRY_OVERHEAD;
        let mut held = Held::new(3 * one, Duration::from_secs(5), stats.clone());
        for id in 1..=5 {
            held.add(id, reply(1000), t0);
        }
        assert!(held.bytes <= 3 * one);
        assert_eq!(stats.replies_dropped.load(Ordering::Relaxed), 2);
        let kept: Vec<u64> = held.ids();
        assert_eq!(kept, [3, 4, 5]);
        // A republish put back keeps its age: it is dropped before younger ones.
        let due = held.next_due().expect("due");
        let taken = held.take_due(due, usize::MAX);
        assert_eq!(taken.len(), 3);
        for r in taken {
            held.again(r, due);
        }
        held.add(6, reply(1000), due);
        let kept: Vec<u64> = held.ids();
        assert_eq!(kept, [4, 5, 6]);
        assert_eq!(stats.replies_dropped.load(Ordering::Relaxed), 3);
        // A reply larger than the cap is not held at all, and pushes out nothing.
        held.add(7, reply(4 * one), due);
        let kept: Vec<u64> = held.ids();
        assert_eq!(kept, [4, 5, 6]);
        assert_eq!(stats.replies_dropped.load(Ordering::Relaxed), 4);
    }

    /// A repeatable pseudo-random sequence (xorshift from `seed`): each call
    /// answers a number below its argument.
    fn below(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = seed;
        move |n| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        }
    }

    /// One reply as `Held` kept each before groups: the reference the groups
    /// must match.
    struct Single {
        id: u64,
        due: Instant,
        wait: Duration,
        give_up: Instant,
    }

    /// Replies added in batches over 3 s of simulated time, a tenth of each
    /// look heard, takes limited in bytes now and then, and a cap that drops:
    /// after every step `Held` holds exactly the replies a reply-by-reply
    /// schedule holds, takes none before it is due, and drops the oldest.
    #[test]
    fn grouped_replies_keep_each_replys_schedule_and_age() {
        let t0 = Instant::now();
        let one = 2 * 10 + ENTRY_OVERHEAD;
        let cap = 60 * one;
        let grace = Duration::from_millis(400);
        let mut held = Held::new(cap, grace, Arc::default());
        // By seq: the order of arrival, as `Held` counts it.
        let mut model: BTreeMap<u64, Single> = BTreeMap::new();
        let mut seq = 0u64;
        let mut next = below(0x2545_f491_4f6c_dd1d);
        for ms in 0..3_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if ms < 2_000 && next(3) == 0 {
                for _ in 0..next(8) {
                    let id = seq + 1000;
                    held.add(id, reply(10), now);
                    let single = Single {
                        id,
                        due: now + FIRST_RETRY,
                        wait: FIRST_RETRY,
                        give_up: now + grace,
                    };
                    model.insert(seq, single);
                    seq += 1;
                    while model.len() * one > cap {
                        model.pop_first();
                    }
                }
            }
            let limit = if next(4) == 0 { 3 * 20 } else { usize::MAX };
            let taken = held.take_due(now, limit);
            let mut heard = Vec::new();
            for r in taken {
                let m = model.get_mut(&r.seq).expect("a held reply");
                assert_eq!(m.id, r.id);
                assert!(m.due <= now, "reply {} taken before it was due", r.id);
                if next(10) == 0 {
                    m.due = now;
                    heard.push(r);
                } else if now >= m.give_up {
                    model.remove(&r.seq);
                } else {
                    m.wait *= RETRY_FACTOR;
                    m.due = (now + m.wait).min(m.give_up);
                    held.again(r, now);
                }
            }
            let heard_now: HashSet<u64> = heard.iter().map(|r| r.id).collect();
            for r in heard {
                held.heard(r, now);
            }
            if limit == usize::MAX {
                let late: Vec<u64> = model
                    .values()
                    .filter(|m| m.due <= now && !heard_now.contains(&m.id))
                    .map(|m| m.id)
                    .collect();
                assert!(late.is_empty(), "at {ms} ms, due and not taken: {late:?}");
            }
            // Groups interleave in age (a heard reply leaves its group), so
            // compare as sets; the oldest is still the first group's first.
            let ids: Vec<u64> = model.values().map(|m| m.id).collect();
            let mut held_ids = held.ids();
            held_ids.sort_unstable();
            assert_eq!(held_ids, ids, "at {ms} ms");
        }
        assert!(held.is_empty(), "all given up after the grace");
        assert!(seq > 300, "enough replies went through: {seq}");
    }

    /// One reply of any size as `Held` kept each before groups.
    struct Sized {
        due: Instant,
        wait: Duration,
        give_up: Instant,
        heard: bool,
        cost: usize,
    }

    /// The reference `Held` must match: replies by `seq`, with the cap applied
    /// reply by reply.
    #[derive(Default)]
    struct Model {
        replies: BTreeMap<u64, Sized>,
        bytes: usize,
        dropped: u64,
    }

    impl Model {
        fn insert(&mut self, seq: u64, r: Sized, cap: usize) {
            if r.cost > cap {
                self.dropped += 1;
                return;
            }
            self.bytes += r.cost;
            self.replies.insert(seq, r);
            while self.bytes > cap {
                let (_, old) = self.replies.pop_first().expect("over the cap");
                self.bytes -= old.cost;
                self.dropped += 1;
            }
        }
    }

    /// Replies of any size (some larger than the cap) over 3 s of simulated
    /// time, takes limited to a byte, a few hundred, a few thousand or nothing,
    /// a tenth of each look heard and a tenth received, then a stop: after every
    /// step `Held` holds exactly the replies, bytes and drops of a reply-by-reply
    /// model, its next due is the model's earliest, and it takes none early.
    #[test]
    fn grouped_replies_of_any_size_match_reply_by_reply_through_drops_splits_and_a_stop() {
        let t0 = Instant::now();
        let cap = 20_000;
        let grace = Duration::from_millis(400);
        let stats = Arc::new(Stats::default());
        let mut held = Held::new(cap, grace, stats.clone());
        let mut model = Model::default();
        let mut seq = 0u64;
        let mut next = below(0x9e37_79b9_7f4a_7c15);
        let stop = t0 + Duration::from_millis(2_500);
        for ms in 0..3_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if now == stop {
                let by = now + Duration::from_millis(100);
                held.finish(now, by);
                for m in model.replies.values_mut() {
                    m.due = now;
                    m.give_up = m.give_up.min(by);
                }
            }
            if ms < 2_000 && next(3) == 0 {
                for _ in 0..next(8) {
                    let n = if next(50) == 0 {
                        12_000
                    } else {
                        1 + next(3_000) as usize
                    };
                    held.add(seq + 1000, reply(n), now);
                    let single = Sized {
                        due: now + FIRST_RETRY,
                        wait: FIRST_RETRY,
                        give_up: now + grace,
                        heard: false,
                        cost: 2 * n + ENTRY_OVERHEAD,
                    };
                    model.insert(seq, single, cap);
                    seq += 1;
                }
            }
            let limit = [usize::MAX, 1, 500, 5_000][next(4) as usize];
            for r in held.take_due(now, limit) {
                let mut m = model.replies.remove(&r.seq).expect("a held reply");
                model.bytes -= m.cost;
                assert_eq!(r.id, r.seq + 1000);
                assert!(m.due <= now, "reply {} taken before it was due", r.id);
                match next(10) {
                    0 => {
                        m.due = now;
                        m.heard = true;
                        model.insert(r.seq, m, cap);
                        held.heard(r, now);
                    }
                    1 => {}
                    _ if now >= m.give_up => {}
                    _ => {
                        m.wait *= RETRY_FACTOR;
                        m.due = (now + m.wait).min(m.give_up);
                        m.heard = false;
                        model.insert(r.seq, m, cap);
                        held.again(r, now);
                    }
                }
            }
            let ids: Vec<u64> = model.replies.keys().map(|s| s + 1000).collect();
            let mut held_ids = held.ids();
            held_ids.sort_unstable();
            assert_eq!(held_ids, ids, "at {ms} ms");
            assert_eq!(held.bytes, model.bytes, "at {ms} ms");
            assert!(held.bytes <= cap);
            assert_eq!(stats.replies_dropped.load(Ordering::Relaxed), model.dropped);
            let earliest = model.replies.values().map(|m| m.due).min();
            assert_eq!(held.next_due(), earliest, "at {ms} ms");
            if limit == usize::MAX {
                let late = model
                    .replies
                    .values()
                    .any(|m| m.due < now || (m.due == now && !m.heard));
                assert!(!late, "at {ms} ms, due and not taken");
            }
        }
        assert!(held.is_empty(), "none held past the stop");
        assert!(model.dropped > 50, "the cap dropped: {}", model.dropped);
        assert!(seq > 300, "enough replies went through: {seq}");
    }

    /// One pipeline's replies are one group: a take limited in bytes splits it,
    /// and the rest is taken next, at the same due.
    #[test]
    fn a_group_split_by_a_take_leaves_the_rest_due() {
        let t0 = Instant::now();
        let mut held = Held::new(1 << 20, Duration::from_secs(5), Arc::default());
        for id in 1..=5 {
            held.add(id, reply(10), t0);
        }
        assert_eq!(held.groups.len(), 1);
        let due = held.next_due().expect("due");
        let first: Vec<u64> = held.take_due(due, 40).iter().map(|r| r.id).collect();
        assert_eq!(first, [1, 2]);
        assert_eq!(held.next_due(), Some(due));
        let rest: Vec<u64> = held
            .take_due(due, usize::MAX)
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(rest, [3, 4, 5]);
        assert!(held.is_empty());
    }

    /// A stop looks for every held reply at once, whatever its back-off, then
    /// keeps to its schedule, the last time at the stop's end, and holds none past
    /// it.
    #[test]
    fn a_stop_looks_for_every_held_reply_at_once_and_last_at_its_end() {
        let t0 = Instant::now();
        let mut held = Held::new(1 << 20, Duration::from_secs(5), Arc::default());
        for id in 1..=3 {
            held.add(id, reply(10), t0);
        }
        // Republished to nobody until the look at 2,186 ms; the next is at 5 s.
        let mut now = t0;
        while let Some(due) = held
            .next_due()
            .filter(|d| *d <= t0 + Duration::from_millis(2_186))
        {
            now = due;
            for r in held.take_due(due, usize::MAX) {
                held.again(r, due);
            }
        }
        assert_eq!(held.next_due(), Some(t0 + Duration::from_secs(5)));
        let stop = now + Duration::from_millis(100);
        let by = stop + FINISH_GRACE;
        held.finish(stop, by);
        assert_eq!(held.groups.len(), 1, "still one group");
        let mut looks = Vec::new();
        while let Some(due) = held.next_due() {
            let taken = held.take_due(due, usize::MAX);
            assert_eq!(taken.len(), 3);
            looks.push(due);
            for r in taken {
                held.again(r, due);
            }
        }
        assert_eq!(looks, [stop, by], "at once, then at the stop's end");
        assert!(held.is_empty());
        // One published to nobody after the stop began (the last batch, sent
        // with the stop) is not held past it either.
        let stop = by - Duration::from_millis(10);
        let mut held = Held::new(1 << 20, Duration::from_secs(5), Arc::default());
        held.finish(stop, by);
        held.add(4, reply(10), stop);
        let mut last = stop;
        while let Some(due) = held.next_due() {
            last = due;
            for r in held.take_due(due, usize::MAX) {
                held.again(r, due);
            }
        }
        assert_eq!(last, by, "its last look at the stop's end");
    }

    #[test]
    fn nothing_is_held_when_republishing_is_off() {
        let mut held = Held::new(0, Duration::from_secs(5), Arc::default());
        held.add(1, reply(10), Instant::now());
        assert!(held.is_empty());
    }
}
