"""Tuning the budget allocation on validation splits (never test): how much uniform-traffic prior
(DynaMoConfig.prior) to mix into the calibration significance, at 3.0 storage bits and at uniform
3-bit's storage. RTN stands in for GPTQ so that every setting takes seconds to quantize.

    python recipes/allocation_tuning.py --eval-tokens 1024 --calib-tokens 4096
"""
from __future__ import annotations

import time

from _common import CALIB, fmt_ppl, fresh, load, parser, texts, write

import dynamoq
from dynamoq import DynaMoConfig
from dynamoq.packing import storage_bits


def main():
    p = parser(__doc__)
    p.add_argument("--priors", nargs="*", type=float, default=[0.0, 0.3, 0.6, 1.0])
    args = p.parse_args()
    path, fp, tok = load(args)
    domains = args.domains or dynamoq.data.domains()
    g = args.group_size
    t0 = time.perf_counter()
    analysis = dynamoq.analyze(fp, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                               max_tokens=args.calib_tokens)
    analysis_seconds = time.perf_counter() - t0

    def val(model) -> dict:
        out = {}
        for d in domains:
            r = dynamoq.eval.perplexity(model, texts(d, "val"), tokenizer=tok, max_tokens=args.eval_tokens,
                                        seq_len=args.seq_len, progress=False)
            out[d] = {"ppl": r.ppl, "ci": [r.ci_low, r.ci_high]}
        return out

    common = dict(group_size=g, shared_bits=None)
    u3 = storage_bits(3, g)
    rows = {"RTN 3-bit": DynaMoConfig(bits=3, **common)}
    for budget in (3.0, u3):
        for prior in args.priors:
            rows[f"BQ {budget:g}, prior {prior:g}"] = DynaMoConfig(analysis=analysis, target_bits=budget,
                                                                   prior=prior, **common)
    results = {"FP": {"domains": val(fp), "storage_bits": None}}
    del fp
    for name, cfg in rows.items():
        model = fresh(path)
        dynamoq.quantize_(model, cfg, progress=False)
        rep = dynamoq.bits_report(model, analysis)
        results[name] = {"domains": val(model), "storage_bits": rep["storage_bits"], "usage_bits": rep["usage_bits"]}
        print(name, {d: round(r["ppl"], 2) for d, r in results[name]["domains"].items()}, flush=True)
        del model
    held_out = [d for d in domains if d not in CALIB]
    lines = ["| setting | storage / usage bits | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for name, r in results.items():
        bits = "16" if r["storage_bits"] is None else f"{r['storage_bits']:.3f} / {r['usage_bits']:.3f}"
        lines.append(f"| {name} | {bits} | " + " | ".join(fmt_ppl(r["domains"][d]) for d in domains) + " |")
    table = "\n".join(lines) + (
        f"\n\nValidation-split perplexity ({args.eval_tokens} tokens per domain, windows of {args.seq_len}), "
        f"round-to-nearest at group {g}. Calibration: {', '.join(CALIB)} ({args.calib_tokens} tokens each, "
        f"analysis {analysis_seconds:.0f} s); held out: {', '.join(held_out)}. prior = weight of uniform traffic "
        f"mixed into each layer's significance before the budget allocation.")
    write(args.name or "allocation_tuning", {"args": vars(args), "calibration": CALIB, "held_out": held_out,
                                             "rows": results}, table)


if __name__ == "__main__":
    main()
