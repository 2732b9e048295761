#!/usr/bin/env bash
# What the status page costs the proxy: the load test's throughput run
# (benches/load.sh: wrk POSTs with a key through /ollama/ to nginx
# answering a ~300-byte JSON body) against one gateway with its audit log
# (which feeds the page's history) and admin listener, in pairs of runs:
# one with the page fetched every 5 s (as a browser tab refreshing it
# would, with the admin key), one without, the order swapped every round.
#
#   GATEWAY_BIN=target/release/ai-gateway benches/status_page_ab.sh
#
# Settings (environment): ROUNDS=6 DURATION=10s CONNS=64 THREADS=2
# PAGE_EVERY=5 (seconds between page fetches), AUDIT_SEED (an audit log
# to start from, such as one benches/gen_audit_log.py wrote, so the page
# draws a month of many keys rather than the run's one key). Needs nginx, wrk, curl,
# python3. Prints every round (req/s, p99, the gateway's CPU per request)
# and the median of the paired ratios (with / without); every process
# started here is stopped on exit.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/ai-gateway}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
PAGE_EVERY=${PAGE_EVERY:-5}
AUDIT_SEED=${AUDIT_SEED:-}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

say() { printf '[status-ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/agw-status-ab.XXXXXX")
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

read -r P_UP P_GW P_ADM < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')

KEY=agw_bench000000000000000000000000005
ADMIN=agw_bench_admin_key_000000000000000
python3 - "$TMP/keys.json" "$ADMIN" <<'EOF'
import hashlib, sys
entries = ['"sha256:%s":{"user":"user%d","service":"ollama"}'
           % (hashlib.sha256(("agw_bench%027d" % i).encode()).hexdigest(), i) for i in range(10)]
entries.append('"sha256:%s":{"user":"root","admin":true}' % hashlib.sha256(sys.argv[2].encode()).hexdigest())
with open(sys.argv[1], "w") as f:
    f.write("{" + ",".join(entries) + "}\n")
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
worker_processes 1;
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

cat >"$TMP/gateway.yaml" <<EOF
listen: "127.0.0.1:$P_GW"
admin_listen: "127.0.0.1:$P_ADM"
keys_file: $TMP/keys.json
audit_log: $TMP/audit.log
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $TMP/upgrade.sock
failed_key_throttle: {enabled: false}
routes:
  - {name: ollama, path_prefix: /ollama/, service: ollama, strip_prefix: true, api: ollama, upstreams: ["127.0.0.1:$P_UP"]}
EOF
[ -z "$AUDIT_SEED" ] || cp "$AUDIT_SEED" "$TMP/audit.log"
start_bg "$TMP/gateway.log" env RUST_LOG=info "$GATEWAY_BIN" run --config "$TMP/gateway.yaml"
GW_PID=$STARTED_PID

ready() { # $1 = url
    local i
    for i in $(seq 1 100); do
        [ "$(curl --noproxy '*' -s -o /dev/null -w '%{http_code}' -X POST -H "X-API-Key: $KEY" --data "$REQ" "$1" || true)" = 200 ] && return 0
        sleep 0.1
    done
    echo "$1 never answered 200" >&2
    exit 1
}
ready "http://127.0.0.1:$P_UP/api/generate"
ready "http://127.0.0.1:$P_GW/ollama/api/generate"
page() {
    curl --noproxy '*' -s -o "$TMP/page.html" -w '%{http_code} %{size_download} %{time_total}\n' -u "root:$ADMIN" "http://127.0.0.1:$P_ADM/"
}
for _ in $(seq 1 600); do grep -q "history: rebuilt" "$TMP/gateway.log" && break; sleep 0.1; done
read -r code size secs < <(page)
[ "$code" = 200 ] || { echo "the page answered $code" >&2; exit 1; }
say "page: $size bytes in $secs s; $(grep -o 'history: rebuilt.*' "$TMP/gateway.log")"

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# One wrk run; $1 = with|without. Prints: mode req/s p99 cpu_us_per_req pages
run() {
    local mode=$1 fetcher="" t0 t1 out=$TMP/wrk-$1.txt pages=0
    if [ "$mode" = with ]; then
        (while :; do page >>"$TMP/pages.txt"; sleep "$PAGE_EVERY"; done) &
        fetcher=$!
    fi
    : >"$TMP/pages.txt"
    t0=$(cpu_ticks "$GW_PID")
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$TMP/post.lua" \
        "http://127.0.0.1:$P_GW/ollama/api/generate" >"$out" 2>&1
    t1=$(cpu_ticks "$GW_PID")
    if [ -n "$fetcher" ]; then
        kill "$fetcher" 2>/dev/null || true
        wait "$fetcher" 2>/dev/null || true
        pages=$(grep -c '^200 ' "$TMP/pages.txt" || true)
    fi
    awk -v mode="$mode" -v ticks=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v pages="$pages" '
        /^Requests\/sec:/ { rps = $2 }
        / requests in / { n = $1 }
        $1 == "99%" { p99 = $2 }
        END { printf "%s\t%.0f\t%s\t%.1f\t%d\n", mode, rps, p99, (n > 0 ? ticks * 1e6 / hz / n : 0), pages }' "$out"
}

printf 'round\tmode\treq/s\tp99\tCPU us/req\tpages fetched\n'
: >"$TMP/results.tsv"
for round in $(seq 1 "$ROUNDS"); do
    order=(without with)
    [ $((round % 2)) = 0 ] && order=(with without)
    for mode in "${order[@]}"; do
        say "round $round/$ROUNDS: $mode the page"
        line=$(run "$mode")
        printf '%s\t%s\n' "$round" "$line" | tee -a "$TMP/results.tsv"
    done
done
# Paired ratios (with / without), per round: the load of a shared machine,
# which moves between rounds, cancels out.
ratios() { # $1 = column (3 req/s, 5 CPU per request)
    awk -F'\t' -v c="$1" '$2 == "without" { off[$1] = $c } $2 == "with" { on[$1] = $c }
        END { for (r in on) if (off[r] > 0) printf "%.3f\n", on[r] / off[r] }' "$TMP/results.tsv" | sort -g
}
median() {
    awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
echo "req/s ratios (with/without), sorted: $(ratios 3 | tr '\n' ' ')"
echo "median req/s ratio: $(ratios 3 | median)"
echo "CPU per request ratios (with/without), sorted: $(ratios 5 | tr '\n' ' ')"
echo "median CPU ratio: $(ratios 5 | median)"
