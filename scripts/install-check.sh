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
    run_in "$dir" "$bin" "$@"
}
# As start, for any command that execs the master (keeping its pid).
run_in() {
    local dir=$1; shift
    local log="$scratch/master.$RANDOM.log"
    (cd "$dir" && exec "$@") 2>"$log" &
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

if ! command -v node >/dev/null; then
    echo "node absent: the node and deployment checks are skipped"
    echo "install-check: ok"
    exit 0
fi
cat >"$scratch/app.js" <<'JS'
require('http').createServer((q, s) => s.end('pid ' + process.pid + '\n')).listen(process.env.PORT)
JS
get() { curl -fsS "http://127.0.0.1:$1/" | grep -q '^pid '; }

echo "== node app.js from $scratch (README: Coming from PM2, --workers 0)"
port=$(free_port)
start "$scratch" --workers 0 -l "127.0.0.1:$port" -- node app.js
for _ in 1 2 3 4 5 6; do get "$port"; done
stop

echo "== Docker's ENTRYPOINT: --listen :PORT --workers 0 -- node app.js"
port=$(free_port)
start "$scratch" --listen ":$port" --workers 0 -- node app.js
get "$port"
stop

echo "== Kubernetes: --shutdown-delay keeps serving after SIGTERM"
port=$(free_port)
start "$scratch" --listen ":$port" --workers 2 --shutdown-delay 5s -- node app.js
kill -TERM "$master"
for _ in 1 2 3 4 5 6; do get "$port"; done
wait "$master"

echo "== PM2's SIGINT apps: --stop-signal INT --drain-signal INT, reload with SIGHUP"
# A PM2 SIGINT app closes its server on SIGINT (README, "Coming from PM2"): the drained old
# worker finishes what it accepted. (One that dies on the signal at once loses the requests it
# had accepted and not answered, under any process manager: seen in 2 of 40 reloads.)
cat >"$scratch/sigint-app.js" <<'JS'
const server = require('http').createServer((q, s) => s.end('pid ' + process.pid + '\n')).listen(process.env.PORT)
process.on('SIGINT', () => server.close())
JS
port=$(free_port)
start "$scratch" -w 2 -l "127.0.0.1:$port" --stop-signal INT --drain-signal INT -- node sigint-app.js
kill -HUP "$master"
for _ in 1 2 3 4 5 6; do get "$port"; done
stop

echo "== einhorn's layout: --policy shared --listen 0.0.0.0:PORT"
port=$(free_port)
start "$scratch" -w 2 --policy shared --listen "0.0.0.0:$port" -- node app.js
get "$port"
stop

echo "== contrib/rcluster-lb.service's ExecStart under socket activation (the .socket's port)"
port=$(free_port)
exec_start=$(sed -n 's/^ExecStart=//p' "$repo/contrib/rcluster-lb.service")
read -r -a argv <<<"$exec_start"
argv=("${argv[@]/#\/usr\/local\/bin\/rcluster-lb/$bin}")
argv=("${argv[@]//\/srv\/app\/app.js/$scratch/app.js}")
argv=("${argv[@]//\/usr\/bin\/node/$(command -v node)}")
# systemd's part: bind the socket, put it at fd 3, set LISTEN_FDS/LISTEN_PID, exec the master.
activate='import os, socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(128)
if s.fileno() != 3: os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="rcluster-lb.socket")
os.execv(sys.argv[2], sys.argv[2:])'
run_in "$scratch" python3 -c "$activate" "$port" "${argv[@]}"
get "$port"
kill -HUP "$master"      # ExecReload
get "$port"
stop
echo "install-check: ok"
