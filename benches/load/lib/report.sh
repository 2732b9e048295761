# shellcheck shell=bash
# The report: medians over rounds, ratios, the header and the notes.
# Scenarios keep their rows in tab-separated files (first column the target
# or mode, second the round) and read them back with these.

# Median of numbers (arguments; negative ones too: an added latency can be);
# "-" when there are none.
median() {
    printf '%s\n' "$@" | { grep -E '^-?[0-9.]+$' || true; } | sort -g | awk '
        { a[NR] = $1 }
        END {
            if (NR == 0) print "-"
            else if (NR % 2) print a[(NR + 1) / 2]
            else print (a[NR / 2] + a[NR / 2 + 1]) / 2
        }'
}

# Median of column $2 of file $1 over the rows whose first column is $3
# (and, with $4, whose second column is $4).
tsv_median() {
    local values
    mapfile -t values < <(awk -F'\t' -v c="$2" -v a="$3" -v b="${4-}" -v has_b="${4+1}" \
        '$1 == a && (has_b == "" || $2 == b) { print $c }' "$1")
    median "${values[@]}"
}

# a / b as "0.83×", "-" when either is missing.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b + 0 > 0) printf "%.2f×", a / b; else print "-" }'
}

# The per-round ratios of column $2 of file $1 between the rows "on" and
# "off" of each round (column 1 the mode, 2 the round): paired, so that the
# load of a shared machine, which moves between rounds, cancels out. One a line.
paired_ratios() {
    awk -F'\t' -v c="$2" '$1 == "off" { off[$2] = $c } $1 == "on" { on[$2] = $c }
        END { for (r in on) if (off[r] > 0) printf "%.4f\n", on[r] / off[r] }' "$1"
}

# "met" or "missed": is ratio $1 (as "0.83×") $2 (">=" or "<=") $3?
verdict() {
    awk -v r="${1%×}" -v op="$2" -v t="$3" 'BEGIN {
        if (r == "-" || r == "") print "not measured"
        else if ((op == ">=" && r + 0 >= t) || (op == "<=" && r + 0 <= t)) print "met"
        else print "missed" }'
}

# The `Command:` line of a section: the settings named (with their values
# in this run) and the scenario.
command_line() {
    local scenario=$1 v line=""
    shift
    for v in "$@"; do line+="$v=${!v} "; done
    echo "Command: \`${line}benches/load.sh $scenario\`"
}

# What every section shares: when, where, which build, how busy.
report_header() {
    local git_rev
    git_rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
    git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || git_rev+=" (src modified)"
    echo "# ai-gateway load bench"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n): $(nproc) cores, $(uname -sr), git $git_rev."
    echo "Scenarios: ${SELECTED[*]}. Everything on loopback, sharing the cores with the load clients;"
    echo "nginx: 2 workers, a \`map\` of the keys, keepalive 64 upstream; ai-gateway: \`threads: 2\` (two proxy"
    echo "services of one thread each, a listening socket each with SO_REUSEPORT), a route \`/ollama/\` (strip_prefix)."
    echo "CPU µs/req is the server's user+system time (nginx: master and workers; not the upstream's) per request."
    echo "Load average (1/5/15 min) at the start: $LOADAVG_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "(a machine busy with anything else makes these numbers meaningless)."
}

report_notes() {
    [ "${#NOTES[@]}" -gt 0 ] || return 0
    echo
    echo "## Notes"
    echo
    printf -- '- %s\n' "${NOTES[@]}"
}

# The two rows of an A/B file (see ab_rounds): $1 = file, $2, $3 = how the
# "off" and "on" rows are named.
ab_table() {
    local mode label
    echo "| route | req/s | p50 ms | p99 ms | CPU µs/req |"
    echo "|---|---:|---:|---:|---:|"
    for mode in off on; do
        label=$2
        [ "$mode" = on ] && label=$3
        echo "| $label | $(tsv_median "$1" 3 "$mode") | $(tsv_median "$1" 4 "$mode") | $(tsv_median "$1" 5 "$mode") | $(tsv_median "$1" 6 "$mode") |"
    done
}

# Sorted numbers (one a line on stdin) as "0.97, 0.99, 1.01"; $1 = decimals.
list_of() {
    sort -g | awk -v d="$1" '{ printf "%s%.*f", (NR > 1 ? ", " : ""), d, $1 }'
}

# Number $2 with $1 decimals ("-" stays "-").
decimals() {
    awk -v d="$1" -v v="$2" 'BEGIN { if (v == "-" || v == "") print "-"; else printf "%.*f", d, v }'
}

# Column $2 of A/B file $1 as "**0.987** as the median of the per-round
# ratios (0.952, 0.987, 1.010)" (on / off).
paired_median() {
    local r
    mapfile -t r < <(paired_ratios "$1" "$2")
    echo "**$(decimals 3 "$(median "${r[@]}")")** as the median of the per-round ratios ($(printf '%s\n' "${r[@]}" | list_of 3))"
}
