"""Tutorial 5: save a quantized model, load it with transformers, generate.

    python tutorials/05_save_load_generate.py           # the real reference MoE
    python tutorials/05_save_load_generate.py --fast    # a tiny model
"""
# %% [markdown]
# # 5. Save, load and generate with transformers
#
# A dynamoq model is a transformers model whose expert weights are packed low-bit tensors.
# `save_pretrained` writes them as safetensors (codes, scales, zeros; nothing pickled) with a
# `quantization_config` of quant_method "dynamoq" in config.json and a checksummed manifest;
# `AutoModelForCausalLM.from_pretrained` reads them back once `dynamoq` is imported (the import
# registers the quantization method with transformers). Generation, pipelines and the tokenizer
# work as for any model.

# %%
import json
import os

import torch
import transformers
from _tutorial import model_path, options

import dynamoq
from dynamoq import DynaMoConfig

args = options(__doc__, "05", calib_tokens=8192, seq_len=512, new_tokens=40, group_size=64)
if args.fast:
    args.calib_tokens, args.seq_len, args.new_tokens = 512, 64, 8

path = model_path(args)
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

# %% [markdown]
# ## Quantize
# The DynaMo baseline at 3.0 stored bits per expert weight, with the switching cache, so the saved
# model can still `adapt_` after loading.

# %%
analysis = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in ("drama", "python")},
                           tokenizer=tok, seq_len=args.seq_len, max_tokens=args.calib_tokens)
dynamoq.quantize_(model, DynaMoConfig(analysis=analysis, target_bits=3.0, group_size=args.group_size,
                                      quantizer="rtn" if args.fast else "gptq"))
prompt = "def fibonacci(n):"
inputs = tok(prompt, return_tensors="pt")
greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
with torch.no_grad():
    before = model.generate(**inputs, **greedy)
print("quantized, in memory:", repr(tok.decode(before[0], skip_special_tokens=True)))

# %% [markdown]
# ## Save
# Like any transformers model; the tokenizer goes beside it.

# %%
out = f"{args.out}/model"
model.save_pretrained(out)
tok.save_pretrained(out)
for name in sorted(os.listdir(out)):
    print(f"  {name:32} {os.path.getsize(os.path.join(out, name)):>12,} bytes")
qc = json.load(open(f"{out}/config.json"))["quantization_config"]
print("quantization_config:", {k: qc[k] for k in qc if not isinstance(qc[k], (dict, list))})

# %% [markdown]
# ## Load and generate
# A fresh model from the folder, exactly as users of any hub checkpoint do (`import dynamoq` is all
# it takes). Greedy decoding gives the same tokens as the model that was saved.

# %%
loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
print(f"loaded: {type(loaded).__name__}, "
      f"{dynamoq.bits_report(loaded)['storage_bits']:.3f} stored bits per expert weight")
with torch.no_grad():
    after = loaded.generate(**inputs, **greedy)
print("quantized, loaded:   ", repr(tok.decode(after[0], skip_special_tokens=True)))
same = torch.equal(before, after)
print("same tokens after save and load:", same)

# %% [markdown]
# Pipelines take the model object (or the folder: `pipeline("text-generation", model=out)`).

# %%
generator = transformers.pipeline("text-generation", model=loaded, tokenizer=tok)
text = generator("The king said", max_new_tokens=args.new_tokens, do_sample=False)[0]["generated_text"]
print("pipeline:", repr(text))

# %% [markdown]
# The loaded model adapts like the one that was saved (its switching cache is in the checkpoint),
# and `torch.compile(loaded)` compiles the low-bit experts without graph breaks.

# %%
changed = dynamoq.adapt_(loaded, dynamoq.data.load("latex_math", "calib"), tokenizer=tok,
                         max_tokens=args.calib_tokens, seq_len=args.seq_len)["changed"]
print(f"adapted after loading: {sum(len(v) for v in changed.values())} experts changed level")
dynamoq.revert_(loaded)
