#!/usr/bin/env bash
# The peer benchmark's closed-loop run: a private Redis, the raw redis-benchmark
# rows (bench/raw_redis.sh), then every server under test in turn with the same
# load (bench/loadgen.py), and the table at the end. scripts/bench --peers runs
# it with eventwire as a row and installs what it needs first (the repository's
# .venv, redis-server, node and bench/node_modules); see bench/README.md.
#
# usage: bench/run.sh ["name=command" ...]
#   default rows: node, node-dedup, naive (DEFAULT_ROWS below). A command runs
#   from bench/ as `bash -c "exec COMMAND"` in its own process group, with
#   PORT, HOST, ADMIN_PORT, REDIS_URL, REDIS_HOST, REDIS_PORT, SITE, SITES,
#   KEY_PREFIX, STREAM_KEY, SITES_FILE (bench/sites.toml), BENCH_DIR and PY
#   set; it must serve ws://$HOST:$PORT/v1/track/$SITE within 20 s and stop on
#   SIGTERM (SIGKILL after 3 s). Every server run starts a fresh server.
#
# env knobs (defaults):
#   DURATION=8 (measured s per row)  WARMUP=1 (unmeasured s first, then FLUSHALL)
#   SETTINGS="50:1:1 50:1:16 10:100:4" (C:B:W)  SKIP_RAW=0  RAW_CONFIGS (raw_redis.sh)
#   IMPL=raw (raw|websockets)  ENCODING=json (json|msgpack)  VERIFY=scan (scan|count|none)
#   SITE=bench  KEY_PREFIX=ew  PY=<repo>/.venv/bin/python (or python3)
#   REDIS_PORT, SERVER_PORT, ADMIN_PORT: free loopback ports unless set
#   BENCH_WORK: where results.jsonl and the logs go (a new temp dir unless set)
#   ROUNDS=1: with N > 1, N alternating rounds (rounds mode, below)
#
# Rounds mode (ROUNDS > 1; scripts/bench --peers --rounds N): no raw rows. Each
# round starts a fresh Redis and runs, for each setting, every row in turn
# (A B, A B, ...), so the servers under test share the machine's moods alike.
# After each measured row bench/check_dedup.py runs against the same server
# (resend and race), and the row counts as verified only if the stream scan and
# that check both passed. Each record carries its round; the end prints the
# table of every run, then per setting and server the median with min-max of
# events/s, p50 and p99, the ratio to the first row per round (median and
# range), the other jobs' CPU (the machine's busy CPU minus this benchmark's
# own processes: server, Redis, load generator) per round, and whether every
# row verified (loadgen.py --rounds-table).
#
# Everything stays on 127.0.0.1; every process it starts is stopped by its
# process group when it exits. Exit code 1 when a row failed its check.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
cd "$BENCH_DIR"
if [ -z "${PY:-}" ]; then
  if [ -x ../.venv/bin/python ]; then PY=$(cd .. && pwd)/.venv/bin/python; else PY=python3; fi
fi
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
SETTINGS=${SETTINGS:-"50:1:1 50:1:16 10:100:4"}
SKIP_RAW=${SKIP_RAW:-0}
IMPL=${IMPL:-raw}
ENCODING=${ENCODING:-json}
VERIFY=${VERIFY:-scan}
ROUNDS=${ROUNDS:-1}
SITE=${SITE:-bench}
KEY_PREFIX=${KEY_PREFIX:-ew}
STREAM_KEY="$KEY_PREFIX:{$SITE}:events"
export PY PYTHONDONTWRITEBYTECODE=1
DEFAULT_ROWS=("node=node peers/node.js" "node-dedup=node peers/node_dedup.js" "naive=\$PY peers/naive.py")
if [ $# -eq 0 ]; then set -- "${DEFAULT_ROWS[@]}"; fi

"$PY" -c 'import msgspec, redis, websockets' 2>/dev/null \
  || { echo "$PY lacks msgspec, redis or websockets: run scripts/bench --peers, or pip install them" >&2; exit 1; }
for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (Redis 7)" >&2; exit 1; }
done
if printf '%s\n' "$@" | grep -q '=node '; then
  [ -d node_modules/ws ] && [ -d node_modules/ioredis ] \
    || { echo "no bench/node_modules: run 'npm ci' in bench/ (scripts/bench --peers does)" >&2; exit 1; }
fi

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
REDIS_PORT=${REDIS_PORT:-$(free_port)}
# Three different ports: the kernel may hand out a port just closed again.
SERVER_PORT=${SERVER_PORT:-$(free_port)}
while [ "$SERVER_PORT" = "$REDIS_PORT" ]; do SERVER_PORT=$(free_port); done
ADMIN_PORT=${ADMIN_PORT:-$(free_port)}
while [ "$ADMIN_PORT" = "$REDIS_PORT" ] || [ "$ADMIN_PORT" = "$SERVER_PORT" ]; do ADMIN_PORT=$(free_port); done
for p in "$REDIS_PORT" "$SERVER_PORT" "$ADMIN_PORT"; do
  if port_open "$p"; then echo "port $p is in use; set REDIS_PORT/SERVER_PORT/ADMIN_PORT" >&2; exit 1; fi
done

BENCH_WORK=${BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/eventwire-peers.XXXXXX")}
LOGS=$BENCH_WORK/logs
mkdir -p "$LOGS"
RESULTS=$BENCH_WORK/results.jsonl
: >"$RESULTS"

REDIS_PID="" SERVER_PID=""
stop_group() {  # stop_group PID: SIGTERM its process group (started with setsid), SIGKILL after 3 s
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  stop_group "$SERVER_PID"; SERVER_PID=""
  stop_group "$REDIS_PID"; REDIS_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Redis -------------------------------------------------------------------
start_redis() {  # a fresh private Redis on REDIS_PORT; sets REDIS_PID
  setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$BENCH_WORK" --save "" \
    --appendonly no --daemonize no --logfile "$LOGS/redis${1:+-$1}.log" &
  REDIS_PID=$!
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null
}
start_redis
echo "redis $(redis-server --version | awk '{print $3}') pid=$REDIS_PID port=$REDIS_PORT; results and logs in $BENCH_WORK"

# ---- the physical limit --------------------------------------------------------
if [ "$SKIP_RAW" != 1 ] && [ "$ROUNDS" -le 1 ]; then
  RESULTS="$RESULTS" ./raw_redis.sh "$REDIS_PORT"
fi

# ---- the servers under test ----------------------------------------------------
run_row() {  # run_row NAME CMD C B W ROUND: a fresh server, warm-up, FLUSHALL, the measured row
  local name=$1 cmd=$2 C=$3 B=$4 W=$5 round=$6 log dedup_ok=""
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  log="$LOGS/${name}_C${C}_B${B}_W${W}${round:+_r$round}"
  PORT=$SERVER_PORT HOST=127.0.0.1 ADMIN_PORT=$ADMIN_PORT REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    REDIS_HOST=127.0.0.1 REDIS_PORT=$REDIS_PORT SITE=$SITE SITES=$SITE KEY_PREFIX=$KEY_PREFIX \
    STREAM_KEY=$STREAM_KEY SITES_FILE="$BENCH_DIR/sites.toml" BENCH_DIR="$BENCH_DIR" \
    setsid bash -c "exec $cmd" >"$log.server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 200); do
    port_open "$SERVER_PORT" && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! port_open "$SERVER_PORT"; then
    echo "[$name] server did not start; see $log.server.log" >&2; tail -5 "$log.server.log" >&2
    stop_group "$SERVER_PID"; SERVER_PID=""; return 0
  fi
  LG=("$PY" loadgen.py --port "$SERVER_PORT" --site "$SITE" --key-prefix "$KEY_PREFIX"
      -c "$C" -b "$B" -w "$W" -n $((1000000000 / B * B)) --redis-port "$REDIS_PORT"
      --impl "$IMPL" --encoding "$ENCODING" --label "$name")
  if [ "$WARMUP" != 0 ]; then
    "${LG[@]}" --verify none --duration "$WARMUP" --timeout 60 >"$log.warmup.txt" 2>&1 || true
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
  fi
  TOP_PID=""
  if command -v top >/dev/null; then  # one snapshot in the middle of the measured run
    ( sleep "$(awk "BEGIN { print $DURATION / 2 }")"; top -b -n1 -w 200 | head -14 >"$log.top.txt" ) &
    TOP_PID=$!
  fi
  if [ -n "$round" ]; then
    # The same server, right after its measured row: does it de-duplicate per producer?
    "${LG[@]}" --verify "$VERIFY" --duration "$DURATION" --timeout $((${DURATION%.*} + 60)) \
      --cpu-pids "server=$SERVER_PID,redis=$REDIS_PID" --round "$round" \
      --json "$LOGS/row.json" || true
    if "$PY" check_dedup.py --port "$SERVER_PORT" --redis-port "$REDIS_PORT" --site "$SITE" \
      --key-prefix "$KEY_PREFIX" >"$log.dedup.txt" 2>&1; then dedup_ok=1; fi
    "$PY" -c 'import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
r["dedup_check"] = sys.argv[2] == "1"
r["ok"] = r["ok"] and r["dedup_check"]
print(json.dumps(r))' "$LOGS/row.json" "${dedup_ok:-0}" >>"$RESULTS"
    rm -f "$LOGS/row.json"
    [ -n "$dedup_ok" ] || echo "[$name] check_dedup.py FAILED: see $log.dedup.txt" >&2
  else
    "${LG[@]}" --verify "$VERIFY" --duration "$DURATION" --timeout $((${DURATION%.*} + 60)) \
      --cpu-pids "server=$SERVER_PID,redis=$REDIS_PID" --json "$RESULTS" || true
  fi
  [ -z "$TOP_PID" ] || wait "$TOP_PID" 2>/dev/null || true
  stop_group "$SERVER_PID"; SERVER_PID=""
  for _ in $(seq 50); do port_open "$SERVER_PORT" || break; sleep 0.1; done
}

check_setting() {
  IFS=: read -r C B W <<<"$1"
  [ -n "$C" ] && [ -n "$B" ] && [ -n "$W" ] || { echo "bad setting '$1' (want C:B:W)" >&2; exit 1; }
}

if [ "$ROUNDS" -le 1 ]; then
  for row in "$@"; do
    name=${row%%=*}; cmd=${row#*=}
    for setting in $SETTINGS; do
      check_setting "$setting"
      run_row "$name" "$cmd" "$C" "$B" "$W" ""
    done
  done
  echo
  "$PY" loadgen.py --table "$RESULTS"
  exit $?
fi

for setting in $SETTINGS; do check_setting "$setting"; done
for round in $(seq "$ROUNDS"); do
  if [ "$round" -gt 1 ]; then  # every round on a fresh Redis
    stop_group "$REDIS_PID"; REDIS_PID=""
    start_redis "$round"
  fi
  echo "round $round of $ROUNDS (redis pid=$REDIS_PID): $(cut -d' ' -f1-3 /proc/loadavg) load" >&2
  for setting in $SETTINGS; do
    check_setting "$setting"
    for row in "$@"; do
      name=${row%%=*}; cmd=${row#*=}
      run_row "$name" "$cmd" "$C" "$B" "$W" "$round"
    done
  done
done
echo
"$PY" loadgen.py --table "$RESULTS" || true
echo
"$PY" loadgen.py --rounds-table "$RESULTS"
