#!/usr/bin/env bash
# Kernel-steered least-conn against the kernel's shared queue and dispatch least-conn with every
# instance running at once: measurement windows alternate between the instances in balanced
# order (A B C, then C B A, ...), so the slow drift of a shared VM's speed, which separate
# rounds with fresh instances fold into the comparison, falls on every system alike. Each pair
# of windows gives one ratio to shared; the summary is the median ratio, how many pairs favour
# each side, and a two-sided sign-test p-value for "no difference"; the errors column counts
# failed requests (a window that measured nothing counts as one).
#
#   scripts/paired-bench.sh                          # node app, 10 pairs
#   APP=demo PAIRS=6 PERCENTS="50 90" scripts/paired-bench.sh
#   RATES="1300 1950" scripts/paired-bench.sh        # absolute rates, no capacity probe
#   SYSTEMS="shared||-p shared;before|/tmp/old-rcluster-lb|-p least-conn;after||-p least-conn" \
#       scripts/paired-bench.sh                      # other systems, or two builds side by side
#
# SYSTEMS: `;`-separated `name|binary|arguments`, the first the baseline of the ratios; an empty
# binary is the one built here. Default: `shared`, kernel-steered least-conn and dispatch
# least-conn, all of this build.
#
# Scenarios, per pair: connection churn measured by wrk (`-t1 -c32`, `Connection: close`,
# CHURN_SECONDS per window) and, right before or after it on the same instance, by the load
# generator (the same closed loop of 32 clients; the summary checks that both clients see the
# same ratio to the baseline, within 10 %), and the heavy-tailed CPU-bound mix (98 % of requests spin 200 µs,
# 2 % spin 20 ms), open loop, a new connection per request, HEAVY_SECONDS per window, p99 from
# the load generator, at each of PERCENTS (default 50 75 90) of the mix's capacity, with the
# workers' own CPU (utime + stime of the master's child processes, from /proc) per completed
# request in that window. Optionally
# the same mix from wrk (a Lua script: every 50th request spins 20 ms, `Connection: close`),
# closed loop at each of WRK_HEAVY_CONNS connections (default: none), HEAVY_SECONDS per window,
# p99 from `wrk --latency`. A closed loop holds a fixed number of requests in flight, so the
# queues that make the open loop's tail never form: at 3 to 16 connections its p99 is the long
# request itself (20.5-25.6 ms) for shared, steered and dispatch alike (BENCHMARKS.md), and it
# cannot tell their orders apart. The independent cross-check of the open loop's tails is oha
# (`cargo install --locked oha`; OHA names the binary, default the one on PATH; skipped with a
# note without it): the same mix (a URL file, 49 requests of 200 us to 1 of 20 ms, drawn by oha),
# a new connection per request, at the same rates, `--latency-correction` (latency from each
# request's intended start), p99 from its JSON report. oha costs more CPU per request than the
# load generator (about 135 us against 60 on this VM), which it takes from the servers, so its
# tails are higher at the same rate; what must agree is how each system compares with the
# baseline. Capacity is
# measured once, after the warm-up: a closed loop of 8 clients per worker for CAPACITY_SECONDS
# (default 4) on `shared`, the baseline. RATES (absolute req/s) replaces the probe. APP=node runs the end-to-end
# benchmark's node app (benches/node_app.js, unmodified node through the preload shim; needs
# node); APP=demo the built-in demo worker.
#
# Needs wrk (apt-get install wrk). Load goes to 127.0.0.1 only; every window is bounded in time
# and every master started here is stopped by pid. Results: $out/windows.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

app_kind=${APP:-node}
pairs=${PAIRS:-10}
rates=${RATES:-}
percents=${PERCENTS:-50 75 90}
capacity_secs=${CAPACITY_SECONDS:-4}
churn_secs=${CHURN_SECONDS:-2}
heavy_secs=${HEAVY_SECONDS:-4}
wrk_conns=${WRK_HEAVY_CONNS:-}
oha=${OHA:-$(command -v oha || true)}
workers=${WORKERS:-2}
bin=target/release/rcluster-lb
load=target/release/examples/open_loop
out=${CARGO_TARGET_DIR:-target}/bench-results/paired
command -v wrk >/dev/null || { echo "paired-bench: wrk not found (apt-get install wrk)" >&2; exit 2; }
[[ "$pairs" =~ ^[1-9][0-9]*$ ]] || { echo "paired-bench: PAIRS must be a positive integer, not '$pairs'" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "paired-bench: WORKERS must be a positive integer, not '$workers'" >&2; exit 2; }
for c in $wrk_conns; do
    [[ "$c" =~ ^[1-9][0-9]*$ ]] ||
        { echo "paired-bench: WRK_HEAVY_CONNS must be positive integers, not '$c'" >&2; exit 2; }
done
for r in $rates; do
    [[ "$r" =~ ^[0-9]+([.][0-9]+)?$ && ! "$r" =~ ^0+([.]0+)?$ ]] ||
        { echo "paired-bench: RATES must be positive numbers (req/s), not '$r'" >&2; exit 2; }
done
if [[ -z "$rates" ]]; then
    [[ -n "${percents// /}" ]] || { echo "paired-bench: PERCENTS is empty" >&2; exit 2; }
    for p in $percents; do
        [[ "$p" =~ ^[1-9][0-9]?$|^100$ ]] ||
            { echo "paired-bench: PERCENTS must be whole percents from 1 to 100, not '$p'" >&2; exit 2; }
    done
    [[ "$capacity_secs" =~ ^[1-9][0-9]*$ ]] ||
        { echo "paired-bench: CAPACITY_SECONDS must be a positive integer, not '$capacity_secs'" >&2; exit 2; }
fi
# shellcheck source=scripts/lib-master.sh
. scripts/lib-master.sh
app_server paired-bench "$app_kind"
server=("${SERVER[@]}")

mkdir -p "$out"
cargo build --release --workspace >&2
cargo build --release -p rcluster-loadgen --example open_loop >&2

# name|binary|arguments; the first is the baseline of the ratios.
IFS=';' read -r -a systems <<< "${SYSTEMS:-shared||-p shared;least-conn kernel||-p least-conn --steer kernel;least-conn dispatch||-p least-conn --steer dispatch}"
n=${#systems[@]}
built=$bin
for entry in "${systems[@]}"; do
    [[ "$entry" == *"|"*"|"* ]] ||
        { echo "paired-bench: SYSTEMS entries are name|binary|arguments, not '$entry'" >&2; exit 2; }
    rest=${entry#*|}
    [[ -z "${rest%%|*}" || -x "${rest%%|*}" ]] ||
        { echo "paired-bench: SYSTEMS: '${rest%%|*}' is not an executable" >&2; exit 2; }
done
pids=()
ports=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

for k in $(seq 0 $((n - 1))); do
    entry=${systems[$k]}
    rest=${entry#*|}
    bin=${rest%%|*}
    bin=${bin:-$built}
    # shellcheck disable=SC2086
    start_master "$out/master-$k.log" --workers "$workers" ${rest#*|} "${server[@]}"
    bin=$built
    pids+=("$MASTER_PID")
    ports+=("$MASTER_PORT")
    MASTER_PID= # stopped by stop_all, with the others
done
for k in $(seq 0 $((n - 1))); do
    if [[ "${systems[$k]}" == *"--steer kernel"* ]] && ! grep -q "steering: kernel" "$out/master-$k.log"; then
        echo "paired-bench: warning: ${systems[$k]%%|*} did not steer in the kernel (see $out/master-$k.log)" >&2
    fi
done

churn() { # port -> conn/s
    wrk -t1 -c32 -d"${churn_secs}s" -H 'Connection: close' "http://127.0.0.1:$1/" |
        awk '/Requests\/sec/ {print $2}'
}
churn_lg() { # port -> conn/s: the same closed loop (32 clients, a new connection per request,
    # the trivial request) from the load generator, to check that both clients see the same
    # comparison between systems
    "$load" "127.0.0.1:$1" closed:32 "$churn_secs" "" |
        awk '{for (i = 1; i < NF; i++) if ($i == "achieved_per_s") print $(i + 1)}'
}
lua="$out/heavy-mix.lua"
cat >"$lua" <<'LUA'
-- The heavy mix for wrk: every 50th request (2 %) spins 20 ms, the rest 200 us, each on a new
-- connection, as in the load generator's heavy mix.
local n = 0
request = function()
    n = n + 1
    local us = (n % 50 == 0) and 20000 or 200
    return wrk.format("GET", "/?us=" .. us, { ["Connection"] = "close" })
end
LUA
wrk_heavy() { # port connections -> "p99_ms,errors"
    wrk -t1 -c"$2" -d"${heavy_secs}s" --latency -s "$lua" "http://127.0.0.1:$1/" |
        awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
             $1 == "99%" { p = ms($2) }
             /Socket errors/ { gsub(",", ""); e += $4 + $6 + $8 + $10 }
             /Non-2xx/ { e += $NF }
             END { if (p == "") print "nan,1"; else print p "," e + 0 }'
}
oha_heavy() { # port rate -> "p99_ms,errors"
    local urls="$out/heavy-mix-urls-$1"
    if [[ ! -s "$urls" ]]; then
        for _ in $(seq 49); do echo "http://127.0.0.1:$1/?us=200"; done >"$urls"
        echo "http://127.0.0.1:$1/?us=20000" >>"$urls"
    fi
    # Requests still in flight when the window ends are "aborted due to deadline": not errors.
    "$oha" -z "${heavy_secs}s" -q "$2" -c 256 --latency-correction --disable-keepalive \
        --urls-from-file --no-tui --output-format json "$urls" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p99 = (d.get("latencyPercentiles") or {}).get("p99")
errors = sum(v for k, v in (d.get("statusCodeDistribution") or {}).items() if k != "200")
errors += sum(v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline")
print("nan,1" if p99 is None else f"{p99 * 1000:.2f},{errors}")'
}
clk_tck=$(getconf CLK_TCK)
workers_ticks() { # master pid -> utime + stime of its child processes (the workers), in ticks
    local total=0 c t
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        # Fields 14 and 15, counted after the command name's closing parenthesis.
        t=$(sed 's/.*) //' /proc/"$c"/stat 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
heavy_window() { # k rate -> appends this pair's heavy-mix p99 row and workers' CPU row for instance k
    local k=$1 rate=$2 label=$3 before after line
    before=$(workers_ticks "${pids[$k]}")
    line=$("$load" "127.0.0.1:${ports[$k]}" "$rate" "$heavy_secs" || true)
    after=$(workers_ticks "${pids[$k]}")
    echo "$pair,heavy p99 ms @ $rate/s$label,${systems[$k]%%|*},$(awk \
        '{for (i = 1; i < NF; i++) { if ($i == "p99_ms") p = $(i + 1); if ($i == "errors") e = $(i + 1) }
          print (p == "" ? "nan" : p) "," (e == "" ? 1 : e)}' <<<"${line:-x}")" >>"$csv"
    # The workers' own CPU per completed request: what each mode costs the servers.
    echo "$pair,workers' CPU µs per request @ $rate/s$label,${systems[$k]%%|*},$(awk \
        -v t=$((after - before)) -v hz="$clk_tck" \
        '{for (i = 1; i < NF; i++) if ($i == "completed") n = $(i + 1)
          if (n > 0) printf "%.1f,0", t * 1e6 / hz / n; else print "nan,1"}' <<<"${line:-x}")" >>"$csv"
}

# Unrecorded warm-up of every instance (a fresh node process is slow until its code is
# compiled): churn, then the mix in a closed loop.
clients=$((8 * workers))
for k in $(seq 0 $((n - 1))); do
    churn "${ports[$k]}" >/dev/null
    "$load" "127.0.0.1:${ports[$k]}" "closed:$clients" 2 >/dev/null
done

# The heavy mix's rates: PERCENTS of the capacity measured on the baseline, unless RATES.
labels=()
if [[ -z "$rates" ]]; then
    capacity=$("$load" "127.0.0.1:${ports[0]}" "closed:$clients" "$capacity_secs" |
        awk '{for (i = 1; i < NF; i++) if ($i == "achieved_per_s") print $(i + 1)}')
    if ! awk -v c="${capacity:-0}" 'BEGIN { exit !(c > 0) }'; then
        echo "paired-bench: the capacity probe on ${systems[0]%%|*} measured nothing" >&2
        exit 1
    fi
    for p in $percents; do
        rates+="$(awk -v c="$capacity" -v p="$p" 'BEGIN { printf "%.0f", c * p / 100 }') "
        labels+=(" ($p %)")
    done
    about="capacity of the heavy mix: $capacity req/s (closed loop, $clients clients, ${capacity_secs} s on ${systems[0]%%|*}); rates ${rates% } req/s at ${percents} %"
else
    for _ in $rates; do labels+=(""); done
    about="rates ${rates} req/s (RATES, no capacity probe)"
fi
echo "paired-bench: $about" >&2
[[ -n "$oha" ]] || echo "paired-bench: note: oha not found (cargo install --locked oha): no oha cross-check of the tails" >&2

csv="$out/windows.csv"
echo "pair,scenario,system,value,errors" >"$csv"
at_each_rate() { # scenario measure: one window per rate and instance, in this pair's $order
    local i=0 rate k v
    for rate in $rates; do
        for k in $order; do
            v=$("$2" "${ports[$k]}" "$rate")
            echo "$pair,$1 @ $rate/s${labels[$i]},${systems[$k]%%|*},${v:-nan,1}" >>"$csv"
        done
        i=$((i + 1))
    done
}
for pair in $(seq "$pairs"); do
    if ((pair % 2)); then order=$(seq 0 $((n - 1))); else order=$(seq $((n - 1)) -1 0); fi
    for k in $order; do
        # wrk and the load generator back to back on each instance, which goes first
        # alternating by pair.
        for tool in $( ((pair % 2)) && echo "churn churn_lg" || echo "churn_lg churn"); do
            v=$("$tool" "${ports[$k]}")
            name="churn conn/s"
            [[ $tool == churn_lg ]] && name="churn conn/s by the load generator"
            echo "$pair,$name,${systems[$k]%%|*},${v:-0},0" >>"$csv"
        done
    done
    i=0
    for rate in $rates; do
        for k in $order; do
            heavy_window "$k" "$rate" "${labels[$i]}"
        done
        i=$((i + 1))
    done
    if [[ -n "$oha" ]]; then
        at_each_rate "heavy p99 ms by oha" oha_heavy
    fi
    for c in $wrk_conns; do
        for k in $order; do
            v=$(wrk_heavy "${ports[$k]}" "$c")
            echo "$pair,heavy p99 ms by wrk (closed loop $c conns),${systems[$k]%%|*},${v:-nan,1}" >>"$csv"
        done
    done
    echo "pair $pair of $pairs done" >&2
done

python3 - "$csv" "$app_kind" "$about" <<'PY'
import csv, math, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
vals = defaultdict(dict)
errors = defaultdict(int)
for r in rows:
    vals[(r["scenario"], r["system"])][r["pair"]] = float(r["value"] or "nan")
    errors[(r["scenario"], r["system"])] += int(r["errors"] or 1)
scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
systems = list(dict.fromkeys(r["system"] for r in rows))
base = systems[0]

def sign_p(wins, losses):
    """Two-sided sign test: the chance of a split at least this uneven if neither side is better."""
    m = wins + losses
    if m == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)

print(f"App: {sys.argv[2]}; {sys.argv[3]}. Ratios are per pair of windows, this system ÷ {base}.")
print()
print(f"| scenario | system | median value | median ratio to {base} | pairs better / worse | sign-test p | errors | per pair |")
print("|---|---|---:|---:|---:|---:|---:|---|")
for sc in scenarios:
    higher_better = sc.startswith("churn")
    for s in systems:
        runs = vals[(sc, s)]
        b = vals[(sc, base)]
        ok = [v for v in runs.values() if not math.isnan(v)]
        med = f"{statistics.median(ok):.1f}" if ok else "—"
        err = errors[(sc, s)]
        if s == base:
            print(f"| {sc} | {s} | {med} | 1.00× | — | — | {err} | |")
            continue
        ratios = [runs[k] / b[k] for k in runs if k in b and b[k] > 0 and not math.isnan(runs[k])]
        if not ratios:
            print(f"| {sc} | {s} | {med} | — | — | — | {err} | no pair measured both |")
            continue
        better = sum(1 for x in ratios if (x > 1) == higher_better and x != 1)
        worse = sum(1 for x in ratios if (x < 1) == higher_better and x != 1)
        per = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"| {sc} | {s} | {med} | {statistics.median(ratios):.3f}× | {better} / {worse} "
              f"| {sign_p(better, worse):.3f} | {err} | {per} |")

# The cross-check: both clients must see the same comparison with the baseline.
def median_ratio(sc, s):
    runs, b = vals[(sc, s)], vals[(sc, base)]
    r = [runs[k] / b[k] for k in runs if k in b and b[k] > 0 and runs[k] > 0]
    return statistics.median(r) if r else None
if any(sc == "churn conn/s by the load generator" for sc in scenarios):
    print()
    for s in systems[1:]:
        w, g = median_ratio("churn conn/s", s), median_ratio("churn conn/s by the load generator", s)
        if w and g:
            verdict = "agree" if abs(g / w - 1) <= 0.10 else "DISAGREE"
            print(f"- churn, {s} ÷ {base}: {g:.3f}× by the load generator, {w:.3f}× by wrk: "
                  f"{verdict} within 10 % ({g / w:.3f})")
PY
