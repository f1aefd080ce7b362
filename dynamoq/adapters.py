"""One registry of architecture adapters: where, in a transformers model, the MoE blocks, their
routers, experts, shared experts and dense MLP layers are, and how each family stores experts.

Everything architecture-specific lives here; the rest of dynamoq asks `moe_blocks(model)` and
`dense_mlps(model)` and works on `Projection`s.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model has no MoE block dynamoq can serve."""


@dataclass(frozen=True)
class Projection:
    """One fused expert weight: `name` on the experts module, stored [E, N, K] (or [E, K, N])."""
    name: str
    transposed: bool


@dataclass(frozen=True)
class ExpertsAdapter:
    """How one storage form of experts is recognised and what its weights are."""
    name: str
    matches: Callable[[nn.Module], bool]
    projections: Callable[[nn.Module], tuple[Projection, ...]]
    fused: bool = True              # fused 3D parameters; False: a ModuleList of per-expert MLPs
    calibration: str | None = None  # why calibration hooks cannot serve it (None: they can)
    refusal: str | None = None      # why it cannot be quantized at all (None: it can)


def _is_fused_experts(m: nn.Module) -> bool:
    # transformers' @use_experts_implementation sets these flags on every fused experts class
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(
        getattr(m, "down_proj", None), (nn.Parameter, torch.Tensor))


def _fused_projections(m: nn.Module) -> tuple[Projection, ...]:
    first = "gate_up_proj" if m.has_gate else "up_proj"
    return (Projection(first, bool(m.is_transposed)), Projection("down_proj", bool(m.is_transposed)))


def _is_expert_list(m: nn.Module) -> bool:
    return isinstance(m, nn.ModuleList) and len(m) > 1 and all(
        any(isinstance(c, nn.Linear) for c in e.modules()) for e in m)


def _list_projections(m: nn.Module) -> tuple[Projection, ...]:
    names = [n for n, c in m[0].named_modules() if isinstance(c, nn.Linear)]
    return tuple(Projection(n, False) for n in names)


def _named(*classes: str) -> Callable[[nn.Module], bool]:
    return lambda m: type(m).__name__ in classes


_NO_ROUTING_ARGS = "its experts are called on pre-routed dense inputs, not (hidden_states, top_k_index, top_k_weights)"
ADAPTERS: list[ExpertsAdapter] = [
    # transformers 5's fused experts ([E, 2I, H] / [E, H, I], or transposed), decorated with
    # @use_experts_implementation: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, ... (most families)
    ExpertsAdapter("fused-3d", _is_fused_experts, _fused_projections),
    # Llama-4: fused and transposed, its own bmm forward over every expert
    ExpertsAdapter("llama4", _named("Llama4TextExperts"),
                   lambda m: (Projection("gate_up_proj", True), Projection("down_proj", True)),
                   calibration=_NO_ROUTING_ARGS),
    ExpertsAdapter("dbrx", _named("DbrxExperts"), lambda m: (), refusal=(
        "DBRX stores experts as 2D [E*I, H] matrices inside experts.mlp (w1, v1, w2); not supported yet")),
    ExpertsAdapter("longcat", _named("LongcatFlashExperts"), lambda m: (), refusal=(
        "LongCat-Flash's gate_up_proj holds rows for zero-computation experts that down_proj lacks; not supported yet")),
    # older or custom models: a ModuleList of per-expert MLPs made of nn.Linear
    ExpertsAdapter("expert-list", _is_expert_list, _list_projections, fused=False,
                   calibration="calibration hooks serve fused experts only"),
]

# Children of an MoE block that are full-precision helpers, never quantized.
ROUTER_NAMES = ("gate", "router", "gating_network", "switch_mlp_gate")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")  # inside the block or beside it (Granite)
EXPERTS_NAMES = ("experts",)
DENSE_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTENTION_NAMES = ("self_attn", "attention", "attn")
HEAD_NAMES = ("lm_head",)                                         # the output projection to the vocabulary
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


@dataclass
class MoEBlock:
    fqn: str
    layer: int
    module: nn.Module
    experts: nn.Module
    adapter: ExpertsAdapter
    router: nn.Module | None
    shared: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def projections(self) -> tuple[Projection, ...]:
        return self.adapter.projections(self.experts)

    @property
    def num_experts(self) -> int:
        if not self.adapter.fused:
            return len(self.experts)
        return getattr(self.experts, self.projections[0].name).shape[0]


def layer_index(fqn: str) -> int:
    m = _LAYER.search(fqn)
    if m is None:
        raise UnsupportedModelError(f"cannot tell the decoder layer of module {fqn!r}")
    return int(m.group(1))


def experts_of(module: nn.Module) -> tuple[str, nn.Module, ExpertsAdapter] | None:
    """The experts child of an MoE block, with its adapter; None if `module` is no MoE block."""
    for name in EXPERTS_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            for adapter in ADAPTERS:
                if adapter.matches(child):
                    return name, child, adapter
    return None


def as_block(module: nn.Module, fqn: str) -> MoEBlock | None:
    found = experts_of(module)
    if found is None:
        return None
    _, experts, adapter = found
    router = next((getattr(module, n) for n in ROUTER_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    shared = {n: getattr(module, n) for n in SHARED_NAMES if isinstance(getattr(module, n, None), nn.Module)}
    return MoEBlock(fqn, layer_index(fqn), module, experts, adapter, router, shared)


def is_dense_mlp(module: nn.Module, fqn: str) -> bool:
    """A decoder layer's feed-forward made only of nn.Linear (e.g. DeepSeek's first dense layers)."""
    if fqn.rsplit(".", 1)[-1] not in DENSE_NAMES or experts_of(module) is not None:
        return False
    children = list(module.children())
    linears = [c for c in children if isinstance(c, nn.Linear)]
    return len(linears) >= 2 and all(isinstance(c, nn.Linear) or not list(c.parameters()) for c in children)


def is_attention(module: nn.Module, fqn: str) -> bool:
    """A decoder layer's attention (by its name, or by its class's for a hybrid's "mixer"), whose projections
    are nn.Linear children (q/k/v/o, or MLA's low-rank ones)."""
    return ((fqn.rsplit(".", 1)[-1] in ATTENTION_NAMES or type(module).__name__.endswith("Attention"))
            and experts_of(module) is None and any(isinstance(c, nn.Linear) for c in module.children()))


def is_output_head(module: nn.Module, fqn: str) -> bool:
    """The language-model head: the nn.Linear from hidden states to the vocabulary (often tied to the input
    embeddings)."""
    return isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] in HEAD_NAMES


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (transformers' get_output_embeddings), or None."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def is_shared_expert(module: nn.Module, fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] in SHARED_NAMES and experts_of(module) is None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of the model, in order; a clear error if there is none or if one is of a
    storage form dynamoq refuses."""
    blocks = []
    for fqn, module in model.named_modules():
        block = as_block(module, fqn)
        if block is not None:
            if block.adapter.refusal:
                raise UnsupportedModelError(f"{type(model).__name__}: {block.adapter.refusal}")
            blocks.append(block)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE block that dynamoq recognises (looked for a child "
            f"named {EXPERTS_NAMES} holding fused 3D expert weights or a list of expert MLPs). "
            f"dynamoq quantizes Mixture-of-Experts models; for dense models use torchao directly.")
    return blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers that holds the MoE blocks."""
    fqn = moe_blocks(model)[0].fqn
    m = _LAYER.search(fqn)
    path = fqn[:m.start(1)].rstrip(".")
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}: cannot find the list of decoder layers at {path!r}")
    return layers


def dense_mlps(model: nn.Module) -> dict[str, nn.Module]:
    return {fqn: m for fqn, m in model.named_modules() if is_dense_mlp(m, fqn)}


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {fqn: m for fqn, m in model.named_modules() if is_attention(m, fqn)}
