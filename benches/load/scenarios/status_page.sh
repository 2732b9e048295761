# shellcheck shell=bash
# Scenario: what the status page costs the proxy: throughput with and without the page fetched every PAGE_EVERY s, in pairs

# One fetch of the page with the admin key: "code bytes seconds".
page_fetch() {
    curl --noproxy '*' -s -o "$TMP/page.html" -w '%{http_code} %{size_download} %{time_total}\n' \
        -u "root:$ADMIN_KEY" "http://127.0.0.1:$P_ADM_PAGE/"
}

# As a browser tab refreshing the page would.
page_loop() {
    while :; do
        page_fetch >>"$TMP/pages.txt"
        sleep "$PAGE_EVERY"
    done
}

# Waits for the page's history to be built from the audit log, then checks
# that the page answers; leaves PAGE_FIRST ("bytes in seconds").
page_ready() {
    local code size secs log=$TMP/gateway-page/gateway.log
    for _ in $(seq 1 600); do
        grep -q "history: rebuilt" "$log" && break
        sleep 0.1
    done
    read -r code size secs < <(page_fetch)
    [ "$code" = 200 ] || die "the status page answered $code"
    PAGE_FIRST="$size bytes in $secs s; $(grep -o 'history: rebuilt.*' "$log" | tail -n 1)"
}

scenario_status_page() {
    need_gateway_page
    page_ready
    local tsv=$TMP/status-page.tsv url="http://127.0.0.1:$P_GW_PAGE/ollama/api/generate" pages
    : >"$tsv"
    : >"$TMP/pages.txt"
    DURATION=$PAGE_DURATION ab_rounds "$tsv" "$PAGE_ROUNDS" "$GW_PAGE_PID" "$url" "$url" "status page" page_loop
    pages=$(grep -c '^200 ' "$TMP/pages.txt" || true)

    echo "## Status page"
    echo
    echo "One gateway with its audit log (which feeds the page's history${AUDIT_SEED:+, started from $AUDIT_SEED}), its"
    echo "admin listener and \`api: ollama\` on \`/ollama/\`; \`wrk -t$THREADS -c$CONNS -d$PAGE_DURATION\` with the page"
    echo "fetched every $PAGE_EVERY s with the admin key (as a browser tab refreshing it would) and without, $PAGE_ROUNDS"
    echo "round(s), the order alternating; medians over rounds. The page: $PAGE_FIRST."
    echo
    ab_table "$tsv" "without the page" "the page every $PAGE_EVERY s"
    echo
    echo "req/s with the page / without: $(paired_median "$tsv" 3)."
    echo "The gateway's CPU per request with / without: $(paired_median "$tsv" 6)."
    echo "Pages fetched (200) during the runs: $pages."
    echo
    command_line status_page PAGE_ROUNDS PAGE_DURATION PAGE_EVERY CONNS THREADS ${AUDIT_SEED:+AUDIT_SEED}
}
