//! The one Redis connection a [`Client`](super::Client) shares between all its
//! callers, and the reader thread behind it.
//!
//! The connection speaks RESP3, where a subscribed connection may still send any
//! command and Redis runs a connection's commands in order. So one write holds a
//! request's `SUBSCRIBE`, `SET` and `RPUSH`: the subscription is in place before
//! the request is queued, at no extra round trip. Callers write under a lock (the
//! answers to commands come back in write order, so each write appends its
//! "slots" to a FIFO under the same lock), which each waits for only until its
//! own deadline (`Gate`: a write may block until its deadline on a frozen
//! Redis); the reader thread reads every frame,
//! hands each answer to the oldest slot and each published message to the caller
//! waiting on its channel (an [`Inbox`] per call).
//!
//! After a broken connection the reader thread reconnects with back-off. If
//! Redis has the same `run_id`, the channels still awaited are subscribed again
//! (a reply published meanwhile is republished by the server for 5 s); if Redis
//! restarted, every call in flight fails at once (its id may be reused by
//! another request: a caller must never get another request's reply) and the
//! id block is dropped. A call whose request Redis had not yet acknowledged fails
//! at once with a connection error, unless the connection was cut by this client
//! because a write timed out (a frozen Redis): then those calls wait for the
//! reconnect as acknowledged ones do, until their own deadlines, their outcome
//! unknown as with any timeout. What of their requests Redis's socket holds (about
//! 128 KB on loopback) runs when Redis wakes, and its replies reach them through
//! the reconnect; what was still in this client's send queue is lost with the
//! socket. (Shutting only the sending half would let Redis drain it, but then a
//! connection stalled on the way never ends by itself.)
//!
//! Not for: building request bodies or decoding replies (`mod.rs`), frame parsing
//! rules (`wire.rs`).

use super::wire::{self, Frame, ID_BLOCK};
use crate::error::ClientError;
use crossbeam_channel::{Receiver, Sender};
use redis::{ConnectionAddr, ConnectionInfo, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a reconnect and its handshake may take (the first connect takes
/// the caller's timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// What the reader thread tells a waiting caller.
pub(crate) enum Event {
    /// Redis answered one of the call's commands (`SET`, `RPUSH`).
    Ack(Result<(), String>),
    /// The reply published on the call's channel.
    Message(Vec<u8>),
    /// The call cannot get its reply.
    Failed(ClientError),
}

/// What became of a write.
enum Wrote {
    Sent,
    /// `prepare` said no: nothing was written.
    Declined,
    /// The connection broke before all of it was written. The last command of
    /// every write is whole only once all is written, so it did not run: the
    /// write may be tried again on the next connection.
    Broken,
}

/// A call's events, from the reader thread to the caller waiting for them. Not
/// a crossbeam channel: its blocking receive spins and yields the CPU
/// (`sched_yield`) several times before it sleeps, 3.3 system calls per request
/// with 16 callers sharing a client. Here a caller sleeps at once, and the
/// reader thread sends a wake only to a caller asleep.
#[derive(Clone, Default)]
pub(crate) struct Inbox(Arc<InboxShared>);

#[derive(Default)]
struct InboxShared {
    events: Mutex<Events>,
    arrived: Condvar,
}

#[derive(Default)]
struct Events {
    queue: VecDeque<Event>,
    /// The caller sleeps waiting for an event.
    waiting: bool,
    /// It waits for the acknowledgements too: a one-way request.
    wants_acks: bool,
}

impl Inbox {
    fn send(&self, event: Event) {
        let mut inbox = lock(&self.0.events);
        // A wake is a system call: only for a caller asleep, and not for an
        // acknowledgement a caller waiting for its reply passes over.
        let wake = inbox.waiting && (inbox.wants_acks || !matches!(event, Event::Ack(Ok(()))));
        inbox.queue.push_back(event);
        if wake {
            inbox.waiting = false;
            self.0.arrived.notify_one();
        }
    }

    /// The next event, or `None` once `deadline` has passed. `acks`: whether
    /// the caller waits for acknowledgements (else one wakes it only with the
    /// next event).
    fn recv_deadline(&self, deadline: Instant, acks: bool) -> Option<Event> {
        let mut inbox = lock(&self.0.events);
        inbox.wants_acks = acks;
        loop {
            if let Some(event) = inbox.queue.pop_front() {
                return Some(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inbox.waiting = true;
            inbox = self
                .0
                .arrived
                .wait_timeout(inbox, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            inbox.waiting = false;
        }
    }
}

/// Who waits for the answer to a command written on the connection.
enum Slot {
    /// A call's command; `queued` names the call's channel on its `RPUSH`, whose
    /// success means the request is in Redis.
    Call {
        tx: Inbox,
        queued: Option<(String, u64)>,
    },
    /// The `INCRBY` of an id block.
    Ids,
}

/// A caller waiting for the reply on a channel.
struct Route {
    token: u64,
    tx: Inbox,
    /// Redis has acknowledged the request (its `RPUSH`): the call survives a
    /// reconnect to the same Redis.
    queued: bool,
}

/// The state shared between callers and the reader thread.
struct State {
    /// Generation of the current connection; `up` while it is usable.
    generation: u64,
    up: bool,
    /// Why the last connection attempt or connection failed.
    last_error: String,
    /// Slots for the answers still due on the current connection, oldest first.
    fifo: VecDeque<Slot>,
    routes: HashMap<String, Route>,
    /// Channels to unsubscribe with the next write.
    unsubscribe: Vec<String>,
    ids: Range<u64>,
    /// An `INCRBY` is on its way.
    fetching: bool,
    /// The last `INCRBY` failed with this.
    id_error: Option<ClientError>,
    /// Counts the Redis restarts seen: an id belongs to the epoch it was taken in,
    /// and is not sent to another (after a restart the counter may give it again).
    epoch: u64,
    /// `run_id` of the Redis of the current (or last) connection; `None` before
    /// the first or when `INFO` is not allowed.
    run_id: Option<String>,
    connected_once: bool,
    next_token: u64,
    /// The generation whose connection a write cut when it timed out.
    cut: Option<u64>,
}

/// The write half of the current connection.
struct Writer {
    stream: Stream,
    generation: u64,
    /// The socket's write timeout as last set (see [`Writer::write_by`]).
    timeout: Option<Duration>,
}

impl Writer {
    /// Writes all of `out` by `deadline`. Setting the socket's write timeout is a
    /// system call, so it is set only when it must change: lowered when it would
    /// outlast the deadline; a write that times out before the deadline goes on
    /// with the time left. (Set before every write, it was one more system call
    /// per request.)
    fn write_by(&mut self, mut out: &[u8], deadline: Instant) -> std::io::Result<()> {
        while !out.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            if self.timeout.is_none_or(|t| t > left) {
                self.stream.set_write_timeout(Some(left))?;
                self.timeout = Some(left);
            }
            match self.stream.write(out) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Before the deadline: set it again to the time left.
                Err(e) if is_timeout(&e) => self.timeout = None,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct Shared {
    info: ConnectionInfo,
    counter: String,
    state: Mutex<State>,
    /// Signalled when `up`, the ids or `closed` change.
    changed: Condvar,
    writer: Mutex<Option<Writer>>,
    /// Who may take `writer`: a caller waits for it only until its own
    /// deadline, not as long as a write blocked on a frozen Redis lasts.
    gate: Gate,
    /// The current connection's socket, to shut down without `writer` (held
    /// by a write that may block until its deadline).
    socket: Mutex<Option<Stream>>,
    closed: AtomicBool,
}

/// The turn to write on the connection. A `Mutex` cannot be waited for with a
/// deadline: a caller behind a big write to a frozen Redis would wait on it
/// until that write's deadline, not its own.
#[derive(Default)]
struct Gate {
    /// Whether someone writes, and how many wait for their turn (a wake, a
    /// system call, is sent only when someone waits).
    busy: Mutex<(bool, usize)>,
    freed: Condvar,
}

/// The turn to write, given back when dropped.
struct Turn<'a>(&'a Gate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.0.busy);
        busy.0 = false;
        if busy.1 > 0 {
            self.0.freed.notify_one();
        }
    }
}

impl Gate {
    /// The turn to write, waiting for it until `deadline`.
    fn enter(&self, deadline: Instant) -> Option<Turn<'_>> {
        let mut busy = lock(&self.busy);
        while busy.0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            busy.1 += 1;
            busy = self
                .freed
                .wait_timeout(busy, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            busy.1 -= 1;
        }
        busy.0 = true;
        Some(Turn(self))
    }

    /// The turn to write if nobody has it now.
    fn try_enter(&self) -> Option<Turn<'_>> {
        let mut busy = lock(&self.busy);
        if busy.0 {
            return None;
        }
        busy.0 = true;
        Some(Turn(self))
    }
}

/// Locks, recovering from a panicked holder: the state stays consistent at every
/// unlock (no code panics while holding it).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared connection and its reader thread.
pub(crate) struct Link {
    shared: Arc<Shared>,
    stop: Sender<()>,
}

impl Link {
    /// Connects (failing with [`ClientError::Timeout`] if the connect and the
    /// handshake take longer than `timeout`) and starts the reader thread.
    pub(crate) fn open(
        info: ConnectionInfo,
        counter: String,
        timeout: Duration,
    ) -> Result<Link, ClientError> {
        let mut conn = connect(&info, timeout)?;
        let shared = Arc::new(Shared {
            info,
            counter,
            state: Mutex::new(State {
                generation: 0,
                up: false,
                last_error: String::new(),
                fifo: VecDeque::new(),
                routes: HashMap::new(),
                unsubscribe: Vec::new(),
                ids: 0..0,
                fetching: false,
                id_error: None,
                epoch: 0,
                run_id: None,
                connected_once: false,
                next_token: 0,
                cut: None,
            }),
            changed: Condvar::new(),
            writer: Mutex::new(None),
            gate: Gate::default(),
            socket: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let generation = install(&shared, &mut conn);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("cerbas-client".into())
            .spawn(move || run(s, conn, generation, stopped))
            .map_err(|e| ClientError::Connection(format!("cannot start the reader: {e}")))?;
        Ok(Link { shared, stop })
    }

    /// Takes a fresh id (and the epoch it belongs to): from the block in hand, or
    /// from a new block.
    fn next_id(&self, deadline: Instant) -> Result<(u64, u64), ClientError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        loop {
            if sh.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            if let Some(id) = st.ids.next() {
                return Ok((id, st.epoch));
            }
            if let Some(e) = st.id_error.take() {
                return Err(e);
            }
            if st.up && !st.fetching {
                st.fetching = true;
                drop(st);
                let cmd = redis::cmd("INCRBY")
                    .arg(&sh.counter)
                    .arg(ID_BLOCK)
                    .get_packed_command();
                let wrote = self.write(deadline, &cmd, |st| {
                    st.fifo.push_back(Slot::Ids);
                    true
                });
                st = lock(&sh.state);
                if !matches!(wrote, Ok(Wrote::Sent)) {
                    st.fetching = st.fifo.iter().any(|s| matches!(s, Slot::Ids));
                    sh.changed.notify_all();
                }
                wrote?;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if st.up {
                    ClientError::Timeout(Duration::ZERO)
                } else {
                    ClientError::Connection(format!("redis unavailable: {}", st.last_error))
                });
            }
            st = sh
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Takes an id, then subscribes to its reply channel and queues the request in
    /// one write (`make` gives, for an id, the bytes of
    /// [`wire::request_commands`] and the channel, `None` for a one-way request).
    /// Returns the id and what the caller waits on. An id whose Redis restarted
    /// before it was sent, or whose channel is awaited already (a counter set back
    /// by hand), is not used: another is taken.
    pub(crate) fn begin(
        &self,
        deadline: Instant,
        make: impl Fn(u64) -> (Vec<u8>, Option<String>),
    ) -> Result<(u64, Call<'_>), ClientError> {
        loop {
            let (id, epoch) = self.next_id(deadline)?;
            let (bytes, channel) = make(id);
            if let Some(call) = self.start(deadline, &bytes, channel, epoch)? {
                return Ok((id, call));
            }
        }
    }

    /// The write of [`Link::begin`]; `None` if the id must not be used.
    fn start(
        &self,
        deadline: Instant,
        bytes: &[u8],
        channel: Option<String>,
        epoch: u64,
    ) -> Result<Option<Call<'_>>, ClientError> {
        let tx = Inbox::default();
        let rx = tx.clone();
        let mut route = None;
        let sent = self
            .write(deadline, bytes, |st| {
                if st.epoch != epoch {
                    return false;
                }
                if let Some(ch) = &channel {
                    if st.routes.contains_key(ch) {
                        return false;
                    }
                    st.next_token += 1;
                    let token = st.next_token;
                    route = Some((ch.clone(), token));
                    st.routes.insert(
                        ch.clone(),
                        Route {
                            token,
                            tx: tx.clone(),
                            queued: false,
                        },
                    );
                }
                st.fifo.push_back(Slot::Call {
                    tx: tx.clone(),
                    queued: None,
                });
                st.fifo.push_back(Slot::Call {
                    tx: tx.clone(),
                    queued: route.clone(),
                });
                true
            })
            .inspect_err(|_| {
                if let Some((ch, token)) = &route {
                    self.finish(ch, *token);
                }
            })?;
        match sent {
            Wrote::Sent => Ok(Some(Call {
                link: self,
                rx,
                route,
            })),
            Wrote::Declined => Ok(None),
            Wrote::Broken => {
                if let Some((ch, token)) = &route {
                    self.finish(ch, *token);
                }
                Ok(None)
            }
        }
    }

    /// Writes `bytes` on the current connection once it is up (waiting for it
    /// until `deadline`), after `prepare` has registered what waits for the
    /// answers; `Ok(false)`, writing nothing, if `prepare` says no. Channels to
    /// unsubscribe go first in the same write.
    fn write(
        &self,
        deadline: Instant,
        bytes: &[u8],
        prepare: impl FnOnce(&mut State) -> bool,
    ) -> Result<Wrote, ClientError> {
        let sh = &self.shared;
        loop {
            if sh.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            let Some(turn) = sh.gate.enter(deadline) else {
                return Err(ClientError::Timeout(Duration::ZERO));
            };
            let mut w = lock(&sh.writer);
            let ready = {
                let st = lock(&sh.state);
                matches!(&*w, Some(wr) if st.up && st.generation == wr.generation)
            };
            if !ready {
                drop(w);
                drop(turn);
                self.wait_up(deadline)?;
                continue;
            }
            let Some(writer) = w.as_mut() else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(Duration::ZERO));
            }
            let mut out = {
                let mut st = lock(&sh.state);
                if !prepare(&mut st) {
                    return Ok(Wrote::Declined);
                }
                let channels = std::mem::take(&mut st.unsubscribe);
                wire::subscription("UNSUBSCRIBE", &channels)
            };
            out.extend_from_slice(bytes);
            let written = writer.write_by(&out, deadline);
            return match written {
                Ok(()) => Ok(Wrote::Sent),
                Err(e) => {
                    // Part of it may be written: the connection is out of step.
                    // The reader thread sees it close and reconnects; until then
                    // nobody writes on it. The cut is marked before the socket is
                    // shut: the reader thread wakes on the shutdown, and `lost`
                    // must see the cut.
                    let generation = writer.generation;
                    {
                        let mut st = lock(&sh.state);
                        if st.generation == generation {
                            st.up = false;
                            st.last_error = e.to_string();
                            if is_timeout(&e) {
                                st.cut = Some(generation);
                            }
                        }
                    }
                    writer.stream.shutdown();
                    *w = None;
                    if is_timeout(&e) {
                        Err(ClientError::Timeout(Duration::ZERO))
                    } else {
                        Ok(Wrote::Broken)
                    }
                }
            };
        }
    }

    /// Waits until a connection is up; a connection error at `deadline`.
    fn wait_up(&self, deadline: Instant) -> Result<(), ClientError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        loop {
            if sh.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            if st.up {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Connection(format!(
                    "redis unavailable: {}",
                    st.last_error
                )));
            }
            st = sh
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops waiting on `channel` (call `token`): the next write unsubscribes it, or
    /// this one does at once when no other call is in flight (so an idle client
    /// holds no subscriptions).
    fn finish(&self, channel: &str, token: u64) {
        let sh = &self.shared;
        let idle = {
            let mut st = lock(&sh.state);
            if st.routes.get(channel).is_some_and(|r| r.token == token) {
                st.routes.remove(channel);
            }
            if !st.unsubscribe.iter().any(|c| c == channel) {
                st.unsubscribe.push(channel.to_string());
            }
            st.routes.is_empty()
        };
        if idle {
            self.flush_unsubscribes();
        }
    }

    /// Writes the pending `UNSUBSCRIBE`s if the connection is free right now.
    fn flush_unsubscribes(&self) {
        let sh = &self.shared;
        let Some(_turn) = sh.gate.try_enter() else {
            return;
        };
        let Ok(mut w) = sh.writer.try_lock() else {
            return;
        };
        let Some(writer) = w.as_mut() else { return };
        let out = {
            let mut st = lock(&sh.state);
            if !st.up || st.generation != writer.generation {
                return;
            }
            let channels = std::mem::take(&mut st.unsubscribe);
            wire::subscription("UNSUBSCRIBE", &channels)
        };
        if out.is_empty() {
            return;
        }
        if writer
            .write_by(&out, Instant::now() + CONNECT_TIMEOUT)
            .is_err()
        {
            writer.stream.shutdown();
        }
    }

    /// Fails every call in flight and every later call with [`ClientError::Closed`],
    /// closes the connection and stops the reader thread.
    pub(crate) fn close(&self) {
        let sh = &self.shared;
        if sh.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut st = lock(&sh.state);
            for (_, r) in st.routes.drain() {
                r.tx.send(Event::Failed(ClientError::Closed));
            }
            for slot in st.fifo.drain(..) {
                if let Slot::Call { tx, .. } = slot {
                    tx.send(Event::Failed(ClientError::Closed));
                }
            }
            st.up = false;
            sh.changed.notify_all();
        }
        // First without the writer: a write blocked on a frozen Redis holds it
        // until its deadline; shut, its socket fails that write at once.
        if let Some(s) = lock(&sh.socket).take() {
            s.shutdown();
        }
        if let Some(w) = lock(&sh.writer).take() {
            w.stream.shutdown();
        }
        // The reader thread ends on its own (its socket is shut, or it wakes
        // from a back-off pause): a close does not wait for a connect attempt.
        let _ = self.stop.try_send(());
    }

    /// Whether the connection is up now.
    pub(crate) fn is_up(&self) -> bool {
        lock(&self.shared.state).up
    }

    /// Whether [`Link::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

/// A call in flight: its events, and its channel to give up when it ends.
pub(crate) struct Call<'a> {
    link: &'a Link,
    rx: Inbox,
    route: Option<(String, u64)>,
}

impl Call<'_> {
    /// The reply's payload, waiting until `deadline`.
    pub(crate) fn reply(&self, deadline: Instant) -> Result<Vec<u8>, ClientError> {
        loop {
            match self.rx.recv_deadline(deadline, false) {
                Some(Event::Message(payload)) => return Ok(payload),
                Some(Event::Ack(Ok(()))) => {}
                Some(Event::Ack(Err(e))) => return Err(ClientError::Refused(e)),
                Some(Event::Failed(e)) => return Err(e),
                None if self.link.is_closed() => return Err(ClientError::Closed),
                None => return Err(ClientError::Timeout(Duration::ZERO)),
            }
        }
    }

    /// Waits until Redis has acknowledged both commands of a one-way request.
    pub(crate) fn acknowledged(&self, deadline: Instant) -> Result<(), ClientError> {
        for _ in 0..2 {
            match self.rx.recv_deadline(deadline, true) {
                Some(Event::Ack(Ok(()))) => {}
                Some(Event::Ack(Err(e))) => return Err(ClientError::Refused(e)),
                Some(Event::Failed(e)) => return Err(e),
                Some(Event::Message(_)) => {}
                None if self.link.is_closed() => return Err(ClientError::Closed),
                None => return Err(ClientError::Timeout(Duration::ZERO)),
            }
        }
        Ok(())
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if let Some((channel, token)) = self.route.take() {
            self.link.finish(&channel, token);
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A TCP or Unix socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(d),
            Stream::Unix(s) => s.set_write_timeout(d),
        }
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(d),
            Stream::Unix(s) => s.set_read_timeout(d),
        }
    }

    /// Closes both directions, waking a thread blocked reading it.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(NetShutdown::Both),
            Stream::Unix(s) => s.shutdown(NetShutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A connection past its handshake.
struct Conn {
    stream: Stream,
    reader: BufReader<Reading>,
    parser: redis::Parser,
    run_id: Option<String>,
}

/// The reading half of a connection. While `deadline` is set (the handshake)
/// each read waits only for the time left until it, so a peer that answers
/// nothing, or a byte at a time, fails the handshake at the deadline; after,
/// reads wait without a timeout (and cost no system call more).
struct Reading {
    stream: Stream,
    deadline: Option<Instant>,
}

impl Read for Reading {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// Opens a connection and runs the handshake, all within `timeout`: past it,
/// [`ClientError::Timeout`] with `timeout`; any other failure is a
/// [`ClientError::Connection`] (or [`ClientError::Config`] for a refused
/// password or a TLS URL). Name resolution is not bounded by `timeout`.
fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Conn, ClientError> {
    let deadline = Instant::now() + timeout;
    let fail = |what: &str, e: std::io::Error| {
        if is_timeout(&e) {
            ClientError::Timeout(timeout)
        } else {
            ClientError::Connection(format!("{what}: {e}"))
        }
    };
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ClientError::Timeout(timeout))
        } else {
            Ok(left)
        }
    };
    let stream = match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| fail(host, e))?;
            let mut last = None;
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, left()?) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = match (found, last) {
                (Some(s), _) => s,
                (None, Some(e)) => return Err(fail(&format!("{host}:{port}"), e)),
                (None, None) => return Err(ClientError::Connection(format!("{host}: no address"))),
            };
            s.set_nodelay(true).map_err(|e| fail("connect", e))?;
            Stream::Tcp(s)
        }
        ConnectionAddr::Unix(path) => {
            Stream::Unix(UnixStream::connect(path).map_err(|e| fail("connect", e))?)
        }
        _ => {
            return Err(ClientError::Config(
                "this client speaks TCP and Unix sockets, not TLS".into(),
            ))
        }
    };
    let settings = info.redis_settings();
    let mut writer = stream.try_clone().map_err(|e| fail("connect", e))?;
    writer
        .set_write_timeout(Some(left()?))
        .and_then(|()| {
            writer.write_all(&wire::handshake(
                settings.username(),
                settings.password(),
                settings.db(),
            ))
        })
        .map_err(|e| fail("handshake", e))?;
    let mut reader = BufReader::new(Reading {
        stream,
        deadline: Some(deadline),
    });
    let mut parser = redis::Parser::new();
    let mut answers = Vec::new();
    for step in ["HELLO", "SELECT", "INFO"] {
        let v = parser.parse_value(&mut reader).map_err(|e| {
            if e.is_timeout() {
                ClientError::Timeout(timeout)
            } else {
                ClientError::Connection(format!("{step}: {e}"))
            }
        })?;
        if let Some(e) = wire::error_text(&v) {
            // INFO may be renamed away or denied: then restarts are not told apart.
            if step != "INFO" {
                let why = wire::handshake_error(step, &e);
                return Err(if e.contains("WRONGPASS") || e.contains("NOAUTH") {
                    ClientError::Config(why)
                } else {
                    ClientError::Connection(why)
                });
            }
        }
        answers.push(v);
    }
    let run_id = answers.get(2).and_then(wire::run_id);
    reader.get_mut().deadline = None;
    reader
        .get_ref()
        .stream
        .set_read_timeout(None)
        .map_err(|e| fail("connect", e))?;
    Ok(Conn {
        stream: writer,
        reader,
        parser,
        run_id,
    })
}

/// Makes `conn` the current connection: a restarted Redis fails every call in
/// flight and drops the id block; the same Redis gets the awaited channels
/// subscribed again. Returns the connection's generation.
fn install(sh: &Shared, conn: &mut Conn) -> u64 {
    let mut w = lock(&sh.writer);
    let mut st = lock(&sh.state);
    if sh.closed.load(Ordering::SeqCst) {
        // Closed while it reconnected: the reader thread sees the socket close.
        conn.stream.shutdown();
        return st.generation;
    }
    st.generation += 1;
    let generation = st.generation;
    let same = !st.connected_once || (conn.run_id.is_some() && st.run_id == conn.run_id);
    if !same {
        for (_, r) in st.routes.drain() {
            r.tx.send(Event::Failed(ClientError::Connection(
                "Redis restarted while the call waited: its reply is lost".into(),
            )));
        }
        st.ids = 0..0;
        st.id_error = None;
        st.epoch += 1;
    }
    st.connected_once = true;
    st.run_id = conn.run_id.clone();
    st.fifo.clear();
    st.unsubscribe.clear();
    st.fetching = false;
    let awaited: Vec<String> = st.routes.keys().cloned().collect();
    let stream = match conn.stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            // The reader thread sees the connection fail and tries again.
            st.last_error = e.to_string();
            conn.stream.shutdown();
            return generation;
        }
    };
    let resubscribe = wire::subscription("SUBSCRIBE", &awaited);
    if !resubscribe.is_empty() {
        let ok = conn
            .stream
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .and_then(|()| conn.stream.write_all(&resubscribe));
        if ok.is_err() {
            conn.stream.shutdown();
            return generation;
        }
    }
    *lock(&sh.socket) = stream.try_clone().ok();
    *w = Some(Writer {
        stream,
        generation,
        timeout: None,
    });
    st.up = true;
    sh.changed.notify_all();
    generation
}

/// The reader thread: serves a connection until it breaks, then reconnects,
/// until the link is closed.
fn run(sh: Arc<Shared>, first: Conn, generation: u64, stop: Receiver<()>) {
    let mut current = Some((first, generation));
    loop {
        let (mut conn, generation) = match current.take() {
            Some(c) => c,
            None => match reconnect(&sh, &stop) {
                Some(mut conn) => {
                    let g = install(&sh, &mut conn);
                    (conn, g)
                }
                None => return,
            },
        };
        let why = serve(&sh, &mut conn);
        conn.stream.shutdown();
        if sh.closed.load(Ordering::SeqCst) {
            return;
        }
        lost(&sh, generation, why);
    }
}

/// Connects again with back-off; `None` once the link is closed.
fn reconnect(sh: &Shared, stop: &Receiver<()>) -> Option<Conn> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if sh.closed.load(Ordering::SeqCst) {
            return None;
        }
        match connect(&sh.info, CONNECT_TIMEOUT) {
            Ok(c) => return Some(c),
            Err(e) => {
                let mut st = lock(&sh.state);
                st.last_error = e.to_string();
            }
        }
        if stop.recv_timeout(backoff).is_ok() {
            return None;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads frames until the connection fails; returns why.
fn serve(sh: &Shared, conn: &mut Conn) -> String {
    loop {
        let v = match conn.parser.parse_value(&mut conn.reader) {
            Ok(v) => v,
            Err(e) => return e.to_string(),
        };
        let mut st = lock(&sh.state);
        match wire::classify(v) {
            Frame::Message(channel, payload) => {
                if let Some(r) = st.routes.remove(&channel) {
                    r.tx.send(Event::Message(payload));
                    st.unsubscribe.push(channel);
                }
            }
            Frame::OtherPush => {}
            Frame::Answer(v) => match st.fifo.pop_front() {
                Some(Slot::Call { tx, queued }) => {
                    let result = match wire::error_text(&v) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                    if let (Ok(()), Some((channel, token))) = (&result, queued) {
                        if let Some(r) = st.routes.get_mut(&channel) {
                            if r.token == token {
                                r.queued = true;
                            }
                        }
                    }
                    tx.send(Event::Ack(result));
                }
                Some(Slot::Ids) => {
                    st.fetching = false;
                    match (&v, wire::error_text(&v)) {
                        (_, Some(e)) => st.id_error = Some(ClientError::Refused(e)),
                        (Value::Int(end), None) => match wire::id_block(*end) {
                            Some(block) => st.ids = block,
                            None => {
                                st.id_error = Some(ClientError::Protocol(format!(
                                    "{} is {end}, below one block of ids",
                                    sh.counter
                                )))
                            }
                        },
                        (other, None) => {
                            st.id_error =
                                Some(ClientError::Protocol(format!("INCRBY answered {other:?}")))
                        }
                    }
                    sh.changed.notify_all();
                }
                None => return format!("an answer nobody asked for: {v:?}"),
            },
        }
    }
}

/// After the connection of `generation` broke: calls whose request Redis had not
/// acknowledged fail now; acknowledged ones wait for the reconnect. After a cut
/// (see [`State::cut`]) every call waits until its deadline: its request, written
/// whole before the write that timed out, runs once Redis reads it if Redis's
/// socket holds it (see the module's comment); its answers are lost with the
/// connection, so a one-way call that waits for them times out.
fn lost(sh: &Shared, generation: u64, why: String) {
    {
        let mut st = lock(&sh.state);
        if st.generation == generation {
            st.up = false;
            let cut = st.cut == Some(generation);
            if !cut {
                st.last_error = why.clone();
            }
            for slot in st.fifo.drain(..) {
                if let (Slot::Call { tx, .. }, false) = (slot, cut) {
                    tx.send(Event::Failed(ClientError::Connection(format!(
                        "connection lost before Redis acknowledged the request: {why}"
                    ))));
                }
            }
            st.unsubscribe.clear();
            st.fetching = false;
            st.routes.retain(|_, r| {
                // After a cut the request is in Redis's socket: as good as queued.
                r.queued |= cut;
                if !r.queued {
                    r.tx.send(Event::Failed(ClientError::Connection(format!(
                        "connection lost before Redis acknowledged the request: {why}"
                    ))));
                }
                r.queued
            });
            sh.changed.notify_all();
        }
    }
    let mut w = lock(&sh.writer);
    if w.as_ref().is_some_and(|wr| wr.generation == generation) {
        if let Some(wr) = w.take() {
            wr.stream.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer on one end of a socket pair whose other end nobody reads yet,
    /// with a write timeout of 10 ms already set, as an earlier call with 10 ms
    /// left would have set it.
    fn stalled() -> (Writer, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        ours.set_write_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let writer = Writer {
            stream: Stream::Unix(ours),
            generation: 0,
            timeout: Some(Duration::from_millis(10)),
        };
        (writer, theirs)
    }

    /// More than a socket pair's buffers hold, so the write blocks until read.
    const BIG: usize = 8 << 20;

    #[test]
    fn a_write_outlasting_an_earlier_shorter_timeout_goes_on_until_its_own_deadline() {
        let (mut writer, mut theirs) = stalled();
        let reader = std::thread::spawn(move || {
            // Starts reading well after the 10 ms the socket was last set to.
            std::thread::sleep(Duration::from_millis(200));
            let mut buf = vec![0; BIG];
            theirs.read_exact(&mut buf).map(|()| buf.len())
        });
        let out = vec![b'x'; BIG];
        let deadline = Instant::now() + Duration::from_secs(20);
        writer
            .write_by(&out, deadline)
            .expect("written before its deadline");
        assert_eq!(reader.join().expect("reader").expect("read"), BIG);
    }

    #[test]
    fn a_write_nobody_reads_fails_at_its_deadline_not_before() {
        let (mut writer, _theirs) = stalled();
        let out = vec![b'x'; BIG];
        let start = Instant::now();
        let e = writer
            .write_by(&out, start + Duration::from_millis(300))
            .expect_err("nobody reads");
        assert!(is_timeout(&e), "{e}");
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
    }
}
