"""The fused expert kernels (dynamoq/kernels.py): the decode and prefill paths against the dequantized
reference, compiled with torch.compile (fullgraph, dynamic token count, no recompilation), switching."""
import gc
import json
import math
import re
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from transformers import AutoConfig

from dynamoq import DynaMoExperts, kernels, native
from dynamoq.switching import _requantize

MIXED = (2, 3, 4, 6, 8, 4, 2, 3)                    # every width, 8 experts


def _experts(bits, n=48, k=256, g=64, transposed=False, cache=0, dtype=torch.float32):
    w = torch.randn(len(bits), n, k, dtype=dtype)
    w = w.transpose(-1, -2).contiguous() if transposed else w
    cache_idx = torch.stack([torch.randperm(k)[:cache].sort().values for _ in bits]) if cache else None
    return DynaMoExperts.from_float(w, bits, g, transposed=transposed, cache_idx=cache_idx)


@pytest.fixture(params=["native", "masked", "split"])
def decode_mode(request, monkeypatch):
    """Decode: the native kernel (native.py, where the CPU has AVX2 or AVX-512 VNNI), or Inductor's loops with
    mixed widths in one loop nest per width over all pairs, masked, or split by width first
    (kernels.split_by_width: which one an expert's size and group size pick on CPU)."""
    if request.param == "native" and not native.available():
        pytest.skip("the native decode kernel does not run here (no AVX2 or no C compiler)")
    monkeypatch.setattr(kernels, "NATIVE", request.param == "native")
    monkeypatch.setattr(kernels, "split_by_width", lambda w, x: request.param == "split")
    return request.param


def test_split_by_width_picks_big_experts_in_groups_of_128_on_cpu():
    def t(n, k, g):
        return _experts(MIXED, n=n, k=k, g=g)
    x = torch.zeros(1, 8)
    assert kernels.split_by_width(t(2048, 768, 128), x)                    # Qwen3-30B-A3B's down_proj
    assert not kernels.split_by_width(t(576, 1536, 64), x)                 # the real reference model's
    assert not kernels.split_by_width(t(2048, 1024, 64), x)                # 8-byte lanes: masked
    assert not kernels.split_by_width(t(64, 256, 128), x)                  # small


def _decode(mode):
    """The few-pairs product of a decode mode: the native kernel, or Inductor's loops."""
    return kernels.native_linear if mode == "native" else kernels.decode_linear


def _reference(t, x, ids, mode=None):
    """The product with the dequantized weights; for the native kernel (mode "native"), with x as it
    quantizes it (int8 per group)."""
    if mode == "native":
        x = native.rounded_x(x, t.group_size)
    return torch.einsum("snk,sk->sn", t.dequantize_nk(torch.float32)[ids], x.float())


def _close(y, ref, mode=None, atol=1e-5, rtol=1e-4) -> bool:
    """Equal within fp32 rounding; with the native kernel (int8 x, against a path that keeps x in fp32)
    within 2% of the norm."""
    if mode == "native":
        return ((y - ref).norm() / ref.norm()).item() < 2e-2
    return torch.allclose(y, ref, atol=atol, rtol=rtol)


def _switch(t):
    """Move the cached columns of every other expert to another level, as adapt_ does."""
    for e in range(0, t.num_rows, 2):
        t.cache_delta[e].copy_(_requantize(t, e, 8 if t.expert_bits[e] < 8 else 2))


@pytest.mark.parametrize("bits", [(2,) * 4, (3,) * 4, (4,) * 4, (6,) * 4, (8,) * 4, MIXED])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_decode_and_prefill_paths_match_the_dequantized_weights(bits, g, decode_mode):
    t = _experts(bits, g=g)
    x = torch.randn(9, 256)
    ids = torch.randint(0, len(bits), (9,))
    ref = _reference(t, x, ids)
    assert torch.allclose(_decode(decode_mode)(t, x, ids), _reference(t, x, ids, decode_mode), atol=1e-4, rtol=1e-4)
    assert torch.allclose(kernels.grouped_linear(t, x, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("transposed", [False, True])
def test_transposed_layout_and_switching_cache(transposed, decode_mode):
    t = _experts(MIXED, transposed=transposed, cache=5)
    _switch(t)
    x, ids = torch.randn(6, 256), torch.tensor([0, 1, 2, 3, 4, 7])
    ref = _reference(t, x, ids)
    assert t.cache_delta.abs().sum() > 0
    assert torch.allclose(t.expert_linear(x, ids), _reference(t, x, ids, decode_mode), atol=1e-4, rtol=1e-4)
    assert torch.allclose(kernels.grouped_linear(t, x, ids), ref, atol=1e-4, rtol=1e-4)


def test_compiled_decode_is_one_loop_nest_without_per_pair_intermediates(decode_mode):
    """Mixed widths, bf16 activations: the compiled decode (one loop nest per width, masked or split)
    matches the reference, and nothing per pair and weight is materialized: the largest buffers are the
    [S, N, K/g] scales and x rearranged [S, K]."""
    t = _experts(MIXED, n=64, k=512, g=128, cache=4)
    x, ids = torch.randn(5, 512, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 4, 7])
    torch._dynamo.reset()
    y, codes = run_and_get_code(torch.compile(_decode(decode_mode), fullgraph=True), t, x, ids)
    assert torch.allclose(y, _reference(t, x, ids, decode_mode), atol=1e-3, rtol=1e-3)
    sizes = [math.prod(int(v) for v in m.split(",") if v.strip()) for code in codes
             for m in re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code)]
    assert max(sizes, default=0) <= max(5 * 64 * 4, 5 * 512), sizes


def test_prefill_dequantizes_a_few_experts_of_one_width_at_a_time(monkeypatch):
    """expert_chunks: every expert once, each step of one width and within CHUNK_BYTES of 16-bit weights;
    the chunked grouped product (eager and compiled) matches the reference, switching cache included."""
    t = _experts(MIXED, n=48, k=256, cache=5, dtype=torch.bfloat16)
    _switch(t)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 2 * 48 * 256 * 2 + 1)       # two experts per step
    chunks = kernels.expert_chunks(t, 2)
    assert sorted(e for c in chunks for e in c) == list(range(len(MIXED)))
    assert all(len(c) <= 2 and len({MIXED[e] for e in c}) == 1 for c in chunks)
    assert chunks == [[0, 6], [1, 7], [2, 5], [3], [4]]                       # widths 2, 3, 4, 6, 8
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    ids = torch.randint(0, len(MIXED), (40,))
    ref = _reference(t, x, ids)

    def close(y):        # the product runs in bf16, the model's dtype
        return ((y - ref).norm() / ref.norm()).item() < 5e-3
    assert close(kernels.grouped_linear(t, x, ids))
    torch._dynamo.reset()
    assert close(torch.compile(kernels.grouped_linear, fullgraph=True, options=kernels.compile_options())(t, x, ids))


def test_dequantize_experts_is_the_rows_of_the_full_dequantization():
    t = _experts(MIXED, cache=3)
    _switch(t)
    full = t.dequantize_nk(torch.float32)
    for experts in ([0, 6], [1], [2, 5], [5, 2], [7, 1]):                     # slices, gathers, any order
        assert torch.equal(t.dequantize_experts(experts, torch.float32), full[experts])
    with pytest.raises(AssertionError, match="several widths"):
        t.dequantize_experts([0, 1])


def test_compile_options_are_accepted_and_keep_the_result(decode_mode):
    t = _experts(MIXED, n=64, k=512, g=128)
    x, ids = torch.randn(5, 512), torch.tensor([0, 1, 2, 4, 7])
    torch._dynamo.reset()
    f = torch.compile(_decode(decode_mode), fullgraph=True, options=kernels.compile_options())
    assert torch.allclose(f(t, x, ids), _reference(t, x, ids, decode_mode), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("outputs, narrow", [(64, True), (256, True), (257, False)])
def test_narrow_products_compile_to_reductions(outputs, narrow):
    """compile_options' NarrowMatmul: a product with at most NARROW_MM_OUTPUTS outputs (a router) is a reduction
    in the graph's own loops, not an external mm; wider ones stay mm. Same values: fp32 sums rounded to bf16,
    also where what follows is fused with it (a router's softmax: Inductor would drop a plain round trip)."""
    torch.manual_seed(0)
    w = torch.randn(outputs, 512).bfloat16()
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.nn.functional.linear(x, w).float() * 1.0, options=kernels.compile_options())
    for tokens in (1, 7):
        x = torch.randn(tokens, 512).bfloat16()
        y, (code, *_) = run_and_get_code(f, x)
        assert ("extern_kernels.mm" not in code) == narrow, code
        assert torch.equal(y, y.bfloat16().float())                      # rounded to bf16 before the product
        exact = (x.float() @ w.float().t()).bfloat16().float()
        assert (y != exact).float().mean() < 0.01 and torch.allclose(y, exact, rtol=1e-2, atol=1e-2)


def _block(bits, cache=0, g=32):
    """A tiny OLMoE MoE block (8 experts, top-2) with packed experts and the dynamoq implementation."""
    import transformers.models.olmoe.modeling_olmoe as mo
    cfg = AutoConfig.for_model("olmoe", hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    blk = mo.OlmoeSparseMoeBlock(cfg).eval()
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(blk.experts, name).data.normal_(0, 0.05)
        cols = torch.stack([torch.randperm(w.shape[-1])[:cache].sort().values for _ in bits]) if cache else None
        q = DynaMoExperts.from_float(w, bits, g, cache_idx=cols)
        setattr(blk.experts, name, torch.nn.Parameter(q, requires_grad=False))
    blk.experts.config._experts_implementation = "dynamoq"
    return blk


def _graphs():
    return counters["stats"]["unique_graphs"]


def test_fullgraph_backed_token_count_one_graph_for_decode_one_for_prefill():
    """The token count marked dynamic (backed; from 2 tokens, since a size of 1 is specialized): decode
    sizes share one graph, prefill sizes a second, no graph break."""
    blk = _block(MIXED)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(blk, fullgraph=True)
    expected = {2: 1, 5: 1, 8: 1, 24: 2, 40: 2, 3: 2}    # tokens -> graphs so far (8 experts, top-2)
    with torch.no_grad():
        for tokens, graphs in expected.items():
            x = torch.randn(1, tokens, 128)
            torch._dynamo.mark_dynamic(x, 1)
            assert torch.allclose(f(x), blk(x), atol=1e-5, rtol=1e-4)
            assert _graphs() == graphs, tokens
    assert sum(counters["graph_break"].values()) == 0


def test_unbacked_token_count_one_graph_and_switching_does_not_recompile(decode_mode):
    """The token count unbacked: one graph for every size. Switching rewrites the cache tensors in place
    between calls: the compiled model sees it and recompiles nothing."""
    blk = _block(MIXED, cache=4)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(blk, fullgraph=True, options=kernels.compile_options())    # with its guard filter
    with torch.no_grad():
        for step, tokens in enumerate((1, 3, 24, 6)):
            if step == 2:
                for name in ("gate_up_proj", "down_proj"):
                    _switch(getattr(blk.experts, name))
            x = torch.randn(1, tokens, 128)
            torch._dynamo.decorators.mark_unbacked(x, 1)
            assert _close(f(x), blk(x), decode_mode)          # compiled: decode path; eager: grouped from 24
            assert _graphs() == 1
    assert sum(counters["graph_break"].values()) == 0
    assert blk.experts.gate_up_proj.cache_delta.abs().sum() > 0


def test_guard_filter_drops_implied_guards_and_a_new_layout_still_recompiles(decode_mode):
    """compile_options' guard filter drops only guards a packed weight's metadata implies (its inner tensors',
    its attributes' and its own tensor guard); its type and metadata guards stay, so a weight of other
    bit-widths, another group size or with a switching cache put in its place recompiles and gives that
    weight's result."""
    blk = _block(MIXED)
    kept = {}

    def record(entries):
        keep = kernels.guard_filter(entries)
        kept.update(((e.name, e.guard_type), k) for e, k in zip(entries, keep))
        return keep
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(blk, fullgraph=True, options={**kernels.compile_options(), "guard_filter_fn": record})
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        assert _close(f(x), blk(x), decode_mode)
        dropped = {n for (n, _), k in kept.items() if not k}
        for name in ("gate_up_proj", "down_proj"):
            w = f"_parameters['{name}']"
            assert {f"{w}.scale", f"{w}.zero", f"{w}.q2", f"{w}.expert_bits"} <= {n[n.rfind("_parameters"):] for n in dropped}
            own = {t: k for (n, t), k in kept.items() if n.endswith(w)}
            assert own["TYPE_MATCH"] and own["TENSOR_SUBCLASS_METADATA_MATCH"] and not own["TENSOR_MATCH"]
        assert all("_parameters['gate_up_proj']" in n or "_parameters['down_proj']" in n for n in dropped)
        for graphs, other in enumerate([_block((4,) * 8), _block(MIXED, g=64), _block(MIXED, cache=4)], 2):
            for name in ("gate_up_proj", "down_proj"):
                setattr(blk.experts, name, getattr(other.experts, name))
            assert _close(f(x), other(x), decode_mode)
            assert _graphs() == graphs


def test_guard_filter_a_weight_of_another_shape_recompiles():
    """Without the packed weight's own tensor guard (guard_filter) its shape and device are in the metadata
    guard: a weight of the same bit-widths and group size but other rows (N) or inputs (K) recompiles."""
    f = torch.compile(kernels.expert_linear, fullgraph=True, options=kernels.compile_options())
    ids = torch.tensor([0, 3, 5])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for graphs, (n, k) in enumerate([(48, 256), (32, 256), (48, 128)], 1):
            w, x = _experts(MIXED, n=n, k=k), torch.randn(3, k)
            assert w.__tensor_flatten__()[1]["shape"] == (8, n, k)
            y = f(w, x, ids)
            assert y.shape == (3, n) and _close(y, kernels.expert_linear(w, x, ids))
            assert _graphs() == graphs


def _bench():
    """recipes/bench_kernels.py as a module."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
    import bench_kernels
    return bench_kernels


def test_benchmark_variants_compile_frames_of_their_own():
    """recipes/_common.own_frame: each variant's compiled graphs live on a code object of its own (one
    variant's calls never check another's guards), it computes what the module does, and a variant
    dropped is freed (a wrapper with a globals dict of its own was kept alive by dynamo's guards)."""
    bench_kernels = _bench()
    from _common import own_frame
    blocks = [bench_kernels.with_impl(bench_kernels.moe_layer("tiny"), "batched_mm") for _ in range(2)]
    frames = [own_frame(b) for b in blocks]
    codes = [f.__code__ for f in frames]
    assert codes[0] is not codes[1] and all(c is not type(blocks[0]).forward.__code__ for c in codes)
    x = bench_kernels.inputs(blocks[0], 3, 1)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        for b, f in zip(blocks, frames):
            assert torch.allclose(torch.compile(f, fullgraph=True)(x).float(), b(x).float(), rtol=2e-2, atol=2e-3)
    assert [len(_debug_get_cache_entry_list(c)) for c in codes] == [1, 1]
    freed = weakref.ref(blocks[0])
    del blocks, frames, b, f
    gc.collect()
    assert freed() is None


def test_benchmark_stack_mode_chains_distinct_layers():
    """bench_kernels.py --stack: each variant as layers with weights of their own, summed into the residual as in a
    model; its bits are its first layer's."""
    bench_kernels = _bench()
    block, layers, failed = bench_kernels.stacked("tiny", ["bf16 batched_mm", "dynamoq mixed 2/4/6/8"], 3)
    assert not failed and set(layers) == {"bf16 batched_mm", "dynamoq mixed 2/4/6/8"}
    bf16, mixed = layers["bf16 batched_mm"][0], layers["dynamoq mixed 2/4/6/8"][0]
    assert len(bf16.layers) == 3 and torch.equal(bf16.layers[0].experts.down_proj, block.experts.down_proj)
    assert not torch.equal(bf16.layers[0].experts.down_proj, bf16.layers[1].experts.down_proj)
    x = bench_kernels.inputs(block, 2, 1)[0]
    with torch.no_grad():
        h = x
        for layer in bf16.layers:
            h = h + layer(h)
        assert torch.equal(bf16(x), h)
    assert bench_kernels.storage_bits(mixed) == bench_kernels.storage_bits(mixed.layers[0])
    assert bench_kernels.storage_bits(bf16) is None


def test_benchmark_switched_variant_decodes_in_a_switched_state():
    """recipes/bench_kernels.py's switched row: every expert keeps ceil(1%) of its input channels, switched to 8
    bits (nonzero corrections, so the layer differs from the unswitched one), the effective bits count the
    deltas a decode reads, and the compiled native path matches the layer run eagerly. Its cached row (nothing
    switched) reads no deltas and, on the native kernel, gives the plain layer's bits."""
    bench_kernels = _bench()
    block = bench_kernels.moe_layer("tiny")
    bits = bench_kernels.mixed_bits(block.experts.gate_up_proj.shape[0])
    plain = bench_kernels.dynamoq_layer(block, bits)
    switched = bench_kernels.dynamoq_layer(block, bits, switched_to=8)
    for name in bench_kernels.PROJ:
        w = switched.experts._parameters[name]
        k = w.shape[-2] if block.experts.is_transposed else w.shape[-1]
        assert w.cache_idx.shape == (len(bits), math.ceil(0.01 * k))
        assert w.cache_delta.abs().amax() > 0
    assert bench_kernels.storage_bits(switched) == pytest.approx(
        bench_kernels.storage_bits(plain) + bench_kernels.cache_bits(switched))
    assert bench_kernels.cache_bits(switched) > 0
    x = bench_kernels.inputs(block, 4, 1)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        eager, base = switched(x).float(), plain(x).float()
        compiled = bench_kernels.compile_layer(switched, fullgraph=True)(x).float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(compiled, eager) < 0.2 * rel(base, eager)    # the corrections are in the compiled path
    cached = bench_kernels.dynamoq_layer(block, bits, cache=True)     # the cached row: a cache, nothing switched
    assert cached.experts.gate_up_proj.cache_idx is not None and bench_kernels.cache_bits(cached) == 0
    assert bench_kernels.storage_bits(cached) == pytest.approx(bench_kernels.storage_bits(plain))
    if native.available():                                  # the kernel skips the zero corrections: the same bits
        with torch.no_grad():
            assert torch.equal(cached(x), plain(x))


def test_benchmark_merge_replaces_only_the_sizes_measured_again():
    """recipes/bench_kernels.py --merge: a re-run of some sizes replaces those rows and keeps the others."""
    bench_kernels = _bench()

    def row(shape, threads, tokens, variant, ms):
        return {"shape": shape, "threads": threads, "tokens": tokens, "variant": variant, "ms": ms}
    earlier = {"command": "first", "complete": True, "e2e": [{"threads": 1}], "notes": ["a"],
               "rows": [row("olmoe", 1, 1, "bf16", 1.0), row("olmoe", 1, 128, "bf16", 2.0),
                        row("olmoe", 1, 1, "torchao int8", 3.0), row("qwen3", 1, 128, "bf16", 4.0)]}
    now = {"command": "second", "complete": True, "e2e": [], "notes": ["a", "b"],
           "rows": [row("olmoe", 1, 128, "bf16", 5.0), row("qwen3", 1, 128, "bf16", 6.0)]}
    merged = bench_kernels._merged(earlier, now)
    assert [r["ms"] for r in merged["rows"]] == [1.0, 5.0, 3.0, 6.0]
    assert merged["commands"] == ["first", "second"] and merged["notes"] == ["a", "b"]
    assert merged["e2e"] == [{"threads": 1}]
    # a run that replaces every layer row drops the earlier runs' notes on layer rows, keeps the others
    earlier["notes"] = ["layer rows (`first`): 20 GB/s", "end-to-end rows (`e2e`): 30 GB/s", "a"]
    now["notes"] = ["layer rows (`second`): 25 GB/s"]
    now["rows"] = [{**r, "ms": 9.0} for r in earlier["rows"]]
    merged = bench_kernels._merged(earlier, now)
    assert merged["notes"] == ["end-to-end rows (`e2e`): 30 GB/s", "a", "layer rows (`second`): 25 GB/s"]
    assert [r["ms"] for r in merged["rows"]] == [9.0] * 4
    # the compiled frame's cost, measured again for a shape and thread count, replaces only that note
    frame = lambda shape, ms: f"{shape}, 1 thread, 1 token, {bench_kernels.FRAME_NOTE}: {ms} ms a call"
    earlier["notes"] = [frame("olmoe", 0.3), frame("qwen3", 0.4), "olmoe, 1 thread, 1 token: other"]
    now["notes"] = [frame("olmoe", 0.2)]
    merged = bench_kernels._merged(earlier, now)
    assert merged["notes"] == [frame("qwen3", 0.4), "olmoe, 1 thread, 1 token: other", frame("olmoe", 0.2)]


def test_benchmark_combine_writes_one_table_from_separate_runs(tmp_path, monkeypatch):
    """--combine FILE...: the results of separate runs (a GPU machine's, fetched one by one) merged in order
    into NAME.{json,md}; a run that stopped early marks the table incomplete."""
    bench_kernels = _bench()
    monkeypatch.setattr(bench_kernels, "RESULTS", tmp_path)

    def result(command, complete, rows, e2e=()):
        return {"command": command, "date": "d", "machine": "m", "complete": complete, "notes": [],
                "e2e": list(e2e), "rows": [{"shape": "olmoe", "threads": 0, "tokens": t, "variant": "bf16 grouped_mm",
                                            "ms": ms, "tokens_per_s": t / ms, "speedup": 1.0, "effective_bits": 16.0,
                                            "bytes_per_token": 1e6, "limit_fraction": 1.0} for t, ms in rows]}
    files = []
    for i, r in enumerate([result("a", False, [], [{"model": "olmoe", "threads": 0, "variant": "bf16",
                                                      "tokens_per_s": 9.0, "expert_storage_bits": 16.0}]),
                           result("b", True, [(1, 0.5)]), result("c", True, [(1, 0.25), (128, 2.0)])]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    bench_kernels.combine("gpu", [str(f) for f in files])
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["tokens"], r["ms"]) for r in out["rows"]] == [(1, 0.25), (128, 2.0)]
    assert out["commands"] == ["a", "b", "c"] and not out["complete"] and out["e2e"][0]["tokens_per_s"] == 9.0
    md = (tmp_path / "gpu.md").read_text()
    assert "INCOMPLETE" in md and "| olmoe | 0 | 128 | bf16 grouped_mm | 2.00 |" in md and "OLMoE-1B-7B shape" in md


def test_benchmark_quick_run_measures_and_checks_every_variant(tmp_path, monkeypatch):
    """recipes/bench_kernels.py --quick (the GPU script's code path, on CPU): rows for every size and
    variant asked, the compiled output checked against the eager layer, files written."""
    bench_kernels = _bench()
    monkeypatch.setattr(bench_kernels, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--quick", "--variants", "batched", "mixed",
                                      "--runs", "3", "--name", "quick"])
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    try:
        bench_kernels.main()              # sets 1 thread
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "quick.json").read_text())
    assert out["complete"]
    names = ["bf16 batched_mm", "dynamoq mixed 2/4/6/8", bench_kernels.SWITCHED, bench_kernels.CACHED]
    if native.available():             # and its A/B without the native kernel, and without its AMX path
        names.append("dynamoq mixed 2/4/6/8 (Inductor loops)")
        if native.amx():
            names.append("dynamoq mixed 2/4/6/8 (no AMX)")
    assert sorted((r["tokens"], r["variant"]) for r in out["rows"]) == sorted((t, n) for t in (1, 16) for n in names)
    for r in out["rows"]:
        assert r["error_vs_eager"] < 2e-2 and r["ms"] > 0
        assert r["effective_bits"] == 16.0 if r["variant"].startswith("bf16") else 2.5 < r["effective_bits"] < 3.5
    assert "| tiny | 1 | 16 | dynamoq mixed 2/4/6/8 |" in (tmp_path / "quick.md").read_text()
