"""Idle keep-alive connections, for the idle scenario of benches/load.sh.

Usage: idle_conns.py PORT N KEY HOLD_SECS. Opens N connections to the
gateway, makes one request on each (so each is a served keep-alive
connection), prints "ready OPEN FAILED" and holds them HOLD_SECS seconds.
"""
import socket, sys, time
port, n, key, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
body = b'{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}'
req = (b"POST /ollama/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
       b"X-API-Key: " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
socks, failed = [], 0
for i in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(head.split(b"\r\n")[0].decode())
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            rest += chunk
        socks.append(s)
    except OSError as e:
        failed += 1
        if failed == 1:
            print("first failure at connection %d: %s" % (i, e), flush=True)
print("ready %d %d" % (len(socks), failed), flush=True)
time.sleep(hold)
