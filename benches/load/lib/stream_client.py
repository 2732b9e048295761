"""Time to first chunk, for the first_chunk scenario of benches/load.sh.

Usage: stream_client.py DIRECT_PORT GATEWAY_PORT KEY N. Sends N streaming
requests to each of: the upstream direct, the gateway's /stream/ and its
/stream-ai/ (api: ollama), a new connection per request; prints per target
"name head_ms first_chunk_ms total_ms", medians.
"""
import http.client, statistics, sys, time
direct_port, gw_port, key, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# The order of the targets rotates, so none always runs just after another.
body = b'{"model":"llama3.2:1b","prompt":"Why is the sky blue?","stream":true}'
def one(port, path, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.perf_counter()
    c.request("POST", path, body=body, headers=headers)
    r = c.getresponse()
    t_head = time.perf_counter()
    first = r.readline()
    t_first = time.perf_counter()
    rest = r.read()
    t_end = time.perf_counter()
    c.close()
    if r.status != 200 or not first.startswith(b"{") or b'"done":true' not in rest:
        raise SystemExit("bad streaming response from port %d: %d %r" % (port, r.status, first[:80]))
    return (t_head - t0) * 1000, (t_first - t0) * 1000, (t_end - t0) * 1000
targets = [
    ("direct", direct_port, "/api/generate", {"Content-Type": "application/json"}),
    ("gateway", gw_port, "/stream/api/generate", {"Content-Type": "application/json", "X-API-Key": key}),
    ("gateway-ai", gw_port, "/stream-ai/api/generate", {"Content-Type": "application/json", "X-API-Key": key}),
]
res = {name: [] for name, _, _, _ in targets}
for i in range(n):
    for k in range(len(targets)):
        name, port, path, headers = targets[(i + k) % len(targets)]
        res[name].append(one(port, path, headers))
for name, rows in res.items():
    head, first, total = (statistics.median(col) for col in zip(*rows))
    print("%s %.2f %.2f %.2f" % (name, head, first, total))
