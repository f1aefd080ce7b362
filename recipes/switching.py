"""Issue: channel-level dynamic switching on the real reference model. Calibrate on 3 domains,
quantize (DynaMo BQ at 3.0 storage bits + a 1% channel cache), then for each held-out domain adapt
on its calibration split and evaluate on its test split; revert and check the calibration domains.

    python recipes/switching.py
    python recipes/switching.py --model tiny --eval-tokens 1024 --calib-tokens 1024 --gen-tokens 32 --name switching_smoke
"""
from __future__ import annotations

from _common import CALIB, decode_rate, evaluate, fmt_ppl, load, parser, texts, write

import dynamoq
from dynamoq import DynaMoConfig


def main():
    p = parser(__doc__)
    p.add_argument("--target-bits", type=float, default=3.0)
    p.add_argument("--cache-fraction", type=float, default=0.01)
    p.add_argument("--adapt-tokens", type=int, default=4096)
    p.add_argument("--gen-tokens", type=int, default=1024, help="generation length the switch time is compared with")
    p.add_argument("--decode-steps", type=int, default=128, help="greedy steps timed for the decode rate")
    p.add_argument("--policies", nargs="+", default=["paper", "raise"], choices=["paper", "raise"])
    p.add_argument("--quantizer", default="rtn", help="rtn (default) or gptq (the cache re-quantizes raw weight columns, which fights GPTQ error feedback)")
    args = p.parse_args()
    path, model, tok = load(args)
    domains = args.domains or dynamoq.data.domains()
    held_out = [d for d in domains if d not in CALIB]
    analysis = dynamoq.analyze(model, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                               max_tokens=args.calib_tokens)
    dynamoq.quantize_(model, DynaMoConfig(analysis=analysis, target_bits=args.target_bits, quantizer=args.quantizer,
                                          group_size=args.group_size, shared_bits=None,
                                          cache_fraction=args.cache_fraction))
    rep = dynamoq.bits_report(model, analysis)
    base = evaluate(model, tok, domains, args)
    rows = {}
    for d in held_out:
        rows[d] = {"bq": base[d]}
        for policy in args.policies:
            r = dynamoq.adapt_(model, texts(d, "calib"), tokenizer=tok, max_tokens=args.adapt_tokens,
                               seq_len=args.seq_len, policy=policy)
            after = evaluate(model, tok, [d], args)[d]
            rows[d][policy] = {"switched": after, "adapt_seconds": r["seconds"],
                               "estimate_seconds": r["estimate_seconds"], "switch_seconds": r["switch_seconds"],
                               "changed_experts": sum(len(v) for v in r["changed"].values()), "changed": r["changed"]}
            dynamoq.revert_(model)
            print(d, policy, round(base[d]["ppl"], 3), "->", round(after["ppl"], 3), flush=True)
    reverted = evaluate(model, tok, CALIB, args)
    # switch time against generating tokens: compiled greedy decode, in the baseline and in a switched state
    prompt = tok(texts(held_out[0], "test")[0][:400], return_tensors="pt").input_ids
    rate_base, _ = decode_rate(model, prompt, args.decode_steps)
    dynamoq.adapt_(model, texts(held_out[0], "calib"), tokenizer=tok, max_tokens=args.adapt_tokens,
                   seq_len=args.seq_len, policy=args.policies[0])
    rate_switched, _ = decode_rate(model, prompt, args.decode_steps)
    dynamoq.revert_(model)
    rate_reverted, _ = decode_rate(model, prompt, args.decode_steps)     # the machine's drift over the three
    gen_seconds = args.gen_tokens / rate_base
    runs = [r[pol] for r in rows.values() for pol in args.policies]
    mean_switch = sum(r["switch_seconds"] for r in runs) / max(len(runs), 1)
    mean_adapt = sum(r["adapt_seconds"] for r in runs) / max(len(runs), 1)
    head = " | ".join(f"{pol} policy ppl (change, experts switched)" for pol in args.policies)
    lines = [f"| held-out domain | BQ ppl | {head} |", "|---|---|" + "---|" * len(args.policies)]
    for d, r in rows.items():
        cells = [f"{fmt_ppl(r[pol]['switched'])} ({100 * (r[pol]['switched']['ppl'] / r['bq']['ppl'] - 1):+.1f}%, "
                 f"{r[pol]['changed_experts']})" for pol in args.policies]
        lines.append(f"| {d} | {fmt_ppl(r['bq'])} | " + " | ".join(cells) + " |")
    lines += ["", "| calibration domain | BQ ppl | after adapt + revert | identical |", "|---|---|---|---|"]
    for d in CALIB:
        lines.append(f"| {d} | {fmt_ppl(base[d])} | {fmt_ppl(reverted[d])} | {base[d]['ppl'] == reverted[d]['ppl']} |")
    table = "\n".join(lines) + (
        f"\n\nBQ: budget allocation at {args.target_bits} storage bits, {args.quantizer}, group {args.group_size}. "
        f"Storage {rep['storage_bits']:.3f} bits per expert weight + cache {rep['cache_bits']:.3f} bits "
        f"({rep['cache_bytes'] / 1e6:.2f} MB, {args.cache_fraction:.0%} of input channels per expert), usage-weighted "
        f"{rep['usage_bits']:.3f} bits. Adaptation on {args.adapt_tokens} tokens of each held-out domain's calib "
        f"split; evaluation on its test split ({args.eval_tokens} tokens). Policies: paper = cached columns of every "
        f"expert whose fuzzy cluster changes move to the new width (up or down); raise = only up. Mean switch "
        f"(re-cluster, re-quantize cached columns, write them) {mean_switch:.3f} s = "
        f"{100 * mean_switch / gen_seconds:.2f}% of generating {args.gen_tokens} tokens ({gen_seconds:.1f} s at the "
        f"median rate of {args.decode_steps} greedy steps, {rate_base:.2f} tokens/s, compiled decode step, static cache, "
        f"prompt excluded, {args.threads} threads; in a switched state {rate_switched:.2f} tokens/s, after the "
        f"revert {rate_reverted:.2f}); with the "
        f"estimation pass over the {args.adapt_tokens}-token sample "
        f"{mean_adapt:.2f} s = {100 * mean_adapt / gen_seconds:.1f}% (the paper: 7.7-10.7% of online time).")
    write(args.name or "switching", {"args": vars(args), "bits": rep, "base": base, "held_out": rows,
                                     "reverted": reverted, "generate_seconds": gen_seconds,
                                     "decode_tokens_per_s": rate_base, "decode_tokens_per_s_switched": rate_switched,
                                     "decode_tokens_per_s_reverted": rate_reverted,
                                     "switch_share": mean_switch / gen_seconds,
                                     "adapt_share": mean_adapt / gen_seconds}, table)


if __name__ == "__main__":
    main()
