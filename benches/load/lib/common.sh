# shellcheck shell=bash
# Settings, tools, the build, the temp dir and every process the run starts
# (all stopped on exit). Sourced by benches/load.sh.

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
BIG_KEYS=${BIG_KEYS:-1000000}
NGINX_BIG=${NGINX_BIG:-auto}
NGINX_BIG_TIMEOUT=${NGINX_BIG_TIMEOUT:-180}
RELOAD_SECS=${RELOAD_SECS:-10}
IDLE_CONNS=${IDLE_CONNS:-10000}
STREAM_N=${STREAM_N:-50}
AI_ROUNDS=${AI_ROUNDS:-8}
PACED_ROUNDS=${PACED_ROUNDS:-6}
PACED_CONNS=${PACED_CONNS:-200}
HTTPS_N=${HTTPS_N:-2}
H2_CONNS=${H2_CONNS:-64}
H2_STREAMS=${H2_STREAMS:-10}
PAGE_ROUNDS=${PAGE_ROUNDS:-6}
PAGE_DURATION=${PAGE_DURATION:-10s}
PAGE_EVERY=${PAGE_EVERY:-5}
AUDIT_SEED=${AUDIT_SEED:-}
RATE=${RATE:-5000}
FR_SECS=${FR_SECS:-10}
FR_CONNS=${FR_CONNS:-32}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
SMALL_KEYS=10

ROOT=$(cd "$BENCH_DIR/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN=$TARGET_DIR/release/ai-gateway
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench_upstream
FIXED_RATE_BIN=$TARGET_DIR/release/examples/fixed_rate
RESULTS=$ROOT/benches/results-latest.md
# Examples the build makes; a scenario file may add its own at the top level.
EXAMPLES=(bench_upstream fixed_rate)
NOTES=()
PIDS=()

say() { printf '[load.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}
# A line for the report's Notes (and the progress now).
note() {
    NOTES+=("$*")
    say "$*"
}

# ---------------------------------------------------------------- tools

find_nginx() {
    if [ "${NO_NGINX:-0}" = 1 ]; then
        return 0
    elif command -v nginx >/dev/null 2>&1; then
        command -v nginx
    elif [ -x /usr/sbin/nginx ]; then
        echo /usr/sbin/nginx
    fi
}

# Debian packages of the tools not found (command:package pairs).
missing_packages() {
    local pkgs=() pair
    [ -n "$(find_nginx)" ] || [ "${NO_NGINX:-0}" = 1 ] || pkgs+=(nginx)
    for pair in wrk:wrk curl:curl python3:python3 openssl:openssl redis-server:redis-server h2load:nghttp2-client; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || pkgs+=("${pair#*:}")
    done
    echo "${pkgs[*]}"
}

# Offers (or, with --install, runs) apt-get for what is missing; dies
# without the tools every scenario needs.
setup_tools() {
    local missing sudo=() t
    missing=$(missing_packages)
    if [ -n "$missing" ] && [ "$INSTALL" = 1 ]; then
        command -v apt-get >/dev/null 2>&1 ||
            die "missing: $missing, and there is no apt-get here; install them with your package manager"
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        say "installing: $missing (running: ${sudo[*]} apt-get install -y $missing)"
        say "note: Debian's nginx package may start a system nginx on port 80; stop it with 'systemctl disable --now nginx' if unwanted"
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y $missing >&2
        missing=$(missing_packages)
    elif [ -n "$missing" ]; then
        say "missing: $missing"
        say "install with:  sudo apt-get install $missing   (or run: benches/load.sh --install)"
    fi
    command -v cargo >/dev/null 2>&1 || [ "$SKIP_BUILD" = 1 ] || die "cargo is needed (https://rustup.rs)"
    for t in wrk curl python3 openssl; do
        command -v "$t" >/dev/null 2>&1 || die "$t is needed; see above"
    done
    NGINX=$(find_nginx)
    [ -n "$NGINX" ] ||
        note "nginx not available: the upstream is examples/bench_upstream.rs and there is no nginx comparison"
}

# ---------------------------------------------------------------- build

build_binaries() {
    local args=(--release --bin ai-gateway) e
    for e in "${EXAMPLES[@]}"; do args+=(--example "$e"); done
    if [ "$SKIP_BUILD" != 1 ]; then
        say "building: cargo build ${args[*]}"
        (cd "$ROOT" && timeout 3600 cargo build "${args[@]}" >&2) || die "the release build failed"
    fi
    [ -x "$GATEWAY_BIN" ] || die "$GATEWAY_BIN is missing (build with cargo build ${args[*]})"
    for e in "${EXAMPLES[@]}"; do
        [ -x "$TARGET_DIR/release/examples/$e" ] || die "examples/$e is missing (build with cargo build ${args[*]})"
    done
}

# ---------------------------------------------------------------- processes

# The open-file limit (room for IDLE_CONNS connections in the gateway and in
# the client), the temp dir and the cleanup.
setup_run() {
    local want_fds=$((IDLE_CONNS + 1024))
    if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want_fds" ]; then
        ulimit -Hn "$want_fds" 2>/dev/null || true
    fi
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_fds" ]; then
        say "open files limit is $(ulimit -n): IDLE_CONNS lowered to $(($(ulimit -n) - 1024))"
        IDLE_CONNS=$(($(ulimit -n) - 1024))
    fi
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/agw-bench.XXXXXX")
    chmod 755 "$TMP"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    CLK_TCK=$(getconf CLK_TCK)
    LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
    say "temp dir $TMP"
}

cleanup() {
    local pid alive
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=0
        for pid in "${PIDS[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" = 1 ] || break
        sleep 0.3
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ "$KEEP_TMP" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}

# Starts "$@" in the background with output to log $1; sets STARTED_PID.
start_bg() {
    local log=$1
    shift
    : >"$log"
    "$@" >"$log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# Runs "$@" to completion, but as a background job: a signal to this
# script then interrupts the wait at once (bash defers traps while a
# foreground command runs) and the cleanup stops the job.
run_fg() {
    local pid rc=0
    "$@" &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

# Drops a finished process from the cleanup list (its id may be reused).
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# Stops one process this script started.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# N free TCP ports on 127.0.0.1, distinct. The sockets are closed before
# the ports are printed: the caller reads them (and may bind one) before
# python has exited.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
ports = [s.getsockname()[1] for s in socks]
for s in socks:
    s.close()
print(" ".join(str(p) for p in ports), flush=True)
EOF
}

# Whole seconds of a duration such as 5s or 1m.
secs_of() {
    awk -v d="$1" 'BEGIN { n = d + 0; if (d ~ /m$/) n *= 60; print int(n) }'
}
