"""Shared by the benchmark recipes: the reference model, the corpora, evaluation, result files."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import types
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CALIB = ["drama", "python", "german"]          # calibration domains of the benchmarks


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", default="real", help='"real", "tiny" (dynamoq.models.reference) or a path')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=8192, help="test tokens per domain")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens per domain")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--name", default=None, help="result file stem (default: the recipe's)")
    p.add_argument("--domains", nargs="*", default=None, help="evaluation domains (default: all)")
    return p


def load(args):
    import transformers

    import dynamoq
    torch.set_num_threads(args.threads)
    path = dynamoq.models.reference(args.model) if args.model in ("real", "tiny") else args.model
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, tok


def fresh(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def texts(domain: str, split: str):
    import dynamoq
    return dynamoq.data.load(domain, split)


def evaluate(model, tok, domains, args, reference=None) -> dict:
    """Per-domain test perplexity (95% CI), top-1, and KL to a reference model."""
    import dynamoq
    out = {}
    for d in domains:
        r = dynamoq.eval.perplexity(model, texts(d, "test"), tokenizer=tok, max_tokens=args.eval_tokens,
                                    seq_len=args.seq_len, progress=False)
        row = {"ppl": r.ppl, "ci": [r.ci_low, r.ci_high], "tokens": r.tokens, "top1": r.top1,
               "tokens_per_second": r.tokens_per_second}
        if reference is not None:
            kl = dynamoq.eval.kl_divergence(model, reference, texts(d, "test"), tokenizer=tok,
                                            max_tokens=args.eval_tokens // 2, seq_len=args.seq_len, progress=False)
            row["kl"] = kl.kl
        out[d] = row
    return out


def own_frame(module):
    """module's forward, bound to it, with a copy of its code object, to torch.compile in place of the module.
    Dynamo keeps its compiled graphs per code object and, on every call, checks the guards of the entries
    before the one that matches: modules of one class share their forward's code, so with several variants
    compiled in one process each call of one also ran the failing guards of the others (a real program
    compiles its one model). `bench_kernels.py --tokens 1 --threads 1 --variants bf16 dynamoq --no-e2e`
    (7 variants a shape), modules -> own frames: 1-token DynaMo mixed 1.35 -> 1.12 ms at Qwen3 shape,
    1.77 -> 1.28 at OLMoE shape; bf16 batched_mm 3.56 -> 3.38, 4.77 -> 4.28. (Module hooks do not run.)"""
    f = type(module).forward
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(copy, module)


class Decoder:
    """Greedy decode of one model, one token per step with a static cache, the decode step compiled
    (fullgraph); step() times one step. Several Decoders can be stepped in turn (interleaved): each compiles
    a frame of its own (own_frame)."""

    def __init__(self, model, prompt, new_tokens: int):
        from transformers import StaticCache

        import dynamoq
        self.dev = next(model.parameters()).device
        self.prompt, self.n = prompt.to(self.dev), prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=self.n + new_tokens + 8)
        self.model = model
        self.compiled = torch.compile(own_frame(model), fullgraph=True, options=dynamoq.compile_options())
        self.tokens: list[int] = []
        self.tok = None

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        with torch.no_grad():
            if self.tok is None:                  # the prompt, eager
                logits = self.model(self.prompt, past_key_values=self.cache,
                                    cache_position=torch.arange(self.n, device=self.dev)).logits
                self.tok = logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            at = torch.tensor([self.n + len(self.tokens)], device=self.dev)
            logits = self.compiled(self.tok, past_key_values=self.cache, cache_position=at).logits
            self.tok = logits[:, -1:].argmax(-1)
            sync()
            seconds = time.perf_counter() - t0
        self.tokens.append(int(self.tok))
        return seconds


def decode_rate(model, prompt, new_tokens: int, warmup: int = 3):
    """prompt [1, T] -> (steady tokens/s of a Decoder: median over the steps after the first `warmup`,
    which compile; the tokens generated)."""
    import statistics
    d = Decoder(model, prompt, new_tokens)
    times = [d.step() for _ in range(new_tokens)]
    return 1 / statistics.median(times[min(warmup, len(times) - 1):]), d.tokens


def revision() -> str:
    """The commit of the code that runs ("-dirty" with uncommitted changes outside recipes/results;
    "unknown" outside git)."""
    import subprocess
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top,exclude)recipes/results"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def write(name: str, result: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    header = (f"<!-- written by recipes/{Path(sys.argv[0]).name}; do not edit -->\n"
              f"Command: `python recipes/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}` "
              f"({result['machine']}, {result['date']})\n\n")
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    print(header + table)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def fmt_ppl(row) -> str:
    return f"{row['ppl']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]"
