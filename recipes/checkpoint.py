"""Issue: save and load. Load time of the quantized real reference model against its
full-precision checkpoint, and the size on disk of both.

    python recipes/checkpoint.py
    python recipes/checkpoint.py --model tiny --name checkpoint_smoke
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from _common import CALIB, load, parser, texts, write

import dynamoq
from dynamoq import DynaMoConfig


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json"))


def load_seconds(path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    path, model, tok = load(args)
    analysis = dynamoq.analyze(model, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                               max_tokens=args.calib_tokens // 4)
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir, q_dir = Path(tmp) / "fp", Path(tmp) / "q"
        model.save_pretrained(fp_dir)
        dynamoq.quantize_(model, DynaMoConfig(analysis=analysis, target_bits=3.0, group_size=args.group_size,
                                              shared_bits=None))
        model.save_pretrained(q_dir)
        x = tok(texts(CALIB[0], "test")[0][:300], return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(transformers.AutoModelForCausalLM.from_pretrained(q_dir)(x).logits, model(x).logits)
        result = {"fp_bytes": size(fp_dir), "q_bytes": size(q_dir), "fp_load_s": load_seconds(fp_dir, args.repeats),
                  "q_load_s": load_seconds(q_dir, args.repeats), "identical_logits_after_load": same}
    r = result
    table = (f"| checkpoint | size on disk | load (median of {args.repeats}) |\n|---|---|---|\n"
             f"| full precision (float32) | {r['fp_bytes'] / 1e6:.1f} MB | {r['fp_load_s']:.2f} s |\n"
             f"| dynamoq BQ 3.0 bits + 1% cache | {r['q_bytes'] / 1e6:.1f} MB | {r['q_load_s']:.2f} s |\n\n"
             f"Identical logits after from_pretrained: {same}. Only expert weights are quantized (attention, "
             f"embeddings and lm_head stay in float32); the dynamoq load verifies a sha256 manifest of every file.")
    write(args.name or "checkpoint", {"args": vars(args), **result}, table)


if __name__ == "__main__":
    main()
