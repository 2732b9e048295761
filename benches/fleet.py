#!/usr/bin/env python3
"""least_busy against round_robin on a two-speed pair of model servers.

Two paced upstreams stream Ollama-shaped NDJSON: a fast one (a line every
FAST_MS) and one five times slower, LINES lines each. Like a GPU, each runs
PARALLEL streams at full speed and slows down past that (a line every
delay x in_flight / PARALLEL), so piling streams on the slow one costs. The
gateway (release build) has one route over both (with CAP > 0, also
`max_in_flight: CAP` each and a queue); CLIENTS closed-loop clients stream
through it for SECONDS per round. Rounds alternate
`round_robin` and `least_busy`, ROUNDS of each, same run. Reported per round:
streams completed per minute, time to the first line p50/p99 (which includes
any wait in the queue), and each upstream's share.

    python3 benches/fleet.py [path/to/ai-gateway]    # default target/release

Settings by environment: CLIENTS=40 SECONDS=20 ROUNDS=2 LINES=20 FAST_MS=10
PARALLEL=4 CAP=0. (With caps every upstream saturated, both policies fill
every slot and serve the same: the choice matters below saturation.) Needs only python3; everything binds loopback.
"""
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLIENTS = int(os.environ.get("CLIENTS", 40))
SECONDS = float(os.environ.get("SECONDS", 20))
ROUNDS = int(os.environ.get("ROUNDS", 2))
LINES = int(os.environ.get("LINES", 20))
FAST_MS = float(os.environ.get("FAST_MS", 10))
CAP = int(os.environ.get("CAP", 0))
PARALLEL = int(os.environ.get("PARALLEL", 4))
KEY = "bench-fleet-key-1"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Upstream:
    """A paced NDJSON streamer that counts what it serves."""

    def __init__(self, delay_s):
        self.delay = delay_s
        self.served = 0
        self.in_flight = 0
        self.port = free_port()

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                self.in_flight += 1
                for i in range(LINES):
                    await asyncio.sleep(self.delay * max(1.0, self.in_flight / PARALLEL))
                    done = "true" if i == LINES - 1 else "false"
                    line = ('{"model":"m","response":"tok","done":%s}\n' % done).encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
                self.in_flight -= 1
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                self.served += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)


async def client(port, stop_at, ttfbs, done):
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    request = (
        b"POST /api/generate HTTP/1.1\r\nHost: bench\r\nX-API-Key: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (KEY.encode(), len(body), body)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() < stop_at:
        start = time.monotonic()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        first = True
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if first and size:
                ttfbs.append(time.monotonic() - start)
                first = False
            if size == 0:
                break
        done.append(1)
    writer.close()


def config(dirname, port, fast, slow, balance):
    with open(os.path.join(dirname, "keys.json"), "w") as f:
        json.dump({KEY: {"user": "bench", "service": "chat"}}, f)
    os.chmod(os.path.join(dirname, "keys.json"), 0o600)
    path = os.path.join(dirname, "g.yaml")
    cap = f", max_in_flight: {CAP}" if CAP else ""
    queue = "    queue: {max: 1000, timeout: 60s}\n" if CAP else ""
    with open(path, "w") as f:
        f.write(
            f"""listen: "127.0.0.1:{port}"
keys_file: keys.json
shutdown_grace: 1s
watch: false
upgrade_sock: {dirname}/g.sock
routes:
  - name: chat
    path_prefix: /api/
    service: chat
    api: ollama
    balance: {balance}
{queue}    upstreams:
      - {{address: "127.0.0.1:{fast.port}"{cap}}}
      - {{address: "127.0.0.1:{slow.port}"{cap}}}
"""
        )
    return path


async def wait_listening(port):
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the gateway did not start")


async def round_(binary, balance, fast, slow):
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        path = config(d, port, fast, slow, balance)
        log = open(os.path.join(d, "log"), "w")
        gw = subprocess.Popen([binary, "run", "--config", path], stderr=log, stdout=log)
        try:
            await wait_listening(port)
            fast.served = slow.served = 0
            ttfbs, done = [], []
            stop_at = time.monotonic() + SECONDS
            await asyncio.gather(*(client(port, stop_at, ttfbs, done) for _ in range(CLIENTS)))
            elapsed = SECONDS  # clients stop starting new streams at stop_at
            ttfbs.sort()
            p = lambda q: ttfbs[min(len(ttfbs) - 1, int(q * len(ttfbs)))] * 1000
            return {
                "balance": balance,
                "per_min": len(done) * 60 / elapsed,
                "ttfb_p50": p(0.5),
                "ttfb_p99": p(0.99),
                "fast": fast.served,
                "slow": slow.served,
            }
        finally:
            gw.terminate()
            gw.wait()


async def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/ai-gateway"
    fast, slow = Upstream(FAST_MS / 1000), Upstream(FAST_MS * 5 / 1000)
    await fast.start()
    await slow.start()
    print(
        f"`python3 benches/fleet.py` CLIENTS={CLIENTS} SECONDS={SECONDS:g} ROUNDS={ROUNDS} "
        f"LINES={LINES} FAST_MS={FAST_MS:g} (slow: {FAST_MS * 5:g} ms) PARALLEL={PARALLEL} "
        f"CAP={CAP}\n"
    )
    print("| round | balance | streams/min | first line p50 | p99 | fast / slow served |")
    print("|---|---|---:|---:|---:|---:|")
    results = []
    for r in range(ROUNDS):
        for balance in ("round_robin", "least_busy"):
            x = await round_(binary, balance, fast, slow)
            results.append(x)
            print(
                f"| {r + 1} | {balance} | {x['per_min']:,.0f} | {x['ttfb_p50']:.1f} ms "
                f"| {x['ttfb_p99']:.1f} ms | {x['fast']} / {x['slow']} |"
            )
    med = lambda b, k: statistics.median(x[k] for x in results if x["balance"] == b)
    print(
        f"\nmedians: least_busy / round_robin streams per minute "
        f"{med('least_busy', 'per_min') / med('round_robin', 'per_min'):.2f}x, "
        f"first line p99 {med('least_busy', 'ttfb_p99'):.1f} vs "
        f"{med('round_robin', 'ttfb_p99'):.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
