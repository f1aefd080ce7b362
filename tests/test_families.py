"""Every MoE family of the installed transformers: supported (and checked) or refused with a reason."""
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build, experts_calls, experts_errors, tokens
from families import TINY
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import dynamoq
from dynamoq import DynaMoConfig, DynaMoExperts, UnsupportedModelError
from dynamoq.packing import OVERHEAD_BITS_PER_GROUP

REFUSED = {
    "dbrx": "2D \\[E\\*I, H\\] matrices",
    "longcat_flash": "zero-computation experts",
    "jetmoe": "has no MoE block",
}
IMPLEMENTATIONS = ("dynamoq", "eager", "batched_mm", "grouped_mm")
G = 32


def _has_experts_class(model_type: str) -> bool:
    models = Path(transformers.__file__).parent / "models"
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    for path in models.glob("*/modeling_*.py"):
        src = path.read_text()
        if re.search(rf"^class {cls}\(", src, re.M):
            return bool(re.search(r"^class \w+Experts\(", src, re.M))
    return False


def test_every_family_with_experts_is_listed():
    with_experts = {mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if _has_experts_class(mt)}
    missing = with_experts - set(TINY)
    assert not missing, f"MoE families with no tiny config in tests/families.py: {sorted(missing)}"
    supported = sorted(set(TINY) - set(REFUSED))
    print(f"\n{len(supported)} supported: {', '.join(supported)}")
    for mt, why in REFUSED.items():
        print(f"refused {mt}: {why}")
    assert len(supported) >= 50


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model_type", sorted(set(TINY) - set(REFUSED)))
def test_family_is_really_quantized_and_runs(model_type):
    x = tokens(build(model_type))
    calls = experts_calls(build(model_type), x)
    errors = {}
    for bits in (8, 4, 2):
        m = build(model_type)
        dynamoq.quantize_(m, DynaMoConfig(bits=bits, shared_bits=bits, group_size=G))
        errors[bits] = max(experts_errors(m, calls))
        with torch.no_grad():
            assert torch.isfinite(m(x).logits).all()
        if bits == 4:
            report = dynamoq.bits_report(m)
            blocks = dynamoq.moe_blocks(m)
            # every expert weight of every MoE block is packed, at the asked width
            for b in blocks:
                for p in b.projections:
                    w = getattr(b.experts, p.name)
                    assert isinstance(w, DynaMoExperts) and set(w.expert_bits) == {4}, (b.fqn, p.name)
            assert all(set(bs) == {4} for bs in report["experts"].values())
            assert len(report["experts"]) == len(blocks)
            # bytes measured from the tensors equal the formula
            assert report["bytes"] * 8 == report["weights"] * (4 + OVERHEAD_BITS_PER_GROUP / G)
            fused = [b for b in blocks if hasattr(b.experts, "has_gate")]
            if fused:   # every experts implementation of transformers runs on the packed weights
                outs = {}
                for impl in IMPLEMENTATIONS:
                    m.set_experts_implementation(impl)
                    with torch.no_grad():
                        outs[impl] = m(x).logits
                for impl in IMPLEMENTATIONS[1:]:
                    assert _rel(outs[impl], outs["dynamoq"]) < 1e-4, impl
    # 8-bit experts are close to the unquantized ones (bound: 1%); the error grows as bits fall
    assert errors[8] < 0.01, errors
    assert errors[8] < errors[4] < errors[2], errors


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_family_says_why(model_type):
    m = build(model_type)
    with pytest.raises(UnsupportedModelError, match=REFUSED[model_type]):
        dynamoq.quantize_(m, DynaMoConfig(bits=4, group_size=G))


def _calibrated(m, x, hessian=True, outputs=True):
    """Logits of one forward while collecting, and the statistics (tensors of each layer)."""
    from dynamoq.calibration import collecting
    with collecting(m, hessian=hessian, outputs=outputs) as hooks, torch.no_grad():
        logits = m(x).logits
    return logits, {layer: h.stats.tensors() for layer, h in hooks.items()}, hooks


@pytest.mark.parametrize("model_type", sorted(set(TINY) - set(REFUSED)))
def test_calibration_computes_the_experts_once_and_changes_nothing(model_type):
    """While collecting, the experts' forward is replaced by one that computes each projection once for
    the sums and the output: the logits are those of the model's own forward, and the sums those of the
    pre-forward hook that computes the projections again (forced here by a forward already wrapped, as
    accelerate's offload wraps it)."""
    m = build(model_type)
    x = tokens(m)
    refused = [b.adapter.calibration for b in dynamoq.moe_blocks(m) if b.adapter.calibration is not None]
    if refused:
        with pytest.raises(NotImplementedError, match=f"not supported yet: {re.escape(refused[0])}; quantize it data-free"):
            dynamoq.analyze(m, {"x": x}, progress=False)
        return
    with torch.no_grad():
        plain = m(x).logits
    logits, stats, hooks = _calibrated(m, x)
    assert all(h.replaced for h in hooks.values()), {k: h.replaced for k, h in hooks.items()}
    assert _rel(logits, plain) < 1e-5
    assert all("forward" not in vars(b.experts) for b in dynamoq.moe_blocks(m))    # put back
    for b in dynamoq.moe_blocks(m):
        b.experts.forward = b.experts.forward
    logits2, stats2, hooks2 = _calibrated(m, x)
    assert all(h.replaced is None for h in hooks2.values())                       # the pre-hook served
    assert torch.equal(logits2, plain)
    for layer, t in stats.items():
        for k, v in t.items():
            assert torch.allclose(v, stats2[layer][k], rtol=1e-5, atol=1e-6 * float(v.abs().max())), (layer, k)
    # outputs=False (GPTQ discards the collecting pass's output): the experts return zeros and skip their
    # down projections; the first MoE layer's sums are the same
    for b in dynamoq.moe_blocks(m):
        del b.experts.forward
    seen = []
    handle = dynamoq.moe_blocks(m)[0].experts.register_forward_hook(lambda mod, a, out: seen.append(out))
    _, stats3, _ = _calibrated(m, x, outputs=False)
    handle.remove()
    assert seen and all(not o.any() for o in seen)
    first = min(stats)
    for k, v in stats[first].items():
        assert torch.allclose(v, stats3[first][k], rtol=1e-5, atol=1e-6 * float(v.abs().max())), k


def test_calibration_keeps_a_forward_it_cannot_reproduce(monkeypatch):
    m = build("qwen3_moe")
    x = tokens(m)
    ref_stats = _calibrated(m, x)[1]
    cls = type(dynamoq.moe_blocks(m)[0].experts)
    own = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: 1.5 * own(self, *a, **k))
    with torch.no_grad():
        plain = m(x).logits
    with pytest.warns(UserWarning, match="could not reproduce Qwen3MoeExperts's forward"):
        logits, stats, hooks = _calibrated(m, x)
    assert all(h.replaced is False for h in hooks.values())
    assert torch.equal(logits, plain)
    first = min(stats)          # the first MoE layer's inputs do not depend on the patched forward
    assert torch.allclose(stats[first]["x2.0"], ref_stats[first]["x2.0"])
