"""The errors the cerbas client raises: one hierarchy under CerbasError, so a caller
catches ours and never a Redis library's. Not for: deciding when to raise them
(client.py and aio.py do that)."""

import builtins

__all__ = [
    "CerbasError",
    "TimeoutError",
    "ConnectionError",
    "ClosedError",
    "RestartedError",
    "ProtocolError",
    "ReplyError",
    "CerbasTimeout",
]


class CerbasError(Exception):
    """Base of every error this client raises."""


class TimeoutError(CerbasError, builtins.TimeoutError):  # noqa: A001 (shadows on purpose)
    """No reply arrived before the call's deadline (also when Redis is frozen or
    unreachable for that long). The request may still run later: it stays queued."""


class ConnectionError(CerbasError, builtins.ConnectionError):  # noqa: A001
    """Redis could not be reached or the connection broke during the call, or Redis
    was restarted while the call waited (its request id may be handed out again, so
    its reply could no longer be told apart from another request's)."""


class RestartedError(ConnectionError):
    """Redis was restarted (its ``run_id`` changed) while the call waited for its
    reply: the restarted Redis may hand the call's id to another request, so the
    call fails rather than risk getting that request's reply. (A call that had not
    pushed its request yet is retried with a new id instead.)"""


def restarted(pushed: bool = True) -> RestartedError:
    """A RestartedError saying whether the call's request had been sent (request()
    retries one that had not); one per call, as ``pushed`` differs."""
    e = RestartedError("Redis was restarted (run_id changed) while the call waited")
    e.pushed = pushed
    return e


class ClosedError(ConnectionError):
    """The client was closed (before or during the call)."""


class ProtocolError(CerbasError):
    """Something did not follow docs/PROTOCOL.md: a reply that is not the JSON (or
    msgpack) object it should be, or Redis refusing one of the client's commands
    (e.g. a ``CERBAS-COUNTER`` that is not an integer, a wrong password)."""


class ReplyError(CerbasError):
    """The function answered ``{"status": "error", "data": message}`` (raised by
    ``call()`` only; ``request()`` returns that reply as it is)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


#: The name of the timeout error before version 0.2; kept for existing callers.
CerbasTimeout = TimeoutError
