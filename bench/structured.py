"""Cost of constrained decoding: the same prompt generated under a JSON schema and without one
(same number of tokens, greedy), against a running `herd serve`; prints decode tokens/s for
both and the mean grammar mask time per token from /metrics.
Usage: structured.py BASE_URL MODEL [REPEATS]
"""
import json
import sys
import time
import urllib.request

base, model = sys.argv[1], sys.argv[2]
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
schema = {"type": "array", "minItems": 48, "maxItems": 48,
          "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["id"], "additionalProperties": False}}


def post(body):
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=3600) as r:
        out = json.load(r)
    return out, time.time() - t


def metric(name):
    for line in urllib.request.urlopen(base + "/metrics").read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


prompt = "A list of records as JSON:"
rates = {"schema": [], "free": []}
masks0, secs0 = metric("herd_grammar_masks_total"), metric("herd_grammar_mask_seconds_total")
for _ in range(repeats):
    r, dt = post({"model": model, "prompt": prompt, "max_tokens": 1000, "temperature": 0,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    n = r["usage"]["completion_tokens"]
    rates["schema"].append(n / dt)
    r2, dt2 = post({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    rates["free"].append(r2["usage"]["completion_tokens"] / dt2)
masks = metric("herd_grammar_masks_total") - masks0
secs = metric("herd_grammar_mask_seconds_total") - secs0
s, f = max(rates["schema"]), max(rates["free"])
print(json.dumps({"tokens": n, "schema_tok_s": round(s, 2), "free_tok_s": round(f, 2),
                  "slowdown": round(1 - s / f, 4), "mean_mask_ms": round(1000 * secs / max(masks, 1), 3)}))
