"""DynaMoConfig: what to quantize and how. Pure data; `quantize.py` holds the one handler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torchao.core.config import AOBaseConfig

from .packing import QuantizationError, check_bits

DEFAULT_BITS = 4


@dataclass(frozen=True)
class DynaMoConfig(AOBaseConfig):
    """
    bits:         uniform bit-width of every routed expert (2, 3, 4, 6 or 8); 4 if nothing else decides.
    expert_bits:  {decoder layer index: [bits of expert 0, 1, ...]} for explicit per-expert widths;
                  layers it does not name take `bits`.
    group_size:   inputs per scale/zero group (default 128; must divide every quantized input dim).
    shared_bits:  bit-width of shared experts (None keeps them as they are).
    dense_bits:   bit-width of dense MLP layers such as DeepSeek's first layers (None keeps them).
    experts_implementation: set on the model's config after quantization ("dynamoq" is the fused
                  low-bit path; "eager", "batched_mm" and "grouped_mm" also run, on dequantized weights).
    """
    bits: int | None = None
    expert_bits: Mapping[int, Sequence[int]] | None = None
    group_size: int = 128
    shared_bits: int | None = 8
    dense_bits: int | None = None
    experts_implementation: str | None = "dynamoq"

    def __post_init__(self):
        for b in (self.bits, self.shared_bits, self.dense_bits):
            if b is not None:
                check_bits(b)
        for layer, bits in (self.expert_bits or {}).items():
            if not isinstance(layer, int):
                raise QuantizationError(f"expert_bits keys are decoder layer indices (int), got {layer!r}")
            for b in bits:
                check_bits(b)

    def bits_for(self, layer: int, num_experts: int) -> tuple[int, ...]:
        """Bit-width of each expert of one MoE layer."""
        if self.expert_bits is not None and layer in self.expert_bits:
            bits = tuple(int(b) for b in self.expert_bits[layer])
            if len(bits) != num_experts:
                raise QuantizationError(
                    f"expert_bits[{layer}] lists {len(bits)} bit-widths but layer {layer} has {num_experts} experts")
            return bits
        if self.expert_bits is not None and self.bits is None:
            raise QuantizationError(
                f"expert_bits has no entry for MoE layer {layer}; add one or set bits= for the layers it omits")
        return (self.bits or DEFAULT_BITS,) * num_experts
