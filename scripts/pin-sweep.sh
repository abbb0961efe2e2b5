#!/usr/bin/env bash
# Core-pinning sweep: runs the end-to-end churn and heavy-tailed scenarios (benches/e2e.rs,
# least-conn and round-robin with the demo worker) under several pin layouts for this host and
# prints the best one with its numbers.
#
#   scripts/pin-sweep.sh                 # 2 interleaved rounds per layout
#   RCLUSTER_BENCH_QUICK=1 scripts/pin-sweep.sh
#
# Layouts (n = CPUs this process may use, from `nproc`):
#   none             no pinning: the scheduler places workers and the acceptor
#   auto             --pin auto: one worker per physical core first, acceptor as `topology` plans
#   acceptor-own     n-1 workers on CPUs 0..n-2, the acceptor alone on the last CPU
#   acceptor-shared  n workers on every CPU, the acceptor sharing CPU 0 with worker 0
set -euo pipefail
cd "$(dirname "$0")/.."

n=$(nproc)
last=$((n - 1))
out_root="${CARGO_TARGET_DIR:-target}/bench-results/pin-sweep"
mkdir -p "$out_root"
# reuseport is in the set because the heavy scenarios measure capacity on it.
export RCLUSTER_BENCH_ONLY="${RCLUSTER_BENCH_ONLY:-least-conn,round-robin,reuseport}"
export RCLUSTER_BENCH_ROUNDS="${RCLUSTER_BENCH_ROUNDS:-2}"

cargo build --release --workspace
cargo bench --bench e2e --no-run

run_layout() {
    local name=$1
    shift
    echo "== layout $name: $*"
    env "$@" RCLUSTER_BENCH_OUT="$out_root/$name" cargo bench --bench e2e >"$out_root/$name.log" 2>&1 ||
        echo "   (layout $name failed; see $out_root/$name.log)"
}

run_layout none RCLUSTER_BENCH_WORKERS="$n"
run_layout auto RCLUSTER_BENCH_WORKERS="$n" RCLUSTER_BENCH_PIN=auto
if [ "$n" -ge 2 ]; then
    run_layout acceptor-own RCLUSTER_BENCH_WORKERS="$last" RCLUSTER_BENCH_PIN="0-$((last - 1))" \
        RCLUSTER_BENCH_ACCEPTOR_CPU="$last"
fi
run_layout acceptor-shared RCLUSTER_BENCH_WORKERS="$n" RCLUSTER_BENCH_PIN="0-$last" \
    RCLUSTER_BENCH_ACCEPTOR_CPU=0

python3 - "$out_root" <<'PY'
import csv, os, statistics, sys
root = sys.argv[1]
rows = []
for layout in ["none", "auto", "acceptor-own", "acceptor-shared"]:
    path = os.path.join(root, layout, "e2e-runs.csv")
    if not os.path.exists(path):
        continue
    runs = [r for r in csv.DictReader(open(path)) if r["ok"] == "true"]
    def med(system, scenario, field):
        vals = [float(r[field]) for r in runs
                if r["system"] == system and r["scenario"] == scenario and r[field]]
        return statistics.median(vals) if vals else float("nan")
    for system in ["least-conn", "round-robin"]:
        rows.append((layout, system,
                     med(system, "churn", "throughput_per_s"),
                     med(system, "heavy75", "p99_us") / 1000,
                     med(system, "churn", "master_cpu_s_per_1k_conn")))
print()
print("| layout | policy | churn conn/s | p99 at 75 % (ms) | master CPU s/1k conn |")
print("|---|---|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.1f} | {r[4]:.4f} |")
lc = [r for r in rows if r[1] == "least-conn" and r[2] == r[2]]
if lc:
    # Best: highest connection rate, unless its p99 is more than 10 % worse than the best p99.
    best_p99 = min(r[3] for r in lc)
    eligible = [r for r in lc if r[3] <= best_p99 * 1.10] or lc
    best = max(eligible, key=lambda r: r[2])
    print()
    print(f"best layout for this host (least-conn): {best[0]}: {best[2]:.0f} conn/s, "
          f"p99 at 75 % {best[3]:.1f} ms")
PY
