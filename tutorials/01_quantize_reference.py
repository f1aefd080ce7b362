"""Tutorial 1: quantize the reference model with DynaMo's expert-level mixed precision.

    python tutorials/01_quantize_reference.py           # the real reference MoE
    python tutorials/01_quantize_reference.py --fast    # a tiny one, in seconds
"""
# %% [markdown]
# # 1. Quantize the reference model
#
# dynamoq gives every expert of every MoE layer its own bit-width. Which expert gets how many
# bits comes from an *analysis*: the model runs on a few datasets while hooks measure how much
# each expert and each of its input channels matters on each dataset. Here we
#
# 1. load the reference MoE and its tokenizer with transformers,
# 2. analyse it on three built-in domains (English drama, Python code, German),
# 3. quantize it two ways at the same size: uniform 3-bit round-to-nearest, and DynaMo (the
#    same number of stored bits, spent where the analysis says, with GPTQ),
# 4. compare test perplexity, look at the bits each expert got, and save the result.

# %%
import copy
import time

import torch
import transformers
from _tutorial import model_path, options

import dynamoq
from dynamoq import DynaMoConfig

args = options(__doc__, "01", calib_tokens=8192, eval_tokens=8192, seq_len=512, group_size=64)
if args.fast:
    args.calib_tokens, args.eval_tokens, args.seq_len = 512, 256, 64

path = model_path(args)
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
print(f"model: {path} ({model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")

# %% [markdown]
# ## The analysis
# `dynamoq.analyze` takes named datasets (lists of strings with a tokenizer, or token tensors) and
# returns an `Analysis`: per dataset, layer and expert, the routing counts and the channel
# statistics that significance is computed from. It can be saved and loaded (safetensors + JSON).

# %%
calib = {d: dynamoq.data.load(d, "calib") for d in ("drama", "python", "german")}
analysis = dynamoq.analyze(model, calib, tokenizer=tok, seq_len=args.seq_len, max_tokens=args.calib_tokens)
analysis.save(f"{args.out}/analysis")
for d in analysis.datasets:
    top = {layer: int(s.argmax()) for layer, s in analysis.expert_significance(d).items()}
    print(f"{d:>8}: most significant expert per layer {top}")

# %% [markdown]
# ## Two quantizations of the same size
# Uniform 3-bit RTN is data-free: with a float16 scale and a uint8 zero per group of 64 inputs it
# stores 3 + 24/64 = 3.375 bits per expert weight. The DynaMo baseline spends the same budget
# (`target_bits=3.375`) differently: it chooses per-expert bits from {2, 3, 4, 6, 8} so that the
# average *stored* bits (codes, scales and zeros) stay within the budget while the
# significance-weighted error is smallest, then quantizes each expert with GPTQ on the tokens
# routed to it (round-to-nearest with --fast). Both leave routers, attention, norms and embeddings
# as they are.

# %%
quantizer = "rtn" if args.fast else "gptq"
uniform = copy.deepcopy(model)
dynamoq.quantize_(uniform, DynaMoConfig(bits=3, group_size=args.group_size))
budget = dynamoq.bits_report(uniform)["storage_bits"]
dyn = copy.deepcopy(model)
t0 = time.perf_counter()
dynamoq.quantize_(dyn, DynaMoConfig(analysis=analysis, target_bits=budget, quantizer=quantizer,
                                    group_size=args.group_size))
print(f"DynaMo quantized in {time.perf_counter() - t0:.1f} s")
quantized = {"uniform 3-bit RTN": uniform, f"DynaMo {budget:.3f} bits, {quantizer}": dyn}
for name, q in quantized.items():
    r = dynamoq.bits_report(q)
    print(f"{name}: {r['storage_bits']:.3f} stored bits per expert weight, {r['bytes']:,} bytes")

# %% [markdown]
# ## Quality
# Test perplexity (with a 95% interval) on a calibration domain and on two it never saw.

# %%
results = {}
print(f"{'':24}" + "".join(f"{d:>28}" for d in ("drama", "bible", "latex_math")))
for name, m in {"full precision": model, **quantized}.items():
    results[name] = {d: dynamoq.eval.perplexity(m, dynamoq.data.load(d, "test"), tokenizer=tok,
                                                max_tokens=args.eval_tokens, seq_len=args.seq_len, progress=False)
                     for d in ("drama", "bible", "latex_math")}
    print(f"{name:24}" + "".join(f"{r.ppl:>12.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in results[name].values()))

# %% [markdown]
# ## What was done, and saving it
# `bits_report` reads everything from the tensors: bits of each expert, stored bits, bytes, the
# usage-weighted average (experts used more cost more at inference), the switching cache.

# %%
report = dynamoq.bits_report(dyn)
for layer, bits in report["experts"].items():
    print(f"layer {layer}: {bits}")
print(f"stored bits {report['storage_bits']:.3f}, usage-weighted {report['usage_bits']:.3f}, "
      f"switching cache {report['cache_bytes']:,} bytes")
dyn.save_pretrained(f"{args.out}/model")
tok.save_pretrained(f"{args.out}/model")
print(f"saved to {args.out}/model; AutoModelForCausalLM.from_pretrained('{args.out}/model') loads it "
      "(with dynamoq imported)")
