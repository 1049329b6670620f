"""Load generator for OpenAI-compatible servers: C concurrent clients, each sending the same
completion request (greedy, max_tokens N) R times; prints aggregate decode tokens/s.

Usage: serve_load.py BASE_URL MODEL CONCURRENCY [--tokens N] [--rounds R]
Only the standard library: it measures servers, not clients.
"""
import argparse
import json
import threading
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("concurrency", type=int)
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--rounds", type=int, default=2)
a = ap.parse_args()

PROMPTS = ["The history of the printing press", "A recipe for bread begins with",
           "In the mountains of northern Italy", "The following is a list of rivers",
           "Once upon a time, in a small village,", "The rules of chess are simple:",
           "Photosynthesis is the process by which", "The train left the station at"]


def one(i, out):
    body = json.dumps({"model": a.model, "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})",
                       "max_tokens": a.tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(a.base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        u = json.load(r)["usage"]
    out.append(u["completion_tokens"])


def client(k, out):
    for r in range(a.rounds):
        one(k * a.rounds + r, out)


out = []
t = time.time()
threads = [threading.Thread(target=client, args=(k, out)) for k in range(a.concurrency)]
for th in threads:
    th.start()
for th in threads:
    th.join()
dt = time.time() - t
print(json.dumps({"concurrency": a.concurrency, "requests": len(out), "tokens": sum(out),
                  "seconds": round(dt, 2), "tokens_per_s": round(sum(out) / dt, 2)}))
