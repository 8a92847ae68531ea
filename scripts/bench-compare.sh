#!/usr/bin/env bash
# Before/after in one sitting: runs `loadgen --workload all` against two cerbas
# binaries in turn (A, B, A, B, ...), each on a fresh redis-server of its own on a
# free loopback port, each with the configuration shipped beside it (the
# cerbas.toml of the checkout whose target/release it is in, else this one). The machine is shared and
# noisy, so compare the two columns of the same run, never numbers across runs.
#   scripts/bench-compare.sh OLD_CERBAS NEW_CERBAS [ROUNDS] [LOADGEN]
# WORKLOAD=w1,w3 picks workloads (default all); LOADGEN_ARGS adds flags (--no-ref).
# Not for: `make test` (speed is measured, not asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
old="$1"; new="$2"; rounds="${3:-2}"
loadgen="${4:-target/release/examples/loadgen}"
[ -x "$loadgen" ] || cargo build --release --example loadgen
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; kill "${pid:-0}" 2>/dev/null || true; rm -rf "$dir"' EXIT
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    bin="$old"; [ "$which" = new ] && bin="$new"
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --dir "$dir" --daemonize yes --logfile "$dir/redis.log"
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
    config="$(dirname "$bin")/../../cerbas.toml"
    [ -f "$config" ] || config=cerbas.toml
    RUST_LOG=warn "$bin" --config "$config" --redis "redis://127.0.0.1:$port" 2>"$dir/cerbas.log" &
    pid=$!
    until redis-cli -p "$port" -n 1 exists CERBAS-INSTANCES | grep -q 1; do
      kill -0 "$pid" 2>/dev/null || { echo "cerbas did not start:" >&2; cat "$dir/cerbas.log" >&2; exit 1; }
      sleep 0.05
    done
    echo "== round $round: $which ($bin)"
    "$loadgen" --redis "redis://127.0.0.1:$port" --workload "${WORKLOAD:-all}" ${LOADGEN_ARGS:-} 2>/dev/null || echo "loadgen failed"
    kill -TERM "$pid"; wait "$pid" || true
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    sleep 0.5
  done
done
