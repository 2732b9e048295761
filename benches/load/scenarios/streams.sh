# shellcheck shell=bash
# Scenario: thousands of concurrent model-server streams (NDJSON and SSE) through nginx and the gateway: CPU per chunk, memory per open stream, delay added to each chunk

# The work is examples/streams (a Rust program: the paced upstream, the
# clients, fresh nginx and gateway processes per run, /proc readings); this
# file passes the settings and puts its tables in the report.
EXAMPLES+=(streams)
STREAMS_N=${STREAMS_N:-1000,5000,max}
STREAMS_LINES=${STREAMS_LINES:-200}
STREAMS_ROUNDS=${STREAMS_ROUNDS:-1}
STREAMS_FORMATS=${STREAMS_FORMATS:-ndjson,sse}

scenario_streams() {
    echo "## Streams at scale"
    echo
    if [ -z "$NGINX" ]; then
        note "streams skipped: it compares with nginx, which is not available"
        echo "Skipped: nginx is missing."
        return 0
    fi
    local out=$TMP/streams.md
    say "streams: N=$STREAMS_N, $STREAMS_LINES lines 50 ms apart, formats $STREAMS_FORMATS, $STREAMS_ROUNDS round(s)"
    if ! run_fg "$TARGET_DIR/release/examples/streams" --gateway "$GATEWAY_BIN" --nginx "$NGINX" \
        --n "$STREAMS_N" --lines "$STREAMS_LINES" --rounds "$STREAMS_ROUNDS" --formats "$STREAMS_FORMATS" >"$out"; then
        note "streams failed (see $out)"
        echo "Failed; see the notes."
        return 0
    fi
    echo "Each target started fresh per run (nginx: 2 workers, \`proxy_buffering off\`, the key in a \`map\`;"
    echo "ai-gateway: \`threads: 2\`, the route's \`api\` on, usage counted, an audit log), N streams opened evenly"
    echo "over 3 s, each on its own connection, from one paced upstream that stamps every line. CPU per line is the"
    echo "server's user+system time over the run divided by the lines delivered (requests, handshakes and all);"
    echo "KB/stream is the largest RSS while the streams were open minus the idle RSS, over N; the delay is"
    echo "arrival minus the upstream's stamp, and *added* subtracts the upstream-direct run's quantile."
    echo "Targets: CPU per line at most 1.2× nginx's, KB/stream at most 1.5× nginx's, added p99 under 1 ms at 5,000."
    echo
    cat "$out"
    command_line streams STREAMS_N STREAMS_LINES STREAMS_ROUNDS STREAMS_FORMATS
}
