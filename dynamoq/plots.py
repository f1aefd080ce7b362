"""PNG plots of an Analysis and of a quantization: expert significance, loss sensitivity, routing,
channel dynamics, bits per expert. Each function draws one figure into `path` and returns the path.

matplotlib is used through `Figure` and its Agg canvas only (no pyplot), so importing this module
never changes the backend of an interactive session and works without a display.
"""
from __future__ import annotations

import math
import os

import torch

from . import significance as _sig

BITS = (2, 3, 4, 6, 8)
MAX_PANELS = 12          # layers drawn by `routing` (evenly spaced when a model has more)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _matrix(per_layer: dict, layers: list[int]) -> torch.Tensor:
    """{layer: [E] values} -> [L, E] float (NaN-padded when layers have different expert counts)."""
    width = max(len(per_layer[layer]) for layer in layers)
    m = torch.full((len(layers), width), float("nan"), dtype=torch.float64)
    for i, layer in enumerate(layers):
        v = per_layer[layer]
        if v is not None:
            m[i, :len(v)] = torch.as_tensor([float("nan") if x is None else float(x) for x in v], dtype=torch.float64)
    return m


def _expert_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")


def _layer_ticks(ax, layers: list[int]) -> None:
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_ylabel("layer")


def _spaced(layers: list[int], k: int = MAX_PANELS) -> list[int]:
    if len(layers) <= k:
        return list(layers)
    return sorted({layers[round(i * (len(layers) - 1) / (k - 1))] for i in range(k)})


def significance(analysis, path) -> str:
    """Expert significance S_exp per layer (rows) and expert (columns): one heatmap per dataset and
    one of the synthesized cross-dataset significance that drives the bit allocation."""
    layers = analysis.layers
    panels = [(d, analysis.expert_significance(d)) for d in analysis.datasets]
    panels.append(("synthesized (mean + std)", analysis.synthesized()))
    mats = [(name, _matrix({k: v.tolist() for k, v in s.items()}, layers)) for name, s in panels]
    vmax = max(float(m.nan_to_num(0).max()) for _, m in mats) or 1.0
    cols = min(3, len(mats))
    rows = math.ceil(len(mats) / cols)
    n_exp = mats[0][1].shape[1]
    w = min(6.0, 2.0 + 0.08 * n_exp)
    h = min(5.0, 1.2 + 0.18 * len(layers))
    fig = _figure(cols * w + 1.0, rows * h + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, (name, m) in zip(axes.flat, mats):
        im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=10)
        _expert_ticks(ax)
        _layer_ticks(ax, layers)
    for ax in list(axes.flat)[len(mats):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.8, label="S_exp (share of the layer)")
    fig.suptitle("Expert significance per layer and dataset")
    return _save(fig, path)


def sensitivity(analysis, path) -> str:
    """Loss sensitivity per layer: the sum over the layer's experts of S_loss (the loss an equal relative
    error of every expert would add), one line per dataset, on a log scale. The budget allocation gives
    bits where it is high."""
    layers = analysis.layers
    fig = _figure(min(10.0, 4.0 + 0.15 * len(layers)), 3.6)
    ax = fig.subplots()
    for d in analysis.datasets:
        s = analysis.loss_significance(d)
        ax.plot(layers, [float(s[layer].sum()) for layer in layers], marker="o", markersize=3, label=d)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("S_loss, summed over experts")
    ax.legend(fontsize=8)
    ax.set_title("Loss sensitivity per layer")
    return _save(fig, path)


def routing(analysis, path) -> str:
    """Routing histograms: per layer (at most MAX_PANELS, evenly spaced), the share of the layer's
    top-k slots each expert received, one series per dataset."""
    layers = _spaced(analysis.layers)
    usage = {d: analysis.usage(d) for d in analysis.datasets}
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(cols * 4.5, rows * 2.6 + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(usage))]
    for ax, layer in zip(axes.flat, layers):
        n = len(next(iter(usage.values()))[layer])
        x = torch.arange(n, dtype=torch.float64)
        uniform = 1.0 / n
        if n <= 16:      # grouped bars
            width = 0.8 / len(usage)
            for i, (d, u) in enumerate(usage.items()):
                ax.bar((x - 0.4 + width * (i + 0.5)).numpy(), u[layer].double().numpy(), width,
                       label=d, color=colors[i])
        else:            # many experts: one step line per dataset
            for i, (d, u) in enumerate(usage.items()):
                ax.step(x.numpy(), u[layer].double().numpy(), where="mid", label=d, color=colors[i], lw=1)
        ax.axhline(uniform, color="0.4", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}", fontsize=10)
        _expert_ticks(ax)
        ax.set_ylabel("routing share")
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=min(len(labels), 6))
    fig.suptitle("Routing histograms per dataset (dashed: uniform)")
    return _save(fig, path)


def dynamics_summary(analysis, fraction: float = 0.01) -> dict:
    """{layer: share of the layer's cross-dataset change carried by its top `fraction` channels}
    and the same over all layers (METHOD.md §1: the paper sees ~1% of channels carry it)."""
    dyn = analysis.channel_dynamics()
    per_layer = {layer: _sig.top_share(torch.cat([t.flatten() for t in ts]), fraction) for layer, ts in dyn.items()}
    flat = torch.cat([t.flatten().double() for ts in dyn.values() for t in ts])
    return {"fraction": fraction, "per_layer": per_layer, "all": _sig.top_share(flat, fraction),
            "datasets": len(analysis.datasets)}


def dynamics(analysis, path, fraction: float = 0.01) -> str:
    """Channel dynamics (across-dataset spread of each channel's share of its expert's significance): their
    distribution over all channels, and per layer the share of the total change carried by the
    top `fraction` (1%) most dynamic channels."""
    dyn = analysis.channel_dynamics()
    flat = torch.cat([t.flatten().double() for ts in dyn.values() for t in ts])
    summary = dynamics_summary(analysis, fraction)
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    if summary["datasets"] < 2:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "one dataset: no cross-dataset dynamics", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
    else:
        ax1.hist(flat.numpy(), bins=60, color="C0")
        ax1.set_yscale("log")
        ax1.set_xlabel("channel dynamics (std over datasets of the share of S_ch)")
        ax1.set_ylabel("channels")
        cut = float(flat.topk(max(1, int(round(fraction * flat.numel())))).values.min())
        ax1.axvline(cut, color="C3", ls="--", lw=1, label=f"top {100 * fraction:g}%")
        ax1.legend(fontsize=8)
        layers = list(summary["per_layer"])
        ax2.bar(range(len(layers)), [100 * summary["per_layer"][k] for k in layers], color="C1")
        ax2.axhline(100 * fraction, color="0.4", ls="--", lw=0.8, label="if change were uniform")
        step = max(1, math.ceil(len(layers) / 16))
        ax2.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax2.set_xlabel("layer")
        ax2.set_ylabel(f"% of change in top {100 * fraction:g}% channels")
        ax2.legend(fontsize=8)
    fig.suptitle(f"Channel dynamics: top {100 * fraction:g}% of channels carry "
                 f"{100 * summary['all']:.1f}% of the cross-dataset change")
    return _save(fig, path)


def bits_heatmap(report: dict, path) -> str:
    """Bits of every routed expert (layers x experts) from `dynamoq.bits_report(model)` (or its JSON
    form, with string layer keys). Unquantized layers are left blank."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    experts = {int(k): v for k, v in report["experts"].items()}
    layers = sorted(k for k, v in experts.items() if v is not None) or sorted(experts)
    if not layers or all(experts[k] is None for k in layers):
        raise ValueError("the report lists no quantized expert: nothing to draw")
    m = _matrix(experts, layers)
    n_exp = m.shape[1]
    fig = _figure(min(14.0, max(6.5, 2.5 + 0.25 * n_exp)), min(10.0, max(3.0, 1.5 + 0.3 * len(layers))))
    ax = fig.subplots()
    cmap = ListedColormap(["#d73027", "#fc8d59", "#fee08b", "#91cf60", "#1a9850"]).with_extremes(bad="white")
    norm = BoundaryNorm([1.5, 2.5, 3.5, 5, 7, 9], cmap.N)
    im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    if m.numel() <= 400:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not math.isnan(m[i, j]):
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8)
    _expert_ticks(ax)
    _layer_ticks(ax, layers)
    cb = fig.colorbar(im, ax=ax, ticks=list(BITS))
    cb.set_label("bits")
    title = "Bits per expert"
    if report.get("storage_bits") is not None:
        title += f"\nstored average {report['storage_bits']:.3f} bits per weight (codes + scales + zeros)"
        if report.get("usage_bits") is not None:
            title += f", usage-weighted {report['usage_bits']:.3f}"
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
