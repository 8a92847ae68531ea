//! Starts the threads in order and stops them in order (DESIGN §3):
//! timer → publisher → workers → scheduler → HTTP plug → cron → reader; then, on
//! shutdown: the reader and cron stop taking and the plug answers 503 to new
//! calls, the workers drain what they hold (Redis requests and HTTP calls alike)
//! until the drain deadline, the plug stops accepting, the publisher flushes and
//! returns what is left to the queue, cron records the drain's outcomes, the
//! plug's last connections end, the timer stops.
//! Not for: signals or flags (`main.rs`).

use crate::config::Config;
use crate::connection::{ConnectionPool, Connector};
use crate::context::Services;
use crate::dispatch::{Dispatcher, Hung};
use crate::error::Error;
use crate::job::{Backlog, InHand, Outbox, Outgoing, Stats, Unanswered};
use crate::pool::Worker;
use crate::protocol::Keys;
use crate::publisher::Publisher;
use crate::reader::{Reader, BLOCK};
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much longer than `drain_timeout_ms` a stop may take, whatever Redis does:
/// time to publish the last replies and return what is left to the queue.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Runs the server until `shutdown` is triggered (by a signal, by `halt`, or by the
/// embedding program), then stops it gracefully. Returns once every request it
/// took is answered or back in the queue; if Redis is unreachable at that point,
/// after a few seconds of trying, leaving them in this instance's processing list
/// for another instance (or the next start) to recover.
///
/// ```no_run
/// let mut registry = cerbas::Registry::new();
/// registry.register("hello", |_: cerbas::NoArgs, _: &cerbas::Context| -> Result<&str, cerbas::FnError> {
///     Ok("hello world!")
/// });
/// cerbas::run(cerbas::Config::default(), registry, cerbas::Shutdown::new()).unwrap();
/// ```
pub fn run(config: Config, mut registry: Registry, shutdown: Shutdown) -> Result<(), Error> {
    config.validate()?;
    for name in registry.apply_config(&config.functions) {
        log::warn!("configuration names function {name:?}, which is not registered");
    }
    let keys = Keys::new(&config.prefix, config.db());
    let client = redis::Client::open(config.connection_url()?.as_str())?;
    let instance = instance_name();
    let processing = keys.processing(&instance);
    let stats = Arc::new(Stats::default());
    let in_hand = InHand::default();
    let unanswered = Unanswered::default();
    // The dashboard's pause, and the CRONTAB entries it shows.
    let paused = crate::job::Paused::default();
    let cron_table = crate::job::CronTable::default();
    log::info!(
        "cerbas {} starting: {}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    // Settings Redis can never accept stop the start here; an absent Redis is
    // waited for.
    if !crate::connection::check_at_start(&client, config.db(), &shutdown)? {
        return Ok(());
    }
    log::info!(
        "instance {instance}; functions: {}",
        registry.names().join(", ")
    );
    // Bound before any thread starts: a taken port stops the start here.
    let http_listener = match config.http.listen.as_str() {
        "" => None,
        _ => Some(crate::http::bind(&config.http)?),
    };
    // Socket reads must outlast BLMOVE's block (DESIGN §8), with room to spare.
    let read_timeout = BLOCK + Duration::from_secs(10);

    let stopping = Shutdown::new();
    // The reader's jobs (bounded by the pool's width) and due jobs (the timer's,
    // the HTTP plug's), to the workers.
    let (jobs_tx, due_tx, jobs_rx) = crate::handoff::handoff(config.workers);
    // Workers say when they are free; the reader takes only that many requests.
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    // Replies are not bounded (DESIGN §3 draws them bounded): their number is
    // already bounded by the jobs taken, and the timer, which sends timeouts, must
    // never block behind a publisher waiting out a Redis outage.
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    // What waits in it is bounded by the reader, which stops taking while the
    // publisher's backlog is full.
    let backlog = Arc::new(Backlog::default());
    let out_tx = Outbox::new(out_tx, backlog.clone());
    // In-process calls (HTTP) go to the workers on the timer's channel (caller.rs).
    let local_jobs = due_tx.clone();
    let (timer, timer_thread) = crate::timer::start(due_tx, shutdown.clone())?;
    let publisher = crate::publisher::start(
        Publisher {
            connector: Connector::new(client.clone(), "publisher", read_timeout),
            keys: keys.clone(),
            instance: instance.clone(),
            processing: processing.clone(),
            grace: Duration::from_millis(config.reply_grace_ms),
            republish_max_bytes: config.republish_max_bytes,
            in_hand: in_hand.clone(),
            stats: stats.clone(),
            backlog: backlog.clone(),
            stopping: stopping.clone(),
        },
        out_rx,
    )?;
    // Outcomes of cron runs, from the dispatcher to the cron thread.
    let (cron_tx, cron_rx) = crossbeam_channel::unbounded();
    let cron_known = crate::cron::Known::new(&config, &registry);
    let (replace_tx, replace_rx) = crossbeam_channel::unbounded();
    let hung = Arc::new(Hung::new(config.max_hung_workers, replace_tx));
    let dispatcher = Arc::new(Dispatcher {
        registry: Arc::new(registry),
        access: config.access.clone(),
        default_timeout: Duration::from_millis(config.timeout_ms),
        max_delay: Duration::from_millis(config.max_delay_ms),
        services: Arc::new(Services {
            keys: keys.clone(),
            pool: Some(ConnectionPool::new(client.clone(), config.redis_pool_size)),
            timer: Some(timer.clone()),
        }),
        out: out_tx.clone(),
        unanswered: unanswered.clone(),
        stats: stats.clone(),
        hung: Some(hung.clone()),
        concurrency: Arc::new(crate::limits::Concurrency::from_config(&config)),
        cron_runs: cron_tx,
    });
    let abandon = Arc::new(AtomicBool::new(false));
    crate::pool::start(
        config.workers,
        Worker {
            dispatcher,
            jobs: jobs_rx,
            ready: ready_tx,
            abandon: abandon.clone(),
        },
        replace_rx,
        shutdown.clone(),
    )?;
    let scheduler = crate::scheduler::start(Scheduler {
        connector: Connector::new(client.clone(), "scheduler", read_timeout),
        keys: keys.clone(),
        instance: instance.clone(),
        shutdown: shutdown.clone(),
        snapshot: crate::dashboard::snapshot::Live {
            stats: stats.clone(),
            in_hand: in_hand.clone(),
            unanswered: unanswered.clone(),
            hung: hung.clone(),
            workers: config.workers,
            started: Instant::now(),
            refused: Default::default(),
            paused: paused.clone(),
            history: Default::default(),
        },
    })?;
    let plug = match http_listener {
        Some(listener) => Some(crate::http::start(
            listener,
            crate::http::Plug {
                config: config.http.clone(),
                proxy: config.proxy.clone(),
                caller: crate::caller::Caller {
                    jobs: local_jobs,
                    unanswered: unanswered.clone(),
                    shutdown: shutdown.clone(),
                    abandon: abandon.clone(),
                    // As long as a call may run, it may wait for a worker.
                    wait: Duration::from_millis(config.timeout_ms),
                },
                stats: stats.clone(),
                redis: client.clone(),
                keys: keys.clone(),
                instance: instance.clone(),
                in_hand: in_hand.clone(),
                paused: paused.clone(),
                cron: cron_table.clone(),
                secret: crate::dashboard::actions::Secret::new(),
            },
        )?),
        None => None,
    };
    let queue = keys.queue();
    let cron = crate::cron::runner::start(crate::cron::runner::Cron {
        connector: Connector::new(client.clone(), "cron", read_timeout),
        keys: keys.clone(),
        instance: instance.clone(),
        path: config.crontab.clone(),
        zone: config.cron_zone()?,
        known: cron_known,
        shutdown: shutdown.clone(),
        stopping: stopping.clone(),
        runs: cron_rx,
        table: cron_table,
    })?;
    let reader = crate::reader::start(Reader {
        connector: Connector::new(client, "reader", read_timeout),
        keys,
        instance,
        processing: processing.clone(),
        max_request_bytes: config.max_request_bytes,
        jobs: jobs_tx,
        ready: ready_rx,
        stats: stats.clone(),
        shutdown: shutdown.clone(),
        in_hand,
        unanswered: unanswered.clone(),
        backlog,
        paused,
        read_large: Default::default(),
    })?;
    log::info!("ready: taking requests from {queue}");

    shutdown.wait();
    let drain = Duration::from_millis(config.drain_timeout_ms);
    log::info!("shutting down: finishing requests in hand (up to {drain:?})");
    let drain_by = Instant::now() + drain;
    let stop_by = drain_by + STOP_MARGIN;
    // The drain waits for requests not yet answered, not for threads: a worker
    // stuck in a call its caller already has `timeout` for holds nothing.
    let drained = wait_until(drain_by, || reader.is_finished() && unanswered.is_zero());
    if !drained {
        abandon.store(true, Ordering::SeqCst);
        if unanswered.is_zero() {
            log::warn!("the reader did not stop by the drain deadline (redis not answering)");
        } else {
            log::warn!("requests still in hand at the drain deadline; they go back to the queue");
        }
    }
    // In-flight HTTP calls were counted in `unanswered`: they are answered (or
    // gave up at the drain deadline, 503). The HTTP plug stops accepting now; a
    // proxied request still streaming is waited for at the end.
    if let Some(plug) = &plug {
        plug.close();
    }
    // Before the publisher returns what is held to the queue and retires this
    // instance, the reader must be gone (its BLMOVE would take a returned id
    // back) and so must the scheduler (it renews the heartbeat). Both stop within
    // a second unless Redis hangs; then nothing is returned and the heartbeat
    // lapses, which hands what is held to another instance.
    let quiet = wait_until(stop_by, || reader.is_finished() && scheduler.is_finished());
    stopping.trigger();
    if quiet {
        let _ = out_tx.send(Outgoing::Finish);
    }
    // Whatever Redis does, the stop ends by `stop_by`. What could not be returned
    // to the queue by then stays in this instance's processing list, and another
    // instance (or the next start) recovers it once the heartbeat lapses.
    if !wait_until(stop_by, || publisher.is_finished()) {
        log::warn!(
            "redis did not answer in time: unfinished requests stay in {} for recovery",
            processing
        );
    }
    // It records the drain's last cron outcomes, once.
    wait_until(stop_by, || cron.is_finished());
    if let Some(plug) = plug {
        plug.join(stop_by);
    }
    timer.stop();
    let _ = timer_thread.join();
    log::info!(
        "stopped: {} requests ({} delayed, counted again when due), {} ok, {} errors, {} timeouts, {} panics, {} bad queue entries, {} hung workers",
        stats.requests.load(Ordering::Relaxed),
        stats.delayed.load(Ordering::Relaxed),
        stats.ok.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.timeouts.load(Ordering::Relaxed),
        stats.panics.load(Ordering::Relaxed),
        stats.bad_entries.load(Ordering::Relaxed),
        hung.count()
    );
    Ok(())
}

/// Polls `done` every few ms until it holds (true) or `deadline` passes (false).
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A name unique to this process: host, pid and start time.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{host}-{}-{started}", std::process::id())
}
