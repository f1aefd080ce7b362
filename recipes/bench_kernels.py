"""Issue: the fused expert kernels. One MoE layer (router + experts) at OLMoE-1B-7B shape (hidden 2048,
expert width 1024, 64 experts, top-8) and at Qwen3-30B-A3B shape (hidden 2048, width 768, 128 experts,
top-8), bf16 activations, torch.compile'd, 1 and 2 threads, every variant side by side in one
process (interleaved, median of --runs calls, each call routing a different input, each started from caches
evicted alike: _evict). Every variant is compiled with dynamoq.compile_options(), as a frame of its own
(_common.own_frame). Variants: bf16 with transformers' grouped_mm and batched_mm; torchao int8 / int4
weight-only on the experts where they run; dynamoq uniform 4, 3, 2 bits; DynaMo mixed (2/4/6/8 bits,
~3 storage bits), and the same with a switching cache of 1% of each expert's input channels, every expert
switched to 8 bits (switching neither recompiles nor should slow the fused path: this row says what the
corrections cost) or none (the kernel skips zero corrections: this row says a cache costs nothing until
used); on a CPU with the native kernel (dynamoq/native.py) also DynaMo mixed without it, "(Inductor loops)",
and where it has AMX-INT8, without its AMX path, "(no AMX)"; on a GPU also uniform 3-bit and DynaMo mixed by
the hand-written Triton kernels (dynamoq/triton_decode.py; dynamoq/triton_grouped.py for many pairs),
"(Triton kernel)". Plus end-to-end
decode of the real reference model (dynamoq.models.reference("real")), quantized (the experts; the experts
and the attention at 8 bits; those and the output head at 8 bits) against bf16 with grouped_mm and with
batched_mm, with its perplexity through the decode path (on a GPU, which has no copy of it: an
OLMoE-1B-7B-shaped model of 4 layers, random weights). On CPU every variant's weights, bf16 included, are
in 2 MB pages (huge_pages).

    python recipes/bench_kernels.py                       # everything (about an hour on 2 cores)
    python recipes/bench_kernels.py --quick               # small shapes, a smoke run
    python recipes/bench_kernels.py --shapes olmoe --threads 1 --tokens 1 --no-e2e
    python recipes/bench_kernels.py --device cuda --name kernels_gpu   # one command on a GPU (Triton via Inductor)
    python recipes/bench_kernels.py --shapes --name kernels_e2e        # end to end only
    python recipes/bench_kernels.py --tokens 128 --no-e2e --merge      # re-measure one size, keep the other rows
    python recipes/bench_kernels.py --variants bf16 dynamoq --no-e2e --merge   # all but torchao (slow to compile)
    python recipes/bench_kernels.py --stack 4 --tokens 1 16 --no-e2e --merge   # per layer inside a 4-layer frame

A layer compiled as a frame of its own pays torch.compile's entry on every call (its Python, guards and graph
wrapper: ~0.3 ms from cold caches, a note gives it); a model compiled whole pays it once per decode step. --stack L
times L distinct layers compiled as one frame, as a model runs them, and reports per-layer rows beside the others.

Leave OMP_WAIT_POLICY unset: with PASSIVE, every parallel region wakes sleeping threads, and the
many small kernels of a decode step at 2 threads ran 6.6x slower (24.1 -> 3.66 tokens/s end to end).

Writes recipes/results/kernels_cpu.{json,md} (--name to change). Weights are random (N(0, 0.02)):
speed does not depend on their values. Columns: tokens/s; speedup over the faster bf16 implementation (torchao rows: over bf16 timed beside them, after a dynamo reset);
effective bits (stored bits per expert weight, scales and zeros included; with a switching cache, its
deltas too: what a decode reads); bytes of expert weights read per token (distinct experts the routed
tokens touch, averaged over the inputs); fraction of the memory-bound limit reached, speedup / (16 /
effective bits); relative error of the compiled output against the same layer run eagerly. On a GPU each
timed sample is --reps calls between two synchronizations, and the notes give the number of Triton kernels
Inductor generated per variant.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoConfig

import dynamoq
from _common import Decoder, own_frame
from dynamoq import DynaMoExperts, switching
from dynamoq.kernels import native_kernel, triton_kernel
from dynamoq.packing import OVERHEAD_BITS_PER_GROUP
from dynamoq.tensors import _PackedWeight

RESULTS = Path(__file__).parent / "results"
SHAPES = {   # name: (model type, hidden, expert width, experts, top-k)
    "olmoe": ("olmoe", 2048, 1024, 64, 8),
    "qwen3": ("qwen3_moe", 2048, 768, 128, 8),
    "tiny": ("olmoe", 256, 128, 16, 4),       # --quick
}
MIX = {2: 44, 4: 16, 6: 2, 8: 2}              # experts per width out of 64: 2.81 code bits, 3.0 stored (g128)
PROJ = ("gate_up_proj", "down_proj")
DEVICE = torch.device("cpu")                  # --device
EXTRA_OPTIONS: dict = {}                      # --cudagraphs


# ---- layers and variants --------------------------------------------------------------------------
def moe_layer(shape: str, seed: int = 0):
    kind, hidden, width, experts, top_k = SHAPES[shape]
    if kind == "olmoe":
        import transformers.models.olmoe.modeling_olmoe as m
        cfg = AutoConfig.for_model("olmoe", hidden_size=hidden, intermediate_size=width, num_experts=experts,
                                   num_experts_per_tok=top_k)
        block = m.OlmoeSparseMoeBlock(cfg)
    else:
        import transformers.models.qwen3_moe.modeling_qwen3_moe as m
        cfg = AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=width,
                                   num_experts=experts, num_experts_per_tok=top_k)
        block = m.Qwen3MoeSparseMoeBlock(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return huge_pages(block.to(DEVICE, torch.bfloat16).eval())


def huge_pages(module):
    """Every weight of module (a packed one's codes, scales and zeros) in huge pages, as the native kernel
    puts the weights it reads (dynamoq.native.huge_pages): on CPU every variant, bf16 included, runs from
    2 MB pages, so none is slower for want of them. Returns module."""
    if DEVICE.type != "cpu":
        return module
    for p in module.parameters():
        t = p.data
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if isinstance(t, _PackedWeight) else [t]
        for i in inner:
            if type(i) is torch.Tensor:        # (torchao's tensors: not reached into)
                dynamoq.native.huge_pages(i)
    return module


def with_impl(block, impl: str):
    """The same layer (weights shared) with another experts implementation."""
    b = copy.copy(block)
    b._modules = dict(block._modules)
    e = b._modules["experts"] = copy.copy(block.experts)
    e._parameters = dict(block.experts._parameters)
    e.config = copy.copy(block.experts.config)
    e.config._experts_implementation = impl
    return b


def mixed_bits(num_experts: int, seed: int = 0) -> list[int]:
    bits = [b for b, n in MIX.items() for _ in range(n * num_experts // 64)]
    bits += [2] * (num_experts - len(bits))
    random.Random(seed).shuffle(bits)
    return bits


def dynamoq_layer(block, bits, group_size: int = 128, cache: bool = False, switched_to: int | None = None):
    """Experts quantized to `bits`; with cache, each also keeps a switching cache of CACHE_FRACTION of its input
    channels (random ones), nothing switched; with switched_to as well, every expert is switched to that width
    (dynamoq.switching's re-quantization of the cached columns), the state a switched model decodes in."""
    cache = cache or switched_to is not None
    b = with_impl(block, "dynamoq")
    transposed = bool(block.experts.is_transposed)
    g = torch.Generator().manual_seed(0)
    for name in PROJ:
        w = block.experts._parameters[name].data
        cache_idx = None
        if cache:
            e, k = w.shape[0], w.shape[-2 if transposed else -1]
            r = max(1, math.ceil(CACHE_FRACTION * k))
            cache_idx = torch.stack([torch.randperm(k, generator=g)[:r].sort().values for _ in range(e)])  # [E, r]
        q = DynaMoExperts.from_float(w, bits, group_size, transposed=transposed, cache_idx=cache_idx)
        if switched_to is not None:
            q.cache_delta.copy_(torch.stack([switching._requantize(q, i, switched_to) for i in range(q.num_rows)]))
        b.experts._parameters[name] = torch.nn.Parameter(q, requires_grad=False)
    return huge_pages(b)


def cache_bits(layer) -> float:
    """Bits per expert weight the switching corrections read: the cached columns' deltas of the switched experts
    (the kernel skips an expert whose deltas are all zero)."""
    ws = [layer.experts._parameters[n] for n in PROJ]
    read = sum(d.numel() * d.element_size() for w in ws for d in w.cache_delta if d.any())
    return 8 * read / sum(w.numel() for w in ws)


def torchao_layer(block, config):
    """torchao weight-only on the experts' 3D parameters (FqnToConfig by parameter name). Its tensors
    implement neither bmm nor the transposes of grouped_mm, so the per-expert loop ("eager") runs them."""
    from torchao.quantization import FqnToConfig, quantize_
    b = with_impl(block, "eager")
    b.experts._parameters = {k: torch.nn.Parameter(v.data.clone(), requires_grad=False)
                             for k, v in block.experts._parameters.items()}
    quantize_(b, FqnToConfig({f"experts.{n}": config for n in PROJ}), filter_fn=None)
    return b


def variants(block, which):
    """name -> (layer, bits per expert weight of each expert, how it runs)."""
    num_experts = block.experts.gate_up_proj.shape[0]
    k = block.experts.gate_up_proj.shape[-1]
    out, failed = {}, {}
    for name in which:
        try:
            if name == "bf16 grouped_mm":
                out[name] = (with_impl(block, "grouped_mm"), [16.0] * num_experts)
            elif name == "bf16 batched_mm":
                out[name] = (with_impl(block, "batched_mm"), [16.0] * num_experts)
            elif name == "torchao int8":
                from torchao.quantization import Int8WeightOnlyConfig
                out[name] = (torchao_layer(block, Int8WeightOnlyConfig()), [8 + 16 / k] * num_experts)
            elif name == "torchao int4":
                from torchao.quantization import Int4WeightOnlyConfig
                out[name] = (torchao_layer(block, Int4WeightOnlyConfig(group_size=128)), [4 + 32 / 128] * num_experts)
            elif name.startswith("dynamoq"):
                bits = mixed_bits(num_experts) if "mixed" in name else [int(name.split()[1][0])] * num_experts
                layer = dynamoq_layer(block, bits, cache=name == CACHED, switched_to=8 if name == SWITCHED else None)
                extra = OVERHEAD_BITS_PER_GROUP / 128 + (cache_bits(layer) if name == SWITCHED else 0.0)
                out[name] = (layer, [b + extra for b in bits])
            else:
                raise ValueError(name)
        except Exception as e:       # a variant that does not run here is reported, not fatal
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out, failed


def storage_bits(layer) -> float:
    """Bits per expert weight a decode reads: codes, scales, zeros, and a switching cache's deltas (of a Stack: its
    first layer's)."""
    layer = layer.layers[0] if isinstance(layer, Stack) else layer
    ws = [layer.experts._parameters[n] for n in PROJ]
    if isinstance(ws[0], DynaMoExperts):
        cache = cache_bits(layer) if ws[0].cache_idx is not None else 0.0
        return 8 * sum(w.storage_bytes() for w in ws) / sum(w.numel() for w in ws) + cache
    return None


# ---- measuring ----------------------------------------------------------------------------------
def inputs(block, tokens: int, pool: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = block.experts.gate_up_proj.shape[-1]
    return [torch.randn(1, tokens, hidden, generator=g).to(DEVICE, torch.bfloat16) for _ in range(pool)]


def bytes_per_token(block, xs, expert_bits) -> float:
    """Expert weight bytes the calls read per token: each distinct routed expert once per call."""
    per_weight = block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
    total = 0.0
    with torch.no_grad():
        for x in xs:
            _, _, idx = block.gate(x.view(-1, x.shape[-1]))
            total += sum(expert_bits[e] * per_weight / 8 for e in idx.unique().tolist())
    return total / sum(x.shape[1] for x in xs)


INDUCTOR = "(Inductor loops)"                  # a variant name ending so: decode without the native kernel
CACHE_FRACTION = 0.01                          # the switching cache of DynaMoConfig's default cache_fraction
SWITCHED = "dynamoq mixed 2/4/6/8, switched (1% cache)"
CACHED = "dynamoq mixed 2/4/6/8, 1% cache, nothing switched"     # the kernel skips zero corrections: as without


NO_AMX = "(no AMX)"                            # ... the native kernel without its AMX path (prefill)
TRITON = "(Triton kernel)"                     # ... by the hand-written Triton kernels (GPU: triton_*.py)
STACK_LABEL = "per layer of a {}-layer stack"   # a row of --stack (appended to the variant's name)


@contextlib.contextmanager
def kernels_of(name: str):
    """The kernels a variant's name asks for (its suffix): Inductor's loops, the Triton kernels, or the defaults
    (the native kernel on CPU; on GPU Inductor's loops, and the grouped path for many pairs)."""
    with native_kernel(not name.endswith(INDUCTOR)), triton_kernel(name.endswith(TRITON)):
        yield


def compile_layer(layer, fullgraph: bool, name: str = ""):
    f = torch.compile(own_frame(layer), fullgraph=fullgraph, options={**dynamoq.compile_options(), **EXTRA_OPTIONS})

    # Per call only what the variant needs: each context manager entered per call cost microseconds from cold
    # caches (a 1-token layer, 1 thread: DynaMo mixed 1.65 -> 1.55 ms without the two that change nothing).
    def run(x):
        if not hasattr(x, "_dynamo_dynamic_indices"):
            torch._dynamo.mark_dynamic(x, 1)
        with torch.no_grad():
            if not name.endswith((INDUCTOR, NO_AMX, TRITON)):
                return f(x)
            no_amx = dynamoq.native.amx_min_pairs(2 ** 40) if name.endswith(NO_AMX) else contextlib.nullcontext()
            with kernels_of(name), no_amx:
                return f(x)
    return run


# torch.compile's own cost per call of a compiled frame (its Python entry, guards, the graph's wrapper), measured
# beside the 1-token layers with the same harness: a layer compiled on its own pays it on every call, a model
# compiled whole once per decode step. Reported in a note (FRAME_NOTE), not as a row.
FRAME_NOTE = "a compiled frame that only adds 1 to its input"


class _Frame(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states + 1


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# Read (not written) before every timed call on CPU: twice the last-level cache (32 MB here), so each call
# starts as a decode step's layer does, its weights out of the caches, and none starts with another
# variant's writes in them. Without it a call right after bf16 batched_mm's (which copies the routed
# experts, ~100 MB at OLMoE shape, into fresh buffers) paid for writing those lines back: the 1-token
# OLMoE-shaped DynaMo mixed layer took 1.78-1.81 ms run right after bf16's and 1.45-1.51 ms run after
# another variant's, same process (bf16 itself 4.45-4.64 ms either way).
EVICT_BYTES = 64 << 20


@functools.cache
def _evict_buffer() -> torch.Tensor:
    return torch.ones(EVICT_BYTES // 4)


def _evict():
    if DEVICE.type == "cpu":
        _evict_buffer().max()


def measure(fns: dict, xs: list, runs: int, reps: int = 1) -> dict:
    """Interleaved: every run calls each variant `reps` times on the same input (on a GPU, between two
    synchronizations: one sync per call would add its own latency to every variant), each after the same
    cache eviction (_evict, CPU); median seconds per call."""
    times = {k: [] for k in fns}
    for r in range(runs):
        x = xs[r % len(xs)]
        for k, f in fns.items():
            _evict()
            _sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                f(x)
            _sync()
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def rel_error(layer, f, x, name: str = "") -> float:
    """Compiled output against the same layer run eagerly: |y - y_eager| / |y_eager|; eager with the kernels of its
    name, but a Triton kernel's row against the default GPU paths (Inductor's loops for few pairs, fp32 products
    as the decode kernel's; the grouped path for many, 16-bit products as the grouped kernel's): they agree to
    rounding."""
    with torch.no_grad(), kernels_of(name.removesuffix(f" {TRITON}")):
        ref = layer(x).float()
    return ((f(x).float() - ref).norm() / ref.norm()).item()


def triton_kernels(f, x) -> int:
    """Triton kernels in the code Inductor generates while f(x) compiles (0 if nothing compiles).
    (Not torch._inductor.utils.run_and_get_code: it resets dynamo, dropping every variant's graphs.)"""
    from unittest import mock

    from torch._inductor.graph import GraphLowering
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        f(x)
    return sum(code.count("@triton.jit") for code in codes)


class Stack(torch.nn.Module):
    """Layers one after another with a residual sum, as in a model: compiled whole, one frame for all of them."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = hidden_states + layer(hidden_states)
        return hidden_states


def stacked(shape, names, depth: int):
    """(block, {name: (a Stack of `depth` distinct layers of that variant, bits of its first layer's experts)},
    failed): the stack mode's variants (--stack), each layer with its own weights (seeds 0 .. depth - 1)."""
    blocks = [moe_layer(shape, seed=i) for i in range(depth)]
    made = [variants(b, names) for b in blocks]
    layers = {n: (Stack([m[0][n][0] for m in made]), made[0][0][n][1]) for n in made[0][0]}
    return blocks[0], layers, made[0][1]


def run_shape(shape, args, rows, notes, on_rows=lambda: None):
    names = ["bf16 grouped_mm", "bf16 batched_mm", "torchao int8", "torchao int4", "dynamoq 4-bit",
             "dynamoq 3-bit", "dynamoq 2-bit", "dynamoq mixed 2/4/6/8", SWITCHED, CACHED]
    if DEVICE.type == "cpu" and dynamoq.native.available():      # the native decode kernel's A/B
        names.append(f"dynamoq mixed 2/4/6/8 {INDUCTOR}")
        if dynamoq.native.amx():                                 # and its AMX path's
            names.append(f"dynamoq mixed 2/4/6/8 {NO_AMX}")
    if DEVICE.type == "cuda":                                   # the hand-written Triton kernels' A/B
        names += [f"dynamoq 3-bit {TRITON}", f"dynamoq mixed 2/4/6/8 {TRITON}"]
        why = f"error vs eager of a {TRITON} row: against the default GPU paths run eagerly (its check of correctness)"
        notes += [why] if why not in notes else []
    if args.variants:                 # a name exactly, or a part of names
        names = [n for n in names if any(v == n or (v not in names and v in n) for v in args.variants)]
    if args.stack > 1:                # fullgraph variants only (torchao's break the graph)
        block, layers, failed = stacked(shape, [n for n in names if not n.startswith("torchao")], args.stack)
        note = (f"{STACK_LABEL.format(args.stack)}: {args.stack} layers of the shape, each with its own weights, one "
                f"after another with a residual sum, compiled as one frame (as a model compiled whole runs them): "
                f"per-layer ms is a call's time / {args.stack}, caches evicted before each call (so before its first "
                f"layer only); speedup against the faster bf16 stack")
        notes += [note] if note not in notes else []
    else:
        block = moe_layer(shape)
        layers, failed = variants(block, names)
    for name, why in failed.items():
        notes.append(f"{shape}: {name} does not run here: {why}")
        print(f"  {name}: does not run: {why}", flush=True)
    # torchao's layers run in a phase of their own, after a dynamo reset, with the bf16 layers again as their
    # reference: they break their graphs, so dynamo compiles the layer's inner frames, whose code every variant
    # shares, and a backend failure there makes dynamo run that code eagerly from then on, which would
    # silently turn every later variant eager too. Those shared frames take a cache entry per variant: the limit.
    phases = [[n for n in layers if not n.startswith("torchao")],
              [n for n in layers if n.startswith("bf16") or n.startswith("torchao")]]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        for phase in phases:
            if not any(n.startswith("torchao") for n in phase) and phase is phases[1]:
                continue
            torch._dynamo.reset()
            fns = {n: compile_layer(layers[n][0], fullgraph=not n.startswith("torchao"), name=n) for n in phase}
            for tokens in args.tokens:
                first = len(rows)
                _measure_phase(shape, threads, tokens, fns, layers, block, args, rows, notes,
                               report_bf16=phase is phases[0])
                for r in rows[first:] if args.stack > 1 else []:        # per layer of the stack
                    r.update(variant=f"{r['variant']}, {STACK_LABEL.format(args.stack)}", ms=r["ms"] / args.stack,
                             tokens_per_s=r["tokens_per_s"] * args.stack)
                on_rows()


def _measure_phase(shape, threads, tokens, fns, layers, block, args, rows, notes, report_bf16):
    xs = inputs(block, tokens, args.pool)
    ok, err = {}, {}
    if tokens == 1 and report_bf16 and DEVICE.type == "cpu" and args.stack <= 1:
        ok[FRAME_NOTE] = compile_layer(_Frame(), True)
        ok[FRAME_NOTE](xs[0])
    for name, f in fns.items():           # compile (and check) before timing
        try:
            t0 = time.perf_counter()
            if DEVICE.type == "cuda" and name.startswith("dynamoq") and (n := triton_kernels(f, xs[0])):
                notes.append(f"{shape}, {tokens} tokens, {name}: {n} Triton kernels in the graph compiled")
            f(xs[0])
            err[name] = rel_error(layers[name][0], f, xs[1 % len(xs)], name)
            ok[name] = f
            print(f"  {shape} {threads}t {tokens:4d} tok  ready {name} ({time.perf_counter() - t0:.0f} s, "
                  f"error vs eager {err[name]:.1e})", flush=True)
        except Exception as e:
            notes.append(f"{shape}, {threads} threads, {tokens} tokens: {name} failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}")
            traceback.print_exc()
    secs = measure(ok, xs, args.runs, args.reps)
    if FRAME_NOTE in secs:
        notes.append(f"{shape}, {threads} thread{'s' * (threads > 1)}, 1 token, {FRAME_NOTE}: "
                     f"{1e3 * secs.pop(FRAME_NOTE):.2f} ms a call, caches evicted as for the layers (torch.compile's "
                     f"entry, guards and graph wrapper, paid by every variant here; once per decode step by a model "
                     f"compiled whole)")
    bf16 = min(v for k, v in secs.items() if k.startswith("bf16"))
    for name, s in secs.items():
        if name.startswith("bf16") and not report_bf16:
            continue
        layer, ebits = layers[name]
        eff = storage_bits(layer) or statistics.mean(ebits)
        speedup = bf16 / s
        rows.append({"shape": shape, "threads": threads, "tokens": tokens, "variant": name,
                     "ms": 1e3 * s, "tokens_per_s": tokens / s, "speedup": speedup,
                     "effective_bits": eff, "bytes_per_token": bytes_per_token(block, xs, ebits),
                     "error_vs_eager": err[name],
                     "limit_fraction": speedup / (16 / eff)})
        print(f"  {shape} {threads}t {tokens:4d} tok  {name:24s} {1e3 * s:9.2f} ms  x{speedup:5.2f}", flush=True)


# ---- end to end ---------------------------------------------------------------------------------
def e2e_model(which: str):
    """-> (a function making the bf16 model on DEVICE, prompt ids [1, T]) or None when not available.
    "real": the real reference model; "olmoe": OLMoE-1B-7B's shape with E2E_LAYERS layers, random weights
    (for machines without the reference model's source, such as a GPU machine with no network)."""
    import transformers
    if which == "olmoe":
        cfg = AutoConfig.for_model("olmoe", hidden_size=2048, intermediate_size=1024, num_experts=64,
                                   num_experts_per_tok=8, num_hidden_layers=E2E_LAYERS, num_attention_heads=16,
                                   num_key_value_heads=16, vocab_size=50304)

        def make():
            torch.manual_seed(0)
            m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(DEVICE).eval()
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.02)
            return m
        return make, torch.randint(0, 50304, (1, 8), generator=torch.Generator().manual_seed(0))
    from dynamoq.reference import is_built, path_of
    path = path_of("real")
    if not is_built(path, "real"):
        return None
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = tok("The history of the city begins", return_tensors="pt").input_ids
    return (lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval(),
            prompt)


E2E_LAYERS = 4
E2E_WARMUP = 3             # first decode steps of each variant, which compile, left out of the median
ATTENTION_8 = "dynamoq mixed 2/4/6/8, 8-bit attention"   # the attention projections packed too (SwitchableLinear)
HEAD_8 = "dynamoq mixed 2/4/6/8, 8-bit attention and head"   # and the output head (lm_head_bits=8, untied)
# bf16 with each transformers experts implementation that decodes fast: grouped_mm (its default on CPU, which
# runs every expert's matmul, routed or not) and batched_mm (only the routed ones'); "vs bf16" is against the faster
E2E_BF16 = {"bf16 grouped_mm": "grouped_mm", "bf16 batched_mm": "batched_mm"}
E2E_PPL_TOKENS = 256         # tokens of drama's test split scored through the decode path (real model)


def forward_perplexity(model, ids) -> float:
    """Perplexity of ids [1, T] from one forward over all of it (eager)."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(ids.to(dev)).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(dev)).exp())


def decode_perplexity(model, ids) -> float:
    """Teacher-forced perplexity of ids [1, T] through the decode path: one token per step with a static
    cache (eager), so every expert product is a decode product (with the native kernel: int8 x)."""
    from transformers import StaticCache
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8)
    nll = 0.0
    with torch.no_grad():
        for i in range(ids.shape[1] - 1):
            logits = model(ids[:, i:i + 1], past_key_values=cache, cache_position=torch.tensor([i], device=dev)).logits
            nll -= torch.log_softmax(logits[0, -1].float(), -1)[ids[0, i + 1]].item()
    return float(torch.tensor(nll / (ids.shape[1] - 1)).exp())


def e2e(args, notes, rows: list, on_row=lambda: None) -> None:
    """Greedy decode, one token per step with a static cache, compiled decode step; bf16 against DynaMo
    mixed (~3 storage bits; also with 8-bit attention, and with the head at 8 bits too) and uniform 4-bit
    experts (group 64); appends to rows."""
    got = e2e_model(args.e2e_model)
    if got is None:
        notes.append("end-to-end: the real reference model is not built (python -m dynamoq.reference real)")
        return
    make, prompt = got
    held_out = None                       # real model: perplexity through the decode path, on a test text
    if args.e2e_model == "real":
        from transformers import AutoTokenizer

        from dynamoq.reference import path_of
        text = "\n".join(dynamoq.data.load("drama", "test"))
        held_out = AutoTokenizer.from_pretrained(path_of("real"))(text, return_tensors="pt").input_ids[:, :E2E_PPL_TOKENS]
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        labels = [*E2E_BF16, "dynamoq mixed 2/4/6/8", ATTENTION_8, HEAD_8, "dynamoq 4-bit"]
        if DEVICE.type == "cpu" and dynamoq.native.available():
            labels.append(f"dynamoq mixed 2/4/6/8 {INDUCTOR}")
        if DEVICE.type == "cuda":
            labels.append(f"dynamoq mixed 2/4/6/8 {TRITON}")
        torch._dynamo.reset()
        models = {}
        for label in labels:
            model = make()
            if label in E2E_BF16:
                model.set_experts_implementation(E2E_BF16[label])
            else:
                layers = {b.layer: b.num_experts for b in dynamoq.moe_blocks(model)}
                bits = {layer: (mixed_bits(e, seed=layer) if "mixed" in label else [4] * e) for layer, e in layers.items()}
                dynamoq.quantize_(model, dynamoq.DynaMoConfig(expert_bits=bits, group_size=64,
                                                              attention_bits=8 if label in (ATTENTION_8, HEAD_8) else None,
                                                              lm_head_bits=8 if label == HEAD_8 else None),
                                  progress=False)
            models[label] = huge_pages(model)
        # interleaved, one step of each variant in turn, so that the machine's drift meets them all alike
        decoders = {label: Decoder(m, prompt, args.e2e_tokens) for label, m in models.items()}
        times = {label: [] for label in labels}
        for _ in range(args.e2e_tokens):
            for label, d in decoders.items():
                with kernels_of(label):
                    times[label].append(d.step())
        for label, model in models.items():
            tps = 1 / statistics.median(times[label][E2E_WARMUP:])
            with kernels_of(label):
                ppl = (decode_perplexity(model, held_out) if held_out is not None and threads == args.threads[0]
                       and not label.endswith(INDUCTOR) else None)
            with native_kernel(False):         # the same weights, x in fp32: one forward over the text
                exact = forward_perplexity(model, held_out) if ppl is not None else None
            rep = dynamoq.bits_report(model) if label not in E2E_BF16 else {"storage_bits": 16.0}
            rows.append({"model": args.e2e_model, "threads": threads, "variant": label, "tokens_per_s": tps,
                         "expert_storage_bits": rep["storage_bits"], "text": decoders[label].tokens,
                         "decode_ppl": ppl, "forward_ppl": exact})
            print(f"  e2e {threads}t {label:24s} {tps:8.2f} tokens/s", flush=True)
            on_row()
        del models, decoders


# ---- report -------------------------------------------------------------------------------------
def table(rows, e2e_rows, notes) -> str:
    lines = ["| shape | threads | tokens | variant | ms | tokens/s | speedup vs bf16 | eff. bits | "
             "MB read / token | of memory-bound limit | error vs eager |", "|" + "---|" * 11] if rows else []
    for r in rows:
        err = f"{r['error_vs_eager']:.1e}" if "error_vs_eager" in r else "-"
        lines.append(f"| {r['shape']} | {r['threads']} | {r['tokens']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['effective_bits']:.2f} | "
                     f"{r['bytes_per_token'] / 1e6:.2f} | {100 * r['limit_fraction']:.0f}% | {err} |")
    if e2e_rows:
        model = {"olmoe": f"OLMoE-1B-7B shape, {E2E_LAYERS} layers, random weights"}.get(
            e2e_rows[0].get("model"), "real reference model")
        lines += ["", f"End-to-end greedy decode, {model} (compiled decode step, static cache):", "",
                  "| threads | experts | expert bits | decode tokens/s | vs the faster bf16 | perplexity through decode |",
                  "|---|---|---|---|---|---|"]
        base = {}
        for r in e2e_rows:                    # the fastest bf16 (older results: one row named "bf16")
            if r["variant"] == "bf16" or r["variant"] in E2E_BF16:
                base[r["threads"]] = max(base.get(r["threads"], 0.0), r["tokens_per_s"])
        for r in e2e_rows:
            ppl = (f"{r['decode_ppl']:.3f} (one forward, fp32 x: {r['forward_ppl']:.3f})" if r.get("decode_ppl")
                   else "-")
            lines.append(f"| {r['threads']} | {r['variant']} | {r['expert_storage_bits']:.2f} | "
                         f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base[r['threads']]:.2f}x | {ppl} |")
        if any(r.get("decode_ppl") for r in e2e_rows):
            lines += ["", f"Perplexity through decode: the first {E2E_PPL_TOKENS} tokens of drama's test split fed one "
                      "token per step (eager), so every expert product is a decode product (with the native kernel: "
                      "int8 x); in brackets the same weights in one forward over the text with x in fp32 (the "
                      "exact paths). bf16's two numbers differ by its own rounding alone."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def read_bandwidth(threads: int) -> float:
    """GB/s that `threads` cores read from memory here now (median sum of 1 GiB of float32): bf16 decode
    tracks it; a kernel closer to compute-bound does not, so its speedup over bf16 depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(2 ** 28)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return a.numel() * 4 / statistics.median(times) / 1e9


def _earlier(args) -> dict:
    path = RESULTS / f"{args.name}.json"
    if not path.exists():
        raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
    return json.loads(path.read_text())


# A run's own notes start with what it measured: (layer rows?, end-to-end rows?) -> label
NOTE_LABELS = {(True, False): "layer rows", (False, True): "end-to-end rows", (True, True): "layer and end-to-end rows"}


def _merged(earlier: dict, now: dict) -> dict:
    """now's rows, plus earlier's rows for the sizes and variants now did not measure (and earlier's
    end-to-end rows when now ran none); both commands are kept."""
    key = lambda r: (r["shape"], r["threads"], r["tokens"], r["variant"])
    measured = {key(r) for r in now["rows"]}
    keep = [r for r in earlier["rows"] if key(r) not in measured]
    # an earlier run's note goes when every kind of row it speaks of (its NOTE_LABELS label) has been replaced
    replaced = (not keep, bool(now["e2e"]))
    gone = tuple(label + " (" for kinds, label in NOTE_LABELS.items()
                 if all(r or not k for k, r in zip(kinds, replaced)))
    frames = tuple(n.split(FRAME_NOTE)[0] + FRAME_NOTE for n in now["notes"] if FRAME_NOTE in n)   # measured again
    earlier_notes = [n for n in earlier["notes"] if not n.startswith(gone) and not (frames and n.startswith(frames))]
    shapes = list(dict.fromkeys(r["shape"] for r in earlier["rows"] + now["rows"]))
    stack = STACK_LABEL.split("{")[0]            # a stack's rows after the single layers'
    rows = sorted(keep + now["rows"], key=lambda r: (shapes.index(r["shape"]), r["threads"], stack in r["variant"],
                                                     r["variant"].startswith("torchao"), r["tokens"]))
    return {**now, "rows": rows, "e2e": now["e2e"] or earlier["e2e"],
            "notes": earlier_notes + [n for n in now["notes"] if n not in earlier_notes],
            "commands": earlier.get("commands", [earlier["command"]]) + [now["command"]],
            "complete": now["complete"] and earlier["complete"]}


def save(name: str, result: dict) -> str:
    """recipes/results/NAME.json and NAME.md; returns the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    commands = "; then ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
    md = (f"<!-- written by recipes/bench_kernels.py; do not edit -->\nCommand: {commands} ({result['machine']}, "
          f"{result['date']}; wall-clock medians of interleaved calls)"
          f"{'' if result['complete'] else ' - INCOMPLETE: a run stopped before its end'}\n\n"
          + table(result["rows"], result["e2e"], result["notes"]) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    return md


def combine(name: str, files: list[str]) -> None:
    """NAME from result files of separate runs (as --merge would have made them, in the order given):
    for runs on a machine whose files come back one by one, such as a lent GPU."""
    results = [json.loads(Path(f).read_text()) for f in files]
    out = results[0]
    for r in results[1:]:
        out = _merged(out, r)
    print(save(name, out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["olmoe", "qwen3"], choices=sorted(SHAPES))
    p.add_argument("--tokens", nargs="*", type=int, default=[1, 4, 16, 128])
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    p.add_argument("--runs", type=int, default=21, help="timed calls per variant and size (median)")
    p.add_argument("--pool", type=int, default=8, help="distinct inputs cycled through (different routing)")
    p.add_argument("--variants", nargs="*", help="only these variants (a name exactly, or a part of names)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-tokens", type=int, default=48)
    p.add_argument("--e2e-model", choices=["real", "olmoe"], default=None,
                   help="real reference model (default on CPU) or an OLMoE-shaped one (default on GPU)")
    p.add_argument("--reps", type=int, default=None, help="calls per timed sample (default 1 on CPU, 10 on GPU)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 thread, few runs, no end-to-end")
    p.add_argument("--name", default="kernels_cpu")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of recipes/results/NAME.json for the shapes, threads, token counts and "
                        "variants (and the end-to-end rows) this run does not measure")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (threads then do not apply: reported as 0)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="GPU: replay each compiled graph as a CUDA graph (Inductor's triton.cudagraphs, what "
                        "mode='reduce-overhead' sets): no launch overhead per kernel")
    p.add_argument("--stack", type=int, default=1, metavar="L",
                   help="time each variant as L distinct layers compiled as one frame (as in a model: torch.compile's "
                        "entry paid once for L layers, each layer starting with the previous one's data in the "
                        "caches) and report per-layer rows")
    p.add_argument("--combine", nargs="+", metavar="FILE",
                   help="measure nothing: write NAME from these result files, merged in order")
    args = p.parse_args()
    if args.combine:
        return combine(args.name, args.combine)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.cudagraphs:
        EXTRA_OPTIONS["triton.cudagraphs"] = True
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        args.threads = [0]
    args.e2e_model = args.e2e_model or ("olmoe" if DEVICE.type == "cuda" else "real")
    args.reps = args.reps or (10 if DEVICE.type == "cuda" else 1)
    if args.quick:
        args.shapes, args.threads, args.tokens, args.runs, args.e2e = ["tiny"], [1], [1, 16], 5, False
    # The token count is marked dynamic (compile_layer): 1 token gets a graph of its own (size 1 is
    # specialized), the other decode sizes share one, prefill sizes a third. (Not backed_size_oblivious:
    # under it the decode / prefill choice is not guarded and every size would take the decode path.)
    rows, notes, e2e_rows = [], [], []
    command = "python recipes/bench_kernels.py " + shlex.join(sys.argv[1:])
    earlier = _earlier(args) if args.merge else {}
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if DEVICE.type == "cuda" else
               f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
               + "".join(f", {v}={os.environ[v]}" for v in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if v in os.environ))

    def write(done: bool) -> None:
        """Results so far (after every measured size, so a run killed midway leaves what it measured)."""
        result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine, "complete": done,
                  "rows": rows, "e2e": e2e_rows, "notes": notes, "mixed_bits_per_64_experts": MIX}
        if earlier:                    # --merge: the earlier run's rows for what this run did not measure
            result = _merged(earlier, result)
        md = save(args.name, result)
        if done:
            print(md)

    if DEVICE.type == "cpu":
        which = NOTE_LABELS.get((bool(args.shapes), bool(args.e2e)), "rows")
        notes.append(f"{which} (`{command}`, {time.strftime('%Y-%m-%d')}): memory read at the start "
                     "(torch sum of 1 GiB float32): " + ", ".join(
            f"{t} thread{'s' * (t > 1)} {read_bandwidth(t):.1f} GB/s" for t in args.threads if t))
    for shape in args.shapes:
        print(f"== {shape}", flush=True)
        run_shape(shape, args, rows, notes, on_rows=lambda: write(False))
    if args.e2e:
        e2e(args, notes, e2e_rows, on_row=lambda: write(False))
    write(True)


if __name__ == "__main__":
    main()
