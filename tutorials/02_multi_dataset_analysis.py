"""Tutorial 2: the multi-level analysis on several datasets, with plots.

    python tutorials/02_multi_dataset_analysis.py           # the real reference MoE, six domains
    python tutorials/02_multi_dataset_analysis.py --fast    # a tiny model, three domains
"""
# %% [markdown]
# # 2. Multi-dataset analysis, with plots
#
# DynaMo's premise: experts matter differently on different data. The analysis measures, per
# dataset, three levels:
#
# - **routing**: how often each expert is chosen;
# - **expert significance** S_exp: each expert's share of its layer's output energy (routing
#   weight x input energy x weight norms, per channel, summed), normalised per layer;
# - **channel significance** S_ch and its **dynamics**: how much each input channel's significance
#   moves between datasets (std over datasets of log S_ch). The paper observes that about 1% of
#   the channels carry most of that movement; those channels are what run-time switching caches.
#
# This tutorial analyses the model on several built-in domains, saves and reloads the analysis,
# measures how similar the domains look to the experts, and draws the three levels with
# `dynamoq.plots` (PNG files, no display needed).

# %%
import itertools

import torch
import transformers
from _tutorial import model_path, options

import dynamoq
from dynamoq import plots

args = options(__doc__, "02", calib_tokens=8192, seq_len=512, group_size=64)
domains = ["drama", "python", "german", "bible", "latex_math", "json"]
if args.fast:
    args.calib_tokens, args.seq_len, domains = 512, 64, ["drama", "python", "german"]

path = model_path(args)
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

# %% [markdown]
# ## Analyse, save, load
# One call for all datasets; each is a list of strings (here the built-in domains' calibration
# splits) or a token tensor. The saved form is safetensors + JSON and checks that it is loaded
# against the same model.

# %%
analysis = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in domains}, tokenizer=tok,
                           seq_len=args.seq_len, max_tokens=args.calib_tokens)
analysis.save(f"{args.out}/analysis")
analysis = dynamoq.Analysis.load(f"{args.out}/analysis")
analysis.check_model(model)
print(f"{len(analysis.datasets)} datasets, {len(analysis.layers)} MoE layers, "
      f"{sum(analysis.meta['tokens'].values())} tokens in {analysis.meta['seconds']:.1f} s")

# %% [markdown]
# ## How alike do the domains look to the experts?
# Rank correlation (Spearman) of expert significance between two domains, averaged over layers:
# 1 means the same experts matter in the same order. Code and natural language usually differ
# most.

# %%
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


sig = {d: analysis.expert_significance(d) for d in analysis.datasets}
rho = {(x, y): sum(spearman(sig[x][k], sig[y][k]) for k in analysis.layers) / len(analysis.layers)
       for x, y in itertools.combinations(analysis.datasets, 2)}
for (x, y), r in sorted(rho.items(), key=lambda kv: kv[1]):
    print(f"{x:>10} vs {y:<10} rho = {r:+.3f}")

# %% [markdown]
# ## Channel dynamics
# The share of the total cross-dataset change that the 1% most dynamic channels carry (1% if the
# change were spread evenly).

# %%
summary = plots.dynamics_summary(analysis, fraction=0.01)
print(f"top 1% of channels carry {100 * summary['all']:.1f}% of the cross-dataset change; per layer: "
      + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in summary["per_layer"].items()))

# %% [markdown]
# ## Plots
# - `significance`: S_exp per layer and expert, one heatmap per dataset plus the synthesized
#   significance (mean + std over datasets) that drives the bit allocation;
# - `routing`: how often each expert is routed to, per dataset;
# - `dynamics`: the distribution of channel dynamics and the top-1% share per layer.

# %%
pngs = [plots.significance(analysis, f"{args.out}/significance.png"),
        plots.routing(analysis, f"{args.out}/routing.png"),
        plots.dynamics(analysis, f"{args.out}/dynamics.png")]

# %% [markdown]
# And what the allocation makes of it: the bits each expert gets for a budget of 3.0 stored bits.

# %%
quantized = dynamoq.quantize_(model, dynamoq.DynaMoConfig(analysis=analysis, target_bits=3.0,
                                                                   group_size=args.group_size))
pngs.append(plots.bits_heatmap(dynamoq.bits_report(quantized), f"{args.out}/bits.png"))
print("plots:", *pngs, sep="\n  ")
