# shellcheck shell=bash
# The gateways under test, each one process with `threads: 2` and the
# failed-key throttle off unless said (nginx has none): plain with
# SMALL_KEYS and BIG_KEYS keys, with fair-use limits counted locally and in
# Redis, and with a TLS listener.

# The route every gateway has: /ollama/ to the upstream, as nginx's location.
route_ollama() {
    cat <<EOF
routes:
  - name: ollama
    path_prefix: /ollama/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_UP"]
EOF
}

# The routes of the plain gateways: /ollama/, and the streaming upstreams
# without and with usage accounting (api: ollama).
gateway_routes() {
    route_ollama
    cat <<EOF
  - name: stream
    path_prefix: /stream/
    service: ollama
    strip_prefix: true
    upstreams: ["127.0.0.1:$P_STREAM"]
  - name: stream-ai
    path_prefix: /stream-ai/
    service: ollama
    strip_prefix: true
    api: ollama
    upstreams: ["127.0.0.1:$P_STREAM"]
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
}

# What every gateway's config shares: two proxy threads (nginx has two
# workers), no file watching, a quick shutdown; $1 = its folder.
gateway_common() {
    cat <<EOF
threads: 2
watch: false
shutdown_grace: 1s
upgrade_sock: $1/upgrade.sock
EOF
}

# Starts a gateway from $TMP/gateway-$1/gateway.yaml (written by the
# caller) and waits until $2 (a URL, curl options allowed) answers 200 with
# the key and 401 without. Sets GATEWAY_PID.
start_gateway_dir() {
    local d=$TMP/gateway-$1 url=$2 t0=$SECONDS
    RUST_LOG=${RUST_LOG:-info} start_bg "$d/gateway.log" "$GATEWAY_BIN" run --config "$d/gateway.yaml"
    GATEWAY_PID=$STARTED_PID
    wait_ready "$url" 200 120 "$GATEWAY_PID" ||
        die "the gateway ($1) did not start: $(tail -n 5 "$d/gateway.log")"
    check_refuses "the gateway ($1)" "$url"
    say "gateway ($1) ready after $((SECONDS - t0)) s"
}

# A plain gateway: $1 = name, $2 = key count, $3 = port, $4 = admin port,
# $5 = extra top-level settings (default: the failed-key throttle off). The
# ports are picked here (alloc_ports: the variables named by $3 and $4).
start_gateway() {
    local name=$1 n=$2 d=$TMP/gateway-$1 port admin
    local extra=${5:-"failed_key_throttle: {enabled: false}"}
    mkdir -p "$d"
    need_keys "$n"
    need_upstream
    # Its routes name the streaming upstreams (idle until a scenario streams).
    need_stream_upstream
    need_fast_upstream
    alloc_ports "$3" "$4"
    port=${!3} admin=${!4}
    cat >"$d/gateway.yaml" <<EOF
listen: "127.0.0.1:$port"
admin_listen: "127.0.0.1:$admin"
keys_file: $TMP/keys-$n.json
$(gateway_common "$d")
# Room for the IDLE_CONNS idle connections of the idle scenario (the
# default cap, derived from the open-file limit, may be lower).
max_connections: $((IDLE_CONNS + 100))
$extra
$(gateway_routes)
EOF
    start_gateway_dir "$name" "http://127.0.0.1:$port/ollama/api/generate"
}

# The gateway with SMALL_KEYS keys; its RSS just started in RSS_GW_SMALL_START.
need_gateway_small() {
    [ -z "${GW_SMALL_PID:-}" ] || return 0
    start_gateway small "$SMALL_KEYS" P_GW_SMALL P_ADM_SMALL
    GW_SMALL_PID=$GATEWAY_PID
    RSS_GW_SMALL_START=$(rss_mb "$GW_SMALL_PID")
}

# The gateway with BIG_KEYS keys; its RSS just started and its key load
# time (from its log) in RSS_GW_BIG_START and GW_BIG_LOAD_MS.
need_gateway_big() {
    [ -z "${GW_BIG_PID:-}" ] || return 0
    start_gateway big "$BIG_KEYS" P_GW_BIG P_ADM_BIG
    GW_BIG_PID=$GATEWAY_PID
    RSS_GW_BIG_START=$(rss_mb "$GW_BIG_PID")
    GW_BIG_LOG=$TMP/gateway-big/gateway.log
    GW_BIG_LOAD_MS=$(sed -n 's/.*loaded .*: .* keys in \([0-9]*\) ms.*/\1/p' "$GW_BIG_LOG" | tail -n 1)
}

# Fair-use limits on, for the benched key: a rate and a concurrency cap it
# never reaches, and the failed-key throttle (on by default).
LIMITS='rate_limit: "1000000000/min"
max_concurrent: 100000'

need_gateway_limits() {
    [ -z "${GW_LIMITS_PID:-}" ] || return 0
    start_gateway limits "$SMALL_KEYS" P_GW_LIMITS P_ADM_LIMITS "$LIMITS"
    GW_LIMITS_PID=$GATEWAY_PID
}

# The same limits counted in Redis (shared_state), as several instances
# would; GW_SHARED_PID stays empty without redis-server.
need_gateway_shared() {
    [ -z "${GW_SHARED_TRIED:-}" ] || return 0
    GW_SHARED_TRIED=1 GW_SHARED_PID=""
    if ! need_redis; then
        note "redis-server not installed: no shared-limits row (benches/load.sh --install adds it)"
        return 0
    fi
    start_gateway shared "$SMALL_KEYS" P_GW_SHARED P_ADM_SHARED "$LIMITS
shared_state: {redis: \"redis://127.0.0.1:$P_REDIS/0\"}"
    GW_SHARED_PID=$GATEWAY_PID
}

# The gateway with a TLS listener on P_GW_TLS (certificate files; the
# listener offers h2 and http/1.1 by ALPN) and a plain one.
need_gateway_tls() {
    [ -z "${GW_TLS_PID:-}" ] || return 0
    local d=$TMP/gateway-tls
    mkdir -p "$d"
    need_cert
    need_keys "$SMALL_KEYS"
    need_upstream
    alloc_ports P_GW_TLS P_GW_TLS_PLAIN
    cat >"$d/gateway.yaml" <<EOF
listen:
  - "127.0.0.1:$P_GW_TLS_PLAIN"
  - {address: "127.0.0.1:$P_GW_TLS", tls: {cert: $TMP/tls-cert.pem, key: $TMP/tls-key.pem}}
keys_file: $TMP/keys-$SMALL_KEYS.json
$(gateway_common "$d")
failed_key_throttle: {enabled: false}
$(route_ollama)
EOF
    start_gateway_dir tls "https://127.0.0.1:$P_GW_TLS/ollama/api/generate --cacert $TMP/tls-cert.pem"
    GW_TLS_PID=$GATEWAY_PID
}

# The admin key of the status page gateway (the shape `keygen` makes).
ADMIN_KEY=agw_bench_admin_key_000000000000000

# A gateway as the status page sees one in use: its audit log (which feeds
# the page's history; AUDIT_SEED, if set, is an audit log to start from),
# its admin listener and an admin key, usage read on /ollama/ (api: ollama).
need_gateway_page() {
    [ -z "${GW_PAGE_PID:-}" ] || return 0
    local d=$TMP/gateway-page
    mkdir -p "$d"
    need_keys "$SMALL_KEYS"
    need_upstream
    python3 - "$TMP/keys-$SMALL_KEYS.json" "$d/keys.json" "$ADMIN_KEY" <<'EOF'
import hashlib, json, sys
keys = json.load(open(sys.argv[1]))
keys["sha256:" + hashlib.sha256(sys.argv[3].encode()).hexdigest()] = {"user": "root", "admin": True}
json.dump(keys, open(sys.argv[2], "w"))
EOF
    chmod 600 "$d/keys.json"
    [ -z "${AUDIT_SEED:-}" ] || cp "$AUDIT_SEED" "$d/audit.log"
    alloc_ports P_GW_PAGE P_ADM_PAGE
    cat >"$d/gateway.yaml" <<EOF
listen: "127.0.0.1:$P_GW_PAGE"
admin_listen: "127.0.0.1:$P_ADM_PAGE"
keys_file: $d/keys.json
audit_log: $d/audit.log
$(gateway_common "$d")
failed_key_throttle: {enabled: false}
$(route_ollama)
    api: ollama
EOF
    start_gateway_dir page "http://127.0.0.1:$P_GW_PAGE/ollama/api/generate"
    GW_PAGE_PID=$GATEWAY_PID
}
