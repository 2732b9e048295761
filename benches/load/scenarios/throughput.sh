# shellcheck shell=bash
# Scenario: small keep-alive requests as fast as wrk sends them: upstream direct, nginx, the gateway (limits off, on, in Redis; 10 and BIG_KEYS keys)

# target name | keys | url | pid (for CPU)
throughput_targets() {
    TP_TARGETS=("upstream direct|-|http://127.0.0.1:$P_UP/api/generate|$UPSTREAM_PID")
    [ -n "${NGX_SMALL_PID:-}" ] && TP_TARGETS+=("nginx|$SMALL_KEYS|http://127.0.0.1:$P_NGX_SMALL/ollama/api/generate|$NGX_SMALL_PID")
    TP_TARGETS+=("ai-gateway|$SMALL_KEYS|http://127.0.0.1:$P_GW_SMALL/ollama/api/generate|$GW_SMALL_PID")
    TP_TARGETS+=("ai-gateway, limits on|$SMALL_KEYS|http://127.0.0.1:$P_GW_LIMITS/ollama/api/generate|$GW_LIMITS_PID")
    [ -n "$GW_SHARED_PID" ] && TP_TARGETS+=("ai-gateway, limits shared|$SMALL_KEYS|http://127.0.0.1:$P_GW_SHARED/ollama/api/generate|$GW_SHARED_PID")
    [ -n "${NGX_BIG_PID:-}" ] && TP_TARGETS+=("nginx|$BIG_KEYS|http://127.0.0.1:$P_NGX_BIG/ollama/api/generate|$NGX_BIG_PID")
    TP_TARGETS+=("ai-gateway|$BIG_KEYS|http://127.0.0.1:$P_GW_BIG/ollama/api/generate|$GW_BIG_PID")
}

# The rows: "name keys round rps p50 p99 cpu non2xx sockerr user sys".
throughput_rounds() {
    local round t name keys url pid
    for round in $(seq 1 "$ROUNDS"); do
        for t in "${TP_TARGETS[@]}"; do
            IFS='|' read -r name keys url pid <<<"$t"
            say "throughput round $round/$ROUNDS: $name ($keys keys): wrk -t$THREADS -c$CONNS -d$DURATION"
            run_wrk "$TMP/wrk-${name// /_}-$keys-$round.txt" "$url" "$DURATION" "$pid"
            printf '%s|%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$keys" "$round" "$WRK_RPS" "$WRK_P50" \
                "$WRK_P99" "$WRK_CPU" "$WRK_NON2XX" "$WRK_SOCKERR" "$WRK_CPU_USER" "$WRK_CPU_SYS" >>"$TP_TSV"
            note_wrk_errors "throughput, $name ($keys keys) round $round"
        done
    done
}

# How the gateway's work split over its proxy services (SO_REUSEPORT
# spreads connections by a hash of their addresses): each service
# thread's share of the CPU the service threads used; $1, $2 = before, after.
service_split() {
    join <(echo "$1") <(echo "$2") | awk '
        { name[NR] = $1; d[NR] = $3 - $2; total += $3 - $2 }
        END {
            if (total <= 0) { print "-"; exit }
            for (i = 1; i <= NR; i++) printf "%s%s %.0f%%", (i > 1 ? ", " : ""), name[i], 100 * d[i] / total
            print ""
        }'
}

throughput_table() {
    echo "| target | keys | req/s | p50 ms | p99 ms | CPU µs/req | user | sys | req/s vs nginx | p99 vs nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local t name keys url pid rps p99 vs vs_p99 c
    for t in "${TP_TARGETS[@]}"; do
        IFS='|' read -r name keys url pid <<<"$t"
        rps=$(tsv_median "$TP_TSV" 3 "$name|$keys")
        p99=$(tsv_median "$TP_TSV" 5 "$name|$keys")
        vs="-" vs_p99="-"
        if [ "$name" != "upstream direct" ]; then
            vs=$(ratio "$rps" "$(tsv_median "$TP_TSV" 3 "nginx|$keys")")
            vs_p99=$(ratio "$p99" "$(tsv_median "$TP_TSV" 5 "nginx|$keys")")
        fi
        [ "$rps" = "-" ] || rps=$(printf '%.0f' "$rps")
        printf '| %s | %s | %s |' "$name" "$keys" "$rps"
        for c in 4 5 6 9 10; do printf ' %s |' "$(tsv_median "$TP_TSV" "$c" "$name|$keys")"; done
        printf ' %s | %s |\n' "$vs" "$vs_p99"
    done
}

# The limits rows against the plain gateway, and the targets of issue 25.
throughput_summary() {
    local plain on shared vs vs_p99
    plain=$(tsv_median "$TP_TSV" 3 "ai-gateway|$SMALL_KEYS")
    on=$(tsv_median "$TP_TSV" 3 "ai-gateway, limits on|$SMALL_KEYS")
    echo "Fair-use limits on (a rate limit and \`max_concurrent\` the benched key never reaches, the failed-key"
    echo "throttle on) against off, same run: $(ratio "$on" "$plain") req/s."
    if [ -n "$GW_SHARED_PID" ]; then
        shared=$(tsv_median "$TP_TSV" 3 "ai-gateway, limits shared|$SMALL_KEYS")
        echo "The same limits counted in Redis (\`shared_state\`, redis-server on loopback; leases of up to 256"
        echo "requests, slots returned every 100 ms) against counted locally: $(ratio "$shared" "$on") req/s (goal: at least 0.9×)."
    fi
    if [ -n "${NGX_SMALL_PID:-}" ]; then
        vs=$(ratio "$plain" "$(tsv_median "$TP_TSV" 3 "nginx|$SMALL_KEYS")")
        vs_p99=$(ratio "$(tsv_median "$TP_TSV" 5 "ai-gateway|$SMALL_KEYS")" "$(tsv_median "$TP_TSV" 5 "nginx|$SMALL_KEYS")")
        echo "Targets ($SMALL_KEYS keys): req/s at least 0.65× nginx's: $vs ($(verdict "$vs" ">=" 0.65)); p99 at most"
        echo "1.5× nginx's: $vs_p99 ($(verdict "$vs_p99" "<=" 1.5))."
    fi
}

memory_table() {
    echo "| process | at start | after the rounds |"
    echo "|---|---:|---:|"
    echo "| ai-gateway, $SMALL_KEYS keys (RSS MB) | $RSS_GW_SMALL_START | $(rss_mb "$GW_SMALL_PID") |"
    echo "| ai-gateway, $BIG_KEYS keys (RSS MB; keys loaded in ${GW_BIG_LOAD_MS:-?} ms) | $RSS_GW_BIG_START | $(rss_mb "$GW_BIG_PID") |"
    [ -z "${NGX_SMALL_PID:-}" ] || echo "| nginx, $SMALL_KEYS keys (master + 2 workers, sum of Pss MB) | $PSS_NGX_SMALL | $(pss_mb "$NGX_SMALL_PID") |"
    [ -z "${NGX_BIG_PID:-}" ] || echo "| nginx, $BIG_KEYS keys (master + 2 workers, sum of Pss MB) | $PSS_NGX_BIG | $(pss_mb "$NGX_BIG_PID") |"
}

scenario_throughput() {
    need_upstream
    need_nginx_small
    need_nginx_big
    need_gateway_small
    need_gateway_limits
    need_gateway_shared
    need_gateway_big
    throughput_targets
    TP_TSV=$TMP/throughput.tsv
    : >"$TP_TSV"
    local before after
    before=$(service_ticks "$GW_SMALL_PID")
    throughput_rounds
    after=$(service_ticks "$GW_SMALL_PID")

    echo "## Throughput"
    echo
    echo "\`wrk -t$THREADS -c$CONNS -d$DURATION --latency\`, POST with a ${#REQUEST_BODY}-byte JSON body and \`X-API-Key\`,"
    echo "$ROUNDS round(s) interleaving the targets; medians over rounds. Upstream: $UPSTREAM_KIND, answering a"
    echo "${#GENERATE_BODY}-byte JSON body. CPU µs/req split into user and system time."
    echo
    throughput_table
    echo
    throughput_summary
    echo "How the gateway ($SMALL_KEYS keys) split its work over its proxy services (share of the service threads'"
    echo "CPU): $(service_split "$before" "$after")."
    echo
    memory_table
    echo
    command_line throughput ROUNDS DURATION CONNS THREADS BIG_KEYS NGINX_BIG
}
