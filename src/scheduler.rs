//! The scheduler thread: the server's time-driven work in Redis. Every tick it
//! moves delayed requests that have come due from `P-DELAYED` to the head of the
//! queue (one script, so each runs once across all instances, by the Redis
//! server's clock); every second it renews this instance's heartbeat and returns
//! to the queue what dead instances (heartbeat expired) still held, and writes this
//! instance's dashboard snapshot (`dashboard/snapshot.rs`). It does the
//! recovery at start-up too. A command Redis refuses (`MISCONF`, a wrong-typed key)
//! keeps the connection and slows the ticks down (`Connector::refused`); only a
//! lost connection is reopened. Not for: deadlines of running calls or `halt` (the
//! in-process timer, `timer.rs`), or taking requests (`reader.rs`).

use crate::connection::{Connector, Failure};
use crate::protocol::Keys;
use crate::shutdown::Shutdown;
use redis::{Connection, RedisResult};
use std::sync::LazyLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often due delayed requests are looked for: bounds their lateness.
const TICK: Duration = Duration::from_millis(10);
/// How often the heartbeat is renewed and dead instances are looked for.
const EVERY: Duration = Duration::from_secs(1);
/// How long a heartbeat lives without renewal: an instance silent this long is
/// dead, and its requests go back to the queue.
pub(crate) const HEARTBEAT_TTL: Duration = Duration::from_secs(5);
/// Most due requests moved per tick.
const MOVE_BATCH: usize = 1000;

/// KEYS: delayed, queue. ARGV: max. Moves due ids to the queue head, earliest first.
const MOVE_DUE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for i = #due, 1, -1 do
  redis.call('ZREM', KEYS[1], due[i])
  redis.call('LPUSH', KEYS[2], due[i])
end
return #due
";

/// KEYS: heartbeat, processing (of the instance), queue, instances, its pause
/// (`P-PAUSED-{instance}`). ARGV: instance. If the instance's heartbeat is gone,
/// returns its held ids to the queue head and forgets its pause.
const RECOVER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT') do n = n + 1 end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5])
return n
";

/// KEYS: delayed, request key, fallback key, processing. ARGV: delay ms, id, body.
/// Stores a delayed request (without its delay) and releases it from this
/// instance, only if it is still held here and not stored already: the publisher
/// sends it again when an answer was lost, and by then the request may have come
/// due and been taken again (its stored body is then the one without the delay).
/// Returns 1 when stored, 0 when there was nothing to do. Its ms are rounded up,
/// where `MOVE_DUE`'s are rounded down: rounded down here too, a request stored
/// at 1000.9 ms with a delay of 5 was due at 1005, 0.9 ms before its delay had
/// passed (`loadgen --workload delay` saw a reply 28 µs early).
pub(crate) const SCHEDULE: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[3] then return 0 end
if redis.call('LREM', KEYS[4], 1, ARGV[2]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.ceil(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return 1
";

/// Settings of the scheduler thread.
pub(crate) struct Scheduler {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    pub(crate) shutdown: Shutdown,
    /// This instance's counters, written to Redis as its dashboard snapshot
    /// with each heartbeat.
    pub(crate) snapshot: crate::dashboard::snapshot::Live,
}

/// Starts the scheduler thread.
pub(crate) fn start(s: Scheduler) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-scheduler".into())
        .spawn(move || s.run())
}

impl Scheduler {
    fn run(mut self) {
        let move_due = redis::Script::new(MOVE_DUE);
        let recover = redis::Script::new(RECOVER);
        let mut conn: Option<Connection> = None;
        let mut next_upkeep = Instant::now();
        while !self.shutdown.is_triggered() {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connector.connect(&self.shutdown) {
                    Some(c) => conn.insert(c),
                    None => break,
                },
            };
            // The two jobs fail apart: a wrong-typed P-DELAYED must not stop the
            // heartbeat, nor a wrong-typed P-INSTANCES the due requests.
            let upkeep = if Instant::now() >= next_upkeep {
                let done = beat(c, &self.keys, &self.instance)
                    .and_then(|()| self.recover_dead(c, &recover))
                    .and_then(|()| self.snapshot.publish(c, &self.keys, &self.instance));
                if done.is_ok() {
                    next_upkeep = Instant::now() + EVERY;
                }
                done
            } else {
                Ok(())
            };
            let moved = move_due
                .key(self.keys.delayed())
                .key(self.keys.queue())
                .arg(MOVE_BATCH)
                .invoke::<usize>(c)
                .map(|moved| {
                    if moved > 0 {
                        log::debug!("{moved} delayed requests came due");
                    }
                });
            let pause = match upkeep.and(moved) {
                Ok(()) => {
                    self.connector.recovered();
                    TICK
                }
                Err(e) => match self.connector.failed(&e) {
                    // `connect` paces the reconnects.
                    Failure::Lost => {
                        conn = None;
                        TICK
                    }
                    // Redis answers, and refuses: keep the connection, slow down.
                    // The back-off stays under the heartbeat's life (2 s < 5 s).
                    Failure::Refused(pause) => pause,
                },
            };
            self.shutdown.wait_timeout(pause);
        }
    }

    fn recover_dead(&self, c: &mut Connection, recover: &redis::Script) -> RedisResult<()> {
        let instances: Vec<String> = redis::cmd("SMEMBERS").arg(self.keys.instances()).query(c)?;
        for other in instances.iter().filter(|i| **i != self.instance) {
            let n: i64 = recover
                .key(self.keys.heartbeat(other))
                .key(self.keys.processing(other))
                .key(self.keys.queue())
                .key(self.keys.instances())
                .key(self.keys.paused(other))
                .arg(other)
                .invoke(c)?;
            if n > 0 {
                log::warn!(
                    "instance {other} is gone: returned its {n} unfinished requests to the queue"
                );
            } else if n == 0 {
                log::info!("instance {other} is gone; it held no requests");
            }
        }
        Ok(())
    }
}

/// KEYS: heartbeat, instances. ARGV: instance, heartbeat life in ms. Registers the
/// instance and renews its heartbeat in one step, so a heartbeat never exists for
/// an instance missing from the set (`RECOVER` removes both in one step too), and
/// a refused `SADD` (a wrong-typed set) renews nothing.
const BEAT: &str = r"
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], 1, 'PX', ARGV[2])
return 1
";

/// Registers `instance` as alive for [`HEARTBEAT_TTL`]. The reader calls it too,
/// before it takes anything, and whenever it finds its heartbeat gone, so no
/// request is ever held by an unregistered instance.
pub(crate) fn beat(c: &mut Connection, keys: &Keys, instance: &str) -> RedisResult<()> {
    // Built once: a `Script` hashes its source when built.
    static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BEAT));
    SCRIPT
        .key(keys.heartbeat(instance))
        .key(keys.instances())
        .arg(instance)
        .arg(HEARTBEAT_TTL.as_millis() as u64)
        .invoke::<i64>(c)
        .map(|_| ())
}

/// Removes this instance's heartbeat and its entry in the instance set: called by
/// the publisher at the end of a graceful stop, after the requeue.
pub(crate) fn retire(c: &mut Connection, keys: &Keys, instance: &str) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.cmd("DEL")
        .arg(keys.heartbeat(instance))
        .ignore()
        .cmd("SREM")
        .arg(keys.instances())
        .arg(instance)
        .ignore();
    crate::dashboard::snapshot::forget(&mut pipe, keys, instance);
    pipe.query(c)
}
