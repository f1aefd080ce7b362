"""Tutorial 6: evaluate a dynamoq model with lm-evaluation-harness, on local tasks (no hub).

    pip install "dynamoq[lmeval]"
    python tutorials/06_lm_eval.py           # the real reference MoE, every domain
    python tutorials/06_lm_eval.py --fast    # a tiny model, two domains, 6 items each
"""
# %% [markdown]
# # 6. lm-evaluation-harness
#
# lm-eval's tasks normally come from the Hugging Face hub. `dynamoq.lmeval.write_tasks` makes
# local ones from the built-in corpora instead: for each domain, a multiple-choice continuation
# task (the start of a test document, four continuations, one of them the true one), written as a
# JSON-lines file plus an lm-eval task config in a folder. lm-eval reads the folder
# (`TaskManager(include_path=...)`), and its Hugging Face model class `HFLM` takes a model object,
# so a quantized model is evaluated in memory, as it is. Scoring is lm-eval's own: log-likelihood
# of each choice (`acc`) and per character (`acc_norm`).

# %%
import copy

import torch
import transformers
from _tutorial import model_path, options

import dynamoq
from dynamoq import DynaMoConfig, lmeval

args = options(__doc__, "06", items=100, calib_tokens=8192, seq_len=512, group_size=64)
domains, chars = dynamoq.data.domains(), dict(context_chars=400, continuation_chars=100)
if args.fast:
    args.items, args.calib_tokens, args.seq_len = 6, 512, 64
    domains, chars = ["drama", "python"], dict(context_chars=150, continuation_chars=40)

path = model_path(args)
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

# %% [markdown]
# ## Local tasks
# One task per domain, `dynamoq_<domain>`, and `dynamoq_domains` (which passage comes from the
# context's domain); all tagged `dynamoq`. The same arguments give the same items.

# %%
tasks_dir = f"{args.out}/tasks"
tasks = lmeval.write_tasks(tasks_dir, domains, n_items=args.items, **chars)
print("tasks:", ", ".join(tasks))

# %% [markdown]
# ## Full precision and DynaMo 3.0 bits, through lm-eval's HFLM

# %%
quantized = copy.deepcopy(model)
analysis = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in ("drama", "python", "german")},
                           tokenizer=tok, seq_len=args.seq_len, max_tokens=args.calib_tokens)
dynamoq.quantize_(quantized, DynaMoConfig(analysis=analysis, target_bits=3.0, group_size=args.group_size,
                                          quantizer="rtn" if args.fast else "gptq"))
results = {}
for name, m in {"full precision": model, "DynaMo 3.0 bits": quantized}.items():
    results[name] = lmeval.evaluate(m, tok, tasks_dir, batch_size=16)
    print(f"## {name}\n{lmeval.table(results[name])}")

# %%
for task in tasks:
    accs = [results[name]["results"][task]["acc,none"] for name in results]
    print(f"{task:>20}: acc " + " -> ".join(f"{a:.3f}" for a in accs))

# %% [markdown]
# ## From the command line
# For a saved checkpoint (tutorial 5), `python -m dynamoq.lmeval` imports dynamoq, loads the
# folder with `from_pretrained`, writes the tasks if the folder has none, and prints lm-eval's
# table:
#
#     python -m dynamoq.lmeval out/tutorials/05/model out/tutorials/06/tasks --limit 50
#
# lm-eval's own command line reads the same task folder (`lm_eval --model hf --model_args
# pretrained=PATH --include_path out/tutorials/06/tasks --tasks dynamoq`) for models that are not
# quantized by dynamoq; it does not import dynamoq, so it cannot load a dynamoq checkpoint.
