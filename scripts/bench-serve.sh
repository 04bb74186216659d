#!/usr/bin/env bash
# The README's load table: `ape serve` (this build, and optionally another one given as
# BEFORE=path/to/ape, e.g. the previous commit built into a second target directory) under
# `ape bench serve` at 1, 8 and 32 clients, on the README workload (four questions over
# examples/documents, 8 greedy tokens, every answer checked) and on plain chats (64 greedy
# tokens, --plain). LLAMA_SERVER=path/to/llama-server adds llama.cpp's server
# (`-np 8 -cb`) on the plain chats, same GGUF and threads. MODEL picks the GGUF.
# Prints one JSON line per run. Needs an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
APE=./target/release/ape
MODEL="${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
CONCURRENCY="${CONCURRENCY:-32}"
PORT=8197

wait_for() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/$1" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "the server did not start" >&2
    exit 1
}

load() { # label, extra bench args...
    local label=$1
    shift
    for clients in 1 8 32; do
        requests=$((clients == 1 ? 16 : clients * 6))
        printf '{"server": "%s", "result": ' "$label"
        $APE bench serve --url "http://127.0.0.1:$PORT" --clients "$clients" \
            --requests "$requests" --json "$@"
        echo "}"
    done
}

serve_ape() { # label, binary, extra serve args...
    local label=$1 binary=$2
    shift 2
    local cache
    cache=$(mktemp -d)
    "$binary" --threads 2 serve --model "$MODEL" --port "$PORT" --cache-dir "$cache" "$@" \
        2>/dev/null &
    local pid=$!
    wait_for health
    load "$label" --max-tokens 8
    load "$label plain" --plain --max-tokens 64
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$cache"
}

if [ -n "${BEFORE:-}" ]; then
    serve_ape "before (--concurrency 2)" "$BEFORE"
fi
serve_ape "batched (--concurrency $CONCURRENCY)" "$APE" --concurrency "$CONCURRENCY"
if [ -n "${LLAMA_SERVER:-}" ]; then
    "$LLAMA_SERVER" -m "$MODEL" -t 2 -np 8 -cb -c 16384 --port "$PORT" >/dev/null 2>&1 &
    pid=$!
    wait_for health
    load "llama-server -np 8 -cb plain" --plain --max-tokens 64
    kill "$pid"
    wait "$pid" 2>/dev/null || true
fi
