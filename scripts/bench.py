#!/usr/bin/env python3
"""`make bench`: what users get from each shipped client, in one run, on one table.

Starts a fresh redis-server and a release `cerbas` on free loopback ports, then:
- the same-run baselines: `redis-benchmark -t set -c 50` ops/s;
- W1 (one caller, sequential round trips: p50/p99 next to the same library's PING
  p50) and W2 (16 callers sharing one client: round trips/s) for each client's
  bench program (the contract: each prints one JSON line, see BENCH.md), with the
  client's CPU (it measures its own), the server's (/proc/PID/stat) and Redis's
  (`INFO cpu`) per round trip around each run;
- W3 (drain 20,000 queued one-way requests) and W4 (200 x sleep 100 ms) from
  `examples/loadgen.rs`, with the server's RSS idle and at its peak, then W3
  again with a second instance on the same Redis.
Prints a Markdown table on stdout (progress on stderr). Not for: asserting
anything (tests do that) or comparing runs made at different times: only ratios
within one run mean something on a shared machine.

    python3 scripts/bench.py [--seconds 5] [--count 2000] [--only python-sync,rust]
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")

# (name, command prefix); each takes the bench contract's arguments after it.
CLIENTS = [
    ("python-sync", [os.path.join(ROOT, ".venv/bin/python"), "clients/python/bench.py", "--client", "sync"]),
    ("python-asyncio", [os.path.join(ROOT, ".venv/bin/python"), "clients/python/bench.py", "--client", "asyncio"]),
    ("node", ["node", "clients/node/bench.js"]),
    ("ruby", ["ruby", "-Iclients/ruby/lib", "clients/ruby/bench.rb"]),
    ("rust", [os.path.join(ROOT, "target/release/examples/clientbench")]),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_cli(port, *args, db=0):
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "-n", str(db), *args],
        capture_output=True, text=True, timeout=10,
    )
    return out.stdout


def redis_cpu(port):
    """Seconds of CPU (user + sys) redis-server has used."""
    total = 0.0
    for line in redis_cli(port, "INFO", "cpu").splitlines():
        key, _, value = line.partition(":")
        if key in ("used_cpu_user", "used_cpu_sys"):
            total += float(value)
    return total


def proc_cpu(pid):
    """Seconds of CPU (user + sys) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def wait(what, deadline_s, ok):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if ok():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def measure(port, pid, cmd):
    """Runs one bench program; returns its JSON line with the server's and
    Redis's CPU per round trip added."""
    r0, s0 = redis_cpu(port), proc_cpu(pid)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    r1, s1 = redis_cpu(port), proc_cpu(pid)
    if out.returncode != 0 or not out.stdout.strip():
        log(f"  failed ({out.returncode}): {out.stderr.strip()[-400:]}")
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    n = max(result.get("requests") or 0, 1)
    result["redis_cpu_us_per_rt"] = (r1 - r0) * 1e6 / n
    result["server_cpu_us_per_rt"] = (s1 - s0) * 1e6 / n
    return result


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--only", default="")
    opts = ap.parse_args()
    only = set(filter(None, opts.only.split(",")))

    work = tempfile.mkdtemp(prefix="cerbas-bench-")
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        wait("redis-server", 10, lambda: redis_cli(port, "PING").strip() == "PONG")
        url = f"redis://127.0.0.1:{port}"
        server_log = open(os.path.join(work, "cerbas.log"), "w")
        server = subprocess.Popen(
            [os.path.join(ROOT, "target/release/cerbas"), "--config", "cerbas.toml",
             "--redis", url, "--http", "", "--crontab", "/dev/null"],
            cwd=ROOT, stdout=server_log, stderr=server_log, env={**os.environ, "RUST_LOG": "warn"},
        )
        wait("cerbas", 20, lambda: redis_cli(port, "EXISTS", "CERBAS-INSTANCES", db=1).strip() == "1")
        time.sleep(1)
        rss_idle = proc_kib(server.pid, "VmRSS")

        log("baseline: redis-benchmark -t set -c 50")
        out = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-t", "set", "-c", "50", "-n", "200000", "-q"],
            capture_output=True, text=True, timeout=300,
        ).stdout
        found = re.search(r"SET: ([\d.]+) requests per second", out)
        set_ops = float(found.group(1)) if found else None
        redis_cli(port, "FLUSHDB", db=0)

        rows = []
        for name, prefix in CLIENTS:
            if only and name not in only:
                continue
            row = {"client": name}
            for workload, extra in (("w1", ["--count", str(opts.count)]),
                                    ("w2", ["--callers", "16", "--seconds", str(opts.seconds)])):
                log(f"{name} {workload}")
                row[workload] = measure(port, server.pid,
                                        prefix + ["--redis", url, "--workload", workload, *extra])
            rows.append(row)
        rss_w2 = proc_kib(server.pid, "VmHWM")

        def loadgen(workload):
            log(f"loadgen: {workload}")
            r0, s0 = redis_cpu(port), proc_cpu(server.pid)
            out = subprocess.run(
                [os.path.join(ROOT, "target/release/examples/loadgen"), "--redis", url,
                 "--workload", workload, "--no-ref"],
                capture_output=True, text=True, timeout=900,
            ).stdout
            r1, s1 = redis_cpu(port), proc_cpu(server.pid)
            line = next((l for l in out.splitlines() if l.startswith(workload.upper())),
                        f"{workload.upper()}: no result")
            return line, (r1 - r0), (s1 - s0)

        w3, w3_redis, w3_server = loadgen("w3")
        found = re.match(r"W3 drain: (\d+) ", w3)
        w3_n = int(found.group(1)) if found else 1
        w3_rate = None
        if "acked " in w3:
            w3_rate = float(w3.split("acked ")[1].split("/s")[0].replace(",", ""))
        w4, _, _ = loadgen("w4")
        peak = proc_kib(server.pid, "VmHWM")

        # A second instance on the same Redis: W3 again.
        log("second instance")
        second = subprocess.Popen(
            [os.path.join(ROOT, "target/release/cerbas"), "--config", "cerbas.toml",
             "--redis", url, "--http", "", "--crontab", "/dev/null"],
            cwd=ROOT, stdout=server_log, stderr=server_log, env={**os.environ, "RUST_LOG": "warn"},
        )
        try:
            wait("the second instance", 20,
                 lambda: redis_cli(port, "SCARD", "CERBAS-INSTANCES", db=1).strip() == "2")
            w3_two, _, _ = loadgen("w3")
        finally:
            second.terminate()
            second.wait(timeout=20)

        print(f"## cerbas bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{os.cpu_count()} cores, {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}")
        print()
        print(f"Baseline: `redis-benchmark -t set -c 50`: **{fmt(set_ops)} SET/s**.")
        print()
        print("| client | W1 p50 / p99 ms | PING p50 ms | W1 p50 / PING | W2 rt/s (16 callers) | W2 / SET | "
              "client CPU µs/rt (W2) | server CPU µs/rt (W2) | Redis CPU µs/rt (W2) | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            w1, w2 = row["w1"] or {}, row["w2"] or {}
            ping = w1.get("ping_p50_ms")
            ratio = (w1["p50_ms"] / ping) if w1.get("p50_ms") and ping else None
            share = (w2["rps"] / set_ops) if w2.get("rps") and set_ops else None
            errors = (w1.get("errors") or 0) + (w2.get("errors") or 0)
            print(f"| {row['client']} | {fmt(w1.get('p50_ms'))} / {fmt(w1.get('p99_ms'))} | {fmt(ping, 3)} | "
                  f"{fmt(ratio, 1)} | {fmt(w2.get('rps'))} | {fmt(share, 3)} | "
                  f"{fmt(w2.get('client_cpu_us_per_rt'), 1)} | {fmt(w2.get('server_cpu_us_per_rt'), 1)} | "
                  f"{fmt(w2.get('redis_cpu_us_per_rt'), 1)} | {errors} |")
        print()
        print(f"- {w3}" + (f" (W3 / SET: {w3_rate / set_ops:.3f})" if w3_rate and set_ops else "")
              + f"; server CPU {w3_server * 1e6 / w3_n:.1f} µs/request, Redis CPU {w3_redis * 1e6 / w3_n:.1f} "
              "µs/request (the load generator's own SET + RPUSH included; republish looks run on after the drain)")
        print(f"- two instances: {w3_two}")
        print(f"- {w4}")
        print(f"- server RSS idle {rss_idle / 1024:.1f} MiB, peak through W2 {rss_w2 / 1024:.1f} MiB, "
              f"peak after W3/W4 {peak / 1024:.1f} MiB")
    finally:
        if server:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        redis.terminate()
        redis.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
