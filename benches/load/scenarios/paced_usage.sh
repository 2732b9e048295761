# shellcheck shell=bash
# Scenario: usage accounting (api: ollama) on paced streams as Ollama sends them, many connections: the same gateway without and with it

scenario_paced_usage() {
    need_stream_upstream
    need_gateway_small
    local tsv=$TMP/paced.tsv
    : >"$tsv"
    CONNS=$PACED_CONNS ab_rounds "$tsv" "$PACED_ROUNDS" "$GW_SMALL_PID" \
        "http://127.0.0.1:$P_GW_SMALL/stream/api/generate" "http://127.0.0.1:$P_GW_SMALL/stream-ai/api/generate" "paced usage"

    echo "## Usage accounting on paced streams"
    echo
    echo "The streaming upstream (examples/bench_upstream.rs: the first line after 10 ms, then one every 20 ms, 10"
    echo "lines): \`/stream/\` against \`/stream-ai/\` (\`api: ollama\`) on the same gateway, \`wrk -t$THREADS"
    echo "-c$PACED_CONNS -d$DURATION\`, $PACED_ROUNDS round(s), the order alternating; medians over rounds."
    echo
    ab_table "$tsv" "without \`api\`" "\`api: ollama\`"
    echo
    echo "req/s with usage accounting / without: $(paired_median "$tsv" 3) (goal: at least 0.98)."
    echo
    command_line paced_usage PACED_ROUNDS PACED_CONNS DURATION THREADS
}
