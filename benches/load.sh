#!/usr/bin/env bash
# Load benchmark: ai-gateway against nginx doing the same key check, on this
# machine, over loopback. One command:
#
#   benches/load.sh                      # build, run every scenario, write the report
#   benches/load.sh https h2             # only these scenarios, in this order
#   benches/load.sh --list               # the scenarios, one line each
#   benches/load.sh --install [...]      # first apt-get install what is missing
#   ROUNDS=1 DURATION=2s benches/load.sh # a quick smoke run
#
# Needs: cargo, curl, python3, openssl, wrk; nginx for the comparison (without
# it the upstream is examples/bench_upstream.rs and the nginx rows are left
# out); h2load (nghttp2-client) for `h2`; redis-server for the shared-limits row.
# Settings (environment; each scenario's `Command:` line repeats the ones it used):
#   ROUNDS=3  DURATION=5s  CONNS=64  THREADS=2   wrk and h2load runs, interleaved per round
#   BIG_KEYS=1000000          the large key set
#   NGINX_BIG=auto            nginx with BIG_KEYS keys: auto (try, skip if it
#                             does not start in NGINX_BIG_TIMEOUT=180 s), 1, 0
#   RELOAD_SECS=10            each of the two reload-under-load wrk runs
#   IDLE_CONNS=10000          idle keep-alive client connections held open
#   STREAM_N=50               streaming requests per target (first_chunk)
#   AI_ROUNDS=8               rounds of the usage accounting comparison (each
#                             a pair of wrk runs, on and off, order alternating)
#   PACED_ROUNDS=6  PACED_CONNS=200   rounds and connections of the usage
#                             comparison on paced (Ollama-like) streams
#   HTTPS_N=2                 parallel `openssl s_time` clients in the
#                             handshake runs, full and resumed (https)
#   H2_CONNS=64  H2_STREAMS=10   h2load clients and streams per client (h2)
#   RATE=5000  FR_SECS=10  FR_CONNS=32   the fixed-rate latency runs (direct,
#                             nginx, gateway; ROUNDS rounds, interleaved)
#   PAGE_ROUNDS=6  PAGE_DURATION=10s  PAGE_EVERY=5   status_page: pairs of wrk
#                             runs with and without the page fetched every
#                             PAGE_EVERY s; AUDIT_SEED: an audit log to start
#                             from (benches/gen_audit_log.py writes one)
#   NO_NGINX=1                act as if nginx were not installed
#   SKIP_BUILD=1              use the existing release binaries
#   KEEP_TMP=1                keep the temp dir (configs, logs, wrk output)
#
# Everything listens on 127.0.0.1 on free ports, in a temp dir; every
# process started here is stopped on exit. The report goes to stdout and to
# benches/results-latest.md; progress goes to stderr.
#
# Layout (benches/load/): lib/*.sh are shared (common: settings, processes,
# build; peers, nginx, gateway: the servers, each started once per run by a
# need_* function when a scenario first asks for it; measure: wrk, CPU ticks,
# memory; report: medians, ratios, the header). scenarios/NAME.sh is one
# scenario. The contract of a scenario file (docs/benchmarks.md):
#   - its second line is `# Scenario: <one line>` (what --list prints);
#   - it defines scenario_NAME, which starts what it needs with need_*, writes
#     its report section to stdout (a `## ` heading, one table or a few
#     tightly related ones, and a `Command:` line from command_line) and its
#     progress to stderr (say); problems go to the Notes with note;
#   - it relies on no other scenario having run (a peer another scenario
#     started is reused, never assumed);
#   - it may append to EXAMPLES (examples to build) at the top level.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/load

# The order of a full run. A file in scenarios/ that is not listed runs after
# these; a listed name without a file is left out of a full run (`streams`:
# benches/load/scenarios/streams.sh, the streams-at-scale bench, comes separately).
ORDER=(throughput fixed_rate https h2 first_chunk usage paced_usage reload idle status_page streams)

# The scenarios present, in ORDER then the unlisted ones by name.
present_scenarios() {
    local name f
    for name in "${ORDER[@]}"; do
        [ -f "$BENCH_DIR/scenarios/$name.sh" ] && echo "$name"
    done
    for f in "$BENCH_DIR"/scenarios/*.sh; do
        name=$(basename "$f" .sh)
        case " ${ORDER[*]} " in *" $name "*) ;; *) echo "$name" ;; esac
    done
}

list_scenarios() {
    local name
    while read -r name; do
        if [ -f "$BENCH_DIR/scenarios/$name.sh" ]; then
            printf '%-12s %s\n' "$name" "$(sed -n 's/^# Scenario: //p' "$BENCH_DIR/scenarios/$name.sh" | head -n 1)"
        else
            printf '%-12s (not present yet)\n' "$name"
        fi
    done < <(printf '%s\n' "${ORDER[@]}"; present_scenarios | grep -vxF -f <(printf '%s\n' "${ORDER[@]}"))
}

INSTALL=0
SELECTED=()
for arg in "$@"; do
    case $arg in
        --install) INSTALL=1 ;;
        --list)
            list_scenarios
            exit 0
            ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        -*)
            echo "unknown option: $arg (try --help)" >&2
            exit 2
            ;;
        *)
            [ -f "$BENCH_DIR/scenarios/$arg.sh" ] || {
                echo "unknown scenario: $arg (benches/load.sh --list shows them)" >&2
                exit 2
            }
            SELECTED+=("$arg")
            ;;
    esac
done
[ "${#SELECTED[@]}" -gt 0 ] || mapfile -t SELECTED < <(present_scenarios)

for lib in common peers nginx gateway measure report; do
    # shellcheck source=/dev/null
    . "$BENCH_DIR/lib/$lib.sh"
done
for name in "${SELECTED[@]}"; do
    # shellcheck source=/dev/null
    . "$BENCH_DIR/scenarios/$name.sh"
done

setup_tools
build_binaries
setup_run
setup_peers

for name in "${SELECTED[@]}"; do
    say "scenario $name"
    # Not in a subshell: the peers a scenario starts and its notes stay.
    "scenario_$name" >"$TMP/section-$name.md"
done

{
    report_header
    for name in "${SELECTED[@]}"; do
        echo
        cat "$TMP/section-$name.md"
    done
    report_notes
} >"$TMP/report.md"
cp "$TMP/report.md" "$RESULTS"
cat "$TMP/report.md"
say "report written to $RESULTS"
