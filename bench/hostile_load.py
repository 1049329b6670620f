"""Hostile load on `herd serve`: well-behaved streams mixed with clients that misbehave.

C workers (default 64) loop until --seconds have passed, each request's kind drawn at random
(seeded): a well-behaved streaming completion read to its end (`ok`), one abandoned after a few
chunks (`disconnect`), one read slowly (`slow`: a chunk every 0.3 s, then abandoned), one never
read for a while (`silent`), an oversized body (`oversized`, 3 MiB: 413 expected), half a
request head left hanging (`half`), and a body that is not JSON (`garbage`: 400 expected).

Prints one JSON line: per kind the count and the unexpected outcomes, the p50/p99 total latency
and time to first token of the `ok` requests (ms), and the server's herd_kv_blocks_used and
herd_requests_running read from /metrics once the run ended and the server settled (both must
be 0: no KV block leaked). Exit 1 if any well-behaved request failed or anything leaked.

Usage: hostile_load.py BASE_URL MODEL [--concurrency C] [--seconds S] [--seed N] [--tokens N]
Only the standard library.
"""
import argparse
import json
import random
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("--concurrency", type=int, default=64)
ap.add_argument("--seconds", type=float, default=180)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tokens", type=int, default=32)
a = ap.parse_args()

url = urllib.parse.urlparse(a.base)
HOST, PORT = url.hostname, url.port
KINDS = [("ok", 50), ("disconnect", 15), ("slow", 8), ("silent", 5), ("oversized", 8),
         ("half", 7), ("garbage", 7)]

lock = threading.Lock()
stats = {k: {"count": 0, "unexpected": 0, "notes": []} for k, _ in KINDS}
latency, ttft = [], []


def connect():
    s = socket.create_connection((HOST, PORT), timeout=120)
    return s


def request(body, stream=True):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    return head, data


def completion(i, tokens):
    return {"model": a.model, "prompt": f"Story number {i}: once upon a time", "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "temperature": 0.7, "seed": i}


def status_of(sock):
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return 0, buf
        buf += chunk
    return int(buf.split(b" ")[1]), buf


def read_events(sock, buf, limit=None, pause=0.0):
    """Read SSE data lines until [DONE] (True) or `limit` events (False); first event time."""
    seen, first = 0, None
    while True:
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if b"data: " not in event:
                continue
            if first is None:
                first = time.monotonic()
            if b"[DONE]" in event:
                return True, first
            if b'"error"' in event:
                raise RuntimeError(event.decode(errors="replace")[:200])
            seen += 1
            if limit is not None and seen >= limit:
                return False, first
            if pause:
                time.sleep(pause)
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before [DONE]")
        buf += chunk


def one(kind, i, rng):
    s = connect()
    try:
        if kind == "half":
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            time.sleep(rng.uniform(1, 5))
            return None
        if kind == "oversized":
            head, data = request(b'{"model": "m", "prompt": "' + b"x" * (3 << 20) + b'"}')
            s.sendall(head)
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may answer and close before the whole body is sent
            try:
                code, _ = status_of(s)
            except ConnectionResetError:
                return None  # answered and closed while the body was still being sent
            return None if code == 413 else f"status {code}"
        if kind == "garbage":
            head, data = request(b'{"model": ' + bytes(rng.getrandbits(8) for _ in range(64)))
            s.sendall(head + data)
            code, _ = status_of(s)
            return None if code == 400 else f"status {code}"
        tokens = a.tokens if kind == "ok" else 200
        t0 = time.monotonic()
        head, data = request(completion(i, tokens))
        s.sendall(head + data)
        code, buf = status_of(s)
        if code != 200:
            return f"status {code}"
        if kind == "ok":
            done, first = read_events(s, buf)
            t1 = time.monotonic()
            with lock:
                latency.append(t1 - t0)
                ttft.append((first or t1) - t0)
            return None if done else "no [DONE]"
        if kind == "disconnect":
            read_events(s, buf, limit=rng.randint(1, 5))
        elif kind == "slow":
            read_events(s, buf, limit=rng.randint(3, 10), pause=0.3)
        elif kind == "silent":
            time.sleep(rng.uniform(2, 8))
        return None
    finally:
        s.close()


def worker(w, deadline):
    rng = random.Random(a.seed * 1000 + w)
    names, weights = zip(*KINDS)
    i = w * 100000
    while time.monotonic() < deadline:
        kind = rng.choices(names, weights)[0]
        i += 1
        try:
            problem = one(kind, i, rng)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            problem = f"{type(e).__name__}: {e}"
            if kind not in ("ok",):
                problem = None if kind in ("disconnect", "slow", "silent", "half") else problem
        with lock:
            st = stats[kind]
            st["count"] += 1
            if problem:
                st["unexpected"] += 1
                if len(st["notes"]) < 3:
                    st["notes"].append(problem)


def metric(name):
    with urllib.request.urlopen(a.base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, max(0, int(-(-p * len(xs) // 100)) - 1))], 1)


deadline = time.monotonic() + a.seconds
threads = [threading.Thread(target=worker, args=(w, deadline)) for w in range(a.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# Abandoned sequences are cancelled at once; give the engine a moment to retire the last steps.
blocks = running = None
for _ in range(100):
    blocks, running = metric("herd_kv_blocks_used"), metric("herd_requests_running")
    if blocks == 0 and running == 0:
        break
    time.sleep(0.2)
out = {"concurrency": a.concurrency, "seconds": a.seconds, "kinds": stats,
       "ok_latency_p50_ms": pct(latency, 50), "ok_latency_p99_ms": pct(latency, 99),
       "ok_ttft_p50_ms": pct(ttft, 50), "ok_ttft_p99_ms": pct(ttft, 99),
       "kv_blocks_used_after": blocks, "requests_running_after": running}
print(json.dumps(out))
failed = stats["ok"]["unexpected"] or blocks != 0 or running != 0
sys.exit(1 if failed else 0)
