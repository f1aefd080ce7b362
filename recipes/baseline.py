"""Issue: the DynaMo baseline (expert-level mixed precision) against uniform RTN/GPTQ on the real
reference model. Calibrate on 3 domains, evaluate on every domain's test split.

    python recipes/baseline.py                 # full run (real reference model)
    python recipes/baseline.py --model tiny --eval-tokens 1024 --calib-tokens 1024 --name baseline_smoke
    python recipes/baseline.py --rows frequency   # one row again, merged into the stored results
    python recipes/baseline.py --group-size 192 --name baseline_g192 --rows oracle   # the oracle bound at g192
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time

from _common import CALIB, RESULTS, evaluate, fmt_ppl, fresh, load, parser, revision, texts, write

import dynamoq
from dynamoq import DynaMoConfig
from dynamoq.packing import storage_bits

PRIOR = 0.5        # weight of uniform traffic in the prior row
GENERATED_TOKENS = 4096   # the model's own text in the self-generated row (16 sequences of 256)


def without_sensitivity(analysis):
    """The analysis as if made with sensitivity_tokens=0."""
    stats = {d: {k: dataclasses.replace(st, gx2=None, grad_tokens=None) for k, st in per.items()}
             for d, per in analysis.stats.items()}
    return dataclasses.replace(analysis, stats=stats, _memo={})


def zero_shot(model, tok, items) -> float:
    return dynamoq.eval.multiple_choice(model, tok, items, progress=False).accuracy


def merge_base(args) -> dict:
    """Rows stored by an earlier run with the same measurement settings ({} if none)."""
    f = RESULTS / f"{args.name or 'baseline'}.json"
    if not f.exists():
        return {}
    old = json.loads(f.read_text())
    same = ("model", "eval_tokens", "calib_tokens", "seq_len", "group_size", "domains", "target_bits")
    differ = [k for k in same if old["args"].get(k) != vars(args)[k]]
    if differ:
        raise SystemExit(f"{f} was measured with other settings ({', '.join(differ)}): run every row "
                         f"(without --rows) or pass the same settings")
    for r in old["rows"].values():
        r.setdefault("command", old["command"])
    return old["rows"]


def main():
    p = parser(__doc__)
    p.add_argument("--target-bits", type=float, default=3.0)
    p.add_argument("--rows", nargs="*", default=None,
                   help="measure only the rows whose names contain these words (or are this name) and merge them "
                        "into the stored results (which must come from the same settings)")
    args = p.parse_args()
    path, fp, tok = load(args)
    domains = args.domains or dynamoq.data.domains()
    held_out = [d for d in domains if d not in CALIB]
    t0 = time.perf_counter()
    analysis = dynamoq.analyze(fp, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                               max_tokens=args.calib_tokens)
    analysis_seconds = time.perf_counter() - t0
    pool = [t for d in domains for t in texts(d, "test")[:20]]
    items = dynamoq.eval.continuation_task(pool, n_items=100, seed=0)
    g = args.group_size
    common = dict(group_size=g, shared_bits=None, cache_fraction=0.0)     # the baseline alone: no switching cache
    rows = {
        "FP": None,
        "RTN 3-bit": DynaMoConfig(bits=3, **common),
        "clip 3-bit (data-free, searched grids)": DynaMoConfig(bits=3, quantizer="clip", **common),
        "GPTQ 3-bit": DynaMoConfig(bits=3, analysis=analysis, quantizer="gptq", **common),
        "GPTQ 4-bit": DynaMoConfig(bits=4, analysis=analysis, quantizer="gptq", **common),
        f"DynaMo BQ budget {args.target_bits}": DynaMoConfig(analysis=analysis, target_bits=args.target_bits,
                                                              quantizer="gptq", **common),
        # ablation: the same budget without the loss sensitivity, S_exp (sums to 1 in every layer) weighing the
        # capped relative error, so every layer counts the same (the allocation before the sensitivity existed)
        f"DynaMo BQ budget {args.target_bits}, layers weighed alike": lambda: DynaMoConfig(
            analysis=without_sensitivity(analysis), target_bits=args.target_bits, quantizer="gptq", **common),
        # the same storage as uniform 3-bit (codes + scales + zeros of group g): the like-for-like comparison
        f"DynaMo BQ budget {storage_bits(3, g):g} (= GPTQ 3-bit storage)": DynaMoConfig(
            analysis=analysis, target_bits=storage_bits(3, g), quantizer="gptq", **common),
        "DynaMo BQ paper (fuzzy)": DynaMoConfig(analysis=analysis, allocation="fuzzy", quantizer="gptq", **common),
        # half calibration traffic, half uniform (allocation.with_prior; not tuned), for held-out domains' experts
        f"DynaMo BQ budget {args.target_bits} + prior {PRIOR}": DynaMoConfig(
            analysis=analysis, target_bits=args.target_bits, prior=PRIOR, quantizer="gptq", **common),
        # the calibration domains plus the model's own text grouped into pseudo-domains (dynamoq/generated.py),
        # for the experts the three domains never reach. Its analysis is made again from the start (what a user runs),
        # and its time stored as the row's analysis_seconds
        f"DynaMo BQ budget {args.target_bits} + the model's own text": lambda: DynaMoConfig(
            analysis=dynamoq.analyze(fp, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                                     max_tokens=args.calib_tokens, generated_tokens=GENERATED_TOKENS),
            target_bits=args.target_bits, quantizer="gptq", **common),
        f"frequency-only {args.target_bits} (ablation)": DynaMoConfig(
            analysis=analysis, allocation="frequency", target_bits=args.target_bits, quantizer="gptq", **common),
        # not a result: significance from every domain's calibration split, held-out ones included. What the
        # budget can do when no domain is unseen bounds what any 3-domain calibration can reach at that budget.
        f"oracle bound: BQ budget {args.target_bits}, analysis on every domain": lambda: DynaMoConfig(
            analysis=dynamoq.analyze(fp, {d: texts(d, "calib") for d in domains}, tokenizer=tok, seq_len=args.seq_len,
                                     max_tokens=args.calib_tokens),
            target_bits=args.target_bits, quantizer="gptq", **common),
    }
    order = list(rows)
    stored = {}
    if args.rows:
        stored = merge_base(args)
        names, wanted = {k.lower() for k in rows}, [r.lower() for r in args.rows]
        # a full row name selects that row only, other words every row whose name contains them
        picked = lambda k: any(r == k if r in names else r in k for r in wanted)  # noqa: E731
        rows = {k: v for k, v in rows.items() if (k == "FP" and "FP" not in stored) or picked(k.lower())}
    command = shlex.join(["baseline.py"] + sys.argv[1:])
    code = revision()
    measured = {}

    def finish() -> None:
        """Tables and files from the rows measured so far (after every row: a stopped run keeps them)."""
        results = {k: measured.get(k) or stored[k] for k in order if k in measured or k in stored}
        fp_ppl = {d: r["ppl"] for d, r in results["FP"]["domains"].items()}
        g3 = results.get("GPTQ 3-bit")
        for name, r in results.items():
            if g3 and name != "FP":
                r["recovery_vs_gptq3"] = {d: (g3["domains"][d]["ppl"] - r["domains"][d]["ppl"]) /
                                          max(g3["domains"][d]["ppl"] - fp_ppl[d], 1e-9) for d in domains}
        lines = ["| row | bits (storage / usage) | quantize s | zero-shot | " + " | ".join(domains) + " |",
                 "|---|---|---|---|" + "---|" * len(domains)]
        for name, r in results.items():
            bits = "16" if r["storage_bits"] is None else f"{r['storage_bits']:.3f} / {r['usage_bits'] or 0:.3f}"
            cells = []
            for d in domains:
                c = fmt_ppl(r["domains"][d])
                if "kl" in r["domains"][d]:
                    c += f" KL {r['domains'][d]['kl']:.3f}"
                if "recovery_vs_gptq3" in r:
                    c += f" ({100 * r['recovery_vs_gptq3'][d]:.0f}%)"
                cells.append(c)
            lines.append(f"| {name} | {bits} | {r['quantize_seconds']:.0f} | {r['zero_shot']:.2f} | " + " | ".join(cells) + " |")
        table = "\n".join(lines) + (
            f"\n\nPerplexity on each domain's test split ({args.eval_tokens} tokens, windows of {args.seq_len}), 95% "
            f"bootstrap interval; KL to FP in nats/token; (x%) = share of uniform GPTQ 3-bit's perplexity loss "
            f"recovered. Calibration domains: {', '.join(CALIB)} ({args.calib_tokens} tokens each; analysis "
            f"{analysis_seconds:.0f} s); held out: {', '.join(held_out)}. Group size {g}; storage bits count codes, "
            f"float16 scales and uint8 zeros. Zero-shot: true continuation among 4 (100 items from all test splits).")
        by = {}
        for name, r in results.items():
            by.setdefault((r["command"], r.get("revision", "before revisions were recorded")), []).append(name)
        if len(by) > 1:
            table += "\n\nRows measured by separate runs with the same settings: " + "; ".join(
                f"`{c}` (code {v}): {', '.join(names)}" for (c, v), names in by.items()) + "."
        write(args.name or "baseline", {"args": vars(args), "complete": list(results) == order,
                                        "analysis_seconds": analysis_seconds, "calibration": CALIB,
                                        "held_out": held_out, "rows": results}, table)

    for name, cfg in rows.items():
        model = fresh(path)
        seconds, rep, own_analysis = 0.0, None, None
        if callable(cfg):                 # a row with an analysis of its own
            t0 = time.perf_counter()
            cfg = cfg()
            own_analysis = time.perf_counter() - t0
        if cfg is not None:
            t0 = time.perf_counter()
            dynamoq.quantize_(model, cfg)
            seconds = time.perf_counter() - t0
            rep = dynamoq.bits_report(model, analysis)
        measured[name] = {"domains": evaluate(model, tok, domains, args, reference=fp if cfg else None),
                          "zero_shot": zero_shot(model, tok, items), "quantize_seconds": seconds,
                          "storage_bits": rep and rep["storage_bits"], "usage_bits": rep and rep["usage_bits"],
                          "experts": rep and rep["experts"], "command": command, "revision": code,
                          "analysis_seconds": own_analysis}
        print(name, {d: round(r["ppl"], 3) for d, r in measured[name]["domains"].items()}, flush=True)
        if "FP" in measured or "FP" in stored:
            finish()


if __name__ == "__main__":
    main()
