# shellcheck shell=bash
# nginx as the reference proxy: the same key check as the gateway (a `map`
# of the plaintext keys, 401 without one), keep-alive to the same upstream,
# 2 workers like the gateway's `threads: 2`. Plain with SMALL_KEYS and
# BIG_KEYS keys, over TLS (HTTP/1.1) and over TLS with HTTP/2.

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

# The key map and the upstream block: $1 = key count.
nginx_key_map() {
    local n=$1 bucket=128 max=4096
    if [ "$n" -gt 1000 ]; then
        # Large maps: big buckets so nginx finds a hash size quickly.
        bucket=1024
        max=$((n * 2))
    fi
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
EOF
}

# The checked route, as the gateway's /ollama/ with strip_prefix.
nginx_key_location() {
    cat <<'EOF'
        location /ollama/ {
            default_type application/json;
            if ($allowed = 0) {
                return 401 '{"error":"invalid api key"}';
            }
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
        }
EOF
}

# The TLS lines of a server block: the shared certificate, TLS 1.2 and 1.3,
# sessions resumed by ticket and by ID as the gateway does.
nginx_tls_lines() {
    cat <<EOF
        ssl_certificate $TMP/tls-cert.pem;
        ssl_certificate_key $TMP/tls-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
EOF
}

# Starts a key-checking nginx: $1 = name (its folder), $2 = key count, $3 =
# the listen line's arguments, $4 = timeout, $5 = curl's URL (and options)
# to probe. Sets NGINX_PID; returns 1 when it did not answer in time.
start_nginx_checker() {
    local name=$1 n=$2 listen=$3 secs=$4 url=$5 d=$TMP/nginx-$1 t0=$SECONDS
    mkdir -p "$d"
    need_keys "$n"
    need_upstream
    {
        nginx_common "$d"
        echo "http {"
        nginx_http_common "$d"
        nginx_key_map "$n"
        echo "    server {"
        echo "        listen $listen;"
        case $listen in *ssl*) nginx_tls_lines ;; esac
        nginx_key_location
        echo "    }"
        echo "}"
    } >"$d/nginx.conf"
    start_bg "$d/out.log" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
    NGINX_PID=$STARTED_PID
    if ! wait_ready "$url" 200 "$secs" "$NGINX_PID"; then
        stop_pid "$NGINX_PID"
        say "nginx ($name) did not start within $secs s: $(tail -n 3 "$d/error.log" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    check_refuses "nginx ($name)" "$url"
    say "nginx ($name, $n keys) ready after $((SECONDS - t0)) s"
}

# nginx with SMALL_KEYS keys on P_NGX_SMALL; NGX_SMALL_PID stays empty
# without nginx.
need_nginx_small() {
    [ -z "${NGX_SMALL_PID:-}" ] && [ -n "$NGINX" ] || return 0
    need_upstream
    alloc_ports P_NGX_SMALL
    start_nginx_checker small "$SMALL_KEYS" "127.0.0.1:$P_NGX_SMALL" 30 \
        "http://127.0.0.1:$P_NGX_SMALL/ollama/api/generate" || die "nginx with $SMALL_KEYS keys did not start"
    NGX_SMALL_PID=$NGINX_PID
    PSS_NGX_SMALL=$(pss_mb "$NGX_SMALL_PID")
}

# nginx with BIG_KEYS keys on P_NGX_BIG, as NGINX_BIG says; tried once.
need_nginx_big() {
    [ -z "${NGX_BIG_TRIED:-}" ] && [ -n "$NGINX" ] || return 0
    NGX_BIG_TRIED=1 NGX_BIG_PID=""
    need_keys "$BIG_KEYS"
    need_upstream
    alloc_ports P_NGX_BIG
    if [ "$NGINX_BIG" = 0 ]; then
        note "nginx with $BIG_KEYS keys: skipped (NGINX_BIG=0)"
    elif start_nginx_checker big "$BIG_KEYS" "127.0.0.1:$P_NGX_BIG" "$NGINX_BIG_TIMEOUT" \
        "http://127.0.0.1:$P_NGX_BIG/ollama/api/generate"; then
        NGX_BIG_PID=$NGINX_PID
        PSS_NGX_BIG=$(pss_mb "$NGX_BIG_PID")
    else
        [ "$NGINX_BIG" = 1 ] && die "nginx with $BIG_KEYS keys did not start"
        note "nginx with $BIG_KEYS keys did not start within ${NGINX_BIG_TIMEOUT}s: measured gateway $SMALL_KEYS vs $BIG_KEYS keys and nginx only with $SMALL_KEYS"
    fi
}

# nginx over TLS, HTTP/1.1 only (as wrk and s_time speak), on P_NGX_TLS.
need_nginx_tls() {
    [ -z "${NGX_TLS_PID:-}" ] || return 0
    need_cert
    need_upstream
    alloc_ports P_NGX_TLS
    start_nginx_checker tls "$SMALL_KEYS" "127.0.0.1:$P_NGX_TLS ssl" 30 \
        "https://127.0.0.1:$P_NGX_TLS/ollama/api/generate --cacert $TMP/tls-cert.pem" ||
        die "nginx over TLS did not start"
    NGX_TLS_PID=$NGINX_PID
}

# nginx over TLS with HTTP/2 (ALPN h2, http/1.1), on P_NGX_H2: a server of
# its own, so that the HTTP/1.1 rows of `https` stay what they were.
need_nginx_h2() {
    [ -z "${NGX_H2_PID:-}" ] || return 0
    need_cert
    need_upstream
    alloc_ports P_NGX_H2
    start_nginx_checker h2 "$SMALL_KEYS" "127.0.0.1:$P_NGX_H2 ssl http2" 30 \
        "https://127.0.0.1:$P_NGX_H2/ollama/api/generate --http2 --cacert $TMP/tls-cert.pem" ||
        die "nginx over TLS with HTTP/2 did not start"
    NGX_H2_PID=$NGINX_PID
}
