"""The one place that changes a model: the torchao handler for DynaMoConfig, the MoE-aware filter,
and `quantize_` (torchao's, with that filter, a check of the whole plan first, and no half-done model)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torchao.quantization import quantize_ as _torchao_quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from . import adapters, kernels
from .config import DynaMoConfig
from .packing import DATA_FREE, QuantizationError, check_group
from .switching import select_channels
from .tensors import DynaMoExperts, SwitchableLinear, _PackedWeight

_FQN = "_dynamoq_fqn"


@dataclass
class Target:
    """One weight to quantize: owner.<name>, with one bit-width per expert (one for a 2D weight)."""
    owner: nn.Module
    name: str
    fqn: str
    bits: tuple[int, ...]
    transposed: bool = False
    cache_idx: torch.Tensor | None = None     # [E, r] input channels kept for switching

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def check(self, group_size: int) -> None:
        w = self.weight
        if isinstance(w, _PackedWeight):
            raise QuantizationError(f"{self.fqn} is already quantized ({w!r}); quantize the original model instead")
        rows = w.shape[0] if w.ndim == 3 else 1
        if len(self.bits) != rows:
            raise QuantizationError(f"{self.fqn}: {len(self.bits)} bit-widths for {rows} experts")
        check_group(w.shape[-2] if self.transposed else w.shape[-1], group_size, self.fqn)

    def apply(self, group_size: int, codes=None, w_fp=None, quantizer: str = "rtn") -> None:
        """A data-free quantizer (packing.DATA_FREE), or the given (codes, scale, zero) [E, N, K] from
        another, whose full-precision values for the switching cache may be given as w_fp [E, N, K]
        (GPTQ's updated columns; default: the weight)."""
        w = self.weight.data
        if codes is not None:       # [E, N, K] ([1, N, K] for a 2D weight)
            w_nk = w.transpose(-1, -2) if self.transposed else w
            cls = DynaMoExperts if w.ndim == 3 else SwitchableLinear
            q = cls.from_codes(*codes, self.bits, group_size, self.transposed, w.dtype, self.cache_idx,
                               w_nk if w_fp is None else w_fp)
        elif w.ndim == 3:
            q = DynaMoExperts.from_float(w, self.bits, group_size, self.transposed, self.cache_idx, quantizer)
        else:
            q = SwitchableLinear.from_float(w, self.bits[0], group_size, quantizer)
        setattr(self.owner, self.name, nn.Parameter(q, requires_grad=False))


def _dense_targets(module: nn.Module, prefix: str, bits: int | None, linear_only: bool = False) -> list[Target]:
    """Linear weights, and unless linear_only 3D expert-like parameters (e.g. Inkling's shared experts), of a
    dense part."""
    if bits is None:
        return []
    out = []
    for name, m in module.named_modules():
        fqn = f"{prefix}.{name}" if name else prefix
        if isinstance(m, nn.Linear):
            out.append(Target(m, "weight", f"{fqn}.weight", (bits,)))
        elif not linear_only and not list(m.children()):
            for pname, p in m.named_parameters(recurse=False):
                if p.ndim == 3:
                    out.append(Target(m, pname, f"{fqn}.{pname}", (bits,) * p.shape[0]))
    return out


def _attention_targets(module: nn.Module, fqn: str, config: DynaMoConfig) -> list[Target]:
    """An attention's projections (nn.Linear only: a linear attention's 3D weights are short convolutions)."""
    return _dense_targets(module, fqn, config.attention_bits, linear_only=True)


def module_targets(module: nn.Module, fqn: str, config: DynaMoConfig) -> list[Target]:
    """What the handler will quantize in one module that moe_filter passed."""
    block = adapters.as_block(module, fqn)
    if block is None:
        if adapters.is_output_head(module, fqn):
            return _dense_targets(module, fqn, config.lm_head_bits)
        if adapters.is_attention(module, fqn):
            return _attention_targets(module, fqn, config)
        bits = config.shared_bits if adapters.is_shared_expert(module, fqn) else config.dense_bits
        return _dense_targets(module, fqn, bits)
    if block.adapter.refusal:
        raise adapters.UnsupportedModelError(block.adapter.refusal)
    bits = config.bits_for(block.layer, block.num_experts)
    prefix = f"{fqn}.experts" if fqn else "experts"
    if block.adapter.fused:
        cache = config.analysis is not None and config.cache_fraction > 0 and block.adapter.calibration is None
        last = len(block.projections) - 1      # down reads the activation, the others the hidden states
        out = [Target(block.experts, p.name, f"{prefix}.{p.name}", bits, p.transposed,
                      select_channels(config.analysis, block.layer, i, config.cache_fraction)
                      if cache and (config.cache_projections == "all" or i < last) else None)
               for i, p in enumerate(block.projections)]
    else:
        out = [t for e, b in zip(range(len(block.experts)), bits)
               for t in _dense_targets(block.experts[e], f"{prefix}.{e}", b)]
    for name, shared in block.shared.items():
        out += _dense_targets(shared, f"{fqn}.{name}", config.shared_bits)
    for name, child in module.named_children():          # a dense MLP or attention beside the experts (Gemma-4)
        if adapters.is_dense_mlp(child, f"{fqn}.{name}"):
            out += _dense_targets(child, f"{fqn}.{name}", config.dense_bits)
        elif adapters.is_attention(child, f"{fqn}.{name}"):
            out += _attention_targets(child, f"{fqn}.{name}", config)
    return out


def moe_filter(module: nn.Module, fqn: str) -> bool:
    """torchao filter: True for MoE blocks, shared experts, dense MLP layers, attention and the output head (it
    records the module's name, which the handler needs to know the decoder layer)."""
    if (adapters.experts_of(module) is not None or adapters.is_dense_mlp(module, fqn)
            or adapters.is_shared_expert(module, fqn) or adapters.is_attention(module, fqn)
            or adapters.is_output_head(module, fqn)):
        module.__dict__[_FQN] = fqn
        return True
    return False


@register_quantize_module_handler(DynaMoConfig)
def _dynamoq_transform(module: nn.Module, config: DynaMoConfig) -> nn.Module:
    fqn = module.__dict__.get(_FQN)
    if fqn is None:
        raise QuantizationError("DynaMoConfig needs filter_fn=dynamoq.moe_filter (or use dynamoq.quantize_)")
    if config.quantizer not in DATA_FREE or config.datasets is not None:
        raise QuantizationError(f"quantizer={config.quantizer!r} / datasets= need the whole model at once: "
                                "use dynamoq.quantize_")
    targets = module_targets(module, fqn, config)
    for t in targets:
        t.check(config.group_size)
    for t in targets:
        t.apply(config.group_size, quantizer=config.quantizer)
    experts = adapters.experts_of(module)
    if experts and config.experts_implementation and hasattr(experts[1], "has_gate"):
        experts[1].config._experts_implementation = config.experts_implementation
    return module


def _set_experts_implementation(model: nn.Module, config: DynaMoConfig) -> None:
    for block in adapters.moe_blocks(model):
        if config.experts_implementation and hasattr(block.experts, "has_gate"):
            block.experts.config._experts_implementation = config.experts_implementation


def untie_packed(model: nn.Module) -> None:
    """A packed output head is no longer the input embeddings: the model's tie_word_embeddings (and its text
    config's) becomes False and transformers' tying table drops it, so neither tie_weights() nor saving and
    loading puts the 16-bit embeddings back in its place."""
    if not isinstance(getattr(adapters.output_head(model), "weight", None), _PackedWeight):
        return
    packed = {name for name, p in model.named_parameters(remove_duplicate=False) if isinstance(p, _PackedWeight)}
    config = getattr(model, "config", None)
    for c in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    for prefix, m in model.named_modules():
        keys = getattr(m, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            pre = f"{prefix}." if prefix else ""
            m.all_tied_weights_keys = {k: v for k, v in keys.items() if f"{pre}{k}" not in packed}


def _record_usage(model: nn.Module, analysis) -> None:
    """Keep the routing frequency the bits were chosen with, for bits_report's usage-weighted bits."""
    if analysis is None:
        return
    usage = analysis.usage()
    for block in adapters.moe_blocks(model):
        if block.layer in usage:
            block.experts.__dict__["_dynamoq_usage"] = usage[block.layer].tolist()


def plan(model: nn.Module, config: DynaMoConfig) -> list[Target]:
    """Every weight quantize_ would change, checked: all errors are found before anything changes."""
    blocks = adapters.moe_blocks(model)
    layers = {b.layer for b in blocks}
    unknown = set(config.expert_bits or {}) - layers
    if unknown:
        raise QuantizationError(f"expert_bits names layers {sorted(unknown)} that have no MoE block; "
                                f"MoE layers are {sorted(layers)}")
    targets = []

    def visit(module, fqn):
        if moe_filter(module, fqn):
            targets.extend(module_targets(module, fqn, config))
            return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    for t in targets:
        t.check(config.group_size)
    return targets


def resolve(model: nn.Module, config: DynaMoConfig, progress: bool = True) -> DynaMoConfig:
    """calibrate -> allocate: the config with its analysis made and its per-expert bits decided."""
    analysis = config.analysis
    if analysis is None and config.datasets is not None:
        from .analysis import analyze
        analysis = analyze(model, dict(config.datasets), tokenizer=config.tokenizer, seq_len=config.seq_len,
                           max_tokens=config.max_tokens, generated_tokens=config.generated_tokens, progress=progress)
    if analysis is not None:
        analysis.check_model(model)
    expert_bits = config.expert_bits
    if config.mode is not None:
        from .allocation import allocate
        expert_bits = allocate(model, analysis, config.mode, config.group_size, config.target_bits,
                               config.dataset_weights, config.lam, config.prior, progress=progress)
    return replace(config, analysis=analysis, datasets=None, expert_bits=expert_bits, allocation=None,
                   target_bits=None)


def quantize_(model: nn.Module, config: DynaMoConfig, filter_fn=None, device=None, progress: bool = True) -> nn.Module:
    """torchao's quantize_ with `moe_filter` as default filter, plus the forms that need the whole
    model (datasets to analyse first, budget allocation, GPTQ). The whole plan is checked first,
    and if anything fails midway every weight is put back, so the model is never half-quantized."""
    if not isinstance(config, DynaMoConfig):
        return _torchao_quantize_(model, config, filter_fn=filter_fn, device=device)
    config = resolve(model, config, progress)
    targets = plan(model, config)
    before = [(m, dict(m._parameters)) for m in model.modules()]
    # the handler also points each experts config at the fused kernels: put that back too on failure
    impls = [(c, getattr(c, "_experts_implementation", None))
             for c in {id(b.experts.config): b.experts.config for b in adapters.moe_blocks(model)
                       if getattr(b.experts, "config", None) is not None}.values()]
    try:
        if config.quantizer == "gptq":
            from . import gptq
            windows = list(config.analysis.windows.values())
            if not windows:
                raise QuantizationError("quantizer='gptq' needs the analysis' calibration tokens, and this analysis "
                                        "holds none: run dynamoq.analyze again or pass datasets=")
            gptq.quantize_model(model, targets, windows, config.group_size, config.damp, config.act_order,
                                config.balanced, progress=progress)
            _set_experts_implementation(model, config)
        else:
            _torchao_quantize_(model, config, filter_fn=filter_fn or moe_filter, device=device)
        _record_usage(model, config.analysis)
        untie_packed(model)
    except BaseException:
        for m, params in before:
            m._parameters.clear()
            m._parameters.update(params)
        for c, impl in impls:
            c._experts_implementation = impl
        raise
    return model


kernels.register()
