"""The hand-written Triton kernels (dynamoq/triton_decode.py, dynamoq/triton_grouped.py) against the dequantized
weights, run by Triton's interpreter on CPU (TRITON_INTERPRET=1, in a subprocess: the variable must be set before
triton loads), and traced by torch.compile.
Where the triton package is not importable here, bash .ci/setup installs it into .ci/triton (the package alone:
this CPU torch needs nothing else from it), which this test puts on the subprocess's path."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("DYNAMOQ_TRITON_SITE", ROOT / ".ci" / "triton"))

CHECKS = r'''
import functools
import torch
from transformers import AutoConfig
import transformers.models.olmoe.modeling_olmoe as mo
from dynamoq import DynaMoExperts, kernels, triton_decode
from dynamoq.switching import _requantize

torch.manual_seed(0)
MIXED = (2, 3, 4, 6, 8, 4, 2, 3)
K, N = 384, 48                                      # N: one full block of rows and a partial one


def experts(bits, g, cache=0):
    w = torch.randn(len(bits), N, K)
    idx = torch.stack([torch.randperm(K)[:cache].sort().values for _ in bits]) if cache else None
    return DynaMoExperts.from_float(w, bits, g, cache_idx=idx)


def reference(t, x, ids):
    per = ids.shape[0] // x.shape[0]
    return torch.einsum("snk,sk->sn", t.dequantize_nk(torch.float32)[ids], x.float().repeat_interleave(per, 0))


def check(t, x, ids, what, kernel=triton_decode.linear):
    y, ref = kernel(t, x, ids), reference(t, x, ids)
    assert y.shape == ref.shape and y.dtype == torch.float32, (what, y.shape, y.dtype)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (what, (y - ref).abs().max().item())
    print("ok", what, flush=True)


for bits in [(2,) * 4, (3,) * 4, (4,) * 4, (6,) * 4, (8,) * 4, MIXED]:
    for g in (32, 128, 192):
        t = experts(bits, g)
        ids = torch.randint(0, len(bits), (6,))
        check(t, torch.randn(6, K), ids, f"bits {bits} g{g}, a row of x per pair")
        check(t, torch.randn(2, K).bfloat16(), ids, f"bits {bits} g{g}, bf16 x shared by 3 pairs")
t = experts(MIXED, 64, cache=5)
for e in range(0, t.num_rows, 2):                   # every other expert switched, as adapt_ does
    t.cache_delta[e].copy_(_requantize(t, e, 8 if t.expert_bits[e] < 8 else 2))
assert t.cache_delta.abs().sum() > 0
check(t, torch.randn(4, K), torch.tensor([0, 1, 2, 7]), "switched cache")
assert triton_decode.linear(t, torch.randn(0, K), torch.zeros(0, dtype=torch.long)).shape == (0, N)

# the grouped (prefill) kernel: pairs sorted by expert, an expert with none, one with more than a block of pairs
# (BLOCKS), fp32 and fp16 x (Triton 3.9's interpreter gets bf16 products wrong: bf16 x is computed in fp32 here)
from dynamoq import triton_grouped
check_grouped = functools.partial(check, kernel=triton_grouped.linear)

for bits in [(2,) * 4, (3,) * 4, (4,) * 4, (6,) * 4, (8,) * 4, MIXED]:
    for g in (16, 32, 192):
        t = experts(bits, g)
        ids = torch.cat([torch.zeros(20, dtype=torch.long), torch.randint(1, len(bits) - 1, (20,))])[torch.randperm(40)]
        check_grouped(t, torch.randn(40, K), ids, f"grouped, bits {bits} g{g}")
        check_grouped(t, torch.randn(20, K).half(), ids, f"grouped, bits {bits} g{g}, fp16 x shared by 2 pairs")
check_grouped(experts(MIXED, 32), torch.randn(10, K).bfloat16(), torch.randint(0, 8, (20,)), "grouped, bf16 x")
t = experts(MIXED, 64, cache=5)
for e in range(0, t.num_rows, 2):
    t.cache_delta[e].copy_(_requantize(t, e, 8 if t.expert_bits[e] < 8 else 2))
check_grouped(t, torch.randn(30, K), torch.randint(0, 8, (30,)), "grouped, switched cache")
assert triton_grouped.linear(t, torch.randn(0, K), torch.zeros(0, dtype=torch.long)).shape == (0, N)
t = experts(MIXED, 8)                               # groups of 8: too narrow for tl.dot, the grouped path instead
assert not triton_grouped.supports(t)
with kernels.native_kernel(False), kernels.triton_kernel(True):
    x, ids = torch.randn(40, K), torch.randint(0, 8, (40,))
    assert torch.allclose(kernels.expert_linear(t, x, ids), reference(t, x, ids), atol=1e-4, rtol=1e-4)

# gate_up with the gate (rows [gate; up]) and down with the routing weights' sum, switched cache included
for cache in (0, 5):
    t = experts(MIXED, 64, cache=cache)
    if cache:
        t.cache_delta[3].copy_(_requantize(t, 3, 8))
    x, ids = torch.randn(3, K), torch.randint(0, len(MIXED), (6,))              # 3 tokens, 2 pairs each
    ref = reference(t, x, ids)
    h = triton_decode.gated(t, x, ids)
    expect = torch.nn.functional.silu(ref[:, :N // 2]) * ref[:, N // 2:]
    assert h.shape == (6, N // 2) and torch.allclose(h, expect, atol=1e-4, rtol=1e-4), (h - expect).abs().max()
    weights = torch.rand(3, 2)
    xs = torch.randn(6, K)
    y = triton_decode.combined(t, xs, ids, weights)
    expect = (reference(t, xs, ids) * weights.reshape(-1, 1)).view(3, 2, N).sum(1)
    assert y.shape == (3, N) and torch.allclose(y, expect, atol=1e-4, rtol=1e-4), (y - expect).abs().max()
    print("ok gated and combined, cache", cache, flush=True)

# a whole MoE block through the experts implementation: the kernel in place of Inductor's loops, same result
cfg = AutoConfig.for_model("olmoe", hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2)
blk = mo.OlmoeSparseMoeBlock(cfg).eval()
for name in ("gate_up_proj", "down_proj"):
    w = getattr(blk.experts, name).data.normal_(0, 0.05)
    setattr(blk.experts, name, torch.nn.Parameter(DynaMoExperts.from_float(w, MIXED, 32), requires_grad=False))
blk.experts.config._experts_implementation = "dynamoq"
calls = []
real, real_grouped = triton_decode._call, triton_grouped.linear
triton_decode._call = lambda *a, **k: calls.append(k) or real(*a, **k)
triton_grouped.linear = lambda *a: calls.append("grouped") or real_grouped(*a)
# 5 tokens: two decode kernels (gate_up + gate, down + sum); 40 tokens (80 pairs, 8 experts): two grouped products
for tokens, expect_calls in ((5, [{"gated": True}, {"pairs": 2}]), (40, ["grouped", "grouped"])):
    x = torch.randn(1, tokens, 128)
    calls.clear()
    with torch.no_grad(), kernels.native_kernel(False):
        loops = blk(x)
        with kernels.triton_kernel(True):
            fused = blk(x)
    assert calls == expect_calls, calls
    assert torch.allclose(fused, loops, atol=1e-5, rtol=1e-4), (fused - loops).abs().max().item()
    print("ok block", tokens, "tokens", flush=True)

# whole tiny models of several families, quantized, a 3-token forward (the decode path) and a 40-token one (the
# grouped kernel): the same logits as Inductor's loops and the grouped path give; at decode, families that gate by
# default take the two fused kernels, the others one per projection
import sys
sys.path.insert(0, "tests")
import dynamoq
from families import tiny_config
from transformers import AutoModelForCausalLM
for mt, fused_path in [("mixtral", True), ("qwen2_moe", True), ("deepseek_v3", True), ("gpt_oss", False),
                       ("gemma4_text", False)]:
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(mt)).float().eval()
    bits = {b.layer: [(2, 3, 4, 8)[e % 4] for e in range(b.num_experts)] for b in dynamoq.moe_blocks(m)}
    dynamoq.quantize_(m, dynamoq.DynaMoConfig(expert_bits=bits, group_size=32), progress=False)
    for tokens in (3, 40):
        ids = torch.randint(1, 100, (1, tokens))
        with torch.no_grad(), kernels.native_kernel(False):
            loops = m(ids).logits
            calls.clear()
            with kernels.triton_kernel(True):
                logits = m(ids).logits
        if tokens == 3:
            assert calls and all(("gated" in c or "pairs" in c) == fused_path for c in calls), (mt, calls)
        else:
            assert calls and set(calls) == {"grouped"}, (mt, calls)
        assert torch.allclose(logits, loops, atol=1e-4, rtol=1e-4), (mt, tokens, (logits - loops).abs().max().item())
        print("ok family", mt, tokens, "tokens", flush=True)
'''

# torch.compile (fullgraph) of a block with the kernel on: the graph Inductor would get holds the two Triton kernels
# themselves (as on a GPU; traced only: without the interpreter, Triton cannot launch on CPU)
TRACE = r'''
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from transformers import AutoConfig
import transformers.models.olmoe.modeling_olmoe as mo
from dynamoq import DynaMoExperts, kernels

cfg = AutoConfig.for_model("olmoe", hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2)
blk = mo.OlmoeSparseMoeBlock(cfg).eval()
for name in ("gate_up_proj", "down_proj"):
    w = getattr(blk.experts, name).data
    setattr(blk.experts, name, torch.nn.Parameter(DynaMoExperts.from_float(w, (2, 3, 4, 6, 8, 4, 2, 3), 32),
                                                  requires_grad=False))
blk.experts.config._experts_implementation = "dynamoq"
kernels._TRITON_INTERPRET = True                     # the CPU tensors take the GPU's path
graphs = []


def backend(gm, example_inputs):
    def compiler(g, inputs):
        graphs.append(g)
        def run(*args):
            raise NotImplementedError("traced only")
        return run
    return aot_module_simplified(gm, example_inputs, fw_compiler=compiler)


for tokens in (5, 40):                               # decode (10 pairs), prefill (80 pairs: the grouped kernel)
    torch._dynamo.reset()
    graphs.clear()
    with torch.no_grad(), kernels.native_kernel(False), kernels.triton_kernel(True):
        try:
            x = torch.randn(1, tokens, 128)
            torch._dynamo.mark_dynamic(x, 1)        # the token count dynamic: symbolic sizes and grids
            torch.compile(blk, fullgraph=True, backend=backend)(x)
        except NotImplementedError:
            pass
    names = []
    for n in graphs[0].graph.nodes:
        if "triton_kernel_wrapper" in str(n.target):
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            names.append(getattr(k, "fn", k).__name__)      # (an autotuner holds the kernel as .fn)
    print(f"{tokens} tokens: graphs {len(graphs)} kernels {names}")
'''

# Both kernels compiled for an H100 / H200 (sm_90) by Triton's own compiler and ptxas, no GPU needed: what the
# interpreter does not check (types, layouts, shapes tl.dot accepts) fails here as it would on the device. Each
# tile the grouped kernel autotunes over fits in registers (no stack) at bf16 and groups of 128.
SM90 = r'''
import re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dynamoq import packing, triton_decode, triton_grouped

POINTERS = {"x": "*bf16", "xsum": "*fp32", "order": "*i64", "offs": "*i64", "ids": "*i64", "weights": "*fp32",
            "meta": "*i32", "scale": "*fp16", "zero": "*u8", "cache_idx": "*i64", "cache_delta": "*fp32",
            "y": "*fp32", **{f"q{b}": "*u8" for b in packing.BITS}}
CUOBJDUMP = f"{triton.__path__[0]}/backends/nvidia/bin/cuobjdump"


def stack_bytes(fn, consts, **options):
    """Compile fn for sm_90 with 16-byte aligned pointers and N a multiple of 16 (as a launch specializes them);
    -> bytes of stack (register spills) a thread."""
    sig = {a: "constexpr" if a in consts else POINTERS.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in POINTERS or a == "N"}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


def shape(gs, r=0, K=2048):
    return dict(triton_decode.layout(K // gs, gs), R=r)


print("tiles", len(triton_grouped.TILES))
for m, n, w, st in triton_grouped.TILES:
    consts = dict(shape(128), RP=16, F32=False, BM=m, BN=n)
    print("grouped", (m, n, w, st), "stack", stack_bytes(triton_grouped._grouped, consts, num_warps=w, num_stages=st))
POINTERS["x"] = "*fp32"
print("grouped fp32 x, cache", stack_bytes(triton_grouped._grouped, dict(shape(192, r=21), RP=32, F32=True, BM=16,
                                                                         BN=32), num_warps=4))
steps = {f"GB{b}": 1 for b in packing.BITS}
for gated, pairs in ((True, 0), (False, 8), (False, 0)):
    consts = dict(shape(128, r=21), RP=32, BLOCK=32, GATED=gated, PAIRS=pairs, **steps)
    print("decode", gated, pairs, "stack", stack_bytes(triton_decode._decode, consts, num_warps=4))
'''


def _env():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if importlib.util.find_spec("triton") is None:
        if not (SITE / "triton").is_dir():
            return None
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(script: str, interpret: bool) -> str:
    """script in a subprocess with triton importable (under its interpreter or not) -> its stdout."""
    env = _env()
    if env is None:
        pytest.skip(f"triton is not installed here nor in {SITE} (bash .ci/setup installs it there)")
    if not interpret:
        env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_triton_kernel_matches_the_dequantized_weights_under_the_interpreter():
    done = [line for line in _run(CHECKS, interpret=True).splitlines() if line.startswith("ok ")]
    assert len(done) == 6 * 3 * 2 + 1 + 6 * 3 * 2 + 2 + 2 + 2 + 5 * 2, done      # every case ran


def test_triton_kernel_lands_in_the_compiled_graph():
    out = _run(TRACE, interpret=False)
    # one graph each: gate_up's and down's decode kernel at 5 tokens, their grouped products at 40
    assert "5 tokens: graphs 1 kernels ['_decode', '_decode']" in out, out
    assert "40 tokens: graphs 1 kernels ['_grouped', '_grouped']" in out, out


def test_triton_kernels_compile_for_the_gpu_and_fit_in_registers():
    lines = _run(SM90, interpret=False).splitlines()
    tiles = [line for line in lines if line.startswith("grouped (")]
    assert tiles and f"tiles {len(tiles)}" in lines and all(line.endswith("stack 0") for line in tiles), lines
    assert any(line.startswith("grouped fp32 x, cache") for line in lines), lines
    assert sum(line.startswith("decode ") for line in lines) == 3, lines


def test_asking_for_the_triton_kernel_without_triton_says_what_is_missing(monkeypatch):
    import torch

    from dynamoq import DynaMoExperts, kernels
    t = DynaMoExperts.from_float(torch.randn(2, 32, 64), [2, 4], 32)
    monkeypatch.setattr(kernels, "triton_decode", None)
    monkeypatch.setattr(kernels, "_TRITON_INTERPRET", True)          # as on a GPU: the CPU tensors take the path
    with kernels.triton_kernel(True), pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.expert_linear(t, torch.randn(1, 64), torch.tensor([1]))
    assert kernels.expert_linear(t, torch.randn(1, 64), torch.tensor([1])).shape == (1, 32)   # TRITON off again
