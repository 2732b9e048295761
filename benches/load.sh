#!/usr/bin/env bash
# Load benchmark: ai-gateway against nginx doing the same key check, on this
# machine, over loopback. One command:
#
#   benches/load.sh              # build, run every phase, write the report
#   benches/load.sh --install    # first apt-get install what is missing
#   ROUNDS=1 DURATION=2s benches/load.sh    # a quick smoke run
#
# Needs: cargo, curl, python3, wrk; nginx for the comparison (without it the
# upstream is examples/bench_upstream.rs and the nginx rows are left out).
# Settings (environment):
#   ROUNDS=3  DURATION=5s  CONNS=64  THREADS=2   wrk runs, interleaved per round
#   BIG_KEYS=1000000          the large key set
#   NGINX_BIG=auto            nginx with BIG_KEYS keys: auto (try, skip if it
#                             does not start in NGINX_BIG_TIMEOUT=180 s), 1, 0
#   RELOAD_SECS=10            each of the two reload-under-load wrk runs
#   IDLE_CONNS=10000          idle keep-alive client connections held open
#   STREAM_N=50               streaming requests per target
#   AI_ROUNDS=8               rounds of the usage accounting comparison (each
#                             a pair of wrk runs, on and off, order alternating)
#   PACED_ROUNDS=6  PACED_CONNS=200   rounds and connections of the usage
#                             comparison on paced (Ollama-like) streams
#   HTTPS_N=2                 parallel `openssl s_time` clients in the
#                             handshake runs, full and resumed (HTTPS phase)
#   RATE=5000  FR_SECS=10  FR_CONNS=32   the fixed-rate latency runs (direct,
#                             nginx, gateway; ROUNDS rounds, interleaved)
#   NO_NGINX=1                act as if nginx were not installed
#   SKIP_BUILD=1              use the existing release binaries
#   KEEP_TMP=1                keep the temp dir (configs, logs, wrk output)
#
# Everything listens on 127.0.0.1 on free ports, in a temp dir; every
# process started here is stopped on exit. The report goes to stdout and to
# benches/results-latest.md; progress goes to stderr.

set -euo pipefail

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
RATE=${RATE:-5000}
FR_SECS=${FR_SECS:-10}
FR_CONNS=${FR_CONNS:-32}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
SMALL_KEYS=10

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN=$TARGET_DIR/release/ai-gateway
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench_upstream
FIXED_RATE_BIN=$TARGET_DIR/release/examples/fixed_rate
RESULTS=$ROOT/benches/results-latest.md

INSTALL=0
for arg in "$@"; do
    case $arg in
        --install) INSTALL=1 ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

say() { printf '[load.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
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

missing_packages() {
    local pkgs=()
    [ -n "$(find_nginx)" ] || pkgs+=(nginx)
    command -v wrk >/dev/null 2>&1 || pkgs+=(wrk)
    command -v curl >/dev/null 2>&1 || pkgs+=(curl)
    command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
    command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
    command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
    echo "${pkgs[*]}"
}

MISSING=$(missing_packages)
if [ -n "$MISSING" ]; then
    if [ "$INSTALL" = 1 ]; then
        command -v apt-get >/dev/null 2>&1 ||
            die "missing: $MISSING, and there is no apt-get here; install them with your package manager"
        SUDO=()
        [ "$(id -u)" = 0 ] || SUDO=(sudo)
        say "installing: $MISSING (running: ${SUDO[*]} apt-get install -y $MISSING)"
        say "note: Debian's nginx package may start a system nginx on port 80; stop it with 'systemctl disable --now nginx' if unwanted"
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y $MISSING >&2
        MISSING=$(missing_packages)
    else
        say "missing: $MISSING"
        say "install with:  sudo apt-get install $MISSING   (or run: benches/load.sh --install)"
    fi
fi
command -v cargo >/dev/null 2>&1 || die "cargo is needed (https://rustup.rs)"
for t in wrk curl python3 openssl; do
    case " $MISSING " in *" $t "*) die "$t is needed; see above" ;; esac
done
NGINX=$(find_nginx)
NOTES=()
if [ -z "$NGINX" ]; then
    NOTES+=("nginx not available: the upstream is examples/bench_upstream.rs and there is no nginx comparison")
    say "${NOTES[0]}"
fi

# ---------------------------------------------------------------- build

if [ "$SKIP_BUILD" != 1 ]; then
    say "building: cargo build --release --bin ai-gateway --example bench_upstream --example fixed_rate"
    (cd "$ROOT" && timeout 3600 cargo build --release --bin ai-gateway --example bench_upstream \
        --example fixed_rate >&2) ||
        die "the release build failed"
fi
[ -x "$GATEWAY_BIN" ] || die "$GATEWAY_BIN is missing (build with cargo build --release)"
[ -x "$UPSTREAM_BIN" ] || die "$UPSTREAM_BIN is missing (build with cargo build --release --example bench_upstream)"
[ -x "$FIXED_RATE_BIN" ] || die "$FIXED_RATE_BIN is missing (build with cargo build --release --example fixed_rate)"

# ---------------------------------------------------------------- setup

# Room for IDLE_CONNS connections in the gateway and in the client.
want_fds=$((IDLE_CONNS + 1024))
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
PIDS=()
cleanup() {
    local pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for pid in "${PIDS[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" = 1 ] || break
        sleep 0.3
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$KEEP_TMP" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

CLK_TCK=$(getconf CLK_TCK)
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

# N free TCP ports on 127.0.0.1, distinct.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# The plaintext bench key number $1 (the shape `keygen` makes: agw_ + 32).
bench_key() { printf 'agw_bench%027d' "$1"; }
KEY=$(bench_key 5) # present in every key set

read -r P_UP P_STREAM P_FAST P_NGX_SMALL P_NGX_BIG P_GW_SMALL P_GW_BIG P_ADM_SMALL P_ADM_BIG P_GW_LIMITS P_ADM_LIMITS P_NGX_TLS P_GW_TLS P_GW_TLS_PLAIN P_REDIS P_GW_SHARED P_ADM_SHARED < <(free_ports 17)

# The ~300-byte body of a non-streaming Ollama /api/generate answer (the
# same text examples/bench_upstream.rs sends).
GENERATE_BODY='{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00.000000000Z","response":"The sky is blue because air molecules scatter short blue wavelengths of sunlight more than red ones.","done":true,"done_reason":"stop","total_duration":512345678,"load_duration":12345678,"prompt_eval_count":26,"prompt_eval_duration":23456789,"eval_count":21,"eval_duration":456789012}'
REQUEST_BODY='{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}'

# Key files: keys-N.json for the gateway (sha256: entries), keys-N.map for
# nginx (the plaintext keys, as an nginx map has to hold them).
make_keys() {
    local n=$1
    python3 - "$n" "$TMP/keys-$n.json" "$TMP/keys-$n.map" <<'EOF'
import hashlib, sys
n, json_path, map_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(json_path, "w") as j, open(map_path, "w") as m:
    j.write("{")
    for i in range(n):
        key = "agw_bench%027d" % i
        digest = hashlib.sha256(key.encode()).hexdigest()
        j.write('%s\n"sha256:%s":{"user":"user%d","service":"ollama"}' % ("," if i else "", digest, i % 100))
        m.write('"%s" 1;\n' % key)
    j.write("\n}\n")
EOF
    chmod 600 "$TMP/keys-$n.json"
}

say "temp dir $TMP; generating key sets ($SMALL_KEYS and $BIG_KEYS keys)"
make_keys "$SMALL_KEYS"
make_keys "$BIG_KEYS"

# The wrk script: POST, JSON body, the key header.
cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$REQUEST_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "$KEY"
EOF

# ---------------------------------------------------------------- servers

# Waits until a POST to $1 answers $2 (with the bench key); $3 = timeout in
# seconds, $4 = the process to watch (gives up early if it dies).
wait_ready() {
    local url=$1 want=$2 secs=$3 pid=$4 code deadline
    deadline=$((SECONDS + secs))
    while [ "$SECONDS" -lt "$deadline" ]; do
        kill -0 "$pid" 2>/dev/null || return 1
        # shellcheck disable=SC2086 # $url may carry curl options (--cacert FILE)
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' -X POST -H "X-API-Key: $KEY" \
            -H 'Content-Type: application/json' --data "$REQUEST_BODY" $url || true)
        [ "$code" = "$want" ] && return 0
        sleep 0.2
    done
    return 1
}

# The status a request without a key gets.
status_without_key() {
    curl -s -o /dev/null -m 2 -w '%{http_code}' -X POST --data "$REQUEST_BODY" "$1" || true
}

nginx_common() { # $1 = dir
    local user_line=""
    [ "$(id -u)" = 0 ] && user_line="user root;"
    cat <<EOF
$user_line
daemon off;
worker_processes 2;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
EOF
}

nginx_http_common() { # $1 = dir
    cat <<EOF
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
EOF
}

UPSTREAM_KIND=""
start_upstream() {
    if [ -n "$NGINX" ]; then
        local d=$TMP/nginx-upstream
        mkdir -p "$d"
        {
            nginx_common "$d"
            echo "http {"
            nginx_http_common "$d"
            cat <<EOF
    server {
        listen 127.0.0.1:$P_UP;
        location / {
            default_type application/json;
            return 200 '$GENERATE_BODY';
        }
    }
}
EOF
        } >"$d/nginx.conf"
        start_bg "$d/out.log" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
        UPSTREAM_KIND="nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), return 200 (2 workers)"
    else
        start_bg "$TMP/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$P_UP" --mode json
        UPSTREAM_KIND="examples/bench_upstream.rs (thread per connection)"
    fi
    UPSTREAM_PID=$STARTED_PID
    wait_ready "http://127.0.0.1:$P_UP/api/generate" 200 20 "$UPSTREAM_PID" ||
        die "the upstream did not start (see $TMP)"
}

# nginx as the key-checking proxy: $1 = key count, $2 = port, $3 = timeout.
start_nginx_proxy() {
    local n=$1 port=$2 secs=$3 d=$TMP/nginx-proxy-$1 bucket=128 max=4096
    mkdir -p "$d"
    if [ "$n" -gt 1000 ]; then
        # Large maps: big buckets so nginx finds a hash size quickly.
        bucket=1024
        max=$((n * 2))
    fi
    {
        nginx_common "$d"
        echo "http {"
        nginx_http_common "$d"
        cat <<EOF
    map_hash_bucket_size $bucket;
    map_hash_max_size $max;
    map \$http_x_api_key \$allowed {
        default 0;
        include $TMP/keys-$n.map;
    }
    upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port;
        location /ollama/ {
            default_type application/json;
            if (\$allowed = 0) {
                return 401 '{"error":"invalid api key"}';
            }
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
        }
    }
}
EOF
    } >"$d/nginx.conf"
    local t0=$SECONDS
    start_bg "$d/out.log" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
    NGINX_PROXY_PID=$STARTED_PID
    if ! wait_ready "http://127.0.0.1:$port/ollama/api/generate" 200 "$secs" "$NGINX_PROXY_PID"; then
        stop_pid "$NGINX_PROXY_PID"
        say "nginx with $n keys did not start within $secs s: $(tail -n 3 "$d/error.log" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    [ "$(status_without_key "http://127.0.0.1:$port/ollama/api/generate")" = 401 ] ||
        die "nginx proxy ($n keys) lets a request without a key through"
    say "nginx with $n keys ready after $((SECONDS - t0)) s"
}

# The gateway: $1 = key count, $2 = port, $3 = admin port, $4 = a name for
# its folder (default: the key count), $5 = extra top-level settings
# (default: the failed-key throttle off, as nginx has none).
start_gateway() {
    local n=$1 port=$2 admin=$3 d=$TMP/gateway-${4:-$1}
    local extra=${5:-"failed_key_throttle: {enabled: false}"}
    mkdir -p "$d"
    cat >"$d/gateway.yaml" <<EOF
listen: "127.0.0.1:$port"
admin_listen: "127.0.0.1:$admin"
keys_file: $TMP/keys-$n.json
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $d/upgrade.sock
# Room for the IDLE_CONNS idle connections of the memory phase (the
# default cap, derived from the open-file limit, may be lower).
max_connections: $((IDLE_CONNS + 100))
$extra
routes:
  - name: ollama
    path_prefix: /ollama/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_UP"]
  - name: stream
    path_prefix: /stream/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_STREAM"]
  # The same streams with usage accounting on.
  - name: stream-ai
    path_prefix: /stream-ai/
    service: ollama
    strip_prefix: true
    api: ollama
    upstreams: ["127.0.0.1:$P_STREAM"]
  # Streams without pauses (CPU-bound), without and with usage accounting.
  - name: fast
    path_prefix: /fast/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_FAST"]
  - name: fast-ai
    path_prefix: /fast-ai/
    service: ollama
    strip_prefix: true
    api: ollama
    upstreams: ["127.0.0.1:$P_FAST"]
EOF
    local t0=$SECONDS
    RUST_LOG=${RUST_LOG:-info} start_bg "$d/gateway.log" "$GATEWAY_BIN" run --config "$d/gateway.yaml"
    GATEWAY_PID=$STARTED_PID
    wait_ready "http://127.0.0.1:$port/ollama/api/generate" 200 120 "$GATEWAY_PID" ||
        die "the gateway with $n keys did not start: $(tail -n 5 "$d/gateway.log")"
    [ "$(status_without_key "http://127.0.0.1:$port/ollama/api/generate")" = 401 ] ||
        die "the gateway ($n keys) lets a request without a key through"
    say "gateway with $n keys ready after $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- HTTPS servers

# One certificate for both (ECDSA P-256, as ACME clients make by default).
make_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/tls-key.pem" -out "$TMP/tls-cert.pem" 2>/dev/null ||
        die "openssl could not make the test certificate"
    chmod 600 "$TMP/tls-key.pem"
}

# nginx as the key-checking proxy over TLS (1.2 and 1.3, HTTP/1.1), the
# same key check as start_nginx_proxy, resuming sessions by ticket and by
# ID as the gateway does; $1 = port.
start_nginx_tls() {
    local port=$1 d=$TMP/nginx-tls
    mkdir -p "$d"
    {
        nginx_common "$d"
        echo "http {"
        nginx_http_common "$d"
        cat <<EOF
    map \$http_x_api_key \$allowed {
        default 0;
        include $TMP/keys-$SMALL_KEYS.map;
    }
    upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $TMP/tls-cert.pem;
        ssl_certificate_key $TMP/tls-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location /ollama/ {
            default_type application/json;
            if (\$allowed = 0) {
                return 401 '{"error":"invalid api key"}';
            }
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
        }
    }
}
EOF
    } >"$d/nginx.conf"
    start_bg "$d/out.log" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
    NGINX_TLS_PID=$STARTED_PID
    wait_ready "https://127.0.0.1:$port/ollama/api/generate --cacert $TMP/tls-cert.pem" 200 30 "$NGINX_TLS_PID" ||
        die "nginx over TLS did not start: $(tail -n 3 "$d/error.log" 2>/dev/null | tr '\n' ' ')"
}

# The gateway with a TLS listener (and a plain one): $1 = TLS port, $2 = plain port.
start_gateway_tls() {
    local port=$1 plain=$2 d=$TMP/gateway-tls
    mkdir -p "$d"
    cat >"$d/gateway.yaml" <<EOF
listen:
  - "127.0.0.1:$plain"
  - {address: "127.0.0.1:$port", tls: {cert: $TMP/tls-cert.pem, key: $TMP/tls-key.pem}}
keys_file: $TMP/keys-$SMALL_KEYS.json
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $d/upgrade.sock
failed_key_throttle: {enabled: false}
routes:
  - name: ollama
    path_prefix: /ollama/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_UP"]
EOF
    RUST_LOG=${RUST_LOG:-info} start_bg "$d/gateway.log" "$GATEWAY_BIN" run --config "$d/gateway.yaml"
    GATEWAY_TLS_PID=$STARTED_PID
    wait_ready "https://127.0.0.1:$port/ollama/api/generate --cacert $TMP/tls-cert.pem" 200 60 "$GATEWAY_TLS_PID" ||
        die "the gateway over TLS did not start: $(tail -n 5 "$d/gateway.log")"
}

# Full TLS handshakes per second against 127.0.0.1:$1 for $2 seconds:
# HTTPS_N parallel `openssl s_time -new` (no session reuse, no request);
# $3 = the process tree charged CPU. Leaves HS_RATE and HS_CPU (µs per
# handshake) set.
handshake_rate() {
    local port=$1 secs=$2 pid=$3 c0 c1 u s i total=0 n pids=()
    read -r u s < <(cpu_ticks "$pid")
    c0=$((u + s))
    for i in $(seq 1 "$HTTPS_N"); do
        openssl s_time -connect "127.0.0.1:$port" -new -time "$secs" >"$TMP/s_time-$port-$i.txt" 2>&1 &
        pids+=("$!")
        PIDS+=("$!")
    done
    for i in "${pids[@]}"; do
        wait "$i" || true
        forget_pid "$i"
    done
    read -r u s < <(cpu_ticks "$pid")
    c1=$((u + s))
    for i in $(seq 1 "$HTTPS_N"); do
        n=$(awk '/connections in .* real seconds/ { print $1; exit }' "$TMP/s_time-$port-$i.txt")
        total=$((total + ${n:-0}))
    done
    HS_RATE=$(awk -v n="$total" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    HS_CPU=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$total" 'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print "-" }')
}

# Resumed TLS handshakes per second against 127.0.0.1:$1 for $2 seconds:
# HTTPS_N parallel `openssl s_time -reuse` (one full handshake each, then
# every connection presents that session); $3 = the process tree charged
# CPU; the rest: s_time's options (TLS 1.3 needs `-www PATH`: its tickets
# come after the handshake, and s_time takes them in only when it reads an
# answer). Leaves RS_RATE, RS_CPU (µs per connection) and RS_SHARE (the
# share of connections that resumed: s_time marks each `r` or `*`) set.
resumed_rate() {
    local port=$1 secs=$2 pid=$3 c0 c1 u s i total=0 n out pids=()
    shift 3
    read -r u s < <(cpu_ticks "$pid")
    c0=$((u + s))
    for i in $(seq 1 "$HTTPS_N"); do
        openssl s_time -connect "127.0.0.1:$port" -reuse -time "$secs" "$@" >"$TMP/s_time-reuse-$port-$i.txt" 2>&1 &
        pids+=("$!")
        PIDS+=("$!")
    done
    for i in "${pids[@]}"; do
        wait "$i" || true
        forget_pid "$i"
    done
    read -r u s < <(cpu_ticks "$pid")
    c1=$((u + s))
    for i in $(seq 1 "$HTTPS_N"); do
        out=$TMP/s_time-reuse-$port-$i.txt
        n=$(awk '/connections in .* real seconds/ { print $1; exit }' "$out")
        total=$((total + ${n:-0}))
    done
    RS_RATE=$(awk -v n="$total" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    RS_CPU=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$total" 'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print "-" }')
    RS_SHARE=$(cat "$TMP"/s_time-reuse-"$port"-*.txt | awk '/^[r*]+$/ { all += length($0); r += gsub(/r/, "") }
        END { if (all > 0) printf "%.0f", 100 * r / all; else print "-" }')
}

# ---------------------------------------------------------------- measuring

# VmRSS of a process, in MB.
rss_mb() {
    awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "-"
}

# A process and its children (nginx: master and workers).
proc_tree() {
    local pid=$1
    echo "$pid"
    if [ -r "/proc/$pid/task/$pid/children" ]; then
        tr ' ' '\n' <"/proc/$pid/task/$pid/children" | sed '/^$/d'
    fi
}

# Sum of Pss over a process tree, in MB (shared pages counted once).
pss_mb() {
    local total=0 p kb
    for p in $(proc_tree "$1"); do
        kb=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v kb="$total" 'BEGIN { printf "%.1f", kb / 1024 }'
}

# CPU time of a process tree, in clock ticks: "user system".
cpu_ticks() {
    local user=0 sys=0 p u t
    for p in $(proc_tree "$1"); do
        read -r u t < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12, $13 }' || echo "0 0")
        user=$((user + ${u:-0}))
        sys=$((sys + ${t:-0}))
    done
    echo "$user $sys"
}

# CPU ticks (user + system) of each proxy service thread of gateway $1:
# lines "ai-gateway-N ticks".
service_ticks() {
    local t name
    for t in /proc/"$1"/task/*; do
        name=$(cat "$t/comm" 2>/dev/null) || continue
        case $name in ai-gateway-*) ;; *) continue ;; esac
        echo "$name $(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{ print $12 + $13 }')"
    done | sort
}

# Microseconds per request of $1 ticks over $2 requests.
us_per_req() {
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }'
}

# wrk's latency ("612.00us", "2.31ms", "1.02s") in ms.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.0f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.1f", v * 1000 }
        else print "-" }'
}

# Runs wrk against $2 for $3 (duration) into file $1; the process tree $4
# (may be empty) is charged CPU. Leaves WRK_* set.
run_wrk() {
    local out=$1 url=$2 dur=$3 pid=${4:-} extra=${5:-} u0=0 s0=0 u1=0 s1=0 secs
    local hdr=()
    [ -n "$extra" ] && hdr=(-H "$extra")
    secs=$(awk -v d="$dur" 'BEGIN { n = d + 0; if (d ~ /m$/) n *= 60; print int(n) }')
    [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
    run_fg timeout $((secs + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$dur" --latency "${hdr[@]}" -s "$TMP/post.lua" "$url" >"$out" 2>&1 ||
        say "wrk against $url failed or timed out (see $out)"
    [ -n "$pid" ] && read -r u1 s1 < <(cpu_ticks "$pid")
    WRK_RPS=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    WRK_RPS=${WRK_RPS:-0}
    WRK_REQS=$(awk '/ requests in / { print $1 }' "$out")
    WRK_REQS=${WRK_REQS:-0}
    WRK_P50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    WRK_P99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    WRK_NON2XX=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    WRK_NON2XX=${WRK_NON2XX:-0}
    WRK_SOCKERR=$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")
    WRK_SOCKERR=${WRK_SOCKERR:-0}
    if [ -n "$pid" ] && [ "$WRK_REQS" -gt 0 ]; then
        WRK_CPU=$(us_per_req $((u1 - u0 + s1 - s0)) "$WRK_REQS")
        WRK_CPU_USER=$(us_per_req $((u1 - u0)) "$WRK_REQS")
        WRK_CPU_SYS=$(us_per_req $((s1 - s0)) "$WRK_REQS")
    else
        WRK_CPU="-" WRK_CPU_USER="-" WRK_CPU_SYS="-"
    fi
}

# Median of numbers (arguments); "-" when there are none.
median() {
    printf '%s\n' "$@" | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '
        { a[NR] = $1 }
        END {
            if (NR == 0) print "-"
            else if (NR % 2) print a[(NR + 1) / 2]
            else print (a[NR / 2] + a[NR / 2 + 1]) / 2
        }'
}

note() {
    NOTES+=("$*")
    say "$*"
}

# ---------------------------------------------------------------- start

start_upstream
say "upstream: $UPSTREAM_KIND on :$P_UP"
start_bg "$TMP/stream-upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$P_STREAM" --mode ndjson \
    --chunks 10 --first-ms 10 --interval-ms 20
STREAM_PID=$STARTED_PID
wait_ready "http://127.0.0.1:$P_STREAM/api/generate" 200 20 "$STREAM_PID" ||
    die "the streaming upstream did not start: $(tail -n 3 "$TMP/stream-upstream.log")"
start_bg "$TMP/fast-upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$P_FAST" --mode ndjson \
    --chunks 10 --first-ms 0 --interval-ms 0
FAST_PID=$STARTED_PID
wait_ready "http://127.0.0.1:$P_FAST/api/generate" 200 20 "$FAST_PID" ||
    die "the fast streaming upstream did not start: $(tail -n 3 "$TMP/fast-upstream.log")"

# target name | keys | url | pid (for CPU)
TARGETS=()
NGX_SMALL_PID="" NGX_BIG_PID=""
if [ -n "$NGINX" ]; then
    start_nginx_proxy "$SMALL_KEYS" "$P_NGX_SMALL" 30 || die "nginx with $SMALL_KEYS keys did not start"
    NGX_SMALL_PID=$NGINX_PROXY_PID
    case $NGINX_BIG in
        0) note "nginx with $BIG_KEYS keys: skipped (NGINX_BIG=0)" ;;
        *)
            if start_nginx_proxy "$BIG_KEYS" "$P_NGX_BIG" "$NGINX_BIG_TIMEOUT"; then
                NGX_BIG_PID=$NGINX_PROXY_PID
            else
                [ "$NGINX_BIG" = 1 ] && die "nginx with $BIG_KEYS keys did not start"
                note "nginx with $BIG_KEYS keys did not start within ${NGINX_BIG_TIMEOUT}s: measured gateway $SMALL_KEYS vs $BIG_KEYS keys and nginx only with $SMALL_KEYS"
            fi
            ;;
    esac
fi

start_gateway "$SMALL_KEYS" "$P_GW_SMALL" "$P_ADM_SMALL"
GW_SMALL_PID=$GATEWAY_PID
RSS_GW_SMALL_START=$(rss_mb "$GW_SMALL_PID")
# Fair-use limits on, for the benched key: a rate and a concurrency cap it
# never reaches, and the failed-key throttle (on by default).
start_gateway "$SMALL_KEYS" "$P_GW_LIMITS" "$P_ADM_LIMITS" limits "rate_limit: \"1000000000/min\"
max_concurrent: 100000"
GW_LIMITS_PID=$GATEWAY_PID
# The same limits counted in Redis (shared_state), as several instances
# would: a redis-server on loopback, started here.
GW_SHARED_PID=""
if command -v redis-server >/dev/null 2>&1; then
    start_bg "$TMP/redis.log" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no
    REDIS_PID=$STARTED_PID
    redis_up=0
    for _ in $(seq 1 100); do
        if [ "$(timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$P_REDIS && printf 'PING\r\n' >&3 && head -c 5 <&3" 2>/dev/null)" = "+PONG" ]; then
            redis_up=1
            break
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ "$redis_up" = 1 ] || die "redis-server did not start: $(tail -n 3 "$TMP/redis.log")"
    start_gateway "$SMALL_KEYS" "$P_GW_SHARED" "$P_ADM_SHARED" shared "rate_limit: \"1000000000/min\"
max_concurrent: 100000
shared_state: {redis: \"redis://127.0.0.1:$P_REDIS/0\"}"
    GW_SHARED_PID=$GATEWAY_PID
else
    note "redis-server not installed: no shared-limits row (benches/load.sh --install adds it)"
fi
start_gateway "$BIG_KEYS" "$P_GW_BIG" "$P_ADM_BIG"
GW_BIG_PID=$GATEWAY_PID
RSS_GW_BIG_START=$(rss_mb "$GW_BIG_PID")
GW_BIG_LOAD_MS=$(sed -n 's/.*loaded .*: .* keys in \([0-9]*\) ms.*/\1/p' "$TMP/gateway-$BIG_KEYS/gateway.log" | tail -n 1)
PSS_NGX_SMALL="-" PSS_NGX_BIG="-"
[ -n "$NGX_SMALL_PID" ] && PSS_NGX_SMALL=$(pss_mb "$NGX_SMALL_PID")
[ -n "$NGX_BIG_PID" ] && PSS_NGX_BIG=$(pss_mb "$NGX_BIG_PID")

TARGETS+=("upstream direct|-|http://127.0.0.1:$P_UP/api/generate|$UPSTREAM_PID")
[ -n "$NGX_SMALL_PID" ] && TARGETS+=("nginx|$SMALL_KEYS|http://127.0.0.1:$P_NGX_SMALL/ollama/api/generate|$NGX_SMALL_PID")
TARGETS+=("ai-gateway|$SMALL_KEYS|http://127.0.0.1:$P_GW_SMALL/ollama/api/generate|$GW_SMALL_PID")
TARGETS+=("ai-gateway, limits on|$SMALL_KEYS|http://127.0.0.1:$P_GW_LIMITS/ollama/api/generate|$GW_LIMITS_PID")
[ -n "$GW_SHARED_PID" ] && TARGETS+=("ai-gateway, limits shared|$SMALL_KEYS|http://127.0.0.1:$P_GW_SHARED/ollama/api/generate|$GW_SHARED_PID")
[ -n "$NGX_BIG_PID" ] && TARGETS+=("nginx|$BIG_KEYS|http://127.0.0.1:$P_NGX_BIG/ollama/api/generate|$NGX_BIG_PID")
TARGETS+=("ai-gateway|$BIG_KEYS|http://127.0.0.1:$P_GW_BIG/ollama/api/generate|$GW_BIG_PID")

# ---------------------------------------------------------------- throughput

RESULTS_TSV=$TMP/throughput.tsv
: >"$RESULTS_TSV"
SERVICE_TICKS_BEFORE=$(service_ticks "$GW_SMALL_PID")
for round in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r name keys url pid <<<"$t"
        say "round $round/$ROUNDS: $name ($keys keys): wrk -t$THREADS -c$CONNS -d$DURATION"
        run_wrk "$TMP/wrk-${name// /_}-$keys-$round.txt" "$url" "$DURATION" "$pid"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$keys" "$round" "$WRK_RPS" "$WRK_P50" \
            "$WRK_P99" "$WRK_CPU" "$WRK_NON2XX" "$WRK_SOCKERR" "$WRK_CPU_USER" "$WRK_CPU_SYS" >>"$RESULTS_TSV"
        [ $((WRK_NON2XX + WRK_SOCKERR)) = 0 ] ||
            note "$name ($keys keys) round $round: $WRK_NON2XX non-2xx responses, $WRK_SOCKERR socket errors"
    done
done
SERVICE_TICKS_AFTER=$(service_ticks "$GW_SMALL_PID")
RSS_GW_SMALL_AFTER=$(rss_mb "$GW_SMALL_PID")
RSS_GW_BIG_AFTER=$(rss_mb "$GW_BIG_PID")

# How the gateway's work split over its proxy services (SO_REUSEPORT
# spreads connections by a hash of their addresses): each service
# thread's share of the CPU the service threads used in the rounds.
service_split() {
    join <(echo "$SERVICE_TICKS_BEFORE") <(echo "$SERVICE_TICKS_AFTER") | awk '
        { name[NR] = $1; d[NR] = $3 - $2; total += $3 - $2 }
        END {
            if (total <= 0) { print "-"; exit }
            for (i = 1; i <= NR; i++) printf "%s%s %.0f%%", (i > 1 ? ", " : ""), name[i], 100 * d[i] / total
            print ""
        }'
}

# One column of the rows for target $1 with keys $2: medians over rounds.
col() {
    local values
    mapfile -t values < <(awk -F'\t' -v n="$1" -v k="$2" -v c="$3" '$1 == n && $2 == k { print $c }' "$RESULTS_TSV")
    median "${values[@]}"
}

throughput_table() {
    echo "| target | keys | req/s (median) | p50 ms | p99 ms | CPU µs/req | user | sys | req/s vs nginx | p99 vs nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local t name keys url pid rps p50 p99 cpu user sys ratio p99_ratio base base_p99
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r name keys url pid <<<"$t"
        rps=$(col "$name" "$keys" 4)
        p50=$(col "$name" "$keys" 5)
        p99=$(col "$name" "$keys" 6)
        cpu=$(col "$name" "$keys" 7)
        user=$(col "$name" "$keys" 10)
        sys=$(col "$name" "$keys" 11)
        ratio="-" p99_ratio="-"
        base=$(col nginx "$keys" 4)
        base_p99=$(col nginx "$keys" 6)
        if [ "$name" != "upstream direct" ] && [ "$base" != "-" ]; then
            ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "-" }')
            p99_ratio=$(awk -v a="$p99" -v b="$base_p99" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "-" }')
        fi
        [ "$rps" = "-" ] || rps=$(printf '%.0f' "$rps")
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$keys" "$rps" "$p50" "$p99" \
            "$cpu" "$user" "$sys" "$ratio" "$p99_ratio"
    done
}

# ---------------------------------------------------------------- fixed rate

# The latency a user feels: the same steady rate (well below saturation)
# sent direct to the upstream, through nginx and through the gateway, in
# interleaved rounds; each round's p50 and p99 minus direct's of the same
# round is what the proxy adds.
FR_TARGETS=("upstream direct|http://127.0.0.1:$P_UP/api/generate|")
[ -n "$NGX_SMALL_PID" ] && FR_TARGETS+=("nginx|http://127.0.0.1:$P_NGX_SMALL/ollama/api/generate|$NGX_SMALL_PID")
FR_TARGETS+=("ai-gateway|http://127.0.0.1:$P_GW_SMALL/ollama/api/generate|$GW_SMALL_PID")
FR_TSV=$TMP/fixed-rate.tsv
: >"$FR_TSV"
for round in $(seq 1 "$ROUNDS"); do
    for t in "${FR_TARGETS[@]}"; do
        IFS='|' read -r name url pid <<<"$t"
        say "fixed rate, round $round/$ROUNDS: $name at $RATE req/s for ${FR_SECS}s on $FR_CONNS connections"
        out=$TMP/fixed-${name// /_}-$round.txt
        u0=0 s0=0 u1=0 s1=0
        [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
        run_fg timeout $((FR_SECS + 60)) "$FIXED_RATE_BIN" --url "$url" --rate "$RATE" --secs "$FR_SECS" \
            --conns "$FR_CONNS" --method POST --body "$REQUEST_BODY" -H "Content-Type: application/json" \
            -H "X-API-Key: $KEY" >"$out" 2>&1 || say "fixed_rate against $url failed (see $out)"
        [ -n "$pid" ] && read -r u1 s1 < <(cpu_ticks "$pid")
        # sent N measured N errors N late N rate R p50 X p90 X p99 X ...
        read -r sent errors late p50 p99 < <(awk '/^sent / { print $2, $6, $8, $12, $16 }' "$out")
        cpu="-"
        [ -n "$pid" ] && cpu=$(us_per_req $((u1 - u0 + s1 - s0)) "${sent:-0}")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "${p50:--}" "${p99:--}" "$cpu" \
            "${errors:--}" "${late:--}" >>"$FR_TSV"
        [ "${errors:-1}" = 0 ] || note "fixed rate, $name round $round: ${errors:-?} errors"
    done
done

# Column $2 of target $1's fixed-rate rows: median over rounds; with $3 =
# "added", each round's value minus direct's of the same round first.
fr_col() {
    local values
    mapfile -t values < <(awk -F'\t' -v n="$1" -v c="$2" -v added="${3:-}" '
        $1 == "upstream direct" { direct[$2] = $c }
        $1 == n { mine[$2] = $c }
        END { for (r in mine) if (added == "") print mine[r]; else if (r in direct) printf "%.3f\n", mine[r] - direct[r] }' "$FR_TSV")
    median "${values[@]}"
}

fixed_rate_table() {
    echo "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req | late | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local t name url pid late errors
    for t in "${FR_TARGETS[@]}"; do
        IFS='|' read -r name url pid <<<"$t"
        late=$(awk -F'\t' -v n="$name" '$1 == n { s += $7 } END { print s + 0 }' "$FR_TSV")
        errors=$(awk -F'\t' -v n="$name" '$1 == n { s += $6 } END { print s + 0 }' "$FR_TSV")
        if [ "$name" = "upstream direct" ]; then
            printf '| %s | %s | %s | - | - | - | %s | %s |\n' "$name" "$(fr_col "$name" 3)" "$(fr_col "$name" 4)" "$late" "$errors"
        else
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$(fr_col "$name" 3)" "$(fr_col "$name" 4)" \
                "$(fr_col "$name" 3 added)" "$(fr_col "$name" 4 added)" "$(fr_col "$name" 5)" "$late" "$errors"
        fi
    done
}

# ---------------------------------------------------------------- HTTPS

HTTPS_OK=0
if [ -n "$NGINX" ]; then
    say "HTTPS: nginx and the gateway with the same certificate; keep-alive, a new connection per request, full and resumed handshakes"
    make_cert
    start_nginx_tls "$P_NGX_TLS"
    start_gateway_tls "$P_GW_TLS" "$P_GW_TLS_PLAIN"
    HTTPS_TSV=$TMP/https.tsv
    : >"$HTTPS_TSV"
    for round in $(seq 1 "$ROUNDS"); do
        for t in "nginx|$P_NGX_TLS|$NGINX_TLS_PID" "ai-gateway|$P_GW_TLS|$GATEWAY_TLS_PID"; do
            IFS='|' read -r name port pid <<<"$t"
            url="https://127.0.0.1:$port/ollama/api/generate"
            say "HTTPS round $round/$ROUNDS: $name: keep-alive"
            run_wrk "$TMP/wrk-tls-$name-$round.txt" "$url" "$DURATION" "$pid"
            ka_rps=$WRK_RPS ka_p99=$WRK_P99 ka_cpu=$WRK_CPU
            [ $((WRK_NON2XX + WRK_SOCKERR)) = 0 ] || note "HTTPS $name keep-alive round $round: $WRK_NON2XX non-2xx, $WRK_SOCKERR socket errors"
            say "HTTPS round $round/$ROUNDS: $name: Connection: close"
            run_wrk "$TMP/wrk-tls-close-$name-$round.txt" "$url" "$DURATION" "$pid" "Connection: close"
            nc_rps=$WRK_RPS nc_cpu=$WRK_CPU
            [ "$WRK_NON2XX" = 0 ] || note "HTTPS $name Connection: close round $round: $WRK_NON2XX non-2xx"
            say "HTTPS round $round/$ROUNDS: $name: full handshakes ($HTTPS_N x openssl s_time -new)"
            secs=$(awk -v d="$DURATION" 'BEGIN { print int(d + 0) }')
            handshake_rate "$port" "$secs" "$pid"
            say "HTTPS round $round/$ROUNDS: $name: resumed handshakes, TLS 1.2 ($HTTPS_N x openssl s_time -reuse -tls1_2)"
            resumed_rate "$port" "$secs" "$pid" -tls1_2
            rs12_rate=$RS_RATE rs12_cpu=$RS_CPU rs12_share=$RS_SHARE
            say "HTTPS round $round/$ROUNDS: $name: resumed handshakes, TLS 1.3 ($HTTPS_N x openssl s_time -reuse -tls1_3 -www)"
            resumed_rate "$port" "$secs" "$pid" -tls1_3 -www /ollama/api/generate
            [ "$rs12_share" = 100 ] && [ "$RS_SHARE" = 100 ] ||
                note "HTTPS $name round $round: resumed only $rs12_share% (TLS 1.2) and $RS_SHARE% (TLS 1.3) of the connections presenting a session"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$ka_rps" "$ka_p99" "$ka_cpu" \
                "$nc_rps" "$nc_cpu" "$HS_RATE" "$HS_CPU" "$rs12_rate" "$rs12_cpu" "$rs12_share" "$RS_RATE" "$RS_CPU" \
                "$RS_SHARE" >>"$HTTPS_TSV"
        done
    done
    HTTPS_OK=1
else
    note "HTTPS phase skipped: it compares with nginx, which is not available"
fi

https_col() {
    local values
    mapfile -t values < <(awk -F'\t' -v n="$1" -v c="$2" '$1 == n { print $c }' "$HTTPS_TSV")
    median "${values[@]}"
}

https_table() {
    echo "| target | keep-alive req/s | p99 ms | CPU µs/req | Connection: close req/s | CPU µs/req | full handshakes/s | CPU µs/handshake |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local name c
    for name in nginx ai-gateway; do
        printf '| %s |' "$name"
        for c in 3 4 5 6 7 8 9; do
            printf ' %s |' "$(https_col "$name" "$c")"
        done
        echo
    done
    printf '| ai-gateway / nginx |'
    for c in 3 4 5 6 7 8 9; do
        awk -v a="$(https_col ai-gateway "$c")" -v b="$(https_col nginx "$c")" 'BEGIN { if (b > 0) printf " %.2f× |", a / b; else printf " - |" }'
    done
    echo
}

https_resumed_table() {
    echo "| target | TLS 1.2 resumed/s | CPU µs/conn | resumed | TLS 1.3 resumed/s (+ a request) | CPU µs/conn | resumed | full handshakes/s |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local name c
    for name in nginx ai-gateway; do
        printf '| %s | %s | %s | %s%% | %s | %s | %s%% | %s |\n' "$name" "$(https_col "$name" 10)" "$(https_col "$name" 11)" \
            "$(https_col "$name" 12)" "$(https_col "$name" 13)" "$(https_col "$name" 14)" "$(https_col "$name" 15)" \
            "$(https_col "$name" 8)"
    done
    printf '| ai-gateway / nginx |'
    for c in 10 11 12 13 14 15 8; do
        case $c in
            12 | 15) printf ' |' ;;
            *) awk -v a="$(https_col ai-gateway "$c")" -v b="$(https_col nginx "$c")" 'BEGIN { if (b > 0) printf " %.2f× |", a / b; else printf " - |" }' ;;
        esac
    done
    echo
}

# ---------------------------------------------------------------- streaming

say "streaming: $STREAM_N requests each, direct and through the gateway"
cat >"$TMP/stream_client.py" <<'EOF'
import http.client, statistics, sys, time
direct_port, gw_port, key, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# The order of the targets rotates, so none always runs just after another.
body = b'{"model":"llama3.2:1b","prompt":"Why is the sky blue?","stream":true}'
def one(port, path, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.perf_counter()
    c.request("POST", path, body=body, headers=headers)
    r = c.getresponse()
    t_head = time.perf_counter()
    first = r.readline()
    t_first = time.perf_counter()
    rest = r.read()
    t_end = time.perf_counter()
    c.close()
    if r.status != 200 or not first.startswith(b"{") or b'"done":true' not in rest:
        raise SystemExit("bad streaming response from port %d: %d %r" % (port, r.status, first[:80]))
    return (t_head - t0) * 1000, (t_first - t0) * 1000, (t_end - t0) * 1000
targets = [
    ("direct", direct_port, "/api/generate", {"Content-Type": "application/json"}),
    ("gateway", gw_port, "/stream/api/generate", {"Content-Type": "application/json", "X-API-Key": key}),
    ("gateway-ai", gw_port, "/stream-ai/api/generate", {"Content-Type": "application/json", "X-API-Key": key}),
]
res = {name: [] for name, _, _, _ in targets}
for i in range(n):
    for k in range(len(targets)):
        name, port, path, headers = targets[(i + k) % len(targets)]
        res[name].append(one(port, path, headers))
for name, rows in res.items():
    head, first, total = (statistics.median(col) for col in zip(*rows))
    print("%s %.2f %.2f %.2f" % (name, head, first, total))
EOF
STREAM_OUT=$TMP/stream.txt
if run_fg timeout 300 python3 "$TMP/stream_client.py" "$P_STREAM" "$P_GW_SMALL" "$KEY" "$STREAM_N" >"$STREAM_OUT" 2>&1; then
    read -r _ SD_HEAD SD_FIRST SD_TOTAL < <(grep '^direct ' "$STREAM_OUT")
    read -r _ SG_HEAD SG_FIRST SG_TOTAL < <(grep '^gateway ' "$STREAM_OUT")
    read -r _ SA_HEAD SA_FIRST SA_TOTAL < <(grep '^gateway-ai ' "$STREAM_OUT")
    STREAM_OK=1
else
    note "streaming phase failed: $(tail -n 3 "$STREAM_OUT" | tr '\n' ' ')"
    STREAM_OK=0
fi

# ---------------------------------------------------------------- usage accounting

say "usage accounting: CPU-bound NDJSON streams through /fast/ (no api) and /fast-ai/ (api: ollama), $AI_ROUNDS round(s)"
AI_TSV=$TMP/ai.tsv
: >"$AI_TSV"
tokens_counted() {
    curl -s -m 5 "http://127.0.0.1:$P_ADM_SMALL/metrics" |
        awk '/^agw_tokens_total\{/ { n += $2 } END { printf "%.0f", n }'
}
AI_TOKENS_BEFORE=$(tokens_counted)
for round in $(seq 1 "$AI_ROUNDS"); do
    # Alternate which goes first.
    pair=("off|/fast/" "on|/fast-ai/")
    [ $((round % 2)) = 0 ] && pair=("on|/fast-ai/" "off|/fast/")
    for t in "${pair[@]}"; do
        IFS='|' read -r mode path <<<"$t"
        say "usage accounting round $round/$AI_ROUNDS: $mode ($path)"
        run_wrk "$TMP/wrk-ai-$mode-$round.txt" "http://127.0.0.1:$P_GW_SMALL${path}api/generate" "$DURATION" "$GW_SMALL_PID"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$WRK_RPS" "$WRK_P50" "$WRK_P99" \
            "$WRK_CPU" "$WRK_NON2XX" "$WRK_SOCKERR" >>"$AI_TSV"
        [ $((WRK_NON2XX + WRK_SOCKERR)) = 0 ] ||
            note "usage accounting $mode round $round: $WRK_NON2XX non-2xx responses, $WRK_SOCKERR socket errors"
    done
done
AI_TOKENS=$(($(tokens_counted) - AI_TOKENS_BEFORE))
ai_col() {
    local values
    mapfile -t values < <(awk -F'\t' -v m="$1" -v c="$2" '$1 == m { print $c }' "$AI_TSV")
    median "${values[@]}"
}
# The ratio of each round's pair (on / off): paired, so that the load of a
# shared machine, which moves between rounds, cancels out.
mapfile -t AI_RATIOS < <(awk -F'\t' '
    $1 == "off" { off[$2] = $3 } $1 == "on" { on[$2] = $3 }
    END { for (r in on) if (off[r] > 0) printf "%.4f\n", on[r] / off[r] }' "$AI_TSV")
AI_RATIO_MEDIAN=$(median "${AI_RATIOS[@]}")
mapfile -t AI_CPU_RATIOS < <(awk -F'\t' '
    $1 == "off" { off[$2] = $6 } $1 == "on" { on[$2] = $6 }
    END { for (r in on) if (off[r] > 0) printf "%.4f\n", on[r] / off[r] }' "$AI_TSV")
AI_CPU_RATIO_MEDIAN=$(median "${AI_CPU_RATIOS[@]}")
AI_RATIO_LIST=$(printf '%s\n' "${AI_RATIOS[@]}" | sort -g | awk '{ printf "%s%.2f", (NR > 1 ? ", " : ""), $1 }')
[ "$AI_TOKENS" -gt 0 ] || note "usage accounting: no tokens were counted on /fast-ai/ (agw_tokens_total did not grow)"

# The same comparison on paced streams, as Ollama sends them (the streaming
# upstream: first line after 10 ms, then one every 20 ms): /stream/ and
# /stream-ai/, many connections, the order alternating.
say "usage accounting on paced streams: /stream/ and /stream-ai/, $PACED_ROUNDS round(s) of wrk -c$PACED_CONNS"
PACED_TSV=$TMP/paced.tsv
: >"$PACED_TSV"
for round in $(seq 1 "$PACED_ROUNDS"); do
    pair=("off|/stream/" "on|/stream-ai/")
    [ $((round % 2)) = 0 ] && pair=("on|/stream-ai/" "off|/stream/")
    for t in "${pair[@]}"; do
        IFS='|' read -r mode path <<<"$t"
        say "paced usage round $round/$PACED_ROUNDS: $mode ($path)"
        CONNS=$PACED_CONNS run_wrk "$TMP/wrk-paced-$mode-$round.txt" "http://127.0.0.1:$P_GW_SMALL${path}api/generate" "$DURATION" "$GW_SMALL_PID"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$WRK_RPS" "$WRK_P50" "$WRK_P99" "$WRK_CPU" >>"$PACED_TSV"
        [ $((WRK_NON2XX + WRK_SOCKERR)) = 0 ] ||
            note "paced usage $mode round $round: $WRK_NON2XX non-2xx responses, $WRK_SOCKERR socket errors"
    done
done
paced_col() {
    local values
    mapfile -t values < <(awk -F'\t' -v m="$1" -v c="$2" '$1 == m { print $c }' "$PACED_TSV")
    median "${values[@]}"
}
mapfile -t PACED_RATIOS < <(awk -F'\t' '
    $1 == "off" { off[$2] = $3 } $1 == "on" { on[$2] = $3 }
    END { for (r in on) if (off[r] > 0) printf "%.4f\n", on[r] / off[r] }' "$PACED_TSV")
PACED_RATIO_MEDIAN=$(median "${PACED_RATIOS[@]}")
PACED_RATIO_LIST=$(printf '%s\n' "${PACED_RATIOS[@]}" | sort -g | awk '{ printf "%s%.3f", (NR > 1 ? ", " : ""), $1 }')

# ---------------------------------------------------------------- reload under load

say "reload under load: gateway with $BIG_KEYS keys, wrk ${RELOAD_SECS}s without and with SIGHUP every second"
GW_BIG_LOG=$TMP/gateway-$BIG_KEYS/gateway.log
RSS_RELOAD_BEFORE=$(rss_mb "$GW_BIG_PID")
run_wrk "$TMP/wrk-reload-baseline.txt" "http://127.0.0.1:$P_GW_BIG/ollama/api/generate" "${RELOAD_SECS}s" "$GW_BIG_PID"
RB_RPS=$WRK_RPS RB_P50=$WRK_P50 RB_P99=$WRK_P99 RB_NON2XX=$WRK_NON2XX RB_SOCKERR=$WRK_SOCKERR
reloads_before=$(grep -c 'reload (SIGHUP): generation' "$GW_BIG_LOG" || true)
(
    sleep 0.5
    for _ in $(seq 1 $((RELOAD_SECS - 1))); do
        kill -HUP "$GW_BIG_PID" 2>/dev/null || exit 0
        sleep 1
    done
) &
HUP_PID=$!
PIDS+=("$HUP_PID")
run_wrk "$TMP/wrk-reload.txt" "http://127.0.0.1:$P_GW_BIG/ollama/api/generate" "${RELOAD_SECS}s" "$GW_BIG_PID"
RR_RPS=$WRK_RPS RR_P50=$WRK_P50 RR_P99=$WRK_P99 RR_NON2XX=$WRK_NON2XX RR_SOCKERR=$WRK_SOCKERR
wait "$HUP_PID" 2>/dev/null || true
forget_pid "$HUP_PID"
# Let the last reload finish.
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ]; do
    done_reloads=$(($(grep -c 'reload (SIGHUP): generation' "$GW_BIG_LOG" || true) - reloads_before))
    [ "$done_reloads" -ge $((RELOAD_SECS - 1)) ] && break
    sleep 0.5
done
sleep 1
RSS_RELOAD_AFTER=$(rss_mb "$GW_BIG_PID")
mapfile -t RELOAD_MS < <(grep 'reload (SIGHUP): generation' "$GW_BIG_LOG" | tail -n +$((reloads_before + 1)) |
    sed -n 's/.* in \([0-9]*\) ms.*/\1/p')
RELOADS_DONE=${#RELOAD_MS[@]}
RELOAD_FAILED=$(grep -c 'reload (SIGHUP) failed' "$GW_BIG_LOG" || true)
if [ "$RELOADS_DONE" -gt 0 ]; then
    RELOAD_MEDIAN=$(median "${RELOAD_MS[@]}")
    RELOAD_MAX=$(printf '%s\n' "${RELOAD_MS[@]}" | sort -g | tail -n 1)
else
    RELOAD_MEDIAN="-" RELOAD_MAX="-"
    note "no reload was logged (looked for 'reload (SIGHUP): generation N, ... in X ms' in $GW_BIG_LOG)"
fi

# ---------------------------------------------------------------- idle connections

say "memory: $IDLE_CONNS idle keep-alive connections to the gateway with $SMALL_KEYS keys"
cat >"$TMP/idle_conns.py" <<'EOF'
import socket, sys, time
port, n, key, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
body = b'{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}'
req = (b"POST /ollama/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
       b"X-API-Key: " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
socks, failed = [], 0
for i in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(head.split(b"\r\n")[0].decode())
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            rest += chunk
        socks.append(s)
    except OSError as e:
        failed += 1
        if failed == 1:
            print("first failure at connection %d: %s" % (i, e), flush=True)
print("ready %d %d" % (len(socks), failed), flush=True)
time.sleep(hold)
EOF
RSS_IDLE_BEFORE=$(rss_mb "$GW_SMALL_PID")
FD_BEFORE=$(find "/proc/$GW_SMALL_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
start_bg "$TMP/idle.txt" timeout 200 python3 "$TMP/idle_conns.py" "$P_GW_SMALL" "$IDLE_CONNS" "$KEY" 120
IDLE_PID=$STARTED_PID
deadline=$((SECONDS + 150))
while [ "$SECONDS" -lt "$deadline" ] && ! grep -q '^ready' "$TMP/idle.txt"; do
    kill -0 "$IDLE_PID" 2>/dev/null || break
    sleep 0.5
done
IDLE_OPEN="-" IDLE_FAILED="-" RSS_IDLE_WITH="-" FD_WITH="-"
if grep -q '^ready' "$TMP/idle.txt"; then
    read -r _ IDLE_OPEN IDLE_FAILED < <(grep '^ready' "$TMP/idle.txt")
    sleep 1
    RSS_IDLE_WITH=$(rss_mb "$GW_SMALL_PID")
    FD_WITH=$(find "/proc/$GW_SMALL_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    [ "$IDLE_FAILED" = 0 ] || note "idle connections: $IDLE_FAILED of $IDLE_CONNS failed ($(grep '^first failure' "$TMP/idle.txt" || true))"
else
    note "idle connections: the client did not finish opening $IDLE_CONNS connections ($(tail -n 2 "$TMP/idle.txt" | tr '\n' ' '))"
fi
stop_pid "$IDLE_PID"
sleep 1
RSS_IDLE_AFTER=$(rss_mb "$GW_SMALL_PID")
FD_AFTER=$(find "/proc/$GW_SMALL_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)

# ---------------------------------------------------------------- report

per_conn_kb() {
    awk -v a="$RSS_IDLE_BEFORE" -v b="$RSS_IDLE_WITH" -v n="$IDLE_OPEN" \
        'BEGIN { if (n + 0 > 0 && b != "-") printf "%.1f", (b - a) * 1024 / n; else print "-" }'
}

report() {
    echo "# ai-gateway load bench"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n): $(nproc) cores, $(uname -sr)," \
        "git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')."
    echo "Load: \`wrk -t$THREADS -c$CONNS -d$DURATION --latency\`, POST with a ${#REQUEST_BODY}-byte JSON body and"
    echo "\`X-API-Key\`, $ROUNDS round(s) interleaving the targets; medians over rounds. Upstream: $UPSTREAM_KIND,"
    echo "answering a ${#GENERATE_BODY}-byte JSON body. nginx: 2 workers, \`map\` of the keys, keepalive 64 upstream."
    echo "ai-gateway: \`threads: 2\` (two proxy services of one thread each, a listening socket each with SO_REUSEPORT),"
    echo "one route \`/ollama/\` (strip_prefix). Everything on loopback, sharing the cores with wrk."
    echo "CPU µs/req is the server's user+system time (nginx: master and workers; not the upstream's) per request,"
    echo "then split into user and system time."
    echo "Load average (1/5/15 min) at the start: $LOADAVG_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "(a machine busy with anything else makes these numbers meaningless)."
    echo
    echo "## Throughput"
    echo
    throughput_table
    echo
    local on off
    on=$(col "ai-gateway, limits on" "$SMALL_KEYS" 4)
    off=$(col ai-gateway "$SMALL_KEYS" 4)
    echo "Fair-use limits on (a rate limit and \`max_concurrent\` the benched key never reaches, the failed-key"
    echo "throttle on) against off, same run: $(awk -v a="$on" -v b="$off" 'BEGIN { if (b > 0) printf "%.3f×", a / b; else print "-" }') req/s."
    echo
    if [ -n "$GW_SHARED_PID" ]; then
        local shared
        shared=$(col "ai-gateway, limits shared" "$SMALL_KEYS" 4)
        echo "The same limits counted in Redis (\`shared_state\`, redis-server on loopback; leases of up to 256"
        echo "requests, slots returned every 100 ms) against counted locally, same run: $(awk -v a="$shared" -v b="$on" 'BEGIN { if (b > 0) printf "%.3f×", a / b; else print "-" }') req/s"
        echo "(goal: at least 0.9×)."
        echo
    fi
    echo "## HTTPS"
    echo
    if [ "$HTTPS_OK" = 1 ]; then
        echo "nginx (2 workers, \`ssl_protocols TLSv1.2 TLSv1.3\`, \`ssl_session_cache shared:SSL:10m\`, \`ssl_session_tickets on\`,"
        echo "defaults otherwise) and ai-gateway (\`threads: 2\`, a TLS"
        echo "listener with certificate files) with the same ECDSA P-256 certificate, the same key check and upstream; wrk"
        echo "negotiates TLS 1.3 and HTTP/1.1. Keep-alive: \`wrk -t$THREADS -c$CONNS -d$DURATION\`. Connection: close: the same"
        echo "with that header (a new TCP and TLS connection per request; wrk may resume sessions). Full handshakes:"
        echo "$HTTPS_N parallel \`openssl s_time -new -time N\` (a full handshake per connection, no request). Medians over"
        echo "$ROUNDS round(s), interleaved."
        echo
        https_table
        echo
        echo "Resumed handshakes: $HTTPS_N parallel \`openssl s_time -reuse -time N\`, each a full handshake then every"
        echo "connection presenting that session (a ticket or the session ID, as the server offers), so on the gateway"
        echo "connections land on both proxy services. TLS 1.2: \`-tls1_2\`, no request. TLS 1.3: \`-tls1_3 -www"
        echo "/ollama/api/generate\` (s_time takes in the TLS 1.3 ticket, which comes after the handshake, only when it"
        echo "reads an answer: one request without a key per connection, answered 401 by both). *Resumed* is the share of"
        echo "connections that resumed. Full handshakes/s is from the table above."
        echo
        https_resumed_table
    else
        echo "Skipped; see the notes."
    fi
    echo "How the gateway ($SMALL_KEYS keys) split its work over its proxy services in these rounds (share of"
    echo "the CPU of the service threads; SO_REUSEPORT spreads connections by a hash of their addresses): $(service_split)."
    echo
    echo "## Fixed rate ($RATE req/s)"
    echo
    echo "\`examples/fixed_rate.rs\`: $RATE req/s for ${FR_SECS}s (the first second not measured) on $FR_CONNS keep-alive"
    echo "connections, the same POST; $ROUNDS round(s) interleaving the targets; medians over rounds. Latency runs from"
    echo "writing a request to reading its whole response. *Added* is a round's figure minus the upstream's own (direct)"
    echo "in the same round: what the proxy adds. *Late* counts requests that left over 1 ms after their due time."
    echo
    fixed_rate_table
    echo
    local gw_add ngx_add
    gw_add=$(fr_col ai-gateway 3 added)
    ngx_add=$(fr_col nginx 3 added)
    echo "At p50 the gateway adds $gw_add ms over direct, nginx $ngx_add ms: a difference of" \
        "$(awk -v a="$gw_add" -v b="$ngx_add" 'BEGIN { if (a != "-" && b != "-") printf "%.3f ms", a - b; else print "-" }')."
    echo
    echo "## Streaming (time to first chunk)"
    echo
    if [ "$STREAM_OK" = 1 ]; then
        echo "NDJSON upstream (examples/bench_upstream.rs: header at once, first line after 10 ms, then one every 20 ms,"
        echo "10 lines); $STREAM_N requests each, a new connection per request, medians in ms."
        echo
        echo "| path | response header | first chunk | whole stream |"
        echo "|---|---:|---:|---:|"
        echo "| upstream direct | $SD_HEAD | $SD_FIRST | $SD_TOTAL |"
        echo "| through ai-gateway | $SG_HEAD | $SG_FIRST | $SG_TOTAL |"
        echo "| through ai-gateway, \`api: ollama\` (usage read) | $SA_HEAD | $SA_FIRST | $SA_TOTAL |"
        echo
        awk -v a="$SD_FIRST" -v b="$SG_FIRST" 'BEGIN { printf "The gateway adds **%.2f ms** to the time to first chunk.\n", b - a }'
        awk -v a="$SG_FIRST" -v b="$SA_FIRST" 'BEGIN { printf "Reading usage (`api: ollama`) changes it by **%+.2f ms**.\n", b - a }'
    else
        echo "Failed; see the notes."
    fi
    echo
    echo "## Usage accounting (api: ollama) on streams"
    echo
    echo "The same gateway, two routes to one NDJSON upstream that streams 10 lines without pauses (CPU-bound:"
    echo "examples/bench_upstream.rs \`--mode ndjson --first-ms 0 --interval-ms 0\`, the last line with"
    echo "\`prompt_eval_count\` and \`eval_count\`): \`/fast/\` without \`api\`, \`/fast-ai/\` with \`api: ollama\`"
    echo "(every answer read for usage, tokens counted in metrics). Same wrk settings, $AI_ROUNDS round(s) of one run"
    echo "each, the order alternating; medians over rounds."
    echo
    echo "| route | req/s | p50 ms | p99 ms | CPU µs/req |"
    echo "|---|---:|---:|---:|---:|"
    echo "| without \`api\` | $(ai_col off 3) | $(ai_col off 4) | $(ai_col off 5) | $(ai_col off 6) |"
    echo "| \`api: ollama\` | $(ai_col on 3) | $(ai_col on 4) | $(ai_col on 5) | $(ai_col on 6) |"
    echo
    awk -v a="$(ai_col off 3)" -v b="$(ai_col on 3)" -v m="$AI_RATIO_MEDIAN" -v l="$AI_RATIO_LIST" 'BEGIN {
        if (a > 0) printf "req/s with usage accounting / without: **%.3f** as the median of the per-round ratios (%s); %.3f as the ratio of the medians (goal: at least 0.98).\n", m, l, b / a }'
    awk -v c="$AI_CPU_RATIO_MEDIAN" 'BEGIN { printf "The gateway'"'"'s CPU time per request with usage accounting / without: %.3f (median of the per-round ratios).\n", c }'
    echo "Tokens the gateway counted on \`/fast-ai/\` during these runs: $AI_TOKENS (agw_tokens_total)."
    echo
    echo "On paced streams, as Ollama sends them (the streaming upstream above: the first line after 10 ms, then one"
    echo "every 20 ms, 10 lines): \`/stream/\` against \`/stream-ai/\` (\`api: ollama\`), \`wrk -t$THREADS -c$PACED_CONNS -d$DURATION\`,"
    echo "$PACED_ROUNDS round(s), the order alternating; medians over rounds."
    echo
    echo "| route | req/s | p50 ms | p99 ms | CPU µs/req |"
    echo "|---|---:|---:|---:|---:|"
    echo "| without \`api\` | $(paced_col off 3) | $(paced_col off 4) | $(paced_col off 5) | $(paced_col off 6) |"
    echo "| \`api: ollama\` | $(paced_col on 3) | $(paced_col on 4) | $(paced_col on 5) | $(paced_col on 6) |"
    echo
    awk -v m="$PACED_RATIO_MEDIAN" -v l="$PACED_RATIO_LIST" 'BEGIN {
        printf "req/s with usage accounting / without on paced streams: **%.3f** as the median of the per-round ratios (%s; goal: at least 0.98).\n", m, l }'
    echo
    echo "## Reload under load ($BIG_KEYS keys)"
    echo
    echo "wrk ${RELOAD_SECS}s each (same settings as above); during the second, SIGHUP every second."
    echo
    echo "| run | req/s | p50 ms | p99 ms | non-2xx | socket errors |"
    echo "|---|---:|---:|---:|---:|---:|"
    echo "| no reloads | $RB_RPS | $RB_P50 | $RB_P99 | $RB_NON2XX | $RB_SOCKERR |"
    echo "| SIGHUP every 1 s | $RR_RPS | $RR_P50 | $RR_P99 | $RR_NON2XX | $RR_SOCKERR |"
    echo
    echo "- reloads logged: $RELOADS_DONE of $((RELOAD_SECS - 1)) SIGHUPs sent (failed: $RELOAD_FAILED); one reload took median $RELOAD_MEDIAN ms, max $RELOAD_MAX ms (first load: ${GW_BIG_LOAD_MS:-?} ms)"
    echo "- RSS before: $RSS_RELOAD_BEFORE MB, after: $RSS_RELOAD_AFTER MB"
    echo
    echo "## Memory"
    echo
    echo "| process | state | MB |"
    echo "|---|---|---:|"
    echo "| ai-gateway, $SMALL_KEYS keys | idle, just started (RSS) | $RSS_GW_SMALL_START |"
    echo "| ai-gateway, $SMALL_KEYS keys | idle, after the throughput runs (RSS) | $RSS_GW_SMALL_AFTER |"
    echo "| ai-gateway, $BIG_KEYS keys | idle, just started (RSS) | $RSS_GW_BIG_START |"
    echo "| ai-gateway, $BIG_KEYS keys | idle, after the throughput runs (RSS) | $RSS_GW_BIG_AFTER |"
    echo "| ai-gateway, $SMALL_KEYS keys | $IDLE_OPEN idle keep-alive client connections (RSS; fds $FD_BEFORE → $FD_WITH) | $RSS_IDLE_WITH |"
    echo "| ai-gateway, $SMALL_KEYS keys | after those connections closed (RSS; fds $FD_AFTER) | $RSS_IDLE_AFTER |"
    if [ -n "$NGX_SMALL_PID" ]; then
        echo "| nginx, $SMALL_KEYS keys | master + 2 workers, at start (sum of Pss) | $PSS_NGX_SMALL |"
    fi
    if [ -n "$NGX_BIG_PID" ]; then
        echo "| nginx, $BIG_KEYS keys | master + 2 workers, at start (sum of Pss) | $PSS_NGX_BIG |"
    fi
    echo
    echo "Idle connections cost about $(per_conn_kb) KB each in the gateway."
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "## Notes"
        echo
        printf -- '- %s\n' "${NOTES[@]}"
    fi
}

report >"$TMP/report.md"
cp "$TMP/report.md" "$RESULTS"
cat "$TMP/report.md"
say "report written to $RESULTS"
