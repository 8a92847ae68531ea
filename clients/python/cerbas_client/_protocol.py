"""The pure part of the cerbas wire protocol (docs/PROTOCOL.md) shared by the
blocking and the asyncio client: finding Redis and the database, key and channel
names, request bodies, reply decoding, id blocks, Redis's run_id. Not for: any I/O
(client.py and aio.py own the connections)."""

import json
import os
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import msgpack as _msgpack

from redis.connection import parse_url

from .errors import ProtocolError

DEFAULT_URL = "redis://127.0.0.1:6379"
DEFAULT_ENV = "dev"
DEFAULT_PREFIX = "CERBAS"
ENV_DBS = {"dev": 1, "prod": 8}

#: Ids reserved with one ``INCRBY`` (docs/PROTOCOL.md: ids need only be unique).
DEFAULT_ID_BLOCK = 100


def _url_db(url: str) -> Optional[int]:
    """The database a Redis URL names, or None: the path of ``redis://h:p/3``, or
    ``db=`` in the query of a ``unix://`` URL (as the server reads it)."""
    parts = urlsplit(url)
    if parts.scheme in ("unix", "redis+unix"):
        found = parse_qs(parts.query).get("db")
        text = found[0] if found else ""
    else:
        text = parts.path.strip("/")
    if not text:
        return None
    if not text.isdigit():
        raise ValueError("redis URL names no valid db: %r" % text)
    return int(text)


def resolve(url: Optional[str] = None, env: Optional[str] = None) -> Tuple[str, str, int]:
    """Returns ``(url, env, db)`` as the server would choose them."""
    url = url or os.environ.get("CERBAS_REDIS_URL") or DEFAULT_URL
    env = env or os.environ.get("CERBAS_ENV") or DEFAULT_ENV
    if env not in ENV_DBS:
        raise ValueError("env must be dev or prod, not %r" % (env,))
    db = _url_db(url)
    if db is None:
        db = ENV_DBS[env]
    return url, env, db


class Names:
    """Key and channel names of one deployment (docs/PROTOCOL.md, table at the top)."""

    def __init__(self, prefix: str, db: int):
        self.prefix = prefix
        self.db = db
        self.counter = "%s-COUNTER" % prefix
        self.queue = "%s-QUEUE" % prefix
        self._req = prefix + "-REQ-%010d"
        self._chan = "%s-RESPONSE-%d-%%010d" % (prefix, db)

    def request_key(self, id: int) -> str:
        return self._req % id

    def reply_channel(self, id: int, msgpack: bool = False) -> str:
        channel = self._chan % id
        return "MSGPACK:" + channel if msgpack else channel


#: ``json.dumps(d, separators=...)`` builds an encoder per call; one kept is
#: ~2 us cheaper per request.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def encode_body(func: str, args: Optional[Dict[str, Any]], user: str, source: str,
                reply: bool = True, delay: Optional[float] = None) -> bytes:
    """The JSON request body. ``reply=False`` tells the server to publish no reply;
    ``delay`` (seconds) becomes the protocol's whole milliseconds."""
    if not isinstance(func, str):
        raise TypeError("func must be a string, not %s" % type(func).__name__)
    d: Dict[str, Any] = {"func": func}
    if args is not None:
        d["args"] = args
    d["user"] = user
    d["source"] = source
    if delay is not None:
        ms = delay_ms(delay)
        if ms:
            d["delay"] = ms
    if not reply:
        d["reply"] = False
    return _encode_json(d).encode("utf-8")


def delay_ms(delay: float) -> int:
    """``delay`` in seconds as the whole milliseconds the protocol wants."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise ValueError("delay must be a number of seconds, 0 or more, not %r" % (delay,))
    return int(round(delay * 1000))


def decode_reply(data: bytes, msgpack: bool) -> Dict[str, Any]:
    """The reply object ``{"status": ..., "data": ...}`` from a channel message."""
    try:
        reply = _msgpack.unpackb(data, raw=False) if msgpack else json.loads(data)
    except Exception as e:  # json, msgpack and unicode errors alike
        raise ProtocolError("reply is not valid %s: %s" % ("msgpack" if msgpack else "JSON", e)) from None
    if not isinstance(reply, dict) or reply.get("status") not in ("ok", "error"):
        raise ProtocolError("reply is not {\"status\": \"ok\"|\"error\", \"data\": ...}: %.200r" % (reply,))
    return reply


def parse_run_id(info: Any) -> str:
    """Redis's ``run_id`` from the answer to ``INFO server`` (bytes, str or dict,
    depending on the Redis library): it changes when Redis restarts."""
    if isinstance(info, dict):
        found = info.get("run_id")
        if found:
            return str(found)
        raise ProtocolError("INFO server has no run_id")
    if isinstance(info, bytes):
        info = info.decode("utf-8", "replace")
    for line in str(info).splitlines():
        if line.startswith("run_id:"):
            return line[len("run_id:"):].strip()
    raise ProtocolError("INFO server has no run_id")


class IdBlock:
    """Ids reserved with one ``INCRBY counter n`` (answer ``end``): ``end-n+1 ..
    end``, handed out in order; valid only for the Redis ``generation`` (run) that
    reserved them, since a restarted Redis may hand the same ids out again."""

    __slots__ = ("next", "end", "generation")

    def __init__(self) -> None:
        self.next = 1
        self.end = 0
        self.generation = -1

    def take(self, generation: int) -> Optional[int]:
        """The next id, or None when the block is used up or from another run."""
        if self.next > self.end or self.generation != generation:
            return None
        id = self.next
        self.next += 1
        return id

    def refill(self, end: int, size: int, generation: int) -> None:
        if not isinstance(end, int) or end < size:
            raise ProtocolError("INCRBY on the counter answered %r" % (end,))
        self.next = end - size + 1
        self.end = end
        self.generation = generation


#: Unsubscribes wait until this many have gathered (or the subscriber connection
#: is idle) and go out with the next ``SUBSCRIBE``: one write per call, not two.
UNSUBSCRIBE_BATCH = 64


def resp_command(*parts: bytes) -> bytes:
    """A Redis command in RESP, for the few the clients write themselves on the
    subscriber connection (``SUBSCRIBE``, ``UNSUBSCRIBE``)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def encode_commands(commands) -> bytes:
    """Commands (tuples of str, bytes and int) in RESP, as one packet: the command
    connection's writes, without redis-py's per-command packing."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for part in command:
            if type(part) is str:
                part = part.encode("utf-8")
            elif type(part) is int:
                part = b"%d" % part
            out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def subscribe_packet(channels: "list", unsubscribe: "list") -> bytes:
    """``UNSUBSCRIBE`` of the channels done with (if any), then ``SUBSCRIBE`` of
    ``channels``."""
    head = resp_command(b"UNSUBSCRIBE", *unsubscribe) if unsubscribe else b""
    return head + resp_command(b"SUBSCRIBE", *channels)


def connection_settings(url: str, db: int, socket_timeout: Optional[float]) -> Dict[str, Any]:
    """The settings the URL names (host, port, password, TLS, unix socket; its
    ``connection_class``, which the asyncio client maps to its own), for
    connections the clients manage themselves: no retries, no automatic
    re-subscribing (they decide what happens after a fault), RESP2."""
    kwargs = parse_url(url)
    kwargs.update(db=db, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                  socket_keepalive=True, protocol=2, health_check_interval=0)
    return kwargs


class ClientBase:
    """What both clients share: where Redis is, the defaults of each call, names
    and bodies. Not for: connections (each client has its own kind)."""

    def __init__(self, url: Optional[str] = None, env: Optional[str] = None, *,
                 prefix: str = DEFAULT_PREFIX, user: str = "test", source: str = "test",
                 timeout: float = 10.0, socket_timeout: float = 5.0,
                 id_block: int = DEFAULT_ID_BLOCK) -> None:
        self.url, self.env, self.db = resolve(url, env)
        self.prefix = prefix
        self.user = user
        self.source = source
        self.timeout = timeout
        self.socket_timeout = socket_timeout
        self._names = Names(prefix, self.db)
        self._settings = connection_settings(self.url, self.db, socket_timeout)
        self._id_block_size = id_block
        self._run_id: Optional[str] = None
        self._generation = 0  # +1 each time Redis is seen restarted
        self._ids = IdBlock()
        #: Counters for tests and benchmarks: subscriber reconnects, Redis restarts seen.
        self.stats = {"reconnects": 0, "restarts": 0}
        self._init_connections()

    def _init_connections(self) -> None:
        """Each client's own state: its connections, locks, waiters (nothing connects yet)."""
        raise NotImplementedError

    def _new_run(self, run_id: str) -> bool:
        """Notes the run_id a new connection found (the caller holds whatever lock
        guards the client's state); True when it is another than before: Redis was
        restarted, so the ids reserved and the calls waiting belong to a Redis
        that is gone (the caller fails those calls)."""
        if self._run_id is None:
            self._run_id = run_id
            return False
        if run_id == self._run_id:
            return False
        self._run_id = run_id
        self._generation += 1
        self.stats["restarts"] += 1
        return True

    def counter_key(self) -> str:
        return self._names.counter

    def queue_key(self) -> str:
        return self._names.queue

    def request_key(self, id: int) -> str:
        return self._names.request_key(id)

    def reply_channel(self, id: int, *, msgpack: bool = False) -> str:
        return self._names.reply_channel(id, msgpack)

    def body(self, func: str, args: Optional[Dict[str, Any]] = None, *,
             user: Optional[str] = None, source: Optional[str] = None, reply: bool = True,
             delay: Optional[float] = None) -> bytes:
        """The JSON request body, as bytes. ``reply=False`` tells the server to
        publish no reply (a one-way call); ``delay`` is in seconds."""
        return encode_body(func, args, self.user if user is None else user,
                           self.source if source is None else source, reply, delay)

    def _timeout_for(self, timeout: Optional[float], delay: Optional[float]) -> float:
        """A call's timeout: its own, else the client's plus the call's delay."""
        return self.timeout + (delay or 0) if timeout is None else timeout


class _Incomplete(Exception):
    pass


class RespReader:
    """Parses what a subscriber connection receives (RESP2: arrays of bulk
    strings and integers, simple strings, errors) from chunks fed as they come.
    The clients read their subscriber socket themselves (one read, every message
    in it) rather than through redis-py's per-message calls; hiredis's Reader
    does the same in C and is used instead when installed."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data

    def gets(self) -> Any:
        """The next whole reply, or False when more data is needed."""
        try:
            reply, end = self._parse(0)
        except _Incomplete:
            return False
        self._buf = self._buf[end:]
        return reply

    def _parse(self, pos: int):
        buf = self._buf
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        kind, line = buf[pos:pos + 1], buf[pos + 1:eol]
        pos = eol + 2
        if kind == b"$":
            n = int(line)
            if n < 0:
                return None, pos
            if len(buf) < pos + n + 2:
                raise _Incomplete
            return buf[pos:pos + n], pos + n + 2
        if kind == b"*":
            n = int(line)
            if n < 0:
                return None, pos
            items = []
            for _ in range(n):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        if kind == b":":
            return int(line), pos
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return ProtocolError(line.decode("utf-8", "replace")), pos
        raise ProtocolError("not RESP: %r" % buf[pos - 2 - len(line) - 1:pos][:40])


def reply_reader() -> Any:
    """A parser for the subscriber connection: hiredis's if installed, else ours."""
    try:
        import hiredis
    except ImportError:
        return RespReader()
    return hiredis.Reader()
