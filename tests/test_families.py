"""Every MoE family of the installed transformers: supported (and checked) or refused with a reason."""
import importlib.util
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
