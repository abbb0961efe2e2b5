# Sourced by the benchmark scripts: starting and stopping one rcluster-lb master.
#
#   start_master LOG ARGS...   # runs "$bin" --listen 127.0.0.1:0 ARGS... (stderr to LOG), waits
#                              # until its workers are ready; sets MASTER_PID and MASTER_PORT
#   stop_master                # SIGTERMs MASTER_PID (if any) and reaps it
#   app_server SCRIPT KIND     # sets SERVER to the master's arguments that run the benchmark
#                              # app KIND: node (benches/node_app.js through the shim) or demo
#                              # (none: the built-in worker); anything else, or node missing,
#                              # ends the script with a one-line error naming SCRIPT (exit 2)
#
# Needs $bin (the rcluster-lb binary). A master that prints no port within 30 s is stopped and
# its log shown; start_master then returns 1.

MASTER_PID=
MASTER_PORT=

start_master() {
    local log=$1
    shift
    RCLUSTER_LOG=info "$bin" --listen 127.0.0.1:0 "$@" 2>"$log" &
    MASTER_PID=$!
    for _ in $(seq 300); do
        grep -q "workers ready" "$log" && break
        sleep 0.1
    done
    MASTER_PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$log" | head -1 | cut -d: -f2)
    if [ -z "$MASTER_PORT" ]; then
        echo "the master did not start ($*); its log:" >&2
        cat "$log" >&2
        stop_master
        return 1
    fi
}

stop_master() {
    if [ -n "$MASTER_PID" ]; then
        kill -TERM "$MASTER_PID" 2>/dev/null || true
        wait "$MASTER_PID" 2>/dev/null || true
        MASTER_PID=
    fi
}

app_server() {
    local script=$1 kind=$2
    SERVER=()
    case $kind in
    node)
        command -v node >/dev/null ||
            { echo "$script: node not found (APP=demo runs without it)" >&2; exit 2; }
        SERVER=(--ready-delay 500ms -- node benches/node_app.js)
        ;;
    demo) ;;
    *)
        echo "$script: APP must be node or demo, not '$kind'" >&2
        exit 2
        ;;
    esac
}
