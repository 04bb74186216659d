#!/usr/bin/env bash
# ape against llama.cpp, back to back on the same GGUF files and threads: prefill 512 and
# 2048 tokens, decoding 64 tokens at depth 0 and 2048, and each program's peak resident
# memory over its prefill run (which reads a 2048-token prompt), from GNU time.
# LLAMA_BENCH must name a llama-bench binary (build it yourself from the llama.cpp sources
# vendored in the llama-cpp-python 0.3.36 source package; nothing here builds it).
# MODELS (files under models/), THREADS (2) and REPEATS (3) pick what runs. Run it on an
# idle machine: the figures are medians, and neighbours move them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_BENCH:?set LLAMA_BENCH to a llama-bench binary}"
APE=./target/release/ape
THREADS="${THREADS:-2}"
REPEATS="${REPEATS:-3}"
MODELS="${MODELS:-smollm2-135m-instruct-q4_1 qwen2.5-coder-0.5b-instruct-q4_k_m qwen2.5-coder-1.5b-instruct-q4_k_m}"
[ -x /usr/bin/time ] || { echo "GNU time is needed for peak memory: apt-get install time" >&2; exit 1; }
peak() { /usr/bin/time -f "peak resident memory of $(basename "$1"): %M KiB" "$@"; }
grep -m1 'model name' /proc/cpuinfo
for model in $MODELS; do
    m="models/$model.gguf"
    echo "## $model"
    peak "$APE" --threads "$THREADS" bench -m "$m" --prompt 512 --prompt 2048 --decode 64 \
        --depth 0 --repeats "$REPEATS"
    "$APE" --threads "$THREADS" bench -m "$m" --prompt 0 --decode 64 --depth 2048 \
        --repeats "$REPEATS" | grep decode
    peak "$LLAMA_BENCH" -m "$m" -t "$THREADS" -r "$REPEATS" -p 512,2048 -n 0 -o md
    "$LLAMA_BENCH" -m "$m" -t "$THREADS" -r "$REPEATS" -p 0 -n 64 -d 0,2048 -o md
done
