//! The HTTP/1.1 front on std::net: the listener, the connection cap, each
//! connection's life (reading request heads within a deadline, keep-alive,
//! closing) and the fixed pool of handler threads. Byte-level parsing and
//! checking is `wire.rs`'s; this file moves bytes and keeps time.
//!
//! Threads:
//! - `cerbas-http-accept` accepts connections. Up to `http.max_connections` are
//!   open at once; one beyond that is handed to `cerbas-http-refuse`, which
//!   answers `503` with `Connection: close` and closes it (so a flood costs one
//!   thread and a bounded queue; when even that queue is full the accepting
//!   thread answers and closes at once).
//! - One small thread per open connection reads request heads. A head must
//!   arrive whole within `http.header_timeout_ms` of its first byte (else `408`
//!   and close), a connection idle between requests is closed after
//!   `http.keep_alive_ms`, and a head larger than `http.max_head_bytes` or with
//!   more than 100 lines gets `431`. Bad heads get `400` (or `417`, `501`, `505`)
//!   and the connection is closed. So a slow or hostile client holds one of a
//!   bounded number of connection threads, never a handler thread.
//! - `http.threads` handler threads (`cerbas-http-N`) take complete heads as a
//!   [`Request`] (the body is read from the socket by the handler, through the
//!   framing decoder) and answer with [`Request::respond`]; the connection then
//!   goes back to its thread for the next request.
//!
//! Stopping: [`Front::close`] stops accepting; idle connections close within
//! [`POLL`], a connection that finishes its current exchange closes after it,
//! and a head that arrives meanwhile gets `503`. The handler threads end when
//! every connection thread has gone.
//! Not for: routes (`mod.rs`) or what a response says.

use super::wire::{self, Decoder, Framing, Head, Out, Refusal};
use crate::job::Stats;
use crossbeam_channel::{Receiver, Sender};
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often waiting threads look at `closing`.
const POLL: Duration = Duration::from_millis(200);
/// Stack of a connection thread: it parses heads and writes short refusals only.
const CONN_STACK: usize = 256 << 10;
/// Connections over the cap waiting for the refusing thread; more are
/// answered by the accepting thread and closed at once.
const REFUSE_QUEUE: usize = 1024;
/// Most refused connections kept lingering at once.
const MAX_LINGERING: usize = 4096;
/// How often lingering refused connections are read.
const SWEEP: Duration = Duration::from_millis(20);
/// How long a refused connection is kept to read what its client still sends.
const REFUSE_LINGER: Duration = Duration::from_millis(500);
/// How long a closing connection reads (and drops) what the client still sends,
/// so that its answer is not lost to a reset.
const LINGER: Duration = Duration::from_millis(500);
/// Largest body chunk copied at once when streaming a response.
const COPY: usize = 64 << 10;

/// The front's settings (from `[http]`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) threads: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_head_bytes: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
}

/// A response: status, headers, and a body in memory or streamed.
pub(crate) struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Body,
}

enum Body {
    Bytes(Vec<u8>),
    /// Read to its end (or `length` bytes when given); sent chunked to an
    /// HTTP/1.1 client when the length is unknown.
    Stream(Box<dyn Read>, Option<u64>),
}

impl Response {
    /// A response with `body` held in memory.
    pub(crate) fn new(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Bytes(body),
        }
    }

    /// A response whose body is streamed from `reader` (`length` bytes, when
    /// known). An error reading it ends the response early and closes the
    /// connection, so the client sees a cut-off body, never a wrong one.
    pub(crate) fn stream(status: u16, reader: Box<dyn Read>, length: Option<u64>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Stream(reader, length),
        }
    }

    /// Adds a header. Framing headers are the server's and are left out; so is
    /// any name or value that could break the head.
    pub(crate) fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub(crate) fn status(&self) -> u16 {
        self.status
    }

    /// Whether the handler asked for the connection to be closed after it.
    fn closes(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case(b"close"))
    }
}

/// A connection: the socket and what has been read from it but not used.
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(stream: TcpStream, size: usize) -> Self {
        Conn {
            stream,
            buf: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Waits up to `timeout` for bytes (or the end) to read.
    fn readable(&self, timeout: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        rc > 0
    }

    /// Reads more into the buffer after what is pending (moved to the front);
    /// Ok(0) when the peer closed or the buffer is full.
    fn fill_more(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(0);
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Conn {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            // Emptied first, so a failed read leaves nothing stale behind.
            (self.start, self.end) = (0, 0);
            self.end = self.stream.read(&mut self.buf)?;
        }
        Ok(self.pending())
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

/// What a handler gives back to the connection's thread.
struct Back {
    conn: Conn,
    keep_alive: bool,
}

/// One request, on a handler thread: the head, and the body to read from the
/// connection. Answer it with [`Request::respond`]; dropped unanswered, its
/// connection is closed.
pub(crate) struct Request {
    head: Head,
    remote: SocketAddr,
    decoder: Decoder,
    continue_sent: bool,
    conn: Option<Conn>,
    back: Sender<Back>,
}

impl Request {
    pub(crate) fn method(&self) -> &str {
        &self.head.method
    }

    /// The request target as sent (`/path?query` for an origin-form target).
    pub(crate) fn url(&self) -> &str {
        &self.head.target
    }

    /// The first UTF-8 value of header `name` (any case), trimmed.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// Every header as sent: name and raw value.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.head
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    pub(crate) fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The body's length when the client declared one.
    pub(crate) fn body_length(&self) -> Option<u64> {
        match self.head.framing {
            Framing::Length(n) => Some(n),
            Framing::None => Some(0),
            Framing::Chunked => None,
        }
    }

    /// Whether the request has a body (declared or chunked).
    pub(crate) fn has_body(&self) -> bool {
        self.head.framing != Framing::None
    }

    /// The body, decoded, as it arrives (reads wait up to `http.read_timeout_ms`
    /// each). The first read tells a client that expects `100 Continue` to send.
    pub(crate) fn as_reader(&mut self) -> &mut Self {
        self
    }

    /// Sends `response` (no body for HEAD, 1xx, 204, 304) and gives the
    /// connection back for the next request, or closes it: when the client or
    /// the handler asked to, the body was not read to its end, or the response
    /// could not be sent whole.
    pub(crate) fn respond(mut self, response: Response) -> io::Result<()> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let head_only = self.head.method == "HEAD" || wire::bodiless(response.status);
        let mut keep_alive = self.head.keep_alive && self.decoder.is_done() && !response.closes();
        let minor = self.head.minor;
        let out = match (&response.body, wire::bodiless(response.status)) {
            (_, true) => Out::Bare,
            (Body::Bytes(b), false) => Out::Length(b.len() as u64),
            (Body::Stream(_, Some(n)), false) => Out::Length(*n),
            (Body::Stream(_, None), false) if minor == 1 => Out::Chunked,
            (Body::Stream(_, None), false) => {
                // Delimited by the connection's end.
                keep_alive = false;
                Out::Bare
            }
        };
        let mut wire_out = Vec::with_capacity(256);
        wire::response_head(
            &mut wire_out,
            minor,
            response.status,
            &response.headers,
            out,
            keep_alive,
            &date(),
        );
        let sent = match response.body {
            Body::Bytes(b) => {
                if !head_only {
                    wire_out.extend_from_slice(&b);
                }
                conn.stream.write_all(&wire_out)
            }
            Body::Stream(_, _) if head_only => conn.stream.write_all(&wire_out),
            Body::Stream(reader, length) => conn
                .stream
                .write_all(&wire_out)
                .and_then(|()| stream_body(&mut conn.stream, reader, length, out)),
        };
        if sent.is_err() {
            keep_alive = false;
        }
        let _ = self.back.send(Back { conn, keep_alive });
        sent
    }
}

/// Copies a streamed body to the client: `length` bytes exactly, or chunked.
fn stream_body(
    w: &mut TcpStream,
    mut reader: Box<dyn Read>,
    length: Option<u64>,
    out: Out,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY];
    let mut left = length;
    loop {
        let want = left.map_or(COPY, |l| (l as usize).min(COPY));
        if want == 0 {
            return Ok(());
        }
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) if left.is_some() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body shorter than its length",
                ))
            }
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(l) = &mut left {
            *l -= n as u64;
        }
        match out {
            Out::Chunked => wire::write_chunk(w, &buf[..n])?,
            _ => w.write_all(&buf[..n])?,
        }
    }
    if out == Out::Chunked {
        w.write_all(wire::LAST_CHUNK)?;
    }
    Ok(())
}

impl Read for Request {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(0);
        };
        if self.head.expect_continue && !self.continue_sent && !self.decoder.is_done() {
            self.continue_sent = true;
            let line = format!("HTTP/1.1 100 {}\r\n\r\n", wire::reason(100));
            conn.stream.write_all(line.as_bytes())?;
        }
        self.decoder.read(conn, buf)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = self.back.send(Back {
                conn,
                keep_alive: false,
            });
        }
    }
}

/// The `Date` header's value now (RFC 9110 IMF-fixdate).
fn date() -> String {
    chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// The running front.
pub(crate) struct Front {
    closing: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What connection threads share.
struct Shared {
    settings: Settings,
    closing: Arc<AtomicBool>,
    open: AtomicUsize,
    stats: Arc<Stats>,
}

/// Starts accepting on `listener` and the handler threads, each calling
/// `handle` for every request.
pub(crate) fn start<H>(
    listener: TcpListener,
    settings: Settings,
    stats: Arc<Stats>,
    handle: H,
) -> io::Result<Front>
where
    H: Fn(Request) + Send + Sync + 'static,
{
    listener.set_nonblocking(true)?;
    let closing = Arc::new(AtomicBool::new(false));
    let (requests, incoming) = crossbeam_channel::bounded::<Request>(settings.threads);
    let handle = Arc::new(handle);
    let mut threads = Vec::with_capacity(settings.threads + 2);
    for i in 1..=settings.threads {
        let (incoming, handle) = (incoming.clone(), handle.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("cerbas-http-{i}"))
                .spawn(move || {
                    // Ends when every connection thread (and the acceptor) has gone.
                    for rq in incoming {
                        handle(rq);
                    }
                })?,
        );
    }
    let (refuse_tx, refuse_rx) = crossbeam_channel::bounded::<TcpStream>(REFUSE_QUEUE);
    threads.push(
        std::thread::Builder::new()
            .name("cerbas-http-refuse".into())
            .spawn(move || refuse_all(&refuse_rx))?,
    );
    let shared = Arc::new(Shared {
        settings,
        closing: closing.clone(),
        open: AtomicUsize::new(0),
        stats,
    });
    threads.push(
        std::thread::Builder::new()
            .name("cerbas-http-accept".into())
            .spawn(move || accept(&listener, &shared, &requests, &refuse_tx))?,
    );
    Ok(Front { closing, threads })
}

impl Front {
    /// Stops accepting: idle connections close, busy ones after their exchange,
    /// and the threads end. Returns at once.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Waits for the threads until `by`; says whether all have stopped (a
    /// thread still streaming a proxied body is left behind).
    pub(crate) fn join(self, by: Instant) -> bool {
        self.close();
        loop {
            if self.threads.iter().all(|t| t.is_finished()) {
                for t in self.threads {
                    let _ = t.join();
                }
                return true;
            }
            if Instant::now() >= by {
                log::warn!("HTTP threads still busy at the stop deadline; left behind");
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn accept(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    requests: &Sender<Request>,
    refuse: &Sender<TcpStream>,
) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.closing.load(Ordering::SeqCst) {
        // SAFETY: one valid pollfd that lives across the call.
        if unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as libc::c_int) } <= 0 {
            continue;
        }
        let (stream, remote) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                log::warn!("HTTP: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.open.load(Ordering::SeqCst) >= shared.settings.max_connections {
            shared.stats.metrics.http_request("over_capacity", 503);
            if let Err(e) = refuse.try_send(stream) {
                refuse_now(&e.into_inner(), &over_capacity());
                log::debug!("HTTP: over the connection cap; closed {remote} at once");
            }
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let (shared2, requests) = (shared.clone(), requests.clone());
        let spawned = std::thread::Builder::new()
            .name("cerbas-http-conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                let _open = Open(&shared2.open);
                serve(stream, remote, &shared2, &requests);
            });
        if let Err(e) = spawned {
            // The closure (and its `Open`) was dropped: the count is back.
            log::warn!("HTTP: cannot start a connection thread ({e}); closed {remote}");
        }
    }
}

/// Counts an open connection until dropped.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The answer to a connection over the cap.
fn over_capacity() -> Vec<u8> {
    let body = "too many connections; try again later\n";
    let mut answer = Vec::new();
    wire::response_head(
        &mut answer,
        1,
        503,
        &[
            ("Content-Type".into(), b"text/plain; charset=utf-8".to_vec()),
            ("Retry-After".into(), b"1".to_vec()),
        ],
        Out::Length(body.len() as u64),
        false,
        &date(),
    );
    answer.extend_from_slice(body.as_bytes());
    answer
}

/// Sends `answer` on a fresh connection without blocking (its empty send
/// buffer takes it whole) and ends the sending side.
fn refuse_now(stream: &TcpStream, answer: &[u8]) {
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write(answer);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Answers connections over the cap `503` and closes them. Each is kept for
/// up to [`REFUSE_LINGER`] after its answer, reading (and dropping) what the
/// client sends, without blocking: closing with unread input would reset the
/// connection and could lose the answer.
fn refuse_all(streams: &Receiver<TcpStream>) {
    let mut lingering: Vec<(TcpStream, Instant)> = Vec::new();
    let mut next_sweep = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let wait = match lingering.is_empty() {
            true => POLL,
            false => SWEEP,
        };
        let first = match streams.recv_timeout(wait) {
            Ok(stream) => Some(stream),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        // Made for each batch, so its Date is now.
        let answer = over_capacity();
        for stream in first.into_iter().chain(streams.try_iter()) {
            refuse_now(&stream, &answer);
            if lingering.len() < MAX_LINGERING {
                lingering.push((stream, Instant::now() + REFUSE_LINGER));
            }
        }
        let now = Instant::now();
        if now < next_sweep {
            continue;
        }
        next_sweep = now + SWEEP;
        lingering.retain(|(stream, until)| {
            now < *until
                && loop {
                    match (&*stream).read(&mut buf) {
                        Ok(0) => break false,
                        Ok(_) => {}
                        Err(e) => break e.kind() == io::ErrorKind::WouldBlock,
                    }
                }
        });
    }
}

/// Closes `stream` after reading what the client still sends for up to `for_`
/// (closing with unread input would reset the connection and could lose the
/// answer just sent).
fn linger(stream: TcpStream, for_: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let until = Instant::now() + for_;
    let mut buf = [0u8; 4096];
    let mut read = 0usize;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            break;
        }
        match (&stream).read(&mut buf) {
            Ok(n) if n > 0 && read < (1 << 20) => read += n,
            _ => break,
        }
    }
}

/// What reading a request head came to.
enum Got {
    Head(Head),
    /// The client closed, or stayed idle past the keep-alive time, or the
    /// front is closing: close without a word.
    Closed,
    Refused(Refusal),
}

fn serve(stream: TcpStream, remote: SocketAddr, shared: &Shared, requests: &Sender<Request>) {
    let s = &shared.settings;
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_nonblocking(false))
        .and_then(|()| stream.set_read_timeout(Some(s.read_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(s.write_timeout)));
    if let Err(e) = setup {
        log::debug!("HTTP: cannot set up a connection from {remote}: {e}");
        return;
    }
    let mut conn = Conn::new(stream, s.max_head_bytes);
    // The first request may take the head timeout to start; later ones the
    // keep-alive time.
    let mut idle = s.header_timeout;
    let (back_tx, back_rx) = crossbeam_channel::bounded::<Back>(1);
    loop {
        let head = match read_head(&mut conn, shared, idle) {
            Got::Head(head) => head,
            Got::Closed => return,
            Got::Refused(r) => {
                shared.stats.metrics.http_request("bad_request", r.status);
                let body = format!("{}\n", r.why);
                answer_and_close(conn, r.status, &body);
                return;
            }
        };
        idle = s.keep_alive;
        if shared.closing.load(Ordering::SeqCst) {
            shared.stats.metrics.http_request("stopping", 503);
            answer_and_close(conn, 503, "stopping: try again later\n");
            return;
        }
        let rq = Request {
            decoder: Decoder::new(head.framing),
            head,
            remote,
            continue_sent: false,
            conn: Some(conn),
            back: back_tx.clone(),
        };
        if requests.send(rq).is_err() {
            return;
        }
        match back_rx.recv() {
            Ok(Back {
                conn: c,
                keep_alive: true,
            }) if !shared.closing.load(Ordering::SeqCst) => conn = c,
            Ok(Back { conn, .. }) => return linger(conn.stream, LINGER),
            Err(_) => return,
        }
    }
}

/// Writes a short plain-text answer with `Connection: close`, then closes.
fn answer_and_close(mut conn: Conn, status: u16, body: &str) {
    let mut out = Vec::new();
    wire::response_head(
        &mut out,
        1,
        status,
        &[("Content-Type".into(), b"text/plain; charset=utf-8".to_vec())],
        Out::Length(body.len() as u64),
        false,
        &date(),
    );
    out.extend_from_slice(body.as_bytes());
    let _ = conn.stream.write_all(&out);
    linger(conn.stream, LINGER);
}

/// Reads the next request head: waits up to `idle` for its first byte, then up
/// to the head timeout for all of it.
fn read_head(conn: &mut Conn, shared: &Shared, idle: Duration) -> Got {
    let s = &shared.settings;
    let idle_until = Instant::now() + idle;
    let mut head_until: Option<Instant> = None;
    loop {
        // Bytes left over from the last request (pipelined) count as a start.
        if conn.start < conn.end {
            match wire::parse_head(conn.pending(), s.max_head_bytes) {
                Ok(Some((head, n))) => {
                    conn.consume(n);
                    return Got::Head(head);
                }
                Ok(None) => {}
                Err(r) => return Got::Refused(r),
            }
            head_until.get_or_insert_with(|| Instant::now() + s.header_timeout);
        }
        let until = head_until.unwrap_or(idle_until);
        let now = Instant::now();
        if now >= until {
            return match head_until {
                Some(_) => Got::Refused(Refusal {
                    status: 408,
                    why: "request head not received in time",
                }),
                None => Got::Closed,
            };
        }
        if shared.closing.load(Ordering::SeqCst) {
            return Got::Closed;
        }
        if !conn.readable((until - now).min(POLL)) {
            continue;
        }
        match conn.fill_more() {
            Ok(0) | Err(_) => return Got::Closed,
            Ok(_) => {}
        }
    }
}
