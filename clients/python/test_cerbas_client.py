"""End-to-end tests of cerbas_client against a real redis-server and the cerbas
binary (the example functions of src/functions.rs, configured by cerbas.toml).

Needs /usr/bin/redis-server (or REDIS_SERVER) and a built server
(`cargo build`; or CERBAS_BIN). Run from the repository root:

    python3 -m pytest -q clients/python
"""

import subprocess
import time
import uuid

import pytest
import redis

from conftest import log_tail
from cerbas_client import CerbasTimeout, Client

# --- the functions of src/functions.rs --------------------------------------------

def ok(data):
    return {"status": "ok", "data": data}


def error(message):
    return {"status": "error", "data": message}


def test_hello(client):
    assert client.request("hello") == ok("hello world!")


def test_hello_msgpack(client):
    assert client.request("hello", msgpack=True) == ok("hello world!")


def test_hello_as_test_user(cerbas_server):
    c = Client(url=cerbas_server.redis_url, env="dev")  # user "test", source "test"
    try:
        assert c.request("hello") == ok("hello world!")
    finally:
        c.close()


ECHO_VALUES = [
    "ü€😀 — 漢字 \u0000 \\ \" \n",
    {"nested": {"list": [1, -2, 3.5, "x", None, True, False]}, "empty": {}, "e": []},
    [[[[["deep"]]]]],
    -42,
    2**63 - 1,
    -(2**63),
    0.1,
    -2.25,
    None,
    {},
    [],
    "",
    list(range(20000)),
    "x" * 200_000,
]


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
@pytest.mark.parametrize("value", ECHO_VALUES, ids=lambda v: repr(v)[:20])
def test_echo_round_trips(client, value, msgpack):
    assert client.request("echo", {"message": value}, msgpack=msgpack) == ok(value)


def test_withargs(client):
    assert client.request("withargs", {"foo": {"bar": [1, "two"]}}) == ok({"bar": [1, "two"]})


def test_witherror(client):
    assert client.request("witherror") == error("unexpected error")


def test_sum(client):
    reply = client.request("sum", {"a": 1, "b": 2})
    assert reply == ok(3)
    assert isinstance(reply["data"], int)


def test_sum_rejects_a_string(client):
    reply = client.request("sum", {"a": "one", "b": 2})
    assert reply["status"] == "error"
    assert reply["data"].startswith("invalid arguments"), reply


def test_dummy(client):
    assert client.request("dummy") == ok(None)


def test_unknown_function(client):
    assert client.request("nope") == error("unknown function: nope")


def test_unregistered_user(client):
    assert client.request("hello", user="eve") == error("user not registered: eve")


def test_slow_times_out_on_the_server(client):
    started = time.monotonic()
    assert client.request("slow", timeout=15.0) == error("timeout")
    assert 4.0 < time.monotonic() - started < 12.0


def test_client_timeout(client):
    started = time.monotonic()
    with pytest.raises(CerbasTimeout):
        client.request("sleep", {"ms": 3000}, timeout=0.5)
    assert time.monotonic() - started < 2.5


def test_one_way_request(client):
    assert b'"reply":false' in client.body("tally", {"name": "x"}, reply=False)
    assert b'"reply"' not in client.body("tally", {"name": "x"})
    name = "pytest-" + uuid.uuid4().hex
    r = redis.Redis.from_url(client.url, db=1)
    ps = r.pubsub()
    try:
        # Listening on every reply channel: the one-way call must get nothing.
        ps.psubscribe("CERBAS-RESPONSE-1-*")
        assert ps.get_message(timeout=5.0)["type"] == "psubscribe"
        id = client.request_without_response("tally", {"name": name})
        assert isinstance(id, int) and id > 0
        deadline = time.monotonic() + 10.0
        # Acknowledged (its key deleted) in the same step as a publish would be.
        while r.get("CERBAS-TALLY-" + name) != b"1" or r.exists(client.request_key(id)):
            assert time.monotonic() < deadline, "tally never reached 1, or no ack"
            time.sleep(0.02)  # poll interval, bounded by the deadline
        channel = client.reply_channel(id).encode()
        heard = []
        msg = ps.get_message(timeout=0.2)
        while msg is not None:
            heard.append(msg["channel"])
            msg = ps.get_message(timeout=0.2)
        assert channel not in heard
    finally:
        ps.close()
        r.close()


def test_halt_refused_for_test_user(client):
    reply = client.request("halt", {"delay": 0}, user="test", source="test")
    assert reply == error("user test may not call halt")


def test_halt_stops_the_server(own_server):
    c = Client(url=own_server.redis_url, env="dev", user="foo", source="cerbastest")
    try:
        assert c.request("halt", {"delay": 200}) == ok("")
    finally:
        c.close()
    try:
        code = own_server.proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        pytest.fail("cerbas still running 10 s after halt:\n" + log_tail(own_server.log))
    assert code == 0, log_tail(own_server.log)


# --- finding Redis, without a server ----------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CERBAS_REDIS_URL", raising=False)
    monkeypatch.delenv("CERBAS_ENV", raising=False)
    return monkeypatch


def test_defaults(clean_env):
    c = Client()
    assert (c.url, c.env, c.db) == ("redis://127.0.0.1:6379", "dev", 1)
    assert c.reply_channel(7) == "CERBAS-RESPONSE-1-0000000007"
    assert c.reply_channel(7, msgpack=True) == "MSGPACK:CERBAS-RESPONSE-1-0000000007"
    assert c.request_key(7) == "CERBAS-REQ-0000000007"


def test_prod_env_uses_db_8(clean_env):
    clean_env.setenv("CERBAS_ENV", "prod")
    c = Client()
    assert c.db == 8
    assert c.redis.connection_pool.connection_kwargs["db"] == 8
    assert c.reply_channel(12345) == "CERBAS-RESPONSE-8-0000012345"


def test_db_in_url_wins(clean_env):
    clean_env.setenv("CERBAS_REDIS_URL", "redis://:secret@10.0.0.5:6380/3")
    clean_env.setenv("CERBAS_ENV", "prod")
    c = Client()
    assert (c.url, c.db) == ("redis://:secret@10.0.0.5:6380/3", 3)
    kw = c.redis.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("10.0.0.5", 6380, 3, "secret")


def test_arguments_win_over_environment(clean_env):
    clean_env.setenv("CERBAS_REDIS_URL", "redis://10.0.0.5:6380/3")
    clean_env.setenv("CERBAS_ENV", "dev")
    c = Client(url="redis://127.0.0.1:7000", env="prod")
    assert (c.url, c.db) == ("redis://127.0.0.1:7000", 8)


def test_bad_env_is_refused(clean_env):
    clean_env.setenv("CERBAS_ENV", "staging")
    with pytest.raises(ValueError):
        Client()
    with pytest.raises(ValueError):
        Client(env="test")


def test_bad_db_in_url_is_refused(clean_env):
    with pytest.raises(ValueError):
        Client(url="redis://127.0.0.1:6379/x")
