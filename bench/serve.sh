#!/usr/bin/env bash
# `herd serve` against llama.cpp's llama-server on the same GGUF, same machine, one server at a
# time. For each stream count C (STREAMS, default "1 4 16 64") each server is started once and
# loaded by bench/serve_load.py at each temperature (TEMPS, default "0 1.0"; seeded when > 0):
# C concurrent clients, each sending ROUNDS (2) streaming completions of TOKENS (64) tokens with
# EOS ignored, on port PORT (8577). One row per (server, streams, temperature): aggregate
# generated tokens/s (wall time, prefill included), time to first token p50/p99 and inter-token
# latency p50/p99 in ms; the llama.cpp row adds herd's tokens/s over llama.cpp's, the herd row
# the share of herd's engine time spent sampling (its /metrics counters, forward + sampling).
# llama-server gets -np C slots of 1024 positions (-c 1024*C), herd --max-running C,
# --ctx-size 1024 and --kv-tokens 1024*C; both use THREADS threads. Sampling at T > 0 is each
# server's default chain (llama-server's includes top-k 40, top-p 0.95 and min-p 0.05; TOP_P=P
# sends top_p to both).
# MOE=1 runs the Scout-shaped MoE instead (streams "1 8"): a random-weight llama4:scout-4b Q4_K_M
# GGUF written once to bench/models/ by `herd random-model`.
# Usage: bench/serve.sh [MODEL.gguf] [THREADS]   (needs a release build: cargo build --release)
#   e.g. STREAMS="1 4" TEMPS=0 bench/serve.sh;  MOE=1 bench/serve.sh "" 2
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf}
threads=${2:-2}
streams=${STREAMS:-1 4 16 64}
temps=${TEMPS:-0 1.0}
port=${PORT:-8577}
herd=./target/release/herd
if [ "${MOE:-0}" = 1 ]; then
    model=bench/models/llama4-scout-4b-q4_k_m.gguf
    streams=${STREAMS:-1 8}
    if [ ! -f "$model" ]; then
        mkdir -p bench/models
        "$herd" random-model llama4:scout-4b "$model.part" --type q4_k_m
        mv "$model.part" "$model"
    fi
fi
bin=$(bash bench/llama_cpp.sh)
log=$(mktemp)
pid=
stop() {  # TERM the running server, KILL it if it is still there after 10 s
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}
cleanup() {
    local rc=$?
    stop
    [ $rc = 0 ] || { echo "--- server log (last lines):" >&2; tail -n 20 "$log" >&2; }
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
health() { curl -sf --max-time 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1; }
start() {  # start a server in the background and wait until /health answers
    if health; then echo "something already answers on port $port" >&2; return 1; fi
    "$@" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1500); do
        health && return 0
        kill -0 "$pid" 2>/dev/null || { echo "server exited: $*" >&2; return 1; }
        sleep 0.2
    done
    echo "server did not become ready: $*" >&2; return 1
}
declare -A herd_tps
# herd's engine counters (seconds in forward passes, in sampling), from /metrics.
engine_seconds() {
    curl -sf "http://127.0.0.1:$port/metrics" |
        awk '/^herd_forward_seconds_total /{f=$2} /^herd_sampling_seconds_total /{s=$2} END{print f+0, s+0}'
}
row() {  # row SERVER C TEMP: load the running server, print a table row
    local js f0 s0 f1 s1 share=""
    [ "$1" = herd ] && read -r f0 s0 < <(engine_seconds)
    js=$(python3 bench/serve_load.py "http://127.0.0.1:$port" m "$2" --temperature "$3" --seed 1 \
        --tokens "${TOKENS:-64}" --rounds "${ROUNDS:-2}" ${TOP_P:+--top-p "$TOP_P"})
    read -r tps t50 t99 i50 i99 < <(python3 -c 'import json, sys; d = json.loads(sys.argv[1])
print(*(d[k] for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")))' "$js")
    local ratio=""
    if [ "$1" = herd ]; then
        herd_tps[$2/$3]=$tps
        read -r f1 s1 < <(engine_seconds)
        # Sampling's share of the engine's step time (forward + sampling) during this row.
        share=$(awk -v f="$f1" -v F="$f0" -v s="$s1" -v S="$s0" \
            'BEGIN { f -= F; s -= S; printf "%.1f%%", (f + s > 0) ? 100 * s / (f + s) : 0 }')
    else ratio=$(awk -v h="${herd_tps[$2/$3]:-0}" -v l="$tps" 'BEGIN { printf "%.2f", l ? h / l : 0 }'); fi
    printf '%-9s %7s %4s %9.1f %8.0f %8.0f %7.1f %7.1f %10s %8s\n' "$1" "$2" "$3" "$tps" "$t50" "$t99" "$i50" \
        "$i99" "$ratio" "$share"
}
echo "model $model, $threads threads"
printf '%-9s %7s %4s %9s %8s %8s %7s %7s %10s %8s\n' server streams temp "tok/s" "ttft p50" "ttft p99" \
    "itl p50" "itl p99" "herd/llama" sampling
for c in $streams; do
    start env HERD_THREADS="$threads" "$herd" serve "$model" --port "$port" --served-model-name m \
        --max-running "$c" --ctx-size 1024 --kv-tokens $((1024 * c))
    for t in $temps; do row herd "$c" "$t"; done
    stop
    start "$bin/llama-server" -m "$model" --port "$port" -t "$threads" -np "$c" -c $((1024 * c)) \
        --no-webui -a m
    for t in $temps; do row llama.cpp "$c" "$t"; done
    stop
done
