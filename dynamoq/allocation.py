"""Bit allocation (METHOD.md §2): which bit-width each expert gets.

- fuzzy:  the paper's Algorithm 1: fuzzy c-means (c = 4) over synthesized significance, clusters
          ordered by centre -> 8/6/4/2 bits, an expert on a cluster boundary takes the lower width.
- budget: an exact average: minimise sum over experts of significance x quantization error, with
          the stored bits (codes + scales + zeros) averaged over all routed-expert weights <= target.
          With an analysis that has the loss sensitivity (the default), significance is S_loss and the
          error weighs channels by the loss gradient, so that the sum estimates the loss added and
          layers compare (their sensitivity differs 27-fold on the reference model); without it, S_exp,
          which sums to 1 in every layer.
"""
from __future__ import annotations

import math
import warnings

import torch

from .packing import BITS, OVERHEAD_BITS_PER_GROUP, QuantizationError, check_bits, rounding_error, rtn_grid

FUZZY_BITS = (2, 4, 6, 8)          # low to high cluster centre


def fuzzy_cmeans(x: torch.Tensor, c: int = 4, m: float = 2.0, iters: int = 100, tol: float = 1e-8):
    """1D fuzzy c-means. x [n] -> (centres [c] ascending, memberships [n, c])."""
    x = x.double()
    centres = torch.quantile(x, torch.linspace(0, 1, c + 2, dtype=torch.float64)[1:-1])
    centres = centres + torch.arange(c, dtype=torch.float64) * 1e-12          # distinct even if x repeats
    for _ in range(iters):
        d = (x[:, None] - centres[None, :]).abs().clamp(min=1e-15)             # [n, c]
        u = 1.0 / (d[:, :, None] / d[:, None, :]).pow(2.0 / (m - 1)).sum(-1)   # [n, c]
        um = u.pow(m)
        new = (um * x[:, None]).sum(0) / um.sum(0)
        if (new - centres).abs().max() < tol:
            centres = new
            break
        centres = new
    order = centres.argsort()
    return centres[order], u[:, order]


def fuzzy_bits(significance: torch.Tensor, boundary: float = 0.1, m: float = 2.0) -> list[int]:
    """Paper mode for one layer: cluster, map clusters by centre to 2/4/6/8 bits; when the two
    strongest memberships are within `boundary`, take the lower precision of the two."""
    n = significance.numel()
    c = min(len(FUZZY_BITS), n)
    _, u = fuzzy_cmeans(significance, c=c, m=m)
    levels = FUZZY_BITS[len(FUZZY_BITS) - c:] if c < len(FUZZY_BITS) else FUZZY_BITS
    out = []
    for row in u:
        top2 = row.topk(min(2, c))
        k = int(top2.indices[0])
        if c > 1 and float(top2.values[0] - top2.values[1]) < boundary:
            k = min(k, int(top2.indices[1]))                                      # low-precision-first
        out.append(levels[k])
    return out


OUTLIER_QUANTILE = 0.99   # E[x_c^2] above this quantile of an expert's channels counts as this quantile


def output_error(w_nk: torch.Tensor, mean_x2: torch.Tensor, group_size: int, bits=BITS, cap: bool = True):
    """Expected output error of RTN at each width, sum_c E[x_c^2] ||W[:, c] - Q(W)[:, c]||^2, and the
    output energy sum_c E[x_c^2] ||W[:, c]||^2. w_nk [E, N, K], mean_x2 [E, K] -> ([E, len(bits)], [E]).
    E[x_c^2] is capped at its OUTLIER_QUANTILE across channels: a massive activation (one channel with most
    of the energy, as in the reference model's layers 11 and 28, whose down_proj inputs hold 72-87% of
    their energy in one channel) would otherwise make every other channel's error look small."""
    m = mean_x2.float()
    if cap:
        m = m.minimum(m.quantile(OUTLIER_QUANTILE, dim=-1, keepdim=True))
    w = w_nk.float()
    energy = (w.pow(2).sum(-2) * m).sum(-1)
    g = w.unflatten(-1, (-1, group_size))                                          # [E, N, G, g]
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)                    # [E, N, G]
    errs = []
    for b in bits:
        qmax = (1 << check_bits(b)) - 1
        scale, zero = rtn_grid(lo, hi, qmax)                                         # quantize_rtn's grid
        s = scale.float()
        d = rounding_error(g, s, zero, qmax).square_().mul_(s.square()[..., None])  # [E, N, G, g]
        errs.append((d.sum(1).flatten(-2) * m).sum(-1))
    return torch.stack(errs, -1), energy


def relative_error(w_nk: torch.Tensor, mean_x2: torch.Tensor, group_size: int, bits=BITS) -> torch.Tensor:
    """output_error relative to the output energy: [E, len(bits)]."""
    err, energy = output_error(w_nk, mean_x2, group_size, bits)
    return err / energy.clamp(min=1e-30)[:, None]


def budget_bits(weights: torch.Tensor, sizes: torch.Tensor, errors: torch.Tensor, target_bits: float,
                group_size: int, bits=BITS) -> list[int]:
    """Exact knapsack by dynamic programming over code bits.
    weights [n] significance of each expert, sizes [n] weights stored per expert,
    errors [n, len(bits)] error of each width. Minimises sum weights * errors with
    sum sizes * (bits + overhead) <= target_bits * sum sizes. Returns one width per expert."""
    overhead = OVERHEAD_BITS_PER_GROUP / group_size
    lo, hi = min(bits) + overhead, max(bits) + overhead
    if target_bits < lo - 1e-9:
        raise QuantizationError(f"target_bits={target_bits} is below what {min(bits)}-bit experts cost "
                                f"({lo:.4f} bits with group_size={group_size}); raise it or the group size")
    if target_bits >= hi:
        return [max(bits)] * len(weights)
    unit = math.gcd(*[int(s) for s in sizes.tolist()])
    w_units = (sizes // unit).long()                                           # [n]
    budget = int(math.floor((target_bits - overhead) * int(w_units.sum()) + 1e-6))
    if budget > 2_000_000:
        raise QuantizationError("the budget is too fine-grained for the exact allocator; use equal expert sizes")
    cost = (weights[:, None].double() * errors.double())                       # [n, nb]
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = []
    for i in range(len(weights)):
        new = torch.full_like(best, inf)
        arg = torch.zeros(budget + 1, dtype=torch.int8)
        for j, b in enumerate(bits):
            c = int(w_units[i]) * b
            if c > budget:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[:budget + 1 - c] + cost[i, j]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(j, dtype=torch.int8), arg)
        choice.append(arg)
        best = new
    if not torch.isfinite(best).any():
        raise QuantizationError(f"no allocation meets target_bits={target_bits}")
    used = int(best.argmin())
    out = []
    for i in reversed(range(len(weights))):
        j = int(choice[i][used])
        out.append(bits[j])
        used -= int(w_units[i]) * bits[j]
    return out[::-1]


def storage_average(bits_per_expert: list[int], sizes: list[int], group_size: int) -> float:
    over = OVERHEAD_BITS_PER_GROUP / group_size
    return sum((b + over) * s for b, s in zip(bits_per_expert, sizes)) / sum(sizes)


def with_prior(sig: torch.Tensor, prior: float) -> torch.Tensor:
    """Mix a layer's significance [E] with uniform traffic: (1 - prior) * sig + prior * mean(sig).
    Calibration data never covers every domain a model serves; an expert it rarely routes to may
    carry most of another domain's tokens, and without a prior it would take the lowest width."""
    if not 0 <= prior <= 1:
        raise QuantizationError(f"prior={prior} must be between 0 (calibration only) and 1 (uniform traffic)")
    return (1 - prior) * sig + prior * sig.mean()


def allocate(model, analysis, mode: str, group_size: int, target_bits: float | None = None,
             dataset_weights: dict | None = None, lam: float = 1.0, prior: float = 0.0,
             progress: bool = True) -> dict[int, list[int]]:
    """Bits of every expert of every MoE layer from an Analysis.
    mode: "fuzzy" (paper), "budget" (exact average, significance-weighted error) or "frequency"
    (the same budget, with routing frequency as the only significance: an ablation).
    prior: weight of uniform traffic mixed into every layer's significance (with_prior)."""
    from tqdm.auto import tqdm

    from . import adapters
    from .analysis import _weights_nk

    analysis.check_model(model)
    blocks = {b.layer: b for b in adapters.moe_blocks(model)}
    by_loss = mode == "budget" and analysis.has_sensitivity
    if mode == "frequency":
        sig = analysis.usage()
    else:
        sig = analysis.synthesized(dataset_weights, lam, loss=by_loss)
    sig = {layer: with_prior(s, prior) for layer, s in sig.items()}
    if mode == "fuzzy":
        return {layer: fuzzy_bits(sig[layer]) for layer in analysis.layers}
    if mode not in ("budget", "frequency"):
        raise QuantizationError(f"unknown allocation {mode!r}; choose 'budget', 'fuzzy' or 'frequency'")
    if target_bits is None:
        raise QuantizationError(f"allocation={mode!r} needs target_bits= (average stored bits per expert weight)")
    if mode == "budget" and not by_loss:
        warnings.warn("the analysis has no loss sensitivity (analyze(sensitivity_tokens=0) or an older dynamoq): "
                      "every layer weighs the same in the allocation", stacklevel=2)
    weights, sizes, errors, index = [], [], [], []
    for layer in tqdm(analysis.layers, desc="measuring quantization error", disable=not progress):
        ws = _weights_nk(blocks[layer])
        if by_loss:     # channels weighted as the loss sees them; no cap (the loss gradient already weighs outliers)
            per_proj = [output_error(w, g, group_size, cap=False) for w, g in zip(ws, analysis.gradient_x2(layer))]
        else:           # mean E[x^2] over the calibration datasets, per projection
            mx = [sum(t) / len(analysis.datasets) for t in zip(*[analysis.mean_x2(d, layer) for d in analysis.datasets])]
            per_proj = [output_error(w, m, group_size) for w, m in zip(ws, mx)]
        err, energy = sum(e for e, _ in per_proj), sum(en for _, en in per_proj)
        errors.append(err / energy.clamp(min=1e-30)[:, None])
        weights.append(sig[layer].double())
        sizes.append(torch.full((len(sig[layer]),), sum(w[0].numel() for w in ws), dtype=torch.long))
        index += [(layer, e) for e in range(len(sig[layer]))]
    flat = budget_bits(torch.cat(weights), torch.cat(sizes), torch.cat(errors), target_bits, group_size)
    out: dict[int, list[int]] = {layer: [] for layer in analysis.layers}
    for (layer, _), b in zip(index, flat):
        out[layer].append(b)
    return out
