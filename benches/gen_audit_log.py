#!/usr/bin/env python3
"""Writes an audit log of a given size for measuring the status page's
history rebuild at start (docs/status-page.md).

    benches/gen_audit_log.py OUT SIZE_MB [DAYS [UPSTREAMS]]

Lines look like the gateway's own (same fields, same order), spread
evenly over the last DAYS days (default 30), oldest first, for 200 keys
of 20 users, two routes and three upstreams (UPSTREAMS: three addresses,
comma-separated; default 10.1.0.1-3:11434), with refusals and tokens.
"""
import json
import random
import sys
import time
from datetime import datetime, timezone


def main():
    out, size_mb = sys.argv[1], int(sys.argv[2])
    days = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    global UPSTREAMS
    if len(sys.argv) > 4:
        UPSTREAMS = sys.argv[4].split(",")
    target = size_mb * 1024 * 1024
    rnd = random.Random(24)
    keys = [("%012x" % rnd.getrandbits(48), "user%d" % (i % 20)) for i in range(200)]
    reasons = ["rate_limited", "token_budget_exceeded", "missing_key", "unknown_key", "model_not_allowed"]
    # Estimate the line count from one sample line, then space them evenly.
    sample = line(rnd, keys, reasons, time.time(), 0)
    n = max(1, target // (len(sample) + 1))
    now = time.time()
    start = now - days * 86400
    step = (now - start) / n
    written = 0
    with open(out, "w", buffering=1 << 20) as f:
        i = 0
        while written < target:
            text = line(rnd, keys, reasons, start + i * step, i)
            f.write(text)
            f.write("\n")
            written += len(text) + 1
            i += 1
    print("%s: %d lines, %d bytes, %.0f days" % (out, i, written, days), file=sys.stderr)


UPSTREAMS = ["10.1.0.%d:11434" % n for n in (1, 2, 3)]


def line(rnd, keys, reasons, ts, i):
    key_id, user = keys[i % len(keys)]
    refused = rnd.random() < 0.05
    accepted = not refused
    route = "ollama" if i % 3 else "openai"
    return json.dumps({
        "ts": datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (int(ts * 1000) % 1000),
        "request_id": "%016x" % rnd.getrandbits(64),
        "client": "10.0.%d.%d:%d" % (i % 250, (i // 250) % 250, 40000 + i % 20000),
        "method": "POST",
        "path": "/ollama/api/chat" if route == "ollama" else "/v1/chat/completions",
        "route": route,
        "key_id": key_id,
        "user": user,
        "decision": "accepted" if accepted else reasons[i % len(reasons)],
        "status": 200 if accepted else 429,
        "upstream": (UPSTREAMS[i % 2] if route == "ollama" else UPSTREAMS[2]) if accepted else None,
        "upstream_status": 200 if accepted else None,
        "latency_ms": round(rnd.uniform(50, 4000), 3),
        "ttfb_ms": round(rnd.uniform(10, 300), 3) if accepted else None,
        "bytes_in": 180,
        "bytes_out": 2400 if accepted else 60,
        "model": "llama3.2" if accepted else None,
        "prompt_tokens": rnd.randint(10, 900) if accepted else None,
        "completion_tokens": rnd.randint(10, 600) if accepted else None,
        "usage": "reported" if accepted else None,
    }, separators=(",", ":"))


if __name__ == "__main__":
    main()
