"""Last-position logits of llama.cpp on the F32 copy of a model (see dequantize_to_f32.py)
for the model's prompts in logits.json, written next to each fixture as `<name>-exact.f32`.

With --near-ties-only, only for the prompts whose reference top two are closer than 0.25
(the only ones the logits test needs an F32 reference for).

Usage: python3 make_exact_logits_fixture.py MODEL-F32.gguf [--model-prefix smollm2]
       [--near-ties-only]
"""
import argparse
import json
import pathlib

import llama_cpp
import numpy as np

NEAR_TIE = 0.25

ap = argparse.ArgumentParser()
ap.add_argument("f32_model")
ap.add_argument("--model-prefix", default="smollm2")
ap.add_argument("--near-ties-only", action="store_true")
args = ap.parse_args()

fixtures = pathlib.Path(__file__).resolve().parents[2] / "crates/ape-core/tests/fixtures"
index = json.loads((fixtures / "logits.json").read_text())
llm = llama_cpp.Llama(args.f32_model, n_ctx=2048, n_batch=512, n_threads=2, verbose=False)
for case in index["fixtures"]:
    if not case["model"].startswith(args.model_prefix):
        continue
    top = case["top10_logits"]
    if args.near_ties_only and top[0] - top[1] > NEAR_TIE:
        continue
    llm.reset()
    llm.eval(case["token_ids"])
    logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(case["vocab_size"],)
    )
    logits.astype("<f4").tofile(fixtures / case["fixture"].replace(".f32", "-exact.f32"))
