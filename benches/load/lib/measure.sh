# shellcheck shell=bash
# Measuring: wrk runs, CPU time and memory of a server's process tree, all
# from /proc (the server's own user+system time, not the client's).

# VmRSS of a process, in MB.
rss_mb() {
    awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "-"
}

# A process and its children (nginx: master and workers).
proc_tree() {
    local pid=$1
    echo "$pid"
    if [ -r "/proc/$pid/task/$pid/children" ]; then
        tr ' ' '\n' <"/proc/$pid/task/$pid/children" | sed '/^$/d'
    fi
}

# Sum of Pss over a process tree, in MB (shared pages counted once).
pss_mb() {
    local total=0 p kb
    for p in $(proc_tree "$1"); do
        kb=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v kb="$total" 'BEGIN { printf "%.1f", kb / 1024 }'
}

# CPU time of a process tree, in clock ticks: "user system".
cpu_ticks() {
    local user=0 sys=0 p u t
    for p in $(proc_tree "$1"); do
        read -r u t < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12, $13 }' || echo "0 0")
        user=$((user + ${u:-0}))
        sys=$((sys + ${t:-0}))
    done
    echo "$user $sys"
}

# user+system ticks of a process tree, one number.
cpu_total() {
    local u s
    read -r u s < <(cpu_ticks "$1")
    echo $((u + s))
}

# CPU ticks (user + system) of each proxy service thread of gateway $1:
# lines "ai-gateway-N ticks".
service_ticks() {
    local t name
    for t in /proc/"$1"/task/*; do
        name=$(cat "$t/comm" 2>/dev/null) || continue
        case $name in ai-gateway-*) ;; *) continue ;; esac
        echo "$name $(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{ print $12 + $13 }')"
    done | sort
}

# Open file descriptors of a process.
fd_count() {
    find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
}

# Microseconds per request of $1 ticks over $2 requests.
us_per_req() {
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }'
}

# wrk's latency ("612.00us", "2.31ms", "1.02s") in ms.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.0f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.1f", v * 1000 }
        else print "-" }'
}

# Runs wrk (the POST of post.lua, CONNS connections) against $2 for $3 (a
# duration) into file $1; the process tree $4 (may be empty) is charged CPU;
# $5 = an extra header. Leaves WRK_RPS, WRK_REQS, WRK_P50, WRK_P99 (ms),
# WRK_NON2XX, WRK_SOCKERR and WRK_CPU, WRK_CPU_USER, WRK_CPU_SYS (µs/req) set.
run_wrk() {
    local out=$1 url=$2 dur=$3 pid=${4:-} extra=${5:-} u0=0 s0=0 u1=0 s1=0 hdr=()
    [ -n "$extra" ] && hdr=(-H "$extra")
    [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
    run_fg timeout $(($(secs_of "$dur") + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$dur" --latency "${hdr[@]}" \
        -s "$TMP/post.lua" "$url" >"$out" 2>&1 ||
        say "wrk against $url failed or timed out (see $out)"
    [ -n "$pid" ] && read -r u1 s1 < <(cpu_ticks "$pid")
    WRK_RPS=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    WRK_RPS=${WRK_RPS:-0}
    WRK_REQS=$(awk '/ requests in / { print $1 }' "$out")
    WRK_REQS=${WRK_REQS:-0}
    WRK_P50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    WRK_P99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    WRK_NON2XX=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    WRK_NON2XX=${WRK_NON2XX:-0}
    WRK_SOCKERR=$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")
    WRK_SOCKERR=${WRK_SOCKERR:-0}
    if [ -n "$pid" ] && [ "$WRK_REQS" -gt 0 ]; then
        WRK_CPU=$(us_per_req $((u1 - u0 + s1 - s0)) "$WRK_REQS")
        WRK_CPU_USER=$(us_per_req $((u1 - u0)) "$WRK_REQS")
        WRK_CPU_SYS=$(us_per_req $((s1 - s0)) "$WRK_REQS")
    else
        WRK_CPU="-" WRK_CPU_USER="-" WRK_CPU_SYS="-"
    fi
}

# A note when the last wrk run had errors; $1 = what it was.
note_wrk_errors() {
    [ $((WRK_NON2XX + WRK_SOCKERR)) = 0 ] ||
        note "$1: $WRK_NON2XX non-2xx responses, $WRK_SOCKERR socket errors"
}

# An A/B comparison on one server, in pairs: $1 = the rows' file, $2 =
# rounds, $3 = the process charged CPU, $4 = URL "off", $5 = URL "on", $6 = a
# label for progress and notes, $7 (optional) = a command run in the
# background during each "on" run. Each round runs wrk against both, the
# order swapped every round (so neither always runs second, on a warmer or
# busier machine). Appends "mode round rps p50 p99 cpu non2xx sockerr".
ab_rounds() {
    local tsv=$1 rounds=$2 pid=$3 off=$4 on=$5 label=$6 during=${7:-} round pair t mode url bg
    for round in $(seq 1 "$rounds"); do
        pair=("off|$off" "on|$on")
        [ $((round % 2)) = 0 ] && pair=("on|$on" "off|$off")
        for t in "${pair[@]}"; do
            IFS='|' read -r mode url <<<"$t"
            say "$label round $round/$rounds: $mode (wrk -c$CONNS -d$DURATION $url)"
            bg=""
            if [ "$mode" = on ] && [ -n "$during" ]; then
                $during &
                bg=$!
                PIDS+=("$bg")
            fi
            run_wrk "$TMP/wrk-${label// /_}-$mode-$round.txt" "$url" "$DURATION" "$pid"
            [ -z "$bg" ] || stop_pid "$bg"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$WRK_RPS" "$WRK_P50" "$WRK_P99" \
                "$WRK_CPU" "$WRK_NON2XX" "$WRK_SOCKERR" >>"$tsv"
            note_wrk_errors "$label $mode round $round"
        done
    done
}
