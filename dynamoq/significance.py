"""Significance at three levels (METHOD.md §1), each one small function of calibration sums.

Notation for one MoE layer and one dataset, projection p with input channels c:
  n[e]          tokens routed to expert e
  x2[e, c]      sum over routed tokens of x_c^2            (E[x_c^2] = x2 / n)
  wx2[e, c]     sum over routed tokens of w_te * x_c^2     (w_te: routing weight)
  col2[e, c]    ||W_e[:, c]||^2                            (energy of input channel c in the weight)
"""
from __future__ import annotations

import torch


def column_energy(w_nk: torch.Tensor) -> torch.Tensor:
    """col2 [E, K] = squared norm of every input column of W [E, N, K]."""
    return w_nk.float().pow(2).sum(-2)


def channel_significance(x2: torch.Tensor, n: torch.Tensor, col2: torch.Tensor) -> torch.Tensor:
    """S_ch [E, K] = E[x_c^2 over tokens routed to e] * ||W_e[:, c]||^2 (0 for an expert with no token)."""
    mean_x2 = x2 / n.clamp(min=1).unsqueeze(-1).to(x2.dtype)
    return mean_x2 * col2.to(x2.dtype)


def expert_significance(wx2: list[torch.Tensor], col2: list[torch.Tensor]) -> torch.Tensor:
    """S_exp [E] (paper Eq. 1): each expert's share of its layer's routed, weighted channel energy,
    sum over projections p and channels c of wx2_p[e, c] * col2_p[e, c], normalised to sum to 1."""
    s = sum((a.double() * b.double()).sum(-1) for a, b in zip(wx2, col2))
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / s.numel())


def loss_significance(gx2: list[torch.Tensor], col2: list[torch.Tensor], tokens: float) -> torch.Tensor:
    """S_loss [E] (our addition, for the budget allocation): sum over projections p and channels c of
    gx2_p[e, c] * col2_p[e, c] per token, gx2 being x_c^2 weighted by the squared loss gradient at the
    projection's output (calibration.sensitivity). S_loss times a relative error of the expert's weights
    (weighted by gx2 as well) estimates the loss that error adds. Unlike S_exp it is not normalised per
    layer, so that layers compare: on the reference model, 2-bit experts in one layer raised the loss
    by 0.04 (layer 16) to 1.19 nats (layer 29), and this estimate ranked the 30 layers alike (Spearman
    0.79, Pearson 0.90 between the logs; S_exp x relative error: -0.24 and 0.03; recipes/results/sensitivity.md)."""
    s = sum((a.double() * b.double()).sum(-1) for a, b in zip(gx2, col2))
    return s / max(float(tokens), 1.0)


def synthesize(per_dataset: torch.Tensor, weights: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """Cross-dataset significance (paper Eq. 2, our reading): weighted mean over datasets plus
    lam times the across-dataset standard deviation. per_dataset [D, E] -> [E]."""
    d = per_dataset.shape[0]
    w = torch.full((d,), 1.0 / d, dtype=per_dataset.dtype) if weights is None else weights.to(per_dataset.dtype)
    w = w / w.sum()
    mean = (w[:, None] * per_dataset).sum(0)
    std = ((w[:, None] * (per_dataset - mean).pow(2)).sum(0)).sqrt() if d > 1 else torch.zeros_like(mean)
    return mean + lam * std


def channel_dynamics(s_ch: torch.Tensor) -> torch.Tensor:
    """How much each channel's significance changes across datasets: the std over datasets of the
    channel's share of its expert's channel significance (S_ch / sum_c S_ch, so a dataset's scale
    does not count). s_ch [D, E, K] -> [E, K] (0 when there is a single dataset).
    Shares, not logs: a channel that barely matters anywhere may vary by orders of magnitude, and
    caching it changes nothing (measured on the reference model: the top 1% by std of log S_ch held
    3-7% of a held-out domain's channel significance, by this measure 17-24%)."""
    if s_ch.shape[0] < 2:
        return torch.zeros_like(s_ch[0])
    s = s_ch.double()
    share = s / s.sum(-1, keepdim=True).clamp(min=1e-300)
    return share.std(0, unbiased=False).to(s_ch.dtype)


def top_share(dynamics: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total cross-dataset change carried by the top `fraction` most dynamic channels."""
    flat = dynamics.flatten().double()
    k = max(1, int(round(fraction * flat.numel())))
    total = flat.sum()
    return float(flat.topk(k).values.sum() / total) if total > 0 else 0.0
