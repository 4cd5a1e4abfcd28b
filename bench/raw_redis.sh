#!/usr/bin/env bash
# The physical-limit rows of the peer benchmark: redis-benchmark XADD of one
# stored event (366 bytes of JSON) with MAXLEN ~ 1000000, as the servers store
# it, against the benchmark's Redis (no WebSocket, no JSON parsing). Prints one
# line per config and, with RESULTS set, appends one JSON record per config
# in bench/loadgen.py's format (for its --table).
#
# usage: bench/raw_redis.sh REDIS_PORT      (bench/run.sh calls it)
# env:   RESULTS=path.jsonl
#        RAW_CONFIGS="name:n:P:c ..."  (default below: P1/c1, P1/c50, P64/c50)
set -euo pipefail
PORT=${1:?usage: raw_redis.sh REDIS_PORT}
RESULTS=${RESULTS:-}
KEY='ew:{bench}:raw'
PAYLOAD='{"site":"bench","uuid":"3f2b9c1e-8a47-4d2b-9a5e-1c2d3e4f5a6b","session":"s-mwxv3k1a-q2w8e7r4","producer":"lg-c4645b23-17","seq":1000123,"action":"product.view","label":"Merino Wool Sweater","time":1764160000000,"received":1764160000123,"params":{"url":"https://shop.example.com/p/merino-wool-sweater-48213","title":"Merino Wool Sweater - Example Shop","price":89.9}}'
CONFIGS=${RAW_CONFIGS:-"raw-P1-c1:50000:1:1 raw-P1-c50:300000:1:50 raw-P64-c50:1000000:64:50"}

REDIS_PID=$(redis-cli -p "$PORT" info server | awk -F: '/^process_id/{print $2}' | tr -d '\r')
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }  # floating-point arithmetic without bc
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# whole-machine busy ticks / total ticks (all CPUs), from /proc/stat
sysstat() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
NCPU=$(nproc)
CLK=$(getconf CLK_TCK)
echo "# redis-benchmark XADD $KEY MAXLEN ~ 1000000 * event <${#PAYLOAD}-byte event>  (redis pid $REDIS_PID, port $PORT)"

for cfg in $CONFIGS; do
  IFS=: read -r name n P c <<<"$cfg"
  redis-cli -p "$PORT" del "$KEY" >/dev/null
  r0=$(ticks "$REDIS_PID"); read -r sb0 st0 < <(sysstat); t0=$(date +%s.%N)
  tf=$(mktemp)
  TIMEFORMAT='%U %S'
  { time redis-benchmark -p "$PORT" -n "$n" -P "$P" -c "$c" --csv XADD "$KEY" MAXLEN '~' 1000000 '*' event "$PAYLOAD" >"$tf.csv" ; } 2>"$tf.time"
  t1=$(date +%s.%N); r1=$(ticks "$REDIS_PID"); read -r sb1 st1 < <(sysstat)
  # the CSV's first column repeats the command (with quotes); the 7 metrics are the last quoted numbers
  read -r rps avg min p50 p95 p99 max < <(tail -1 "$tf.csv" | grep -oE '"[0-9.]+"' | tail -7 | tr -d '"' | tr '\n' ' '; echo)
  read -r bu bs < "$tf.time"
  xlen=$(redis-cli -p "$PORT" xlen "$KEY")
  rm -f "$tf" "$tf.csv" "$tf.time"
  wall=$(calc "$t1 - $t0")
  redis_cpu=$(calc "100 * ($r1 - $r0) / $CLK / $wall")
  bench_cpu=$(calc "100 * ($bu + $bs) / $wall")
  sys_busy=$(calc "100 * $NCPU * ($sb1 - $sb0) / ($st1 - $st0)")
  ok=false; [ "$xlen" = "$n" ] && ok=true
  printf '%-12s n=%-8s P=%-3s c=%-3s %10.0f XADD/s  p50=%sms p99=%sms  xlen=%s ok=%s  cpu%%: redis=%.0f redis-benchmark=%.0f all=%.0f/%s00\n' \
    "$name" "$n" "$P" "$c" "$rps" "$p50" "$p99" "$xlen" "$ok" "$redis_cpu" "$bench_cpu" "$sys_busy" "$NCPU"
  if [ -n "$RESULTS" ]; then
    printf '{"server":"redis-benchmark","impl":"%s","C":%s,"B":1,"W":%s,"sent_events":%s,"accepted":%s,"events_per_s":%.0f,"frames_per_s":%.0f,"lat_p50_ms":%s,"lat_p99_ms":%s,"stream_added":%s,"ok":%s,"cpu_pct":{"redis":%.1f,"loadgen":%.1f,"system_busy":%.1f}}\n' \
      "$name" "$c" "$P" "$n" "$n" "$rps" "$rps" "$p50" "$p99" "$xlen" "$ok" "$redis_cpu" "$bench_cpu" "$sys_busy" >>"$RESULTS"
  fi
done
redis-cli -p "$PORT" del "$KEY" >/dev/null
