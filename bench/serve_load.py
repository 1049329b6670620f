"""Load generator for OpenAI-compatible servers (herd serve, llama-server).

C concurrent clients each send R streaming /v1/completions requests one after the other
(max_tokens N, `ignore_eos` so every request generates N tokens). Per request it records the
time to first token (TTFT: from sending the request to the first SSE chunk that carries a token)
and the inter-token latencies (ITL: gaps between successive chunks that carry tokens). A chunk
carries a token when a choice has non-empty text, or has no finish_reason yet (llama-server may
send a token whose text it holds back as an empty chunk). Tokens are counted from the usage chunk
(`stream_options.include_usage`) when the server sends one, else as chunks carrying tokens.

Prints one JSON line: concurrency, temperature, requests, tokens, seconds (wall time of the whole
run), tokens_per_s (tokens / seconds), ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms
(nearest-rank percentiles over all requests' values). Any HTTP or connection error, an error
event in the stream or a read stalled past --timeout ends the run with a message and exit 1.

Usage: serve_load.py BASE_URL MODEL CONCURRENCY [--tokens N] [--rounds R]
                     [--temperature T] [--seed S] [--top-p P] [--timeout SECONDS]
With T > 0 request i (0-based over all clients) is sent with seed S + i, so runs repeat.
Only the standard library: it measures servers, not clients.
"""
import argparse
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("concurrency", type=int)
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--temperature", type=float, default=0.0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--top-p", type=float)
ap.add_argument("--timeout", type=float, default=600, help="seconds any connect or read may take")
a = ap.parse_args()

PROMPTS = ["The history of the printing press", "A recipe for bread begins with",
           "In the mountains of northern Italy", "The following is a list of rivers",
           "Once upon a time, in a small village,", "The rules of chess are simple:",
           "Photosynthesis is the process by which", "The train left the station at"]


def carries_token(choice):
    text = choice.get("text") or (choice.get("delta") or {}).get("content")
    return bool(text) or choice.get("finish_reason") is None


def one(i):
    """One streaming request: (tokens, ttft seconds, [inter-token gaps in seconds])."""
    body = {"model": a.model, "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})",
            "max_tokens": a.tokens, "temperature": a.temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if a.temperature > 0:
        body["seed"] = a.seed + i
    if a.top_p is not None:
        body["top_p"] = a.top_p
    req = urllib.request.Request(a.base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    times, usage = [], None
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=a.timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("error:"):
                raise RuntimeError(f"request {i}: server sent {line}")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"request {i}: server sent error {json.dumps(chunk['error'])}")
            if any(carries_token(c) for c in chunk.get("choices") or []):
                times.append(now)
            if (chunk.get("usage") or {}).get("completion_tokens") is not None:
                usage = chunk["usage"]["completion_tokens"]
    if not times:
        raise RuntimeError(f"request {i}: the stream carried no tokens")
    return (usage if usage is not None else len(times), times[0] - t0,
            [y - x for x, y in zip(times, times[1:])])


results, errors = [], []
failed = threading.Event()


def client(k):
    try:
        for r in range(a.rounds):
            if failed.is_set():
                return
            results.append(one(k * a.rounds + r))
    except urllib.error.HTTPError as e:
        errors.append(f"HTTP {e.code} from {e.url}: {e.read().decode(errors='replace')[:500]}")
        failed.set()
    except TimeoutError:
        errors.append(f"no answer within --timeout {a.timeout:g} s")
        failed.set()
    except Exception as e:  # connection refused, malformed or failed streams
        errors.append(f"{type(e).__name__}: {e}")
        failed.set()


def pct(values, p):
    """Nearest-rank percentile, in milliseconds."""
    if not values:
        return None
    v = sorted(values)
    return round(1000 * v[max(1, math.ceil(p / 100 * len(v))) - 1], 2)


t = time.perf_counter()
threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.concurrency)]
for th in threads:
    th.start()
try:
    while any(th.is_alive() for th in threads) and not failed.wait(0.1):
        pass
except KeyboardInterrupt:
    sys.exit(130)
dt = time.perf_counter() - t
if errors:
    print(f"serve_load: {a.base}: {errors[0]}", file=sys.stderr)
    sys.exit(1)
tokens = sum(n for n, _, _ in results)
ttft = [f for _, f, _ in results]
itl = [g for _, _, gaps in results for g in gaps]
print(json.dumps({"concurrency": a.concurrency, "temperature": a.temperature,
                  "requests": len(results), "tokens": tokens, "seconds": round(dt, 2),
                  "tokens_per_s": round(tokens / dt, 2),
                  "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                  "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}))
