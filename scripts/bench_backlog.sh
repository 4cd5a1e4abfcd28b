#!/usr/bin/env bash
# usage: scripts/bench_backlog.sh
# A/B: the backlog check in publish (a persist group on the stream, on_backlog=reject) against
# on_backlog=trim (no check), one Redis, a fresh server per row, 10:100:4, 8 s each.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
W=$(mktemp -d); rp=$(free_port)
redis-server --port $rp --bind 127.0.0.1 --save "" --appendonly no --dir $W >/dev/null 2>&1 &
RPID=$!; trap 'kill $RPID 2>/dev/null; kill $SPID 2>/dev/null; rm -rf $W' EXIT
wait_port $rp 10
printf '[sites.bench]\norigins = ["http://localhost"]\nallow_no_origin = true\n' >$W/sites.toml
for mode in reject trim reject trim; do
  redis-cli -p $rp flushall >/dev/null
  redis-cli -p $rp xgroup create 'ew:{bench}:events' persist 0 mkstream >/dev/null
  port=$(free_port)
  EVENTWIRE_CONFIG=/dev/null EVENTWIRE_ON_BACKLOG=$mode EVENTWIRE_MAX_BACKLOG=100000000 EVENTWIRE_STREAM_MAXLEN=100000000 \
    .venv/bin/eventwire serve --listen 127.0.0.1:$port --admin 127.0.0.1:$(free_port) --http 127.0.0.1:$(free_port) \
    --redis redis://127.0.0.1:$rp/0 --sites $W/sites.toml >$W/server.log 2>&1 &
  SPID=$!
  wait_port $port 20
  echo "== on_backlog=$mode (persist group present), load $(cut -d' ' -f1 /proc/loadavg)"
  .venv/bin/python scripts/bench.py --url ws://127.0.0.1:$port/v1/track/bench --redis-url redis://127.0.0.1:$rp/0 \
    -c 10 -b 100 -w 4 --duration 8 --server-pid $SPID --redis-pid $RPID 2>&1 | grep -v "^{" | tail -4
  kill $SPID; wait $SPID 2>/dev/null || true
done
