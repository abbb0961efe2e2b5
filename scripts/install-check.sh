#!/usr/bin/env bash
# What a new user gets: `cargo install --path .` into a scratch root (a path with a space), then
# the installed binary alone runs unmodified servers from another working directory — python's
# http.server and a node app, each through the shim embedded in the binary — and the README's
# deployment commands work as written. Exits non-zero on the first failure.
#
#   scripts/install-check.sh            # uses target/install-check as cargo's target dir
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
scratch=$(mktemp -d)
root="$scratch/inst all"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT

echo "== cargo install --path . --root '$root'"
CARGO_TARGET_DIR="$repo/target/install-check" cargo install --locked --quiet --path . --root "$root"
bin="$root/bin/rcluster-lb"
ls -l "$bin"
if [ "$(ls "$root/bin")" != "rcluster-lb" ]; then
    echo "install-check: expected only bin/rcluster-lb, got: $(ls "$root/bin")" >&2
    exit 1
fi
if readelf -S "$bin" | grep -q '\.debug_info'; then
    echo "install-check: the installed binary carries debug info" >&2
    exit 1
fi

# A free port: bind 0 in python, read it back.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts the installed master in $1 (working directory) with the rest as arguments, waits for
# "workers ready" in its log, and leaves its pid in $master.
start() {
    local dir=$1; shift
    local log="$scratch/master.$RANDOM.log"
    (cd "$dir" && exec "$bin" "$@") 2>"$log" &
    master=$!
    pids+=("$master")
    for _ in $(seq 1 300); do
        grep -q "workers ready" "$log" && return 0
        kill -0 "$master" 2>/dev/null || { cat "$log" >&2; return 1; }
        sleep 0.1
    done
    cat "$log" >&2
    return 1
}
stop() {
    kill -TERM "$master"
    wait "$master"
}

site="$scratch/site"
mkdir -p "$site"
echo hello >"$site/hello.txt"

echo "== python3 -m http.server from $site"
port=$(free_port)
start "$site" -w 2 -l "127.0.0.1:$port" -- python3 -m http.server "$port"
for _ in 1 2 3 4 5 6; do curl -fsS "http://127.0.0.1:$port/hello.txt" | grep -qx hello; done
stop

if command -v node >/dev/null; then
    echo "== node app.js from $scratch"
    cat >"$scratch/app.js" <<'JS'
require('http').createServer((q, s) => s.end('pid ' + process.pid + '\n')).listen(process.env.PORT)
JS
    port=$(free_port)
    start "$scratch" -w 2 -l "127.0.0.1:$port" -- node app.js
    for _ in 1 2 3 4 5 6; do curl -fsS "http://127.0.0.1:$port/" | grep -q '^pid '; done
    stop
else
    echo "node absent: its check is skipped"
fi
echo "install-check: ok"
