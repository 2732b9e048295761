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
TIMEOUT=${TIMEOUT:-15}

# The load test's parts: settings, processes, the upstream, wrk, medians.
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/load
for lib in common peers nginx measure report; do
    # shellcheck source=/dev/null
    . "$BENCH_DIR/lib/$lib.sh"
done
INSTALL=0 SKIP_BUILD=1
setup_tools
[ -n "$NGINX" ] || die "nginx is needed (the upstream)"
setup_run
setup_peers
need_keys "$SMALL_KEYS"
need_upstream

gateway_config() { # $1 = port, $2 = extra settings
    cat <<EOF
listen: "127.0.0.1:$1"
keys_file: $TMP/keys-$SMALL_KEYS.json
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $TMP/upgrade-$1.sock
$2
routes:
  - {name: ollama, path_prefix: /ollama/, service: ollama, strip_prefix: true, upstreams: ["127.0.0.1:$P_UP"]}
EOF
}
alloc_ports P_OLD P_NEW
gateway_config "$P_OLD" "" >"$TMP/old.yaml"
gateway_config "$P_NEW" "max_connections: $((IDLE_CONNS + 1000))
client_idle_timeout: ${TIMEOUT}s
client_header_timeout: ${TIMEOUT}s" >"$TMP/new.yaml"
start_bg "$TMP/old.log" env RUST_LOG=info "$OLD_BIN" run --config "$TMP/old.yaml"
OLD_PID=$STARTED_PID
start_bg "$TMP/new.log" env RUST_LOG=info "$NEW_BIN" run --config "$TMP/new.yaml"
NEW_PID=$STARTED_PID
wait_ready "http://127.0.0.1:$P_OLD/ollama/api/generate" 200 30 "$OLD_PID" || die "the old build did not start"
wait_ready "http://127.0.0.1:$P_NEW/ollama/api/generate" 200 30 "$NEW_PID" || die "the new build did not start"

# One wrk run against build $1 (old or new) in round $2 (0: warm-up, not
# kept); appends "build round req/s CPU-us/req".
ab_run() {
    local port=$P_OLD pid=$OLD_PID dur=$DURATION
    [ "$1" = new ] && port=$P_NEW pid=$NEW_PID
    [ "$2" = 0 ] && dur=2s
    run_wrk "$TMP/wrk-$1-$2.txt" "http://127.0.0.1:$port/ollama/api/generate" "$dur" "$pid"
    [ "$WRK_NON2XX" = 0 ] || die "$1: $WRK_NON2XX non-2xx answers (see $TMP/wrk-$1-$2.txt)"
    [ "$2" = 0 ] || printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$WRK_RPS" "$WRK_CPU" >>"$TMP/runs.tsv"
    say "round $2 $1: $WRK_RPS req/s, $WRK_CPU µs/req"
}

say "warm-up"
ab_run old 0
ab_run new 0
: >"$TMP/runs.tsv"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for b in $order; do ab_run "$b" "$r"; done
done
OLD_RPS=$(tsv_median "$TMP/runs.tsv" 3 old)
NEW_RPS=$(tsv_median "$TMP/runs.tsv" 3 new)
OLD_CPU=$(tsv_median "$TMP/runs.tsv" 4 old)
NEW_CPU=$(tsv_median "$TMP/runs.tsv" 4 new)
# paired_ratios pairs "on" with "off" rows of a round: new with old.
sed 's/^old\t/off\t/; s/^new\t/on\t/' "$TMP/runs.tsv" >"$TMP/pairs.tsv"
per_round() { awk -F'\t' -v b="$1" '$1 == b { print $3 }' "$TMP/runs.tsv" | paste -sd' '; }

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

# $1 = label, $2 = pid, $3 = port, $4 = mode, $5 = wait for the gateway to close them (1/0)
hold_phase() {
    local label=$1 pid=$2 port=$3 mode=$4 closes=$5 before_rss before_fds with_rss with_fds t0 waited after_rss after_fds hold
    before_rss=$(rss_mb "$pid")
    before_fds=$(fd_count "$pid")
    hold=$((TIMEOUT * 3 + 30))
    start_bg "$TMP/hold.txt" python3 "$TMP/hold.py" "$port" "$IDLE_CONNS" "$mode" "$KEY" "$hold"
    local hold_pid=$STARTED_PID
    until grep -qs "^ready" "$TMP/hold.txt"; do sleep 0.2; done
    t0=$SECONDS
    with_rss=$(rss_mb "$pid")
    with_fds=$(fd_count "$pid")
    if [ "$closes" = 1 ]; then
        while [ "$(fd_count "$pid")" -gt $((before_fds + 50)) ] && [ $((SECONDS - t0)) -lt $((TIMEOUT * 3)) ]; do sleep 0.5; done
        waited="closed by the gateway $((SECONDS - t0)) s after the last one opened"
    else
        kill "$hold_pid" 2>/dev/null || true
        while [ "$(fd_count "$pid")" -gt $((before_fds + 50)) ] && [ $((SECONDS - t0)) -lt 30 ]; do sleep 0.5; done
        waited="closed by the client"
    fi
    sleep 1
    after_rss=$(rss_mb "$pid")
    after_fds=$(fd_count "$pid")
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
| old ($OLD_BIN) | $(per_round old) | $OLD_RPS | $OLD_CPU |
| new ($NEW_BIN) | $(per_round new) | $NEW_RPS | $NEW_CPU |

new / old, ratio of the medians: $(awk -v a="$NEW_RPS" -v b="$OLD_RPS" 'BEGIN { printf "%.3f", a / b }') (req/s), $(awk -v a="$NEW_CPU" -v b="$OLD_CPU" 'BEGIN { printf "%.3f", a / b }') (CPU per request).
Median of the per-round ratios (each round runs both back to back, so
load from elsewhere on the machine mostly cancels out): $(decimals 3 "$(median $(paired_ratios "$TMP/pairs.tsv" 3))") (req/s), $(decimals 3 "$(median $(paired_ratios "$TMP/pairs.tsv" 4))") (CPU per request).

### $IDLE_CONNS connections held open (new: client_idle_timeout and client_header_timeout ${TIMEOUT}s)

| build, connections | open, failed | before | with them | after they close |
|---|---|---|---|---|
$IDLE_ROWS
EOF
