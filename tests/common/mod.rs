//! Test harness: a real `redis-server` on a free port and real `cerbas` processes.
//! Everything started here is stopped when its handle drops. Waits are on events
//! with deadlines (a reply, a PING, a process exit), never bare sleeps.
#![allow(dead_code)]

use cerbas::{CallOptions, Client, Env, Reply};
use serde_json::Value;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A unique scratch directory under the system's temp dir.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "cerbas-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A redis-server of our own.
pub struct Redis {
    child: Child,
    pub port: u16,
    pub password: Option<String>,
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[], None)
    }

    /// Starts redis-server with extra arguments (and `--requirepass` if a password
    /// is given), retrying on another port if the chosen one was taken meanwhile.
    pub fn start_with(extra: &[&str], password: Option<&str>) -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let dir = scratch("redis");
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            let child = Self::spawn(port, &dir, &extra, password);
            let mut r = Redis {
                child,
                port,
                password: password.map(str::to_string),
                dir,
                extra,
            };
            if r.wait_up() {
                return r;
            }
        }
        panic!("could not start redis-server");
    }

    fn spawn(port: u16, dir: &PathBuf, extra: &[String], password: Option<&str>) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        cmd.spawn()
            .expect("redis-server (apt-get install redis-server)")
    }

    /// Waits for PING; false if the process died (its port was taken).
    fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops redis-server gracefully (SIGTERM: the AOF is flushed) and starts it
    /// again on the same port and directory once `down` has passed.
    pub fn restart(&mut self, down: Duration) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(self.port, &self.dir, &self.extra, self.password.as_deref());
        assert!(self.wait_up(), "redis-server did not come back");
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url_db(0).as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// The URL without a db (the server picks db 1 for `dev`).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn url_db(&self, db: i64) -> String {
        format!("{}/{db}", self.url())
    }

    /// A plain connection to db 1, where the `dev` server works.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url_db(1).as_str())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    /// Subscribes (db 1) to `channel` and waits up to `within` for its first
    /// message: how a client that subscribes late hears a republish.
    pub fn first_message(&self, channel: &str, within: Duration) -> redis::RedisResult<redis::Msg> {
        let mut c = redis::Client::open(self.url_db(1).as_str())?.get_connection()?;
        let mut ps = c.as_pubsub();
        ps.subscribe(channel)?;
        ps.set_read_timeout(Some(within))?;
        ps.get_message()
    }

    /// A client as user `foo`, source `cerbastest` (the original's test client).
    pub fn client(&self) -> Client {
        Client::open(&self.url(), Env::Dev)
            .expect("client")
            .identity("foo", "cerbastest")
            .timeout(Duration::from_secs(20))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `cerbas` server process.
pub struct Server {
    child: Child,
    pub log: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cerbas")
}

pub fn repo_file(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Writes a config file: the shipped one with `extra` keys put first.
pub fn config_with(extra: &str) -> PathBuf {
    // Top-level keys of `extra` replace the shipped ones; its tables go at the end.
    let split = if extra.starts_with('[') {
        0
    } else {
        extra.find("\n[").map(|i| i + 1).unwrap_or(extra.len())
    };
    let (top, tables) = extra.split_at(split);
    let shipped = std::fs::read_to_string(repo_file("cerbas.toml")).expect("cerbas.toml");
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let mut kept = String::new();
    for line in shipped.lines() {
        if !top.lines().any(|l| key(l) == key(line)) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let path = scratch("config").join("cerbas.toml");
    std::fs::write(&path, format!("{top}\n{kept}\n{tables}\n")).expect("write config");
    path
}

impl Server {
    /// Starts a server on `redis` with the shipped configuration and waits until it
    /// answers `hello`.
    pub fn start(redis: &Redis) -> Server {
        Self::start_args(redis, &[])
    }

    pub fn start_args(redis: &Redis, args: &[&str]) -> Server {
        let s = Self::spawn(redis, args, &[]);
        s.wait_ready(redis);
        s
    }

    /// Starts a server without waiting for it.
    pub fn spawn(redis: &Redis, args: &[&str], env: &[(&str, &str)]) -> Server {
        let log = scratch("server").join("cerbas.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
        if !args.contains(&"--config") {
            cmd.args(["--config", &repo_file("cerbas.toml")]);
        }
        if !args.contains(&"--redis") && !env.iter().any(|(k, _)| *k == "CERBAS_REDIS_URL") {
            cmd.args(["--redis", &redis.url()]);
        }
        // The shipped CRONTAB would add a request a minute to every test: no
        // entries (an empty file) unless a test names its file.
        if !args.contains(&"--crontab") {
            cmd.args(["--crontab", "/dev/null"]);
        }
        // The shipped configuration listens on 127.0.0.1:4455: servers running at
        // once (tests run in parallel) would fight over it. HTTP tests say --http.
        if !args.contains(&"--http") {
            cmd.args(["--http", ""]);
        }
        cmd.args(args)
            .env_remove("CERBAS_REDIS_URL")
            .env_remove("CERBAS_ENV")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file);
        Server {
            child: cmd.spawn().expect("cerbas binary"),
            log,
        }
    }

    pub fn wait_ready(&self, redis: &Redis) {
        let c = redis.client();
        let reply = c.request("hello", Value::Null);
        assert_eq!(
            reply.ok(),
            Some(Reply::Ok("hello world!".into())),
            "server did not answer hello; log:\n{}",
            self.log_text()
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log holds `text` at least `n` times. Start the server with
    /// `RUST_LOG=debug` to see each call start ("FUNC from user …").
    pub fn wait_log(&self, text: &str, n: usize) {
        wait_for(text, Duration::from_secs(20), || {
            (self.log_text().matches(text).count() >= n).then_some(())
        })
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How a test waits for a reply: JSON or msgpack; through the client (which
/// subscribes before it pushes) or, `subscribe_late`, as the seed's steps and its
/// Python client do: subscribe after `RPUSH` (the server must cover that race).
/// The client has no such mode: tests do it with plain Redis commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    pub msgpack: bool,
    pub subscribe_late: bool,
}

/// The seed's steps literally: subscribe after RPUSH.
pub fn late(msgpack: bool) -> Mode {
    Mode {
        msgpack,
        subscribe_late: true,
    }
}

impl Redis {
    /// Sends the raw request `body` with `c` and waits for its reply as `mode` says.
    pub fn call_mode(&self, c: &Client, body: &[u8], mode: Mode) -> Reply {
        if !mode.subscribe_late {
            let opts = CallOptions::new().msgpack(mode.msgpack);
            return c.call(body, &opts).expect("a reply");
        }
        let id = c.submit(body).expect("queue the request");
        self.reply_for(id, mode.msgpack, || ())
    }

    /// Subscribes to the reply channel of request `id` (db 1) on a plain
    /// connection, runs `queue` (which puts the request in Redis, or not), and
    /// waits up to 20 s for the reply.
    pub fn reply_for(&self, id: u64, msgpack: bool, queue: impl FnOnce()) -> Reply {
        let channel = format!("CERBAS-RESPONSE-1-{id:010}");
        let channel = if msgpack {
            format!("MSGPACK:{channel}")
        } else {
            channel
        };
        let mut conn = self.conn();
        let mut ps = conn.as_pubsub();
        ps.subscribe(&channel).expect("SUBSCRIBE");
        queue();
        ps.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("a read timeout");
        let msg = ps.get_message().expect("a reply within 20 s");
        let bytes = msg.get_payload_bytes();
        if msgpack {
            Reply::from_msgpack(bytes)
        } else {
            Reply::from_json(bytes)
        }
        .expect("a well-formed reply")
    }
}

/// Reads an integer key in db 1 (0 if absent).
pub fn get_int(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("GET")
        .arg(key)
        .query::<Option<i64>>(conn)
        .expect("GET")
        .unwrap_or(0)
}

/// Keys a request leaves behind until it is served: request bodies, processing
/// lists, delayed entries, cache entries. Empty once everything is answered.
/// (The counter, tallies, and the live instances' heartbeats, set and dashboard
/// snapshots stay, and the dashboard's capped list of recent errors.)
pub fn leftover_keys(conn: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(conn).expect("KEYS");
    keys.retain(|k| {
        !(k == "CERBAS-COUNTER"
            || k == "CERBAS-INSTANCES"
            || k.starts_with("CERBAS-TALLY-")
            || k.starts_with("CERBAS-HEARTBEAT-")
            || k == "CERBAS-SNAPSHOTS"
            || k.starts_with("CERBAS-SNAPSHOT-")
            || k == "CERBAS-ERRORS")
    });
    keys.sort();
    keys
}

impl Redis {
    /// `SIGSTOP`: the server hangs, its clients' commands wait (a stalled Redis).
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// `SIGCONT`: undoes [`Redis::pause`].
    pub fn resume(&self) {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }
}

/// Queues one request per body (ids reserved with one INCRBY), in a few pipelines.
pub fn submit_many(conn: &mut redis::Connection, bodies: &[String]) -> Vec<u64> {
    let last: u64 = redis::cmd("INCRBY")
        .arg("CERBAS-COUNTER")
        .arg(bodies.len())
        .query(conn)
        .unwrap();
    let first = last + 1 - bodies.len() as u64;
    let ids: Vec<u64> = (first..=last).collect();
    for chunk in ids.iter().zip(bodies).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for (id, body) in chunk {
            pipe.cmd("SET")
                .arg(format!("CERBAS-REQ-{id:010}"))
                .arg(body.as_str())
                .ignore()
                .cmd("RPUSH")
                .arg("CERBAS-QUEUE")
                .arg(**id)
                .ignore();
        }
        pipe.query::<()>(conn).unwrap();
    }
    ids
}

/// One field of `INFO section`, as text (empty if absent).
pub fn info_field(conn: &mut redis::Connection, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO").arg(section).query(conn).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Makes every write fail with `MISCONF` until `CONFIG SET
/// stop-writes-on-bgsave-error no`: a save point, then a BGSAVE that cannot write
/// (its directory is gone).
pub fn start_misconf(redis: &Redis, conn: &mut redis::Connection) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("save")
        .arg("3600 1")
        .query::<()>(conn)
        .expect("CONFIG SET save");
    std::fs::remove_dir_all(&redis.dir).expect("remove redis dir");
    redis::cmd("BGSAVE").query::<()>(conn).expect("BGSAVE");
    wait_for("a failed BGSAVE", Duration::from_secs(20), || {
        (info_field(conn, "persistence", "rdb_last_bgsave_status") == "err").then_some(())
    });
    let refused = redis::cmd("SET").arg("probe").arg(1).query::<()>(conn);
    assert!(
        refused.is_err_and(|e| e.to_string().contains("MISCONF")),
        "writes refused"
    );
}

/// Stores `body` under a new id and returns the id; the caller queues it.
pub fn store(conn: &mut redis::Connection, body: &[u8]) -> u64 {
    let id: u64 = redis::cmd("INCR")
        .arg("CERBAS-COUNTER")
        .query(conn)
        .expect("INCR");
    redis::cmd("SET")
        .arg(format!("CERBAS-REQ-{id:010}"))
        .arg(body)
        .query::<()>(conn)
        .expect("SET");
    id
}

/// What a [`Relay`] waits for, and whom it tells when it holds it.
type Hold = (Vec<u8>, std::sync::mpsc::Sender<()>);

/// A TCP relay between `cerbas` and Redis that can hold back the first command
/// containing a given text until the test says so: a fault landing exactly
/// between two commands of the server (e.g. between a take and its `MGET`).
/// Counts the bytes Redis sends back through it.
pub struct Relay {
    pub port: u16,
    /// Bytes from Redis to the clients of the relay.
    pub from_redis: std::sync::Arc<AtomicU64>,
    hold: std::sync::Arc<std::sync::Mutex<Option<Hold>>>,
    release: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Relay {
    /// Relays 127.0.0.1:`port` (returned in `Relay::port`) to Redis on `redis_port`.
    /// Its threads live until the process ends (they end with their sockets).
    pub fn start(redis_port: u16) -> Relay {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::sync::{Arc, Condvar, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        let port = listener.local_addr().expect("relay address").port();
        let relay = Relay {
            port,
            from_redis: Arc::new(AtomicU64::new(0)),
            hold: Arc::new(Mutex::new(None)),
            release: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let (counter, hold, release) = (
            relay.from_redis.clone(),
            relay.hold.clone(),
            relay.release.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                // Redis down (a restart): this client is refused, as by Redis,
                // and the relay lives on for the next.
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone())
                else {
                    return;
                };
                let (hold, release, counter) = (hold.clone(), release.clone(), counter.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = client_r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let armed = {
                            let mut h = hold.lock().expect("relay hold");
                            let hit = h.as_ref().is_some_and(|(text, _)| {
                                buf[..n].windows(text.len()).any(|w| w == text.as_slice())
                            });
                            if hit {
                                h.take()
                            } else {
                                None
                            }
                        };
                        if let Some((_, held)) = armed {
                            let _ = held.send(());
                            let (lock, cv) = &*release;
                            let mut go = lock.lock().expect("relay release");
                            while !*go {
                                go = cv.wait(go).expect("relay release");
                            }
                        }
                        if server_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server_w.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        relay
    }

    /// The URL of Redis through the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Holds back the next chunk a client sends that contains `text`; the
    /// receiver hears when it has been held.
    pub fn hold(&self, text: &[u8]) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.hold.lock().expect("relay hold") = Some((text.to_vec(), tx));
        rx
    }

    /// Lets what is held (and anything held later) through.
    pub fn release(&self) {
        let (lock, cv) = &*self.release;
        *lock.lock().expect("relay release") = true;
        cv.notify_all();
    }
}

/// Peak resident memory of process `pid`, in KiB (0 once it is gone).
pub fn vm_hwm_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Worker threads (`cerbas-worker-N`) of process `pid` (its /proc/PID/task).
pub fn worker_threads(pid: i32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with("cerbas-worker"))
        .count()
}

/// One IPv4 TCP socket of this machine, from /proc/net/tcp.
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// `01` established, `0A` listening, …
    pub state: u8,
    /// Bytes sent but not yet read by the peer.
    pub tx_queue: u64,
    /// Bytes received but not yet read by the owner.
    pub rx_queue: u64,
    /// The socket's inode (`socket:[inode]` in its owner's `/proc/PID/fd`).
    pub inode: u64,
}

/// Every IPv4 TCP socket of this machine (how tests see what a frozen peer has
/// not read, or that a server has read a request).
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (tx, rx) = f.get(4)?.split_once(':')?;
            Some(TcpSocket {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                tx_queue: u64::from_str_radix(tx, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The inodes of the sockets this test process holds open.
pub fn own_socket_inodes() -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Default::default();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Another app's connection subscribed to 2,000 channels (once Redis counts them).
pub fn neighbour_with_2000_channels(redis: &Redis) -> std::net::TcpStream {
    let mut neighbour =
        std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("neighbour connection");
    let names: Vec<String> = (0..2000).map(|i| format!("actioncable:room:{i}")).collect();
    std::io::Write::write_all(
        &mut neighbour,
        format!("SUBSCRIBE {}\r\n", names.join(" ")).as_bytes(),
    )
    .expect("SUBSCRIBE");
    let mut conn = redis.conn();
    wait_for(
        "the neighbour's 2,000 channels",
        Duration::from_secs(10),
        || (info_field(&mut conn, "stats", "pubsub_channels") == "2000").then_some(()),
    );
    neighbour
}

/// How many times Redis ran `command` (from `INFO commandstats`; 0 if never).
pub fn calls_of(conn: &mut redis::Connection, command: &str) -> u64 {
    let stats = info_field(conn, "commandstats", &format!("cmdstat_{command}"));
    stats
        .split(',')
        .find_map(|kv| kv.strip_prefix("calls="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `pattern` with Redis's glob characters escaped.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Every JSON reply published under `prefix` (db 1), each payload kept per id,
/// heard on a thread of its own (subscribed before `listen` returns) until
/// [`Replies::stop`].
pub struct Replies {
    seen: Arc<Mutex<HashMap<u64, Vec<Vec<u8>>>>>,
    listening: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Replies {
    pub fn listen(redis: &Redis, prefix: &str) -> Replies {
        let seen: Arc<Mutex<HashMap<u64, Vec<Vec<u8>>>>> = Arc::default();
        let listening = Arc::new(AtomicBool::new(true));
        let (s, l) = (seen.clone(), listening.clone());
        let mut sub = redis.conn();
        // A listener that falls behind a flood of big replies is not cut off.
        redis::cmd("CONFIG")
            .arg(&["SET", "client-output-buffer-limit", "pubsub 0 0 0"])
            .query::<()>(&mut sub)
            .expect("CONFIG SET client-output-buffer-limit");
        let pattern = format!("{}-RESPONSE-1-*", glob_escape(prefix));
        let (tx, subscribed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut ps = sub.as_pubsub();
            ps.psubscribe(&pattern).expect("PSUBSCRIBE");
            ps.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let _ = tx.send(());
            while l.load(Ordering::SeqCst) {
                let Ok(msg) = ps.get_message() else { continue };
                let id: u64 = msg
                    .get_channel_name()
                    .rsplit('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("an id");
                s.lock()
                    .expect("seen")
                    .entry(id)
                    .or_default()
                    .push(msg.get_payload_bytes().to_vec());
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(5))
            .expect("subscribed");
        Replies {
            seen,
            listening,
            thread,
        }
    }

    /// How many of `ids` were answered.
    pub fn answered(&self, ids: &[u64]) -> usize {
        let seen = self.seen.lock().expect("seen");
        ids.iter().filter(|id| seen.contains_key(id)).count()
    }

    /// Waits until every one of `ids` was answered (panics with `log` after `within`).
    pub fn wait_all(&self, ids: &[u64], within: Duration, log: impl Fn() -> String) {
        let deadline = Instant::now() + within;
        while self.answered(ids) < ids.len() {
            if Instant::now() >= deadline {
                let seen = self.seen.lock().expect("seen");
                let missing: Vec<&u64> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
                panic!(
                    "{} of {} unanswered, e.g. {:?}; log:\n{}",
                    missing.len(),
                    ids.len(),
                    &missing[..missing.len().min(10)],
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops listening; each id's replies.
    pub fn stop(self) -> HashMap<u64, Vec<Vec<u8>>> {
        self.listening.store(false, Ordering::SeqCst);
        self.thread.join().expect("listener");
        let seen = self.seen.lock().expect("seen");
        seen.clone()
    }
}

/// The ids of `ids` answered more than once in `got` (from [`Replies::stop`]).
pub fn repeated(got: &HashMap<u64, Vec<Vec<u8>>>, ids: &[u64]) -> Vec<u64> {
    ids.iter()
        .copied()
        .filter(|id| got.get(id).is_some_and(|r| r.len() > 1))
        .collect()
}
