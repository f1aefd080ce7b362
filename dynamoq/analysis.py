"""The multi-level analysis of an MoE on several datasets (METHOD.md §1): calibrate on each dataset,
keep the sums, and derive routing, channel and expert significance from them on demand."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import adapters, significance
from .calibration import LayerStats, calibrate, sensitivity
from .tensors import _PackedWeight

FORMAT_VERSION = 1
MIN_TOKENS = 2  # an expert with fewer routed tokens gets a fallback for its channel statistics
SENSITIVITY_TOKENS = 1024  # tokens per dataset of the pass with gradients (~12 s a dataset on the reference model)


class AnalysisError(ValueError):
    """An analysis that cannot be made, read, or used with this model."""


def fingerprint(model) -> dict:
    """What an analysis must agree with to be used on a model."""
    blocks = adapters.moe_blocks(model)
    return {"class": type(model).__name__,
            "layers": {str(b.layer): [b.num_experts] + [int(d) for d in _input_dims(b)] for b in blocks}}


def _input_dims(block) -> list[int]:
    dims = []
    for p in block.projections:
        w = getattr(block.experts, p.name)
        dims.append(w.shape[-2] if p.transposed else w.shape[-1])
    return dims


def _weights_nk(block) -> list[torch.Tensor]:
    out = []
    for p in block.projections:
        w = getattr(block.experts, p.name)
        w = w.dequantize() if isinstance(w, _PackedWeight) else w.detach()
        out.append(w.transpose(-1, -2) if p.transposed else w)
    return out


@dataclass
class Analysis:
    fingerprint: dict
    datasets: list[str]
    stats: dict[str, dict[int, LayerStats]]          # dataset -> layer -> sums
    col2: dict[int, list[torch.Tensor]]              # layer -> per projection [E, K_p] weight column energy
    meta: dict = field(default_factory=dict)
    windows: dict[str, torch.Tensor] = field(default_factory=dict)   # dataset -> calibration tokens [N, T]
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.col2)

    # ---- derived views -------------------------------------------------------------------------
    def usage(self, dataset: str | None = None) -> dict[int, torch.Tensor]:
        """Routing frequency: share of the layer's top-k slots each expert got (all datasets if None)."""
        names = [dataset] if dataset else self.datasets
        out = {}
        for layer in self.layers:
            c = sum(self.stats[d][layer].count for d in names)
            out[layer] = c / c.sum().clamp(min=1)
        return out

    def linear_stats(self, dataset: str) -> dict[str, LayerStats]:
        """Input sums of the shared-expert and dense-MLP nn.Linear layers, by name."""
        return {k: v for k, v in self.stats[dataset].items() if isinstance(k, str)}

    def mean_x2(self, dataset: str, layer: int) -> list[torch.Tensor]:
        """E[x_c^2] per expert and projection, with the fallback for experts short of tokens."""
        s = self.stats[dataset][layer]
        few = s.count < MIN_TOKENS
        out = []
        for p, x2 in enumerate(s.x2):
            m = x2 / s.count.clamp(min=1)[:, None]
            if few.any():
                if s.all_x2 is not None and s.all_count > 0:
                    fb = s.all_x2[p] / s.all_count
                else:                                   # the layer's token-weighted average expert
                    fb = (x2.sum(0) / s.count.sum().clamp(min=1)).expand_as(x2)
                m = torch.where(few[:, None], fb, m)
            out.append(m)
        return out

    def fallbacks(self) -> list[dict]:
        """Experts whose channel statistics come from a fallback, and which one."""
        out = []
        for d in self.datasets:
            for layer in self.layers:
                s = self.stats[d][layer]
                kind = "balanced" if s.all_x2 is not None else "layer-average"
                for e in (s.count < MIN_TOKENS).nonzero().flatten().tolist():
                    out.append({"dataset": d, "layer": layer, "expert": e, "tokens": int(s.count[e]), "fallback": kind})
        return out

    def channel_significance(self, dataset: str) -> dict[int, list[torch.Tensor]]:
        """S_ch per layer and projection [E, K_p]."""
        if ("ch", dataset) not in self._memo:
            self._memo[("ch", dataset)] = self._channel_significance(dataset)
        return self._memo[("ch", dataset)]

    def _channel_significance(self, dataset: str) -> dict[int, list[torch.Tensor]]:
        ones = lambda t: torch.ones(t.shape[0], dtype=t.dtype)  # noqa: E731  mean_x2 already divides
        return {layer: [significance.channel_significance(m, ones(m), c)
                        for m, c in zip(self.mean_x2(dataset, layer), self.col2[layer])]
                for layer in self.layers}

    def expert_significance(self, dataset: str) -> dict[int, torch.Tensor]:
        """S_exp per layer [E] (sums to 1 per layer)."""
        return {layer: significance.expert_significance(self.stats[dataset][layer].wx2, self.col2[layer])
                for layer in self.layers}

    @property
    def has_sensitivity(self) -> bool:
        """Whether every dataset went through the pass with gradients (analyze(sensitivity_tokens=...))."""
        return all(self.stats[d][layer].gx2 is not None for d in self.datasets for layer in self.layers)

    def loss_significance(self, dataset: str) -> dict[int, torch.Tensor]:
        """S_loss per layer [E]: estimated loss per unit relative error of each expert (not normalised)."""
        if not self.has_sensitivity:
            raise AnalysisError("this analysis has no loss sensitivity: run dynamoq.analyze with sensitivity_tokens > 0")
        return {layer: significance.loss_significance(self.stats[dataset][layer].gx2, self.col2[layer],
                                                      float(self.stats[dataset][layer].grad_tokens))
                for layer in self.layers}

    def gradient_x2(self, layer: int) -> list[torch.Tensor]:
        """gx2 per projection [E, K_p] summed over datasets; an expert no gradient token reached takes the
        layer's mean expert (its channel profile is unknown, its scale does not matter: S_loss weighs it)."""
        out = []
        for p in range(len(self.col2[layer])):
            g = sum(self.stats[d][layer].gx2[p] for d in self.datasets)
            out.append(torch.where((g.sum(-1) > 0)[:, None], g, g.mean(0, keepdim=True)))
        return out

    def synthesized(self, weights: dict[str, float] | None = None, lam: float = 1.0,
                    datasets: list[str] | None = None, loss: bool = False) -> dict[int, torch.Tensor]:
        """Cross-dataset significance per layer [E] (paper Eq. 2, METHOD.md's reading) of S_exp, or of
        S_loss with loss=True."""
        names = datasets or self.datasets
        weights = {**self.meta.get("dataset_weights", {}), **(weights or {})}     # the analysis' own, then the caller's
        w = torch.tensor([float(weights.get(d, 1.0)) for d in names], dtype=torch.float64)
        per = [(self.loss_significance if loss else self.expert_significance)(d) for d in names]
        return {layer: significance.synthesize(torch.stack([p[layer] for p in per]), w, lam)
                for layer in self.layers}

    def channel_dynamics(self) -> dict[int, list[torch.Tensor]]:
        """Across-dataset spread of S_ch per layer and projection [E, K_p]."""
        if "dyn" not in self._memo:
            self._memo["dyn"] = self._channel_dynamics()
        return self._memo["dyn"]

    def _channel_dynamics(self) -> dict[int, list[torch.Tensor]]:
        per = [self.channel_significance(d) for d in self.datasets]
        return {layer: [significance.channel_dynamics(torch.stack([p[layer][i] for p in per]))
                        for i in range(len(self.col2[layer]))]
                for layer in self.layers}

    def check_model(self, model) -> None:
        fp = fingerprint(model)
        if fp != self.fingerprint:
            raise AnalysisError(f"this analysis was made on another model ({self.fingerprint['class']} with layers "
                                f"{self.fingerprint['layers']}), not on this {fp['class']} with layers {fp['layers']}")

    # ---- storage: safetensors for tensors, JSON for the rest -----------------------------------
    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, d in enumerate(self.datasets):
            for layer, s in self.stats[d].items():
                pre = f"d{i}.L{layer}." if isinstance(layer, int) else f"d{i}.F{layer}|"
                for name, t in s.tensors().items():
                    tensors[pre + name] = t.contiguous()
        for layer, cs in self.col2.items():
            for p, t in enumerate(cs):
                tensors[f"col2.L{layer}.{p}"] = t.contiguous()
        for i, d in enumerate(self.datasets):
            if d in self.windows:
                tensors[f"d{i}.windows"] = self.windows[d].clone()     # a copy: datasets may be views of one tensor
        meta = {"format": "dynamoq-analysis", "version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "datasets": self.datasets, "meta": self.meta}
        tmp = path / ".analysis.tmp"
        save_file(tensors, str(tmp))
        (path / ".analysis.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / "analysis.safetensors")
        os.replace(path / ".analysis.json.tmp", path / "analysis.json")

    @classmethod
    def load(cls, path) -> "Analysis":
        path = Path(path)
        try:
            meta = json.loads((path / "analysis.json").read_text())
            tensors = load_file(str(path / "analysis.safetensors"))
        except (OSError, ValueError) as e:
            raise AnalysisError(f"cannot read an analysis from {path}: {e}") from e
        if meta.get("format") != "dynamoq-analysis" or meta.get("version") != FORMAT_VERSION:
            raise AnalysisError(f"{path} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
                                f"this dynamoq reads dynamoq-analysis version {FORMAT_VERSION}")
        layers = sorted(int(k) for k in meta["fingerprint"]["layers"])
        stats = {}
        for i, d in enumerate(meta["datasets"]):
            stats[d] = {}
            for layer in layers:
                pre = f"d{i}.L{layer}."
                stats[d][layer] = LayerStats.from_tensors({k[len(pre):]: v for k, v in tensors.items()
                                                           if k.startswith(pre)})
            linears = {k[len(f"d{i}.F"):].split("|")[0] for k in tensors if k.startswith(f"d{i}.F")}
            for fqn in sorted(linears):
                pre = f"d{i}.F{fqn}|"
                stats[d][fqn] = LayerStats.from_tensors({k[len(pre):]: v for k, v in tensors.items()
                                                         if k.startswith(pre)})
        col2 = {layer: [tensors[k] for k in sorted(k for k in tensors if k.startswith(f"col2.L{layer}."))]
                for layer in layers}
        windows = {d: tensors[f"d{i}.windows"] for i, d in enumerate(meta["datasets"]) if f"d{i}.windows" in tensors}
        return cls(meta["fingerprint"], meta["datasets"], stats, col2, meta.get("meta", {}), windows)


def _windows(name, data, tokenizer, model, seq_len, max_tokens):
    from .data import token_windows
    vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else None
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise AnalysisError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
                            "it is not this model's tokenizer")
    try:
        w = token_windows(data, tokenizer, seq_len=None if isinstance(data, torch.Tensor) else seq_len,
                          max_tokens=max_tokens)
    except ValueError as e:
        raise AnalysisError(f"dataset {name!r}: {e}") from e
    if vocab is not None and int(w.max()) >= vocab:
        raise AnalysisError(f"dataset {name!r} has token id {int(w.max())} >= the model's vocabulary size {vocab}")
    return w


def analyze(model, datasets: dict, tokenizer=None, seq_len: int = 256, max_tokens: int | None = 16384,
            batch_size: int = 8, balanced: bool = False, sensitivity_tokens: int = SENSITIVITY_TOKENS,
            generated_tokens: int = 0, progress: bool = True) -> Analysis:
    """Calibrate on each named dataset (list of strings with tokenizer=, or LongTensor [N, T]) and
    return the Analysis. sensitivity_tokens: tokens of each dataset (its first windows) that also go
    through a pass with gradients, for the loss sensitivity that weighs layers against each other in
    the budget allocation (0 skips it). generated_tokens: the model also writes this many tokens of its
    own, grouped by routing into pseudo-domains "generated-1", ... that together weigh as much as one
    dataset in the synthesis (dynamoq/generated.py: for experts the datasets never reach). Under torchrun /
    accelerate launch the windows are sharded over processes and the sums reduced, so every process gets
    the same Analysis as one process would."""
    if sensitivity_tokens < 0:
        raise AnalysisError(f"sensitivity_tokens={sensitivity_tokens} must be 0 (no pass with gradients) or more")
    if not datasets:
        raise AnalysisError("analyze needs at least one dataset: {name: texts or token tensor}")
    if generated_tokens < 0:
        raise AnalysisError(f"generated_tokens={generated_tokens} must be 0 (none) or more")
    blocks = adapters.moe_blocks(model)
    t0 = time.perf_counter()
    datasets, weights = dict(datasets), {}
    if generated_tokens:
        from .generated import PREFIX, pseudo_domains
        if any(str(d).startswith(PREFIX) for d in datasets):
            raise AnalysisError(f"dataset names starting with {PREFIX!r} are kept for the model's own text; rename yours")
        groups = pseudo_domains(model, generated_tokens, vocab=len(tokenizer) if tokenizer is not None else None,
                                progress=progress)
        datasets.update(groups)
        weights = {d: 1.0 / len(groups) for d in groups}
    stats, tokens, windows, grad_seconds = {}, {}, {}, 0.0
    for name, data in datasets.items():
        w = _windows(name, data, tokenizer, model, seq_len, None if name in weights else max_tokens)  # generated: all
        tokens[name], windows[name] = int(w.numel()), w
        stats[name] = calibrate(model, w, batch_size, balanced, desc=f"analysing {name}", progress=progress)
        if sensitivity_tokens:
            share = sensitivity_tokens * weights.get(name, 1.0)                 # pseudo-domains share one budget
            n = min(w.shape[0], max(1, -(-int(share) // w.shape[1])))         # whole windows, one at least
            t1 = time.perf_counter()
            gx2, predicted = sensitivity(model, w[:n], desc=f"loss sensitivity {name}", progress=progress)
            grad_seconds += time.perf_counter() - t1
            for layer, g in gx2.items():
                stats[name][layer].gx2 = g
                stats[name][layer].grad_tokens = torch.tensor(float(predicted), dtype=torch.float64)
    col2 = {b.layer: [significance.column_energy(w).double().cpu() for w in _weights_nk(b)] for b in blocks}
    meta = {"tokens": tokens, "seconds": time.perf_counter() - t0, "sensitivity_seconds": grad_seconds,
            "balanced": balanced, "seq_len": seq_len, "dataset_weights": weights}
    stats = {d: {layer: LayerStats(**{k: (v.cpu() if isinstance(v, torch.Tensor) else
                                          [t.cpu() for t in v] if v is not None else None)
                                      for k, v in vars(s).items()})
                 for layer, s in per.items()} for d, per in stats.items()}
    return Analysis(fingerprint(model), list(datasets), stats, col2, meta, windows)
