"""Last-position logits of llama.cpp on the F32 copy of SmolLM2 (see dequantize_to_f32.py)
for every SmolLM2 prompt of logits.json, written next to each fixture as `<name>-exact.f32`.

Usage: python3 make_exact_logits_fixture.py SMOLLM2-F32.gguf
"""
import json
import pathlib
import sys

import llama_cpp
import numpy as np

fixtures = pathlib.Path(__file__).resolve().parents[2] / "crates/ape-core/tests/fixtures"
index = json.loads((fixtures / "logits.json").read_text())
llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, n_batch=512, n_threads=2, verbose=False)
for case in index["fixtures"]:
    if not case["model"].startswith("smollm2"):
        continue
    llm.reset()
    llm.eval(case["token_ids"])
    logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(case["vocab_size"],)
    )
    logits.astype("<f4").tofile(fixtures / case["fixture"].replace(".f32", "-exact.f32"))
