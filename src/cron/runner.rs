//! The cron thread (`cerbas-cron`). It reads CRONTAB at start and polls it every
//! 500 ms (its contents, so an edit within the same second counts), logging which
//! entries were added and removed; a bad line is logged and skipped, a missing file
//! logged once. At each tick of each entry it runs [`CLAIM`], one script that,
//! only if the tick's claim key (`P-CRON-TICK-{entry}-{tick}`, expiring after
//! [`CLAIM_TTL`]) does not exist yet, creates it, writes the tick's request under
//! a new id and pushes the id on the queue, exactly as a client would. So each tick
//! runs once across every instance on the Redis, and a tick that was claimed is an
//! ordinary durable request: the reader, the reliable queue and the recovery of
//! dead instances take it from there, and a slow entry holds a worker like any
//! request, never this thread. It also records the outcome of cron runs (sent by
//! the dispatcher of this instance, whoever claimed them) in `P-CRON-LAST-{entry}`.
//! It stops claiming when shutdown is triggered and recording once the drain is
//! over (`stopping`). Ticks missed while no instance ran are not replayed; a tick
//! this instance could not claim for over [`CATCH_UP`] (Redis away) is skipped.
//! Not for: parsing (`parse.rs`, `schedule.rs`) or running the function (the
//! dispatcher, on a worker).

use super::parse::{parse_crontab, Entry, Known};
use super::schedule::Zone;
use crate::connection::{Connector, Failure};
use crate::job::{unix_ms, CronRun, CronTable, Outcome};
use crate::protocol::Keys;
use crate::shutdown::Shutdown;
use crossbeam_channel::{select, Receiver};
use redis::{Connection, RedisResult};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often CRONTAB is read again: an edit takes effect within this (plus the
/// read), well inside the 2 s promised.
const POLL: Duration = Duration::from_millis(500);
/// How late a tick may still be claimed (after a Redis outage, a stalled host).
/// Older ticks are skipped and logged.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(60);
/// How long a claim lives: longer than [`CATCH_UP`] plus any sane clock skew
/// between instances, so no instance can claim a tick again.
pub(crate) const CLAIM_TTL: Duration = Duration::from_secs(600);
/// How long an entry's last outcome is kept after its last run: past a year, so
/// even a `@yearly` entry shows its last run.
const LAST_TTL_SECS: u64 = 400 * 86_400;

/// KEYS: claim, counter, queue. ARGV: claim life in ms, request key prefix, body.
/// Claims one tick and turns it into a request, as a client would write it (INCR,
/// SET, RPUSH), in one step: a crash cannot leave a claim without its request.
/// Returns the new id, or 0 when the tick was claimed already. Redis does not undo
/// a script's writes when a later command fails, so what can fail (a wrong-typed
/// queue or counter) is checked, or written, before the others.
pub(crate) const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local queue = redis.call('TYPE', KEYS[3]).ok
if queue ~= 'list' and queue ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[3] .. ' is not a list')
end
local id = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], id, 'PX', ARGV[1])
redis.call('SET', ARGV[2] .. string.format('%010d', id), ARGV[3])
redis.call('RPUSH', KEYS[3], id)
return id
";

/// KEYS: last. ARGV: outcome (ok, error, timeout), message, at ms, duration ms,
/// tick, func, instance, life in s. Counts the run, and keeps it as the entry's
/// last unless a later tick's run is recorded already (runs can end out of order).
const RECORD: &str = r"
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HINCRBY', KEYS[1], 'count_' .. ARGV[1], 1)
local last = tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1')
if tonumber(ARGV[5]) >= last then
  redis.call('HSET', KEYS[1], 'outcome', ARGV[1], 'message', ARGV[2], 'at_ms', ARGV[3],
    'duration_ms', ARGV[4], 'tick', ARGV[5], 'func', ARGV[6], 'instance', ARGV[7])
end
redis.call('EXPIRE', KEYS[1], ARGV[8])
return 1
";

/// Settings of the cron thread.
pub(crate) struct Cron {
    pub(crate) connector: Connector,
    pub(crate) keys: Keys,
    pub(crate) instance: String,
    /// CRONTAB; empty: no entries (outcomes are still recorded).
    pub(crate) path: PathBuf,
    pub(crate) zone: Zone,
    pub(crate) known: Known,
    /// Stop claiming.
    pub(crate) shutdown: Shutdown,
    /// Stop recording (the drain is over).
    pub(crate) stopping: Shutdown,
    pub(crate) runs: Receiver<CronRun>,
    /// Where the entries and their next ticks are shown (the dashboard).
    pub(crate) table: CronTable,
}

/// Runs `entry` now, outside its schedule, through [`CLAIM`] as a tick is: its
/// request is written and queued exactly as a tick's, tagged with the current
/// second, under a claim key of its own (`P-CRON-NOW-{entry}-{ms}`), so it takes
/// no scheduled tick's place and a repeated click within the same ms runs once.
/// Returns the new request's id (0: claimed already).
pub(crate) fn run_now(
    c: &mut Connection,
    keys: &Keys,
    entry: &Entry,
    now_ms: i64,
) -> RedisResult<u64> {
    redis::Script::new(CLAIM)
        .key(keys.key(&format!("CRON-NOW-{}-{now_ms}", entry.id)))
        .key(keys.counter())
        .key(keys.queue())
        .arg(CLAIM_TTL.as_millis() as u64)
        .arg(keys.request_prefix())
        .arg(entry.body(now_ms.div_euclid(1000)))
        .invoke(c)
}

/// Starts the cron thread.
pub(crate) fn start(c: Cron) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cerbas-cron".into())
        .spawn(move || c.run())
}

/// An entry and its next tick (unix seconds; `None`: never again).
struct Due {
    entry: Entry,
    next: Option<i64>,
}

/// What the file held at the last poll, so only a change is logged.
#[derive(PartialEq)]
enum Seen {
    Nothing,
    Text(String),
    Unreadable(String),
}

impl Cron {
    fn run(mut self) {
        let claim = redis::Script::new(CLAIM);
        let record = redis::Script::new(RECORD);
        let mut conn: Option<Connection> = None;
        let mut dues: Vec<Due> = Vec::new();
        let mut seen = Seen::Nothing;
        let mut next_poll = Instant::now();
        let mut outcomes: Vec<CronRun> = Vec::new();
        let mut runs = self.runs.clone();
        if self.path.as_os_str().is_empty() {
            log::info!("cron is off (crontab = \"\")");
        }
        while !self.stopping.is_triggered() {
            let claiming = !self.shutdown.is_triggered();
            if claiming && Instant::now() >= next_poll {
                self.reload(&mut dues, &mut seen);
                next_poll = Instant::now() + POLL;
            }
            outcomes.extend(self.runs.try_iter());
            let mut pause = None;
            let busy = !outcomes.is_empty() || (claiming && self.any_due(&dues));
            if busy {
                let c = match conn.as_mut() {
                    Some(c) => Some(c),
                    // Not past the poll: reloads go on while Redis is away.
                    None => self
                        .connector
                        .connect_until(&self.stopping, Some(next_poll))
                        .map(|c| conn.insert(c)),
                };
                if let Some(c) = c {
                    // Claims first: they are due now, and a record Redis refuses
                    // must not hold them up.
                    let claimed = match claiming {
                        true => self.claim_due(c, &claim, &mut dues),
                        false => Ok(()),
                    };
                    let done = claimed.and_then(|()| self.record(c, &record, &mut outcomes));
                    match done {
                        Ok(()) => self.connector.recovered(),
                        Err(e) => match self.connector.failed(&e) {
                            Failure::Lost => conn = None,
                            Failure::Refused(p) => pause = Some(p),
                        },
                    }
                }
            }
            if claiming {
                self.skip_late(&mut dues);
                self.table
                    .set(dues.iter().map(|d| (d.entry.clone(), d.next)).collect());
            }
            let wait = pause.unwrap_or_else(|| self.until_next(&dues, next_poll, claiming));
            // While claiming, shutdown wakes it; then only the end of the drain.
            let stop = match claiming {
                true => self.shutdown.receiver(),
                false => self.stopping.receiver(),
            };
            select! {
                recv(runs) -> run => match run {
                    Ok(run) => outcomes.push(run),
                    // The workers are gone: nothing more to record.
                    Err(_) => runs = crossbeam_channel::never(),
                },
                recv(stop) -> _ => {}
                default(wait) => {}
            }
        }
        // The last outcomes of the drain: one try, as the stop is bounded.
        outcomes.extend(self.runs.try_iter());
        if let (false, Some(c)) = (outcomes.is_empty(), conn.as_mut()) {
            if let Err(e) = self.record(c, &record, &mut outcomes) {
                log::warn!("cron: {} outcomes not recorded: {e}", outcomes.len());
            }
        }
    }

    fn any_due(&self, dues: &[Due]) -> bool {
        let now = unix_ms();
        dues.iter()
            .any(|d| d.next.is_some_and(|t| t.saturating_mul(1000) <= now))
    }

    /// How long to sleep: until the next tick, the next poll, or at most 500 ms
    /// (no polls nor ticks once claiming has stopped).
    fn until_next(&self, dues: &[Due], next_poll: Instant, claiming: bool) -> Duration {
        if !claiming {
            return POLL;
        }
        let mut wait = next_poll
            .saturating_duration_since(Instant::now())
            .min(POLL);
        if let Some(first) = dues.iter().filter_map(|d| d.next).min() {
            let ms = first.saturating_mul(1000).saturating_sub(unix_ms()).max(0) as u64;
            wait = wait.min(Duration::from_millis(ms));
        }
        wait
    }

    /// Claims every tick that has come, in tick order per entry.
    fn claim_due(
        &self,
        c: &mut Connection,
        claim: &redis::Script,
        dues: &mut [Due],
    ) -> RedisResult<()> {
        let now = unix_ms();
        for d in dues.iter_mut() {
            while let Some(tick) = d.next.filter(|t| t.saturating_mul(1000) <= now) {
                let id: u64 = claim
                    .key(self.keys.cron_claim(&d.entry.id, tick))
                    .key(self.keys.counter())
                    .key(self.keys.queue())
                    .arg(CLAIM_TTL.as_millis() as u64)
                    .arg(self.keys.request_prefix())
                    .arg(d.entry.body(tick))
                    .invoke(c)?;
                if id > 0 {
                    log::debug!(
                        "cron: claimed tick {tick} of line {} ({}) as request {id}",
                        d.entry.line,
                        d.entry.func()
                    );
                }
                d.next = d.entry.schedule.next_after(tick, &self.zone);
            }
        }
        Ok(())
    }

    /// Skips ticks more than [`CATCH_UP`] old (this instance could not reach Redis):
    /// another instance may have run them; this one does not run them late.
    fn skip_late(&self, dues: &mut [Due]) {
        let oldest = (unix_ms() - CATCH_UP.as_millis() as i64).div_euclid(1000);
        for d in dues.iter_mut() {
            if d.next.is_some_and(|t| t < oldest) {
                d.next = d.entry.schedule.next_after(oldest, &self.zone);
                log::warn!(
                    "cron: line {} ({}): ticks more than {}s late were skipped; next {}",
                    d.entry.line,
                    d.entry.func(),
                    CATCH_UP.as_secs(),
                    d.next.map_or("never".into(), |t| self.zone.format(t))
                );
            }
        }
    }

    /// Writes the outcomes waiting; what was written leaves `outcomes`. One Redis
    /// refuses (a wrong-typed key) is logged and dropped; on a lost connection the
    /// rest wait for the next one.
    fn record(
        &self,
        c: &mut Connection,
        record: &redis::Script,
        outcomes: &mut Vec<CronRun>,
    ) -> RedisResult<()> {
        while let Some(run) = outcomes.first() {
            let (outcome, message) = match &run.outcome {
                Outcome::Ok => ("ok", ""),
                Outcome::Error(m) => ("error", m.as_str()),
                Outcome::Timeout => ("timeout", ""),
            };
            let recorded = record
                .key(self.keys.cron_last(&run.tag.entry))
                .arg(outcome)
                .arg(message)
                .arg(run.at_ms)
                .arg(run.duration.as_millis() as u64)
                .arg(run.tag.tick)
                .arg(&run.func)
                .arg(&self.instance)
                .arg(LAST_TTL_SECS)
                .invoke::<i64>(c);
            match recorded {
                Err(e) if crate::connection::is_lost(&e) => return Err(e),
                Err(e) => log::warn!(
                    "cron: the outcome of {} (entry {}) was not recorded: {e}",
                    run.func,
                    run.tag.entry
                ),
                Ok(_) => {}
            }
            outcomes.remove(0);
        }
        Ok(())
    }

    /// Reads CRONTAB again; on a change, replaces the entries (a kept entry keeps
    /// its next tick) and logs what changed.
    fn reload(&self, dues: &mut Vec<Due>, seen: &mut Seen) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let path = self.path.display();
        let now = (unix_ms() / 1000).max(0);
        let text = match super::read_text(&self.path) {
            Ok(text) => text,
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "not found".to_string(),
                    _ => e.to_string(),
                };
                let now_seen = Seen::Unreadable(why.clone());
                if *seen != now_seen {
                    log::warn!("cron: {path}: {why}; no entries run until it can be read");
                    for d in dues.drain(..) {
                        log::info!("cron: removed line {}: {}", d.entry.line, d.entry.text);
                    }
                    *seen = now_seen;
                }
                return;
            }
        };
        if matches!(seen, Seen::Text(old) if *old == text) {
            return;
        }
        let first = *seen == Seen::Nothing;
        *seen = Seen::Text(text.clone());
        let tab = parse_crontab(&text, &self.known);
        for e in &tab.errors {
            log::warn!("cron: {path}: {e} (skipped)");
        }
        let mut old: Vec<Due> = std::mem::take(dues);
        for entry in tab.entries {
            let kept = old
                .iter()
                .position(|d| d.entry.id == entry.id)
                .map(|i| old.swap_remove(i));
            let next = match kept {
                Some(d) => d.next,
                None => {
                    if !first {
                        log::info!("cron: added line {}: {}", entry.line, entry.text);
                    }
                    entry.schedule.next_after(now, &self.zone)
                }
            };
            dues.push(Due { entry, next });
        }
        for d in old {
            log::info!("cron: removed line {}: {}", d.entry.line, d.entry.text);
        }
        if first {
            log::info!(
                "cron: {path}: {} entries, {} bad lines; times in {}",
                dues.len(),
                tab.errors.len(),
                self.zone
            );
            for d in dues.iter() {
                log::info!(
                    "cron: line {}: {} next {}",
                    d.entry.line,
                    d.entry.text,
                    d.next.map_or("never".into(), |t| self.zone.format(t))
                );
            }
        }
    }
}
