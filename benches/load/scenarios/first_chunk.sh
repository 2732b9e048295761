# shellcheck shell=bash
# Scenario: time to the first chunk of a paced NDJSON stream: upstream direct, through the gateway, and with usage read (api: ollama)

scenario_first_chunk() {
    need_stream_upstream
    need_gateway_small
    say "first chunk: $STREAM_N requests each, direct and through the gateway"
    local out=$TMP/stream.txt d_head d_first d_total g_head g_first g_total a_head a_first a_total

    echo "## Streaming (time to first chunk)"
    echo
    if ! run_fg timeout 300 python3 "$BENCH_DIR/lib/stream_client.py" "$P_STREAM" "$P_GW_SMALL" "$KEY" "$STREAM_N" \
        >"$out" 2>&1; then
        note "first_chunk failed: $(tail -n 3 "$out" | tr '\n' ' ')"
        echo "Failed; see the notes."
        return 0
    fi
    read -r _ d_head d_first d_total < <(grep '^direct ' "$out")
    read -r _ g_head g_first g_total < <(grep '^gateway ' "$out")
    read -r _ a_head a_first a_total < <(grep '^gateway-ai ' "$out")
    echo "NDJSON upstream (examples/bench_upstream.rs: header at once, first line after 10 ms, then one every 20 ms,"
    echo "10 lines); $STREAM_N requests each, a new connection per request, the order of the targets rotating;"
    echo "medians in ms."
    echo
    echo "| path | response header | first chunk | whole stream |"
    echo "|---|---:|---:|---:|"
    echo "| upstream direct | $d_head | $d_first | $d_total |"
    echo "| through ai-gateway | $g_head | $g_first | $g_total |"
    echo "| through ai-gateway, \`api: ollama\` (usage read) | $a_head | $a_first | $a_total |"
    echo
    awk -v a="$d_first" -v b="$g_first" 'BEGIN { printf "The gateway adds **%.2f ms** to the time to first chunk.\n", b - a }'
    awk -v a="$g_first" -v b="$a_first" 'BEGIN { printf "Reading usage (`api: ollama`) changes it by **%+.2f ms**.\n", b - a }'
    echo
    command_line first_chunk STREAM_N
}
