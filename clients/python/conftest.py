"""Fixtures of the Python client's tests: a real redis-server on a free port and
real cerbas processes (CERBAS_BIN, else target/debug/cerbas), started and stopped
by the tests that need them; a TCP proxy that can hold a client's reconnect; and
a blocking facade over AsyncClient, so every scenario runs against both clients.
Not for: tests (test_*.py).

Needs /usr/bin/redis-server (or REDIS_SERVER).
"""

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from cerbas_client import Client, TimeoutError as CerbasTimeout  # noqa: E402
from cerbas_client.aio import AsyncClient  # noqa: E402

CERBAS_BIN = os.environ.get("CERBAS_BIN") or os.path.join(REPO, "target", "debug", "cerbas")
REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
CONFIG = os.path.join(REPO, "cerbas.toml")

# --- processes we start, and stop -------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc, grace=10.0):
    """Terminates `proc`, waits for it, kills it if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def log_tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class RedisServer:
    def __init__(self, tmp):
        self.port = free_port()
        self.url = "redis://127.0.0.1:%d" % self.port
        self.tmp = tmp
        self.log = os.path.join(tmp, "redis-%d.log" % self.port)
        self.start()

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.tmp],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(deadline=time.monotonic() + 10.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline):
        r = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0,
                        socket_connect_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited with %s:\n%s"
                                       % (self.proc.returncode, log_tail(self.log)))
                try:
                    if r.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING in time:\n%s"
                                       % log_tail(self.log))
                time.sleep(0.02)  # poll interval, bounded by the deadline above
        finally:
            r.close()

    def stop(self):
        self.resume()
        stop(self.proc)

    def restart(self):
        """A new redis-server on the same port, empty (so CERBAS-COUNTER starts
        again from 0) and with a new run_id."""
        self.stop()
        self.start()

    def pause(self):
        """Freezes Redis (SIGSTOP): connections stay open, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def connect(self):
        return redis.Redis(host="127.0.0.1", port=self.port, db=1, socket_timeout=5.0,
                           socket_connect_timeout=5.0)


class CerbasServer:
    def __init__(self, redis_url, tmp, http=False):
        if not os.access(CERBAS_BIN, os.X_OK):
            pytest.fail("no cerbas binary at %s: run `cargo build` or set CERBAS_BIN"
                        % CERBAS_BIN)
        self.redis_url = redis_url
        self.log = os.path.join(tmp, "cerbas-%s.log" % uuid.uuid4().hex[:8])
        env = {k: v for k, v in os.environ.items()
               if k not in ("CERBAS_REDIS_URL", "CERBAS_ENV")}
        env.setdefault("RUST_LOG", "info")
        self.http = "127.0.0.1:%d" % free_port() if http else ""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [CERBAS_BIN, "--config", CONFIG, "--redis", redis_url, "--http", self.http],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            self._wait_ready(deadline=time.monotonic() + 20.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline):
        """Round trips `hello` until the server answers (its first start may have
        to wait for Redis, or a debug build may start slowly)."""
        c = Client(url=self.redis_url, env="dev", user="test", source="test")
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("cerbas exited with %s:\n%s"
                                       % (self.proc.returncode, log_tail(self.log)))
                try:
                    if c.request("hello", timeout=0.5)["status"] == "ok":
                        return
                except CerbasTimeout:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("cerbas did not answer hello in time:\n%s"
                                       % log_tail(self.log))
        finally:
            c.close()

    def stop(self):
        stop(self.proc)

    def metric(self, name):
        """A counter of /metrics (server started with http=True), e.g.
        ``cerbas_republishes_total``."""
        with urllib.request.urlopen("http://%s/metrics" % self.http, timeout=5.0) as r:
            text = r.read().decode()
        found = re.search(r"^%s(?:\{[^}]*\})? (\d+)" % re.escape(name), text, re.M)
        return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def tmpdir_module(tmp_path_factory):
    # pytest keeps the last few of these, so the servers' logs can be read after a run.
    return str(tmp_path_factory.mktemp("cerbas"))


@pytest.fixture(scope="module")
def redis_server(tmpdir_module):
    server = RedisServer(tmpdir_module)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cerbas_server(redis_server, tmpdir_module):
    server = CerbasServer(redis_server.url, tmpdir_module)
    yield server
    if server.proc.poll() is not None:
        print("cerbas had exited with %s:\n%s" % (server.proc.returncode, log_tail(server.log)))
    server.stop()


@pytest.fixture
def client(cerbas_server):
    c = Client(url=cerbas_server.redis_url, env="dev", user="foo", source="cerbastest")
    yield c
    c.close()


@pytest.fixture
def own_server(tmp_path):
    """A Redis and a cerbas of their own, for a test that stops the server."""
    redis_srv = RedisServer(str(tmp_path))
    try:
        server = CerbasServer(redis_srv.url, str(tmp_path))
        server.redis = redis_srv
        try:
            yield server
        finally:
            server.stop()
    finally:
        redis_srv.stop()


class HoldingProxy:
    """A TCP proxy on a free port to a Redis port. While ``hold`` is set it accepts
    connections but joins them to Redis only on ``release()`` (a client connecting
    then waits for its handshake's answer): a test keeps a client from reconnecting
    while Redis moves on. Closing either side of a joined pair closes both."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.hold = False
        self._lock = threading.Lock()
        self._held = []
        self._sockets = []
        self._threads = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = "redis://127.0.0.1:%d" % self.port
        self._start(self._accept)

    def _start(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._sockets.append(client)
                if self.hold:
                    self._held.append(client)
                    continue
            self._join(client)

    def _join(self, client):
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5.0)
        except OSError:
            _shut(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.append(upstream)
        self._start(_pump, client, upstream)
        self._start(_pump, upstream, client)

    def held(self):
        """How many connections wait for ``release()``."""
        with self._lock:
            return len(self._held)

    def release(self):
        """Joins the held connections to Redis, and every later one at once."""
        with self._lock:
            self.hold = False
            held, self._held = self._held, []
        for client in held:
            self._join(client)

    def close(self):
        _shut(self._listener)  # wakes accept()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            _shut(s)
        for t in self._threads:
            t.join(timeout=5.0)
        for s in [self._listener] + sockets:
            s.close()


def _pump(src, dst):
    """Copies ``src`` to ``dst`` until either ends, then ends both."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    _shut(src)
    _shut(dst)


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.fixture
def redis_proxy(own_server):
    """A HoldingProxy to own_server's Redis."""
    proxy = HoldingProxy(own_server.redis.port)
    yield proxy
    proxy.close()



# --- both clients, one test ------------------------------------------------------

class AsyncFacade:
    """An AsyncClient driven from threads: its event loop runs in a thread of its
    own, and each call from a test thread becomes a task there. N test threads
    calling at once are N tasks sharing the one AsyncClient."""

    def __init__(self, *args, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = AsyncClient(*args, **kwargs)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def request(self, *args, **kwargs):
        return self._run(self.client.request(*args, **kwargs))

    def call(self, *args, **kwargs):
        return self._run(self.client.call(*args, **kwargs))

    def request_without_response(self, *args, **kwargs):
        return self._run(self.client.request_without_response(*args, **kwargs))

    def waiting(self):
        """How many calls wait for a reply now."""
        return self._run(_count(self.client._waiters))

    @property
    def stats(self):
        return self.client.stats

    def close(self):
        if self.loop.is_closed():
            return
        self._run(_close_and_drain(self.client))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)
        self.loop.close()


async def _close_and_drain(client):
    """Closes the client, then lets the calls it failed finish (their threads
    wait for them)."""
    await client.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=5.0)


async def _count(d):
    return len(d)


def _sync_client(*args, **kwargs):
    c = Client(*args, **kwargs)
    c.waiting = lambda: len(c._waiters)
    return c


@pytest.fixture(params=["sync", "asyncio"])
def make_client(request):
    """Makes clients of one kind (the test runs once per kind) and closes them after."""
    made = []

    def make(*args, **kwargs):
        c = _sync_client(*args, **kwargs) if request.param == "sync" else AsyncFacade(*args, **kwargs)
        made.append(c)
        return c

    make.kind = request.param
    yield make
    for c in made:
        c.close()


def wait_for(condition, what, timeout=10.0):
    """Waits until ``condition()`` is true, polling, or fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)  # poll interval, bounded by the deadline
