#!/usr/bin/env bash
# Reproduces the README's accuracy figures: for each model, chooses APE's T and S per task
# family on the dev split (RAG: squad, ICL: sentiment), then reports every task on the
# disjoint test split with those settings and with the paper's default (T = S = 0.9).
# Results go to eval-results/readme/; a sweep already there is not run again.
# Needs the models (`ape model pull ...`) and the data (`bash scripts/eval-data.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
APE=./target/release/ape
OUT=eval-results/readme
MODELS="${MODELS:-smollm2-135m-instruct-q4_1 qwen2.5-coder-0.5b-instruct-q4_k_m}"
mkdir -p "$OUT"

# choice FILE: "T S" chosen by a sweep's report.
choice() {
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["sweep_choice"]; print(c["temperature"], c["scale"])' "$1"
}

for model in $MODELS; do
    m="models/$model.gguf"
    echo "== $model: sweeps on dev"
    [ -f "$OUT/squad-$model-dev-sweep.json" ] ||
        $APE eval -m "$m" --task squad --split dev --n 12 --contexts 5 --sweep --out "$OUT"
    [ -f "$OUT/sentiment-$model-dev-sweep.json" ] ||
        $APE eval -m "$m" --task sentiment --split dev --n 24 --contexts 16 --sweep --out "$OUT"
    read -r rag_t rag_s < <(choice "$OUT/squad-$model-dev-sweep.json")
    read -r icl_t icl_s < <(choice "$OUT/sentiment-$model-dev-sweep.json")
    echo "== $model: test split (RAG T=$rag_t S=$rag_s, ICL T=$icl_t S=$icl_s)"
    rag_modes="sequential,parallel,ape:0.9:0.9,ape:$rag_t:$rag_s"
    icl_modes="sequential,parallel,ape:0.9:0.9,ape:$icl_t:$icl_s"
    $APE eval -m "$m" --task squad --split test --n 30 --contexts 5 --modes "$rag_modes" --out "$OUT"
    $APE eval -m "$m" --task needle --split test --n 15 --contexts 8 --modes "$rag_modes" --out "$OUT"
    for task in sentiment intent; do
        $APE eval -m "$m" --task "$task" --split test --n 24 --contexts 8,16,32,64,128,256 \
            --modes "$icl_modes" --out "$OUT"
    done
done
