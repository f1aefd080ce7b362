"""The native decode kernel (dynamoq/native.py; native_decode.c with AVX-512 VNNI, native_avx2.c with AVX2): exact
against the dequantized weights times x as it quantizes it, close to fp32 x, every width and layout, threads, both
builds where the CPU runs both, and its fallbacks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamoq import DynaMoExperts, kernels, native

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.available(), reason="the native kernel needs AVX2 (or AVX-512 VNNI) and a C compiler")]


def _run(t, x, ids, cache=False):
    widths = sorted(set(t.expert_bits))
    return native.native_decode(x, ids, [getattr(t, f"q{b}") for b in widths], list(t.expert_bits),
                                t.scale, t.zero, t.group_size, *((t.cache_idx, t.cache_delta) if cache else ()))


def _switched(bits, n, k, g, r, dtype=torch.float32):
    """Experts with r cached channels each, every one switched (8 bits, or 2 for the 8-bit ones), as adapt_ does."""
    from dynamoq.switching import _requantize
    idx = torch.stack([torch.randperm(k)[:r].sort().values for _ in bits])
    t = DynaMoExperts.from_float(torch.randn(len(bits), n, k, dtype=dtype), bits, g, cache_idx=idx)
    for e, b in enumerate(bits):
        t.cache_delta[e].copy_(_requantize(t, e, 8 if b < 8 else 2))
    assert t.cache_delta.abs().amax() > 0
    return t


def _dense(t, x, ids):
    return torch.einsum("snk,sk->sn", t.dequantize_nk(torch.float32).double()[ids], x.double()).float()


@pytest.mark.parametrize("n,k,g,bits", [
    (48, 576, 64, (2, 3, 4, 6, 8, 2)),       # the real reference model's gate_up: plane rows end mid-block
    (33, 1536, 64, (3, 6, 8)),               # its down_proj, an odd number of rows
    (16, 2048, 128, (2, 4)),                 # OLMoE's, 16-byte lanes
    (20, 192, 32, (2, 3, 4, 6, 8)),          # the smallest group with a 1-bit plane in whole int32 lanes
    (8, 384, 192, (4, 3)),                   # groups that straddle 64-byte blocks
])
@pytest.mark.parametrize("pairs", [0, 11, 70])     # 0: one pair per expert (decode); tiles of 1-4 pairs, row tails
@pytest.mark.parametrize("path", ["packed", "amx"])
def test_exact_against_the_dequantized_weights_times_the_int8_x(n, k, g, bits, pairs, path):
    """Both paths: the packed one (every expert; experts with one pair have their own loop), and AMX (every
    expert, where groups allow: multiples of 64)."""
    if path == "amx" and not native.amx():
        pytest.skip("this CPU or kernel has no AMX-INT8 (the packed path is tested)")
    torch.manual_seed(0)
    t = DynaMoExperts.from_float(torch.randn(len(bits), n, k), bits, g)
    ids = torch.randint(0, len(bits), (pairs,)) if pairs else torch.randperm(len(bits))
    x = 3 * torch.randn(len(ids), k)
    with native.amx_min_pairs(1 if path == "amx" else 2 ** 40):
        y = _run(t, x, ids)
    ref = _dense(t, native.rounded_x(x, g), ids)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6
    exact = _dense(t, x, ids)                         # against x itself: the int8 rounding of x
    assert 1e-4 < ((y - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("n,k,g,bits,r", [
    (48, 576, 64, (2, 3, 4, 6, 8, 2), 5),      # one chunk of cached channels, short
    (16, 2048, 128, (2, 4), 21),               # a 1% cache at OLMoE's width: a chunk and a tail
    (8, 384, 192, (4, 3), 33),                 # more than two chunks
])
@pytest.mark.parametrize("pairs", [0, 11, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["accumulators", "after", "amx"])
def test_switching_cache_is_exact_in_the_kernel(n, k, g, bits, r, pairs, dtype, path):
    """A switched expert's corrections, added in the tiles' accumulators (the packed path), to the stored outputs
    (cache_after: the AMX path's way), or on the AMX path: exact against the dequantized weights (the corrections
    included) times the int8 x, for 16-bit deltas and float32 ones (converted); without the cache it differs."""
    if path == "amx" and not native.amx():
        pytest.skip("this CPU or kernel has no AMX-INT8 (the packed path and cache_after are tested)")
    torch.manual_seed(0)
    t = _switched(bits, n, k, g, r, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    if dtype == torch.float32:
        t.cache_delta = t.cache_delta.float()
    assert t.cache_delta.dtype == dtype
    ids = torch.randint(0, len(bits), (pairs,)) if pairs else torch.randperm(len(bits))
    x = 3 * torch.randn(len(ids), k)
    with native.amx_min_pairs(1 if path == "amx" else 2 ** 40), native.cache_after(path == "after"):
        y = _run(t, x, ids, cache=True)
    ref = _dense(t, native.rounded_x(x, g), ids)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6
    assert ((_run(t, x, ids) - ref).norm() / ref.norm()).item() > 1e-3


def test_experts_whose_correction_is_zero_are_skipped_and_every_write_is_seen():
    """The operator skips experts whose cache_delta is all zero, judged once per version of the tensor: unswitched
    experts run as without a cache. Every in-place write (zero_, a view's copy_) is seen by the next call."""
    torch.manual_seed(0)
    bits = (2, 3, 4, 8)
    t = _switched(bits, 24, 256, 64, 7)
    switched = t.cache_delta.clone()
    ids, x = torch.randint(0, len(bits), (40,)), torch.randn(40, 256)
    plain = _run(t, x, ids)

    def exact() -> bool:
        ref = _dense(t, native.rounded_x(x, 64), ids)
        return ((_run(t, x, ids, cache=True) - ref).norm() / ref.norm()).item() < 1e-6
    assert exact()
    t.cache_delta.zero_()
    assert torch.equal(_run(t, x, ids, cache=True), plain)
    t.cache_delta[2].copy_(switched[2])                     # one expert, through a view
    assert exact() and not torch.equal(_run(t, x, ids, cache=True), plain)
    assert torch.equal(_run(t, x, ids, cache=True)[ids != 2], plain[ids != 2])
    t.cache_delta.copy_(switched)
    assert exact()


@pytest.mark.skipif(not native.amx(), reason="this CPU or kernel has no AMX-INT8")
def test_amx_and_packed_experts_in_one_call_agree_with_the_packed_path():
    """Experts with at least amx_min_pairs pairs take AMX, the others the packed path, in the same call; more
    than 16 pairs of one expert make several AMX tiles of pairs; 40 rows, two blocks and a tail of rows."""
    torch.manual_seed(1)
    bits = (3, 2, 4, 6, 8, 3)
    t = DynaMoExperts.from_float(torch.randn(len(bits), 40, 512), bits, 128)
    ids = torch.tensor([0] * 37 + [1] * 2 + [2] * 9 + [3] * 1 + [4] * 20 + [5] * 4)[torch.randperm(73)]
    x = torch.randn(73, 512, dtype=torch.bfloat16)
    with native.amx_min_pairs(4):
        mixed = _run(t, x, ids)
    with native.amx_min_pairs(2 ** 40):
        packed = _run(t, x, ids)
    ref = _dense(t, native.rounded_x(x, 128), ids)
    assert ((mixed - ref).norm() / ref.norm()).item() < 1e-6
    assert torch.allclose(mixed, packed, rtol=1e-5, atol=1e-4)


def test_int8_x_keeps_the_group_maximum_and_bounds_the_rounding():
    x = torch.randn(4, 256) * torch.logspace(-3, 3, 256)       # groups of very different magnitude
    x8, xs = native.quantize_x(x, 64)
    assert x8.abs().amax(-1).eq(127).all()
    assert ((native.rounded_x(x, 64) - x).abs() <= xs.repeat_interleave(64, 1) / 2 + 1e-12).all()


@pytest.mark.parametrize("min_pairs", [2 ** 40, 1])              # the packed path; AMX where the CPU has it
def test_threads_give_the_same_bits_and_bf16_x_works(min_pairs):
    t = DynaMoExperts.from_float(torch.randn(8, 256, 512), (2, 3, 4, 6, 8, 2, 3, 4), 128)
    x, ids = torch.randn(8, 512, dtype=torch.bfloat16), torch.arange(8)
    before = torch.get_num_threads()
    try:
        with native.amx_min_pairs(min_pairs):
            torch.set_num_threads(1)
            one = _run(t, x, ids)
            torch.set_num_threads(2)
            two = _run(t, x, ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and one.dtype == torch.float32
    assert torch.allclose(one, _dense(t, native.rounded_x(x, 128), ids), rtol=1e-5, atol=1e-4)


def test_no_pairs_and_out_of_range_ids():
    """No pairs: an empty result. Expert ids outside [0, E) are clamped (as the exact paths do): no stray read."""
    t = DynaMoExperts.from_float(torch.randn(3, 16, 64), (3, 2, 4), 32)
    assert _run(t, torch.randn(0, 64), torch.zeros(0, dtype=torch.long)).shape == (0, 16)
    x = torch.randn(2, 64)
    assert torch.equal(_run(t, x, torch.tensor([-5, 7])), _run(t, x, torch.tensor([0, 2])))


def test_an_x_that_needs_its_gradient_gets_the_same_result_and_backward_says_it_is_not_implemented():
    """The operator has no derivative: under grad mode with an x that requires grad (a plain forward of a model
    whose other weights train) it computes as without, and a backward through it raises."""
    t = DynaMoExperts.from_float(torch.randn(4, 32, 128), (2, 3, 4, 8), 64)
    x, ids = torch.randn(2, 128, requires_grad=True), torch.tensor([0, 3])
    for _ in range(2):                          # (the first call of a process may load the library)
        y = _run(t, x, ids)
        assert y.requires_grad
        with torch.no_grad():
            assert torch.equal(y, _run(t, x, ids)) and not _run(t, x, ids).requires_grad
        with pytest.raises(RuntimeError, match="not implemented"):
            y.sum().backward()


def test_layouts_it_does_not_take_fall_back_to_inductor_loops():
    t = DynaMoExperts.from_float(torch.randn(3, 16, 64), (3, 2, 4), 16)     # g16: a 1-bit plane has 2 bytes a group
    x, ids = torch.randn(2, 64), torch.tensor([0, 2])
    assert not native.supports(t.expert_bits, 16, 64) and native.supports((2, 4), 16, 64)
    assert not kernels.use_native(t, x)
    assert torch.allclose(kernels.expert_linear(t, x, ids), _dense(t, x, ids), atol=1e-4, rtol=1e-4)


def test_bad_calls_get_clear_errors():
    """The C++ kernel checks what the C kernel would read out of bounds."""
    t = DynaMoExperts.from_float(torch.randn(3, 16, 64), (3, 2, 4), 32)
    x, ids = torch.randn(2, 64), torch.tensor([0, 2])
    codes = [t.q2, t.q3, t.q4]
    with pytest.raises(ValueError, match="x has 32 inputs, the weight 64"):
        native.native_decode(torch.randn(2, 32), ids, codes, list(t.expert_bits), t.scale, t.zero, 32)
    with pytest.raises(ValueError, match="2 bit-widths for 3 experts"):
        native.native_decode(x, ids, codes, [3, 2], t.scale, t.zero, 32)
    with pytest.raises(ValueError, match="no codes for the 4-bit experts"):
        native.native_decode(x, ids, codes[:2], list(t.expert_bits), t.scale, t.zero, 32)
    with pytest.raises(ValueError, match="no layout for 5 bits"):
        native.native_decode(x, ids, codes, [3, 2, 5], t.scale, t.zero, 32)
    assert torch.allclose(native.native_decode(x.double(), ids.int(), codes, list(t.expert_bits), t.scale, t.zero, 32),
                          _run(t, x, ids))                 # other dtypes of x and ids are converted
    with pytest.raises(ValueError, match="3 pairs for 2 rows of x"):
        native.native_decode(x, torch.tensor([0, 1, 2]), codes, list(t.expert_bits), t.scale, t.zero, 32)
    idx, delta = torch.tensor([[1, 5]] * 3), torch.zeros(3, 16, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs both cache_idx and cache_delta"):
        native.native_decode(x, ids, codes, list(t.expert_bits), t.scale, t.zero, 32, idx)
    with pytest.raises(ValueError, match=r"cache_delta \[E, N, r\] = \[3, 16, r\]"):
        native.native_decode(x, ids, codes, list(t.expert_bits), t.scale, t.zero, 32, idx, delta[:, :8])
    with pytest.raises(ValueError, match=r"cached channel 64 outside \[0, 64\)"):
        native.native_decode(x, ids, codes, list(t.expert_bits), t.scale, t.zero, 32, idx + 59, delta)
    assert torch.equal(native.native_decode(x, ids, codes, list(t.expert_bits), t.scale, t.zero, 32, idx, delta),
                       _run(t, x, ids))                    # a zero correction changes nothing


def test_a_token_s_pairs_share_its_row_of_x():
    """x [T, K] with k pairs per token (ids [T k], token-major, as a router's): each pair reads its token's row,
    quantized once: the same bits as x repeated per pair, decode (one pair an expert) and tiles of several."""
    torch.manual_seed(0)
    t = DynaMoExperts.from_float(torch.randn(6, 48, 256), (2, 3, 4, 6, 8, 2), 64)
    for tokens, k in ((1, 4), (5, 3), (9, 6)):
        x = torch.randn(tokens, 256).bfloat16()
        ids = torch.stack([torch.randperm(6)[:k] for _ in range(tokens)]).reshape(-1)
        assert torch.equal(_run(t, x, ids), _run(t, x.repeat_interleave(k, dim=0), ids))


def _huge_kb(addr: int) -> int:
    """AnonHugePages (kB) of the mapping that holds addr, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_the_weights_it_reads_move_to_huge_pages_once_and_keep_their_values():
    """The first call reading a weight asks Linux for huge pages under it (once per buffer; values kept);
    DYNAMOQ_HUGE_PAGES=0 turns it off."""
    torch.manual_seed(0)
    t = DynaMoExperts.from_float(torch.randn(8, 1024, 4096), (2,) * 8, 128)     # q2: 8 MB, 3 aligned 2 MB pages
    x, ids = torch.randn(2, 4096), torch.tensor([1, 6])
    codes = t.q2.clone()
    assert not native.huge_pages_seen(t.q2)
    y = _run(t, x, ids)
    assert native.huge_pages_seen(t.q2) and native.huge_pages_seen(t.scale) and torch.equal(t.q2, codes)
    assert not native.huge_pages(t.q2)                      # once per buffer
    assert torch.equal(_run(t, x, ids), y)
    fresh = torch.ones(8 << 20, dtype=torch.uint8)
    if not native.huge_pages(fresh):
        pytest.skip("Linux refused MADV_COLLAPSE here (Linux < 6.1, or THP off): the weights stay in 4 KB pages")
    assert _huge_kb(fresh.data_ptr() + (4 << 20)) >= 2048 and int(fresh.sum()) == 8 << 20
    off = subprocess.run([sys.executable, "-c", "import torch; from dynamoq import native; "
                          "print('MOVED', native.huge_pages(torch.ones(8 << 20, dtype=torch.uint8)))"],
                         capture_output=True, text=True, env={**os.environ, "DYNAMOQ_HUGE_PAGES": "0"})
    assert "MOVED False" in off.stdout, off.stderr


def _probe(env) -> subprocess.CompletedProcess:
    code = ("import warnings; warnings.simplefilter('always'); from dynamoq import native; "
            "print('AVAILABLE', native.available(), 'AMX', native.amx())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_switched_off_or_without_a_compiler_it_is_unavailable_and_says_why(tmp_path):
    off = _probe({"DYNAMOQ_NATIVE": "0"})
    assert "AVAILABLE False" in off.stdout, off.stderr
    broken = _probe({"CC": "/bin/false", "DYNAMOQ_CACHE": str(tmp_path)})
    assert "AVAILABLE False" in broken.stdout and "native decode kernel is unavailable" in broken.stderr
    assert not list(tmp_path.rglob("*.so"))                 # nothing half-built left behind
    no_cxx = _probe({"CXX": "/bin/false", "DYNAMOQ_CACHE": str(tmp_path / "cxx")})     # the operator's C++ part
    assert "AVAILABLE False" in no_cxx.stdout and "native_op.cpp" in no_cxx.stderr, no_cxx.stderr
    no_amx = _probe({"DYNAMOQ_AMX": "0"})
    assert "AVAILABLE True AMX False" in no_amx.stdout, no_amx.stderr


_CASE = ("import torch; from safetensors.torch import save_file; from dynamoq import DynaMoExperts, native; "
         "from dynamoq.switching import _requantize; torch.manual_seed(0); "
         "t = DynaMoExperts.from_float(torch.randn(5, 24, 384), (2, 3, 4, 6, 8), 64, "
         "cache_idx=torch.stack([torch.randperm(384)[:11] for _ in range(5)])); "
         "[t.cache_delta[e].copy_(_requantize(t, e, 8 if e < 4 else 2)) for e in range(5)]; "
         "x = torch.randn(13, 384); ids = torch.cat([torch.arange(5), torch.tensor([0, 0, 1, 1, 1, 3, 3, 3])]); "
         "y = native.native_decode(x, ids, [getattr(t, f'q{b}') for b in (2, 3, 4, 6, 8)], list(t.expert_bits), "
         "t.scale, t.zero, 64, t.cache_idx, t.cache_delta); "
         "ref = torch.einsum('snk,sk->sn', t.dequantize_nk(torch.float32).double()[ids], "
         "native.rounded_x(x, 64).double()).float(); "
         "save_file({'y': y, 'ref': ref}, __import__('sys').argv[1]); print('ISA', native.isa())")


def _case_in(tmp_path, env: dict) -> tuple[str, dict]:
    """_CASE (decode, one pair per expert, and tiles of several pairs; every width; a switched cache) in a process with env ->
    (the build it ran, {"y", "ref"})."""
    from safetensors.torch import load_file
    out = tmp_path / f"y{len(list(tmp_path.iterdir()))}.safetensors"
    r = subprocess.run([sys.executable, "-c", _CASE, str(out)], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split("ISA ")[1].split()[0], load_file(out)


@pytest.mark.skipif(native.isa() != "avx512", reason="GFNI is an option of the AVX-512 build only")
def test_without_gfni_the_shift_and_mask_build_gives_the_same_bits(tmp_path):
    """DYNAMOQ_GFNI=0 builds the kernel without GFNI (CPUs without it: a shift and a mask per part of a code
    byte): bit-equal results, decode (one pair per expert) and tiles of several pairs."""
    (_, a), (_, b) = _case_in(tmp_path, {"DYNAMOQ_GFNI": "1"}), _case_in(tmp_path, {"DYNAMOQ_GFNI": "0"})
    assert torch.equal(a["y"], b["y"]) and a["y"].abs().sum() > 0


def test_every_build_this_cpu_runs_is_exact_and_they_agree(tmp_path):
    """The AVX2 build (native_avx2.c, DYNAMOQ_NATIVE=avx2) on any CPU that runs the kernel, the AVX-512 one where the
    CPU has it: each exact against the dequantized weights times the int8 x, so both agree but for float order."""
    runs = {name: _case_in(tmp_path, {"DYNAMOQ_NATIVE": name}) for name in native.BUILDS
            if native._cpu_ok(native.BUILDS[name][2])}
    assert "avx2" in runs and native.isa() in runs
    for name, (ran, out) in runs.items():
        assert ran == name and out["y"].abs().sum() > 0
        assert ((out["y"] - out["ref"]).norm() / out["ref"].norm()).item() < 1e-6, name
    ys = [out["y"] for _, out in runs.values()]
    assert all(torch.allclose(y, ys[0], rtol=1e-5, atol=1e-4) for y in ys)


@pytest.mark.parametrize("shape", [(3, 192), (2, 5, 192)])
def test_a_packed_linear_runs_it_with_its_bias(shape):
    """SwitchableLinear (attention, shared experts, dense MLPs): F.linear takes the kernel, as one expert
    whose pairs are the tokens; exact against the dequantized weight times the int8 x."""
    from dynamoq import SwitchableLinear
    torch.manual_seed(0)
    w = SwitchableLinear.from_float(torch.randn(40, 192), 4, 64)
    x, bias = torch.randn(shape), torch.randn(40)
    y = torch.nn.functional.linear(x, w, bias)
    x8 = native.rounded_x(x.reshape(-1, 192), 64).reshape(shape)
    torch.testing.assert_close(y, x8 @ w.dequantize().t() + bias, rtol=1e-5, atol=1e-4)
    with kernels.native_kernel(False):
        exact = torch.nn.functional.linear(x, w, bias)
    assert y.shape == exact.shape == (*shape[:-1], 40) and not torch.equal(y, exact)
    assert ((y - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("group_size", [32, 64])                  # 64: the prompt's experts take AMX, if any
def test_a_quantized_model_runs_it_for_prefill_and_decode_compiled_without_graph_breaks(group_size):
    """A tiny OLMoE, mixed widths: the native kernel for a prompt (many pairs) and for one token, eager and
    compiled (fullgraph), within int8 rounding of the exact paths."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    import dynamoq
    cfg = AutoConfig.for_model("olmoe", hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    dynamoq.quantize_(m, dynamoq.DynaMoConfig(expert_bits={i: [2, 3, 4, 8, 2, 6, 4, 3] for i in range(2)},
                                              attention_bits=8, group_size=group_size), progress=False)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(m, fullgraph=True)
    for n in (40, 1):
        x = torch.randint(0, 256, (1, n))
        with torch.no_grad():
            y = m(x).logits
            with kernels.native_kernel(False):
                exact = m(x).logits
            compiled = f(x).logits
        assert 0 < ((y - exact).norm() / exact.norm()).item() < 2e-2       # int8 x: close, not identical
        # compiled: the same kernel on x computed by fused code; a last-bit change of x can move its int8 rounding
        assert ((compiled - y).norm() / y.norm()).item() < 1e-2
    assert sum(counters["graph_break"].values()) == 0
