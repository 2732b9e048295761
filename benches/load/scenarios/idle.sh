# shellcheck shell=bash
# Scenario: memory of IDLE_CONNS idle keep-alive client connections to the gateway (RSS and open files before, with, after)

# Opens IDLE_CONNS connections (one request each) and waits until they are
# all open; sets IDLE_PID, IDLE_OPEN and IDLE_FAILED ("-" if it never got there).
idle_open() {
    local out=$TMP/idle.txt deadline
    start_bg "$out" timeout 200 python3 "$BENCH_DIR/lib/idle_conns.py" "$P_GW_SMALL" "$IDLE_CONNS" "$KEY" 120
    IDLE_PID=$STARTED_PID
    deadline=$((SECONDS + 150))
    while [ "$SECONDS" -lt "$deadline" ] && ! grep -q '^ready' "$out"; do
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.5
    done
    IDLE_OPEN="-" IDLE_FAILED="-"
    if grep -q '^ready' "$out"; then
        read -r _ IDLE_OPEN IDLE_FAILED < <(grep '^ready' "$out")
        [ "$IDLE_FAILED" = 0 ] || note "idle: $IDLE_FAILED of $IDLE_CONNS connections failed ($(grep '^first failure' "$out" || true))"
    else
        note "idle: the client did not finish opening $IDLE_CONNS connections ($(tail -n 2 "$out" | tr '\n' ' '))"
    fi
}

scenario_idle() {
    need_gateway_small
    say "idle: $IDLE_CONNS idle keep-alive connections to the gateway with $SMALL_KEYS keys"
    local pid=$GW_SMALL_PID rss_before fd_before rss_with="-" fd_with="-" rss_after fd_after per_conn
    rss_before=$(rss_mb "$pid")
    fd_before=$(fd_count "$pid")
    idle_open
    if [ "$IDLE_OPEN" != "-" ]; then
        sleep 1 # let the last requests' buffers settle
        rss_with=$(rss_mb "$pid")
        fd_with=$(fd_count "$pid")
    fi
    stop_pid "$IDLE_PID"
    sleep 1
    rss_after=$(rss_mb "$pid")
    fd_after=$(fd_count "$pid")
    per_conn=$(awk -v a="$rss_before" -v b="$rss_with" -v n="$IDLE_OPEN" \
        'BEGIN { if (n + 0 > 0 && b != "-") printf "%.1f", (b - a) * 1024 / n; else print "-" }')

    echo "## Idle connections"
    echo
    echo "$IDLE_CONNS keep-alive connections to the gateway with $SMALL_KEYS keys, each after one request, held open"
    echo "(\`benches/load/lib/idle_conns.py\`); RSS of the gateway process."
    echo
    echo "| state | RSS MB | open files |"
    echo "|---|---:|---:|"
    echo "| just started | $RSS_GW_SMALL_START | - |"
    echo "| before the connections | $rss_before | $fd_before |"
    echo "| with $IDLE_OPEN connections open | $rss_with | $fd_with |"
    echo "| after they closed | $rss_after | $fd_after |"
    echo
    echo "An idle connection costs about $per_conn KB of RSS in the gateway."
    echo
    command_line idle IDLE_CONNS
}
