"""The one place that changes a model: the torchao handler for DynaMoConfig, the MoE-aware filter,
and `quantize_` (torchao's, with that filter, a check of the whole plan first, and no half-done model)."""
from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import quantize_ as _torchao_quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from . import adapters, kernels
from .config import DynaMoConfig
from .packing import QuantizationError, check_group
from .tensors import DynaMoExperts, SwitchableLinear, _PackedWeight

_FQN = "_dynamoq_fqn"


def moe_filter(module: nn.Module, fqn: str) -> bool:
    """torchao filter: True for MoE blocks and dense MLP layers (it records the module's name,
    which the handler needs to know the decoder layer)."""
    if adapters.experts_of(module) is not None or adapters.is_dense_mlp(module, fqn):
        module.__dict__[_FQN] = fqn
        return True
    return False


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


def _quantize_linears(module: nn.Module, bits: int, group_size: int) -> None:
    for name, lin in list(module.named_modules()):
        if isinstance(lin, nn.Linear):
            _refuse_quantized(lin.weight, name)
            _set(lin, "weight", SwitchableLinear.from_float(lin.weight.data, bits, group_size))


def _refuse_quantized(w: torch.Tensor, name: str) -> None:
    if isinstance(w, _PackedWeight):
        raise QuantizationError(f"{name} is already quantized ({w!r}); quantize the original model instead")


def _quantize_block(block: adapters.MoEBlock, config: DynaMoConfig) -> None:
    bits = config.bits_for(block.layer, block.num_experts)
    if block.adapter.fused:
        for p in block.projections:
            w = getattr(block.experts, p.name)
            _refuse_quantized(w, f"{block.fqn}.experts.{p.name}")
            _set(block.experts, p.name, DynaMoExperts.from_float(w.data, bits, config.group_size, p.transposed))
        if config.experts_implementation and hasattr(block.experts, "config"):
            block.experts.config._experts_implementation = config.experts_implementation
    else:
        for expert, b in zip(block.experts, bits):
            _quantize_linears(expert, b, config.group_size)
    if config.shared_bits is not None:
        for shared in block.shared.values():
            _quantize_linears(shared, config.shared_bits, config.group_size)


@register_quantize_module_handler(DynaMoConfig)
def _dynamoq_transform(module: nn.Module, config: DynaMoConfig) -> nn.Module:
    fqn = module.__dict__.get(_FQN)
    if fqn is None:
        raise QuantizationError("DynaMoConfig needs filter_fn=dynamoq.moe_filter (or use dynamoq.quantize_)")
    block = adapters.as_block(module, fqn)
    if block is not None:
        _quantize_block(block, config)
    elif config.dense_bits is not None:
        _quantize_linears(module, config.dense_bits, config.group_size)
    return module


def _check_plan(model: nn.Module, config: DynaMoConfig) -> list[adapters.MoEBlock]:
    """Every error a quantization could meet, found before anything changes."""
    blocks = adapters.moe_blocks(model)
    layers = {b.layer for b in blocks}
    unknown = set(config.expert_bits or {}) - layers
    if unknown:
        raise QuantizationError(f"expert_bits names layers {sorted(unknown)} that have no MoE block; "
                                f"MoE layers are {sorted(layers)}")
    for block in blocks:
        config.bits_for(block.layer, block.num_experts)
        weights = {}
        if block.adapter.fused:
            for p in block.projections:
                w = getattr(block.experts, p.name)
                weights[f"{block.fqn}.experts.{p.name}"] = (w, w.shape[-2] if p.transposed else w.shape[-1])
        else:
            weights.update(_linear_weights(block.experts, f"{block.fqn}.experts"))
        if config.shared_bits is not None:
            for name, shared in block.shared.items():
                weights.update(_linear_weights(shared, f"{block.fqn}.{name}"))
        for name, (w, k) in weights.items():
            _refuse_quantized(w, name)
            check_group(k, config.group_size, name)
    if config.dense_bits is not None:
        for fqn, mlp in adapters.dense_mlps(model).items():
            for name, (w, k) in _linear_weights(mlp, fqn).items():
                _refuse_quantized(w, name)
                check_group(k, config.group_size, name)
    return blocks


def _linear_weights(module: nn.Module, prefix: str) -> dict:
    return {f"{prefix}.{n}.weight": (m.weight, m.weight.shape[-1])
            for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def quantize_(model: nn.Module, config: DynaMoConfig, filter_fn=None, device=None) -> nn.Module:
    """torchao's quantize_ with `moe_filter` as default filter. The whole plan is checked first,
    and if anything fails midway every weight is put back, so the model is never half-quantized."""
    if not isinstance(config, DynaMoConfig):
        return _torchao_quantize_(model, config, filter_fn=filter_fn, device=device)
    _check_plan(model, config)
    before = {id(m): (m, dict(m._parameters)) for m in model.modules()}
    try:
        _torchao_quantize_(model, config, filter_fn=filter_fn or moe_filter, device=device)
    except BaseException:
        for m, params in before.values():
            m._parameters.clear()
            m._parameters.update(params)
        raise
    return model


kernels.register()
