#!/usr/bin/env bash
# Kernel steering vs the kernel's shared queue vs dispatch least-conn, measured with wrk:
# connection churn (a new connection per request, `Connection: close`), the demo worker and the
# node app through the preload shim, interleaved rounds, medians; plain reuseport mode beside
# them. Also the steering program's own cost per connection, and plain reuseport mode's program's,
# from kernel.bpf_stats_enabled (needs root; the setting is restored).
#
#   scripts/steer-bench.sh                     # 5 rounds of 5 s per system
#   ROUNDS=3 SECONDS_PER_RUN=3 scripts/steer-bench.sh
#
# Needs: wrk (apt-get install wrk), node for the node rows (skipped without it). Traffic goes to
# 127.0.0.1 only; every master started here is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-5}
secs=${SECONDS_PER_RUN:-5}
workers=${WORKERS:-$(nproc)}
conns=${CONNS:-32}
bin=target/release/rcluster-lb
out=${CARGO_TARGET_DIR:-target}/bench-results/steer
mkdir -p "$out"
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 2; }
cargo build --release --workspace >&2

app="$out/app.js"
cat >"$app" <<'JS'
require('http').createServer((q, s) => s.end('ok\n')).listen(process.env.PORT)
JS

# name|arguments
systems=(
    "demo shared|-p shared"
    "demo reuseport|-p reuseport"
    "demo least-conn dispatch|-p least-conn --steer dispatch"
    "demo least-conn kernel|-p least-conn --steer kernel"
)
if command -v node >/dev/null; then
    systems+=(
        "node shared|-p shared --ready-delay 500ms -- node $app"
        "node reuseport|-p reuseport --ready-delay 500ms -- node $app"
        "node least-conn dispatch|-p least-conn --steer dispatch --ready-delay 500ms -- node $app"
        "node least-conn kernel|-p least-conn --steer kernel --ready-delay 500ms -- node $app"
    )
fi

# shellcheck source=scripts/lib-master.sh
. scripts/lib-master.sh

stats_before=$(cat /proc/sys/kernel/bpf_stats_enabled 2>/dev/null || echo 0)
restore() {
    stop_master
    echo "$stats_before" >/proc/sys/kernel/bpf_stats_enabled 2>/dev/null || true
}
trap restore EXIT
echo 1 >/proc/sys/kernel/bpf_stats_enabled 2>/dev/null || echo "note: cannot enable bpf_stats" >&2

run_one() { # name args -> conn/s into $out/rate; program ns/run into $out/prog-ns, $out/spread-ns
    local name=$1 args=$2 log="$out/master.log" rate
    # shellcheck disable=SC2086
    start_master "$log" --workers "$workers" $args
    rate=$(wrk -t1 -c"$conns" -d"${secs}s" -H 'Connection: close' \
        "http://127.0.0.1:$MASTER_PORT/" | awk '/Requests\/sec/ {print $2}')
    if [[ "$name" == *kernel* ]]; then
        kill -USR1 "$MASTER_PID"
        sleep 0.3
        grep -o '[0-9]* ns per run' "$log" | tail -1 | awk '{print $1}' >>"$out/prog-ns"
        grep -q 'steering: kernel' "$log" || echo "warning: $name did not steer in the kernel" >&2
    elif [[ "$name" == *reuseport* ]]; then
        kill -USR1 "$MASTER_PID"
        sleep 0.3
        grep -o 'reuseport program: .* ns per run' "$log" | tail -1 |
            awk '{print $(NF-3)}' >>"$out/spread-ns"
    fi
    stop_master
    echo "${rate:-0}" >"$out/rate"
}

: >"$out/runs.csv"
: >"$out/prog-ns"
: >"$out/spread-ns"
for r in $(seq "$rounds"); do
    n=${#systems[@]}
    for i in $(seq 0 $((n - 1))); do
        entry=${systems[$(((i + r) % n))]}
        name=${entry%%|*}
        args=${entry#*|}
        run_one "$name" "$args"
        echo "$r,$name,$(cat "$out/rate")" | tee -a "$out/runs.csv" >&2
    done
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "| system | conn/s (median of $rounds) | runs |"
echo "|---|---:|---|"
for entry in "${systems[@]}"; do
    name=${entry%%|*}
    runs=$(awk -F, -v n="$name" '$2==n {print $3}' "$out/runs.csv")
    echo "| $name | $(echo "$runs" | median) | $(echo "$runs" | tr '\n' ' ') |"
done
echo
echo "steering program: $(median <"$out/prog-ns") ns per run (median over the kernel runs; kernel.bpf_stats_enabled)"
echo "reuseport program: $(median <"$out/spread-ns") ns per run (median over the reuseport runs)"
