#!/usr/bin/env bash
# Reproduces the README's recompute figures: for each model, `ape calibrate` (dev split,
# no labels; skipped where the model already has a calibration beside it), then the test
# split read sequentially, in parallel and with APE at the calibrated T and S while
# recomputing 0, 5, 15 and 30% of the context tokens, and the time to first token over
# 8K stored context tokens at the same shares. Results go to eval-results/recompute/;
# scripts/recompute-tables.py prints the tables and draws the accuracy-against-time curve.
# MODELS, SQUAD_N, NEEDLE_N and TASKS (default "squad needle") pick what runs. SQUAD_MORE
# (default 0) adds that many SQuAD test questions after the first SQUAD_N, in parts of 100
# (`ape eval --skip`, one file each, joined by the tables script), read sequentially and
# with APE at the shares in MORE_SHARES (default 0,0.05,0.3).
# Needs ape built (`cargo build --release`), the models (`ape model pull ...`) and the data
# (`bash scripts/eval-data.sh`). A calibration already beside a model is reused (ape warns
# and falls back to the paper's defaults if it was written for another file).
# APE names the binary (default ./target/release/ape; it may carry options).
set -euo pipefail
cd "$(dirname "$0")/.."
APE="${APE:-./target/release/ape}"
OUT=eval-results/recompute
MODELS="${MODELS:-qwen2.5-coder-0.5b-instruct-q4_k_m smollm2-135m-instruct-q4_1 qwen2.5-coder-1.5b-instruct-q4_k_m}"
TASKS="${TASKS:-squad needle}"
SQUAD_N="${SQUAD_N:-200}"
NEEDLE_N="${NEEDLE_N:-60}"
SHARES=0,0.05,0.15,0.3
# ICL_TASKS (default none; "intent sentiment" for the README's ICL tables) read each task's
# test split at 8 to 256 demonstrations (3 sets of 24 questions), sequentially and with
# APE at ICL_MODES (default: Qwen2.5-Coder-0.5B's dev-chosen ICL factors and T = S = 1), at
# every share of SHARES, one demonstration per context (GROUP_TOKENS, default 0, as the
# README's recompute table was measured; 512 reads them in groups as ape does by default).
ICL_TASKS="${ICL_TASKS:-}"
ICL_MODES="${ICL_MODES:-sequential,ape:0.3:0.6,ape:1:1}"
GROUP_TOKENS="${GROUP_TOKENS:-0}"
SQUAD_MORE="${SQUAD_MORE:-0}"
MORE_SHARES="${MORE_SHARES:-0,0.05,0.3}"
mkdir -p "$OUT"

for model in $MODELS; do
    m="models/$model.gguf"
    [ -f "models/$model.ape.json" ] || $APE --threads 2 calibrate -m "$m"
    cp "models/$model.ape.json" "$OUT/calibration-$model.json"
    for task in $TASKS; do
        case $task in
            squad) n=$SQUAD_N contexts=5 ;;
            needle) n=$NEEDLE_N contexts=8 ;;
            *) echo "unknown task $task (squad or needle)" >&2; exit 1 ;;
        esac
        [ -f "$OUT/$task-$model-test.json" ] ||
            $APE --threads 2 eval -m "$m" --task "$task" --split test --n "$n" \
                --contexts "$contexts" --modes sequential,parallel,ape --recompute "$SHARES" \
                --out "$OUT"
    done
    if [[ " $TASKS " == *" squad "* ]]; then
        for ((skip = SQUAD_N; skip < SQUAD_N + SQUAD_MORE; skip += 100)); do
            [ -f "$OUT/squad-$model-test-from$skip.json" ] ||
                $APE --threads 2 eval -m "$m" --task squad --split test --skip "$skip" --n 100 \
                    --contexts 5 --modes sequential,ape --recompute "$MORE_SHARES" --out "$OUT"
        done
    fi
    for task in $ICL_TASKS; do
        [ -f "$OUT/$task-$model-test.json" ] ||
            $APE --threads 2 eval -m "$m" --group-tokens "$GROUP_TOKENS" --task "$task" --split test --n 24 --draws 3 \
                --contexts 8,16,32,64,128,256 --modes "$ICL_MODES" --recompute "$SHARES" \
                --out "$OUT"
    done
    [ -f "$OUT/ttft-$model.md" ] ||
        $APE --threads 2 bench ttft -m "$m" --total 8192 --repeats 1 --recompute "$SHARES" \
            >"$OUT/ttft-$model.md"
done
