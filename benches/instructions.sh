#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (repeatable on a
# busy machine, unlike req/s): a gateway binary, one proxy thread, in front
# of nginx `return 200`; N1 then N2 keep-alive GETs with a valid key from
# one client; the difference of the two totals over N2 - N1 is the cost of
# one request (start-up and shutdown cancel out). The route has two
# upstreams (nginx on two ports), so balancing does its work.
#
#   benches/instructions.sh BIN [BIN2 ...]      # N1=100 N2=1100
#
# ROUTE_EXTRA adds settings to the route, to price one setting with the
# same binary: ROUTE_EXTRA=', balance: least_busy' benches/instructions.sh BIN
#
# Needs valgrind, nginx, python3. Compare two builds by naming both.
set -euo pipefail
N1=${N1:-100}
N2=${N2:-1100}
export PATH="$PATH:/usr/sbin:/sbin"
for tool in valgrind nginx python3; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is needed" >&2; exit 2; }
done

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# total BIN N: callgrind's instruction total for a run with N requests.
total() {
  local bin=$1 n=$2 w up up2 g np gp
  w=$(mktemp -d /tmp/agw-instr.XXXXXX)
  up=$(port); up2=$(port); g=$(port)
  mkdir -p "$w/nginx"
  cat >"$w/nginx.conf" <<NG
daemon off; master_process off; worker_processes 1; pid $w/nginx/pid; error_log $w/nginx/err warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $w/nginx/b; proxy_temp_path $w/nginx/p;
  fastcgi_temp_path $w/nginx/f; uwsgi_temp_path $w/nginx/u; scgi_temp_path $w/nginx/s;
  server { listen 127.0.0.1:$up; listen 127.0.0.1:$up2; location / { default_type application/json; return 200 '{"ok":true}\n'; } } }
NG
  nginx -p "$w/nginx" -c "$w/nginx.conf" -e "$w/nginx/err" &
  np=$!
  echo '{"bench-key-1": {"user": "u", "service": "chat"}}' >"$w/keys.json"
  chmod 600 "$w/keys.json"
  cat >"$w/g.yaml" <<Y
listen: "127.0.0.1:$g"
keys_file: keys.json
threads: 1
shutdown_grace: 1s
watch: false
upgrade_sock: $w/g.sock
routes:
  - {name: chat, path_prefix: /chat/, service: chat, strip_prefix: true, upstreams: ["127.0.0.1:$up", "127.0.0.1:$up2"]${ROUTE_EXTRA:-}}
Y
  valgrind --tool=callgrind --callgrind-out-file="$w/cg.out" "$bin" run --config "$w/g.yaml" 2>"$w/g.log" &
  gp=$!
  python3 - "$g" "$n" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 120
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/chat/x", headers={"X-API-Key": "bench-key-1"})
        c.getresponse().read()
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
for _ in range(n):
    c.request("GET", "/chat/x", headers={"X-API-Key": "bench-key-1"})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
  kill -TERM "$gp"
  wait "$gp" 2>/dev/null || true
  kill "$np" 2>/dev/null || true
  wait "$np" 2>/dev/null || true
  awk '/^totals:/ {print $2}' "$w/cg.out"*
  rm -rf "$w"
}

printf '| binary | instructions per request |\n|---|---:|\n'
for bin in "$@"; do
  a=$(total "$bin" "$N1")
  b=$(total "$bin" "$N2")
  printf '| %s | %s |\n' "$bin" "$(( (b - a) / (N2 - N1) ))"
done
