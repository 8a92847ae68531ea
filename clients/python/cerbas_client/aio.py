"""The asyncio cerbas client (redis.asyncio), for asyncio apps (FastAPI, aiohttp):
one ``AsyncClient`` shared by every task of an event loop. Not for: threads (use
``Client``), or the pure protocol parts (_protocol.py).

The same design as the blocking client (client.py's module comment says why each
step is as it is): ids from a block, ``SUBSCRIBE`` written on the one subscriber
connection before ``SET`` + ``RPUSH`` go out on the one command connection (the
subscribes, and the commands, of one turn of the event loop in one write each; a
lone caller's at once, without waiting for the next turn), each read of either
connection handled in the transport's callback (_Taken: no task woken per read),
which resolves the future of the caller waiting on the message's channel; each
step bounded by the call's deadline; after a broken subscriber
connection the awaited channels are subscribed again if Redis is the same run,
and their calls fail with ``RestartedError`` if it was restarted.

An ``AsyncClient`` belongs to the event loop it is first used on.
"""

import asyncio
import collections
import select
import time
from typing import Any, Dict, List, Optional

import redis
import redis.asyncio

from . import _protocol
from ._protocol import ClientBase
from .errors import (CerbasError, ClosedError, ConnectionError, ProtocolError,
                     ReplyError, RestartedError, TimeoutError, restarted)

__all__ = ["AsyncClient"]


_CLASSES = {
    redis.connection.Connection: redis.asyncio.connection.Connection,
    redis.connection.UnixDomainSocketConnection: redis.asyncio.connection.UnixDomainSocketConnection,
    redis.connection.SSLConnection: redis.asyncio.connection.SSLConnection,
}


class AsyncClient(ClientBase):
    """The asyncio twin of ``Client``: same arguments, same methods (awaited),
    same errors. Safe to share between all tasks of one event loop."""

    def _init_connections(self) -> None:
        settings = dict(self._settings)
        self._conn_class = _CLASSES[settings.pop("connection_class", redis.connection.Connection)]
        self._kwargs = settings
        # The subscriber waits for messages without a read timeout; its connecting
        # is bounded by asyncio.wait_for instead.
        self._sub_kwargs = dict(self._kwargs, socket_timeout=None)
        self._closed = False
        self._waiters: Dict[bytes, "asyncio.Future[bytes]"] = {}
        self._pipe = _Pipeline(self)
        self._sub_conn: Any = None
        self._sub_up: Optional[asyncio.Event] = None
        self._sub_wake: Optional[asyncio.Event] = None
        self._sub_error: Optional[ConnectionError] = None  # the last reconnect's, while down
        self._sub_failures = 0  # reconnects refused so far
        self._sub_poke: Optional[asyncio.Event] = None  # set: try a reconnect now
        self._unsubscribes: List[bytes] = []  # channels done with, not yet unsubscribed
        self._sub_queue: List[bytes] = []  # channels to subscribe in this turn of the loop
        self._sub_flush_due = False  # _flush_subscribes is scheduled
        self._flush_timer: Optional[asyncio.TimerHandle] = None
        self._reader: Optional["asyncio.Task[None]"] = None
        self._sub_lost: "Optional[asyncio.Future[Any]]" = None  # done when it ends
        self._id_lock: Optional[asyncio.Lock] = None  # made on the client's loop

    # --- the API -----------------------------------------------------------------

    async def request(self, func: str, args: Optional[Dict[str, Any]] = None, *,
                      user: Optional[str] = None, source: Optional[str] = None,
                      timeout: Optional[float] = None, msgpack: bool = False,
                      delay: Optional[float] = None) -> Dict[str, Any]:
        """As ``Client.request``: returns ``{"status": ..., "data": ...}``; raises
        ``TimeoutError``, ``ConnectionError``, ``ClosedError``, ``ProtocolError``."""
        timeout = self._timeout_for(timeout, delay)
        deadline = time.monotonic() + timeout
        body = self.body(func, args, user=user, source=source, delay=delay)
        self._check_open()
        try:
            data = await self._call(func, body, msgpack, deadline, timeout)
        except RestartedError as e:
            if e.pushed:
                raise
            # As client.py: nothing was pushed under the old id; go again, once.
            data = await self._call(func, body, msgpack, deadline, timeout)
        return _protocol.decode_reply(data, msgpack)

    async def _call(self, func: str, body: bytes, msgpack: bool, deadline: float,
                    timeout: float) -> bytes:
        """One attempt of request(): the reply's bytes."""
        id, generation = await self._next_id(deadline)
        channel = self.reply_channel(id, msgpack=msgpack).encode()
        if self._closed:
            raise ClosedError("client is closed")
        if generation != self._generation:
            raise restarted(pushed=False)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiters[channel] = future
        # One timer per call (cheaper than wait_for, which wraps a task around it).
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, future)
        def fail(error: CerbasError) -> None:
            if not future.done():
                future.set_exception(error)

        sent = None
        try:
            try:
                await self._subscribe(channel, future, deadline)
                # As client.py: the push's answers are not waited for, a failed
                # push fails the call.
                sent = await self._push(id, body, generation, deadline, on_error=fail)
            except RestartedError as e:
                e.pushed = False
                raise
            try:
                return await future
            except _Expired:
                raise TimeoutError("no reply to %s (request %d) within %g s"
                                   % (func, id, timeout)) from None
        finally:
            timer.cancel()
            if sent is not None and not sent.done():
                sent.cancel()  # not written yet: never will be; else its answers are dropped
            self._unsubscribe(channel, future)

    async def call(self, func: str, args: Optional[Dict[str, Any]] = None, **options: Any) -> Any:
        """As ``Client.call``: the reply's data, or ``ReplyError``."""
        reply = await self.request(func, args, **options)
        if reply["status"] == "error":
            raise ReplyError(reply.get("data"))
        return reply.get("data")

    async def request_without_response(self, func: str, args: Optional[Dict[str, Any]] = None, *,
                                       user: Optional[str] = None, source: Optional[str] = None,
                                       timeout: Optional[float] = None,
                                       delay: Optional[float] = None) -> int:
        """As ``Client.request_without_response``: queues a one-way call, returns its id."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        body = self.body(func, args, user=user, source=source, reply=False, delay=delay)
        self._check_open()
        for attempt in (1, 2):
            id, generation = await self._next_id(deadline)
            try:
                await self._push(id, body, generation, deadline)
                return id
            except RestartedError:  # raised before sending: go again with a new id
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Closes the connections: calls in flight fail at once with ``ClosedError``,
        and so does every later call. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(ClosedError("client closed while the call waited"))
        if self._sub_up is not None:
            self._sub_up.set()  # wakes callers waiting for the subscriber connection
            self._sub_wake.set()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
        await self._pipe.close()
        if self._sub_conn is not None:
            await _disconnect(self._sub_conn)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- ids ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("client is closed")

    async def _next_id(self, deadline: float):
        id = self._ids.take(self._generation)
        if id is not None:
            return id, self._ids.generation
        if self._id_lock is None:
            self._id_lock = asyncio.Lock()
        async with self._id_lock:
            id = self._ids.take(self._generation)
            if id is not None:
                return id, self._ids.generation
            (end,), generation = await self._command(
                [("INCRBY", self._names.counter, self._id_block_size)], deadline)
            self._ids.refill(end, self._id_block_size, generation)
            return self._ids.take(generation), generation

    # --- command connections -----------------------------------------------------

    async def _push(self, id: int, body: bytes, generation: int, deadline: float,
                    on_error: Any = None) -> Any:
        """As client.py's: waits for Redis's answers, or with ``on_error`` only
        queues the commands (returning their future) and reports a failure there."""
        commands = [("SET", self._names.request_key(id), body), ("RPUSH", self._names.queue, id)]
        if on_error is not None:
            try:
                return await self._pipe.send(commands, deadline, generation, on_error)
            except CerbasError:
                raise
            except (asyncio.TimeoutError, redis.TimeoutError):
                raise TimeoutError("Redis did not answer in time") from None
            except Exception as e:
                if self._closed:
                    raise ClosedError("client closed while the call waited") from None
                raise ConnectionError("Redis at %s: %s" % (self.url, e)) from None
        await self._command(commands, deadline, generation)
        return None

    async def _command(self, commands, deadline: float, generation: Optional[int] = None):
        """As client.py's: one round trip, bounded by the deadline, never sent to a
        Redis other than ``generation``; here on the one command connection every
        task shares (see _Pipeline)."""
        if self._closed:
            raise ClosedError("client is closed")
        try:
            answers, gen = await self._pipe.execute(commands, deadline, generation)
        except CerbasError:
            raise
        except (asyncio.TimeoutError, redis.TimeoutError):
            raise TimeoutError("Redis did not answer in time") from None
        except Exception as e:  # redis-py's and the OS's connection errors
            if self._closed:
                raise ClosedError("client closed while the call waited") from None
            raise ConnectionError("Redis at %s: %s" % (self.url, e)) from None
        for answer in answers:
            if isinstance(answer, Exception):
                raise ProtocolError("Redis refused %s: %s" % (commands[0][0], answer))
        return answers, gen

    def _seen_run_id(self, run_id: str) -> int:
        if self._new_run(run_id):
            waiters = list(self._waiters.values())
            self._waiters.clear()
            for future in waiters:
                if not future.done():
                    future.set_exception(restarted())
        return self._generation

    def _fail_all(self, error: CerbasError) -> None:
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for future in waiters:
            if not future.done():
                future.set_exception(error)

    # --- the subscriber connection -----------------------------------------------

    async def _subscribe(self, channel: bytes, future: "asyncio.Future[bytes]",
                         deadline: float) -> None:
        if self._sub_up is None:
            self._sub_up = asyncio.Event()  # set while the subscriber connection is up
            self._sub_wake = asyncio.Event()  # set (and replaced) when a reconnect fails
            self._sub_poke = asyncio.Event()
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        failures = self._sub_failures
        while True:
            if future.done():
                if isinstance(future.exception(), _Expired):
                    raise TimeoutError("no subscriber connection to Redis within the timeout")
                future.result()  # raises the error it was failed with
            if self._closed:
                raise ClosedError("client is closed")
            if self._sub_up.is_set():
                # Every call that subscribes in this turn of the loop shares one
                # write, made at the end of the turn and always before the
                # commands' write (_Pipeline._flush makes it first): the call
                # goes on to push without waiting for it. If the write fails, the
                # reconnect subscribes every channel awaited (and the server
                # republishes for late subscribers).
                self._sub_queue.append(channel)
                if not self._sub_flush_due:
                    self._sub_flush_due = True
                    loop = asyncio.get_running_loop()
                    if getattr(loop, "_ready", True):  # others run in this turn: share
                        loop.call_soon(self._flush_subscribes)
                    else:
                        self._flush_subscribes()  # a lone caller: write now
                return
            if self._sub_error is not None:
                # As client.py: fail only on a reconnect refused since this call came.
                if self._sub_failures > failures:
                    raise self._sub_error
                self._sub_poke.set()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no subscriber connection to Redis within the timeout")
            up, woken = self._sub_up.wait(), self._sub_wake.wait()
            tasks = [asyncio.ensure_future(up), asyncio.ensure_future(woken)]
            try:
                await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()

    def _flush_subscribes(self) -> None:
        """Writes the subscribes queued in this turn of the loop (with the
        gathered unsubscribes), if not done yet."""
        if not self._sub_flush_due:
            return
        self._sub_flush_due = False
        # A call that ended in the meantime (failed at once) subscribes nothing.
        channels = [c for c in self._sub_queue if c in self._waiters]
        self._sub_queue = []
        if not channels:
            return
        ok = (not self._closed and self._sub_up.is_set() and _write(
            self._sub_conn, _protocol.subscribe_packet(channels, self._unsubscribes)))
        if ok:
            self._unsubscribes = []
        elif not self._closed:
            self._sub_broken()  # the reader reconnects and subscribes what is awaited

    def _unsubscribe(self, channel: bytes, future: "asyncio.Future[bytes]") -> None:
        if self._waiters.get(channel) is future:
            del self._waiters[channel]
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" warning
        if not self._closed and self._sub_up is not None and self._sub_up.is_set():
            # As client.py: the UNSUBSCRIBE goes out with the next SUBSCRIBE (or
            # after 1 s, if no call comes).
            self._unsubscribes.append(channel)
            if len(self._unsubscribes) >= _protocol.UNSUBSCRIBE_BATCH:
                self._flush_unsubscribes()
            elif self._flush_timer is None:
                self._schedule_flush()

    def _flush_unsubscribes(self) -> None:
        if self._unsubscribes and not self._closed and self._sub_up is not None and self._sub_up.is_set():
            if _write(self._sub_conn, _protocol.resp_command(b"UNSUBSCRIBE", *self._unsubscribes)):
                self._unsubscribes = []
            else:
                self._sub_broken()

    def _sub_broken(self) -> None:
        if self._sub_up is not None:
            self._sub_up.clear()
        writer = getattr(self._sub_conn, "_writer", None)
        if writer is not None:
            writer.close()  # the reader task sees the end and reconnects

    async def _read_loop(self) -> None:
        """The reader task: keeps the subscriber connection up until close(). The
        messages are read as they come, in the transport's callback (_Taken,
        _on_messages), not by this task: it waits for the connection to end."""
        backoff = 0.05
        while not self._closed:
            conn = self._sub_conn
            if conn is None or not self._sub_up.is_set():
                if await self._sub_reconnect():
                    backoff = 0.05
                else:
                    try:  # Redis is down: retry, each time a bit later, or when poked
                        await asyncio.wait_for(self._sub_poke.wait(), backoff)
                    except asyncio.TimeoutError:
                        pass
                    self._sub_poke.clear()
                    backoff = min(backoff * 2, 1.0)
                continue
            await self._sub_lost
            self._sub_up.clear()
            await _disconnect(conn)

    def _on_messages(self, parser: Any, data: bytes) -> None:
        """What the subscriber connection read: each message resolves the future
        of the call waiting on its channel."""
        parser.feed(data)
        message = parser.gets()
        waiters = self._waiters
        while message is not False:
            if type(message) is list and len(message) == 3 and message[0] == b"message":
                future = waiters.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])
            message = parser.gets()

    def _schedule_flush(self) -> None:
        if self._unsubscribes and self._flush_timer is None:
            def flush() -> None:
                self._flush_timer = None
                self._flush_unsubscribes()
            self._flush_timer = asyncio.get_running_loop().call_later(1.0, flush)

    async def _sub_reconnect(self) -> bool:
        old = self._sub_conn
        if old is not None:
            await _disconnect(old)
        conn = self._conn_class(**self._sub_kwargs)
        try:
            async def connect() -> str:
                await conn.connect()
                await conn.send_command("INFO", "server", check_health=False)
                return _protocol.parse_run_id(await conn.read_response())
            run_id = await asyncio.wait_for(connect(), self.socket_timeout)
        except asyncio.CancelledError:
            await _disconnect(conn)
            raise
        except (asyncio.TimeoutError, redis.TimeoutError):
            await _disconnect(conn)  # Redis frozen or slow: it may come back as the same run
            return False
        except Exception as e:
            # As client.py: refused or broken at once, the Redis is gone: fail now.
            await _disconnect(conn)
            self._sub_error = ConnectionError("Redis at %s unreachable: %s" % (self.url, e))
            self._sub_failures += 1
            self._fail_all(self._sub_error)
            self._sub_wake.set()
            self._sub_wake = asyncio.Event()
            return False
        self._seen_run_id(run_id)
        if self._closed:
            await _disconnect(conn)
            return True
        channels = list(self._waiters)
        self._unsubscribes = []  # a new connection has only what it subscribes now
        self._sub_queue = []  # (subscribed here)
        if channels and not _write(conn, _protocol.resp_command(b"SUBSCRIBE", *channels)):
            await _disconnect(conn)
            return False
        lost = asyncio.get_running_loop().create_future()
        parser = _protocol.reply_reader()
        _Taken(conn, lambda data: self._on_messages(parser, data),
               lambda error: lost.done() or lost.set_result(error))
        self._sub_lost = lost
        self._sub_conn = conn
        if old is not None:
            self.stats["reconnects"] += 1
        self._sub_error = None
        self._sub_up.set()
        return True


class _Pipeline:
    """The AsyncClient's command connection, shared by every task: the commands
    of one turn of the event loop go out in one write (auto-pipelining), the
    transport's callback takes the answers in order and hands each call its own. A call that
    times out leaves its place in the order (its answers, if they come, are
    dropped); a broken connection fails the calls waiting on it, and the next call
    opens a new one (checking Redis's run_id, as every new connection does)."""

    def __init__(self, client: "AsyncClient"):
        self.client = client
        self.conn: Any = None
        self.generation = 0
        self.connecting: Optional[asyncio.Lock] = None
        self.queue: List[Any] = []  # [conn, packed parts, answers wanted, future]: to write
        self.inflight: "collections.deque" = collections.deque()  # [wanted, answers, future]
        self.flush_scheduled = False
        self.hangup: Any = None  # poll() of conn for Redis's hang-up (POLLRDHUP)

    async def send(self, commands, deadline: float, generation: Optional[int],
                   on_error: Any) -> "_Entry":
        """Queues ``commands`` without waiting for their answers (once connected);
        a failure, or an error answer, is passed to ``on_error`` (at once, from
        the read: no future, no callback scheduled). Returns the queued entry
        (``cancel()`` it when its answers no longer matter)."""
        conn, gen = await self._connected(deadline)
        if generation is not None and gen != generation:
            raise restarted(pushed=False)
        entry = _Entry(conn, commands, None, on_error)
        self._enqueue(entry)
        return entry

    def _enqueue(self, entry: "_Entry") -> None:
        self.queue.append(entry)
        if self.flush_scheduled:
            return
        loop = asyncio.get_running_loop()
        if getattr(loop, "_ready", True):
            # Other callbacks (other tasks) run before the loop waits again:
            # their commands go out in the same write, at the end of the turn.
            self.flush_scheduled = True
            loop.call_soon(self._flush)
        else:
            self._flush()  # nothing else runs before the loop waits: write now

    async def execute(self, commands, deadline: float, generation: Optional[int]):
        conn, gen = await self._connected(deadline)
        if generation is not None and gen != generation:
            raise restarted()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(_Entry(conn, commands, future, None))
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, future)
        try:
            return await future, gen
        except _Expired:
            raise TimeoutError("Redis did not answer in time") from None
        finally:
            timer.cancel()

    def _live(self) -> bool:
        conn = self.conn
        return (conn is not None and conn.is_connected and not conn._reader.at_eof()
                and not conn._writer.is_closing())

    async def _connected(self, deadline: float):
        if self._live():
            if not self.hangup.poll(0):
                return self.conn, self.generation
            # Closed by Redis, and the loop has not had a turn to see it (a lone
            # caller writes at once): a new connection now, not a push into a
            # dead one.
            self._lost(self.conn, ConnectionError("connection closed by Redis"))
        if self.connecting is None:
            self.connecting = asyncio.Lock()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed before Redis answered")
        return await _bounded(self._connect(), min(left, self.client.socket_timeout))

    async def _connect(self):
        async with self.connecting:
            if self._live():
                return self.conn, self.generation
            if self.conn is not None:
                self._broken(self.conn, ConnectionError("connection to Redis lost"))
            c = self.client
            conn = c._conn_class(**c._kwargs)
            try:
                await conn.connect()
                await conn.send_command("INFO", "server", check_health=False)
                run_id = _protocol.parse_run_id(await conn.read_response())
            except BaseException:
                await _disconnect(conn)
                raise
            if c._closed:
                await _disconnect(conn)
                raise ClosedError("client is closed")
            self.generation = c._seen_run_id(run_id)
            self.conn = conn
            parser = _protocol.reply_reader()
            _Taken(conn, lambda data: self._answers(parser, data),
                   lambda error: self._lost(conn, error))
            self.hangup = select.poll()
            self.hangup.register(conn._writer.transport.get_extra_info("socket").fileno(),
                                 select.POLLRDHUP)
            return conn, self.generation

    def _flush(self) -> None:
        # The subscribes of this turn go first: a call's SUBSCRIBE is in Redis's
        # socket before its push (see the module comment).
        self.client._flush_subscribes()
        self.flush_scheduled = False
        queue, self.queue = self.queue, []
        parts: List[bytes] = []
        for entry in queue:
            if entry.done():
                continue  # timed out before it was sent: nothing to send or answer
            if entry.conn is not self.conn or not self._live():
                entry.finish(None, ConnectionError("connection to Redis lost"))
                continue
            parts.append(entry.packed)
            self.inflight.append(entry)
        if parts:
            self.conn._writer.write(b"".join(parts))

    def _answers(self, parser: Any, data: bytes) -> None:
        """What the command connection read: each call's answers, in order, to
        its future. An answer nobody asked for raises (IndexError): the
        connection is closed (_Taken)."""
        parser.feed(data)
        answer = parser.gets()
        while answer is not False:
            entry = self.inflight[0]
            entry.answers.append(answer)
            if len(entry.answers) == entry.wanted:
                self.inflight.popleft()
                entry.finish(entry.answers, None)
            answer = parser.gets()

    def _lost(self, conn, error: Optional[BaseException]) -> None:
        self._broken(conn, error or ConnectionError("connection closed by Redis"))
        # (Its transport is closed already.) What redis-py's _close() does; it has
        # none before 5.0.2, which pyproject.toml allows.
        if conn._writer is not None:
            conn._writer.close()
            conn._writer = conn._reader = None

    def _broken(self, conn, error: BaseException) -> None:
        """``conn`` is done for: the calls waiting on it fail."""
        if conn is not self.conn:
            return
        self.conn = None
        if self.client._closed:
            error = ClosedError("client closed while the call waited")
        elif not isinstance(error, CerbasError):
            error = ConnectionError("Redis at %s: %s" % (self.client.url, error))
        waiting = list(self.inflight) + [e for e in self.queue if e.conn is conn]
        self.inflight.clear()
        self.queue = [e for e in self.queue if e.conn is not conn]
        for entry in waiting:
            entry.finish(None, error)

    async def close(self) -> None:
        conn = self.conn
        if conn is not None:
            self._broken(conn, ClosedError("client closed while the call waited"))
            await _disconnect(conn)


if hasattr(asyncio, "timeout"):  # Python 3.11+: no task around the coroutine
    async def _bounded(coro: Any, seconds: float) -> Any:
        async with asyncio.timeout(seconds):
            return await coro
else:
    async def _bounded(coro: Any, seconds: float) -> Any:
        return await asyncio.wait_for(coro, seconds)


class _Entry:
    """The commands of one call on the command connection: its answers go to
    ``future`` (a call that waits for them) or, if refused or lost, to
    ``on_error`` (a call that does not)."""

    __slots__ = ("conn", "commands", "packed", "wanted", "answers", "future", "on_error",
                 "finished")

    def __init__(self, conn, commands, future: Any, on_error: Any) -> None:
        self.conn = conn
        self.commands = commands
        self.packed = _protocol.encode_commands(commands)
        self.wanted = len(commands)
        self.answers: List[Any] = []
        self.future = future
        self.on_error = on_error
        self.finished = False

    def done(self) -> bool:
        return self.finished or (self.future is not None and self.future.done())

    def cancel(self) -> None:
        """Nothing more happens: not written if not yet, its answers dropped."""
        self.finished = True

    def finish(self, answers: Any, error: Optional[BaseException]) -> None:
        if self.done():
            return
        self.finished = True
        if self.future is not None:
            if error is None:
                self.future.set_result(answers)
            else:
                self.future.set_exception(error)
            return
        if error is None:
            refused = [a for a in answers if isinstance(a, Exception)]
            if not refused:
                return
            error = ProtocolError("Redis refused %s: %s" % (self.commands[0][0], refused[0]))
        elif not isinstance(error, CerbasError):
            error = ConnectionError("Redis: %s" % (error,))
        self.on_error(error)


class _Taken(asyncio.Protocol):
    """A connection's reading taken over from its StreamReader: each read is
    handed to ``on_data`` in the transport's callback, where a StreamReader wakes
    a task per read (a turn of the loop and a task step each). ``on_lost(error)``
    is told when the connection ends; the StreamReader's protocol is told too, so
    redis-py's disconnect() still works. Writes still go through the writer."""

    def __init__(self, conn, on_data: Any, on_lost: Any) -> None:
        transport = conn._writer.transport
        self.original = transport.get_protocol()
        self.on_data, self.on_lost = on_data, on_lost
        self.transport = transport
        self.error: Optional[BaseException] = None
        left = bytes(conn._reader._buffer)  # read but not taken (none expected)
        conn._reader._buffer.clear()
        transport.set_protocol(self)
        if left:
            self.data_received(left)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.on_data(data)
        except Exception as e:  # not RESP, or an answer nobody asked for
            self.error = e
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.original.connection_lost(exc)
        self.on_lost(exc or self.error)

    def pause_writing(self) -> None:
        self.original.pause_writing()

    def resume_writing(self) -> None:
        self.original.resume_writing()


class _Expired(Exception):
    """Set on a call's future when its deadline passes (turned into TimeoutError)."""


def _expire(future: "asyncio.Future[bytes]") -> None:
    if not future.done():
        future.set_exception(_Expired())


def _write(conn, packet: bytes) -> bool:
    """Writes ``packet`` without waiting (the transport sends it at once, before
    anything this task writes later); False when the connection is gone."""
    writer = getattr(conn, "_writer", None)
    if writer is None or writer.is_closing():
        return False
    try:
        writer.write(packet)
        return True
    except (OSError, RuntimeError):
        return False


async def _disconnect(conn) -> None:
    try:
        await conn.disconnect()
    except Exception:
        pass
