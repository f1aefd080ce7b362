"""bits_report: what was done to a model, exactly, read from the tensors themselves."""
from __future__ import annotations

from torch import nn

from . import adapters
from .tensors import _PackedWeight


def _packed(module: nn.Module):
    for name, p in module.named_parameters():
        if isinstance(p, _PackedWeight):
            yield name, p


def bits_report(model: nn.Module) -> dict:
    """experts[layer]: bits of each expert; storage_bits: stored bits per expert weight (codes,
    scales and zeros); bytes: bytes of quantized expert storage; other: shared/dense weights."""
    experts, expert_bytes, expert_weights, projections = {}, 0, 0, {}
    for block in adapters.moe_blocks(model):
        per_expert = None
        for name, p in _packed(block.experts):
            expert_bytes += p.storage_bytes()
            expert_weights += p.numel()
            bits = list(p.expert_bits)
            if not block.adapter.fused:            # one SwitchableLinear per expert projection
                continue
            projections[f"{block.fqn}.experts.{name}"] = bits
            per_expert = per_expert or bits
        if not block.adapter.fused:
            per_expert = [next(p.bits for _, p in _packed(e)) if any(True for _ in _packed(e)) else None
                          for e in block.experts]
        experts[block.layer] = per_expert
    other = {n: {"bits": p.expert_bits[0], "bytes": p.storage_bytes()}
             for n, p in _packed(model) if not isinstance(p, type(None)) and p.ndim == 2
             and ".experts." not in f".{n}"}
    return {
        "experts": experts,
        "projections": projections,
        "storage_bits": 8 * expert_bytes / expert_weights if expert_weights else None,
        "bytes": expert_bytes,
        "weights": expert_weights,
        "other": other,
    }
