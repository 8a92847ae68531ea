"""The blocking cerbas client: one ``Client`` shared by any number of threads.
Not for: asyncio (aio.py), or the pure protocol parts (_protocol.py).

How one call goes (docs/PROTOCOL.md, "The steps of one request"):

1. an id from the client's block (one ``INCRBY CERBAS-COUNTER 100`` per 100 calls);
2. ``SUBSCRIBE`` to its reply channel, written on the client's one subscriber
   connection (shared by every caller; one waiting caller at a time reads it and
   routes each message to the caller waiting on that channel);
3. ``SET`` the body and ``RPUSH`` the id, pipelined on the one command
   connection every thread shares (_line.py: calls made at the same moment go
   out in one write, a thread reads the answers; never a connection per call);
4. wait for the reply, at most until the deadline: read the subscriber socket
   itself when no other caller does (no thread hand-off for a lone caller), else
   wait for the caller who reads to hand it over; the channel's ``UNSUBSCRIBE``
   goes out with the next call's ``SUBSCRIBE`` (one write per call on the
   subscriber connection; a message on a channel nobody waits for is dropped).

Step 2 does not wait for Redis to confirm the subscription: the ``SUBSCRIBE`` is in
Redis's socket before step 3 is sent, so Redis reads it in the same event-loop turn
as the ``RPUSH`` or earlier, and the server can only publish after it has read the
id (a later turn). Where that ordering fails anyway (a reconnect, a scheduler
hiccup), the server's republish for late subscribers (docs/PROTOCOL.md) delivers
the reply a few milliseconds later; the tests count how often that happens.

Faults: every socket has a timeout, and each step is bounded by the call's own
deadline, so a frozen Redis costs a caller its timeout and no more. A broken
subscriber connection is reopened by the reader thread (which reads only when
no caller does); if Redis is the same run (``INFO server`` ``run_id``) the
awaited channels are subscribed again, if Redis was restarted every waiting call
fails at once with ``ConnectionError`` (its id may be handed out again by the
restarted Redis, and a caller must never get another request's reply), and a new
id block is reserved. A process forked after using a client starts afresh in the
child (``Client._after_fork``).
"""

import os
import select
import ssl
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

import redis

from . import _protocol
from ._line import CommandLine, _disconnect, _shutdown, open_connection
from ._protocol import ClientBase
from .errors import (CerbasError, ClosedError, ConnectionError, ReplyError,
                     RestartedError, TimeoutError, restarted)

__all__ = ["Client"]




class _Waiter:
    """One caller waiting for its reply: whoever reads the subscriber socket fills
    it and releases the lock the caller blocks on (cheaper than an Event); the
    lock is also released to tell a waiting caller that it is its turn to read."""

    __slots__ = ("lock", "data", "error", "reading", "waker")

    def __init__(self, waker: int) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.data: Optional[bytes] = None
        self.error: Optional[CerbasError] = None
        # While its caller reads the subscriber socket (it waits in poll(), not on
        # the lock), a failure from another thread is told through ``waker``.
        self.reading = False
        self.waker = waker

    def done(self) -> bool:
        return self.data is not None or self.error is not None

    def deliver(self, data: bytes) -> None:
        if self.data is None and self.error is None:
            self.data = data
            self._release()

    def fail(self, error: CerbasError) -> None:
        if self.data is None and self.error is None:
            self.error = error
            self._release()
            if self.reading:
                try:
                    os.write(self.waker, b"!")
                except OSError:  # full: a wake-up is pending anyway
                    pass

    def _release(self) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # delivered and failed at once: the caller sees one
            pass


#: Every Client of this process, for _after_fork.
_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Client(ClientBase):
    """A connection to one cerbas deployment: a Redis URL, a database, a prefix.

    Safe to share between threads: every thread of a process may call one
    ``Client`` at the same time (that is what it is built for; one subscriber
    connection and a few command connections serve them all).

    ``user`` and ``source`` are sent with every request unless a call names others;
    they must be registered in the server's configuration. ``timeout`` (seconds) is
    how long a call waits for its reply unless it names another. ``socket_timeout``
    bounds each Redis read and write (a call's deadline bounds it further);
    ``id_block`` is how many ids one ``INCRBY`` reserves.
    """

    def _init_connections(self) -> None:
        settings = dict(self._settings)
        self._conn_class = settings.pop("connection_class", redis.Connection)
        self._kwargs = settings
        # A plain redis-py client on the same Redis, for the caller's own commands.
        self.redis = redis.Redis.from_url(self.url, db=self.db,
                                          socket_timeout=self.socket_timeout,
                                          socket_connect_timeout=self.socket_timeout)

        # _lock guards everything below it; _sub_ready is signalled when the
        # subscriber connection is up (or the client closed).
        self._lock = threading.Lock()
        self._sub_ready = threading.Condition(self._lock)
        self._closed = False
        self._waiters: Dict[bytes, _Waiter] = {}
        self._line = CommandLine(self)
        self._sub_conn: Any = None
        self._sub_poll: Any = None  # select.poll() of the subscriber socket
        self._sub_parser: Any = None  # its RESP parser (kept across reads)
        self._sub_tls = False
        self._reading = False  # a thread is reading the subscriber socket
        # A pipe in that reader's poll(): a failure told to the reading caller's
        # waiter by another thread wakes it (_Waiter.fail). Closed with the
        # Client object, when no thread can be polling it any more.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._close_wake = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        _clients.add(self)
        self._sub_up = False
        self._sub_error: Optional[ConnectionError] = None  # the last reconnect's, while down
        self._sub_failures = 0  # reconnects refused so far
        self._sub_poked = False  # a caller wants a reconnect tried now, not after the pause
        self._unsubscribes: List[bytes] = []  # channels done with, not yet unsubscribed
        self._reader: Optional[threading.Thread] = None
        self._id_lock = threading.Lock()

    def _after_fork(self) -> None:
        """In a child process (os.fork(): gunicorn, Celery, multiprocessing): the
        connections, threads and ids inherited are the parent's. Used as they
        are, the child would read replies off the parent's subscriber socket and
        take ids from the same block as the parent (both processes pushing the
        same id: replies crossed), and its close() would cut the parent's
        connections. So the child starts afresh; the inherited sockets are left
        to be closed without a shutdown (redis-py's disconnect() does none in a
        process other than the one that connected), which the parent's would see."""
        self._close_wake()  # the child's copies of the wake-up pipe
        closed = self._closed
        self._init_connections()
        self._closed = closed
        self._ids = _protocol.IdBlock()

    # --- the API -----------------------------------------------------------------

    def request(self, func: str, args: Optional[Dict[str, Any]] = None, *,
                user: Optional[str] = None, source: Optional[str] = None,
                timeout: Optional[float] = None, msgpack: bool = False,
                delay: Optional[float] = None) -> Dict[str, Any]:
        """Calls ``func`` with ``args`` (a dict) and returns the reply dict
        ``{"status": "ok" | "error", "data": ...}``.

        ``delay`` (seconds) asks the server to run it no earlier than that after
        reading it; without a ``timeout`` the call then waits the client's timeout
        plus the delay. Raises ``TimeoutError`` when no reply arrives within
        ``timeout`` seconds, ``ConnectionError`` when Redis cannot be reached (or was
        restarted during the call), ``ClosedError`` after ``close()``,
        ``ProtocolError`` for a reply that is not a reply; all are ``CerbasError``.
        """
        timeout = self._timeout_for(timeout, delay)
        deadline = time.monotonic() + timeout
        body = self.body(func, args, user=user, source=source, delay=delay)
        self._check_open()
        try:
            waiter = self._call(func, body, msgpack, deadline, timeout)
        except RestartedError as e:
            if e.pushed:
                raise
            # Nothing was pushed under the old id: go again, with one from the new
            # Redis (at most once more: a second restart within one call fails it).
            waiter = self._call(func, body, msgpack, deadline, timeout)
        return _protocol.decode_reply(waiter.data, msgpack)

    def _call(self, func: str, body: bytes, msgpack: bool, deadline: float,
              timeout: float) -> "_Waiter":
        """One attempt of request(): the waiter holding the reply."""
        id, generation = self._next_id(deadline)
        channel = self.reply_channel(id, msgpack=msgpack).encode()
        waiter = _Waiter(self._wake_w)
        with self._lock:
            if self._closed:
                raise ClosedError("client is closed")
            if generation != self._generation:
                raise restarted(pushed=False)
            self._waiters[channel] = waiter
        sent = None
        try:
            try:
                self._subscribe(channel, waiter, deadline)
            except RestartedError as e:
                e.pushed = False
                raise
            # The push's answers are not waited for: the reply is what the caller
            # waits for, and a push that fails (refused, connection lost, Redis
            # restarted) fails the waiter instead (saves a thread hop per call).
            sent = self._push(id, body, generation, deadline, on_error=waiter.fail)
            if not self._wait(waiter, deadline):
                raise TimeoutError("no reply to %s (request %d) within %g s" % (func, id, timeout))
            if waiter.error is not None:
                raise waiter.error
        finally:
            if sent is not None and waiter.data is None:
                self._line.abandon(sent)  # not written yet (Redis down): never will be
            self._unsubscribe(channel, waiter)
        return waiter

    def call(self, func: str, args: Optional[Dict[str, Any]] = None, **options: Any) -> Any:
        """Like ``request()`` (same keyword options) but returns the reply's ``data``
        and raises ``ReplyError`` for an error reply."""
        reply = self.request(func, args, **options)
        if reply["status"] == "error":
            raise ReplyError(reply.get("data"))
        return reply.get("data")

    def request_without_response(self, func: str, args: Optional[Dict[str, Any]] = None, *,
                                 user: Optional[str] = None, source: Optional[str] = None,
                                 timeout: Optional[float] = None,
                                 delay: Optional[float] = None) -> int:
        """Queues a one-way call (nobody waits for its reply, and the server
        publishes none); returns its id. ``timeout`` bounds the queueing."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        body = self.body(func, args, user=user, source=source, reply=False, delay=delay)
        self._check_open()
        for attempt in (1, 2):
            id, generation = self._next_id(deadline)
            try:
                self._push(id, body, generation, deadline)
                return id
            except RestartedError:  # raised before sending: go again with a new id
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Closes the connections. Calls in flight fail at once with ``ClosedError``,
        and so does every call made afterwards. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters = list(self._waiters.values())
            self._waiters.clear()
            sub = self._sub_conn
            self._sub_up = False
            self._sub_ready.notify_all()
        for w in waiters:
            w.fail(ClosedError("client closed while the call waited"))
        self._line.close()  # calls waiting for Redis's answers fail now too
        if sub is not None:
            _shutdown(sub)  # wakes the reader thread, which disconnects it
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)
        try:
            self.redis.close()
        except redis.RedisError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- ids ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("client is closed")

    def _next_id(self, deadline: float):
        """An id and the Redis generation it belongs to; reserves a new block (one
        round trip) when the current one is used up or from before a restart."""
        with self._id_lock:
            id = self._ids.take(self._generation)
            if id is not None:
                return id, self._ids.generation
            (end,), generation = self._command(
                [("INCRBY", self._names.counter, self._id_block_size)], deadline)
            self._ids.refill(end, self._id_block_size, generation)
            return self._ids.take(generation), generation

    # --- command connections -----------------------------------------------------

    def _push(self, id: int, body: bytes, generation: int, deadline: float,
              on_error: Any = None) -> Any:
        """``SET`` + ``RPUSH``: waits for Redis's answers, or with ``on_error``
        only queues them (returning the queued entry) and reports a failure there."""
        commands = [("SET", self._names.request_key(id), body), ("RPUSH", self._names.queue, id)]
        if on_error is not None:
            return self._line.send(commands, generation, on_error)
        self._command(commands, deadline, generation)
        return None

    def _command(self, commands, deadline: float, generation: Optional[int] = None):
        """Sends ``commands`` and returns (their answers, the Redis generation they
        went to); with ``generation``, never to a Redis other than that one. On the
        one command connection every thread shares (_line.py)."""
        return self._line.execute(commands, deadline, generation)

    def _seen_run_id(self, run_id: str) -> int:
        """Notes the run_id a new connection found; a new one means Redis was
        restarted: every waiting call fails and the id block is dropped."""
        with self._lock:
            if self._new_run(run_id):
                waiters = list(self._waiters.values())
                self._waiters.clear()
                for w in waiters:
                    w.fail(restarted())
            return self._generation

    # --- the subscriber connection -----------------------------------------------

    def _subscribe(self, channel: bytes, waiter: _Waiter, deadline: float) -> None:
        """Writes ``SUBSCRIBE channel`` on the subscriber connection (after the
        unsubscribes gathered so far, in the same write), waiting (up to the
        deadline) for it to be up; a reconnect subscribes ``channel`` itself."""
        with self._lock:
            failures = self._sub_failures
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_loop,
                                                name="cerbas-subscriber", daemon=True)
                self._reader.start()
            while True:
                if waiter.error is not None:
                    raise waiter.error
                if self._closed:
                    raise ClosedError("client is closed")
                if self._sub_up:
                    packet = _protocol.subscribe_packet([channel], self._unsubscribes)
                    try:
                        self._sub_conn._sock.sendall(packet)
                        self._unsubscribes = []
                        return
                    except (OSError, AttributeError):
                        self._sub_broken()
                        continue
                if self._sub_error is not None:
                    # Fail only on a reconnect refused since this call came: Redis
                    # may be back by now, so ask the reader to try at once.
                    if self._sub_failures > failures:
                        raise self._sub_error
                    self._sub_poked = True
                    self._sub_ready.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no subscriber connection to Redis within the timeout")
                self._sub_ready.wait(left)

    def _unsubscribe(self, channel: bytes, waiter: _Waiter) -> None:
        """The call is done with ``channel``: its ``UNSUBSCRIBE`` goes out with the
        next ``SUBSCRIBE`` (a late message on it finds no waiter and is dropped)."""
        with self._lock:
            if self._waiters.get(channel) is waiter:
                del self._waiters[channel]
            if not self._reading:
                self._pass_turn(waiter)  # however this call ended, another one reads
            if not self._sub_up:
                return  # a reconnect subscribes only the channels still awaited
            self._unsubscribes.append(channel)
            if len(self._unsubscribes) >= _protocol.UNSUBSCRIBE_BATCH:
                self._flush_unsubscribes()

    def _flush_unsubscribes(self) -> None:
        """With _lock held: writes the gathered unsubscribes now."""
        if not self._unsubscribes or not self._sub_up:
            return
        try:
            self._sub_conn._sock.sendall(_protocol.resp_command(b"UNSUBSCRIBE", *self._unsubscribes))
            self._unsubscribes = []
        except (OSError, AttributeError):
            self._sub_broken()

    def _sub_broken(self) -> None:
        """Called with _lock held after a failed read or write: the reader thread
        reconnects."""
        self._sub_up = False
        if self._sub_conn is not None:
            _shutdown(self._sub_conn)
        self._sub_ready.notify_all()

    # Who reads the subscriber socket: a caller waiting for its reply reads it
    # itself (one at a time, _reading), handing every message to its waiter; when
    # its own reply came it passes the turn to another waiting caller, if any. So a
    # lone caller gets its reply without a thread hand-off, and many callers keep
    # one reader, as with a reader thread. The reader thread only (re)connects and,
    # once a second when nobody reads, sends the gathered unsubscribes and drains
    # the socket (which also notices a connection closed while idle).

    def _wait(self, waiter: _Waiter, deadline: float) -> bool:
        """Waits for ``waiter``'s reply or failure, reading the subscriber socket
        when it is this caller's turn; False at the deadline."""
        while True:
            read = False
            # The turn is given back however the read ends, also when an exception
            # (KeyboardInterrupt, one from a signal handler) comes between taking
            # it and reading: a turn never given back leaves nobody reading.
            try:
                with self._lock:
                    if waiter.done():
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    read = not self._reading and self._sub_up and not self._closed
                    if read:
                        self._reading = waiter.reading = True
                        conn, poller = self._sub_conn, self._sub_poll
                if not read:
                    waiter.lock.acquire(timeout=left)  # a reply, a failure, or its turn
                    continue
                self._read_some(conn, poller, left)
            finally:
                if read:
                    with self._lock:
                        self._reading = waiter.reading = False

    def _pass_turn(self, done: Optional[_Waiter]) -> None:
        """With _lock held and nobody reading: wakes one waiting caller (not
        ``done``) to read."""
        if not self._sub_up:
            return  # the reader thread wakes them when the connection is back
        for w in self._waiters.values():
            if w is not done and not w.done():
                w._release()
                return

    def _read_some(self, conn, poller, timeout: Optional[float]) -> None:
        """One read of the subscriber socket (waiting up to ``timeout`` seconds for
        data; None: not at all), every message in it handed to its waiter; a
        broken connection is handed to the reader thread. The caller holds the
        turn to read (_reading)."""
        sock = conn._sock
        try:
            # (TLS: poll() does not see bytes already decrypted, pending() does.)
            if timeout is not None and not (self._sub_tls and sock.pending()):
                events = poller.poll(min(timeout, 1.0) * 1000.0)
                if not events:
                    return
                if events[0][0] == self._wake_r or events[-1][0] == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)  # a waiter failed: its caller looks
                    except BlockingIOError:
                        pass
                    if len(events) == 1:
                        return
            data = sock.recv(65536)
            if not data:
                raise OSError("subscriber connection closed")
            parser = self._sub_parser
            parser.feed(data)
            message = parser.gets()
            waiters = self._waiters
            while message is not False:
                if type(message) is list and len(message) == 3 and message[0] == b"message":
                    waiter = waiters.get(message[1])
                    if waiter is not None:
                        waiter.deliver(message[2])
                message = parser.gets()
        except (BlockingIOError, ssl.SSLWantReadError):
            return  # nothing there (a drain when idle, or part of a TLS record)
        except Exception:
            with self._lock:
                if self._sub_conn is conn and self._sub_up:
                    self._sub_broken()

    def _read_loop(self) -> None:
        """The reader thread: keeps the subscriber connection up (until close()),
        and when nobody reads it, drains it and sends the gathered unsubscribes
        once a second."""
        backoff = 0.05
        while not self._closed:
            with self._lock:
                if self._sub_up:
                    self._sub_ready.wait(1.0)
                    if not (self._sub_up and not self._reading and not self._closed):
                        continue
                    self._flush_unsubscribes()
                    self._reading = True
                    conn, poller = self._sub_conn, self._sub_poll
                    idle = True
                elif self._closed:
                    break
                else:
                    idle = False
            if idle:
                try:
                    self._read_some(conn, poller, None)
                finally:
                    with self._lock:
                        self._reading = False
                        self._pass_turn(None)  # a caller waiting without a reader
                continue
            if self._sub_reconnect():
                backoff = 0.05
            else:
                with self._lock:  # Redis is down: retry, each time a bit later
                    if not self._sub_poked:
                        self._sub_ready.wait(backoff)
                    self._sub_poked = False
                backoff = min(backoff * 2, 1.0)
        if self._sub_conn is not None:
            _disconnect(self._sub_conn)

    def _sub_reconnect(self) -> bool:
        """Opens the subscriber connection; on the same Redis run subscribes every
        channel still awaited, on a restarted one fails their calls instead."""
        try:
            conn, run_id = open_connection(self)
        except redis.TimeoutError:
            return False  # Redis frozen or slow: it may come back as the same run
        except Exception as e:
            # Refused or broken at once: the Redis these calls went to is gone (a
            # new process has a new run_id), so they fail now, as does every call
            # until a reconnect succeeds.
            error = ConnectionError("Redis at %s unreachable: %s" % (self.url, e))
            with self._lock:
                self._sub_error = error
                self._sub_failures += 1
                waiters = list(self._waiters.values())
                self._waiters.clear()
                self._sub_ready.notify_all()
            for w in waiters:
                w.fail(error)
            return False
        old = self._sub_conn
        if old is not None:
            _disconnect(old)  # already shut down or broken; free its socket
        self._seen_run_id(run_id)
        with self._lock:
            if self._closed:
                _disconnect(conn)
                return True
            channels = list(self._waiters)
            self._unsubscribes = []  # a new connection has only what it subscribes now
            try:
                if channels:
                    conn._sock.sendall(_protocol.resp_command(b"SUBSCRIBE", *channels))
            except (OSError, AttributeError):
                _disconnect(conn)
                return False
            # Non-blocking from now on: the reader polls, writers never wait (a
            # full socket buffer means a frozen Redis: a reconnect).
            conn._sock.settimeout(0)
            poller = select.poll()
            poller.register(conn._sock, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            self._sub_conn, self._sub_poll = conn, poller
            self._sub_parser = _protocol.reply_reader()
            self._sub_tls = isinstance(conn._sock, ssl.SSLSocket)
            self._sub_up = True
            self._sub_error = None
            if old is not None:
                self.stats["reconnects"] += 1
            self._sub_ready.notify_all()
            if not self._reading:
                self._pass_turn(None)  # the callers waiting need a reader again
        return True
