#!/usr/bin/env bash
# System calls per request of the master and its workers, by mode: each system runs alone, gets
# a wrk warm-up, then `perf trace -s` follows the master and every worker through one more wrk
# churn window (`-t1 -c32`, `Connection: close`, SECONDS long). Counts are divided by the
# requests wrk completed in that window, so they do not depend on how fast the VM was (tracing
# slows every process; the rates printed are not throughput figures).
#
#   scripts/syscalls-per-request.sh                  # node app, shared / kernel / dispatch
#   APP=demo SECONDS_PER_RUN=2 scripts/syscalls-per-request.sh
#
# APP=node runs the end-to-end benchmark's node app (benches/node_app.js through the preload
# shim; needs node); APP=demo the built-in demo worker. Needs wrk and perf (apt-get install wrk
# linux-perf) and the right to trace (root, or kernel.perf_event_paranoid <= -1). Load goes to
# 127.0.0.1 only; every master started here is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

app_kind=${APP:-node}
secs=${SECONDS_PER_RUN:-3}
bin=target/release/rcluster-lb
out=${CARGO_TARGET_DIR:-target}/bench-results/syscalls
for tool in wrk perf; do
    command -v "$tool" >/dev/null ||
        { echo "syscalls-per-request: $tool not found (apt-get install wrk linux-perf)" >&2; exit 2; }
done
[[ "$secs" =~ ^[1-9][0-9]*$ ]] ||
    { echo "syscalls-per-request: SECONDS_PER_RUN must be a positive integer, not '$secs'" >&2; exit 2; }
# shellcheck source=scripts/lib-master.sh
. scripts/lib-master.sh
app_server syscalls-per-request "$app_kind"
server=("${SERVER[@]}")

mkdir -p "$out"
cargo build --release -p rcluster-lb >&2

# name|arguments
systems=(
    "shared|-p shared"
    "least-conn kernel|-p least-conn --steer kernel"
    "least-conn dispatch|-p least-conn --steer dispatch"
)

trap stop_master EXIT

churn() { # port seconds -> wrk's output
    wrk -t1 -c32 -d"${2}s" -H 'Connection: close' "http://127.0.0.1:$1/"
}

tables=()
for entry in "${systems[@]}"; do
    name=${entry%%|*}
    file=$out/${name// /-}
    # shellcheck disable=SC2086 # the arguments are words
    start_master "$file.log" --workers 2 ${entry#*|} "${server[@]}"
    churn "$MASTER_PORT" 2 >/dev/null
    pids=$(
        echo "$MASTER_PID"
        pgrep -P "$MASTER_PID" || true
    )
    perf trace -s -p "$(echo "$pids" | paste -sd,)" -o "$file.trace" -- sleep $((secs + 1)) &
    tracer=$!
    sleep 0.5
    churn "$MASTER_PORT" "$secs" >"$file.wrk"
    wait "$tracer"
    stop_master
    requests=$(awk '/requests in/ {print $1}' "$file.wrk")
    tables+=("$name|$requests|$file.trace")
done

python3 - "${tables[@]}" <<'EOF'
import sys
from collections import defaultdict

systems = []
for arg in sys.argv[1:]:
    name, requests, path = arg.split("|")
    counts = defaultdict(int)
    for line in open(path):
        parts = line.split()
        # perf trace -s rows: syscall, calls, errors, total ms, ...
        if len(parts) >= 3 and parts[0].isidentifier() and parts[1].isdigit():
            counts[parts[0]] += int(parts[1])
    systems.append((name, int(requests or 0), counts))

calls = sorted({c for _, _, counts in systems for c in counts},
               key=lambda c: -max(counts[c] / max(r, 1) for _, r, counts in systems))
print("| system call | " + " | ".join(name for name, _, _ in systems) + " |")
print("|---|" + "---:|" * len(systems))
print("| (requests traced) | " + " | ".join(str(r) for _, r, _ in systems) + " |")
for c in calls:
    cells = [counts[c] / r if r else float("nan") for _, r, counts in systems]
    if max(cells) < 0.01:
        continue
    print(f"| {c} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
totals = [sum(counts.values()) / r if r else float("nan") for _, r, counts in systems]
print("| all | " + " | ".join(f"{v:.2f}" for v in totals) + " |")
EOF
