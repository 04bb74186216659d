#!/usr/bin/env bash
# Reproduces the README's accuracy figures: for each model, chooses APE's T and S per task
# family on the dev split (RAG: squad, ICL: sentiment), then reports every task on the
# disjoint test split with those settings and with the paper's default (T = S = 0.9).
# Results go to eval-results/readme/; a sweep already there is not run again.
# PARTS="rag icl" (the default) picks the task families to run.
# Needs the models (`ape model pull ...`) and the data (`bash scripts/eval-data.sh`). APE names
# the binary (default ./target/release/ape; it may carry options, e.g. "ape --threads 1").
set -euo pipefail
cd "$(dirname "$0")/.."
APE="${APE:-./target/release/ape}"
OUT=eval-results/readme
MODELS="${MODELS:-smollm2-135m-instruct-q4_1 qwen2.5-coder-0.5b-instruct-q4_k_m}"
PARTS="${PARTS:-rag icl}"
mkdir -p "$OUT"

# choice FILE: "T S" chosen by a sweep's report.
choice() {
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["sweep_choice"]; print(c["temperature"], c["scale"])' "$1"
}

rag() {
    local model=$1 m=$2
    [ -f "$OUT/squad-$model-dev-sweep.json" ] ||
        $APE eval -m "$m" --task squad --split dev --n 12 --contexts 5 --sweep --out "$OUT"
    read -r t s < <(choice "$OUT/squad-$model-dev-sweep.json")
    echo "== $model: RAG on the test split, chosen T=$t S=$s"
    local modes="sequential,parallel,ape:0.9:0.9,ape:$t:$s"
    $APE eval -m "$m" --task squad --split test --n 30 --contexts 5 --modes "$modes" --out "$OUT"
    $APE eval -m "$m" --task needle --split test --n 15 --contexts 8 --modes "$modes" --out "$OUT"
}

# ICL: three demonstration sets per run, each with its own questions; the sweep covers a
# wider grid than RAG's because the first one chose its corner. One demonstration per
# context (--group-tokens 0), as the README's tables were measured.
icl() {
    local model=$1 m=$2
    [ -f "$OUT/sentiment-$model-dev-sweep.json" ] ||
        $APE eval -m "$m" --group-tokens 0 --task sentiment --split dev --n 16 --draws 3 --contexts 16,64 \
            --sweep --sweep-temperatures 0.3,0.5,0.7,0.9,1.0 --sweep-scales 0.6,0.7,0.8,0.9,1.0 \
            --out "$OUT"
    read -r t s < <(choice "$OUT/sentiment-$model-dev-sweep.json")
    echo "== $model: ICL on the test split, chosen T=$t S=$s"
    for task in sentiment intent; do
        $APE eval -m "$m" --group-tokens 0 --task "$task" --split test --n 24 --draws 3 \
            --contexts 8,16,32,64,128,256 --modes "sequential,parallel,ape:0.9:0.9,ape:$t:$s" \
            --out "$OUT"
    done
}

for model in $MODELS; do
    for part in $PARTS; do
        "$part" "$model" "models/$model.gguf"
    done
done
