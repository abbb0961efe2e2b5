#!/usr/bin/env bash
# Builds the release binary (and the preload shim beside it), runs the end-to-end benchmark
# (benches/e2e.rs: every policy with the demo worker; with node on PATH, Node's cluster module
# and rcluster-lb running the same node app; with wrk on PATH, a wrk cross-check of the node
# group's churn), plots the run (scripts/bench_report.py) and rewrites the generated section
# of BENCHMARKS.md.
#
#   scripts/bench.sh                          # full run: 3 interleaved rounds, about 13 min on 2 cores
#   RCLUSTER_BENCH_QUICK=1 scripts/bench.sh   # smoke run, about 2 minutes
#
# A full run of every system publishes: it writes docs/bench/ (SVG plots and the run's CSV)
# and the generated section of BENCHMARKS.md. A quick or partial run (RCLUSTER_BENCH_QUICK,
# RCLUSTER_BENCH_ONLY) plots into target/bench-results/plots/ and leaves both alone;
# RCLUSTER_BENCH_PUBLISH=1 or 0 overrides that.
#
# Other knobs (see benches/e2e.rs): RCLUSTER_BENCH_WORKERS, RCLUSTER_BENCH_ROUNDS,
# RCLUSTER_BENCH_PIN, RCLUSTER_BENCH_ONLY, RCLUSTER_BENCH_BIN, RCLUSTER_BENCH_WRK.
# RCLUSTER_BENCH_AUTOGROUP_NICE=-10: run the benchmark at that autogroup priority (root; for a
# host shared with builds, as BENCHMARKS.md's run was).
# Load goes to 127.0.0.1 only; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
results="${RCLUSTER_BENCH_OUT:-${target_dir}/bench-results}"
export RCLUSTER_BENCH_OUT="$results"
export RCLUSTER_BENCH_QUICK="${RCLUSTER_BENCH_QUICK:-0}"

if [ "${RCLUSTER_BENCH_QUICK}" != 0 ] || [ -n "${RCLUSTER_BENCH_ONLY:-}" ]; then
    publish="${RCLUSTER_BENCH_PUBLISH:-0}"
else
    publish="${RCLUSTER_BENCH_PUBLISH:-1}"
fi

command -v node >/dev/null || echo "note: node is not on PATH: no node group (apt-get install nodejs)"
if [ "${RCLUSTER_BENCH_WRK:-}" != 0 ] && ! command -v wrk >/dev/null && [ -z "${RCLUSTER_BENCH_WRK:-}" ]; then
    echo "note: wrk is not on PATH: no wrk cross-check (apt-get install wrk)"
fi

# --workspace: the shim crate's cdylib must sit next to the binary for `-- node app.js` runs.
cargo build --release --workspace
if [ -n "${RCLUSTER_BENCH_AUTOGROUP_NICE:-}" ]; then
    # On a host shared with other work: run the benchmark in a session of its own whose
    # scheduler autogroup gets this nice value (sched(7), "The autogroup feature"; a plain
    # `nice` only weighs processes within one autogroup). Negative values need root.
    setsid --wait bash -c 'echo "$1" > /proc/self/autogroup && exec cargo bench --bench e2e' \
        bench "$RCLUSTER_BENCH_AUTOGROUP_NICE"
else
    cargo bench --bench e2e
fi

if ! command -v python3 >/dev/null; then
    echo "python3 is not on PATH: no plots, BENCHMARKS.md not regenerated" >&2
    exit 1
fi
if [ "$publish" = 1 ]; then
    python3 scripts/bench_report.py --csv "$results/e2e-runs.csv" --md "$results/e2e.md" \
        --out docs/bench --benchmarks BENCHMARKS.md
else
    python3 scripts/bench_report.py --csv "$results/e2e-runs.csv" --out "$results/plots"
fi

echo
echo "tables:        $results/e2e.md"
echo "raw per run:   $results/e2e-runs.csv"
if [ "$publish" = 1 ]; then
    echo "published:     BENCHMARKS.md (generated section), docs/bench/*.svg, docs/bench/e2e-runs.csv"
else
    echo "plots:         $results/plots/*.svg (BENCHMARKS.md left alone: quick or partial run)"
fi
