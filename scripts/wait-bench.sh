#!/usr/bin/env bash
# Kernel steering with servers that wait in select() or poll() instead of epoll: the heavy-tailed
# CPU-bound mix (98 % of requests spin 200 µs, 2 % spin 20 ms), open loop, a new connection per
# request, against tests/fixtures/wait_server.py (single-threaded, a non-blocking listener,
# accepts until EAGAIN, as gunicorn's sync worker does) through the preload shim. Systems:
# the kernel's shared queue, dispatch least-conn, kernel-steered least-conn; interleaved rounds
# (the order rotated each round), p99 per run and the median of per-round ratios to shared.
#
#   scripts/wait-bench.sh                          # select, 5 rounds, 1200 1600 2000 req/s
#   WAIT=poll ROUNDS=3 RATES="1600" scripts/wait-bench.sh
#
# RATES are absolute (req/s): on this project's 2-CPU VM the two python workers serve the mix at
# about 2,300 req/s. Needs python3. Load goes to 127.0.0.1 only; every run is bounded in time
# and every master started here is stopped by pid. Results: $out/runs.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_call=${WAIT:-select}
rounds=${ROUNDS:-5}
rates=${RATES:-1200 1600 2000}
secs=${SECONDS_PER_RUN:-5}
workers=${WORKERS:-2}
bin=target/release/rcluster-lb
load=target/release/examples/open_loop
out=${CARGO_TARGET_DIR:-target}/bench-results/wait
app=tests/fixtures/wait_server.py
case $wait_call in select | poll) ;; *)
    echo "wait-bench: WAIT must be select or poll, not '$wait_call'" >&2
    exit 2
    ;;
esac
command -v python3 >/dev/null || { echo "wait-bench: python3 not found" >&2; exit 2; }
mkdir -p "$out"
cargo build --release --workspace >&2
cargo build --release -p rcluster-loadgen --example open_loop >&2

# name|arguments
systems=(
    "shared|-p shared"
    "least-conn dispatch|-p least-conn --steer dispatch"
    "least-conn kernel|-p least-conn --steer kernel"
)

# shellcheck source=scripts/lib-master.sh
. scripts/lib-master.sh
trap stop_master EXIT

run_one() { # args rate -> the load generator's line in $out/line
    local args=$1 rate=$2
    # shellcheck disable=SC2086
    start_master "$out/master.log" --workers "$workers" $args -- python3 "$app" "$wait_call"
    "$load" "127.0.0.1:$MASTER_PORT" 300 1 >/dev/null # warm-up
    "$load" "127.0.0.1:$MASTER_PORT" "$rate" "$secs" >"$out/line"
    stop_master
}

field() { awk -v k="$1" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}' "$out/line"; }

csv="$out/runs.csv"
echo "round,wait,system,rate,achieved_per_s,p50_ms,p90_ms,p99_ms,p999_ms,errors" >"$csv"
n=${#systems[@]}
for round in $(seq "$rounds"); do
    for rate in $rates; do
        for k in $(seq 0 $((n - 1))); do
            entry=${systems[$(((k + round) % n))]}
            name=${entry%%|*}
            run_one "${entry#*|}" "$rate"
            echo "$round,$wait_call,$name,$rate,$(field achieved_per_s),$(field p50_ms),$(field p90_ms),$(field p99_ms),$(field p999_ms),$(field errors)" >>"$csv"
            echo "round $round $wait_call $name @ $rate/s: $(cat "$out/line")" >&2
        done
    done
done

python3 - "$csv" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
p99 = defaultdict(dict)
for r in rows:
    p99[(r["rate"], r["system"])][r["round"]] = float(r["p99_ms"])
systems = list(dict.fromkeys(r["system"] for r in rows))
print(f"| {rows[0]['wait']} server: offered req/s | system | p99 ms (median) | p99 ÷ shared (median of rounds) | per round |")
print("|---:|---|---:|---:|---|")
for rate in dict.fromkeys(r["rate"] for r in rows):
    base = p99[(rate, "shared")]
    for s in systems:
        runs = p99[(rate, s)]
        ratios = [runs[k] / base[k] for k in runs if k in base and base[k] > 0]
        med = statistics.median(runs.values())
        rmed = statistics.median(ratios) if ratios else float("nan")
        per = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"| {rate} | {s} | {med:.1f} | {rmed:.2f}× | {per} |")
PY
