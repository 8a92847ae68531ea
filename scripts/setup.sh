#!/usr/bin/env bash
# Installs what `make run` and `make test` need on a fresh Debian machine:
# redis-server and redis-cli (apt-get, when root), the Rust lint components; with
# --clients also what the client tests need: a Python virtualenv in .venv with the
# Python client, Ruby with Debian's redis and msgpack gems, Node.js and the Node
# client's npm packages, and Chromium for the dashboard's browser test.
# Not for: starting anything (see scripts/redis-up.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
if [ "${1:-}" = "--clients" ]; then
  command -v ruby >/dev/null 2>&1 || need_apt+=(ruby)
  ruby -e 'require "redis"' >/dev/null 2>&1 || need_apt+=(ruby-redis)
  ruby -e 'require "msgpack"' >/dev/null 2>&1 || need_apt+=(ruby-msgpack)
  command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
  # The dashboard's browser test (tests/dashboard.rs) drives headless Chromium.
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain with rustup" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done

if [ "${1:-}" = "--clients" ]; then
  if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
      if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
      else
        echo "setup: python3 -m venv failed: install python3-venv" >&2
        exit 1
      fi
    fi
  fi
  # The Python client and its dependencies (redis-py, hiredis: its C reply parser
  # roughly halves the client's CPU per call, msgpack) and pytest.
  .venv/bin/python -m pip install -q "./clients/python[test]" "hiredis>=3.0"
  rm -rf clients/python/build clients/python/*.egg-info
  # --include=dev: typescript and @types/node, for the type check of index.d.ts
  # (clients/node/test/types.test.js), even where NODE_ENV=production.
  (cd clients/node && npm ci --include=dev --no-audit --no-fund --loglevel=error)
fi
