#!/usr/bin/env bash
# Tests of clients/sh/cerbas-call against a real server: starts its own redis-server
# on a free port of 127.0.0.1 and the cerbas binary (CERBAS_BIN, default
# <repo>/target/debug/cerbas; build it first with `cargo build`), runs the checks,
# stops both. Prints one line per check, then "N passed, N failed".
# Exit status: 0 if every check passed, 1 otherwise (2 if the setup failed).
#
# Usage: bash clients/sh/test.sh

set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CALL=$HERE/cerbas-call
CERBAS_BIN=${CERBAS_BIN:-$REPO/target/debug/cerbas}
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}

PASSED=0
FAILED=0
REDIS_PID=''
SERVER_PID=''
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cerbas-sh-test.XXXXXX")

# stop PID: TERM, wait up to 15 s, then KILL.
stop() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    [[ -n $SERVER_PID ]] && stop "$SERVER_PID"
    [[ -n $REDIS_PID ]] && stop "$REDIS_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 2' INT TERM HUP

setup_fail() {
    echo "setup failed: $*" >&2
    for f in "$WORK"/*.log; do
        [[ -s $f ]] && { echo "--- $f" >&2; tail -20 "$f" >&2; }
    done
    exit 2
}

pass() { PASSED=$((PASSED + 1)); printf 'ok    %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s: %s\n' "$1" "$2"; }

# ---------------------------------------------------------------- redis
[[ -x $REDIS_SERVER ]] || setup_fail "no $REDIS_SERVER"
[[ -x $CERBAS_BIN ]] || setup_fail "no $CERBAS_BIN (run: cd $REPO && cargo build)"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

for attempt in 1 2 3; do
    PORT=$(free_port) || setup_fail "no free port"
    "$REDIS_SERVER" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    up=0
    for ((i = 0; i < 50; i++)); do   # 5 s
        if [[ $(redis-cli -h 127.0.0.1 -p "$PORT" PING 2>/dev/null) == PONG ]]; then
            up=1; break
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    ((up)) && break
    stop "$REDIS_PID"; REDIS_PID=''
done
[[ -n $REDIS_PID ]] || setup_fail "redis-server did not answer PING"
URL=redis://127.0.0.1:$PORT

# ---------------------------------------------------------------- cerbas
env -u CERBAS_REDIS_URL -u CERBAS_ENV \
    "$CERBAS_BIN" --config "$REPO/cerbas.toml" --redis "$URL" --http "" >"$WORK/cerbas.log" 2>&1 &
SERVER_PID=$!

# The client's environment: this server, db from CERBAS_ENV's default (dev = 1).
export CERBAS_REDIS_URL=$URL
unset CERBAS_ENV CERBAS_TIMEOUT
export CERBAS_USER=foo CERBAS_SOURCE=cerbastest
export TMPDIR=$WORK/tmp   # the client's temp files: must be gone at the end
mkdir -p "$TMPDIR"

up=0
for ((i = 0; i < 100; i++)); do   # 20 s (a cold start, a slow machine)
    kill -0 "$SERVER_PID" 2>/dev/null || setup_fail "cerbas exited"
    if CERBAS_TIMEOUT=0.5 "$CALL" hello >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
done
((up)) || setup_fail "cerbas did not answer hello"

# ---------------------------------------------------------------- checks
# call [ENV=VALUE...] -- ARGS...: runs cerbas-call; sets OUT, ERR, RC, SECS.
call() {
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    local t0=$EPOCHREALTIME
    OUT=$(env "${envs[@]}" "$CALL" "$@" 2>"$WORK/stderr")
    RC=$?
    ERR=$(<"$WORK/stderr")
    SECS=$(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")
}

# same_json A B: A and B parse to equal JSON values.
same_json() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
try:
    sys.exit(0 if json.loads(sys.argv[1]) == json.loads(sys.argv[2]) else 1)
except ValueError:
    sys.exit(1)
EOF
}

# expect NAME RC REPLY [ENV=VALUE...] -- ARGS...: cerbas-call exits with RC and
# prints a reply equal (as JSON) to REPLY.
expect() {
    local name=$1 rc=$2 reply=$3
    shift 3
    call "$@"
    if [[ $RC != "$rc" ]]; then
        fail "$name" "exit $RC, wanted $rc; out: $OUT; err: $ERR"
    elif ! same_json "$OUT" "$reply"; then
        fail "$name" "reply $OUT, wanted $reply"
    else
        pass "$name"
    fi
}
ok() { expect "$1" 0 "{\"status\":\"ok\",\"data\":$2}" "${@:3}"; }
err() { expect "$1" 1 "{\"status\":\"error\",\"data\":$2}" "${@:3}"; }

# expect_timeout NAME MAX_SECS [ENV=VALUE...] -- ARGS...: exit 2, "timeout" on
# stderr, nothing on stdout, within MAX_SECS.
expect_timeout() {
    local name=$1 max=$2
    shift 2
    call "$@"
    if [[ $RC != 2 ]]; then
        fail "$name" "exit $RC, wanted 2; out: $OUT; err: $ERR"
    elif [[ -n $OUT || $ERR != *timeout* ]]; then
        fail "$name" "out: '$OUT'; err: '$ERR'"
    elif ! python3 -c "import sys; sys.exit(0 if $SECS <= $max else 1)"; then
        fail "$name" "took ${SECS}s, more than ${max}s"
    else
        pass "$name (${SECS}s)"
    fi
}

TALLY=shtest-$$-$RANDOM

ok "hello" '"hello world!"' -- hello
ok "echo unicode" '"ü€"' -- echo '{"message":"ü€"}'
ok "withargs" '"bar"' -- withargs '{"foo":"bar"}'
err "witherror" '"unexpected error"' -- witherror
ok "sum" 3 -- sum '{"a":1,"b":2}'
ok "dummy" null -- dummy
ok "asyncfunc" '""' -- asyncfunc
ok "sleep 5 ms" 5 -- sleep '{"ms":5}'
ok "tally" 1 -- tally "{\"name\":\"$TALLY-a\"}"
ok "primes below 100" 25 -- primes '{"below":100}'
err "unknown function" '"unknown function: nope"' -- nope
err "bad arguments" '"invalid arguments: missing field `a`"' -- sum '{"b":2}'
err "unregistered user" '"user not registered: nobody"' CERBAS_USER=nobody -- hello
ok "db in the URL wins over CERBAS_ENV" '"hello world!"' \
    "CERBAS_REDIS_URL=$URL/1" CERBAS_ENV=prod -- hello
ok "-t option" 5 -- -t 5 sleep '{"ms":5}'
expect_timeout "client timeout (sleep 3000 ms, CERBAS_TIMEOUT=1)" 2.5 \
    CERBAS_TIMEOUT=1 -- sleep '{"ms":3000}'
expect_timeout "CERBAS_ENV=prod (db 8, nobody serves it)" 2.5 \
    CERBAS_ENV=prod CERBAS_TIMEOUT=1 -- hello

# one-way: prints the id, then the tally shows up in db 1, and nothing is published
# (the body says "reply": false): a listener on every reply channel hears nothing.
redis-cli -u "$URL" -n 1 PSUBSCRIBE 'CERBAS-RESPONSE-1-*' >"$WORK/heard" 2>/dev/null &
LISTENER=$!
for ((i = 0; i < 100; i++)); do   # 10 s
    grep -q '^psubscribe' "$WORK/heard" && break
    sleep 0.1
done
call -- -n tally "{\"name\":\"$TALLY-b\"}"
if [[ $RC != 0 || ! $OUT =~ ^[0-9]+$ ]]; then
    fail "one-way tally" "exit $RC, out '$OUT', err '$ERR'"
else
    printf -v key 'CERBAS-REQ-%010d' "$OUT"
    got='' left=1
    for ((i = 0; i < 100; i++)); do   # 10 s
        got=$(redis-cli -u "$URL" -n 1 --raw GET "CERBAS-TALLY-$TALLY-b" 2>/dev/null)
        left=$(redis-cli -u "$URL" -n 1 --raw EXISTS "$key" 2>/dev/null)
        [[ $got == 1 && $left == 0 ]] && break
        sleep 0.1
    done
    sleep 0.2   # time for a message already sent to arrive
    printf -v chan 'CERBAS-RESPONSE-1-%010d' "$OUT"
    if [[ $got != 1 ]]; then
        fail "one-way tally" "CERBAS-TALLY-$TALLY-b is '$got', wanted 1"
    elif [[ $left != 0 ]]; then
        fail "one-way tally" "$key was not acknowledged"
    elif ! grep -q '^psubscribe' "$WORK/heard"; then
        fail "one-way tally" "the listener never subscribed"
    elif grep -qx "$chan" "$WORK/heard"; then
        fail "one-way tally" "a reply was published on $chan"
    else
        pass "one-way tally (id $OUT, CERBAS-TALLY-$TALLY-b = 1 in db 1, nothing published)"
    fi
fi
kill "$LISTENER" 2>/dev/null
wait "$LISTENER" 2>/dev/null

# errors of the client itself: exit 2, a message, nothing on stdout
expect_usage() {
    local name=$1
    shift
    call "$@"
    if [[ $RC == 2 && -z $OUT && -n $ERR ]]; then
        pass "$name"
    else
        fail "$name" "exit $RC, out '$OUT', err '$ERR'"
    fi
}
expect_usage "no arguments: usage" --
expect_usage "bad CERBAS_ENV" CERBAS_ENV=staging --  hello
expect_usage "bad CERBAS_TIMEOUT" CERBAS_TIMEOUT=soon -- hello
dead_port=$(free_port)
expect_usage "connection refused" "CERBAS_REDIS_URL=redis://127.0.0.1:$dead_port" -- hello

# nothing left behind: the client's temp files, its redis-cli subscribers
sleep 0.2
left=$(find "$TMPDIR" -mindepth 1 2>/dev/null)
subs=$(redis-cli -u "$URL" --raw PUBSUB CHANNELS 'CERBAS-RESPONSE-*' 2>/dev/null)
if [[ -z $left && -z $subs ]]; then
    pass "no temp files or subscriptions left"
else
    fail "no temp files or subscriptions left" "files: $left; channels: $subs"
fi

kill -0 "$SERVER_PID" 2>/dev/null || fail "server still running" "cerbas exited; log: $(tail -5 "$WORK/cerbas.log")"

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
