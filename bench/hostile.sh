#!/usr/bin/env bash
# Hostile load on `herd serve` (issue 18's load check), loopback only: bench/hostile_load.py
# runs CONCURRENCY (64) workers for SECONDS (180) mixing well-behaved streams with abandoned,
# slow and silent readers, oversized bodies, half-sent heads and garbage; then this script adds
# the server's resident memory (VmRSS now, VmHWM peak) to its JSON line. The run fails if a
# well-behaved request failed or a KV block or running sequence was left over.
# Usage: bench/hostile.sh [MODEL.gguf] [THREADS]   (needs a release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf}
threads=${2:-2}
port=${PORT:-8578}
log=$(mktemp)
./target/release/herd serve "$model" --port "$port" -t "$threads" --served-model-name m \
    --max-running 16 --ctx-size 1024 --kv-tokens 16384 >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
    curl -sf --max-time 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
done
rc=0
line=$(python3 bench/hostile_load.py "http://127.0.0.1:$port" m \
    --concurrency "${CONCURRENCY:-64}" --seconds "${SECONDS_RUN:-180}") || rc=$?
rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
hwm=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["rss_mib"]=int(sys.argv[2])//1024; d["rss_peak_mib"]=int(sys.argv[3])//1024; print(json.dumps(d))' "$line" "$rss" "$hwm"
exit $rc
