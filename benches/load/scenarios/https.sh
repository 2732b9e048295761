# shellcheck shell=bash
# Scenario: HTTPS against nginx, same certificate: keep-alive, Connection: close, full and resumed (TLS 1.2, 1.3) handshakes

# HTTPS_N parallel `openssl s_time` against 127.0.0.1:$1 for $2 seconds,
# the process tree $3 charged CPU, the rest s_time's options (-new: a full
# handshake per connection; -reuse: one full handshake, then every
# connection presents that session). Leaves ST_RATE (connections/s),
# ST_CPU (µs per connection) and ST_SHARE (% of connections that resumed:
# s_time marks each `r` or `*`) set.
s_time_rate() {
    local port=$1 secs=$2 pid=$3 c0 i total=0 n pids=() out=$TMP/s_time-$1
    shift 3
    c0=$(cpu_total "$pid")
    for i in $(seq 1 "$HTTPS_N"); do
        openssl s_time -connect "127.0.0.1:$port" -time "$secs" "$@" >"$out-$i.txt" 2>&1 &
        pids+=("$!")
        PIDS+=("$!")
    done
    for i in "${pids[@]}"; do
        wait "$i" || true
        forget_pid "$i"
    done
    for i in $(seq 1 "$HTTPS_N"); do
        n=$(awk '/connections in .* real seconds/ { print $1; exit }' "$out-$i.txt")
        total=$((total + ${n:-0}))
    done
    ST_RATE=$(awk -v n="$total" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    ST_CPU=$(us_per_req $(($(cpu_total "$pid") - c0)) "$total")
    ST_SHARE=$(cat "$out"-*.txt | awk '/^[r*]+$/ { all += length($0); r += gsub(/r/, "") }
        END { if (all > 0) printf "%.0f", 100 * r / all; else print "-" }')
}

# One round against one server: $1 = name, $2 = port, $3 = pid, $4 = round.
# Appends "name round ka_rps ka_p99 ka_cpu nc_rps nc_cpu hs_rate hs_cpu
# rs12_rate rs12_cpu rs12_share rs13_rate rs13_cpu rs13_share".
https_round() {
    local name=$1 port=$2 pid=$3 round=$4 url row secs
    url="https://127.0.0.1:$port/ollama/api/generate"
    secs=$(secs_of "$DURATION")
    say "HTTPS round $round/$ROUNDS: $name: keep-alive, Connection: close, full and resumed handshakes"
    run_wrk "$TMP/wrk-tls-$name-$round.txt" "$url" "$DURATION" "$pid"
    note_wrk_errors "HTTPS $name keep-alive round $round"
    row="$name	$round	$WRK_RPS	$WRK_P99	$WRK_CPU"
    run_wrk "$TMP/wrk-tls-close-$name-$round.txt" "$url" "$DURATION" "$pid" "Connection: close"
    [ "$WRK_NON2XX" = 0 ] || note "HTTPS $name Connection: close round $round: $WRK_NON2XX non-2xx"
    row+="	$WRK_RPS	$WRK_CPU"
    s_time_rate "$port" "$secs" "$pid" -new
    row+="	$ST_RATE	$ST_CPU"
    s_time_rate "$port" "$secs" "$pid" -reuse -tls1_2
    row+="	$ST_RATE	$ST_CPU	$ST_SHARE"
    local share12=$ST_SHARE
    # TLS 1.3 tickets come after the handshake, and s_time takes them in
    # only when it reads an answer: hence -www (a request without a key).
    s_time_rate "$port" "$secs" "$pid" -reuse -tls1_3 -www /ollama/api/generate
    row+="	$ST_RATE	$ST_CPU	$ST_SHARE"
    [ "$share12" = 100 ] && [ "$ST_SHARE" = 100 ] ||
        note "HTTPS $name round $round: resumed only $share12% (TLS 1.2) and $ST_SHARE% (TLS 1.3) of the connections presenting a session"
    echo "$row" >>"$HTTPS_TSV"
}

# A table row per server, then the ratio row: $@ = columns; a column given
# as "N%" is a share (no ratio).
https_rows() {
    local name c
    for name in nginx ai-gateway; do
        printf '| %s |' "$name"
        for c in "$@"; do printf ' %s |' "$(tsv_median "$HTTPS_TSV" "${c%\%}" "$name")${c//[0-9]/}"; done
        echo
    done
    printf '| ai-gateway / nginx |'
    for c in "$@"; do
        case $c in
            *%) printf ' |' ;;
            *) printf ' %s |' "$(ratio "$(tsv_median "$HTTPS_TSV" "$c" ai-gateway)" "$(tsv_median "$HTTPS_TSV" "$c" nginx)")" ;;
        esac
    done
    echo
}

https_targets() {
    local ka rs12 rs13
    ka=$(ratio "$(tsv_median "$HTTPS_TSV" 3 ai-gateway)" "$(tsv_median "$HTTPS_TSV" 3 nginx)")
    rs12=$(ratio "$(tsv_median "$HTTPS_TSV" 10 ai-gateway)" "$(tsv_median "$HTTPS_TSV" 10 nginx)")
    rs13=$(ratio "$(tsv_median "$HTTPS_TSV" 13 ai-gateway)" "$(tsv_median "$HTTPS_TSV" 13 nginx)")
    echo "Targets: keep-alive req/s at least 0.75× nginx's: $ka ($(verdict "$ka" ">=" 0.75)); resumed connections/s at"
    echo "least nginx's: TLS 1.2 $rs12 ($(verdict "$rs12" ">=" 1.0)), TLS 1.3 $rs13 ($(verdict "$rs13" ">=" 1.0))."
}

scenario_https() {
    echo "## HTTPS"
    echo
    if [ -z "$NGINX" ]; then
        note "https skipped: it compares with nginx, which is not available"
        echo "Skipped: no nginx to compare with."
        return 0
    fi
    need_nginx_tls
    need_gateway_tls
    HTTPS_TSV=$TMP/https.tsv
    : >"$HTTPS_TSV"
    local round
    for round in $(seq 1 "$ROUNDS"); do
        https_round nginx "$P_NGX_TLS" "$NGX_TLS_PID" "$round"
        https_round ai-gateway "$P_GW_TLS" "$GW_TLS_PID" "$round"
    done

    echo "nginx (\`ssl_protocols TLSv1.2 TLSv1.3\`, \`ssl_session_cache shared:SSL:10m\`, \`ssl_session_tickets on\`,"
    echo "defaults otherwise) and ai-gateway (a TLS listener with certificate files) with the same ECDSA P-256"
    echo "certificate, the same key check and upstream; wrk negotiates TLS 1.3 and HTTP/1.1. Keep-alive: \`wrk -t$THREADS"
    echo "-c$CONNS -d$DURATION\`. Connection: close: the same with that header (a new TCP and TLS connection per request;"
    echo "wrk may resume sessions). Full handshakes: $HTTPS_N parallel \`openssl s_time -new\` (no request)."
    echo "Medians over $ROUNDS round(s), interleaved."
    echo
    echo "| target | keep-alive req/s | p99 ms | CPU µs/req | Connection: close req/s | CPU µs/req | full handshakes/s | CPU µs/handshake |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    https_rows 3 4 5 6 7 8 9
    echo
    echo "Resumed handshakes: $HTTPS_N parallel \`openssl s_time -reuse\`, each a full handshake then every connection"
    echo "presenting that session (a ticket or the session ID, as the server offers). TLS 1.2: \`-tls1_2\`, no request."
    echo "TLS 1.3: \`-tls1_3 -www /ollama/api/generate\` (one request without a key per connection, answered 401 by"
    echo "both). *Resumed* is the share of connections that resumed."
    echo
    echo "| target | TLS 1.2 resumed/s | CPU µs/conn | resumed | TLS 1.3 resumed/s (+ a request) | CPU µs/conn | resumed |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    https_rows 10 11 12% 13 14 15%
    echo
    https_targets
    echo
    command_line https ROUNDS DURATION CONNS THREADS HTTPS_N
}
