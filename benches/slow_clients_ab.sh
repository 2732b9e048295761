#!/usr/bin/env bash
# What the connection cap and the client timeouts cost: two gateway builds
# side by side, on this machine, over loopback.
#
#   OLD_BIN=/path/to/old/ai-gateway NEW_BIN=/path/to/new/ai-gateway benches/slow_clients_ab.sh
#
# 1. Throughput: wrk against OLD and NEW in turn (the order swapped every
#    round), same config, same upstream (nginx answering a ~300-byte JSON
#    body); req/s and the gateway's CPU time per request, medians.
# 2. Memory: IDLE_CONNS connections held open against each build, RSS and
#    open fds before, with them, and (NEW) after the gateway has closed
#    them by client_idle_timeout (connections that made one request) or
#    client_header_timeout (connections that sent nothing). OLD has no
#    such limits (its idle keep-alive limit is a fixed 60 s): its
#    connections are closed by the client.
#
# Settings (environment): ROUNDS=5 DURATION=5s CONNS=64 THREADS=2
# IDLE_CONNS=10000 TIMEOUT=15 (the NEW build's client_idle_timeout and
# client_header_timeout, seconds). Needs nginx, wrk, curl, python3. The
# report goes to stdout; every process started here is stopped on exit.

set -euo pipefail

OLD_BIN=${OLD_BIN:?set OLD_BIN to the old ai-gateway binary}
NEW_BIN=${NEW_BIN:?set NEW_BIN to the new ai-gateway binary}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
IDLE_CONNS=${IDLE_CONNS:-10000}
TIMEOUT=${TIMEOUT:-15}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

say() { printf '[ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TMP=$(mktemp -d "${TMPDIR:-/tmp}/agw-ab.XXXXXX")
chmod 755 "$TMP"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

start_bg() { # $1 = log, rest = command; sets STARTED_PID
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

read -r P_UP P_OLD P_NEW < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')

KEY=agw_bench000000000000000000000000005
python3 - "$TMP/keys.json" <<'EOF'
import hashlib, sys
with open(sys.argv[1], "w") as f:
    f.write("{" + ",".join(
        '"sha256:%s":{"user":"user%d","service":"ollama"}'
        % (hashlib.sha256(("agw_bench%027d" % i).encode()).hexdigest(), i)
        for i in range(10)) + "}\n")
EOF
chmod 600 "$TMP/keys.json"
BODY='{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00.000000000Z","response":"The sky is blue because air molecules scatter short blue wavelengths of sunlight more than red ones.","done":true,"done_reason":"stop","total_duration":512345678,"load_duration":12345678,"prompt_eval_count":26,"prompt_eval_duration":23456789,"eval_count":21,"eval_duration":456789012}'
REQ='{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}'
cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$REQ'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "$KEY"
EOF

mkdir -p "$TMP/nginx"
user_line=""
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$TMP/nginx/nginx.conf" <<EOF
$user_line
daemon off;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$P_UP;
        location / { default_type application/json; return 200 '$BODY'; }
    }
}
EOF
start_bg "$TMP/nginx/out.log" "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log"

gateway_config() { # $1 = port, $2 = extra settings
    cat <<EOF
listen: "127.0.0.1:$1"
keys_file: $TMP/keys.json
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $TMP/upgrade-$1.sock
$2
routes:
  - {name: ollama, path_prefix: /ollama/, service: ollama, strip_prefix: true, upstreams: ["127.0.0.1:$P_UP"]}
EOF
}
gateway_config "$P_OLD" "" >"$TMP/old.yaml"
gateway_config "$P_NEW" "max_connections: $((IDLE_CONNS + 1000))
client_idle_timeout: ${TIMEOUT}s
client_header_timeout: ${TIMEOUT}s" >"$TMP/new.yaml"
start_bg "$TMP/old.log" env RUST_LOG=info "$OLD_BIN" run --config "$TMP/old.yaml"
OLD_PID=$STARTED_PID
start_bg "$TMP/new.log" env RUST_LOG=info "$NEW_BIN" run --config "$TMP/new.yaml"
NEW_PID=$STARTED_PID

ready() { # $1 = port
    local i
    for i in $(seq 1 100); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "X-API-Key: $KEY" --data "$REQ" \
            "http://127.0.0.1:$1/ollama/api/generate" || true)" = 200 ] && return 0
        sleep 0.1
    done
    echo "port $1 never answered 200" >&2
    exit 1
}
ready "$P_UP"
ready "$P_OLD"
ready "$P_NEW"

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

run_wrk() { # $1 = name, $2 = port, $3 = pid, $4 = duration; appends "rps us_per_req"
    local t0 t1 out rps reqs
    t0=$(cpu_ticks "$3")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$4" -s "$TMP/post.lua" "http://127.0.0.1:$2/ollama/api/generate")
    t1=$(cpu_ticks "$3")
    rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then
        echo "$1: non-2xx answers: $out" >&2
        exit 1
    fi
    echo "$rps $(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')" >>"$TMP/$1.runs"
}

say "warm-up"
run_wrk warm "$P_OLD" "$OLD_PID" 2s
run_wrk warm "$P_NEW" "$NEW_PID" 2s
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for b in $order; do
        if [ "$b" = old ]; then run_wrk old "$P_OLD" "$OLD_PID" "$DURATION"; else run_wrk new "$P_NEW" "$NEW_PID" "$DURATION"; fi
        say "round $r $b: $(tail -n 1 "$TMP/$b.runs")"
    done
done
OLD_RPS=$(cut -d' ' -f1 "$TMP/old.runs" | median)
NEW_RPS=$(cut -d' ' -f1 "$TMP/new.runs" | median)
OLD_CPU=$(cut -d' ' -f2 "$TMP/old.runs" | median)
NEW_CPU=$(cut -d' ' -f2 "$TMP/new.runs" | median)

# ------------------------------------------------------------ idle connections

cat >"$TMP/hold.py" <<'EOF'
# hold.py PORT N MODE KEY SECS: open N connections; MODE "request" makes one
# keep-alive request on each first, "silent" sends nothing. Prints
# "ready <open> <failed>", then holds them SECS seconds.
import socket, sys, time
port, n, mode, key, secs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
req = ("GET /ollama/api/tags HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n\r\n" % key).encode()
socks, failed = [], 0
for _ in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if mode == "request":
            s.sendall(req)
            got = b""
            while b"\r\n\r\n" not in got or not got.endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("closed")
                got += chunk
        socks.append(s)
    except OSError:
        failed += 1
print("ready", len(socks), failed, flush=True)
time.sleep(secs)
EOF

rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }

# $1 = label, $2 = pid, $3 = port, $4 = mode, $5 = wait for the gateway to close them (1/0)
hold_phase() {
    local label=$1 pid=$2 port=$3 mode=$4 closes=$5 before_rss before_fds with_rss with_fds t0 waited after_rss after_fds hold
    before_rss=$(rss_mb "$pid")
    before_fds=$(fds "$pid")
    hold=$((TIMEOUT * 3 + 30))
    start_bg "$TMP/hold.txt" python3 "$TMP/hold.py" "$port" "$IDLE_CONNS" "$mode" "$KEY" "$hold"
    local hold_pid=$STARTED_PID
    until grep -qs "^ready" "$TMP/hold.txt"; do sleep 0.2; done
    t0=$SECONDS
    with_rss=$(rss_mb "$pid")
    with_fds=$(fds "$pid")
    if [ "$closes" = 1 ]; then
        while [ "$(fds "$pid")" -gt $((before_fds + 50)) ] && [ $((SECONDS - t0)) -lt $((TIMEOUT * 3)) ]; do sleep 0.5; done
        waited="closed by the gateway $((SECONDS - t0)) s after the last one opened"
    else
        kill "$hold_pid" 2>/dev/null || true
        while [ "$(fds "$pid")" -gt $((before_fds + 50)) ] && [ $((SECONDS - t0)) -lt 30 ]; do sleep 0.5; done
        waited="closed by the client"
    fi
    sleep 1
    after_rss=$(rss_mb "$pid")
    after_fds=$(fds "$pid")
    kill "$hold_pid" 2>/dev/null || true
    wait "$hold_pid" 2>/dev/null || true
    echo "| $label | $(awk '/^ready/ { print $2 ", " $3 }' "$TMP/hold.txt") | $before_rss MB, $before_fds fds | $with_rss MB, $with_fds fds | $after_rss MB, $after_fds fds ($waited) |"
    rm -f "$TMP/hold.txt"
}

say "idle connections"
IDLE_ROWS=$(
    hold_phase "old, keep-alive after one request" "$OLD_PID" "$P_OLD" request 0
    hold_phase "new, keep-alive after one request" "$NEW_PID" "$P_NEW" request 1
    hold_phase "old, silent (no request)" "$OLD_PID" "$P_OLD" silent 0
    hold_phase "new, silent (no request)" "$NEW_PID" "$P_NEW" silent 1
)

cat <<EOF
### Throughput, old against new (\`wrk -t$THREADS -c$CONNS -d$DURATION\`, $ROUNDS rounds, order swapped each round)

| build | req/s per round | median req/s | gateway CPU µs/request (median) |
|---|---|---:|---:|
| old ($OLD_BIN) | $(cut -d' ' -f1 "$TMP/old.runs" | paste -sd' ') | $OLD_RPS | $OLD_CPU |
| new ($NEW_BIN) | $(cut -d' ' -f1 "$TMP/new.runs" | paste -sd' ') | $NEW_RPS | $NEW_CPU |

new / old, ratio of the medians: $(awk -v a="$NEW_RPS" -v b="$OLD_RPS" 'BEGIN { printf "%.3f", a / b }') (req/s), $(awk -v a="$NEW_CPU" -v b="$OLD_CPU" 'BEGIN { printf "%.3f", a / b }') (CPU per request).
Median of the per-round ratios (each round runs both back to back, so
load from elsewhere on the machine mostly cancels out): $(paste -d' ' "$TMP/new.runs" "$TMP/old.runs" | awk '{ print $1 / $3 }' | median | awk '{ printf "%.3f", $1 }') (req/s), $(paste -d' ' "$TMP/new.runs" "$TMP/old.runs" | awk '{ print $2 / $4 }' | median | awk '{ printf "%.3f", $1 }') (CPU per request).

### $IDLE_CONNS connections held open (new: client_idle_timeout and client_header_timeout ${TIMEOUT}s)

| build, connections | open, failed | before | with them | after they close |
|---|---|---|---|---|
$IDLE_ROWS
EOF
