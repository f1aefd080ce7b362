"""Does the loss sensitivity weigh layers as quantization really hurts them? On the real reference model,
each MoE layer's experts in turn are rounded to a low width (the rest full precision) and the loss increase
on the calibration domains' validation splits is measured; it is set against the analysis' estimate
(sum of gx2 * ||dW||^2 per token, calibration.sensitivity) and against what the allocation weighed without
it (S_exp x relative error: every layer about the same).

    python recipes/sensitivity.py
    python recipes/sensitivity.py --model tiny --calib-tokens 1024 --eval-tokens 512 --group-size 64 --name sensitivity_smoke
"""
from __future__ import annotations

import math
import time

import torch
from _common import CALIB, load, parser, spearman, texts, write

import dynamoq
from dynamoq.allocation import output_error
from dynamoq.analysis import _weights_nk
from dynamoq.packing import dequantize, quantize_rtn


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor) -> float:
    total = 0.0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def main():
    p = parser(__doc__)
    p.set_defaults(calib_tokens=4096, eval_tokens=1024, group_size=192)
    p.add_argument("--bits", type=int, default=2, help="width the experts of one layer are rounded to")
    args = p.parse_args()
    path, model, tok = load(args)
    t0 = time.perf_counter()
    a = dynamoq.analyze(model, {d: texts(d, "calib") for d in CALIB}, tokenizer=tok, seq_len=args.seq_len,
                        max_tokens=args.calib_tokens)
    seconds = time.perf_counter() - t0
    val = torch.cat([dynamoq.data.token_windows(texts(d, "val"), tok, seq_len=args.seq_len, max_tokens=args.eval_tokens)
                     for d in CALIB])
    base = mean_loss(model, val)
    blocks = {b.layer: b for b in dynamoq.moe_blocks(model)}
    s_exp = a.synthesized()
    rows = {}
    for layer in a.layers:
        b = blocks[layer]
        ws = _weights_nk(b)
        rounded = [dequantize(*quantize_rtn(w.float(), args.bits, args.group_size)) for w in ws]    # [E, N, K] each
        # the estimate: sum over experts, projections, channels of gx2 * ||dW[:, c]||^2 per token, mean over domains
        # (output_error with gx2 as the channel weights, as the allocation computes it)
        est = sum(float(sum(output_error(w, g, args.group_size, bits=(args.bits,), cap=False)[0].sum()
                            for w, g in zip(ws, s.gx2)) / float(s.grad_tokens))
                  for s in (a.stats[d][layer] for d in CALIB)) / len(CALIB)
        # what the allocation weighed without the sensitivity: S_exp (sums to 1 a layer) x capped relative error
        mx = [sum(t) / len(CALIB) for t in zip(*[a.mean_x2(d, layer) for d in CALIB])]
        per = [output_error(w, m, args.group_size, bits=(args.bits,)) for w, m in zip(ws, mx)]
        rel = (sum(e for e, _ in per) / sum(en for _, en in per)[:, None])[:, 0]
        old = float((s_exp[layer] * rel.double()).sum())
        saved = []
        for proj, q in zip(b.projections, rounded):
            param = getattr(b.experts, proj.name)
            saved.append(param.data.clone())
            param.data.copy_((q.transpose(-1, -2) if proj.transposed else q).to(param.dtype))
        measured = mean_loss(model, val) - base
        for proj, w0 in zip(b.projections, saved):
            getattr(b.experts, proj.name).data.copy_(w0)
        rows[layer] = {"measured": measured, "estimate": est, "equal_layers": old}
        print(layer, rows[layer], flush=True)
    m = torch.tensor([r["measured"] for r in rows.values()], dtype=torch.float64)
    fits = {}
    for k in ("estimate", "equal_layers"):
        e = torch.tensor([r[k] for r in rows.values()], dtype=torch.float64)
        ok = (m > 0) & (e > 0)
        fits[k] = {"spearman": spearman(e, m),
                   "pearson_log": float(torch.corrcoef(torch.stack([e[ok].log(), m[ok].log()]))[0, 1]),
                   "scale": float((m[ok] / e[ok]).median())}
    lines = ["| layer | measured loss increase (nats/token) | estimate from the loss sensitivity (scaled) | "
             "measured / estimate | without it: S_exp x relative error (scaled) |", "|---|---|---|---|---|"]
    for layer, r in rows.items():
        est, old = r["estimate"] * fits["estimate"]["scale"], r["equal_layers"] * fits["equal_layers"]["scale"]
        lines.append(f"| {layer} | {r['measured']:.4f} | {est:.4f} | {r['measured'] / max(est, 1e-30):.2f} | {old:.4f} |")
    spread = float(m.max() / m[m > 0].min()) if (m > 0).any() else math.nan
    table = "\n".join(lines) + (
        f"\n\nEach MoE layer's experts rounded to {args.bits} bits (RTN, group {args.group_size}), the other weights "
        f"full precision; loss on the validation splits of {', '.join(CALIB)} ({args.eval_tokens} tokens each; "
        f"full-precision loss {base:.4f}). The measured increase spans {spread:.0f}x across layers. Estimate "
        f"(calibration splits, {dynamoq.analysis.SENSITIVITY_TOKENS} tokens a domain with gradients): Spearman "
        f"{fits['estimate']['spearman']:.2f}, Pearson of the logs {fits['estimate']['pearson_log']:.2f}. What the "
        f"allocation weighed without it: Spearman {fits['equal_layers']['spearman']:.2f}, Pearson of the logs "
        f"{fits['equal_layers']['pearson_log']:.2f}. Scaled columns: times the median measured / estimated ratio. "
        f"Analysis {seconds:.0f} s for {args.calib_tokens} tokens a domain, of which the pass with gradients "
        f"{a.meta['sensitivity_seconds']:.0f} s.")
    write(args.name or "sensitivity", {"args": vars(args), "rows": rows, "fits": fits, "base_loss": base,
                                       "analysis_seconds": seconds,
                                       "sensitivity_seconds": a.meta["sensitivity_seconds"]}, table)


if __name__ == "__main__":
    main()
