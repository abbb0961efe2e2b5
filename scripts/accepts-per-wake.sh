#!/usr/bin/env bash
# How an unmodified node worker takes connections from its listener: one worker's `accept4` and
# `epoll_pwait`/`epoll_wait` calls traced with strace while the heavy-tailed mix (98 % of requests
# spin 200 µs, 2 % spin 20 ms) runs open loop at RATE req/s, then, per return of the worker's
# wait, how many connections the following `accept4` calls took before the next wait, and how
# many of its `accept4` calls found nothing (`EAGAIN`: a peer took the connection first).
#
#   scripts/accepts-per-wake.sh                       # shared and steered least-conn, 2000 req/s
#   RATE=2400 SYSTEMS="-p shared" scripts/accepts-per-wake.sh
#
# A worker that takes at most one connection per pass of its loop and only when its loop comes
# round to the listener pulls from a shared queue first come, first served (BENCHMARKS.md,
# "Kernel steering"). SYSTEMS: `;`-separated master arguments, default `-p shared` and
# `-p least-conn --steer kernel`. Needs node and strace (apt-get install strace) and root or
# ptrace rights over the worker. Load goes to 127.0.0.1 only; every run is bounded in time and
# the master started for it is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

rate=${RATE:-2000}
secs=${TRACE_SECONDS:-3}
bin=target/release/rcluster-lb
load=target/release/examples/open_loop
app=benches/node_app.js
out=${CARGO_TARGET_DIR:-target}/bench-results/accepts-per-wake
[[ "$rate" =~ ^[1-9][0-9]*$ ]] || { echo "accepts-per-wake: RATE must be a positive integer, not '$rate'" >&2; exit 2; }
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "accepts-per-wake: TRACE_SECONDS must be a positive integer, not '$secs'" >&2; exit 2; }
for tool in node strace python3; do
    command -v "$tool" >/dev/null || { echo "accepts-per-wake: $tool not found" >&2; exit 2; }
done
IFS=';' read -r -a systems <<< "${SYSTEMS:--p shared;-p least-conn --steer kernel}"

cargo build --release --workspace --quiet
cargo build --release -p rcluster-loadgen --example open_loop --quiet
mkdir -p "$out"
# shellcheck source=lib-master.sh
. scripts/lib-master.sh
trap stop_master EXIT

for args in "${systems[@]}"; do
    name=$(echo "$args" | tr -c 'a-z0-9-' '_')
    # shellcheck disable=SC2086 # the master's arguments, split on purpose
    start_master "$out/$name.log" --workers 2 $args --ready-delay 500ms -- node "$app"
    worker=$(pgrep -P "$MASTER_PID" | head -1)
    "$load" "127.0.0.1:$MASTER_PORT" closed:16 2 >/dev/null # warm up node's JIT
    timeout "$((secs + 1))" strace -qq -p "$worker" -e trace=accept4,accept,epoll_wait,epoll_pwait \
        -o "$out/$name.trace" &
    tracer=$!
    sleep 0.5
    result=$("$load" "127.0.0.1:$MASTER_PORT" "$rate" "$secs")
    wait "$tracer" || true
    stop_master
    python3 - "$out/$name.trace" "$args" "$result" <<'EOF'
import collections, re, sys
path, args, result = sys.argv[1:4]
per_wake, current, eagain = collections.Counter(), None, 0
for line in open(path):
    if re.match(r"(\d+ )?epoll_p?wait\(", line) and "resumed" not in line:
        if current is not None:
            per_wake[current] += 1
        current = 0
    elif re.match(r"(\d+ )?accept4?\(", line):
        if re.search(r"= \d+\s*$", line) and current is not None:
            current += 1
        elif "EAGAIN" in line:
            eagain += 1
waits = sum(per_wake.values())
spread = ", ".join(f"{k}: {v}" for k, v in sorted(per_wake.items()))
print(f"{args}: {waits} waits traced; connections taken per wait {{{spread}}}; "
      f"accept4 EAGAIN {eagain}; load: {result}")
EOF
done
