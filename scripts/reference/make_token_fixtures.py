#!/usr/bin/env python3
"""Generate tokenizer reference fixtures from llama.cpp (via llama-cpp-python).

For every model given on the command line (default: the two GGUF files in
models/), tokenize a fixed list of strings with llama.cpp and write
crates/ape-core/tests/fixtures/tokens-<short>.json with the shape

    {"model": "<file name>", "reference": "llama-cpp-python <version>",
     "tokenizer_model": ..., "tokenizer_pre": ...,
     "cases": [{"text": ..., "special": bool, "ids": [...]}]}

All cases are tokenized with add_bos=False.  Most use special=False (special
token text is treated as plain text); a few chat-formatted strings are also
tokenized with special=True (special token text maps to the special token id).

Requires: llama-cpp-python (built from source), gguf.
Usage: python3 scripts/reference/make_token_fixtures.py [MODEL.gguf ...]

With --server URL, the ids come instead from the /tokenize route of a llama-server
(built from the same llama.cpp) serving the one MODEL given, which needs no Python
bindings: `llama-server -m MODEL --port 8399` then `--server http://127.0.0.1:8399 MODEL`.
"""

import argparse
import json
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "crates", "ape-core", "tests", "fixtures")
DEFAULT_MODELS = [
    os.path.join(REPO, "models", "smollm2-135m-instruct-q4_1.gguf"),
    os.path.join(REPO, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
]

# Strings tokenized with special=False.
PLAIN_TEXTS = [
    # empty / trivial
    "",
    " ",
    "a",
    "Hello",
    "Hello world",
    " Hello world",
    "  Hello  world  ",
    "hello, world!",
    "HELLO WORLD",
    "hElLo WoRlD, MiXeD CaSe",
    # contractions
    "I'm sure you'll see it's what we've done, isn't it? They'd know.",
    "DON'T SHOUT, YOU'RE LOUD; I'LL WHISPER",
    "rock 'n' roll o'clock",
    # whitespace runs, tabs, newlines
    "a  b   c    d     e",
    "\t",
    "\tindented\twith\ttabs",
    "\n",
    "\n\n\n",
    "line one\nline two\r\nline three\n",
    "trailing spaces   \n   leading spaces",
    "mixed \t \n \t\n whitespace",
    "                                        ",
    # numbers
    "0",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "Call 555-0123 or +1 (800) 555-0199.",
    "Version 2.5.1, released 2024-10-31 at 12:34:56.",
    "1,000,000 and 1_000_000 and 1e-9 and 0x1F",
    # unicode: accents, CJK, emoji, RTL, combining marks
    "café naïve résumé façade",
    "Größenwahn über Straße",
    "ñandú pingüino",
    "Привет, мир!",
    "Καλημέρα κόσμε",
    "你好，世界！",
    "日本語のテキストです。",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "Hello 👋 world 🌍!",
    "👨‍👩‍👧‍👦 family emoji with ZWJ",
    "flags 🇫🇷🇯🇵 and skin tone 👍🏽",
    "e\u0301 combining acute vs \u00e9 precomposed",
    "zero\u200bwidth\u200bspace",
    "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "arrows → ← ↑ ↓ and box ┌─┐",
    "\u00a0non-breaking\u00a0space",
    # code
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "const x = async () => { await fetch('/api'); };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "<div class=\"main\"><p>Hi &amp; bye</p></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "    if x:\n        y = x ** 2  # square\n",
    "$ ls -la | grep '.rs' && echo done",
    # URLs, emails, paths
    "https://example.com/path/to/page?query=1&lang=en#section",
    "mailto:someone@example.org",
    "C:\\Users\\name\\Documents\\file.txt",
    "/usr/local/bin/python3",
    # punctuation-heavy
    "!!!???...,,,;;;:::",
    "--- *** ___ === ~~~",
    "\"quoted\" 'single' `backtick` «guillemets» „German“",
    "(parentheses) [brackets] {braces} <angles>",
    # special-looking text (plain with special=False)
    "<|im_start|>",
    "<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>",
    "<s> </s> <unk> <pad>",
    "<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    # longer prose
    "The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.",
    "In 1905, Albert Einstein published four groundbreaking papers that transformed physics.",
]

# Strings tokenized with special=True (chat special tokens are parsed).
SPECIAL_TEXTS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|>",
    " <|im_start|> spaced <|im_end|> ",
    # Gemma's chat markers
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    " <start_of_turn> spaced <end_of_turn> ",
]


def short_name(path):
    base = os.path.basename(path).lower()
    if base.startswith("smollm2"):
        return "smollm2"
    if base.startswith("qwen2"):
        return "qwen2"
    if base.startswith("gemma-3"):
        return "gemma3"
    return os.path.splitext(base)[0]


def dump_compact(obj):
    """JSON with one case per line (readable diffs, small files)."""
    head = {k: v for k, v in obj.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    lines.append('  "cases": [')
    body = [
        "    " + json.dumps(c, ensure_ascii=False, separators=(", ", ": "))
        for c in obj["cases"]
    ]
    lines.append(",\n".join(body))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def gguf_str(path, key):
    import gguf

    r = gguf.GGUFReader(path)
    f = r.fields.get(key)
    return None if f is None else f.contents()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--out-dir", default=FIXTURES)
    ap.add_argument("--server", help="a llama-server's URL, serving the one model given")
    args = ap.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    assert len(PLAIN_TEXTS) >= 60, len(PLAIN_TEXTS)
    if args.server:
        assert len(args.models) == 1, "--server tokenizes with the one model it serves"
    for model in args.models:
        tokenize, reference = tokenizer_for(model, args.server)
        cases = []
        for special, texts in ((False, PLAIN_TEXTS), (True, SPECIAL_TEXTS)):
            for text in texts:
                ids = tokenize(text, special)
                cases.append({"text": text, "special": special, "ids": ids})
        out = {
            "model": os.path.basename(model),
            "reference": reference,
            "tokenizer_model": gguf_str(model, "tokenizer.ggml.model"),
            "tokenizer_pre": gguf_str(model, "tokenizer.ggml.pre"),
            "cases": cases,
        }
        path = os.path.join(args.out_dir, f"tokens-{short_name(model)}.json")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(dump_compact(out))
        print(f"wrote {path}: {len(cases)} cases", file=sys.stderr)


def tokenizer_for(model, server):
    """tokenize(text, special) -> ids without BOS, and the name of the reference."""
    if server:
        import urllib.request

        def tokenize(text, special):
            body = json.dumps({"content": text, "add_special": False, "parse_special": special})
            request = urllib.request.Request(
                server.rstrip("/") + "/tokenize",
                data=body.encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request) as response:
                return [int(i) for i in json.load(response)["tokens"]]

        return tokenize, "llama-server /tokenize, llama.cpp vendored in llama-cpp-python 0.3.36"

    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)

    def tokenize(text, special):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        return [int(i) for i in ids]

    return tokenize, f"llama-cpp-python {llama_cpp.__version__}"


if __name__ == "__main__":
    main()
