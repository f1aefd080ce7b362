"""`dynamoq` command line. With no arguments, `dynamoq quantize` quantizes the built-in MoE with
mixed per-expert bit-widths and prints what was done: bits, bytes and output error."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _mixed_bits(model, pattern=(8, 4, 3, 2)) -> dict[int, list[int]]:
    from .adapters import moe_blocks
    return {b.layer: [pattern[(e + b.layer) % len(pattern)] for e in range(b.num_experts)]
            for b in moe_blocks(model)}


def cmd_quantize(args) -> int:
    import transformers
    import dynamoq
    from . import models

    torch.set_num_threads(args.threads)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = args.model
    else:
        model, name = models.builtin(), "built-in Qwen3-MoE (4 layers, 8 experts, random weights)"
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
    fp_bytes = sum(p.numel() * p.element_size() for b in dynamoq.moe_blocks(model) for p in b.experts.parameters())
    expert_bits = None if args.bits else _mixed_bits(model)
    config = dynamoq.DynaMoConfig(bits=args.bits, expert_bits=expert_bits, group_size=args.group_size)
    t0 = time.perf_counter()
    dynamoq.quantize_(model, config)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = model(tokens).logits
    report = dynamoq.bits_report(model)
    result = {
        "model": name,
        "experts": report["experts"],
        "storage_bits": report["storage_bits"],
        "expert_bytes": report["bytes"],
        "expert_bytes_fp": fp_bytes,
        "relative_logit_error": ((out - ref).norm() / ref.norm()).item(),
        "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "seconds": seconds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model: {name}")
    for layer, bits in report["experts"].items():
        print(f"  layer {layer:>2}: expert bits {bits}")
    print(f"storage bits per expert weight (codes + scales + zeros): {result['storage_bits']:.3f}")
    print(f"expert bytes: {report['bytes']:,} quantized vs {fp_bytes:,} in {next(model.parameters()).dtype} "
          f"({fp_bytes / report['bytes']:.2f}x smaller)")
    print(f"output: relative logit error {result['relative_logit_error']:.4f}, "
          f"top-1 agreement {100 * result['top1_agreement']:.1f}%  ({seconds:.2f} s to quantize)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dynamoq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize an MoE (the built-in one by default) and report what was done")
    q.add_argument("model", nargs="?", help="path of a transformers MoE checkpoint (default: built-in MoE)")
    q.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8), help="uniform bits (default: a mixed 8/4/3/2 demo)")
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--debug", action="store_true", help="show tracebacks")
    q.set_defaults(func=cmd_quantize)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"dynamoq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
