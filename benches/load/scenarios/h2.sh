# shellcheck shell=bash
# Scenario: HTTP/2 over TLS with multiplexing (h2load -c H2_CONNS -m H2_STREAMS) against nginx, same certificate, key check and upstream

# One h2load run against port $2 into file $1, the process tree $3 charged
# CPU; $4 = round (for the row). Appends "name round rps mean max cpu
# failed" for target $5.
h2_run() {
    local out=$1 port=$2 pid=$3 round=$4 name=$5 secs c0 rps done_n failed mean max cpu
    secs=$(secs_of "$DURATION")
    say "h2 round $round/$ROUNDS: $name: h2load -t$THREADS -c$H2_CONNS -m$H2_STREAMS -D$secs"
    c0=$(cpu_total "$pid")
    run_fg timeout $((secs + 60)) h2load -t"$THREADS" -c"$H2_CONNS" -m"$H2_STREAMS" -D"$secs" \
        -d "$TMP/request.json" -H "content-type: application/json" -H "x-api-key: $KEY" \
        "https://127.0.0.1:$port/ollama/api/generate" >"$out" 2>&1 || say "h2load against :$port failed (see $out)"
    cpu=$(($(cpu_total "$pid") - c0))
    grep -q '^Application protocol: h2$' "$out" || note "h2 $name round $round: HTTP/2 was not negotiated (see $out)"
    rps=$(awk '/^finished in/ { gsub(/,/, ""); printf "%.0f", $4 }' "$out")
    # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
    read -r done_n failed < <(awk '/^requests:/ { print $6, $10 + $12 + $14 }' "$out")
    # status codes: N 2xx, N 3xx, N 4xx, N 5xx (also counts answers that
    # came after the measured window closed: no equality with done).
    [ "$(awk '/^status codes:/ { print $5 + $7 + $9 }' "$out")" = 0 ] && [ "${failed:-1}" = 0 ] ||
        note "h2 $name round $round: not every request succeeded with a 2xx ($(grep -E '^(requests|status codes):' "$out" | tr '\n' ' '))"
    read -r mean max < <(awk '/^time for request:/ { print $6, $5 }' "$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "${rps:-0}" "$(to_ms "${mean:-}")" "$(to_ms "${max:-}")" \
        "$(us_per_req "$cpu" "${done_n:-0}")" "${failed:--}" >>"$H2_TSV"
}

h2_table() {
    echo "| target | req/s | mean ms | max ms | CPU µs/req | failed |"
    echo "|---|---:|---:|---:|---:|---:|"
    local name c
    for name in nginx ai-gateway; do
        printf '| %s |' "$name"
        for c in 3 4 5 6; do printf ' %s |' "$(tsv_median "$H2_TSV" "$c" "$name")"; done
        printf ' %s |\n' "$(awk -F'\t' -v n="$name" '$1 == n { s += $7 } END { print s + 0 }' "$H2_TSV")"
    done
    printf '| ai-gateway / nginx |'
    for c in 3 4 5 6; do
        printf ' %s |' "$(ratio "$(tsv_median "$H2_TSV" "$c" ai-gateway)" "$(tsv_median "$H2_TSV" "$c" nginx)")"
    done
    echo ' |'
}

scenario_h2() {
    echo "## HTTP/2"
    echo
    if [ -z "$NGINX" ] || ! command -v h2load >/dev/null 2>&1; then
        note "h2 skipped: it needs nginx and h2load (Debian: nghttp2-client; benches/load.sh --install)"
        echo "Skipped: nginx or h2load is missing."
        return 0
    fi
    need_nginx_h2
    need_gateway_tls
    H2_TSV=$TMP/h2.tsv
    : >"$H2_TSV"
    local round vs
    for round in $(seq 1 "$ROUNDS"); do
        h2_run "$TMP/h2load-nginx-$round.txt" "$P_NGX_H2" "$NGX_H2_PID" "$round" nginx
        h2_run "$TMP/h2load-gateway-$round.txt" "$P_GW_TLS" "$GW_TLS_PID" "$round" ai-gateway
    done

    echo "nginx (\`listen ... ssl http2\`, the TLS settings of the HTTPS scenario) and ai-gateway (its TLS listener,"
    echo "which offers h2 by ALPN) with the same certificate, key check and upstream (HTTP/1.1 keep-alive behind"
    echo "both). \`h2load -t$THREADS -c$H2_CONNS -m$H2_STREAMS -D$(secs_of "$DURATION")\`: $H2_CONNS connections, up to $H2_STREAMS"
    echo "streams at once on each, POST of the same JSON body with \`x-api-key\`; $ROUNDS round(s), interleaved;"
    echo "medians over rounds. h2load gives no percentiles: *mean* and *max* are its request times (from sending a"
    echo "request to its last byte). CPU µs/req includes the $H2_CONNS TLS handshakes of a run. *Failed* counts"
    echo "requests failed, errored or timed out, summed over rounds."
    echo
    h2_table
    echo
    vs=$(ratio "$(tsv_median "$H2_TSV" 3 ai-gateway)" "$(tsv_median "$H2_TSV" 3 nginx)")
    echo "Target: req/s at least 0.75× nginx's: $vs ($(verdict "$vs" ">=" 0.75))."
    echo
    command_line h2 ROUNDS DURATION THREADS H2_CONNS H2_STREAMS
}
