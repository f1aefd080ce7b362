"""The DynaMo baseline: allocation from an analysis, GPTQ on fused experts, through quantize_."""
import pytest
import torch
import torchao
from conftest import build, experts_calls, experts_errors

import dynamoq
from dynamoq import DynaMoConfig, QuantizationError
from dynamoq.analysis import AnalysisError
from dynamoq.gptq import FALLBACK, gptq
from dynamoq.packing import DATA_FREE, dequantize, quantize_rtn


def _x(n=512, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(n, k, generator=g) @ mix * torch.linspace(0.1, 3, k)   # correlated, uneven channels


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_output(act_order):
    w = torch.randn(64, 128)
    x = _x()
    h = (x.double().t() @ x.double())
    for bits in (2, 3, 4):
        codes, scale, zero, damp, _ = gptq(w, h, bits, 32, act_order=act_order)
        assert codes.min() >= 0 and codes.max() < 2 ** bits and damp == 0.01
        err_gptq = (x @ (dequantize(codes, scale, zero) - w).t()).pow(2).mean()
        err_rtn = (x @ (dequantize(*quantize_rtn(w, bits, 32)) - w).t()).pow(2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, err_gptq, err_rtn)


def test_gptq_damps_a_singular_hessian_and_refuses_a_hopeless_one():
    w = torch.randn(16, 64)
    x = _x(n=3, k=64)                                   # 3 tokens: rank-3 Hessian
    codes, scale, zero, damp, _ = gptq(w, x.double().t() @ x.double(), 3, 32)
    assert torch.isfinite(dequantize(codes, scale, zero)).all()
    with pytest.raises(QuantizationError, match="not positive definite"):
        gptq(w, -torch.eye(64, dtype=torch.float64), 3, 32)


def _data(model, seeds=(1, 2)):
    v = model.config.vocab_size
    return {f"d{s}": torch.randint(0, v, (8, 32), generator=torch.Generator().manual_seed(s)) for s in seeds}


def test_budget_mode_hits_the_target_and_gptq_beats_rtn():
    m = build("qwen3_moe")
    data = _data(m)
    analysis = dynamoq.analyze(m, data, progress=False)
    calls = experts_calls(m, torch.cat(list(data.values())))
    errs = {}
    for quantizer in ("rtn", "gptq"):
        q = build("qwen3_moe")
        dynamoq.quantize_(q, DynaMoConfig(analysis=analysis, target_bits=3.0, quantizer=quantizer, group_size=32),
                          progress=False)
        rep = dynamoq.bits_report(q)
        assert 2.9 <= rep["storage_bits"] <= 3.0
        assert rep["usage_bits"] is not None and 2.2 < rep["usage_bits"] < 8.8
        assert any(len(set(bits)) > 1 for bits in rep["experts"].values())      # really mixed
        errs[quantizer] = sum(e ** 2 for e in experts_errors(q, calls))
    assert errs["gptq"] < errs["rtn"], errs


def test_uniform_gptq_from_datasets_runs_the_analysis_first():
    m = build("mixtral")
    dynamoq.quantize_(m, DynaMoConfig(bits=3, datasets=_data(m), quantizer="gptq", group_size=32), progress=False)
    rep = dynamoq.bits_report(m)
    assert all(set(b) == {3} for b in rep["experts"].values())
    assert torch.isfinite(m(torch.randint(0, 128, (1, 8))).logits).all()


def test_fuzzy_mode_is_the_same_through_torchao_and_dynamoq():
    m = build("olmoe")
    analysis = dynamoq.analyze(m, _data(m), progress=False)
    a, b = build("olmoe"), build("olmoe")
    cfg = DynaMoConfig(analysis=analysis, allocation="fuzzy", group_size=32)
    dynamoq.quantize_(a, cfg, progress=False)
    torchao.quantization.quantize_(b, cfg, filter_fn=dynamoq.moe_filter)
    ra, rb = dynamoq.bits_report(a), dynamoq.bits_report(b)
    assert ra["experts"] == rb["experts"]
    assert all(set(bits) <= {2, 4, 6, 8} for bits in ra["experts"].values())


def test_frequency_ablation_allocates_differently_from_significance():
    m = build("qwen3_moe")
    analysis = dynamoq.analyze(m, _data(m, seeds=(1, 2, 3)), progress=False)
    from dynamoq.allocation import allocate
    sig = allocate(m, analysis, "budget", 32, 3.0, progress=False)
    freq = allocate(m, analysis, "frequency", 32, 3.0, progress=False)
    assert sig.keys() == freq.keys()
    flat = [b for bits in sig.values() for b in bits]
    assert min(flat) < max(flat)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_bits=1.5), "outside what 2 to 8-bit experts cost"),
    (dict(target_bits=2.1), "below what 2-bit experts cost"),
    (dict(quantizer="awq"), "unknown quantizer 'awq'"),
    (dict(allocation="budget"), "needs target_bits"),
])
def test_bad_baseline_configs_are_clear(kwargs, match):
    m = build("qwen3_moe")
    analysis = dynamoq.analyze(m, _data(m), progress=False)
    with pytest.raises(QuantizationError, match=match):
        dynamoq.quantize_(m, DynaMoConfig(analysis=analysis, group_size=32, **kwargs), progress=False)


def test_analysis_of_another_model_and_torchao_gptq_are_refused():
    m = build("qwen3_moe")
    other = dynamoq.analyze(build("mixtral"), _data(m), progress=False)
    with pytest.raises(AnalysisError, match="another model"):
        dynamoq.quantize_(m, DynaMoConfig(analysis=other, target_bits=3.0, group_size=32), progress=False)
    own = dynamoq.analyze(m, _data(m), progress=False)
    with pytest.raises(QuantizationError, match="use dynamoq.quantize_"):
        torchao.quantization.quantize_(m, DynaMoConfig(analysis=own, bits=3, quantizer="gptq", group_size=32),
                                       filter_fn=dynamoq.moe_filter)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        DynaMoConfig(bits=3, quantizer="gptq")


def test_gptq_serves_shared_experts_and_dense_layers_and_the_head_takes_the_fallback():
    m = build("deepseek_v3")                     # dense layer 0, MoE layer 1 with shared experts
    calls = experts_calls(m, torch.randint(0, 128, (2, 16)))
    ref = m.model.layers[0].mlp.gate_proj.weight.detach().clone()
    data = _data(m)
    head = m.lm_head.weight.detach().clone()
    dynamoq.quantize_(m, DynaMoConfig(bits=3, datasets=data, quantizer="gptq", shared_bits=3, dense_bits=3,
                                      lm_head_bits=8, group_size=32), progress=False)
    # the head: GPTQ's data-free fallback
    assert torch.equal(m.lm_head.weight.dequantize(), dequantize(*DATA_FREE[FALLBACK](head, 8, 32)))
    w = m.model.layers[0].mlp.gate_proj.weight
    assert w.bits == 3
    rtn = dequantize(*quantize_rtn(ref, 3, 32))
    assert not torch.equal(w.dequantize(), rtn)          # GPTQ moved it off the round-to-nearest grid point
    assert m.model.layers[1].mlp.shared_experts.up_proj.weight.bits == 3
    assert all(e < 1.0 for e in experts_errors(m, calls))


def test_experts_short_of_tokens_get_the_balanced_hessian_or_rtn(monkeypatch):
    """Every expert made 'short' (MIN_TOKENS above the token count): with balanced=True each is solved
    with X^T X of every token through it, computed only for those experts from the kept inputs (equal
    to the all-token sums of a balanced pass); with balanced=False each falls back to round-to-nearest."""
    from dynamoq import gptq as gq
    from dynamoq.calibration import collecting
    from dynamoq.quantize import DynaMoConfig as Cfg, plan

    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    block = dynamoq.moe_blocks(m)[0]
    with collecting(m, blocks=[block], hessian=True, keep_inputs=True) as hooks:
        m(w)
    hook = hooks[block.layer]
    x = torch.cat(hook.inputs).double()                                  # every token of layer 0, [T, H]
    ex = block.experts
    for e in (0, block.num_experts - 1):
        h = torch.nn.functional.silu(x @ ex.gate_up_proj[e].double().t().chunk(2, -1)[0]) * \
            (x @ ex.gate_up_proj[e].double().t().chunk(2, -1)[1])
        torch.testing.assert_close(hook.balanced_hessian(0, e), x.t() @ x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hook.balanced_hessian(1, e), h.t() @ h, rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(gq, "MIN_TOKENS", 10 ** 9)
    reports = {}
    for balanced in (True, False):
        q = build("qwen3_moe")
        reports[balanced] = gq.quantize_model(q, plan(q, Cfg(bits=3, group_size=32)), [w], 32, balanced=balanced,
                                              progress=False)
        if balanced:
            first = dynamoq.moe_blocks(q)[0].experts.gate_up_proj
    n_experts = sum(b.num_experts * len(b.projections) for b in dynamoq.moe_blocks(m))
    assert len(reports[True]["balanced_hessian"]) == n_experts and not reports[True]["fallback_rtn"]
    assert len(reports[False]["fallback_rtn"]) == n_experts and not reports[False]["balanced_hessian"]
    # expert 0 of layer 0 solved on the balanced Hessian of layer 0's inputs (the model is unchanged before it)
    h = hook.balanced_hessian(0, 0)
    codes, scale, zero, _, _ = gptq(block.experts.gate_up_proj[0].detach().float(), h, 3, 32)
    assert torch.equal(first.codes()[0], codes)


def test_an_expert_with_few_routed_tokens_gets_more_damping(monkeypatch):
    """quantize_model damps each expert's Hessian by at least TOKEN_DAMP x K / its routed tokens."""
    from dynamoq import gptq as gq
    from dynamoq.calibration import collecting
    from dynamoq.quantize import DynaMoConfig as Cfg, plan

    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    block = dynamoq.moe_blocks(m)[0]
    with collecting(m, blocks=[block]) as hooks:
        m(w)
    count = hooks[block.layer].stats.count
    monkeypatch.setattr(gq, "MIN_TOKENS", 1)
    calls = []
    real = gq.gptq
    monkeypatch.setattr(gq, "gptq", lambda w_nk, h, *a, **k: calls.append((w_nk.shape[-1], a[2])) or real(w_nk, h, *a, **k))
    q = build("qwen3_moe")
    gq.quantize_model(q, plan(q, Cfg(bits=3, group_size=32)), [w], 32, progress=False)
    k, damps = calls[0]                                        # layer 0's first projection
    routed = [int(c) for c in count if c >= 1]
    assert damps == [max(0.01, gq.TOKEN_DAMP * k / c) for c in routed]
    assert max(damps) > 0.01                                    # 64 tokens over a few experts: some damped more


def test_batched_gptq_equals_one_expert_at_a_time_and_damps_each_alone():
    """The experts of a projection are solved in one pass over the columns; every expert gets exactly
    the codes it would get alone, and only a Hessian that is not positive definite gets more damping."""
    torch.manual_seed(0)
    w = torch.randn(3, 16, 64)
    x = torch.randn(3, 200, 64)
    h = torch.einsum("btk,btj->bkj", x.double(), x.double())
    h[2] -= 1.5 * torch.linalg.eigvalsh(h[2])[0] * torch.eye(64, dtype=torch.float64)   # indefinite: more damping
    codes, scale, zero, used, _ = gptq(w, h, [2, 3, 4], 32)
    assert used[0] == used[1] == 0.01 and used[2] > 0.01
    for e, bits in enumerate([2, 3, 4]):
        c, s, z, d, _ = gptq(w[e], h[e], bits, 32)
        assert torch.equal(codes[e], c) and torch.equal(scale[e], s) and torch.equal(zero[e], z) and d == used[e]


def test_clipped_grid_beats_the_full_range_where_a_weight_stands_out():
    """A group with one large weight: the grid search shrinks the range (the outlier clips) and the
    weighted |error|^4 of the group falls."""
    from dynamoq.packing import searched_grid
    torch.manual_seed(0)
    w = torch.randn(1, 8, 64).clamp(-2, 2)
    w[0, :, 5] = 6.0                                    # one outlier per row
    qmax, weight = torch.tensor([[3.0]]), torch.ones(1, 1, 64)
    s, z = searched_grid(w, qmax, weight)
    full = (w.amax(-1) - w.amin(-1).clamp(max=0)) / 3
    assert (s < 0.9 * full).all()
    def err(s, z):
        q = torch.minimum((w / s[..., None]).round() + z[..., None], qmax[..., None]).clamp(min=0)
        return ((q - z[..., None]) * s[..., None] - w).pow(4).sum(-1)
    z_full = (-w.amin(-1).clamp(max=0) / full).round()
    assert (err(s, z) < err(full, z_full)).all()


def test_per_expert_damping_is_what_each_expert_alone_would_get():
    torch.manual_seed(0)
    w, x = torch.randn(2, 16, 64), torch.randn(2, 40, 64)          # 40 tokens: damping matters
    h = torch.einsum("btk,btj->bkj", x.double(), x.double())
    codes, _, _, used, _ = gptq(w, h, 3, 32, damp=[0.01, 1.0])
    assert used == [0.01, 1.0]
    for e, d in enumerate((0.01, 1.0)):
        assert torch.equal(codes[e], gptq(w[e], h[e], 3, 32, damp=d)[0])
    assert not torch.equal(codes[1], gptq(w[1], h[1], 3, 32, damp=0.01)[0])


def test_kept_columns_feed_no_error_forward_and_come_back_updated():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    h = x.t() @ x
    w = torch.randn(16, 64)
    col = 20                                        # small: its group's grid comes from the other columns
    w[:, col] = torch.rand(16) - 0.5
    w2 = w.clone()
    w2[:, col] = torch.rand(16) - 0.5               # another rounding error in that column only
    keep = torch.zeros(64, dtype=torch.bool)
    keep[col] = True
    a, b = gptq(w, h, 3, 32, keep=keep), gptq(w2, h, 3, 32, keep=keep)
    rest = ~keep
    assert torch.equal(a[0][:, rest], b[0][:, rest]) and torch.equal(a[1], b[1])
    # without keep the column's error moves the columns after it (the test can fail)
    assert not torch.equal(gptq(w, h, 3, 32)[0][:, col + 1:], gptq(w2, h, 3, 32)[0][:, col + 1:])
    # updated: the first column as given; later ones moved by the errors fed to them
    assert torch.equal(a[4][:, 0], w[:, 0]) and not torch.allclose(a[4][:, col], w[:, col])


def test_a_hessian_float32_cannot_factor_is_factored_in_float64():
    """Eight eigenvalues of 10^-7.5 (against 1): float32's Cholesky fails, float64's does not, and no damping is
    added (with damp=0 escalating it could not help: the factor would be refused)."""
    from dynamoq.gptq import _inverse_factor
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    e = torch.ones(64, dtype=torch.float64)
    e[:8] = 10 ** -7.5
    h = ((q * e) @ q.t()).float()
    h = (h + h.t()) / 2
    assert int(torch.linalg.cholesky_ex(h.flip(-2, -1))[1]) != 0          # float32 alone fails
    u, used = _inverse_factor(h[None], 0.0, 3)
    assert used == [0.0] and torch.isfinite(u).all()
    assert torch.equal(u[0], u[0].triu()) and (u[0].diagonal() > 0).all()
