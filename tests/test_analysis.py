import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build

import dynamoq
from dynamoq.analysis import Analysis, AnalysisError, analyze
from dynamoq.calibration import calibrate, sensitivity


def _windows(model, n=6, t=16, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _by_hand(model, windows):
    """Routing and inputs of every experts call, and the statistics they imply, computed naively."""
    calls = {}
    handles = []
    for b in dynamoq.moe_blocks(model):
        def hook(m, args, layer=b.layer):
            calls.setdefault(layer, []).append(tuple(a.detach().clone() for a in args[:3]))
        handles.append(b.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for b in dynamoq.moe_blocks(model):
        e_n = b.num_experts
        gu, down = b.experts.gate_up_proj.detach().double(), b.experts.down_proj.detach().double()
        count, weight = torch.zeros(e_n, dtype=torch.float64), torch.zeros(e_n, dtype=torch.float64)
        x2 = [torch.zeros(e_n, gu.shape[-1], dtype=torch.float64), torch.zeros(e_n, down.shape[-1], dtype=torch.float64)]
        for x, idx, w in calls[b.layer]:
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    xt = x[t].double()
                    g, u = (gu[e] @ xt).chunk(2)
                    h = torch.nn.functional.silu(g) * u
                    count[e] += 1
                    weight[e] += float(w[t, k])
                    x2[0][e] += xt ** 2
                    x2[1][e] += h ** 2
        out[b.layer] = (count, weight, x2)
    return out


def test_statistics_equal_a_naive_computation():
    m = build("qwen3_moe")
    w = _windows(m)
    stats = calibrate(m, w, batch_size=4, progress=False)
    for layer, (count, weight, x2) in _by_hand(m, w).items():
        s = stats[layer]
        assert torch.equal(s.count, count) and int(count.sum()) == w.numel() * 2   # top-2
        assert torch.allclose(s.weight, weight, rtol=1e-5)
        for p in range(2):
            assert torch.allclose(s.x2[p], x2[p], rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_statistics_do_not_depend_on_the_experts_implementation(impl):
    m = build("mixtral")
    w = _windows(m)
    ref = calibrate(m, w, progress=False)
    m.set_experts_implementation(impl)
    got = calibrate(m, w, progress=False)
    for layer in ref:
        for k, t in ref[layer].tensors().items():
            assert torch.allclose(got[layer].tensors()[k], t, rtol=1e-5), (impl, layer, k)


def test_statistics_under_accelerate_cpu_offload_are_the_same():
    from accelerate import cpu_offload
    m = build("olmoe")
    w = _windows(m)
    ref = calibrate(m, w, progress=False)
    cpu_offload(m, execution_device=torch.device("cpu"))
    assert m.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"   # really offloaded
    got = calibrate(m, w, progress=False)
    for layer in ref:
        for k, t in ref[layer].tensors().items():
            assert torch.allclose(got[layer].tensors()[k], t, rtol=1e-5), (layer, k)




def _sensitivity_by_hand(model, windows):
    """gx2 of every MoE layer from the model's own autograd for dL/d(experts output) and hand-written
    derivatives of a SiLU-gated expert, token by token."""
    calls, handles = {}, []
    for b in dynamoq.moe_blocks(model):
        def pre(m, args, layer=b.layer):
            calls[layer] = [a.detach().clone() for a in args[:3]]
        def post(m, args, out, layer=b.layer):
            out.register_hook(lambda g: calls[layer].append(g.detach().clone()))
        handles += [b.experts.register_forward_pre_hook(pre), b.experts.register_forward_hook(post)]
    out, tokens = {}, 0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1]
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        tokens += ids.shape[1] - 1
        for b in dynamoq.moe_blocks(model):
            x, idx, w, g = (t.double() for t in calls[b.layer])
            gu, down = b.experts.gate_up_proj.detach().double(), b.experts.down_proj.detach().double()
            acc = out.setdefault(b.layer, [torch.zeros(b.num_experts, gu.shape[-1], dtype=torch.float64),
                                           torch.zeros(b.num_experts, down.shape[-1], dtype=torch.float64)])
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e, v = int(idx[t, k]), w[t, k] * g[t]                   # dL/d(expert output)
                    a, up = (gu[e] @ x[t]).chunk(2)
                    sig = torch.sigmoid(a)
                    h = a * sig * up
                    dh = down[e].t() @ v
                    du = torch.cat([dh * up * sig * (1 + a * (1 - sig)), dh * a * sig])
                    acc[0][e] += du.pow(2).mean() * x[t] ** 2
                    acc[1][e] += v.pow(2).mean() * h ** 2
    for h in handles:
        h.remove()
    return out, tokens


def test_loss_sensitivity_equals_a_naive_computation():
    m = build("mixtral")
    w = _windows(m, n=3)
    got, tokens = sensitivity(m, w, batch_size=2, progress=False)
    assert all(p.grad is None for p in m.parameters())          # no parameter got a gradient
    assert all(p.requires_grad for p in m.parameters())         # and they are left as they were
    ref, ref_tokens = _sensitivity_by_hand(m, w)
    assert tokens == ref_tokens == 3 * 15
    for layer, sums in ref.items():
        for p in range(2):
            assert (sums[p] > 0).any()
            assert torch.allclose(got[layer][p], sums[p], rtol=1e-3, atol=1e-12), (layer, p)


def test_loss_sensitivity_under_accelerate_cpu_offload_is_the_same():
    from accelerate import cpu_offload
    m = build("olmoe")
    w = _windows(m, n=2)
    ref, _ = sensitivity(m, w, progress=False)
    cpu_offload(m, execution_device=torch.device("cpu"))
    got, _ = sensitivity(m, w, progress=False)
    for layer in ref:
        for p in range(2):
            assert torch.allclose(got[layer][p], ref[layer][p], rtol=1e-5), (layer, p)


def test_the_pass_with_gradients_is_optional_and_the_allocation_says_what_it_misses():
    m = build("mixtral")
    w = _windows(m, n=4)
    a = analyze(m, {"x": w}, sensitivity_tokens=20, progress=False)
    assert a.has_sensitivity and int(a.stats["x"][0].grad_tokens) == 2 * 15      # two whole windows
    b = analyze(m, {"x": w}, sensitivity_tokens=0, progress=False)
    assert not b.has_sensitivity
    with pytest.raises(AnalysisError, match="sensitivity_tokens"):
        b.loss_significance("x")
    with pytest.warns(UserWarning, match="no loss sensitivity"):
        dynamoq.allocation.allocate(m, b, "budget", 32, 3.0, progress=False)
    with pytest.raises(AnalysisError, match="sensitivity_tokens=-1"):
        analyze(m, {"x": w}, sensitivity_tokens=-1, progress=False)

def test_an_expert_without_tokens_gets_a_reported_fallback_never_nan():
    m = build("qwen3_moe")
    w = _windows(m, n=4)
    # make expert 3 of layer 0 unreachable: its router row gives a huge negative logit for every input
    with torch.no_grad():
        m.model.layers[0].mlp.gate.weight[3] = 0.0
    hook = m.model.layers[0].mlp.gate.register_forward_hook(
        lambda mod, a, out: (out[0], *_mask_expert(out[1:], 3)))
    for balanced in (False, True):
        a = analyze(m, {"x": w}, balanced=balanced, progress=False)
        assert a.stats["x"][0].count[3] == 0
        fb = [f for f in a.fallbacks() if f["layer"] == 0 and f["expert"] == 3]
        assert fb and fb[0]["fallback"] == ("balanced" if balanced else "layer-average")
        for t in a.channel_significance("x")[0]:
            assert torch.isfinite(t).all() and (t[3] > 0).all()
        if balanced:   # every token went through expert 3 for the balanced sums
            assert torch.allclose(a.stats["x"][0].all_x2[0][3], a.stats["x"][0].all_x2[0][0])
    hook.remove()


def _mask_expert(scores_and_idx, expert):
    scores, idx = scores_and_idx
    # route what went to `expert` to the next expert instead (keeps top-k shape)
    idx = torch.where(idx == expert, (idx + 1) % 4, idx)
    idx = torch.where((idx == expert), idx, idx)
    return scores, idx


def test_analysis_saves_and_loads_without_recalibrating(tmp_path):
    m = build("deepseek_v3")
    a = analyze(m, {"code": _windows(m, seed=1), "prose": _windows(m, seed=2)}, progress=False)
    a.save(tmp_path / "an")
    meta = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert meta["datasets"] == ["code", "prose"] and meta["version"] == 1
    b = Analysis.load(tmp_path / "an")
    b.check_model(m)
    for d in ("code", "prose"):
        for layer in a.layers:
            for k, t in a.stats[d][layer].tensors().items():
                assert torch.equal(b.stats[d][layer].tensors()[k], t)
    syn_a, syn_b = a.synthesized(lam=0.5), b.synthesized(lam=0.5)
    assert all(torch.equal(syn_a[k], syn_b[k]) for k in syn_a)
    for layer, s in a.expert_significance("code").items():
        assert float(s.sum()) == pytest.approx(1.0)
    assert a.layers == [1]                                   # layer 0 is dense
    assert a.usage()[1].sum() == pytest.approx(1.0)


def test_an_analysis_of_another_model_is_refused(tmp_path):
    m = build("qwen3_moe")
    a = analyze(m, {"x": _windows(m)}, progress=False)
    with pytest.raises(AnalysisError, match="made on another model"):
        a.check_model(build("deepseek_v3"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "analysis.json").write_text("{}")
    with pytest.raises(AnalysisError, match="cannot read|format"):
        Analysis.load(tmp_path / "bad")


def test_bad_input_gets_clear_errors():
    m = build("qwen3_moe")
    with pytest.raises(AnalysisError, match="at least one dataset"):
        analyze(m, {}, progress=False)
    with pytest.raises(AnalysisError, match="dataset 'tiny'"):
        analyze(m, {"tiny": torch.zeros(0, 16, dtype=torch.long)}, progress=False)
    with pytest.raises(AnalysisError, match="vocabulary size"):
        analyze(m, {"oob": torch.full((2, 16), 10_000)}, progress=False)
    with torch.no_grad():
        m.model.layers[1].mlp.experts.down_proj.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        analyze(m, {"x": _windows(m)}, progress=False)


WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import build
import dynamoq
dist.init_process_group("gloo")
m = build("qwen3_moe")
w = torch.randint(0, m.config.vocab_size, (7, 16), generator=torch.Generator().manual_seed(0))
dynamoq.generated.SEQ_LEN = 32
a = dynamoq.analyze(m, {{"x": w, "one": w[:1]}}, generated_tokens=256, progress=False)
open(os.path.join({out!r}, f"rank{{dist.get_rank()}}of{{dist.get_world_size()}}"), "w").write("ran")
if dist.get_rank() == 0:
    a.save(os.path.join({out!r}, "dist"))
dist.destroy_process_group()
"""


def test_two_processes_give_the_statistics_of_one(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0of2").exists() and (tmp_path / "rank1of2").exists()   # two ranks really ran
    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (7, 16), generator=torch.Generator().manual_seed(0))
    # a dataset of one window (a process without any adds zeros) and the model's own text (the same
    # sequences and groups in every process) too
    monkeypatch.setattr(dynamoq.generated, "SEQ_LEN", 32)
    one = analyze(m, {"x": w, "one": w[:1]}, generated_tokens=256, progress=False)
    two = Analysis.load(tmp_path / "dist")
    assert two.datasets == one.datasets and len(one.datasets) > 3
    assert two.meta["dataset_weights"] == one.meta["dataset_weights"]
    for d in one.datasets:
        assert torch.equal(two.windows[d], one.windows[d])
        for layer in one.layers:
            for k, t in one.stats[d][layer].tensors().items():
                # float32 products batched otherwise differ in the last bits; a lost or doubled window would not
                assert torch.allclose(two.stats[d][layer].tensors()[k], t, rtol=1e-5, atol=1e-9), (d, layer, k)


def test_shared_experts_and_dense_layers_get_statistics_too(tmp_path):
    m = build("deepseek_v3")                      # layer 0 dense, layer 1 MoE with shared experts
    w = _windows(m)
    a = analyze(m, {"x": w}, progress=False)
    lin = a.linear_stats("x")
    assert "model.layers.0.mlp.gate_proj" in lin and "model.layers.1.mlp.shared_experts.down_proj" in lin
    s = lin["model.layers.0.mlp.gate_proj"]
    assert int(s.count) == w.numel() and s.x2[0].shape == (1, 64) and (s.x2[0] > 0).all()
    a.save(tmp_path / "a")
    b = Analysis.load(tmp_path / "a")
    assert torch.equal(b.linear_stats("x")["model.layers.1.mlp.shared_experts.down_proj"].x2[0],
                       lin["model.layers.1.mlp.shared_experts.down_proj"].x2[0])
