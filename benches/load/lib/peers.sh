# shellcheck shell=bash
# What the proxies talk to and what every peer shares: ports, key sets, the
# request, the upstreams (plain, streaming), Redis and the TLS certificate.
# Each need_* starts its peer the first time a scenario asks and sets its
# *_PID; later calls return at once.

# The plaintext bench key number $1 (the shape `keygen` makes: agw_ + 32).
bench_key() { printf 'agw_bench%027d' "$1"; }
KEY=$(bench_key 5) # present in every key set

# The ~300-byte body of a non-streaming Ollama /api/generate answer (the
# same text examples/bench_upstream.rs sends).
GENERATE_BODY='{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00.000000000Z","response":"The sky is blue because air molecules scatter short blue wavelengths of sunlight more than red ones.","done":true,"done_reason":"stop","total_duration":512345678,"load_duration":12345678,"prompt_eval_count":26,"prompt_eval_duration":23456789,"eval_count":21,"eval_duration":456789012}'
REQUEST_BODY='{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}'

# Sets each variable named to a free port, just before its server binds it:
# a port picked long before could meanwhile be taken as the local port of
# one of the many client connections the runs make.
alloc_ports() {
    local names=("$@") ports i
    read -r -a ports < <(free_ports "${#names[@]}")
    for i in "${!names[@]}"; do printf -v "${names[$i]}" '%s' "${ports[$i]}"; done
}

# The request files every client sends.
setup_peers() {
    # The wrk script: POST, JSON body, the key header.
    cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$REQUEST_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "$KEY"
EOF
    printf '%s' "$REQUEST_BODY" >"$TMP/request.json"
}

# Key files: keys-N.json for the gateway (sha256: entries), keys-N.map for
# nginx (the plaintext keys, as an nginx map has to hold them); once each.
need_keys() {
    local n=$1
    [ -f "$TMP/keys-$n.json" ] && return 0
    say "generating a key set of $n keys"
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

# Dies unless a request without a key to $2 (curl options allowed) is
# refused with 401: the proxy $1 checks keys.
check_refuses() {
    local what=$1 code
    # shellcheck disable=SC2086 # $2 may carry curl options (--cacert FILE)
    code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' -X POST --data "$REQUEST_BODY" $2 || true)
    [ "$code" = 401 ] || die "$what lets a request without a key through (answered $code)"
}

# The upstream of every proxy: nginx answering GENERATE_BODY, or without
# nginx examples/bench_upstream.rs. Sets UPSTREAM_PID and UPSTREAM_KIND.
need_upstream() {
    [ -z "${UPSTREAM_PID:-}" ] || return 0
    alloc_ports P_UP
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
    say "upstream: $UPSTREAM_KIND on :$P_UP"
}

# NDJSON upstreams (examples/bench_upstream.rs, 10 lines): paced as Ollama
# sends them (first line after 10 ms, then one every 20 ms) on P_STREAM,
# and without pauses (CPU-bound) on P_FAST.
need_stream_upstream() {
    [ -z "${STREAM_PID:-}" ] || return 0
    start_ndjson_upstream P_STREAM stream 10 20
    STREAM_PID=$STARTED_PID
}

need_fast_upstream() {
    [ -z "${FAST_PID:-}" ] || return 0
    start_ndjson_upstream P_FAST fast 0 0
    FAST_PID=$STARTED_PID
}

# $1 = the port's variable, $2 = a name, $3 = ms to the first line, $4 = ms
# between lines. Sets STARTED_PID.
start_ndjson_upstream() {
    local log=$TMP/$2-upstream.log
    alloc_ports "$1"
    start_bg "$log" "$UPSTREAM_BIN" --listen "127.0.0.1:${!1}" --mode ndjson --chunks 10 \
        --first-ms "$3" --interval-ms "$4"
    wait_ready "http://127.0.0.1:${!1}/api/generate" 200 20 "$STARTED_PID" ||
        die "the $2 NDJSON upstream did not start: $(tail -n 3 "$log")"
}

# A redis-server on loopback for shared_state; returns 1 when not installed.
need_redis() {
    [ -z "${REDIS_PID:-}" ] || return 0
    command -v redis-server >/dev/null 2>&1 || return 1
    alloc_ports P_REDIS
    start_bg "$TMP/redis.log" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no
    REDIS_PID=$STARTED_PID
    for _ in $(seq 1 100); do
        if [ "$(timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$P_REDIS && printf 'PING\r\n' >&3 && head -c 5 <&3" 2>/dev/null)" = "+PONG" ]; then
            return 0
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    die "redis-server did not start: $(tail -n 3 "$TMP/redis.log")"
}

# One certificate for every TLS server (ECDSA P-256, as ACME clients make
# by default).
need_cert() {
    [ -f "$TMP/tls-cert.pem" ] && return 0
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/tls-key.pem" -out "$TMP/tls-cert.pem" 2>/dev/null ||
        die "openssl could not make the test certificate"
    chmod 600 "$TMP/tls-key.pem"
}
