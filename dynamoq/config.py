"""DynaMoConfig: what to quantize and how. Pure data; `quantize.py` holds the one handler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torchao.core.config import AOBaseConfig

from .packing import QuantizationError, check_bits

DEFAULT_BITS = 4
QUANTIZERS = ("rtn", "clip", "gptq")
CACHE_PROJECTIONS = ("input", "all")
ALLOCATIONS = ("budget", "fuzzy", "frequency")


@dataclass(frozen=True)
class DynaMoConfig(AOBaseConfig):
    """
    Which bits each routed expert gets (first that applies):
      expert_bits:  {decoder layer index: [bits of expert 0, 1, ...]}, explicit;
      allocation / target_bits with analysis (or datasets): the DynaMo baseline.
          allocation="budget" (default when target_bits is set): exact average of stored bits
          (codes + scales + zeros) <= target_bits, minimising significance-weighted error; with an
          analysis that has the loss sensitivity (analyze's default) the sum estimates the loss the
          errors add, so that layers the loss is more sensitive to get more bits;
          allocation="fuzzy": the paper's fuzzy c-means clustering to 8/6/4/2 bits;
          allocation="frequency": the budget with routing frequency as significance (ablation);
      bits:         uniform bit-width (2, 3, 4, 6 or 8); 4 if nothing else decides.
    Data:
      analysis:     a dynamoq.Analysis of this model; or datasets= {name: texts or LongTensor [N, T]}
                    (with tokenizer= for texts) to run the analysis first; generated_tokens= adds the
                    model's own text to it (analyze's argument: for experts the datasets never reach).
      dataset_weights, lam: synthesis across datasets = weighted mean + lam x std (METHOD.md §1).
      prior:        weight of uniform traffic mixed into each layer's significance, for the experts of
                    domains the calibration data does not cover (0 = calibration only, 1 = uniform).
    Quantizer:
      quantizer:    "rtn" (round-to-nearest on each group's full range; data-free, the fastest), "clip"
                    (round-to-nearest on grids searched per group for the least |error|^4, which clips a
                    few outliers; data-free; on the reference model at 3 bits 20-47% less perplexity loss
                    than rtn on every domain, in 34 s instead of 11) or "gptq" (Hessian of each expert's
                    routed tokens, on searched grids; needs analysis or datasets); damp, act_order,
                    balanced (experts short of tokens use the Hessian of every token) configure it.
    Other weights:
      group_size:   inputs per scale/zero group (default 128; must divide every quantized input dim).
      shared_bits:  shared experts (None keeps them); dense_bits: dense MLP layers (None keeps them);
      attention_bits: the attention projections (None keeps them; 8 is near lossless and, on CPUs with
                    the native kernel, faster than 16-bit weights at decode).
      lm_head_bits: the output head (None keeps it). Decode reads all of it every token (vocabulary x
                    hidden); tied to the input embeddings, it is untied: the embeddings keep their 16 bits
                    and config.tie_word_embeddings becomes False, so a saved checkpoint keeps both.
    Switching:
      cache_fraction: share of each expert's input channels kept in 16-bit for run-time switching
                    (dynamoq.adapt_), chosen from the analysis; 0 keeps no cache. Needs an analysis.
      cache_projections: "input" (default) caches channels of the projection that reads the block's
                    hidden states (gate_up / up) only; "all" also of down_proj, whose inputs carry the
                    quantized gate/up's error (on the reference model's bible domain correcting them
                    raised validation perplexity 15%, while the input projection alone lowered it 7%).
      experts_implementation: set on the model's config ("dynamoq" is the fused low-bit path).
    """
    bits: int | None = None
    expert_bits: Mapping[int, Sequence[int]] | None = None
    group_size: int = 128
    shared_bits: int | None = 8
    dense_bits: int | None = None
    attention_bits: int | None = None
    lm_head_bits: int | None = None
    experts_implementation: str | None = "dynamoq"
    analysis: Any = None
    datasets: Mapping[str, Any] | None = None
    tokenizer: Any = None
    target_bits: float | None = None
    allocation: str | None = None
    dataset_weights: Mapping[str, float] | None = None
    lam: float = 1.0
    prior: float = 0.0
    quantizer: str = "rtn"
    damp: float = 0.01
    act_order: bool = False
    balanced: bool = True
    seq_len: int = 256
    max_tokens: int | None = 16384
    generated_tokens: int = 0
    cache_fraction: float = 0.01
    cache_projections: str = "input"

    def __post_init__(self):
        for b in (self.bits, self.shared_bits, self.dense_bits, self.attention_bits, self.lm_head_bits):
            if b is not None:
                check_bits(b)
        for layer, bits in (self.expert_bits or {}).items():
            if not isinstance(layer, int):
                raise QuantizationError(f"expert_bits keys are decoder layer indices (int), got {layer!r}")
            for b in bits:
                check_bits(b)
        if not 0 <= self.cache_fraction <= 0.5:
            raise QuantizationError(f"cache_fraction={self.cache_fraction} must be between 0 and 0.5")
        if self.cache_projections not in CACHE_PROJECTIONS:
            raise QuantizationError(f"cache_projections={self.cache_projections!r}: choose one of {CACHE_PROJECTIONS}")
        if not 0 <= self.prior <= 1:
            raise QuantizationError(f"prior={self.prior} must be between 0 (calibration only) and 1 (uniform traffic)")
        if self.quantizer not in QUANTIZERS:
            raise QuantizationError(f"unknown quantizer {self.quantizer!r}; choose one of {QUANTIZERS}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise QuantizationError(f"unknown allocation {self.allocation!r}; choose one of {ALLOCATIONS}")
        if self.allocation in ("budget", "frequency") and self.target_bits is None:
            raise QuantizationError(f"allocation={self.allocation!r} needs target_bits=")
        if self.target_bits is not None and not 2 <= self.target_bits <= 9:
            raise QuantizationError(f"target_bits={self.target_bits} is outside what 2 to 8-bit experts cost "
                                    "(about 2.2 to 8.2 stored bits with their scales and zeros)")
        if (self.allocation or self.target_bits is not None) and self.analysis is None and self.datasets is None:
            raise QuantizationError("a bit allocation needs analysis= (dynamoq.analyze) or datasets=")
        if self.quantizer == "gptq" and self.analysis is None and self.datasets is None:
            raise QuantizationError("quantizer='gptq' needs calibration data: analysis= or datasets=")

    @property
    def mode(self) -> str | None:
        """The allocation that decides per-expert bits, or None (explicit or uniform bits)."""
        if self.expert_bits is not None:
            return None
        return self.allocation or ("budget" if self.target_bits is not None else None)

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
        if self.mode == "fuzzy" and self.analysis is not None:
            from .allocation import fuzzy_bits, with_prior
            sig = self.analysis.synthesized(self.dataset_weights, self.lam)[layer]
            return tuple(fuzzy_bits(with_prior(sig, self.prior)))
        if self.mode is not None:
            raise QuantizationError(f"allocation {self.mode!r} weighs all layers at once: use dynamoq.quantize_")
        return (self.bits or DEFAULT_BITS,) * num_experts
