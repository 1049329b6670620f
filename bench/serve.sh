#!/usr/bin/env bash
# Aggregate decode throughput of `herd serve` and llama.cpp's llama-server on the same GGUF,
# at 1, 4 and 16 concurrent streams (greedy, 64 tokens each, EOS ignored so every request
# generates the same number of tokens). llama-server gets as many slots as streams, each with
# the same context per slot; both use -t threads.
# Usage: bench/serve.sh [MODEL.gguf] [THREADS]   (needs a release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf}
threads=${2:-2}
bin=$(bash bench/llama_cpp.sh)
port=8577
wait_ready() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "server did not start" >&2; return 1
}
run_load() { python3 bench/serve_load.py "http://127.0.0.1:$port" "$1" "$2" --tokens 64 --rounds 2; }
for c in 1 4 16; do
    HERD_THREADS=$threads ./target/release/herd serve "$model" --port $port --served-model-name m \
        --ctx-size 1024 --max-running "$c" 2>/dev/null &
    pid=$!; wait_ready
    echo "herd      $(run_load m "$c")"
    kill -TERM $pid; wait $pid || true
    "$bin/llama-server" -m "$model" --port $port -t "$threads" -np "$c" -c $((1024 * c)) \
        --no-webui -a m >/dev/null 2>&1 &
    pid=$!; wait_ready
    echo "llama.cpp $(run_load m "$c")"
    kill -TERM $pid; wait $pid || true
done
