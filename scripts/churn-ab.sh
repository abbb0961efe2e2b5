#!/usr/bin/env bash
# Connection churn, A/B: `wrk -t1 -c32 -d5s -H 'Connection: close'` against 2 workers, for two
# builds of rcluster-lb (A = a baseline's target dir, B = this checkout's) with a node app through
# the shim (least-conn, reuseport, shared) and the demo worker (least-conn), plus Node's own
# cluster (SCHED_NONE, SCHED_RR) as the peers. Interleaved rounds; prints one CSV line per run:
#   round,config,conn_per_s,master_cpu_us_per_conn
# and the medians at the end. Master CPU is utime+stime of the master process (all its threads)
# over the wrk run, divided by the connections wrk completed. 127.0.0.1 only.
#
# usage: scripts/churn-ab.sh BASE_BIN_DIR [ROUNDS]     (B is target/release of this checkout)
set -euo pipefail
A_DIR=${1:?usage: churn-ab.sh BASE_BIN_DIR [ROUNDS]}
ROUNDS=${2:-3}
B_DIR=$(cd "$(dirname "$0")/.." && pwd)/target/release
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/app.js" <<'JS'
require('http').createServer((q,s)=>s.end('pid '+process.pid+'\n')).listen(process.env.PORT)
JS
cat > "$WORK/cluster.js" <<'JS'
const cluster=require('cluster');
cluster.schedulingPolicy = process.env.SCHED==='rr' ? cluster.SCHED_RR : cluster.SCHED_NONE;
if (cluster.isPrimary) { for (let i=0;i<2;i++) cluster.fork(); }
else { require('http').createServer((q,s)=>s.end('pid '+process.pid+'\n')).listen(process.env.PORT); }
JS
PORT=$((20000 + RANDOM % 10000))
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
wait_up() {
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && return 0
    sleep 0.05
  done
  echo "server on $PORT did not come up" >&2; return 1
}
run() { # round config command...
  local round=$1 config=$2; shift 2
  PORT=$((PORT + 1))
  "$@" > "$WORK/log" 2>&1 &
  local pid=$!
  wait_up
  sleep 0.5
  local t0; t0=$(cpu_ticks $pid)
  local out; out=$(wrk -t1 -c32 -d5s -H 'Connection: close' "http://127.0.0.1:$PORT/")
  local t1; t1=$(cpu_ticks $pid)
  kill -TERM $pid; wait $pid || true
  local rps reqs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  # Ticks are 10 ms (USER_HZ 100).
  local us; us=$(awk -v d=$((t1 - t0)) -v n="$reqs" 'BEGIN { printf "%.2f", d * 10000 / n }')
  echo "$round,$config,$rps,$us"
}
{
for r in $(seq 1 "$ROUNDS"); do
  for v in A B; do
    dir=A_DIR; [ $v = B ] && dir=B_DIR
    bin=${!dir}/rcluster-lb
    for p in least-conn reuseport shared; do
      run "$r" "$v-node-$p" "$bin" --workers 2 --policy "$p" --listen "127.0.0.1:$((PORT + 1))" -- node "$WORK/app.js"
    done
    run "$r" "$v-demo-least-conn" "$bin" --workers 2 --policy least-conn --listen "127.0.0.1:$((PORT + 1))"
  done
  run "$r" node-cluster-none env PORT=$((PORT + 1)) node "$WORK/cluster.js"
  run "$r" node-cluster-rr env SCHED=rr PORT=$((PORT + 1)) node "$WORK/cluster.js"
done
} | tee "$WORK/runs.csv"
echo "median conn/s and master CPU µs/conn per config:"
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for k in $(cut -d, -f2 "$WORK/runs.csv" | sort -u); do
  printf '%-22s %10s %8s\n' "$k" \
    "$(awk -F, -v k="$k" '$2 == k { print $3 }' "$WORK/runs.csv" | median)" \
    "$(awk -F, -v k="$k" '$2 == k { print $4 }' "$WORK/runs.csv" | median)"
done
