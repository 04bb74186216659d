#!/usr/bin/env python3
"""Generate dequantization reference fixtures with the `gguf` Python package.

For each model (default: the two GGUF files in models/) and each distinct
tensor type in it, one tensor of that type is picked (2-D tensors preferred;
F32 tensors in these models are all 1-D, so those contribute one row). The
raw bytes of its first two rows are dequantized with gguf.quants.dequantize
and written to crates/ape-core/tests/fixtures/dequant.json:

    {"reference": "gguf <version> (gguf.quants.dequantize)",
     "entries": [{"model", "tensor", "type", "ggml_type", "shape",
                  "row_length", "n_rows", "data_offset", "row_bytes",
                  "raw_hex", "values"}]}

`raw_hex` holds the raw bytes of the stored rows, so that a test can check
dequantization without the model file; `data_offset` is the absolute offset
of the tensor's data in the GGUF file. `shape` is in GGUF order (ne0 first:
ne0 is the row length).

Usage: python3 scripts/reference/make_dequant_fixtures.py [MODEL.gguf ...]
"""

import argparse
import json
import os
import sys
from importlib.metadata import version as pkg_version

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "crates", "ape-core", "tests", "fixtures")
DEFAULT_MODELS = [
    os.path.join(REPO, "models", "smollm2-135m-instruct-q4_1.gguf"),
    os.path.join(REPO, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
]
N_ROWS = 2


def pick_tensors(reader):
    """One tensor per type: prefer 2-D, then the first one in file order."""
    chosen = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        is_2d = len(t.shape) >= 2 and int(t.shape[1]) > 1
        cur = chosen.get(name)
        if cur is None or (is_2d and not cur[1]):
            chosen[name] = (t, is_2d)
    return [c[0] for c in chosen.values()]


def dump_value(v):
    """JSON text; f32 arrays use the shortest repr that round-trips as f32."""
    if isinstance(v, np.ndarray):
        parts = []
        for x in v.astype(np.float32):
            assert np.isfinite(x)
            parts.append(str(np.float32(x)))
        return "[" + ", ".join(parts) + "]"
    return json.dumps(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--out", default=os.path.join(FIXTURES, "dequant.json"))
    args = ap.parse_args()

    import gguf
    from gguf.quants import dequantize

    entries = []
    for model in args.models:
        reader = gguf.GGUFReader(model)
        for t in pick_tensors(reader):
            qtype = t.tensor_type
            row_len = int(t.shape[0])
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            assert row_len % block_size == 0
            row_bytes = row_len // block_size * type_size
            n_rows = min(N_ROWS, int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1)
            # Raw bytes straight from the file, independent of reader's view.
            raw = np.asarray(
                reader.data[t.data_offset:t.data_offset + n_rows * row_bytes],
                dtype=np.uint8,
            ).reshape(n_rows, row_bytes)
            vals = dequantize(raw, qtype).astype(np.float32)
            assert vals.shape == (n_rows, row_len), vals.shape
            entries.append({
                "model": os.path.basename(model),
                "tensor": t.name,
                "type": qtype.name,
                "ggml_type": int(qtype),
                "shape": [int(x) for x in t.shape],
                "row_length": row_len,
                "n_rows": n_rows,
                "data_offset": int(t.data_offset),
                "row_bytes": row_bytes,
                "raw_hex": raw.tobytes().hex(),
                "values": vals.reshape(-1),
            })
            print(f"{os.path.basename(model)}: {t.name} {qtype.name} "
                  f"row_len={row_len} rows={n_rows}", file=sys.stderr)

    out = {
        "reference": f"gguf {pkg_version('gguf')} (gguf.quants.dequantize)",
        "entries": entries,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        lines = ["{", f'  "reference": {json.dumps(out["reference"])},', '  "entries": [']
        blocks = []
        for e in entries:
            inner = [f"      {json.dumps(k)}: {dump_value(v)}" for k, v in e.items()]
            blocks.append("    {\n" + ",\n".join(inner) + "\n    }")
        lines.append(",\n".join(blocks))
        lines += ["  ]", "}"]
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
