"""Tests of what issue 12 asks of both Python clients (blocking ``Client`` and
asyncio ``AsyncClient``, each test runs once per kind through ``make_client``):
one client shared by many callers, Redis restarted or frozen under calls, close()
with calls in flight, a reply published before the subscription settled, the
error types, the API. Not for: the example functions' replies
(test_cerbas_client.py).
"""

import asyncio
import builtins
import inspect
import os
import signal
import threading
import time
import typing
import uuid

import pytest
import redis

import cerbas_client
from conftest import AsyncFacade, CerbasServer, RedisServer, free_port, wait_for
from cerbas_client import (CerbasError, Client, ClosedError, ConnectionError, ProtocolError,
                           ReplyError, RestartedError, TimeoutError)
from cerbas_client import _protocol
from cerbas_client.aio import AsyncClient

CALLERS = 16


def in_threads(n, target):
    """Runs ``target(i)`` in n threads at once; returns what each returned or raised."""
    results = [None] * n
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        try:
            results[i] = target(i)
        except BaseException as e:  # the test inspects it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60.0)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return results


def new_connections(redis_srv):
    r = redis_srv.connect()
    try:
        return int(r.info("stats")["total_connections_received"])
    finally:
        r.close()


# --- sharing ---------------------------------------------------------------------

def test_callers_sharing_one_client_get_their_own_replies(cerbas_server, redis_server, make_client):
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")  # connections open
    before = new_connections(redis_server)

    def caller(i):
        for j in range(60):
            message = {"caller": i, "call": j, "tag": uuid.uuid4().hex}
            reply = c.request("echo", {"message": message}, msgpack=(j % 3 == 0))
            assert reply == {"status": "ok", "data": message}, (i, j, reply)
        return "done"

    results = in_threads(CALLERS, caller)
    assert results == ["done"] * CALLERS, [r for r in results if r != "done"][:3]
    # 960 calls: a few more command connections at most (one per concurrent
    # caller, pooled), never one per call.
    assert new_connections(redis_server) - before <= CALLERS + 1


def test_asyncio_tasks_sharing_one_client(cerbas_server):
    async def main():
        async with AsyncClient(cerbas_server.redis_url, env="dev", user="foo",
                               source="cerbastest") as c:
            async def caller(i):
                for j in range(30):
                    reply = await c.request("echo", {"message": [i, j]})
                    assert reply == {"status": "ok", "data": [i, j]}
                return i
            return await asyncio.gather(*(caller(i) for i in range(CALLERS)))

    assert asyncio.run(main()) == list(range(CALLERS))


def test_republish_is_rarely_needed_and_no_reply_is_lost(tmp_path, make_client):
    """Under load (16 callers), every reply arrives although SUBSCRIBE is not
    confirmed before the push; the server's republish count says how often a
    reply was published before its subscription was in effect."""
    redis_srv = RedisServer(str(tmp_path))
    try:
        server = CerbasServer(redis_srv.url, str(tmp_path), http=True)
        try:
            c = make_client(redis_srv.url, env="dev", user="foo", source="cerbastest")
            before = server.metric("cerbas_republishes_total")
            calls = 150

            def caller(i):
                for j in range(calls):
                    assert c.request("echo", {"message": [i, j]}, timeout=10.0)["data"] == [i, j]
                return "done"

            assert in_threads(CALLERS, caller) == ["done"] * CALLERS
            republished = server.metric("cerbas_republishes_total") - before
            print("\n%s: %d round trips, %d republishes" % (make_client.kind, CALLERS * calls,
                                                          republished))
            # Not a guarantee the client relies on (the republish covers it), but a
            # sign that the subscription is in effect before the push nearly always.
            assert republished <= CALLERS * calls // 100
        finally:
            server.stop()
    finally:
        redis_srv.stop()


def test_reply_published_before_the_subscription_settled(cerbas_server, make_client):
    """The push goes out first and the server answers to nobody; only then does
    the client subscribe: the server's republish still reaches it."""
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    inner = c.client if isinstance(c, AsyncFacade) else c
    r = redis_connect(cerbas_server)
    subscribe, push = inner._subscribe, inner._push
    answered = []

    def pushed_and_answered(id):
        wait_for(lambda: not r.exists(inner.request_key(id)), "the server to answer")
        answered.append(id)

    if isinstance(c, AsyncFacade):
        async def late_subscribe(channel, future, deadline):
            pass

        async def push_first(id, body, generation, deadline, on_error=None):
            await push(id, body, generation, deadline)
            await asyncio.get_running_loop().run_in_executor(None, pushed_and_answered, id)
            await subscribe(inner.reply_channel(id).encode(), inner._waiters[
                inner.reply_channel(id).encode()], deadline)
    else:
        def late_subscribe(channel, waiter, deadline):
            pass

        def push_first(id, body, generation, deadline, on_error=None):
            push(id, body, generation, deadline)  # waits for Redis's answers
            pushed_and_answered(id)
            channel = inner.reply_channel(id).encode()
            subscribe(channel, inner._waiters[channel], deadline)

    inner._subscribe, inner._push = late_subscribe, push_first
    try:
        assert c.request("echo", {"message": "late"}, timeout=8.0) == {"status": "ok", "data": "late"}
        assert len(answered) == 1
    finally:
        r.close()


def redis_connect(server):
    return redis.Redis.from_url(server.redis_url, db=1, socket_timeout=5.0)


# --- faults ----------------------------------------------------------------------

def test_redis_restarted_with_calls_in_flight(own_server, make_client):
    """Calls waiting when Redis restarts (empty: CERBAS-COUNTER back to 0) fail at
    once with ConnectionError; requests of another client that get the same ids
    from the restarted Redis never answer them; the client then works again."""
    redis_srv = own_server.redis
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest",
                    timeout=30.0)
    c.request("hello")
    n = 6
    started = []

    def in_flight(i):
        started.append(i)
        return c.request("sleep", {"ms": 4000})

    holder = {}
    t = threading.Thread(target=lambda: holder.update(results=in_threads(n, in_flight)))
    t.start()
    wait_for(lambda: c.waiting() == n, "the calls to be in flight")
    redis_srv.restart()
    # Another client takes the same ids from the counter set back, at once.
    # (cerbas's readiness check took ids 1-100, c took 101-200: its calls in
    # flight have 102-107, the ids the other client gets now.)
    r = redis_srv.connect()
    r.set("CERBAS-COUNTER", 101)
    r.close()
    restarted_at = time.monotonic()
    other = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest",
                        id_block=1)
    t.join(timeout=20.0)
    assert not t.is_alive()
    failed_after = time.monotonic() - restarted_at
    for result in holder["results"]:
        assert isinstance(result, ConnectionError), result
        assert "restarted" in str(result) or "Redis at" in str(result), result
    assert failed_after < 5.0, failed_after
    # cerbas reconnects too; then both clients work, the old one on a new id block.
    wait_for(lambda: _answers(other), "cerbas to answer after the restart", timeout=20.0)
    for i in range(5):
        assert c.request("echo", {"message": i}, timeout=10.0) == {"status": "ok", "data": i}
    assert c.stats["restarts"] == 1


def test_redis_restarted_counter_set_back_before_the_client_reconnects(
        own_server, redis_proxy, make_client):
    """Client A (through a proxy that holds its reconnect) has calls in flight;
    Redis restarts empty, its counter set back, so client B's requests get A's
    ids: some are answered while A is still cut off, some (delayed) after A is
    let through. A's calls fail with RestartedError at its reconnect (Redis's
    run_id changed), never with B's replies (a client that subscribed its
    channels again on the new Redis would get them); A then works again."""
    block, n = 10, 4
    a = make_client(redis_proxy.url, env="dev", user="foo", source="cerbastest", id_block=block)
    a.request("hello")  # the first id of A's block
    r = own_server.redis.connect()
    try:
        end = int(r.get("CERBAS-COUNTER"))  # A's block: end-9 .. end (block = 10)
    finally:
        r.close()
    holder = {}
    # (Their timeout ends them if A never notices the restart: the test then
    # shows what they got instead.)
    t = threading.Thread(target=lambda: holder.update(results=in_threads(
        n, lambda i: a.request("sleep", {"ms": 4000}, timeout=15.0))))
    t.start()
    wait_for(lambda: a.waiting() == n, "A's calls to be in flight")  # ids end-8 .. end-5

    redis_proxy.hold = True
    own_server.redis.restart()
    r = own_server.redis.connect()
    try:
        r.set("CERBAS-COUNTER", end - block)  # as before A took its block
        b = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest",
                        timeout=20.0, id_block=1)
        # Ids end-9 (A's hello), end-8 and end-7 (in flight in A): answered now.
        for i in range(3):
            assert b.request("echo", {"message": "B-%d" % i}) == {"status": "ok",
                                                                 "data": "B-%d" % i}
        # Ids end-6 and end-5 (in flight in A), taken in that order, answered
        # after A is let through.
        late = {}

        def delayed(i):
            try:
                late[i] = b.request("echo", {"message": "B-%d" % i}, delay=3.0)
            except CerbasError as e:
                late[i] = e
        for i in (3, 4):
            threading.Thread(target=delayed, args=(i,)).start()
            wait_for(lambda: b.waiting() == i - 2, "B's delayed request %d to be sent" % i)
        assert int(r.get("CERBAS-COUNTER")) == end - block + 5  # B took A's ids
    finally:
        r.close()
    assert redis_proxy.held() > 0, "A did not try to reconnect"
    assert a.waiting() == n, "A's calls ended while A was cut off"

    released_at = time.monotonic()
    redis_proxy.release()
    t.join(timeout=25.0)
    assert not t.is_alive()
    failed_after = time.monotonic() - released_at
    adopted = [r for r in holder["results"] if not isinstance(r, BaseException)]
    assert not adopted, "A's calls got other requests' replies: %r" % adopted
    for result in holder["results"]:
        assert isinstance(result, RestartedError), result
    assert failed_after < 2.0, failed_after
    wait_for(lambda: len(late) == 2, "B's delayed replies")
    assert late == {i: {"status": "ok", "data": "B-%d" % i} for i in (3, 4)}
    assert a.stats["restarts"] == 1
    for i in range(5):  # A goes on, with ids of a new block
        assert a.request("echo", {"message": "A-%d" % i}) == {"status": "ok", "data": "A-%d" % i}


def test_subscriber_connection_killed_calls_still_get_their_replies(cerbas_server, make_client):
    """Same Redis, subscriber connection broken (CLIENT KILL) while calls wait:
    the client reconnects, subscribes the awaited channels again, and each call
    gets its own reply (published after the reconnect, or republished)."""
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")
    holder = {}
    t = threading.Thread(target=lambda: holder.update(results=in_threads(
        6, lambda i: c.request("sleep", {"ms": 300 + 100 * i}, timeout=10.0))))
    t.start()
    wait_for(lambda: c.waiting() == 6, "the calls to be in flight")
    r = redis_connect(cerbas_server)
    try:
        killed = r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        r.close()
    assert killed >= 1
    t.join(timeout=20.0)
    assert not t.is_alive()
    for i, result in enumerate(holder["results"]):
        assert result == {"status": "ok", "data": 300 + 100 * i}, result
    assert c.stats["reconnects"] >= 1
    assert c.request("echo", {"message": "after"}) == {"status": "ok", "data": "after"}


def test_command_connection_closed_while_idle_the_next_call_works(own_server, make_client):
    """Redis closes the command connection (CLIENT KILL) between calls and the
    next call comes at once (asyncio: in the same turn of the loop, before the
    loop has seen the close): it goes out on a new connection and gets its
    reply, rather than failing with ConnectionError."""
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")
    r = redis_connect(own_server)

    def kill():
        return r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    try:
        for i in range(5):
            if isinstance(c, AsyncFacade):
                async def kill_then_call():
                    assert kill() >= 1  # blocks the loop: it sees the close only later
                    return await c.client.request("echo", {"message": i}, timeout=10.0)
                result = c._run(kill_then_call())
            else:
                assert kill() >= 1
                result = c.request("echo", {"message": i}, timeout=10.0)
            assert result == {"status": "ok", "data": i}, result
    finally:
        r.close()


def test_redis_gone_fails_calls_at_once(own_server, make_client):
    """Redis stopped (and not back): the calls waiting fail with ConnectionError at
    once, not at their timeout, and so do new calls."""
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest",
                    timeout=20.0)
    c.request("hello")
    holder = {}
    t = threading.Thread(target=lambda: holder.update(results=in_threads(
        3, lambda i: c.request("sleep", {"ms": 4000}))))
    t.start()
    wait_for(lambda: c.waiting() == 3, "the calls to be in flight")
    own_server.redis.stop()
    stopped_at = time.monotonic()
    t.join(timeout=25.0)
    assert not t.is_alive()
    assert time.monotonic() - stopped_at < 3.0
    for result in holder["results"]:
        assert isinstance(result, ConnectionError), result
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        c.request("hello", timeout=5.0)
    assert time.monotonic() - started < 2.0


def _answers(client):
    try:
        return client.request("hello", timeout=1.0)["status"] == "ok"
    except CerbasError:
        return False


@pytest.mark.parametrize("state", ["connected", "fresh", "id-block-empty"])
def test_frozen_redis_times_out_at_the_callers_timeout(own_server, make_client, state):
    redis_srv = own_server.redis
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest",
                    id_block=1 if state == "id-block-empty" else 100)
    if state != "fresh":
        c.request("hello")
    redis_srv.pause()
    try:
        for timeout in (1.0, 0.3):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                c.request("hello", timeout=timeout)
            took = time.monotonic() - started
            assert abs(took - timeout) <= 0.5, (timeout, took)
    finally:
        redis_srv.resume()
    wait_for(lambda: _answers(c), "the client to work again after Redis resumed", timeout=20.0)


def test_frozen_redis_each_caller_gets_its_own_timeout(own_server, make_client):
    """Callers sharing a client (and its connections) with different timeouts:
    each times out at its own, not at another's."""
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")
    timeouts = [0.4, 0.8, 1.2, 1.6, 2.0, 2.4]
    own_server.redis.pause()
    try:
        def caller(i):
            started = time.monotonic()
            try:
                c.request("hello", timeout=timeouts[i])
            except TimeoutError:
                return time.monotonic() - started
        took = in_threads(len(timeouts), caller)
    finally:
        own_server.redis.resume()
    for timeout, t in zip(timeouts, took):
        assert t is not None and abs(t - timeout) <= 0.5, (timeouts, took)


def test_callers_timing_out_leave_the_others_a_reader(cerbas_server, make_client):
    """Callers that give up (their timeout) while others wait: a waiting caller may
    be the one reading the replies of all (client.py), so its turn passes on and
    the others get their replies when they come, not a reader-thread tick later."""
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")
    for _ in range(3):
        def caller(i):
            if i < 4:  # first in: likely the reader when they give up
                with pytest.raises(TimeoutError):
                    c.request("sleep", {"ms": 2000}, timeout=0.15)
                return None
            time.sleep(0.05)
            started = time.monotonic()
            assert c.request("sleep", {"ms": 300}, timeout=5.0) == {"status": "ok", "data": 300}
            return time.monotonic() - started
        took = in_threads(5, caller)
        assert took[:4] == [None] * 4, took
        assert 0.3 <= took[4] < 0.75, took


def test_interrupted_write_leaves_the_client_working(cerbas_server, monkeypatch):
    """A KeyboardInterrupt (or an exception from a signal handler) that escapes a
    caller's write of the command connection: that call fails with it, and the
    turn to write is given back (_line.py), so later calls are written, not left
    queued until their timeout."""
    from cerbas_client import _line
    c = Client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    try:
        c.request("hello")
        encode, hits = _protocol.encode_commands, []

        def interrupted(commands):
            if not hits:
                hits.append(1)
                raise KeyboardInterrupt
            return encode(commands)
        monkeypatch.setattr(_line._protocol, "encode_commands", interrupted)
        with pytest.raises(KeyboardInterrupt):
            c.request("echo", {"message": "cut"}, timeout=2.0)
        for i in range(3):
            assert c.call("echo", {"message": "after %d" % i}, timeout=2.0) == "after %d" % i
    finally:
        c.close()


def test_forked_child_uses_the_client_on_its_own(cerbas_server):
    """A process forked after using a Client (gunicorn, Celery) uses it in the
    child: the child gets its own replies (not the parent's: the inherited id
    block and subscriber socket are the parent's), the parent's calls during and
    after the child's get theirs, and the child's close() leaves the parent's
    connections alone."""
    c = Client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    try:
        c.request("hello")  # connections up, an id block reserved
        parent = {}
        t = threading.Thread(target=lambda: parent.update(
            slow=c.request("sleep", {"ms": 1500}, timeout=10.0)))
        t.start()
        wait_for(lambda: len(c._waiters) == 1, "the parent's call to be in flight")
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if every reply is its own
            code = 1
            try:
                replies = [c.call("echo", {"message": "child %d" % i}, timeout=5.0)
                           for i in range(20)]
                code = 0 if replies == ["child %d" % i for i in range(20)] else 2
                c.close()
            finally:
                os._exit(code)
        for i in range(20):
            assert c.call("echo", {"message": "parent %d" % i}, timeout=5.0) == "parent %d" % i
        child = {}

        def exited():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                child["status"] = status
            return done != 0
        try:
            wait_for(exited, "the child to exit")
        finally:
            if "status" not in child:  # hung (e.g. on a lock the parent held)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        status = child["status"]
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        t.join(timeout=10.0)
        assert parent["slow"] == {"status": "ok", "data": 1500}
        assert c.stats["reconnects"] == 0  # the child's close() cut nothing here
        assert c.call("echo", {"message": "after"}, timeout=5.0) == "after"
    finally:
        c.close()


def test_close_with_calls_in_flight(cerbas_server, make_client):
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    holder = {}
    t = threading.Thread(target=lambda: holder.update(
        results=in_threads(4, lambda i: c.request("sleep", {"ms": 5000}, timeout=20.0))))
    t.start()
    wait_for(lambda: c.waiting() == 4, "the calls to be in flight")
    closed_at = time.monotonic()
    c.close()
    t.join(timeout=10.0)
    assert time.monotonic() - closed_at < 1.0
    for result in holder["results"]:
        assert isinstance(result, ClosedError), result
    c.close()  # again: nothing happens


def test_calls_after_close_fail_at_once(cerbas_server):
    client = Client(cerbas_server.redis_url, env="dev")
    client.request("hello")
    client.close()
    started = time.monotonic()
    with pytest.raises(ClosedError):
        client.request("hello")
    with pytest.raises(ClosedError):
        client.request_without_response("hello")
    assert time.monotonic() - started < 0.1

    async def main():
        a = AsyncClient(cerbas_server.redis_url, env="dev")
        await a.request("hello")
        await a.close()
        with pytest.raises(ClosedError):
            await a.request("hello")
        with pytest.raises(ClosedError):
            await a.request_without_response("hello")

    asyncio.run(main())


# --- errors and API --------------------------------------------------------------

def test_error_hierarchy():
    assert issubclass(TimeoutError, CerbasError) and issubclass(TimeoutError, builtins.TimeoutError)
    assert issubclass(ConnectionError, CerbasError)
    assert issubclass(ConnectionError, builtins.ConnectionError)
    assert issubclass(ClosedError, ConnectionError)
    assert issubclass(ProtocolError, CerbasError) and issubclass(ReplyError, CerbasError)


def test_unreachable_redis_is_a_connection_error(make_client):
    c = make_client("redis://127.0.0.1:%d" % free_port(), env="dev", timeout=2.0)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        c.request("hello")
    with pytest.raises(ConnectionError):
        c.request_without_response("hello")
    assert time.monotonic() - started < 2.0


def test_counter_that_is_not_a_number_is_a_protocol_error(own_server, make_client):
    r = own_server.redis.connect()
    r.set("CERBAS-COUNTER", "abc")
    r.close()
    c = make_client(own_server.redis_url, env="dev")
    with pytest.raises(ProtocolError):
        c.request("hello")


def test_refused_push_fails_the_call_at_once(own_server, make_client):
    """The push's answers are not waited for, but a refused one (here RPUSH on a
    queue that is not a list) fails the call at once with ProtocolError, not at
    its timeout; the client works again once the queue is a list."""
    c = make_client(own_server.redis_url, env="dev", user="foo", source="cerbastest")
    c.request("hello")
    r = redis_connect(own_server)
    try:
        r.set("CERBAS-QUEUE", "not a list")
        started = time.monotonic()
        with pytest.raises(ProtocolError) as e:
            c.request("hello", timeout=5.0)
        assert "WRONGTYPE" in str(e.value), e.value
        assert time.monotonic() - started < 1.0
        r.delete("CERBAS-QUEUE")
        wait_for(lambda: _answers(c), "the client to work again", timeout=20.0)
    finally:
        r.close()


def test_error_reply_is_a_reply_error_from_call(cerbas_server, make_client):
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    assert c.call("sum", {"a": 1, "b": 2}) == 3
    with pytest.raises(ReplyError) as e:
        c.call("witherror")
    assert e.value.message == "unexpected error"
    assert c.request("witherror") == {"status": "error", "data": "unexpected error"}


def test_client_timeout_is_a_builtin_timeout_too(cerbas_server, make_client):
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    started = time.monotonic()
    with pytest.raises(builtins.TimeoutError):
        c.request("sleep", {"ms": 3000}, timeout=0.5)
    assert abs(time.monotonic() - started - 0.5) < 0.5


def public_api():
    """(name, function) of each public method of both clients (with ``__init__`` and
    the context manager's) and of each public function of the package."""
    entry = ("__init__", "__enter__", "__exit__", "__aenter__", "__aexit__")
    for cls in (Client, AsyncClient):
        for name, f in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_") or name in entry:
                yield "%s.%s" % (cls.__name__, name), f
    for name in cerbas_client.__all__:
        f = getattr(cerbas_client, name)
        if inspect.isfunction(f):
            yield name, f


def test_options_are_keyword_only(cerbas_server, make_client):
    """An option passed positionally (``request(func, args, "foo")``: once the
    user) is refused by every call that sends a request."""
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    calls = [c.request, c.call, c.request_without_response,
             cerbas_client.request, cerbas_client.request_without_response]
    for call in calls:
        with pytest.raises(TypeError):
            call("hello", None, "foo")


def test_options_are_keyword_only_in_every_signature():
    """Only what a call is about (the function and its arguments, the URL and env
    of a client, a request id) may be passed positionally; every option is
    keyword-only."""
    subjects = {"self", "func", "args", "url", "env", "id"}
    for name, f in public_api():
        for p in inspect.signature(f).parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                assert p.name in subjects, "%s takes option %s positionally" % (name, p.name)


def test_public_api_has_type_hints():
    """Every parameter and every return of the public API is annotated, and each
    annotation resolves (get_type_hints raises on a broken one)."""
    checked = set()
    for name, f in public_api():
        hints = typing.get_type_hints(f)
        missing = [p.name for p in inspect.signature(f).parameters.values()
                   if p.name != "self" and p.name not in hints]
        assert not missing, "%s: no type hint for %s" % (name, ", ".join(missing))
        assert "return" in hints, "%s: no return type hint" % name
        checked.add(name)
    assert {"Client.request", "AsyncClient.call", "Client.__init__",
            "request_without_response"} <= checked, checked


def test_package_is_marked_typed():
    """``py.typed`` (PEP 561) is in the package and pyproject.toml ships it, so a
    type checker reads the hints of an installed cerbas_client."""
    tomllib = pytest.importorskip("tomllib")
    package = os.path.dirname(cerbas_client.__file__)
    assert os.path.isfile(os.path.join(package, "py.typed"))
    with open(os.path.join(os.path.dirname(package), "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["cerbas_client"]


def test_delay(cerbas_server, make_client):
    c = make_client(cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    started = time.monotonic()
    assert c.request("echo", {"message": "later"}, delay=0.5) == {"status": "ok", "data": "later"}
    assert time.monotonic() - started >= 0.5
    with pytest.raises(ValueError):
        c.request("hello", delay=-1)


def test_bad_replies_are_protocol_errors():
    assert _protocol.decode_reply(b'{"status":"ok","data":1}', False) == {"status": "ok", "data": 1}
    for data, msgpack in [(b"not json", False), (b"[1]", False), (b'{"data":1}', False),
                          (b"\xc1", True)]:
        with pytest.raises(ProtocolError):
            _protocol.decode_reply(data, msgpack)


def test_body_and_delay_encoding():
    assert _protocol.encode_body("f", None, "u", "s") == b'{"func":"f","user":"u","source":"s"}'
    assert b'"delay":1500' in _protocol.encode_body("f", {}, "u", "s", delay=1.5)
    assert b'"reply":false' in _protocol.encode_body("f", {}, "u", "s", reply=False)
    with pytest.raises(TypeError):
        _protocol.encode_body(3, None, "u", "s")


def test_id_block():
    block = _protocol.IdBlock()
    assert block.take(0) is None
    block.refill(300, 100, 0)
    assert [block.take(0) for _ in range(2)] == [201, 202]
    assert block.take(1) is None  # another Redis run: its ids may be handed out again
    with pytest.raises(ProtocolError):
        block.refill(-5, 100, 0)


def test_run_id_parsing():
    assert _protocol.parse_run_id(b"# Server\r\nredis_version:7.0\r\nrun_id:abc123\r\n") == "abc123"
    assert _protocol.parse_run_id({"run_id": "x"}) == "x"
    with pytest.raises(ProtocolError):
        _protocol.parse_run_id(b"# Server\r\n")


def test_resp_reader_takes_messages_in_any_chunks():
    stream = (b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
              b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$10\r\n{\"a\":\"\r\n\"}\r\n"
              b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$0\r\n\r\n"
              b"+PONG\r\n-ERR wrong\r\n$-1\r\n")
    want = [[b"subscribe", b"ch", 1], [b"message", b"ch", b'{"a":"\r\n"}'],
            [b"message", b"ch", b""], b"PONG", "ERR wrong", None]
    for size in (1, 2, 3, 7, len(stream)):
        reader = _protocol.RespReader()
        got = []
        for i in range(0, len(stream), size):
            reader.feed(stream[i:i + size])
            reply = reader.gets()
            while reply is not False:
                got.append(str(reply) if isinstance(reply, ProtocolError) else reply)
                reply = reader.gets()
        assert got == want, size
    reader = _protocol.RespReader()
    reader.feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        reader.gets()
