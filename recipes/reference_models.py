"""Issue "Something real to measure on": build the reference models and measure them.

    python recipes/reference_models.py                      # full run: builds "real" if missing (~15-25 min)
    python recipes/reference_models.py --rebuild            # time a fresh build of the real model too
    python recipes/reference_models.py --tokens 4096 --quant-tokens 2048 --name reference_smoke   # quick look

Writes recipes/results/<name>.json and .md (name: reference_models). Measured on the test split of
every built-in domain (french and json were kept out of the build): perplexity of the dense source
model and of the MoE (95% bootstrap intervals, paired ratio); normalised mutual information between
a token's domain and its top-1 expert per layer, for the trained routers and for random routers of
the same norm; 3-bit round-to-nearest quantization of the experts (group 64 through
dynamoq.quantize_, and group 128 with a ragged last group through dynamoq's own RTN); whether the
Q4_1 grid of the source survives 4-bit group-32 quantization; evaluation throughput; a few chat
answers. The tiny model's perplexity and routing are measured too.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import dynamoq
from dynamoq import data
from dynamoq.eval import PerplexityResult, Windows, _ratio_ci, paired, perplexity
from dynamoq.packing import dequantize, quantize_rtn
from dynamoq.reference import _common, info, real, routing_nmi, usage

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["What is the capital of France?", "Write a Python function that returns the square of a number.",
           "Give me three tips for sleeping better.", "Translate 'good morning' into German."]


# ---------------------------------------------------------------------------------------------
# helpers

def subset(r: PerplexityResult, n: int) -> PerplexityResult:
    """The result over the first n windows (for paired comparisons with shorter runs)."""
    w = r.windows
    win = Windows(nll=w.nll[:n], count=w.count[:n], correct=w.correct[:n], key=w.key[:n])
    tokens = int(win.count.sum())
    mean = float(win.nll.sum()) / tokens
    lo, hi = _ratio_ci(win.nll, win.count, torch.exp)
    return PerplexityResult(ppl=math.exp(mean), ci_low=lo, ci_high=hi, nll=mean, tokens=tokens, windows=win,
                            seconds=r.seconds * n / len(w), tokens_per_second=r.tokens_per_second,
                            top1=float(win.correct.sum()) / tokens)


def row(r: PerplexityResult) -> dict:
    return {"ppl": r.ppl, "ci": [r.ci_low, r.ci_high], "tokens": r.tokens, "top1": r.top1,
            "tokens_per_second": r.tokens_per_second}


def ratio_row(a: PerplexityResult, b: PerplexityResult) -> dict:
    p = paired(a, b)
    return {"ratio": p.ratio, "ci": [p.ci_low, p.ci_high]}


def ppl_all(model, windows: dict, batch_size: int = 4, label: str = "") -> dict[str, PerplexityResult]:
    out = {}
    for d, w in windows.items():
        t = time.perf_counter()
        out[d] = perplexity(model, w, seq_len=w.shape[1], max_tokens=w.numel(), batch_size=batch_size,
                            progress=False)
        print(f"  {label:<18} {d:<11} ppl {out[d].ppl:8.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def load_moe(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def rtn_ragged_(model, bits: int, group: int) -> dict:
    """Round-to-nearest fake quantization of every expert weight with dynamoq's own RTN
    (dynamoq.packing.quantize_rtn: asymmetric, range holding 0, float16 scale, integer zero) in groups
    of ``group`` inputs; an input dimension that ``group`` does not divide is zero-padded, which leaves
    every group's range as it is (it always holds 0): the last group of a row is then ragged."""
    ragged = {}
    for b in dynamoq.moe_blocks(model):
        for p in b.projections:
            w = getattr(b.experts, p.name)
            x = w.data.transpose(-1, -2) if p.transposed else w.data
            k = x.shape[-1]
            pad = (-k) % group
            ragged[p.name] = [k, pad]
            xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
            codes, scale, zero = quantize_rtn(xp, bits, group)
            q = dequantize(codes, scale, zero, x.dtype)[..., :k]
            x.copy_(q)
    return ragged


@torch.no_grad()
def q4_1_check(moe, dense, r) -> dict:
    """Which tensors sit exactly on a Q4_1 grid (4-bit codes, a float scale and a float minimum per
    block of 32 inputs), by re-quantizing them in that format; and dynamoq's RTN at 4-bit g32."""
    def asym_float_min(x, group=32, bits=4):
        g = x.float().unflatten(-1, (-1, group))
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-30)
        return (((g - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo).flatten(-2)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def max_step_frac(x, q, group=32, bits=4):  # max |error| in units of the block's grid step
        g = x.float().unflatten(-1, (-1, group))
        step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2 ** bits - 1)).clamp_min(1e-30)
        return float(((q.unflatten(-1, (-1, group)) - g).abs() / step).max())

    out = {"format": "4-bit, group 32, float scale and float minimum (Q4_1's own format)"}
    att = torch.cat([p.reshape(-1, 32) for n, p in moe.named_parameters() if ".self_attn." in n])
    qa = asym_float_min(att)
    out["attention"] = {"relative_error": rel(qa, att), "max_error_in_grid_steps": max_step_frac(att, qa)}
    blk = dynamoq.moe_blocks(moe)
    gen = r["num_experts"] - 1 if r["generalist"] else None
    per_expert = []
    for e in range(r["num_experts"]):
        ws = torch.cat([getattr(b.experts, p.name)[e].reshape(-1, 32) for b in blk for p in b.projections])
        q = asym_float_min(ws)
        per_expert.append({"expert": e, "relative_error": rel(q, ws), "max_error_in_grid_steps": max_step_frac(ws, q)})
    out["experts"] = per_expert
    out["generalist_expert"] = gen
    # dynamoq's RTN (integer zero point, range forced to hold 0) on the same Q4_1 tensors
    codes, scale, zero = quantize_rtn(att.reshape(-1, 32), 4, 32)
    out["dynamoq_rtn_4bit_g32_attention_relative_error"] = rel(dequantize(codes, scale, zero), att)
    if gen is not None:
        ws = torch.cat([getattr(b.experts, p.name)[gen].reshape(-1, 32) for b in blk for p in b.projections])
        codes, scale, zero = quantize_rtn(ws, 4, 32)
        out["dynamoq_rtn_4bit_g32_generalist_relative_error"] = rel(dequantize(codes, scale, zero), ws)
    return out


@torch.no_grad()
def chat(model, tok, max_new_tokens=40) -> list[str]:
    outs = []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


@torch.no_grad()
def answer_nll(model, tok, answers) -> float:
    """Mean NLL per token of given answers (the dense model's), after their chat prompts."""
    tot, n = 0.0, 0
    for p, a in zip(PROMPTS, answers):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        pre = tok(text, return_tensors="pt").input_ids
        ans = tok(a, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([pre, ans], 1)
        logits = model(ids, use_cache=False).logits[0, pre.shape[1] - 1:-1].float()
        tot += float(torch.nn.functional.cross_entropy(logits, ans[0], reduction="sum"))
        n += ans.shape[1]
    return tot / max(n, 1)


def random_routers_(model, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in dynamoq.moe_blocks(model):
            w = b.router.weight
            rnd = torch.randn(w.shape, generator=g)
            w.copy_(rnd * (w.norm() / rnd.norm()))


# ---------------------------------------------------------------------------------------------

def measure_real(args) -> dict:
    t_build = None
    path = dynamoq.models.reference("real", rebuild=args.rebuild, threads=args.threads)
    meta = info(path)
    if args.rebuild:
        t_build = meta["seconds"]
    torch.set_num_threads(args.threads)
    rec = meta["recipe"]
    r = {"num_experts": len(rec["domains"]) + int(rec["generalist"]), "generalist": rec["generalist"]}
    print(f"real reference model: {path} (built in {meta['seconds'] / 60:.1f} min, {meta['threads']} threads)")
    dense, tok = real.load_dense()
    moe = load_moe(path)
    domains = data.domains()
    n_win = args.tokens // args.seq_len
    n_q = args.quant_tokens // args.seq_len
    windows = {d: real.domain_windows(d, "test", tok, args.seq_len, n_win, seed=0) for d in domains}
    qwin = {d: w[:n_q] for d, w in windows.items()}
    nwin = {d: w[:max(1, args.nmi_tokens // args.seq_len)] for d, w in windows.items()}
    out = {"path": path, "build": {k: meta[k] for k in ("seconds", "timings", "threads", "torch", "weights_sha256",
                                                         "router_holdout_accuracy", "expert_relative_change",
                                                         "finetune_loss_first_last")},
           "source": meta["source"], "recipe": rec, "experts": meta["experts"],
           "held_out_domains": meta["held_out_domains"], "tokens_per_domain": {d: int(w.numel()) for d, w in windows.items()},
           "build_timed_now": t_build is not None}

    print("perplexity: dense and MoE")
    res_dense = ppl_all(dense, windows, label="dense")
    res_moe = ppl_all(moe, windows, label="moe")
    out["perplexity"] = {d: {"dense": row(res_dense[d]), "moe": row(res_moe[d]),
                             "moe_over_dense": ratio_row(res_dense[d], res_moe[d])} for d in domains}
    out["throughput_tokens_per_second"] = {
        "dense": sum(x.tokens_per_second for x in res_dense.values()) / len(domains),
        "moe": sum(x.tokens_per_second for x in res_moe.values()) / len(domains)}

    print("routing: NMI(domain; top-1 expert) per layer")
    out["nmi"] = {"all_domains": routing_nmi(moe, nwin),
                  "build_domains": routing_nmi(moe, {d: w for d, w in nwin.items() if d in rec["domains"]})}
    use = usage(moe, nwin)
    out["usage_top1"] = {d: [sum(use[d][layer][e] for layer in use[d]) / len(use[d]) for e in range(r["num_experts"])]
                         for d in domains}
    print("chat answers")
    out["chat"] = {"prompts": PROMPTS, "dense": chat(dense, tok), "moe": chat(moe, tok)}
    out["chat"]["nll_of_dense_answers"] = {"dense": answer_nll(dense, tok, out["chat"]["dense"]),
                                           "moe": answer_nll(moe, tok, out["chat"]["dense"])}
    print("Q4_1 grid check")
    out["q4_1"] = q4_1_check(moe, dense, r)
    random_routers_(moe)
    out["nmi"]["random_router_all_domains"] = routing_nmi(moe, nwin)
    del moe

    quant = {}
    base = {d: subset(res_moe[d], n_q) for d in domains}
    for label, how in (("rtn3_g64", ("api", 3, 64)), ("rtn3_g128_ragged", ("ragged", 3, 128)),
                       ("rtn4_g32", ("api", 4, 32))):
        if label not in args.quant:
            continue
        print(f"quantized experts: {label}")
        m = load_moe(path)
        t = time.perf_counter()
        extra = {}
        if how[0] == "api":
            dynamoq.quantize_(m, dynamoq.DynaMoConfig(bits=how[1], group_size=how[2], shared_bits=None))
            rep = dynamoq.bits_report(m)
            extra = {"storage_bits": rep["storage_bits"], "bytes": rep["bytes"], "path": "dynamoq.quantize_ (packed)"}
        else:
            extra = {"ragged": rtn_ragged_(m, how[1], how[2]),
                     "path": "dynamoq.packing.quantize_rtn + dequantize, zero-padded inputs, float weights"}
        extra["quantize_seconds"] = time.perf_counter() - t
        res = ppl_all(m, qwin, label=label)
        quant[label] = {**extra, "domains": {d: {"ppl": row(res[d]), "over_moe": ratio_row(base[d], res[d])}
                                             for d in domains},
                        "tokens_per_second": sum(x.tokens_per_second for x in res.values()) / len(domains)}
        del m
    out["quantized"] = quant
    out["moe_on_quant_windows"] = {d: row(base[d]) for d in domains}
    return out


def measure_tiny(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dynamoq.models.reference("tiny")
    meta = info(path)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    windows = {d: real.domain_windows(d, "test", tok, 256, args.tiny_tokens // 256, seed=0) for d in data.domains()}
    res = {d: perplexity(model, w, seq_len=256, max_tokens=w.numel(), progress=False) for d, w in windows.items()}
    nm = routing_nmi(model, windows)
    random_routers_(model)
    nr = routing_nmi(model, windows)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    return {"path": str(path), "build_seconds": meta["seconds"], "threads": meta["threads"], "bytes": size,
            "recipe": meta["recipe"], "weights_sha256": meta["weights_sha256"],
            "perplexity": {d: row(x) for d, x in res.items()}, "nmi": nm, "nmi_random_router": nr,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------

def targets(res: dict) -> dict:
    rp = res["real"]
    ratios = {d: v["moe_over_dense"]["ratio"] for d, v in rp["perplexity"].items()}
    nmi_all = rp["nmi"]["all_domains"]
    frac = sum(v >= 0.15 for v in nmi_all.values()) / len(nmi_all)
    rnd = rp["nmi"]["random_router_all_domains"]
    t = {"ppl_at_most_dense": {"met": all(x <= 1.0 for x in ratios.values()), "max_ratio": max(ratios.values())},
         "nmi_at_least_0.15_in_3/4_layers": {"met": frac >= 0.75, "fraction": frac,
                                              "min": min(nmi_all.values()), "median": sorted(nmi_all.values())[len(nmi_all) // 2]},
         "nmi_far_above_random_router": {"trained_mean": sum(nmi_all.values()) / len(nmi_all),
                                         "random_mean": sum(rnd.values()) / len(rnd)}}
    t["nmi_far_above_random_router"]["met"] = t["nmi_far_above_random_router"]["trained_mean"] >= \
        3 * t["nmi_far_above_random_router"]["random_mean"]
    for label in ("rtn3_g128_ragged", "rtn3_g64"):
        if label in rp["quantized"]:
            inc = {d: v["over_moe"]["ratio"] - 1 for d, v in rp["quantized"][label]["domains"].items()}
            t[f"{label}_raises_ppl_15pct"] = {"met": min(inc.values()) >= 0.15, "min_increase": min(inc.values()),
                                              "max_increase": max(inc.values())}
    t["build_under_30_min"] = {"met": rp["build"]["seconds"] <= 1800, "seconds": rp["build"]["seconds"]}
    return t


def table(res: dict) -> str:
    rp = res["real"]
    L = []
    rec = rp["recipe"]
    L.append("# Reference models\n")
    L.append(f"## real: SmolLM2-135M-Instruct -> {len(rp['experts'])}-expert top-{rec['top_k']} Mixtral "
             f"(Branch-Train-MiX)\n")
    b = rp["build"]
    L.append(f"- Source: `{rp['source']['pypi']}` wheel (sha256 `{rp['source']['wheel_sha256']}`), "
             f"`{rp['source']['gguf']}` (sha256 `{rp['source']['gguf_sha256']}`), {rp['source']['model']}.")
    L.append(f"- Experts: {', '.join(rp['experts'])}. Held out of the build entirely: "
             f"{', '.join(rp['held_out_domains'])}.")
    L.append(f"- Recipe: {rec['steps']} AdamW steps x {rec['batch']}x{rec['seq_len']} tokens per expert (MLP "
             f"weights only, lr {rec['lr']}, bf16 autocast), routers by soft-label logistic regression on "
             f"{rec['router_windows']} windows per domain (generalist share {rec['generalist_share']}).")
    L.append(f"- Build: **{b['seconds'] / 60:.1f} min** with {b['threads']} threads "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in b['timings'].items())})"
             + (" - timed in this run" if rp["build_timed_now"] else " - as recorded by the build") + ".")
    spread = b["expert_relative_change"]
    if "from_dense" in spread:
        L.append(f"- Experts moved from the dense MLP by {min(spread['from_dense'].values()) * 100:.2f}-"
                 f"{max(spread['from_dense'].values()) * 100:.2f}% (relative Frobenius norm); two domain experts "
                 f"differ by {spread['between_experts_mean'] * 100:.2f}% on average.")
    L.append(f"- Weights sha256 (state dict): `{b['weights_sha256'][:16]}...`\n")
    L.append("### Perplexity on each domain's test split\n")
    n_tok = sorted(set(rp["tokens_per_domain"].values()))
    L.append(f"{'/'.join(map(str, n_tok))} tokens per domain, windows of {res['args']['seq_len']}; 95% bootstrap "
             f"intervals over windows; ratio = MoE / dense with a paired interval. * = held out of the build.\n")
    L.append("| domain | dense | MoE | MoE / dense |")
    L.append("| --- | --- | --- | --- |")
    for d, v in rp["perplexity"].items():
        star = "*" if d in rp["held_out_domains"] else ""
        f = lambda x: f"{x['ppl']:.2f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"
        q = v["moe_over_dense"]
        L.append(f"| {d}{star} | {f(v['dense'])} | {f(v['moe'])} | {q['ratio']:.3f} [{q['ci'][0]:.3f}, {q['ci'][1]:.3f}] |")
    th = rp["throughput_tokens_per_second"]
    L.append(f"\nEvaluation throughput ({res['threads']} threads, batch 4 x {res['args']['seq_len']}): dense "
             f"{th['dense']:.0f} tokens/s, MoE {th['moe']:.0f} tokens/s (transformers' eager experts).\n")
    L.append("### Routing: NMI(domain; top-1 expert), per layer\n")
    nm, nb, nr = rp["nmi"]["all_domains"], rp["nmi"]["build_domains"], rp["nmi"]["random_router_all_domains"]
    L.append(f"NMI = I(D;E) / sqrt(H(D) H(E)) over {res['args']['nmi_tokens']} test tokens per domain.\n")
    L.append("| layer | " + " | ".join(str(k) for k in nm) + " |")
    L.append("| --- | " + " | ".join("---" for _ in nm) + " |")
    L.append("| all 10 domains | " + " | ".join(f"{v:.2f}" for v in nm.values()) + " |")
    L.append("| 8 build domains | " + " | ".join(f"{v:.2f}" for v in nb.values()) + " |")
    L.append("| random router, 10 domains | " + " | ".join(f"{v:.2f}" for v in nr.values()) + " |")
    L.append("\nShare of each domain's tokens whose top-1 expert is each expert (mean over layers):\n")
    L.append("| domain | " + " | ".join(e.split(" ")[0] for e in rp["experts"]) + " |")
    L.append("| --- | " + " | ".join("---" for _ in rp["experts"]) + " |")
    for d, u in rp["usage_top1"].items():
        L.append(f"| {d} | " + " | ".join(f"{x:.2f}" for x in u) + " |")
    L.append("\n### Quantized experts (attention, embeddings and routers kept)\n")
    L.append("Group sizes: the experts' gate/up input dimension is the hidden size 576 = 4.5 x 128, so group 128 "
             "does not divide it (groups 32, 64 and 192 divide both 576 and 1536); the down projection's input "
             "(1536) takes group 128. `rtn3_g64` is dynamoq.quantize_ with group 64 (the packed path); "
             "`rtn3_g128_ragged` is dynamoq's RTN at group 128 with the 576-wide rows zero-padded to 640 "
             "(their last group holds 64 weights; padding does not change a group's range, which always holds 0), "
             "applied as float weights.\n")
    qk = list(rp["quantized"])
    L.append("| domain | MoE | " + " | ".join(qk) + " |")
    L.append("| --- | --- | " + " | ".join("---" for _ in qk) + " |")
    for d in rp["perplexity"]:
        cells = []
        for k in qk:
            v = rp["quantized"][k]["domains"][d]
            cells.append(f"{v['ppl']['ppl']:.2f} ({(v['over_moe']['ratio'] - 1) * 100:+.0f}%)")
        L.append(f"| {d} | {rp['moe_on_quant_windows'][d]['ppl']:.2f} | " + " | ".join(cells) + " |")
    for k in qk:
        q = rp["quantized"][k]
        s = f"- {k}: {q['path']}"
        if "storage_bits" in q:
            s += f", {q['storage_bits']:.3f} stored bits per expert weight"
        s += f", {q['tokens_per_second']:.0f} tokens/s in evaluation."
        L.append(s)
    q4 = rp["q4_1"]
    L.append("\n### The Q4_1 grid\n")
    gen = q4["generalist_expert"]
    ge = q4["experts"][gen] if gen is not None else None
    L.append(f"Re-quantized in Q4_1's own format ({q4['format']}): attention weights: relative error "
             f"{q4['attention']['relative_error']:.1e}, worst weight {q4['attention']['max_error_in_grid_steps']:.1e} "
             f"grid steps off"
             + (f"; generalist expert (the dense MLP): {ge['relative_error']:.1e} / "
                f"{ge['max_error_in_grid_steps']:.1e} steps" if ge else "")
             + f"; fine-tuned domain experts: relative error "
               f"{min(e['relative_error'] for e in q4['experts'] if e['expert'] != gen):.3f}-"
               f"{max(e['relative_error'] for e in q4['experts'] if e['expert'] != gen):.3f}.")
    L.append(f"So 4-bit group-32 asymmetric quantization with a float minimum is lossless on every tensor taken "
             f"from the source (attention, the generalist expert; the embeddings are Q8_0), not on the fine-tuned "
             f"experts, which moved off the grid. dynamoq's own RTN (integer zero point, range forced to hold 0) "
             f"is not lossless even there: relative error "
             f"{q4['dynamoq_rtn_4bit_g32_attention_relative_error']:.3f} on attention weights"
             + (f", {q4['dynamoq_rtn_4bit_g32_generalist_relative_error']:.3f} on the generalist expert."
                if "dynamoq_rtn_4bit_g32_generalist_relative_error" in q4 else "."))
    L.append("\n### Chat (greedy, 40 new tokens)\n")
    ch = rp["chat"]
    L.append(f"Mean NLL per token of the dense model's answers: dense {ch['nll_of_dense_answers']['dense']:.3f}, "
             f"MoE {ch['nll_of_dense_answers']['moe']:.3f} nats.\n")
    L.append("| prompt | dense | MoE |")
    L.append("| --- | --- | --- |")
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]
    for p, a, b2 in zip(ch["prompts"], ch["dense"], ch["moe"]):
        L.append(f"| {esc(p)} | {esc(a)} | {esc(b2)} |")
    if "tiny" in res:
        t = res["tiny"]
        L.append("\n## tiny: a Qwen3-MoE trained from scratch\n")
        rt = t["recipe"]
        L.append(f"{rt['layers']} layers, hidden {rt['hidden_size']}, {rt['experts']} experts of {rt['expert_size']} "
                 f"(top-{rt['top_k']}), own BPE tokenizer of {rt['vocab_size']} tokens; {t['params'] / 1e6:.2f} M "
                 f"parameters, {t['bytes'] / 2 ** 20:.1f} MB shipped in the package; trained "
                 f"{rt['steps']} steps x {rt['batch']}x{rt['seq_len']} tokens on the same eight domains, "
                 f"built in {t['build_seconds'] / 60:.1f} min with {t['threads']} threads.\n")
        L.append("| domain | ppl (own tokenizer) |")
        L.append("| --- | --- |")
        for d, v in t["perplexity"].items():
            L.append(f"| {d} | {v['ppl']:.1f} [{v['ci'][0]:.1f}, {v['ci'][1]:.1f}] |")
        L.append("\nNMI(domain; top-1 expert) per layer: trained " + ", ".join(f"{v:.2f}" for v in t["nmi"].values())
                 + "; random router " + ", ".join(f"{v:.2f}" for v in t["nmi_random_router"].values()) + ".")
    L.append("\n## Targets\n")
    L.append("| target | met | numbers |")
    L.append("| --- | --- | --- |")
    for k, v in res["targets"].items():
        nums = ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items() if a != "met")
        L.append(f"| {k} | {'yes' if v['met'] else 'NO'} | {nums} |")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32768, help="test tokens per domain, dense and MoE")
    p.add_argument("--quant-tokens", type=int, default=16384, help="test tokens per domain, quantized models")
    p.add_argument("--nmi-tokens", type=int, default=8192, help="test tokens per domain for routing statistics")
    p.add_argument("--tiny-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--quant", nargs="*", default=["rtn3_g64", "rtn3_g128_ragged", "rtn4_g32"])
    p.add_argument("--rebuild", action="store_true", help="build the real model afresh and time it")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--name", default="reference_models")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = {"args": vars(args), "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"}
    res["real"] = measure_real(args)
    if not args.no_tiny:
        res["tiny"] = measure_tiny(args)
    res["targets"] = targets(res)
    res["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=float))
    cmd = shlex.join(["python", "recipes/reference_models.py"] + (argv if argv is not None else sys.argv[1:]))
    md = (f"<!-- written by recipes/reference_models.py; do not edit -->\nCommand: `{cmd}` ({res['machine']}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d')}; {res['seconds'] / 60:.0f} min)\n\n" + table(res) + "\n")
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
