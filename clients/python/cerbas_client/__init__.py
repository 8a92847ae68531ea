"""A Python client for cerbas, the job server (wire protocol: docs/PROTOCOL.md at
the repository's root). Not for: serving requests (that is the Rust server).

Two clients with one design and one API:

- ``Client`` (blocking): share one per process between all threads;
- ``AsyncClient`` (``cerbas_client.aio``, asyncio): share one per event loop
  between all tasks.

Each keeps one subscriber connection to Redis (every caller's reply channel is
subscribed on it, before the request is pushed, and a reader routes each message
to its caller) and reuses a few command connections; ids are reserved 100 at a
time. Errors are one hierarchy: ``CerbasError`` > ``TimeoutError`` (also the
builtin ``TimeoutError``), ``ConnectionError`` (also the builtin one) >
``RestartedError``, ``ClosedError``; ``ProtocolError``, ``ReplyError``.

Redis is found as the server finds it: the URL is the argument, else
``CERBAS_REDIS_URL``, else ``redis://127.0.0.1:6379`` (a password goes in the URL:
``redis://:secret@host:6379``); the database is the one the URL names
(``redis://host:6379/3``), else 1 for env ``dev`` and 8 for ``prod`` (env is the
argument, else ``CERBAS_ENV``, else ``dev``).

Example::

    from cerbas_client import Client, TimeoutError

    with Client(user="foo", source="cerbastest") as c:
        c.request("hello")                        # {'status': 'ok', 'data': 'hello world!'}
        c.request("sum", {"a": 1, "b": 2})        # {'status': 'ok', 'data': 3}
        c.call("sum", {"a": 1, "b": 2})           # 3 (ReplyError for an error reply)
        c.request("hello", msgpack=True)          # same reply, sent as msgpack
        c.request("hello", delay=2.0)             # runs 2 s after the server reads it
        c.request_without_response("tally", {"name": "x"})   # one-way; returns the id
        try:
            c.request("sleep", {"ms": 3000}, timeout=0.5)
        except TimeoutError as e:
            print(e)

Dependencies: redis-py (5.x or later) and msgpack. ``python -m cerbas_client``
tries it against a running server.
"""

from typing import Any, Dict, Optional

from ._protocol import resolve
from .client import Client
from .errors import (CerbasError, CerbasTimeout, ClosedError, ConnectionError,
                     ProtocolError, ReplyError, RestartedError, TimeoutError)

__all__ = [
    "AsyncClient", "CerbasError", "CerbasTimeout", "ClosedError", "Client",
    "ConnectionError", "ProtocolError", "ReplyError", "RestartedError", "TimeoutError", "request",
    "request_without_response", "resolve",
]


def __getattr__(name: str) -> Any:
    # AsyncClient imports redis.asyncio, which blocking users need not load.
    if name == "AsyncClient":
        from .aio import AsyncClient
        return AsyncClient
    raise AttributeError(name)


_default: Optional[Client] = None


def _default_client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def request(func: str = "dummy", args: Optional[Dict[str, Any]] = None,
            **options: Any) -> Dict[str, Any]:
    """``Client().request(...)`` on a shared client built from the environment."""
    return _default_client().request(func, args, **options)


def request_without_response(func: str = "dummy", args: Optional[Dict[str, Any]] = None,
                             **options: Any) -> int:
    """``Client().request_without_response(...)`` on the shared client."""
    return _default_client().request_without_response(func, args, **options)
