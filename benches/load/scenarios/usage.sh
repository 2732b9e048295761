# shellcheck shell=bash
# Scenario: what usage accounting (api: ollama) costs on CPU-bound NDJSON streams: the same gateway, a route without and one with it

# The tokens the gateway has counted (agw_tokens_total, all labels).
tokens_counted() {
    curl -s -m 5 "http://127.0.0.1:$P_ADM_SMALL/metrics" |
        awk '/^agw_tokens_total\{/ { n += $2 } END { printf "%.0f", n }'
}

scenario_usage() {
    need_fast_upstream
    need_gateway_small
    local tsv=$TMP/usage.tsv tokens
    : >"$tsv"
    tokens=$(tokens_counted)
    ab_rounds "$tsv" "$AI_ROUNDS" "$GW_SMALL_PID" "http://127.0.0.1:$P_GW_SMALL/fast/api/generate" \
        "http://127.0.0.1:$P_GW_SMALL/fast-ai/api/generate" "usage"
    tokens=$(($(tokens_counted) - tokens))
    [ "$tokens" -gt 0 ] || note "usage: no tokens were counted on /fast-ai/ (agw_tokens_total did not grow)"

    echo "## Usage accounting (api: ollama) on streams"
    echo
    echo "The same gateway, two routes to one NDJSON upstream that streams 10 lines without pauses (CPU-bound:"
    echo "examples/bench_upstream.rs \`--mode ndjson --first-ms 0 --interval-ms 0\`, the last line with"
    echo "\`prompt_eval_count\` and \`eval_count\`): \`/fast/\` without \`api\`, \`/fast-ai/\` with \`api: ollama\`"
    echo "(every answer read for usage, tokens counted in metrics). \`wrk -t$THREADS -c$CONNS -d$DURATION\`, $AI_ROUNDS"
    echo "round(s) of one run each, the order alternating; medians over rounds."
    echo
    ab_table "$tsv" "without \`api\`" "\`api: ollama\`"
    echo
    echo "req/s with usage accounting / without: $(paired_median "$tsv" 3); $(ratio "$(tsv_median "$tsv" 3 on)" \
        "$(tsv_median "$tsv" 3 off)") as the ratio of the medians (goal: at least 0.98)."
    echo "CPU time per request with / without: $(paired_median "$tsv" 6)."
    echo "Tokens counted on \`/fast-ai/\` during these runs: $tokens (agw_tokens_total)."
    echo
    command_line usage AI_ROUNDS DURATION CONNS THREADS
}
