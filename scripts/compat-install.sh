#!/usr/bin/env bash
# Installs the servers of the compatibility matrix (tests/compat.rs) from the ordinary registries
# into a prefix (default target/compat), pinned, so reruns are instant and results comparable:
#   py/    pip install --target   (gunicorn, uvicorn, uvicorn-worker, starlette, hypercorn, waitress)
#   node/  npm install --prefix   (express, fastify)
#   go/    the Go example worker (workers/go), built offline with the system's go
# A part whose runtime (python3, npm, go) is absent is skipped with a note; an install that
# fails is retried once, then the script fails naming it. System packages (nginx, golang-go) are
# not installed here: .ci/run does that with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-target/compat}
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)

PY_PKGS="gunicorn==27.0.1 uvicorn==0.54.0 uvicorn-worker==0.4.0 starlette==1.10.0 hypercorn==0.18.0 waitress==3.0.2"
NODE_PKGS="express@5.3.0 fastify@5.12.8"

retry() { # retry once, then fail loudly
    "$@" || { echo "compat-install: '$*' failed; retrying once" >&2; sleep 2; "$@"; } || {
        echo "compat-install: FAILED: $*" >&2
        return 1
    }
}

stamp_ok() { [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]; }

if command -v python3 >/dev/null; then
    if stamp_ok "$PREFIX/py" "$PY_PKGS"; then
        echo "compat-install: python packages cached in $PREFIX/py"
    else
        rm -rf "$PREFIX/py"
        retry python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --root-user-action=ignore --target "$PREFIX/py" $PY_PKGS
        echo "$PY_PKGS" > "$PREFIX/py/.stamp"
        echo "compat-install: installed $PY_PKGS"
    fi
else
    echo "compat-install: note: python3 absent; its rows skip"
fi

if command -v npm >/dev/null; then
    if stamp_ok "$PREFIX/node" "$NODE_PKGS"; then
        echo "compat-install: node packages cached in $PREFIX/node"
    else
        rm -rf "$PREFIX/node"
        mkdir -p "$PREFIX/node"
        retry npm install --silent --no-audit --no-fund --prefix "$PREFIX/node" $NODE_PKGS
        echo "$NODE_PKGS" > "$PREFIX/node/.stamp"
        echo "compat-install: installed $NODE_PKGS"
    fi
else
    echo "compat-install: note: npm absent; its rows skip"
fi

if command -v go >/dev/null; then
    mkdir -p "$PREFIX/go"
    # Offline: the module has no dependencies beyond the standard library.
    (cd workers/go && GOFLAGS=-mod=mod GOPROXY=off GOTOOLCHAIN=local \
        GOCACHE="$PREFIX/go/cache" GOPATH="$PREFIX/go/path" \
        go build -o "$PREFIX/go/hello" ./cmd/hello)
    echo "compat-install: built $PREFIX/go/hello with $(go version)"
else
    echo "compat-install: note: go absent (Debian: golang-go); its rows skip"
fi
