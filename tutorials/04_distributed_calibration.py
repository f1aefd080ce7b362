"""Tutorial 4: calibration across processes (torchrun or accelerate launch).

    python tutorials/04_distributed_calibration.py           # launches two processes itself
    python tutorials/04_distributed_calibration.py --fast
"""
# %% [markdown]
# # 4. Calibration across processes
#
# The analysis runs every calibration window through the model. With several processes (one per
# GPU, or several CPU processes), `dynamoq.analyze` shards the windows over the ranks of
# `torch.distributed` and sum-reduces the statistics, so **every process gets the same Analysis
# one process would have computed**. Nothing to configure: start the processes with `torchrun` or
# `accelerate launch`, join the process group (here through accelerate's `PartialState`), and call
# `analyze` as usual.
#
# This file is both the launcher and the worker: run plainly, it starts itself twice under
# `torchrun`, then checks that two ranks really ran and that their analysis equals a one-process
# one. The launch command, for your own script:
#
#     torchrun --standalone --nproc_per_node 2 my_calibration.py
#     accelerate launch --multi_gpu --num_processes 2 my_calibration.py
#
# Two traps on a machine without GPUs (accelerate 1.15): `accelerate launch --cpu --num_processes 2`
# starts only one process; and `PartialState()` without `cpu=True` leaves each process on its own
# (no process group), so each would analyse every window itself. Hence `cpu=` below.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from _tutorial import model_path, options

import dynamoq

args = options(__doc__, "04", calib_tokens=8192, seq_len=512, worker=False)
domains = ["drama", "python", "german"]
if args.fast:
    args.calib_tokens, args.seq_len, domains = 512, 64, ["drama", "python"]
out = Path(args.out)

# %% [markdown]
# ## The worker: what runs in each process
# `PartialState()` joins the process group that torchrun / accelerate launch describe in the
# environment (NCCL on GPUs; gloo on CPU, with `cpu=True`) and puts this process on its device. A
# hook counts the windows this process runs, to show the sharding.

# %%
def worker(args) -> None:
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    path = model_path(args)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(state.device)
    windows = []
    # windows of the calibration pass (the loss-sensitivity pass, with gradients, runs the first windows again)
    model.register_forward_pre_hook(lambda m, a, kw: None if torch.is_grad_enabled() else
                                    windows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    analysis = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in domains}, tokenizer=tok,
                               seq_len=args.seq_len, max_tokens=args.calib_tokens,
                               progress=state.is_main_process)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"rank": state.process_index, "world": state.num_processes, "windows": sum(windows), "pid": os.getpid(),
         "backend": str(state.backend)}))
    if state.is_main_process:
        analysis.save(out / "analysis-2-processes")
    state.wait_for_everyone()


if args.worker:
    worker(args)
    sys.exit(0)

# %% [markdown]
# ## Launch two processes
# (On a machine with GPUs, `--nproc_per_node` is usually the number of GPUs.)

# %%
path = model_path(args)           # resolved once here, so the workers do not build it concurrently
for f in out.glob("rank*.json"):
    f.unlink()
command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", "--model", path, "--out", str(out),
           "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len)] + (["--fast"] if args.fast else [])
print(" ".join(command[2:]))
done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                      timeout=900)
if done.returncode:
    raise SystemExit(f"the workers failed:\n{done.stderr[-3000:]}")

# %% [markdown]
# ## Did two processes really run, and split the work?

# %%
ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
for r in ranks:
    print(f"rank {r['rank']} of {r['world']} (pid {r['pid']}, {r['backend']}): ran {r['windows']} windows")
assert len({r["pid"] for r in ranks}) == 2 and all(r["world"] == 2 and r["windows"] > 0 for r in ranks)

# %% [markdown]
# ## Same result as one process
# The statistics summed over two processes equal those of one process over all windows.

# %%
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
one = dynamoq.analyze(model, {d: dynamoq.data.load(d, "calib") for d in domains}, tokenizer=tok,
                      seq_len=args.seq_len, max_tokens=args.calib_tokens, progress=False)
two = dynamoq.Analysis.load(out / "analysis-2-processes")
windows = sum(int(w.shape[0]) for w in one.windows.values())
assert sum(r["windows"] for r in ranks) == windows

def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


worst = max(relative_difference(two.stats[d][layer].tensors()[k], t)
            for d in one.datasets for layer in one.layers for k, t in one.stats[d][layer].tensors().items())
print(f"{windows} windows in all; largest relative difference between the two analyses: {worst:.2e}")
same = worst < 1e-6
print("two processes give the analysis of one:", same)
