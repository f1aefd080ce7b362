"""Channel-level dynamic switching (METHOD.md §3): a small cache of full-precision input channels
per expert lets a quantized model re-quantize them when the data changes, in place, as tensor
data, so a compiled model keeps running without recompiling.

The cache is chosen at quantization time from the Analysis (the most dynamic channels across the
calibration datasets). `adapt_` estimates expert significance on a sample of new data, re-clusters
every layer (the paper's fuzzy c-means to 2/4/6/8 bits), and for each expert whose level changes
re-quantizes its cached columns at the new level; `revert_` restores the baseline exactly.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from contextlib import contextmanager

import torch

from . import adapters, significance
from .allocation import fuzzy_bits
from .calibration import calibrate
from .packing import dequantize, quantize_rtn
from .tensors import DynaMoExperts

log = logging.getLogger("dynamoq.switching")
DEFAULT_FRACTION = 0.01
_LOCKS: dict[int, "_RWLock"] = {}


def select_channels(analysis, layer: int, projection: int, fraction: float) -> torch.Tensor:
    """The most dynamic input channels of each expert [E, r], r = ceil(fraction * K): ranked by the
    across-dataset spread of their share of S_ch (significance.channel_dynamics), ties (and a single
    dataset) broken by mean channel significance."""
    dyn = analysis.channel_dynamics()[layer][projection].double()                      # [E, K]
    dyn = dyn / dyn.amax(-1, keepdim=True).clamp(min=1e-300)                          # [0, 1]
    mean = sum(analysis.channel_significance(d)[layer][projection] for d in analysis.datasets).double()
    salience = mean / mean.amax(-1, keepdim=True).clamp(min=1e-300)                  # [0, 1]
    r = max(1, math.ceil(fraction * dyn.shape[-1]))
    return (dyn + 1e-6 * salience).topk(r, dim=-1).indices.sort(-1).values


class _RWLock:
    """Many forwards at once, or one switch; a waiting switch goes before new forwards."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writers = 0

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: self._writers == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers += 1
            try:
                self._cond.wait_for(lambda: self._readers == 0)
                yield
            finally:
                self._writers -= 1
                self._cond.notify_all()


def _lock(model) -> _RWLock:
    return _LOCKS.setdefault(id(model), _RWLock())


@contextmanager
def reading(model):
    """Serving code wraps each forward or generate call in this: a switch then waits for it, and
    the forward sees the state before or after a switch, never a mix."""
    with _lock(model).read():
        yield


def _cached(model):
    for block in adapters.moe_blocks(model):
        for p in block.projections:
            w = getattr(block.experts, p.name, None)
            if isinstance(w, DynaMoExperts) and w.cache_idx is not None:
                yield block, p, w


def _baseline(w: DynaMoExperts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(col2 [E, K] column energies, cols [E, N, r] values of the cached columns, None without a
    cache) of the packed codes, the baseline state. Computed once per weight object, one expert
    dequantized at a time: the codes never change after quantization, only the cache does, so a
    switch dequantizes nothing."""
    memo = w.__dict__.get("_dynamoq_baseline")
    if memo is None:
        col2, cols = [], []
        for e in range(w.num_rows):
            we = w.packed_expert_nk(e)                                                # [N, K]
            col2.append(significance.column_energy(we))
            if w.cache_idx is not None:
                cols.append(we.gather(-1, w.cache_idx[e][None, :].expand(we.shape[0], -1)))
        memo = w.__dict__["_dynamoq_baseline"] = (torch.stack(col2), torch.stack(cols) if cols else None)
    return memo


def _requantize(w: DynaMoExperts, e: int, bits: int) -> torch.Tensor:
    """Correction for expert e's cached columns at `bits`: their columns re-quantized (one group of
    r channels per output row) minus the packed columns."""
    fp = w.cache_fp[e].float()                                                        # [N, r]
    r = fp.shape[-1]
    padded = _pad8(fp)
    live = dequantize(*quantize_rtn(padded, bits, padded.shape[-1]))[:, :r]
    return (live - _baseline(w)[1][e]).to(w.cache_delta.dtype)


def _pad8(x):   # quantize_rtn groups need a multiple of 8: repeat the last column (same range)
    r = x.shape[-1]
    pad = (-r) % 8
    return torch.cat([x, x[:, -1:].expand(-1, pad)], -1) if pad else x


@torch.no_grad()
def adapt_(model, data, tokenizer=None, max_tokens: int = 4096, seq_len: int = 256, policy: str = "paper",
           progress: bool = False) -> dict:
    """Adapt a quantized model to new data: returns {"changed": {layer: {expert: [old, new]}},
    "seconds", "estimate_seconds" (the calibration pass over the sample; the first call also
    computes the baseline values _baseline keeps), "switch_seconds" (re-clustering, re-quantizing the
    cached columns and writing them), "tokens"}. policy="paper": cached columns move up or down
    with the new level; "raise": only up."""
    from .data import token_windows
    t0 = time.perf_counter()
    cached = list(_cached(model))
    if not cached:
        raise ValueError("this model has no switching cache: quantize it with an analysis "
                         "(DynaMoConfig(analysis=..., cache_fraction=0.01)) to keep one")
    windows = token_windows(data, tokenizer, seq_len=None if isinstance(data, torch.Tensor) else seq_len,
                            max_tokens=max_tokens)
    stats = calibrate(model, windows, batch_size=8, desc="adapting", progress=progress)
    weights = {b.layer: [getattr(b.experts, p.name) for p in b.projections] for b, _, _ in cached}
    col2 = {layer: [_baseline(w)[0] for w in ws] for layer, ws in weights.items()}   # the first adapt_ pays it
    t1 = time.perf_counter()
    updates, changed = [], {}
    for layer, ws in weights.items():
        sig = significance.expert_significance(stats[layer].wx2, col2[layer])
        new = fuzzy_bits(sig)
        for w in ws:
            if not isinstance(w, DynaMoExperts) or w.cache_idx is None:
                continue
            delta = torch.zeros_like(w.cache_delta)
            level = torch.tensor(w.expert_bits, dtype=torch.int32)
            for e, (base, b) in enumerate(zip(w.expert_bits, new)):
                if b != base and (policy == "paper" or b > base):
                    delta[e] = _requantize(w, e, b)
                    level[e] = b
                    changed.setdefault(layer, {})[e] = [base, b]
            updates.append((w, delta, level))
    with _lock(model).write():                # all cached columns change at once
        for w, delta, level in updates:
            w.cache_delta.copy_(delta)
            w.cache_level.copy_(level)
    t2 = time.perf_counter()
    out = {"changed": changed, "seconds": t2 - t0, "estimate_seconds": t1 - t0, "switch_seconds": t2 - t1,
           "tokens": int(windows.numel())}
    log.info("adapted: %d experts changed level in %.3f s", sum(len(v) for v in changed.values()), out["seconds"])
    return out


@torch.no_grad()
def revert_(model) -> None:
    """Back to the baseline quantization: every cached column as packed."""
    with _lock(model).write():
        for _, _, w in _cached(model):
            w.cache_delta.zero_()
            w.cache_level.copy_(torch.tensor(w.expert_bits, dtype=torch.int32))


def state(model) -> dict:
    """Current level of the cached columns of every expert: {layer: [bits...]}."""
    return {b.layer: w.cache_level.tolist() for b, p, w in _cached(model) if p == b.projections[0]}


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p / p.sum().clamp(min=1e-12), q / q.sum().clamp(min=1e-12)
    m = (p + q) / 2
    kl = lambda a, b: float((a * (a.clamp(min=1e-12) / b.clamp(min=1e-12)).log()).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


class AutoSwitch:
    """Automatic mode (off until attached). Watches the routers' expert-usage histograms over a
    sliding window of tokens and compares them with the calibration profile (Jensen-Shannon
    divergence, mean over MoE layers). Past `threshold` it adapts the model to the window's
    tokens; once the divergence falls below `threshold - hysteresis` it reverts to the baseline.
    Every switch is logged and kept in `events`."""

    def __init__(self, model, analysis, window: int = 2048, threshold: float = 0.1, hysteresis: float = 0.05,
                 check_every: int = 256):
        self.model, self.window, self.threshold, self.hysteresis = model, window, threshold, hysteresis
        self.check_every = check_every
        self.profile = {layer: u.double() for layer, u in analysis.usage().items()}
        self.events: list[dict] = []
        self.adapted = False
        self._tokens: deque = deque()
        self._counts: dict[int, deque] = {layer: deque() for layer in self.profile}
        self._since = 0
        self._handles = []
        self._busy = False

    def attach(self):
        self._handles.append(self.model.register_forward_pre_hook(self._on_input, with_kwargs=True))
        for block in adapters.moe_blocks(self.model):
            if block.layer in self.profile:
                self._handles.append(block.experts.register_forward_pre_hook(
                    lambda m, a, k, layer=block.layer: self._on_route(layer, a, k), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(lambda m, a, k, o: self._check(), with_kwargs=True))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_input(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or self._busy:
            return
        for row in ids.detach().cpu():
            self._tokens.append(row)
        while sum(r.numel() for r in self._tokens) > self.window and len(self._tokens) > 1:
            self._tokens.popleft()

    def _on_route(self, layer, args, kwargs):
        if self._busy:
            return
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        q = self._counts[layer]
        q.append(torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.profile[layer])).double())
        while sum(float(x.sum()) for x in q) > self.window * idx.shape[-1] and len(q) > 1:
            q.popleft()
        if layer == min(self.profile):
            self._since += idx.shape[0]

    def divergence(self) -> float:
        vals = [_js(sum(q), self.profile[layer]) for layer, q in self._counts.items() if q]
        return sum(vals) / len(vals) if vals else 0.0

    def _check(self):
        if self._busy or self._since < self.check_every:
            return
        self._since = 0
        d = self.divergence()
        if not self.adapted and d > self.threshold and self._tokens:
            self._busy = True
            try:
                result = adapt_(self.model, torch.cat([r.reshape(-1) for r in self._tokens])[None])
            finally:
                self._busy = False
            self.adapted = True
            self.events.append({"event": "adapt", "divergence": d, "changed": result["changed"],
                                "seconds": result["seconds"]})
            log.info("traffic shifted (JS %.3f > %.3f): adapted in %.3f s", d, self.threshold, result["seconds"])
        elif self.adapted and d < self.threshold - self.hysteresis:
            revert_(self.model)
            self.adapted = False
            self.events.append({"event": "revert", "divergence": d})
            log.info("traffic back to the calibration profile (JS %.3f): reverted", d)
