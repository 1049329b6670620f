#!/usr/bin/env bash
# herd bench vs llama.cpp's llama-bench and llama-batched-bench on the same GGUF files, same
# threads, runs alternating (herd, llama.cpp, herd, …) so drift in the machine hits both.
# Default files: the Scout-shaped random-weight benchmark model (llama4:scout-4b) at Q4_K_M and
# Q8_0, written by `herd random-model` into bench/models/ (ignored by git) when missing.
# Prints each run, then per file the mean tokens/s of both engines and herd's ratio:
# pp (prompt of -p tokens), tg (-n tokens), and batched decode at B sequences (128-token
# prompts, 128 tokens each; llama-batched-bench's S_TG).
# With IK_LLAMA_BIN set to a directory holding ik_llama.cpp's llama-bench (built from
# ../shared/anchors/, see its README), each round also runs it with run-time repacking
# (`-rtr 1`) for pp and tg, and the table gains its column and herd's ratio to it.
# With -d DEPTH, each round also runs tg after DEPTH tokens of context (llama-bench's -d; both
# engines at their default f16 KV cache), and the table gains the row "tgN @ dDEPTH" (with an
# ik_llama.cpp column only if its llama-bench knows -d).
# Usage: bench/llama_bench.sh [-t THREADS] [-p 512] [-n 128] [-b 8] [-d 0] [-r ROUNDS] [MODEL.gguf ...]
# Needs a release build (cargo build --release), python3, cmake and a C++ compiler for llama.cpp
# (bench/llama_cpp.sh builds it from the llama-cpp-python source package on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 pp=512 tg=128 batch=8 rounds=3 depth=0
while getopts "t:p:n:b:r:d:" o; do
    case $o in
        t) threads=$OPTARG ;; p) pp=$OPTARG ;; n) tg=$OPTARG ;; b) batch=$OPTARG ;; r) rounds=$OPTARG ;;
        d) depth=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
herd=./target/release/herd
[ -x $herd ] || { echo "build herd first: cargo build --release" >&2; exit 1; }
bin=$(bash bench/llama_cpp.sh)
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
models=("$@")
if [ ${#models[@]} = 0 ]; then
    mkdir -p bench/models
    for t in q4_k_m q8_0; do
        f=bench/models/scout-4b-$t.gguf
        [ -f $f ] || $herd random-model llama4:scout-4b $f --type $t >&2
        models+=("$f")
    done
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# ik_llama.cpp's llama-bench may predate llama-bench's -d: then the depth row has no ik column.
ik_depth=0
if [ -n "${IK_LLAMA_BIN:-}" ] && [ "$depth" -gt 0 ]; then
    ik_help=$(env -u LD_LIBRARY_PATH "$IK_LLAMA_BIN/llama-bench" -h 2>&1 || true)
    case "$ik_help" in *--n-depth*) ik_depth=1 ;; esac
fi
bctx=$((batch * (128 + 128)))
for m in "${models[@]}"; do
    name=$(basename "$m" .gguf)
    for r in $(seq "$rounds"); do
        echo "== $name round $r/$rounds" >&2
        $herd bench "$m" -t "$threads" -p "$pp" -n "$tg" -r 1 -b "$batch" \
            --batched-prompt 128 --batched-gen 128 --json >"$out/$name.herd.$r.json"
        "$bin/llama-bench" -m "$m" -t "$threads" -p "$pp" -n "$tg" -r 1 -o json \
            >"$out/$name.llama.$r.json" 2>/dev/null
        "$bin/llama-batched-bench" -m "$m" -t "$threads" -c "$bctx" -npp 128 -ntg 128 \
            -npl "$batch" --output-format jsonl 2>/dev/null | grep '^{' >"$out/$name.batched.$r.jsonl"
        if [ -n "${IK_LLAMA_BIN:-}" ]; then
            # Its binaries find their own libraries (RUNPATH); llama.cpp's must not shadow them.
            env -u LD_LIBRARY_PATH "$IK_LLAMA_BIN/llama-bench" -m "$m" -t "$threads" -p "$pp" \
                -n "$tg" -r 1 -rtr 1 -o json >"$out/$name.ik.$r.json" 2>/dev/null
        fi
        if [ "$depth" -gt 0 ]; then
            $herd bench "$m" -t "$threads" -p 0 -n "$tg" -d "$depth" -r 1 -b 0 --json \
                >"$out/$name.herdd.$r.json"
            "$bin/llama-bench" -m "$m" -t "$threads" -p 0 -n "$tg" -d "$depth" -r 1 -o json \
                >"$out/$name.llamad.$r.json" 2>/dev/null
            if [ "$ik_depth" = 1 ]; then
                env -u LD_LIBRARY_PATH "$IK_LLAMA_BIN/llama-bench" -m "$m" -t "$threads" -p 0 \
                    -n "$tg" -d "$depth" -r 1 -rtr 1 -o json >"$out/$name.ikd.$r.json" 2>/dev/null
            fi
        fi
    done
done
python3 - "$out" "$pp" "$tg" "$batch" "$threads" "$depth" "${models[@]}" <<'PY'
import json, os, statistics, sys
out, pp, tg, batch, threads, depth, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7:]
def mean(v):
    return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
print(f"threads {threads}; pp{pp}, tg{tg}, batched x{batch} (128 + 128 tokens each); mean ± sd over rounds")
ik = any(f.endswith(".json") and ".ik." in f for f in os.listdir(out))
if ik:
    print("| model | test | herd tok/s | llama.cpp tok/s | herd / llama.cpp | ik_llama.cpp -rtr 1 tok/s | herd / ik |")
    print("|---|---|---:|---:|---:|---:|---:|")
else:
    print("| model | test | herd tok/s | llama.cpp tok/s | herd / llama.cpp |")
    print("|---|---|---:|---:|---:|")
for m in models:
    name = os.path.basename(m)[:-5]
    rounds = sorted(f for f in os.listdir(out) if f.startswith(name + ".herd."))
    h = [json.load(open(os.path.join(out, f))) for f in rounds]
    l = [json.load(open(os.path.join(out, f.replace(".herd.", ".llama.")))) for f in rounds]
    b = [json.loads(open(os.path.join(out, f.replace(".herd.", ".batched.").replace(".json", ".jsonl"))).read().splitlines()[-1]) for f in rounds]
    k = [json.load(open(os.path.join(out, f.replace(".herd.", ".ik.")))) for f in rounds] if ik else []
    def bench(runs, test):
        return [t["avg_ts"] for run in runs for t in run if (t["n_prompt"], t["n_gen"]) == test]
    rows = [
        (f"pp{pp}", [x["pp_tokens_per_s"] for x in h], bench(l, (pp, 0)), bench(k, (pp, 0))),
        (f"tg{tg}", [x["tg_tokens_per_s"] for x in h], bench(l, (0, tg)), bench(k, (0, tg))),
        (f"batched x{batch}", [x["batched"][0]["tokens_per_s"]["mean"] for x in h], [x["speed_tg"] for x in b], []),
    ]
    if depth > 0:
        def load(kind):
            return [json.load(open(os.path.join(out, f.replace(".herd.", f".{kind}.")))) for f in rounds]
        hd, ld = load("herdd"), load("llamad")
        kd = load("ikd") if ik and os.path.exists(os.path.join(out, rounds[0].replace(".herd.", ".ikd."))) else []
        rows.append((f"tg{tg} @ d{depth}", [x["tg_tokens_per_s"] for x in hd], bench(ld, (0, tg)), bench(kd, (0, tg))))
    for test, hv, lv, kv in rows:
        (hm, hs), (lm, ls) = mean(hv), mean(lv)
        line = f"| {name} | {test} | {hm:.2f} ± {hs:.2f} | {lm:.2f} ± {ls:.2f} | {hm / lm:.2f} |"
        if ik:
            if kv:
                km, ks = mean(kv)
                line += f" {km:.2f} ± {ks:.2f} | {hm / km:.2f} |"
            else:
                line += " | |"
        print(line)
    roof = h[-1]["roofline"]
    tgm = mean([x["tg_tokens_per_s"] for x in h])[0]
    print(f"| {name} | roofline | {roof['bytes_per_token'] / 1e9:.3f} GB/token at {roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s → {roof['bound_tokens_per_s']:.1f} tok/s | herd tg {100 * tgm / roof['bound_tokens_per_s']:.0f}% | |")
PY
