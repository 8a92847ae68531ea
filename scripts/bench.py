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
  again with a second instance on the same Redis;
- then, cerbas stopped, the protocol floor (`examples/floor.rs`, a yardstick: one
  thread doing the least the protocol allows, no guarantees) on a fresh db of the
  same Redis, measured the same ways: the Rust and Node clients' W1 and W2, a W3
  drain (with tally's INCR one round trip per request, as the function does, and
  pipelined, the protocol alone), and the bare round trip: `redis-benchmark -t
  incr -c 1` with its own CPU per round trip; then the same clients' W1 and W2
  against `floor --threads` (the floor's work in cerbas's thread shape: what the
  hand-offs alone cost).
Prints a Markdown table on stdout (progress on stderr). Not for: asserting
anything (tests do that) or comparing runs made at different times: only ratios
within one run mean something on a shared machine.

    python3 scripts/bench.py [--seconds 5] [--count 2000] [--only python-sync,rust] [--no-floor] [--one-session]
"""

import argparse
import json
import os
import re
import resource
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
# The clients also run against the protocol floor (two: it is a yardstick), and
# every client against the threaded floor: the server's CPU per round trip
# depends on how the client sends (one request a take, or several), so each
# client's W2 server CPU has its own bound.
FLOOR_CLIENTS = ("rust", "node")
# The floor's db: a fresh one, so nothing cerbas left behind is in its queue.
FLOOR_DB = 2


# Each process the bench starts (redis-server, the servers, each client and load
# generator) runs in a session of its own, as services and apps do in a
# deployment. With `kernel.sched_autogroup_enabled = 1` (Debian's default) the
# scheduler shares the CPU between sessions first: children of this script in
# one session would make redis-server compete with the server's and the client's
# threads inside one group (`--one-session` measures that; see BENCH.md).
SPAWN = {"start_new_session": True}


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


def autogroup():
    """The kernel's `sched_autogroup_enabled` ("?" where it has none)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip()
    except OSError:
        return "?"


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
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **SPAWN)
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


def loadgen(url, pid, port, workload):
    """Runs one loadgen workload against the server `pid` serving `url`; returns
    its result line and the CPU seconds Redis and that server used meanwhile."""
    log(f"loadgen: {workload}")
    r0, s0 = redis_cpu(port), proc_cpu(pid)
    out = subprocess.run(
        [os.path.join(ROOT, "target/release/examples/loadgen"), "--redis", url,
         "--workload", workload, "--no-ref"],
        capture_output=True, text=True, timeout=900, **SPAWN,
    ).stdout
    r1, s1 = redis_cpu(port), proc_cpu(pid)
    line = next((l for l in out.splitlines() if l.startswith(workload.upper())),
                f"{workload.upper()}: no result")
    return line, (r1 - r0), (s1 - s0)


def drain_rates(line):
    """(requests, ran/s, acked/s) from loadgen's W3 line (None where it has none)."""
    found = re.match(r"W3 drain: (\d+) ", line)
    n = int(found.group(1)) if found else None

    def rate(word):
        found = re.search(word + r" ([\d,.]+)/s", line)
        return float(found.group(1).replace(",", "")) if found else None
    return n, rate("ran"), rate("acked")


def start_floor(url, logfile, extra=()):
    """Starts examples/floor.rs on `url` and waits for its ready line."""
    out = os.path.join(os.path.dirname(logfile.name), f"floor-{time.monotonic_ns()}.out")
    with open(out, "w") as stdout:
        proc = subprocess.Popen(
            [os.path.join(ROOT, "target/release/examples/floor"), "--redis", url, *extra],
            cwd=ROOT, stdout=stdout, stderr=logfile, **SPAWN,
        )

    def ready():
        if proc.poll() is not None:
            raise SystemExit(f"bench: the floor exited ({proc.returncode}); see its log")
        with open(out) as f:
            return "floor: ready" in f.read()
    wait("the floor", 10, ready)
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def bare_round_trip(port):
    """`redis-benchmark -t incr -c 1 -n 50000`: INCR/s, its own CPU (user + sys)
    per round trip in µs, and Redis's."""
    n = 50000
    r0 = redis_cpu(port)
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", "incr", "-c", "1", "-n", str(n), "-q"],
        capture_output=True, text=True, timeout=300, **SPAWN,
    ).stdout
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r1 = redis_cpu(port)
    found = re.search(r"INCR: ([\d.]+) requests per second", out)
    user = (u1.ru_utime - u0.ru_utime) * 1e6 / n
    system = (u1.ru_stime - u0.ru_stime) * 1e6 / n
    return {
        "ops": float(found.group(1)) if found else None,
        "client_us": user + system, "user_us": user, "sys_us": system,
        "redis_us": (r1 - r0) * 1e6 / n,
    }


def per_ping(w1):
    """W1 p50 over the same library's PING p50."""
    return w1["p50_ms"] / w1["ping_p50_ms"] if w1.get("p50_ms") and w1.get("ping_p50_ms") else None


def ratio(a, b, digits=2):
    return fmt(a / b, digits) if a and b else "-"


def print_rows(rows, set_ops):
    print("| client | W1 p50 / p99 ms | PING p50 ms | W1 p50 / PING | W2 rt/s (16 callers) | W2 / SET | "
          "client CPU µs/rt (W2) | server CPU µs/rt (W2) | Redis CPU µs/rt (W2) | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        w1, w2 = row["w1"] or {}, row["w2"] or {}
        ping = w1.get("ping_p50_ms")
        share = (w2["rps"] / set_ops) if w2.get("rps") and set_ops else None
        errors = (w1.get("errors") or 0) + (w2.get("errors") or 0)
        print(f"| {row['client']} | {fmt(w1.get('p50_ms'))} / {fmt(w1.get('p99_ms'))} | {fmt(ping, 3)} | "
              f"{ratio(w1.get('p50_ms'), ping, 1)} | {fmt(w2.get('rps'))} | {fmt(share, 3)} | "
              f"{fmt(w2.get('client_cpu_us_per_rt'), 1)} | {fmt(w2.get('server_cpu_us_per_rt'), 1)} | "
              f"{fmt(w2.get('redis_cpu_us_per_rt'), 1)} | {errors} |")


def client_rows(names, port, pid, url, opts):
    rows = []
    for name, prefix in CLIENTS:
        if name not in names:
            continue
        row = {"client": name}
        for workload, extra in (("w1", ["--count", str(opts.count)]),
                                ("w2", ["--callers", "16", "--seconds", str(opts.seconds)])):
            log(f"{name} {workload}")
            row[workload] = measure(port, pid, prefix + ["--redis", url, "--workload", workload, *extra])
        rows.append(row)
    return rows


def floor_section(port, logfile, names, opts):
    """The protocol floor on db FLOOR_DB of the same Redis (cerbas stopped): the
    clients' W1/W2, W3 drains (tally's INCR sequential, then pipelined) and the
    bare round trip."""
    url = f"redis://127.0.0.1:{port}/{FLOOR_DB}"
    floor = start_floor(url, logfile)
    try:
        rows = client_rows([n for n in FLOOR_CLIENTS if n in names], port, floor.pid, url, opts)
        w3 = loadgen(url, floor.pid, port, "w3")
    finally:
        stop(floor)
    floor = start_floor(url, logfile, ["--pipeline-functions"])
    try:
        w3_piped = loadgen(url, floor.pid, port, "w3")
    finally:
        stop(floor)
    # The floor in cerbas's thread shape: what the hand-offs alone cost.
    floor = start_floor(url, logfile, ["--threads"])
    try:
        threaded = client_rows(names, port, floor.pid, url, opts)
    finally:
        stop(floor)
    log("bare round trip: redis-benchmark -t incr -c 1")
    bare = bare_round_trip(port)
    redis_cli(port, "FLUSHDB", db=FLOOR_DB)
    redis_cli(port, "DEL", "counter:__rand_int__", db=0)
    return rows, w3, w3_piped, bare, threaded


def drain_note(label, w3, set_ops):
    line, redis_s, server_s = w3
    n, ran, acked = drain_rates(line)
    if not n:
        return f"{label}: {line}"
    share = f" (W3 / SET: {acked / set_ops:.3f})" if acked and set_ops else ""
    return (f"{label}: ran {fmt(ran)}/s, acked {fmt(acked)}/s{share}; server CPU {server_s * 1e6 / n:.1f} "
            f"µs/request, Redis CPU {redis_s * 1e6 / n:.1f} µs/request")


def print_floor(cerbas_rows, cerbas_w3, floor, set_ops):
    rows, w3, w3_piped, bare, threaded = floor
    print()
    print("### The protocol floor (`examples/floor.rs`: one thread, no guarantees), same Redis, "
          f"db {FLOOR_DB}, cerbas stopped")
    print()
    if rows:
        print_rows(rows, set_ops)
        print()
    by_name = {r["client"]: r for r in cerbas_rows}
    print("| measure | cerbas | floor | cerbas / floor |")
    print("|---|---|---|---|")

    def line(what, a, b, digits=2):
        print(f"| {what} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio(a, b)} |")
    for row in rows:
        name, c = row["client"], by_name.get(row["client"])
        if not c:
            continue
        cw1, cw2, fw1, fw2 = c["w1"] or {}, c["w2"] or {}, row["w1"] or {}, row["w2"] or {}
        line(f"{name}: W1 p50 ms", cw1.get("p50_ms"), fw1.get("p50_ms"), 3)
        line(f"{name}: W1 p50 / PING", per_ping(cw1), per_ping(fw1), 1)
        line(f"{name}: W2 rt/s", cw2.get("rps"), fw2.get("rps"))
        line(f"{name}: server CPU µs/rt (W2)", cw2.get("server_cpu_us_per_rt"), fw2.get("server_cpu_us_per_rt"), 1)
        line(f"{name}: Redis CPU µs/rt (W2)", cw2.get("redis_cpu_us_per_rt"), fw2.get("redis_cpu_us_per_rt"), 1)
    (cn, _, c_acked), (fn, _, f_acked) = drain_rates(cerbas_w3[0]), drain_rates(w3[0])
    line("W3 drain, acked requests/s", c_acked, f_acked)
    if cn and fn:
        line("W3 server CPU µs/request", cerbas_w3[2] * 1e6 / cn, w3[2] * 1e6 / fn, 1)
        line("W3 Redis CPU µs/request", cerbas_w3[1] * 1e6 / cn, w3[1] * 1e6 / fn, 1)
    for t in threaded:
        name, c = t["client"], by_name.get(t["client"])
        if not c:
            continue
        cw1, cw2, tw1, tw2 = c["w1"] or {}, c["w2"] or {}, t["w1"] or {}, t["w2"] or {}
        line(f"{name}: W1 p50 / PING, against the threaded floor", per_ping(cw1), per_ping(tw1), 1)
        line(f"{name}: server CPU µs/rt (W2), against the threaded floor",
             cw2.get("server_cpu_us_per_rt"), tw2.get("server_cpu_us_per_rt"), 1)
        line(f"{name}: Redis CPU µs/rt (W2), against the threaded floor",
             cw2.get("redis_cpu_us_per_rt"), tw2.get("redis_cpu_us_per_rt"), 1)
    print()
    print("The threaded floor is `floor --threads`: the floor's Redis work in cerbas's thread shape "
          "(a reader, 100 workers, a publisher, the same hand-offs), with none of its guarantees.")
    print()
    print("- " + drain_note("floor W3, tally's INCR one round trip per request (as the function)", w3, set_ops))
    print("- " + drain_note("floor W3, tally's INCRs pipelined per batch (the protocol alone)", w3_piped, set_ops))
    (n1, _, _), (n2, _, _) = drain_rates(w3[0]), drain_rates(w3_piped[0])
    if n1 and n2:
        print(f"- tally's own INCR round trip in the floor (server CPU of the first drain less the second's): "
              f"{(w3[2] / n1 - w3_piped[2] / n2) * 1e6:.1f} µs/request")
    print(f"- bare round trip, `redis-benchmark -t incr -c 1 -n 50000`: {fmt(bare['ops'])} INCR/s; its own CPU "
          f"{bare['client_us']:.1f} µs per round trip ({bare['user_us']:.1f} user + {bare['sys_us']:.1f} sys), "
          f"Redis {bare['redis_us']:.1f} µs (an event-loop client: `epoll_wait` besides `write` + `read` per call)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-floor", action="store_true", help="skip the protocol floor's rows")
    ap.add_argument("--one-session", action="store_true",
                    help="start every process in this script's session (one scheduling group)")
    opts = ap.parse_args()
    if opts.one_session:
        SPAWN.clear()
    only = set(filter(None, opts.only.split(",")))
    names = [name for name, _ in CLIENTS if not only or name in only]

    work = tempfile.mkdtemp(prefix="cerbas-bench-")
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **SPAWN,
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
            **SPAWN,
        )
        wait("cerbas", 20, lambda: redis_cli(port, "EXISTS", "CERBAS-INSTANCES", db=1).strip() == "1")
        time.sleep(1)
        rss_idle = proc_kib(server.pid, "VmRSS")

        log("baseline: redis-benchmark -t set -c 50")
        out = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-t", "set", "-c", "50", "-n", "200000", "-q"],
            capture_output=True, text=True, timeout=300, **SPAWN,
        ).stdout
        found = re.search(r"SET: ([\d.]+) requests per second", out)
        set_ops = float(found.group(1)) if found else None
        redis_cli(port, "FLUSHDB", db=0)

        rows = client_rows(names, port, server.pid, url, opts)
        rss_w2 = proc_kib(server.pid, "VmHWM")

        w3 = loadgen(url, server.pid, port, "w3")
        w3_n, _, w3_rate = drain_rates(w3[0])
        w4, _, _ = loadgen(url, server.pid, port, "w4")
        peak = proc_kib(server.pid, "VmHWM")

        # A second instance on the same Redis: W3 again.
        log("second instance")
        second = subprocess.Popen(
            [os.path.join(ROOT, "target/release/cerbas"), "--config", "cerbas.toml",
             "--redis", url, "--http", "", "--crontab", "/dev/null"],
            cwd=ROOT, stdout=server_log, stderr=server_log, env={**os.environ, "RUST_LOG": "warn"},
            **SPAWN,
        )
        try:
            wait("the second instance", 20,
                 lambda: redis_cli(port, "SCARD", "CERBAS-INSTANCES", db=1).strip() == "2")
            w3_two, _, _ = loadgen(url, server.pid, port, "w3")
        finally:
            stop(second)

        # The floor never serves beside cerbas: it would share Redis's CPU.
        stop(server)
        server = None
        floor = None
        if not opts.no_floor:
            # A failure here must not cost the table measured above.
            try:
                floor = floor_section(port, server_log, names, opts)
            except (Exception, SystemExit) as e:
                log(f"the protocol floor's rows are left out: {e}")

        print(f"## cerbas bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{os.cpu_count()} cores, {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}")
        print()
        print(f"Processes: {'each in a session of its own' if SPAWN else 'all in one session (--one-session)'}; "
              f"kernel.sched_autogroup_enabled = {autogroup()}.")
        print()
        print(f"Baseline: `redis-benchmark -t set -c 50`: **{fmt(set_ops)} SET/s**.")
        print()
        print_rows(rows, set_ops)
        print()
        w3_line, w3_redis, w3_server = w3
        w3_n = w3_n or 1
        print(f"- {w3_line}" + (f" (W3 / SET: {w3_rate / set_ops:.3f})" if w3_rate and set_ops else "")
              + f"; server CPU {w3_server * 1e6 / w3_n:.1f} µs/request, Redis CPU {w3_redis * 1e6 / w3_n:.1f} "
              "µs/request (the load generator's own SET + RPUSH included; republish looks run on after the drain)")
        print(f"- two instances: {w3_two}")
        print(f"- {w4}")
        print(f"- server RSS idle {rss_idle / 1024:.1f} MiB, peak through W2 {rss_w2 / 1024:.1f} MiB, "
              f"peak after W3/W4 {peak / 1024:.1f} MiB")
        if floor:
            print_floor(rows, w3, floor, set_ops)
    finally:
        if server:
            stop(server)
        redis.terminate()
        redis.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
