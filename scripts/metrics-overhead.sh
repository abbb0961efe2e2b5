#!/usr/bin/env bash
# The acceptor thread's CPU per connection with --metrics scraped versus no metrics endpoint, in
# interleaved rounds of one run (runs drift; compare within a run). Each round starts a master
# (2 demo workers), drives it with wrk, a new connection per request, for DUR seconds; in "on"
# rounds a scraper fetches /metrics every SCRAPE seconds (Prometheus' default is 15 s: this is a
# deliberately hard case). CPU comes from /proc/PID/task/TID/stat of the thread named "acceptor"
# and /proc/PID/stat of the whole master; connections from `ctl status --json`.
#
#   cargo build --release && scripts/metrics-overhead.sh
#   ROUNDS=5 DUR=5 CONNS=32 SCRAPE=0.1 scripts/metrics-overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/rcluster-lb}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
CONNS=${CONNS:-32}
SCRAPE=${SCRAPE:-0.1}
TCK=$(getconf CLK_TCK)
command -v wrk >/dev/null || { echo "needs wrk" >&2; exit 2; }
[ -x "$BIN" ] || { echo "no $BIN (cargo build --release)" >&2; exit 2; }

ticks() { # utime+stime of a stat file
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "$1"
}

round() {
  local mode=$1 dir pid port maddr tid a0 a1 m0 m1 c0 c1 scraper=""
  dir=$(mktemp -d)
  local args=(-l 127.0.0.1:0 -w 2 --control "$dir/c.sock")
  [ "$mode" = on ] && args+=(--metrics 127.0.0.1:0)
  "$BIN" "${args[@]}" 2>"$dir/log" &
  pid=$!
  for _ in $(seq 1 300); do grep -q "workers ready" "$dir/log" && break; sleep 0.05; done
  port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
  tid=""
  for t in /proc/$pid/task/*; do
    [ "$(cat "$t/comm")" = acceptor ] && tid=${t##*/}
  done
  accepts() { "$BIN" ctl --control "$dir/c.sock" status --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["acceptor"]["accepts"])'; }
  c0=$(accepts); a0=$(ticks /proc/$pid/task/$tid/stat); m0=$(ticks /proc/$pid/stat)
  if [ "$mode" = on ]; then
    maddr=$(grep -o 'http://[0-9.:]*/metrics' "$dir/log" | head -1)
    (while :; do curl -s "$maddr" >/dev/null; sleep "$SCRAPE"; done) &
    scraper=$!
  fi
  wrk -t2 -c"$CONNS" -d"${DUR}s" -H 'Connection: close' "http://127.0.0.1:$port/" >"$dir/wrk"
  [ -n "$scraper" ] && kill "$scraper" && wait "$scraper" 2>/dev/null || true
  a1=$(ticks /proc/$pid/task/$tid/stat); m1=$(ticks /proc/$pid/stat); c1=$(accepts)
  "$BIN" ctl --control "$dir/c.sock" stop >/dev/null
  wait "$pid" || true
  python3 - "$mode" "$a0" "$a1" "$m0" "$m1" "$c0" "$c1" "$TCK" <<'EOF'
import sys
mode, a0, a1, m0, m1, c0, c1, tck = sys.argv[1:]
conns = int(c1) - int(c0)
us = lambda t0, t1: (int(t1) - int(t0)) / int(tck) * 1e6 / max(conns, 1)
print(f"{mode:3}  conns {conns:7d}  acceptor {us(a0, a1):6.2f} us/conn  master {us(m0, m1):6.2f} us/conn")
EOF
  rm -rf "$dir"
}

echo "metrics off/on, $ROUNDS rounds of ${DUR}s, wrk -c$CONNS, scrape every ${SCRAPE}s"
for _ in $(seq 1 "$ROUNDS"); do
  round off
  round on
done
