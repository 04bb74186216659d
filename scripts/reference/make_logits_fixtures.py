#!/usr/bin/env python3
"""Generate last-position logits reference fixtures from llama.cpp.

For each model (default: the two GGUF files in models/) and each of four
prompts, the prompt is tokenized by llama.cpp (special=True, BOS only if the
GGUF metadata says tokenizer.ggml.add_bos_token is true), evaluated with
llama.cpp on the CPU, and the logits of the last position are written as raw
little-endian f32 to

    crates/ape-core/tests/fixtures/logits-<model>-<n>.f32

An index, crates/ape-core/tests/fixtures/logits.json, lists for every fixture
the model file name, prompt name and text, token ids, fixture file, vocab
size, and the top-10 token ids (with their logits).

Prompts:
  0 plain     a plain English sentence
  1 chat      a question rendered with the model's own chat template
              (tokenizer.chat_template, add_generation_prompt=True)
  2 code      a code snippet
  3 long      a prose passage of roughly 300 tokens
  4 window    (models with a sliding window only) the passage twice and a
              question, longer than the window, so that local layers drop
              the first tokens

A model without a chat template (a base model) gets, instead of "chat", a
few-shot prompt in plain text ("fewshot").

The index keeps the entries of models not named on the command line.

Requires: llama-cpp-python (built from source), gguf, numpy, jinja2.
Usage: python3 scripts/reference/make_logits_fixtures.py [MODEL.gguf ...]
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "crates", "ape-core", "tests", "fixtures")
DEFAULT_MODELS = [
    os.path.join(REPO, "models", "smollm2-135m-instruct-q4_1.gguf"),
    os.path.join(REPO, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
]

PLAIN = "The capital of France is"

CHAT_QUESTION = "What is the capital of France?"

FEWSHOT = (
    "Translate English to French.\n\n"
    "English: cheese\nFrench: fromage\n\n"
    "English: the house\nFrench: la maison\n\n"
    "English: good morning\nFrench:"
)

CODE = (
    "def fibonacci(n):\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return"
)

LONG = (
    "The lighthouse stood at the end of a narrow spit of rock, a white tower "
    "that had outlived three keepers and two storms that the village still "
    "talked about. Every evening, a little before sunset, the current keeper, "
    "a quiet woman named Ilse, climbed the one hundred and twelve steps to the "
    "lamp room. She counted them out of habit, although she had long since "
    "stopped needing to. At the top she trimmed the wick, polished the brass, "
    "and wiped the salt from the great lens with a soft cloth that she kept in "
    "a tin box beside the logbook. The logbook was older than she was. Its "
    "first pages were written in a careful, slanted hand that recorded wind "
    "direction, visibility, and the names of passing ships. Later keepers had "
    "added weather notes, the occasional sketch of a seabird, and once, in "
    "faded pencil, a recipe for fish soup. Ilse liked to read a few entries "
    "each night while the light turned above her. On clear nights she could "
    "see the lamps of the fishing boats strung out along the horizon like "
    "beads on a thread, and she would wonder which of them were heading home "
    "and which were only beginning their work. In winter the wind came from "
    "the north and pressed against the windows until the glass hummed. In "
    "summer the air was so still that she could hear the bell buoy far out in "
    "the channel, ringing slowly with the swell. She wrote her own entries in "
    "plain block letters, because she believed that whoever came after her "
    "should be able to read them without trouble. Tonight the sea was calm, "
    "the sky was full of stars, and as the beam swept across the water she "
    "began to write"
)


def short_name(path):
    base = os.path.basename(path).lower()
    if base.startswith("smollm2"):
        return "smollm2"
    if base.startswith("qwen2"):
        return "qwen2"
    if base.startswith("gemma-3"):
        return "gemma3"
    return os.path.splitext(base)[0]


def gguf_fields(path):
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    arch = r.fields["general.architecture"].contents()
    for key in ("tokenizer.chat_template", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                f"{arch}.attention.sliding_window"):
        f = r.fields.get(key)
        out[key.replace(f"{arch}.", "")] = None if f is None else f.contents()
    return out


def render_chat(template, question, bos_token="", eos_token=""):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise RuntimeError(msg)

    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(template)
    return tmpl.render(
        messages=[{"role": "user", "content": question}],
        add_generation_prompt=True,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--out-dir", default=FIXTURES)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    version = llama_cpp.__version__
    os.makedirs(args.out_dir, exist_ok=True)

    entries = []
    for model in args.models:
        meta = gguf_fields(model)
        add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        template = meta["tokenizer.chat_template"]
        if template:
            second = ("chat", render_chat(template, CHAT_QUESTION))
        else:
            second = ("fewshot", FEWSHOT)
        prompts = [("plain", PLAIN), second, ("code", CODE), ("long", LONG)]
        if meta["attention.sliding_window"]:
            prompts.append(("window", LONG + "\n\n" + LONG + "\n\nWhat did Ilse count?"))

        llm = llama_cpp.Llama(
            model_path=model,
            n_ctx=2048,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=False,
            n_batch=512,
            verbose=False,
        )
        n_vocab = llm.n_vocab()
        for n, (name, text) in enumerate(prompts):
            ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)]
            llm.reset()
            llm.eval(ids)
            assert llm.n_tokens == len(ids)
            # With logits_all=False, Llama.eval() no longer copies logits into
            # llm.scores (llama-cpp-python >= 0.3); read them from the C API.
            # Only the last position of the batch requests output, so index -1
            # is the last prompt position.
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32).copy()
            assert np.all(np.isfinite(logits))

            fname = f"logits-{short_name(model)}-{n}.f32"
            logits.astype("<f4").tofile(os.path.join(args.out_dir, fname))
            top = np.argsort(-logits, kind="stable")[:10]
            entries.append({
                "model": os.path.basename(model),
                "prompt_name": name,
                "prompt": text,
                "add_bos": add_bos,
                "special": True,
                "token_ids": ids,
                "n_tokens": len(ids),
                "fixture": fname,
                "vocab_size": n_vocab,
                "top10_ids": [int(i) for i in top],
                "top10_logits": [float(logits[i]) for i in top],
            })
            print(f"{fname}: {len(ids)} tokens, top1={int(top[0])} "
                  f"{llm.detokenize([int(top[0])])!r}", file=sys.stderr)
        del llm

    path = os.path.join(args.out_dir, "logits.json")
    named = {os.path.basename(m) for m in args.models}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            kept = [e for e in json.load(fh)["fixtures"] if e["model"] not in named]
        entries = kept + entries
    index = {
        "reference": f"llama-cpp-python {version}",
        "settings": {"n_ctx": 2048, "n_batch": 512, "n_threads": args.threads,
                     "logits_all": False, "backend": "CPU"},
        "format": "raw little-endian f32, vocab_size values, last prompt position",
        "fixtures": entries,
    }
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dump_index(index))
    print(f"wrote {path}", file=sys.stderr)


def dump_index(index):
    """Pretty JSON, but keep number lists on one line."""
    lines = ["{"]
    for k in ("reference", "settings", "format"):
        lines.append(f"  {json.dumps(k)}: {json.dumps(index[k], ensure_ascii=False)},")
    lines.append('  "fixtures": [')
    blocks = []
    for e in index["fixtures"]:
        inner = [f"      {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in e.items()]
        blocks.append("    {\n" + ",\n".join(inner) + "\n    }")
    lines.append(",\n".join(blocks))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
