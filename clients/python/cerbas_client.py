"""A Python client for cerbas, the job server (wire protocol: DESIGN.md section 2).

A client needs nothing but Redis. To call a function it

1. ``INCR P-COUNTER`` to get a request id;
2. subscribes to the reply channel ``P-RESPONSE-{db}-{id:010d}`` (or
   ``MSGPACK:P-RESPONSE-{db}-{id:010d}`` for a msgpack reply) and waits until
   Redis confirms the subscription;
3. in one pipeline, ``SET P-REQ-{id:010d}`` to the JSON body
   ``{"func", "args", "user", "source"}`` and ``RPUSH P-QUEUE id``;
4. waits, up to its timeout, for the one message on that channel:
   ``{"status": "ok", "data": ...}`` or ``{"status": "error", "data": "message"}``.

Subscribing before pushing closes the race of the original client, which could
miss a reply published before its subscription existed. A one-way call
(``request_without_response``) adds ``"reply": false`` to the body: the server
then publishes nothing for it.

Redis is found as the server finds it: the URL is the argument, else
``CERBAS_REDIS_URL``, else ``redis://127.0.0.1:6379`` (a password goes in the URL:
``redis://:secret@host:6379``); the database is the one the URL names
(``redis://host:6379/3``), else 1 for env ``dev`` and 8 for ``prod`` (env is the
argument, else ``CERBAS_ENV``, else ``dev``).

Example::

    from cerbas_client import Client, CerbasTimeout

    c = Client(user="foo", source="cerbastest")
    c.request("hello")                       # {'status': 'ok', 'data': 'hello world!'}
    c.request("sum", {"a": 1, "b": 2})       # {'status': 'ok', 'data': 3}
    c.request("hello", msgpack=True)         # same reply, sent as msgpack
    c.request_without_response("tally", {"name": "x"})   # one-way; returns the id
    try:
        c.request("sleep", {"ms": 3000}, timeout=0.5)
    except CerbasTimeout as e:
        print(e)

Dependencies: redis-py and msgpack. Run this file to try it against a running
server (``python3 cerbas_client.py``).
"""

import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import msgpack as _msgpack
import redis

__all__ = ["CerbasTimeout", "Client", "request", "request_without_response", "resolve"]

DEFAULT_URL = "redis://127.0.0.1:6379"
DEFAULT_ENV = "dev"
DEFAULT_PREFIX = "CERBAS"
ENV_DBS = {"dev": 1, "prod": 8}


class CerbasTimeout(Exception):
    """No reply arrived before the request's timeout."""


def _url_db(url):
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


def resolve(url=None, env=None):
    """Returns ``(url, env, db)`` as the server would choose them."""
    url = url or os.environ.get("CERBAS_REDIS_URL") or DEFAULT_URL
    env = env or os.environ.get("CERBAS_ENV") or DEFAULT_ENV
    if env not in ENV_DBS:
        raise ValueError("env must be dev or prod, not %r" % (env,))
    db = _url_db(url)
    if db is None:
        db = ENV_DBS[env]
    return url, env, db


class Client:
    """A connection to one cerbas deployment: a Redis URL, a database, a prefix.

    ``user`` and ``source`` are sent with every request unless a call names others;
    they must be registered in the server's configuration. ``timeout`` (seconds) is
    how long a request waits for its reply unless a call names another.
    """

    def __init__(self, url=None, env=None, prefix=DEFAULT_PREFIX, user="test",
                 source="test", timeout=10.0):
        self.url, self.env, self.db = resolve(url, env)
        self.prefix = prefix
        self.user = user
        self.source = source
        self.timeout = timeout
        self.redis = redis.Redis.from_url(self.url, db=self.db)

    # Key and channel names (DESIGN.md section 2).

    def counter_key(self):
        return "%s-COUNTER" % self.prefix

    def queue_key(self):
        return "%s-QUEUE" % self.prefix

    def request_key(self, id):
        return "%s-REQ-%010d" % (self.prefix, id)

    def reply_channel(self, id, msgpack=False):
        channel = "%s-RESPONSE-%d-%010d" % (self.prefix, self.db, id)
        return "MSGPACK:" + channel if msgpack else channel

    def body(self, func, args=None, user=None, source=None, reply=True):
        """The JSON request body, as bytes. ``reply=False`` tells the server to
        publish no reply (a one-way call)."""
        d = {"func": func}
        if args is not None:
            d["args"] = args
        d["user"] = self.user if user is None else user
        d["source"] = self.source if source is None else source
        if not reply:
            d["reply"] = False
        return json.dumps(d, separators=(",", ":")).encode("utf-8")

    def _push(self, id, body):
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.request_key(id), body)
        pipe.rpush(self.queue_key(), id)
        pipe.execute()

    def request(self, func, args=None, user=None, source=None, msgpack=False,
                timeout=None):
        """Calls ``func`` with ``args`` (a dict) and returns the reply dict
        ``{"status": "ok" | "error", "data": ...}``. Raises CerbasTimeout when no
        reply arrives within ``timeout`` seconds (default: the client's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        body = self.body(func, args, user, source)
        id = self.redis.incr(self.counter_key())
        channel = self.reply_channel(id, msgpack)
        ps = self.redis.pubsub()
        try:
            ps.subscribe(channel)
            # Wait for Redis to confirm the subscription, so the reply cannot be
            # published before anyone listens.
            while True:
                msg = _next(ps, deadline, func, id, timeout)
                if msg["type"] == "subscribe" and _text(msg["channel"]) == channel:
                    break
            self._push(id, body)
            while True:
                msg = _next(ps, deadline, func, id, timeout)
                if msg["type"] == "message" and _text(msg["channel"]) == channel:
                    data = msg["data"]
                    if msgpack:
                        return _msgpack.unpackb(data, raw=False)
                    return json.loads(data)
        finally:
            try:
                ps.unsubscribe()
            except redis.RedisError:
                pass
            ps.close()

    def request_without_response(self, func, args=None, user=None, source=None):
        """Queues a one-way call (nobody waits for its reply, and the server
        publishes none); returns its id."""
        body = self.body(func, args, user, source, reply=False)
        id = self.redis.incr(self.counter_key())
        self._push(id, body)
        return id

    def close(self):
        self.redis.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _next(ps, deadline, func, id, timeout):
    """The next pub/sub message, or CerbasTimeout at ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CerbasTimeout("no reply to %s (request %d) within %g s"
                                % (func, id, timeout))
        msg = ps.get_message(timeout=left)
        if msg is not None:
            return msg


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


_default = None


def _default_client():
    global _default
    if _default is None:
        _default = Client()
    return _default


def request(func="dummy", args=None, user=None, source=None, msgpack=False,
            timeout=None):
    """``Client().request(...)`` on a shared client built from the environment."""
    return _default_client().request(func, args, user, source, msgpack, timeout)


def request_without_response(func="dummy", args=None, user=None, source=None):
    """``Client().request_without_response(...)`` on the shared client."""
    return _default_client().request_without_response(func, args, user, source)


def _example():
    """What the original's cerbastest.py did: hello, slow, then halt the server."""
    c = Client(user="foo", source="cerbastest")
    print(c.request("hello"))
    print(c.request("hello", msgpack=True))
    try:
        print(c.request("slow"))  # the server answers "timeout" after 5 s
    except CerbasTimeout as e:
        print("client timeout:", e)
    print(c.request("halt", {"delay": 1000}))


if __name__ == "__main__":
    _example()
