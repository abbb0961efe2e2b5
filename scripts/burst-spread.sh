#!/usr/bin/env bash
# How evenly long-lived connections opened in a burst end up across the workers: a client opens
# CONNS keep-alive connections one after another (each `connect` returns once the handshake is
# done, then the next starts: a connection pool filling, or wrk starting), then sends one
# request on each and counts the `X-Worker-Id` of the answers. The spread is the most minus the
# fewest connections per worker (0: an exact split). Each system gets a fresh master and ROUNDS
# bursts, half a second apart, with the connections of a burst closed before the next.
#
#   scripts/burst-spread.sh                         # node app; shared, steered and dispatch least-conn
#   APP=demo ROUNDS=10 CONNS=400 scripts/burst-spread.sh
#   GAP_MS=0.5 scripts/burst-spread.sh              # staggered: 0.5 ms between connects
#   SYSTEMS="shared|-p shared;rr|-p round-robin --steer kernel" scripts/burst-spread.sh
#
# SYSTEMS: `;`-separated `name|master arguments`. The benchmark's keep-alive scenario opens its
# connections 0.5 ms apart (GAP_MS=0.5); a burst (GAP_MS=0, the default) is what the README's
# "Kernel steering" section quotes. Needs python3 (and node for APP=node). Load goes to
# 127.0.0.1 only; every master started here is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

app_kind=${APP:-node}
rounds=${ROUNDS:-6}
conns=${CONNS:-200}
gap_ms=${GAP_MS:-0}
workers=${WORKERS:-2}
bin=target/release/rcluster-lb
out=${CARGO_TARGET_DIR:-target}/bench-results/burst-spread
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "burst-spread: ROUNDS must be a positive integer, not '$rounds'" >&2; exit 2; }
[[ "$conns" =~ ^[1-9][0-9]*$ ]] || { echo "burst-spread: CONNS must be a positive integer, not '$conns'" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "burst-spread: WORKERS must be a positive integer, not '$workers'" >&2; exit 2; }
[[ "$gap_ms" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "burst-spread: GAP_MS must be a number of milliseconds, not '$gap_ms'" >&2; exit 2; }
command -v python3 >/dev/null || { echo "burst-spread: python3 not found" >&2; exit 2; }
# shellcheck source=scripts/lib-master.sh
. scripts/lib-master.sh
app_server burst-spread "$app_kind"
server=("${SERVER[@]}")
IFS=';' read -r -a systems <<< "${SYSTEMS:-shared|-p shared;least-conn kernel|-p least-conn --steer kernel;least-conn dispatch|-p least-conn --steer dispatch}"
for entry in "${systems[@]}"; do
    [[ "$entry" == *"|"* ]] || { echo "burst-spread: SYSTEMS entries are name|arguments, not '$entry'" >&2; exit 2; }
done

mkdir -p "$out"
cargo build --release >&2

# One burst: CONNS connections, GAP_MS apart, one request each; prints the per-worker counts.
client=$out/burst.py
cat > "$client" <<'EOF'
import socket, sys, time
port, n, gap, workers = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1e3, int(sys.argv[4])
socks = []
try:
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        if gap:
            time.sleep(gap)
    counts = [0] * workers
    for s in socks:
        s.sendall(b"GET / HTTP/1.1\r\nHost: burst\r\n\r\n")
    for s in socks:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("burst-spread: a connection closed before its answer")
            head += chunk
        ids = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"x-worker-id:")]
        if not ids or not ids[0].isdigit() or int(ids[0]) >= workers:
            sys.exit("burst-spread: an answer without a usable X-Worker-Id")
        counts[int(ids[0])] += 1
    print(" ".join(map(str, counts)))
finally:
    for s in socks:
        s.close()
EOF

trap stop_master EXIT
printf '%s connections per burst, %s ms apart, %s workers, %s app, %s rounds per system\n\n' \
    "$conns" "$gap_ms" "$workers" "$app_kind" "$rounds"
printf '| system | per round (connections per worker) | spreads | median spread | worst |\n|---|---|---|---:|---:|\n'
for entry in "${systems[@]}"; do
    name=${entry%%|*}
    # shellcheck disable=SC2086
    start_master "$out/master.log" --workers "$workers" ${entry#*|} "${server[@]}"
    rows=()
    spreads=()
    for _ in $(seq "$rounds"); do
        counts=$(python3 "$client" "$MASTER_PORT" "$conns" "$gap_ms" "$workers")
        rows+=("${counts// //}")
        spreads+=("$(awk '{lo = hi = $1; for (i = 2; i <= NF; i++) { if ($i < lo) lo = $i; if ($i > hi) hi = $i } print hi - lo}' <<< "$counts")")
        sleep 0.5
    done
    stop_master
    sorted=$(printf '%s\n' "${spreads[@]}" | sort -n)
    median=$(printf '%s\n' "$sorted" | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
    worst=$(printf '%s\n' "$sorted" | tail -n1)
    printf '| %s | %s | %s | %s | %s |\n' "$name" "${rows[*]}" "${spreads[*]}" "$median" "$worst"
done
