# shellcheck shell=bash
# Scenario: reload under load: the gateway with BIG_KEYS keys under wrk, without and with a SIGHUP every second

# Reload lines the big gateway has logged so far.
reloads_logged() {
    grep -c 'reload (SIGHUP): generation' "$GW_BIG_LOG" || true
}

# wrk while a background loop sends SIGHUP every second (RELOAD_SECS - 1
# of them), then waits for the last reload to be logged.
reload_run() {
    local hup_pid deadline before=$1
    (
        sleep 0.5
        for _ in $(seq 1 $((RELOAD_SECS - 1))); do
            kill -HUP "$GW_BIG_PID" 2>/dev/null || exit 0
            sleep 1
        done
    ) &
    hup_pid=$!
    PIDS+=("$hup_pid")
    run_wrk "$TMP/wrk-reload.txt" "http://127.0.0.1:$P_GW_BIG/ollama/api/generate" "${RELOAD_SECS}s" "$GW_BIG_PID"
    wait "$hup_pid" 2>/dev/null || true
    forget_pid "$hup_pid"
    deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ] && [ $(($(reloads_logged) - before)) -lt $((RELOAD_SECS - 1)) ]; do
        sleep 0.5
    done
    sleep 1
}

scenario_reload() {
    need_gateway_big
    say "reload under load: gateway with $BIG_KEYS keys, wrk ${RELOAD_SECS}s without and with SIGHUP every second"
    local rss_before before base times=() median_ms="-" max_ms="-" failed
    rss_before=$(rss_mb "$GW_BIG_PID")
    run_wrk "$TMP/wrk-reload-baseline.txt" "http://127.0.0.1:$P_GW_BIG/ollama/api/generate" "${RELOAD_SECS}s" "$GW_BIG_PID"
    base="| no reloads | $WRK_RPS | $WRK_P50 | $WRK_P99 | $WRK_NON2XX | $WRK_SOCKERR |"
    before=$(reloads_logged)
    reload_run "$before"
    mapfile -t times < <(grep 'reload (SIGHUP): generation' "$GW_BIG_LOG" | tail -n +$((before + 1)) |
        sed -n 's/.* in \([0-9]*\) ms.*/\1/p')
    failed=$(grep -c 'reload (SIGHUP) failed' "$GW_BIG_LOG" || true)
    if [ "${#times[@]}" -gt 0 ]; then
        median_ms=$(median "${times[@]}")
        max_ms=$(printf '%s\n' "${times[@]}" | sort -g | tail -n 1)
    else
        note "no reload was logged (looked for 'reload (SIGHUP): generation N, ... in X ms' in $GW_BIG_LOG)"
    fi

    echo "## Reload under load ($BIG_KEYS keys)"
    echo
    echo "\`wrk -t$THREADS -c$CONNS -d${RELOAD_SECS}s\` twice against the gateway with $BIG_KEYS keys; during the second,"
    echo "SIGHUP every second (each reload reads the key file again)."
    echo
    echo "| run | req/s | p50 ms | p99 ms | non-2xx | socket errors |"
    echo "|---|---:|---:|---:|---:|---:|"
    echo "$base"
    echo "| SIGHUP every 1 s | $WRK_RPS | $WRK_P50 | $WRK_P99 | $WRK_NON2XX | $WRK_SOCKERR |"
    echo
    echo "Reloads logged: ${#times[@]} of $((RELOAD_SECS - 1)) SIGHUPs sent (failed: $failed); one reload took median"
    echo "$median_ms ms, max $max_ms ms (first load: ${GW_BIG_LOAD_MS:-?} ms). RSS before: $rss_before MB, after: $(rss_mb "$GW_BIG_PID") MB."
    echo
    command_line reload RELOAD_SECS BIG_KEYS CONNS THREADS
}
