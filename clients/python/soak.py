"""Soak check: N sequential requests through the Python client against a running
server (CERBAS_REDIS_URL / CERBAS_ENV), JSON and msgpack alternating, over the
example functions; counts wrong replies and hangs (a 5 s client timeout).

    python clients/python/soak.py [N]      # default 10000
"""
import sys
import time

from cerbas_client import CerbasTimeout, Client

CASES = [
    ("hello", None, "ok", "hello world!"),
    ("echo", {"message": "ü€😀"}, "ok", "ü€😀"),
    ("withargs", {"foo": [1, {"a": None}]}, "ok", [1, {"a": None}]),
    ("sum", {"a": 1, "b": 2}, "ok", 3),
    ("dummy", None, "ok", None),
    ("asyncfunc", None, "ok", ""),
    ("witherror", None, "error", "unexpected error"),
]


def main(n):
    c = Client(user="foo", source="cerbastest", timeout=5.0)
    wrong = hangs = 0
    start = time.time()
    for i in range(n):
        func, args, status, data = CASES[i % len(CASES)]
        try:
            r = c.request(func, args, msgpack=(i % 2 == 1))
            if r != {"status": status, "data": data}:
                wrong += 1
        except CerbasTimeout:
            hangs += 1
    print(f"python: {n} requests, {wrong} wrong, {hangs} hangs, {time.time() - start:.1f}s")
    return 1 if wrong or hangs else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000))
