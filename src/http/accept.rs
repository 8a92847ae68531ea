//! Accepting connections with timeouts, on tiny_http. tiny_http 0.12 has no
//! socket timeouts; the only way to give its sockets a read and write timeout is
//! to set them on the listening socket, which every accepted socket inherits
//! (Linux copies them on `accept`). But a listening socket's read timeout also
//! makes `accept` itself time out when no connection comes, and tiny_http's
//! accept thread ends at its first error. So:
//! - a keeper thread connects to the listener (and closes at once) four times per
//!   read timeout, so `accept` never waits a whole timeout;
//! - should the accept thread end anyway (a stalled machine), its pump starts a
//!   new tiny_http server on the same socket (nothing is lost: connections wait
//!   in the listen backlog meanwhile) and goes on pumping the old one's open
//!   connections until they have been quiet long enough to have timed out.
//!
//! Each pump thread moves requests from one tiny_http server to the handler
//! threads' channel. Stopping: `closing` is set, pumps and the keeper return
//! within [`POLL`], and the channel's end tells the handler threads.
//! Not for: handling requests (`mod.rs`).

use crossbeam_channel::{SendTimeoutError, Sender};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often pumps and the keeper look at `closing`.
const POLL: Duration = Duration::from_millis(200);

/// What the pumps share.
pub(super) struct Accept {
    /// The bound socket (with its timeouts); each tiny_http server gets a clone.
    pub(super) listener: TcpListener,
    pub(super) requests: Sender<tiny_http::Request>,
    pub(super) closing: Arc<AtomicBool>,
    /// The sockets' read timeout.
    pub(super) read_timeout: Duration,
    /// How long an old server's connections may stay quiet before its pump
    /// retires: past their read timeout plus the longest a response may take.
    pub(super) retire_after: Duration,
}

/// Starts the first pump and the keeper.
pub(super) fn start(accept: Accept) -> std::io::Result<()> {
    let accept = Arc::new(accept);
    let addr = accept.listener.local_addr()?;
    pump(accept.clone(), 1)?;
    let keeper = accept.clone();
    std::thread::Builder::new()
        .name("cerbas-http-keeper".into())
        .spawn(move || keep(&keeper, reachable(addr)))?;
    Ok(())
}

/// The address the keeper connects to: loopback for a wildcard address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

fn keep(accept: &Accept, addr: SocketAddr) {
    let every = (accept.read_timeout / 4).min(Duration::from_secs(1));
    let mut next = Instant::now() + every;
    while !accept.closing.load(Ordering::SeqCst) {
        std::thread::sleep(POLL.min(every));
        if Instant::now() >= next {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
            next = Instant::now() + every;
        }
    }
}

/// Starts pump number `generation` on a new tiny_http server.
fn pump(accept: Arc<Accept>, generation: u64) -> std::io::Result<()> {
    let server = tiny_http::Server::from_listener(accept.listener.try_clone()?, None)
        .map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name(format!("cerbas-http-pump-{generation}"))
        .spawn(move || run(&accept, &server, generation))?;
    Ok(())
}

fn run(accept: &Arc<Accept>, server: &tiny_http::Server, generation: u64) {
    let mut replaced = false;
    let mut last = Instant::now();
    loop {
        if accept.closing.load(Ordering::SeqCst) {
            return;
        }
        match server.recv_timeout(POLL) {
            Ok(Some(rq)) => {
                last = Instant::now();
                if !hand_over(accept, rq) {
                    return;
                }
            }
            Ok(None) if replaced && last.elapsed() > accept.retire_after => return,
            Ok(None) => {}
            // The accept thread ended: its `accept` timed out.
            Err(e) if !replaced => {
                replaced = true;
                last = Instant::now();
                log::debug!("HTTP: accept loop {generation} ended ({e}); starting another");
                if let Err(e) = pump(accept.clone(), generation + 1) {
                    log::error!("HTTP: cannot accept connections any more: {e}");
                }
            }
            Err(_) => {}
        }
    }
}

/// Gives `rq` to a handler thread; false when stopping (the request is dropped,
/// and tiny_http answers it 500).
fn hand_over(accept: &Accept, mut rq: tiny_http::Request) -> bool {
    loop {
        match accept.requests.send_timeout(rq, POLL) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(back)) if !accept.closing.load(Ordering::SeqCst) => {
                rq = back;
            }
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Without the keeper, the accept thread ends after one idle read timeout;
    /// a new one takes over, and the old one's open connection is still served.
    #[test]
    fn an_ended_accept_loop_is_replaced_and_its_connections_still_served() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let timeout = Duration::from_millis(100);
        super::super::socket_timeouts(&listener, timeout, timeout).expect("timeouts");
        let addr = listener.local_addr().expect("addr");
        let (requests, incoming) = crossbeam_channel::bounded(4);
        let closing = Arc::new(AtomicBool::new(false));
        let accept = Arc::new(Accept {
            listener,
            requests,
            closing: closing.clone(),
            read_timeout: timeout,
            retire_after: Duration::from_secs(2),
        });
        pump(accept, 1).expect("pump");
        let handler = std::thread::spawn(move || {
            for rq in incoming {
                let _ = rq.respond(tiny_http::Response::from_string("hi"));
            }
        });
        let ask = |s: &mut TcpStream| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).expect("read");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        // One keep-alive connection, busy across the accept loop's end.
        let mut kept = TcpStream::connect(addr).expect("connect");
        kept.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for _ in 0..8 {
            assert!(ask(&mut kept).starts_with("HTTP/1.1 200"));
            std::thread::sleep(Duration::from_millis(40));
        }
        // A new connection, after several idle timeouts of the listener.
        std::thread::sleep(Duration::from_millis(350));
        let mut fresh = TcpStream::connect(addr).expect("connect");
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(ask(&mut fresh).starts_with("HTTP/1.1 200"));
        closing.store(true, Ordering::SeqCst);
        handler.join().expect("handler");
    }
}
