"""bits_report: what was done to a model, exactly, read from the tensors themselves."""
from __future__ import annotations

from torch import nn

from . import adapters
from .packing import OVERHEAD_BITS_PER_GROUP
from .tensors import _PackedWeight


def _packed(module: nn.Module, prefix: str = ""):
    for name, p in module.named_parameters(prefix=prefix):
        if isinstance(p, _PackedWeight):
            yield name, p


def _expert_storage_bits(block: adapters.MoEBlock) -> list[float] | None:
    """Stored bits per weight of each expert of a block (codes + scales + zeros), None if unquantized."""
    if block.adapter.fused:
        ws = [getattr(block.experts, p.name) for p in block.projections]
    else:   # one 2D weight per expert projection: the expert's bits are those of its first weight
        ws = [next((p for _, p in _packed(e)), None) for e in block.experts]
        if any(w is None for w in ws):
            return None
        return [w.bits + OVERHEAD_BITS_PER_GROUP / w.group_size for w in ws]
    if not all(isinstance(w, _PackedWeight) for w in ws):
        return None
    per = [[b + OVERHEAD_BITS_PER_GROUP / w.group_size for b in w.expert_bits] for w in ws]
    sizes = [w.numel() // w.shape[0] for w in ws]
    return [sum(s * bits[e] for s, bits in zip(sizes, per)) / sum(sizes) for e in range(len(per[0]))]


def bits_report(model: nn.Module, analysis=None) -> dict:
    """experts[layer]: bits of each routed expert; storage_bits: stored bits per routed-expert weight
    (codes, scales and zeros); usage_bits: the same weighted by how often the analysis saw each
    expert routed (None without an analysis); bytes: bytes of packed routed-expert storage;
    cache_bytes / cache_bits: the switching cache, in bytes and in bits per routed-expert weight;
    other: shared experts, dense layers, attention and the output head, per weight."""
    experts, nbytes, nweights, usage_num, usage_den, cache = {}, 0, 0, 0.0, 0.0, 0
    blocks = adapters.moe_blocks(model)
    usage = analysis.usage() if analysis is not None else {
        b.layer: b.experts.__dict__["_dynamoq_usage"] for b in blocks if "_dynamoq_usage" in b.experts.__dict__} or None
    inside = set()
    for block in blocks:
        for name, p in _packed(block.experts, f"{block.fqn}.experts"):
            nbytes += p.storage_bytes()
            cache += p.cache_bytes()
            nweights += p.numel()
            inside.add(name)
        first = getattr(block.experts, block.projections[0].name, None) if block.adapter.fused else None
        if isinstance(first, _PackedWeight):
            experts[block.layer] = list(first.expert_bits)
        elif not block.adapter.fused:
            experts[block.layer] = [next((p.bits for _, p in _packed(e)), None) for e in block.experts]
        else:
            experts[block.layer] = None
        per_expert = _expert_storage_bits(block)
        if usage is not None and per_expert is not None and block.layer in usage:
            u = [float(x) for x in usage[block.layer]]
            usage_num += sum(ui * bi for ui, bi in zip(u, per_expert))
            usage_den += sum(u)
    other = {n: {"bits": p.expert_bits[0] if p.ndim == 2 else list(p.expert_bits), "bytes": p.storage_bytes()}
             for n, p in _packed(model) if n not in inside}
    return {
        "experts": experts,
        "storage_bits": 8 * nbytes / nweights if nweights else None,
        "usage_bits": usage_num / usage_den if usage_den else None,
        "bytes": nbytes,
        "weights": nweights,
        "other": other,
        "other_bytes": sum(v["bytes"] for v in other.values()),
        "cache_bytes": cache,
        "cache_bits": 8 * cache / nweights if nweights else None,
    }
