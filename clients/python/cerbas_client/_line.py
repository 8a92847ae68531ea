"""The blocking client's command connection, shared by every thread of a Client:
commands are pipelined (calls made at the same moment go out in one write, and no
call holds the connection while it waits), a reader thread takes the answers in
order and hands each call its own. Not for: the subscriber connection, or asyncio
(aio.py's _Pipeline is the same design on an event loop).

Each call waits for its answers up to its own deadline, so a slow or frozen Redis
costs each caller its own timeout (a call that gives up keeps its place in the
order: its answers, if they come, are dropped). The reader thread also owns
(re)connecting, checking Redis's run_id on every new connection: a refused
connection fails the calls queued at once; a frozen Redis leaves them queued
until their deadlines.
"""

import collections
import select
import socket
import struct
import threading
import time
from typing import Any, List, Optional

import redis

from . import _protocol
from .errors import CerbasError, ClosedError, ConnectionError, ProtocolError, TimeoutError, restarted


class Queued:
    """The commands of one call: written in a batch, answered by the reader."""

    __slots__ = ("commands", "generation", "lock", "answers", "error", "done", "abandoned",
                 "on_error")

    def __init__(self, commands, generation: Optional[int], on_error: Any = None) -> None:
        self.on_error = on_error  # for calls that do not wait: told of a failure
        self.commands = commands
        self.generation = generation  # the Redis run they must go to (None: any)
        self.lock = threading.Lock()  # released once, when done
        self.lock.acquire()
        self.answers: List[Any] = []
        self.error: Optional[CerbasError] = None
        self.done = False
        self.abandoned = False  # its caller gave up: not written, or answers dropped

    def finish(self, error: Optional[CerbasError] = None) -> None:
        if not self.done:
            self.error, self.done = error, True
            self.lock.release()
            if error is not None and self.on_error is not None:
                self.on_error(error)


class CommandLine:
    """One pipelined command connection for a Client (see the module comment)."""

    def __init__(self, client: Any) -> None:
        self.client = client  # for connection settings, the url, _seen_run_id
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # a call wants a connection now
        self.conn: Any = None
        self.up = False
        self.hangup: Any = None  # poll() of conn for Redis's hang-up (POLLRDHUP)
        self.generation = 0
        self.writing = False  # a thread is writing: writes must not interleave
        self.queue: List[Queued] = []
        self.inflight: "collections.deque[Queued]" = collections.deque()
        self.thread: Optional[threading.Thread] = None
        self.closed = False

    def send(self, commands, generation: Optional[int], on_error: Any) -> Queued:
        """Queues ``commands`` (written at once when the connection is up) without
        waiting for their answers; a failure is passed to ``on_error``."""
        entry = Queued(commands, generation, on_error)
        self._enqueue(entry)
        return entry

    def abandon(self, entry: Queued) -> None:
        """The caller gave up: if ``entry`` is not written yet, it never will be."""
        with self.lock:
            entry.abandoned = True

    def execute(self, commands, deadline: float, generation: Optional[int]):
        """The answers to ``commands`` and the Redis generation they went to."""
        entry = Queued(commands, generation)
        self._enqueue(entry)
        left = deadline - time.monotonic()
        if not (left > 0 and entry.lock.acquire(timeout=left)):
            with self.lock:
                if not entry.done:
                    entry.abandoned = True
                    raise TimeoutError("Redis did not answer in time")
        if entry.error is not None:
            raise entry.error
        return entry.answers, entry.generation

    def _enqueue(self, entry: Queued) -> None:
        with self.lock:
            if self.closed:
                raise ClosedError("client is closed")
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="cerbas-commands",
                                               daemon=True)
                self.thread.start()
            self.queue.append(entry)
            if self.up and self.hangup.poll(0):
                # Redis closed the connection and the reader has not seen it yet:
                # the entry waits for the new one instead of going into the old.
                self.up = False
            write = self.up and not self.writing
            if write:
                self.writing = True
            elif not self.up:
                self.wake.notify_all()  # the reader may be pausing between tries
        if write:
            self._write()

    def _write(self) -> None:
        """Writes the queued calls (see _write_batches); an exception that escapes
        it (KeyboardInterrupt, one from a signal handler) may leave a batch half
        written, so the connection is dropped, and the turn to write given back:
        a turn never given back would leave every later call unwritten."""
        try:
            self._write_batches()
        except BaseException:
            with self.lock:
                conn, self.writing = self.conn, False
            if conn is not None:
                _shutdown(conn)  # the reader fails what was in flight, and reconnects
            raise

    def _write_batches(self) -> None:
        """Writes the queued calls, one write per batch, until none are left (the
        caller has set self.writing)."""
        while True:
            with self.lock:
                if not self.up or self.closed:
                    self.writing = False
                    return
                batch = []
                for e in self.queue:
                    if e.abandoned:
                        continue
                    if e.generation is not None and e.generation != self.generation:
                        e.finish(restarted(pushed=False))
                        continue
                    e.generation = self.generation
                    batch.append(e)
                self.queue = []
                if not batch:
                    self.writing = False
                    return
                self.inflight.extend(batch)  # before the write: answers may come at once
                conn = self.conn
            try:
                conn._sock.sendall(_protocol.encode_commands(
                    [c for e in batch for c in e.commands]))
            except Exception:
                _shutdown(conn)  # the reader fails what was in flight, and reconnects
                with self.lock:
                    self.writing = False
                return

    def _run(self) -> None:
        """The reader thread: connects, reads answers, reconnects, until close()."""
        backoff = 0.05
        while not self.closed:
            if not self.up:
                if self._connect():
                    backoff = 0.05
                    continue
                with self.lock:
                    if not self.closed and not self.queue:
                        self.wake.wait(backoff)  # a new call wakes it at once
                if self.queue:
                    time.sleep(0.01)  # callers waiting: try again soon, not in a tight loop
                backoff = min(backoff * 2, 1.0)
                continue
            conn = self.conn
            try:
                self._read(conn)
            except Exception:
                pass
            self._broken(conn)

    def _connect(self) -> bool:
        c = self.client
        try:
            conn, run_id = open_connection(c)
        except redis.TimeoutError:
            return False  # frozen or slow: the calls queued wait (to their deadlines)
        except Exception as e:  # refused: the calls queued fail now
            error = ConnectionError("Redis at %s unreachable: %s" % (c.url, e))
            with self.lock:
                queued, self.queue = self.queue, []
            for entry in queued:
                entry.finish(error)
            return False
        # Blocking, with the kernel bounding each write to 1 s (SO_SNDTIMEO): one
        # syscall per send and per read, where a Python socket timeout adds a
        # poll() to each; a blocked read is woken by shutdown() (close, a break).
        conn._sock.settimeout(None)
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
        hangup = select.poll()
        hangup.register(conn._sock, select.POLLRDHUP)
        generation = c._seen_run_id(run_id)
        with self.lock:
            if self.closed:
                _disconnect(conn)
                return True
            self.conn, self.generation, self.up = conn, generation, True
            self.hangup = hangup
            write = bool(self.queue) and not self.writing
            if write:
                self.writing = True
        if write:
            self._write()
        return True

    def _read(self, conn) -> None:
        """Hands out answers in order until ``conn`` breaks or the client closes."""
        sock = conn._sock
        parser = _protocol.reply_reader()
        inflight = self.inflight
        while not self.closed:
            data = sock.recv(65536)  # close() and _broken() wake it (shutdown)
            if not data:
                return
            parser.feed(data)
            answer = parser.gets()
            while answer is not False:
                entry = inflight[0]  # IndexError (an answer nobody asked for): reconnect
                entry.answers.append(answer)
                if len(entry.answers) == len(entry.commands):
                    inflight.popleft()
                    refused = [a for a in entry.answers if isinstance(a, Exception)]
                    entry.finish(ProtocolError("Redis refused %s: %s" % (
                        entry.commands[0][0], refused[0])) if refused else None)
                answer = parser.gets()

    def _broken(self, conn) -> None:
        with self.lock:
            if self.conn is conn:
                self.conn, self.up = None, False
            inflight = list(self.inflight)
            self.inflight.clear()
        _disconnect(conn)
        error = (ClosedError("client closed while the call waited") if self.closed
                 else ConnectionError("Redis at %s: connection lost" % self.client.url))
        for entry in inflight:
            entry.finish(error)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            queued, self.queue = self.queue, []
            conn = self.conn
            self.wake.notify_all()
        for entry in queued:
            entry.finish(ClosedError("client closed while the call waited"))
        if conn is not None:
            _shutdown(conn)  # the reader fails what is in flight and stops
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)


def open_connection(client: Any):
    """A new connection of ``client``'s kind and Redis's run_id (``INFO server``),
    which every new connection checks; redis-py's errors as they come."""
    conn = client._conn_class(**client._kwargs)
    try:
        conn.connect()
        conn.send_command("INFO", "server", check_health=False)
        return conn, _protocol.parse_run_id(conn.read_response())
    except BaseException:
        _disconnect(conn)
        raise


def _shutdown(conn) -> None:
    """Wakes a thread blocked reading ``conn`` (it then sees an error)."""
    sock = conn._sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _disconnect(conn) -> None:
    try:
        conn.disconnect()
    except Exception:
        pass
