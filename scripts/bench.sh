#!/usr/bin/env bash
# Builds the release binary (and the preload shim beside it) and runs the end-to-end benchmark
# (benches/e2e.rs): every policy, and Node's cluster module when node is on PATH.
#
#   scripts/bench.sh                          # full suite: 3 interleaved rounds, < 15 min on 2 cores
#   RCLUSTER_BENCH_QUICK=1 scripts/bench.sh   # smoke run, about a minute
#
# Other knobs (see benches/e2e.rs): RCLUSTER_BENCH_WORKERS, RCLUSTER_BENCH_ROUNDS,
# RCLUSTER_BENCH_PIN, RCLUSTER_BENCH_ONLY, RCLUSTER_BENCH_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
export RCLUSTER_BENCH_QUICK="${RCLUSTER_BENCH_QUICK:-0}"

# --workspace: the shim crate's cdylib must sit next to the binary for `-- node app.js` runs.
cargo build --release --workspace
cargo bench --bench e2e

echo
echo "tables:        ${target_dir}/bench-results/e2e.md"
echo "raw per run:   ${target_dir}/bench-results/e2e-runs.csv"
