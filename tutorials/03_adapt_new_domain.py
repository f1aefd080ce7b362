"""Tutorial 3: adapt a quantized model to a new domain at run time, and revert.

    python tutorials/03_adapt_new_domain.py           # the real reference MoE
    python tutorials/03_adapt_new_domain.py --fast    # a tiny model
"""
# %% [markdown]
# # 3. Adapt to a new domain
#
# A quantization calibrated on some domains fits them best. DynaMo's run-time switching keeps,
# for every expert, a small cache of its most *dynamic* input channels (those whose significance
# moves most between the calibration domains) in 16 bit. When the data changes, `dynamoq.adapt_`
# measures expert significance on a sample of the new data, re-clusters each layer into
# 2/4/6/8-bit levels, and re-quantizes the cached channels of every expert whose level changed.
# Nothing else moves: a switch rewrites a few KB per expert, in place, so a compiled model keeps
# running without recompiling. `dynamoq.revert_` restores the baseline exactly.
#
# The cache exists only in a model quantized *with an analysis* (`cache_fraction`, 1% of each
# expert's input channels by default).

# %%
import torch
import transformers
from _tutorial import model_path, options

import dynamoq
from dynamoq import DynaMoConfig

args = options(__doc__, "03", calib_tokens=8192, eval_tokens=8192, adapt_tokens=4096, seq_len=512, group_size=64)
if args.fast:
    args.calib_tokens, args.eval_tokens, args.adapt_tokens, args.seq_len = 512, 256, 512, 64
NEW = "latex_math"      # a domain the calibration never saw

path = model_path(args)
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

# %% [markdown]
# ## Quantize with an analysis of three domains
# 3.0 stored bits per expert weight on average, and 1% of each expert's input channels cached.

# %%
analysis = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in ("drama", "python", "german")},
                           tokenizer=tok, seq_len=args.seq_len, max_tokens=args.calib_tokens)
dynamoq.quantize_(model, DynaMoConfig(analysis=analysis, target_bits=3.0, cache_fraction=0.01,
                                      quantizer="rtn" if args.fast else "gptq", group_size=args.group_size))
report = dynamoq.bits_report(model)
print(f"baseline: {report['storage_bits']:.3f} stored bits, switching cache {report['cache_bytes']:,} bytes "
      f"({100 * report['cache_bytes'] / report['bytes']:.1f}% of the expert bytes)")


def ppl(domain):
    return dynamoq.eval.perplexity(model, dynamoq.data.load(domain, "test"), tokenizer=tok,
                                   max_tokens=args.eval_tokens, seq_len=args.seq_len, progress=False)


probe = torch.tensor([tok.encode(dynamoq.data.load(NEW, "test")[0])[:32]])
with torch.no_grad():
    baseline_logits = model(probe).logits
before = {d: ppl(d) for d in (NEW, "drama")}

# %% [markdown]
# ## Adapt to the new domain
# A sample of the new domain (its calibration split, never its test split) is enough.
# `adapt_` returns which experts changed level, `[old, new]` bits, per layer.

# %%
result = dynamoq.adapt_(model, dynamoq.data.load(NEW, "calib"), tokenizer=tok, max_tokens=args.adapt_tokens,
                        seq_len=args.seq_len)
changed = result["changed"]
print(f"adapted to {NEW} in {result['seconds']:.2f} s on {result['tokens']} tokens; experts that changed level:")
for layer, experts in changed.items():
    print(f"  layer {layer}: " + ", ".join(f"expert {e} {old}->{new} bits" for e, (old, new) in experts.items()))
print("levels of the cached channels now:", dynamoq.switching.state(model))
after = {d: ppl(d) for d in (NEW, "drama")}
for d in after:
    print(f"{d:>11}: test perplexity {before[d].ppl:.3f} -> {after[d].ppl:.3f} after adapting")

# %% [markdown]
# ## Revert
# Back to the baseline, exactly: the same logits as before adapting.

# %%
dynamoq.revert_(model)
with torch.no_grad():
    reverted = torch.equal(model(probe).logits, baseline_logits)
print("reverted to the baseline exactly:", reverted)

# %% [markdown]
# For traffic that changes by itself, `dynamoq.switching.AutoSwitch(model, analysis).attach()`
# watches the routers' expert-usage histograms and calls `adapt_` / `revert_` when they drift
# from (or come back to) the calibration profile; its `events` list records every switch.
