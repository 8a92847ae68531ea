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
//! ```
//!
//! Prints `floor: ready ...` on stdout once it serves; stops on SIGINT/SIGTERM
//! (after sending the replies of the batch in hand) or when Redis goes away.
//! Its tests are `tests/floor.rs` (they need a real redis-server); that is why
//! the items they use are `pub`.

use cerbas::protocol::{describe_entry, parse_queue_entry, parse_request};
use cerbas::{Config, Keys, Reply, RequestError};
use clap::Parser;
use redis::Connection;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
}

/// How long one `BLMOVE` waits before the loop looks at the stop flag again.
const POLL_SECS: f64 = 0.1;
/// Read timeout of the connection: longer than any `BLMOVE` wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A request body (None: the key is missing) into its work, with the same error
/// texts as cerbas for what the floor checks.
pub fn plan(keys: &Keys, id: u64, body: Option<&[u8]>, max_bytes: usize) -> Job {
    let request = body
        .ok_or_else(|| RequestError::NotFound(keys.request(id)))
        .and_then(|b| parse_request(b, max_bytes));
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

/// Serves until `stop` is set, counting the requests it answers in `served`.
pub fn serve(
    c: &mut Connection,
    keys: &Keys,
    args: &Args,
    stop: &AtomicBool,
    served: &mut u64,
) -> redis::RedisResult<()> {
    let max_bytes = Config::default().max_request_bytes;
    let (queue, hand) = (keys.queue(), keys.key("FLOOR-HAND"));
    let take: String = redis::cmd("SCRIPT").arg("LOAD").arg(TAKE).query(c)?;
    // The last batch's replies and DEL, sent in the same write as the next take.
    let mut pending = redis::pipe();
    loop {
        if stop.load(Ordering::Relaxed) {
            if !pending.is_empty() {
                pending.query::<()>(c)?;
            }
            return Ok(());
        }
        pending
            .cmd("BLMOVE")
            .arg(&queue)
            .arg(&hand)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(POLL_SECS)
            .ignore()
            .cmd("EVALSHA")
            .arg(&take)
            .arg(2)
            .arg(&hand)
            .arg(&queue)
            .arg(args.batch.max(1))
            .arg(keys.request_prefix());
        let (taken,): (Taken,) = pending.query(c)?;
        pending = redis::pipe();
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
        if ids.is_empty() {
            continue;
        }
        let names: Vec<String> = ids.iter().map(|id| keys.request(*id)).collect();
        // The original's later Python client writes P-REQUEST-…: read only when missing.
        let missing: Vec<usize> = (0..ids.len()).filter(|i| bodies[*i].is_none()).collect();
        if !missing.is_empty() {
            let fallbacks: Vec<String> = missing
                .iter()
                .map(|i| keys.request_fallback(ids[*i]))
                .collect();
            let found: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&fallbacks).query(c)?;
            for (i, body) in missing.iter().zip(found) {
                bodies[*i] = body;
            }
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
            pending
                .cmd("PUBLISH")
                .arg(keys.reply_channel(job.id))
                .arg(reply.to_json())
                .ignore()
                .cmd("PUBLISH")
                .arg(keys.msgpack_channel(job.id))
                .arg(reply.to_msgpack())
                .ignore();
        }
        pending.cmd("DEL").arg(names).ignore();
        *served += jobs.len() as u64;
    }
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
    let mut conn = cerbas::connection::open(&client, READ_TIMEOUT).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).map_err(|e| e.to_string())?;
    block_stop_signals();
    println!(
        "floor: ready, redis={} db={} queue={} pid={}{}",
        cerbas::config::redact_url(&url),
        keys.db(),
        keys.queue(),
        std::process::id(),
        if args.pipeline_functions {
            " (functions pipelined)"
        } else {
            ""
        }
    );
    let _ = std::io::stdout().flush();
    let mut served = 0;
    match serve(&mut conn, &keys, args, &stop, &mut served) {
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
