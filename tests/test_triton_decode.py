"""The hand-written Triton decode kernel (dynamoq/triton_decode.py) against the dequantized weights, run by
Triton's interpreter on CPU (TRITON_INTERPRET=1, in a subprocess: the variable must be set before triton loads),
and traced by torch.compile.
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


def check(t, x, ids, what):
    y, ref = triton_decode.linear(t, x, ids), reference(t, x, ids)
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
x = torch.randn(1, 5, 128)
calls = []
real = triton_decode._call
triton_decode._call = lambda *a, **k: calls.append(k) or real(*a, **k)
with torch.no_grad(), kernels.native_kernel(False):
    loops = blk(x)
    with kernels.triton_kernel(True):
        fused = blk(x)
assert calls == [{"gated": True}, {"pairs": 2}], calls            # two kernels: gate_up + gate, down + sum
assert torch.allclose(fused, loops, atol=1e-5, rtol=1e-4), (fused - loops).abs().max().item()
print("ok block", flush=True)

# whole tiny models of several families, quantized, a 3-token forward (the decode path): the same logits as
# Inductor's loops give; families that gate by default take the two fused kernels, the others one per projection
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
    ids = torch.randint(1, 100, (1, 3))
    with torch.no_grad(), kernels.native_kernel(False):
        loops = m(ids).logits
        calls.clear()
        with kernels.triton_kernel(True):
            logits = m(ids).logits
    assert calls and all(("gated" in c or "pairs" in c) == fused_path for c in calls), (mt, calls)
    assert torch.allclose(logits, loops, atol=1e-4, rtol=1e-4), (mt, (logits - loops).abs().max().item())
    print("ok family", mt, flush=True)
'''

# torch.compile (fullgraph) of a block with the kernel on: the graph Inductor would get holds the two Triton kernels
# themselves (as on a GPU; traced only: without the interpreter, Triton cannot launch on CPU)
TRACE = r'''
import torch
from torch._functorch.aot_autograd import aot_module_simplified
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


with torch.no_grad(), kernels.native_kernel(False), kernels.triton_kernel(True):
    try:
        x = torch.randn(1, 5, 128)
        torch._dynamo.mark_dynamic(x, 1)            # the token count dynamic: symbolic sizes and grids
        torch.compile(blk, fullgraph=True, backend=backend)(x)
    except NotImplementedError:
        pass
print("graphs", len(graphs))
print("kernels", sum("triton_kernel_wrapper" in str(n.target) for n in graphs[0].graph.nodes))
'''


def _env():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if importlib.util.find_spec("triton") is None:
        if not (SITE / "triton").is_dir():
            return None
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_triton_kernel_matches_the_dequantized_weights_under_the_interpreter():
    env = _env()
    if env is None:
        pytest.skip(f"triton is not installed here nor in {SITE} (bash .ci/setup installs it there)")
    r = subprocess.run([sys.executable, "-c", CHECKS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    done = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == 6 * 3 * 2 + 4 + 5, done      # every case ran


def test_triton_kernel_lands_in_the_compiled_graph():
    env = _env()
    if env is None:
        pytest.skip(f"triton is not installed here nor in {SITE} (bash .ci/setup installs it there)")
    env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "-c", TRACE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "graphs 1" in r.stdout and "kernels 2" in r.stdout, r.stdout     # one graph, gate_up's and down's kernel


def test_asking_for_the_triton_kernel_without_triton_says_what_is_missing(monkeypatch):
    import torch

    from dynamoq import DynaMoExperts, kernels
    t = DynaMoExperts.from_float(torch.randn(2, 32, 64), [2, 4], 32)
    monkeypatch.setattr(kernels, "triton_decode", None)
    monkeypatch.setattr(kernels, "_TRITON_INTERPRET", True)          # as on a GPU: the CPU tensors take the path
    with kernels.triton_kernel(True), pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.expert_linear(t, torch.randn(1, 64), torch.tensor([1]))
    assert kernels.expert_linear(t, torch.randn(1, 64), torch.tensor([1])).shape == (1, 32)   # TRITON off again
