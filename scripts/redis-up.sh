#!/usr/bin/env bash
# For `make run`: makes sure a Redis answers at the configured URL. If none does
# and the URL is on this machine, starts a local redis-server in the background
# (data and log in .redis/). Not for: tests, which start their own on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:-redis://127.0.0.1:6379}"
if redis-cli -u "$url" ping >/dev/null 2>&1; then
  exit 0
fi
hostport="${url#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"; hostport="${hostport%%\?*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379
case "$host" in
  127.0.0.1|localhost) ;;
  *) echo "redis-up: no Redis answers at $host:$port; start it there" >&2; exit 1 ;;
esac
mkdir -p .redis
echo "redis-up: starting redis-server on 127.0.0.1:$port (data and log in .redis/)"
redis-server --bind 127.0.0.1 --port "$port" --daemonize yes \
  --dir "$PWD/.redis" --logfile "$PWD/.redis/redis.log"
for _ in $(seq 1 100); do
  redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "redis-up: redis-server did not answer; see .redis/redis.log" >&2
exit 1
