//! The HTTP/1.1 wire format, pure (no sockets): parsing and checking a request
//! head with `httparse` (size and header-count limits, request framing, keep-alive
//! and `Expect`), decoding a request body (`Content-Length` or chunked) from any
//! `BufRead`, and writing a response head and chunks. Everything a client can get
//! wrong is refused here with the status to answer ([`Refusal`]), so the server
//! (`server.rs`) only moves bytes. Not for: sockets, timeouts or threads
//! (`server.rs`), routes (`mod.rs`).

use std::io::{self, BufRead, Write};

/// Most header lines in a request head (more: 431).
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// Most bytes of trailer fields after a chunked body.
const MAX_TRAILERS: usize = 8 << 10;

/// Why a request head is refused: the status to answer (the connection is closed
/// after it) and a short reason for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) why: &'static str,
}

const fn refuse(status: u16, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A checked request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// The request target as sent (`/path?query`, or anything else for the
    /// router to refuse).
    pub(crate) target: String,
    /// HTTP/1.`minor`: 0 or 1.
    pub(crate) minor: u8,
    /// Names as sent, values as bytes (they may be any octets but CR, LF, NUL).
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) framing: Framing,
    /// Whether the client lets the connection stay open after this exchange.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before its body.
    pub(crate) expect_continue: bool,
}

impl Head {
    /// The first value of header `name` (any case) that is UTF-8.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .find_map(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Every value of header `name` (any case).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The comma-separated tokens of every `name` header, trimmed and lowercased.
    fn tokens(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: not complete yet
/// (read more, unless `buf` already holds `max_head` bytes: then it is too
/// large). `Ok(Some((head, n)))`: the head took `n` bytes; what follows is body.
pub(crate) fn parse_head(buf: &[u8], max_head: usize) -> Result<Option<(Head, usize)>, Refusal> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut rq = httparse::Request::new(&mut slots);
    let n = match rq.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(refuse(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header lines")),
        Err(httparse::Error::Version) => return Err(refuse(505, "HTTP version not supported")),
        // `Token` also covers a request target that is not UTF-8.
        Err(_) => return Err(refuse(400, "malformed request head")),
    };
    if n > max_head {
        return Err(refuse(431, "request head too large"));
    }
    let (Some(method), Some(target), Some(minor)) = (rq.method, rq.path, rq.version) else {
        return Err(refuse(400, "malformed request line"));
    };
    let headers: Vec<(String, Vec<u8>)> = rq
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        minor,
        headers,
        framing: Framing::None,
        keep_alive: false,
        expect_continue: false,
    };
    if head.headers.iter().any(|(_, v)| v.contains(&0)) {
        return Err(refuse(400, "NUL in a header value"));
    }
    head.framing = framing(&head)?;
    let connection = head.tokens("connection");
    head.keep_alive = match minor {
        1 => !connection.iter().any(|t| t == "close"),
        _ => connection.iter().any(|t| t == "keep-alive"),
    };
    let expect = head.tokens("expect");
    if !expect.is_empty() {
        if expect != ["100-continue"] {
            return Err(refuse(417, "only Expect: 100-continue is supported"));
        }
        head.expect_continue = minor == 1 && head.framing != Framing::None;
    }
    let hosts = head.values("host").count();
    if hosts > 1 || (minor == 1 && hosts == 0) {
        return Err(refuse(400, "an HTTP/1.1 request needs exactly one Host"));
    }
    Ok(Some((head, n)))
}

/// The body's framing from `Content-Length` and `Transfer-Encoding`; both, or
/// lengths that differ, are refused (a request two parsers could read apart is
/// how requests are smuggled).
fn framing(head: &Head) -> Result<Framing, Refusal> {
    let codings = head.tokens("transfer-encoding");
    let mut length: Option<u64> = None;
    for value in head.values("content-length") {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
                return Err(refuse(400, "bad Content-Length"));
            }
            let n = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(refuse(400, "bad Content-Length"))?;
            match length {
                Some(m) if m != n => return Err(refuse(400, "conflicting Content-Length")),
                _ => length = Some(n),
            }
        }
    }
    match (length, codings.is_empty()) {
        (Some(_), false) => Err(refuse(400, "both Content-Length and Transfer-Encoding")),
        (Some(0), true) | (None, true) => Ok(Framing::None),
        (Some(n), true) => Ok(Framing::Length(n)),
        (None, false) if codings.last().map(String::as_str) != Some("chunked") => {
            Err(refuse(400, "Transfer-Encoding must end with chunked"))
        }
        (None, false) if codings.len() > 1 => {
            Err(refuse(501, "only the chunked transfer coding is supported"))
        }
        (None, false) => Ok(Framing::Chunked),
    }
}

/// Decodes a request body from the bytes after its head, as the framing says.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
    trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Before a chunk-size line.
    Size,
    /// Bytes left of a chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    Done,
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("chunked body: {why}"))
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::None | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
        };
        Decoder { state, trailers: 0 }
    }

    /// Whether the whole body has been read (the connection can take the next
    /// request).
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads body bytes from `r` into `buf`; 0 at the body's end. A connection
    /// closed early is `UnexpectedEof`, bad chunk framing `InvalidData`.
    pub(crate) fn read<R: BufRead>(&mut self, r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Length(left) | State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(0);
                    }
                    let avail = r.fill_buf()?;
                    if avail.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let n = avail.len().min(buf.len()).min(left as usize);
                    buf[..n].copy_from_slice(&avail[..n]);
                    r.consume(n);
                    let left = left - n as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::DataEnd,
                        _ => State::Data(left),
                    };
                    return Ok(n);
                }
                State::Size => {
                    let line = read_line(r, MAX_CHUNK_LINE)?;
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::DataEnd => {
                    if !read_line(r, 2)?.is_empty() {
                        return Err(invalid("no CRLF after a chunk"));
                    }
                    self.state = State::Size;
                }
                State::Trailers => {
                    let line = read_line(r, MAX_TRAILERS)?;
                    self.trailers += line.len() + 2;
                    if self.trailers > MAX_TRAILERS {
                        return Err(invalid("trailers too large"));
                    }
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
            }
        }
    }
}

/// One CRLF-terminated line (without the CRLF), at most `max` bytes.
fn read_line<R: BufRead>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (take, end) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        line.extend_from_slice(&avail[..take]);
        r.consume(take);
        if line.len() > max + 2 {
            return Err(invalid("line too long"));
        }
        if end {
            if !line.ends_with(b"\r\n") {
                return Err(invalid("a line must end with CRLF"));
            }
            line.truncate(line.len() - 2);
            return Ok(line);
        }
    }
}

/// The size of a chunk from its size line: hex digits, then optional
/// whitespace and `;extensions`.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(invalid("bad chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(invalid("bad chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    /// No body may follow (1xx, 204, 304) or it ends with the connection: no
    /// length header.
    Bare,
    /// `Content-Length: n` (also for a HEAD answer, which sends no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Whether a response of `status` carries no body whatever the request was.
pub(crate) fn bodiless(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Headers the server writes itself: a handler's are dropped.
fn ours(name: &str) -> bool {
    [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Appends a response head to `out`: the status line for HTTP/1.`minor`,
/// `headers` (a handler's framing headers and any name or value that could
/// break the head are left out), `Date`, the framing, and `Connection`.
pub(crate) fn response_head(
    out: &mut Vec<u8>,
    minor: u8,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: Out,
    keep_alive: bool,
    date: &str,
) {
    let _ = write!(out, "HTTP/1.{minor} {status} {}\r\n", reason(status));
    for (name, value) in headers {
        if ours(name) || !valid_name(name) || value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "Date: {date}\r\n");
    match body {
        Out::Bare => {}
        Out::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    match (keep_alive, minor) {
        (false, _) => out.extend_from_slice(b"Connection: close\r\n"),
        (true, 0) => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        (true, _) => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `data` as one chunk (nothing for empty data: that would end the body).
pub(crate) fn write_chunk<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut frame = Vec::with_capacity(data.len() + 12);
    let _ = write!(frame, "{:x}\r\n", data.len());
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
    w.write_all(&frame)
}

/// The last chunk, which ends a chunked body.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The reason phrase of `status` (any phrase is valid; clients ignore it).
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MAX: usize = 16 << 10;

    fn head(raw: &str) -> Result<Option<(Head, usize)>, Refusal> {
        parse_head(raw.as_bytes(), MAX)
    }

    fn status(raw: &str) -> u16 {
        head(raw).expect_err("refused").status
    }

    #[test]
    fn a_head_is_parsed_with_its_framing_and_keep_alive() {
        let raw = "GET /api/hello?x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\nrest";
        let (h, n) = head(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], "rest");
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("GET", "/api/hello?x=1")
        );
        assert_eq!(h.header("x-a"), Some("1"));
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive && !h.expect_continue);
        let (h, _) =
            head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert!(!h.keep_alive);
        let (h, _) = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        let (h, _) = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let (h, _) = head("PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.expect_continue);
        let (h, _) =
            head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(
            h.framing,
            Framing::Length(3),
            "repeated equal lengths are one"
        );
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_the_limit() {
        assert_eq!(head("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX));
        assert_eq!(parse_head(big.as_bytes(), MAX).unwrap_err().status, 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            431
        );
    }

    #[test]
    fn bad_heads_get_their_status() {
        assert_eq!(
            parse_head(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", MAX)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status("GET  / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400, "no Host");
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n"),
            400
        );
        let cl = |v: &str| status(&format!("POST / HTTP/1.1\r\nHost: a\r\n{v}\r\n\r\n"));
        assert_eq!(cl("Content-Length: 5\r\nContent-Length: 6"), 400);
        assert_eq!(cl("Content-Length: 5, 6"), 400);
        assert_eq!(cl("Content-Length: -1"), 400);
        assert_eq!(cl("Content-Length: 1e3"), 400);
        assert_eq!(cl("Content-Length: 99999999999999999999999"), 400);
        assert_eq!(cl("Content-Length: 5\r\nTransfer-Encoding: chunked"), 400);
        assert_eq!(cl("Transfer-Encoding: chunked, gzip"), 400);
        assert_eq!(cl("Transfer-Encoding: gzip, chunked"), 501);
        assert_eq!(cl("Expect: something"), 417);
    }

    fn decode(framing: Framing, wire: &[u8]) -> (io::Result<Vec<u8>>, usize) {
        let mut r = Cursor::new(wire);
        let mut d = Decoder::new(framing);
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        let got = loop {
            match d.read(&mut r, &mut buf) {
                Ok(0) => break Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        (got, r.position() as usize)
    }

    #[test]
    fn bodies_are_decoded_and_stop_at_their_end() {
        let (got, at) = decode(Framing::Length(5), b"hello, next");
        assert_eq!((got.unwrap(), at), (b"hello".to_vec(), 5));
        let wire = b"5;ext=1\r\nhello\r\n7 \r\n, world\r\n0\r\nX-T: 1\r\n\r\nGET";
        let (got, at) = decode(Framing::Chunked, wire);
        assert_eq!(got.unwrap(), b"hello, world");
        assert_eq!(&wire[at..], b"GET", "stops after the trailers");
        assert!(decode(Framing::None, b"x").0.unwrap().is_empty());
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ] {
            let err = decode(Framing::Chunked, wire).0.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{wire:?}");
        }
        let long = format!("5;{}\r\n", "e".repeat(2000));
        assert!(decode(Framing::Chunked, long.as_bytes()).0.is_err());
        let trailers = format!("0\r\n{}", "X: 1\r\n".repeat(2000));
        assert!(decode(Framing::Chunked, trailers.as_bytes()).0.is_err());
        let eof = decode(Framing::Length(10), b"short").0.unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
        assert!(decode(Framing::Chunked, b"5\r\nhel").0.is_err());
    }

    #[test]
    fn response_heads_carry_framing_and_leave_out_what_could_break_them() {
        let mut out = Vec::new();
        let headers = vec![
            ("Content-Type".to_string(), b"text/plain".to_vec()),
            ("Content-Length".to_string(), b"999".to_vec()),
            ("X-Evil".to_string(), b"a\r\nInjected: 1".to_vec()),
            ("Bad Name".to_string(), b"1".to_vec()),
        ];
        response_head(&mut out, 1, 404, &headers, Out::Length(3), true, "D");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nDate: D\r\nContent-Length: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        response_head(&mut out, 0, 200, &[], Out::Bare, true, "D");
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Connection: keep-alive\r\n\r\n"));
        let mut out = Vec::new();
        response_head(&mut out, 1, 200, &[], Out::Chunked, false, "D");
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("Transfer-Encoding: chunked\r\n") && s.contains("Connection: close\r\n")
        );
        let mut out = Vec::new();
        write_chunk(&mut out, b"hello, world").unwrap();
        write_chunk(&mut out, b"").unwrap();
        out.extend_from_slice(LAST_CHUNK);
        assert_eq!(out, b"c\r\nhello, world\r\n0\r\n\r\n");
        assert!(bodiless(204) && bodiless(304) && bodiless(101) && !bodiless(200));
    }
}
