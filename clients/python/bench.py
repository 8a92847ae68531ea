"""The Python clients' benchmark (the contract every client's bench follows is in
BENCH.md: W1 or W2, one JSON line on stdout). Not for: starting Redis or cerbas (``make bench`` does), or
tests.

    .venv/bin/python clients/python/bench.py --redis URL --workload w1|w2 \\
        [--client sync|asyncio] [--callers 16] [--seconds 5] [--count 2000] [--func echo]

w1: one caller, ``count`` sequential round trips after 200 warm-up calls, and
before that redis-py's own PING p50 over ``count`` PINGs on a plain connection.
w2: ``callers`` threads (sync) or tasks (asyncio) sharing ONE client, each calling
in a loop for ``seconds``. CPU is the process's own (user+sys) across the measured
part, per round trip.
"""

import argparse
import asyncio
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import redis  # noqa: E402

from cerbas_client import CerbasError, Client  # noqa: E402
from cerbas_client.aio import AsyncClient  # noqa: E402

ARGS = {"message": "hi"}
WARMUP = 200


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def cpu():
    t = os.times()
    return t.user + t.system


def ping_p50(url, count):
    r = redis.Redis.from_url(url)
    try:
        r.ping()
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            r.ping()
            times.append(time.perf_counter() - t0)
        times.sort()
        return percentile(times, 50)
    finally:
        r.close()


def client_kwargs(args):
    return dict(env="dev", user="foo", source="cerbastest", timeout=10.0)


def run_sync(args):
    c = Client(args.redis, **client_kwargs(args))
    errors = [0]
    try:
        if args.workload == "w1":
            for _ in range(WARMUP):
                c.request(args.func, ARGS)
            lat = []
            cpu0, t0 = cpu(), time.perf_counter()
            for _ in range(args.count):
                s = time.perf_counter()
                try:
                    c.request(args.func, ARGS)
                except CerbasError as e:
                    errors[0] += 1
                    print("error: %r" % e, file=sys.stderr)
                lat.append(time.perf_counter() - s)
            return lat, time.perf_counter() - t0, cpu() - cpu0, errors[0]
        stop_at = [0.0]
        lats = [[] for _ in range(args.callers)]
        start = threading.Barrier(args.callers + 1)
        lock = threading.Lock()

        def caller(i):
            mine = lats[i]
            start.wait()
            while time.perf_counter() < stop_at[0]:
                s = time.perf_counter()
                try:
                    c.request(args.func, ARGS)
                except CerbasError as e:
                    with lock:
                        errors[0] += 1
                    print("error: %r" % e, file=sys.stderr)
                mine.append(time.perf_counter() - s)

        for _ in range(WARMUP):
            c.request(args.func, ARGS)
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.callers)]
        for t in threads:
            t.start()
        cpu0, t0 = cpu(), time.perf_counter()
        stop_at[0] = t0 + args.seconds
        start.wait()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        return [x for l in lats for x in l], took, cpu() - cpu0, errors[0]
    finally:
        c.close()


async def run_async(args):
    c = AsyncClient(args.redis, **client_kwargs(args))
    errors = 0
    try:
        for _ in range(WARMUP):
            await c.request(args.func, ARGS)
        if args.workload == "w1":
            lat = []
            cpu0, t0 = cpu(), time.perf_counter()
            for _ in range(args.count):
                s = time.perf_counter()
                try:
                    await c.request(args.func, ARGS)
                except CerbasError as e:
                    errors += 1
                    print("error: %r" % e, file=sys.stderr)
                lat.append(time.perf_counter() - s)
            return lat, time.perf_counter() - t0, cpu() - cpu0, errors
        lat = []
        stop_at = time.perf_counter() + args.seconds

        async def caller():
            nonlocal errors
            while time.perf_counter() < stop_at:
                s = time.perf_counter()
                try:
                    await c.request(args.func, ARGS)
                except CerbasError as e:
                    errors += 1
                    print("error: %r" % e, file=sys.stderr)
                lat.append(time.perf_counter() - s)

        cpu0, t0 = cpu(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.callers)))
        return lat, time.perf_counter() - t0, cpu() - cpu0, errors
    finally:
        await c.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", default=os.environ.get("CERBAS_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--workload", choices=["w1", "w2"], required=True)
    p.add_argument("--client", choices=["sync", "asyncio"], default="sync")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--func", default="echo")
    args = p.parse_args()
    try:
        ping = ping_p50(args.redis, args.count) if args.workload == "w1" else None
        if args.client == "sync":
            lat, took, used, errors = run_sync(args)
        else:
            lat, took, used, errors = asyncio.run(run_async(args))
    except (CerbasError, redis.RedisError, OSError) as e:
        print("bench could not run: %r" % e, file=sys.stderr)
        return 1
    lat.sort()
    n = len(lat)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    print(json.dumps({
        "client": "python-" + args.client,
        "workload": args.workload,
        "callers": 1 if args.workload == "w1" else args.callers,
        "requests": n,
        "seconds": round(took, 3),
        "rps": round(n / took, 1) if took > 0 else None,
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "ping_p50_ms": ms(ping),
        "client_cpu_us_per_rt": round(used / n * 1e6, 1) if n else None,
        "errors": errors,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
