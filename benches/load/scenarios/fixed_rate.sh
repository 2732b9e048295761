# shellcheck shell=bash
# Scenario: the latency a user feels at a steady RATE well below saturation: direct, nginx, the gateway, and what each proxy adds

# One fixed_rate run: $1 = name, $2 = url, $3 = pid charged CPU (may be
# empty), $4 = round; appends "name round p50 p99 cpu errors late".
fixed_rate_run() {
    local name=$1 url=$2 pid=$3 round=$4 out u0=0 u1=0 sent errors late p50 p99 cpu="-"
    out=$TMP/fixed-${name// /_}-$round.txt
    say "fixed rate, round $round/$ROUNDS: $name at $RATE req/s for ${FR_SECS}s on $FR_CONNS connections"
    [ -z "$pid" ] || u0=$(cpu_total "$pid")
    run_fg timeout $((FR_SECS + 60)) "$FIXED_RATE_BIN" --url "$url" --rate "$RATE" --secs "$FR_SECS" \
        --conns "$FR_CONNS" --method POST --body "$REQUEST_BODY" -H "Content-Type: application/json" \
        -H "X-API-Key: $KEY" >"$out" 2>&1 || say "fixed_rate against $url failed (see $out)"
    [ -z "$pid" ] || u1=$(cpu_total "$pid")
    # sent N measured N errors N late N rate R p50 X p90 X p99 X ...
    read -r sent errors late p50 p99 < <(awk '/^sent / { print $2, $6, $8, $12, $16 }' "$out")
    [ -z "$pid" ] || cpu=$(us_per_req $((u1 - u0)) "${sent:-0}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "${p50:--}" "${p99:--}" "$cpu" \
        "${errors:--}" "${late:--}" >>"$FR_TSV"
    [ "${errors:-1}" = 0 ] || note "fixed rate, $name round $round: ${errors:-?} errors"
}

# Column $2 of target $1: median over rounds; with $3 = "added", each
# round's value minus direct's of the same round first.
fr_col() {
    local values
    mapfile -t values < <(awk -F'\t' -v n="$1" -v c="$2" -v added="${3:-}" '
        $1 == "upstream direct" { direct[$2] = $c }
        $1 == n { mine[$2] = $c }
        END { for (r in mine) if (added == "") print mine[r]; else if (r in direct) printf "%.3f\n", mine[r] - direct[r] }' "$FR_TSV")
    median "${values[@]}"
}

# Sum of column $2 over target $1's rounds.
fr_sum() {
    awk -F'\t' -v n="$1" -v c="$2" '$1 == n { s += $c } END { print s + 0 }' "$FR_TSV"
}

fixed_rate_table() {
    echo "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req | late | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local t name url pid
    for t in "${FR_TARGETS[@]}"; do
        IFS='|' read -r name url pid <<<"$t"
        if [ "$name" = "upstream direct" ]; then
            printf '| %s | %s | %s | - | - | - |' "$name" "$(fr_col "$name" 3)" "$(fr_col "$name" 4)"
        else
            printf '| %s | %s | %s | %s | %s | %s |' "$name" "$(fr_col "$name" 3)" "$(fr_col "$name" 4)" \
                "$(fr_col "$name" 3 added)" "$(fr_col "$name" 4 added)" "$(fr_col "$name" 5)"
        fi
        printf ' %s | %s |\n' "$(fr_sum "$name" 7)" "$(fr_sum "$name" 6)"
    done
}

scenario_fixed_rate() {
    need_upstream
    need_nginx_small
    need_gateway_small
    FR_TARGETS=("upstream direct|http://127.0.0.1:$P_UP/api/generate|")
    [ -n "${NGX_SMALL_PID:-}" ] && FR_TARGETS+=("nginx|http://127.0.0.1:$P_NGX_SMALL/ollama/api/generate|$NGX_SMALL_PID")
    FR_TARGETS+=("ai-gateway|http://127.0.0.1:$P_GW_SMALL/ollama/api/generate|$GW_SMALL_PID")
    FR_TSV=$TMP/fixed-rate.tsv
    : >"$FR_TSV"
    local round t name url pid gw_add ngx_add
    for round in $(seq 1 "$ROUNDS"); do
        for t in "${FR_TARGETS[@]}"; do
            IFS='|' read -r name url pid <<<"$t"
            fixed_rate_run "$name" "$url" "$pid" "$round"
        done
    done

    echo "## Fixed rate ($RATE req/s)"
    echo
    echo "\`examples/fixed_rate.rs\`: $RATE req/s for ${FR_SECS}s (the first second not measured) on $FR_CONNS keep-alive"
    echo "connections, the POST of the throughput scenario; $ROUNDS round(s) interleaving the targets; medians over"
    echo "rounds. Latency runs from writing a request to reading its whole response. *Added* is a round's figure minus"
    echo "the upstream's own (direct) in the same round: what the proxy adds. *Late* counts requests that left over"
    echo "1 ms after their due time."
    echo
    fixed_rate_table
    echo
    gw_add=$(fr_col ai-gateway 3 added)
    ngx_add=$(fr_col nginx 3 added)
    echo "At p50 the gateway adds $gw_add ms over direct, nginx $ngx_add ms: a difference of" \
        "$(awk -v a="$gw_add" -v b="$ngx_add" 'BEGIN { if (a != "-" && b != "-") printf "%.3f ms", a - b; else print "-" }')."
    echo
    command_line fixed_rate ROUNDS RATE FR_SECS FR_CONNS
}
