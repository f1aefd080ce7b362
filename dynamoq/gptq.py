"""GPTQ on fused experts (METHOD.md §2): each expert's weight is quantized column by column, the
rounding error of each column pushed onto the columns not yet quantized through the inverse
Hessian of the tokens routed to that expert. Runs decoder layer by layer, so at most one layer's
Hessians are held, and each layer is calibrated on the outputs of the already-quantized layers."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import adapters
from .calibration import collecting, collecting_linears, input_device
from .packing import QuantizationError

MIN_TOKENS = 32   # fewer routed tokens: the expert-balanced Hessian, else round-to-nearest


def _group_grid(w: torch.Tensor, bits: int):
    """Asymmetric grid of one group w [N, g] (range always holds 0): scale [N], zero [N]."""
    qmax = (1 << bits) - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-6).half().float()
    zero = (-lo / scale).round().clamp(0, qmax)
    return scale, zero


def gptq(w_nk: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         act_order: bool = False, max_retries: int = 6):
    """w_nk [N, K], hessian [K, K] (X^T X of the inputs) -> codes [N, K] int32, scale, zero [N, K // g],
    and the damping that made the Hessian positive definite."""
    n, k = w_nk.shape
    qmax = (1 << bits) - 1
    w = w_nk.float().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    ngroups = k // group_size
    static = None
    if act_order:   # group grids fixed from the original weights, so columns may be visited in any order
        g = w.unflatten(-1, (ngroups, group_size))
        static = [_group_grid(g[:, j], bits) for j in range(ngroups)]
        perm = torch.argsort(h.diagonal(), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    mean_diag = h.diagonal().mean()
    for attempt in range(max_retries):
        hd = h + (damp * 10 ** attempt) * mean_diag * torch.eye(k, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                break
    else:
        raise QuantizationError(f"the Hessian is not positive definite even with damping {damp * 10 ** max_retries}")
    used_damp = damp * 10 ** attempt
    u = u.float()
    codes = torch.zeros(n, k, dtype=torch.int32)
    scale = torch.zeros(n, ngroups)
    zero = torch.zeros(n, ngroups)
    block = group_size * max(1, 128 // group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(perm[col]) // group_size
            if static is not None:
                s, z = static[grp]
            elif col % group_size == 0:
                s, z = _group_grid(w1[:, i:i + group_size], bits)
            if static is None and col % group_size == 0 or static is not None:
                scale[:, grp], zero[:, grp] = s, z
            q = (w1[:, i] / s).round().add(z).clamp(0, qmax)
            codes[:, col] = q.int()
            e = (w1[:, i] - (q - z) * s) / u[col, col]
            w1[:, i:] -= e[:, None] * u[col, i1 + i:i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv], scale.half(), zero.to(torch.uint8), used_damp


class _Stop(Exception):
    pass


def _layer_inputs(model, layers, windows, batch_size):
    """Hidden states and keyword arguments with which the first decoder layer is called, per batch."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise QuantizationError(f"{type(module).__name__} takes more than hidden_states positionally; "
                                    "layer-by-layer GPTQ cannot replay it")
        captured.append((hidden, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = input_device(model)
    try:
        for w in windows:                      # one [N, T] tensor per calibration dataset
            for i in range(0, w.shape[0], batch_size):
                try:
                    model(input_ids=w[i:i + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _run(layer, inputs):
    out = []
    for h, kw in inputs:
        y = layer(h, **kw)
        out.append((y[0] if isinstance(y, tuple) else y, kw))
    return out


@torch.no_grad()
def quantize_model(model, targets, windows: list[torch.Tensor], group_size: int, damp: float = 0.01,
                   act_order: bool = False, balanced: bool = True, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """GPTQ for the fused-expert targets and the nn.Linear weights of shared experts and dense MLPs,
    round-to-nearest for the rest, decoder layer by layer."""
    blocks = {b.layer: b for b in adapters.moe_blocks(model)}
    layers = adapters.decoder_layers(model)
    by_layer: dict[int, list] = {}
    for t in targets:
        by_layer.setdefault(adapters.layer_index(t.fqn), []).append(t)
    report = {"fallback_rtn": [], "balanced_hessian": [], "damping": {}}
    inputs = _layer_inputs(model, layers, windows, batch_size)
    for i in tqdm(range(len(layers)), desc="GPTQ", unit="layer", disable=not progress):
        todo = by_layer.get(i, [])
        block = blocks.get(i)
        gptq_targets = [t for t in todo if block is not None and t.owner is block.experts
                        and block.adapter.calibration is None]
        linear_targets = [t for t in todo if isinstance(t.owner, torch.nn.Linear)]
        if gptq_targets or linear_targets:
            # routed Hessians for every expert; the balanced one (every token) only for experts short of tokens
            with collecting(model, blocks=[block] if gptq_targets else [], hessian=True, keep_inputs=balanced) as hooks, \
                    collecting_linears({t.fqn: t.owner for t in linear_targets}, hessian=True) as lin:
                _run(layers[i], inputs)
            for t in linear_targets:
                s = lin[t.fqn].stats
                if s is None or s.count[0] < MIN_TOKENS:
                    report["fallback_rtn"].append(t.fqn)
                    t.apply(group_size)
                    continue
                codes, scale, zero, d = gptq(t.weight.detach().float().cpu(), s.hessian[0][0].cpu(), t.bits[0],
                                             group_size, damp, act_order)
                t.apply(group_size, codes=(codes[None], scale[None], zero[None]))
        if gptq_targets:
            hook = hooks[block.layer]
            stats = hook.stats
            names = [p.name for p in block.projections]
            for t in gptq_targets:
                p = names.index(t.name)
                w = t.weight.detach()
                w_nk = (w.transpose(-1, -2) if t.transposed else w).float().cpu()
                e_n, n, k = w_nk.shape
                codes = torch.empty(e_n, n, k, dtype=torch.int32)
                scale = torch.empty(e_n, n, k // group_size, dtype=torch.float16)
                zero = torch.empty(e_n, n, k // group_size, dtype=torch.uint8)
                for e in range(e_n):
                    if stats.count[e] >= MIN_TOKENS:
                        hess = stats.hessian[p][e]
                    elif balanced:
                        hess = hook.balanced_hessian(p, e)
                        report["balanced_hessian"].append(f"{t.fqn}[{e}]")
                    else:
                        from .packing import quantize_rtn
                        codes[e], scale[e], zero[e] = quantize_rtn(w_nk[e], t.bits[e], group_size)
                        report["fallback_rtn"].append(f"{t.fqn}[{e}]")
                        continue
                    codes[e], scale[e], zero[e], d = gptq(w_nk[e], hess.cpu(), t.bits[e], group_size, damp, act_order)
                    if d != damp:
                        report["damping"][f"{t.fqn}[{e}]"] = d
                t.apply(group_size, codes=(codes, scale, zero))
            del stats, hook, hooks
        for t in todo:
            if t not in gptq_targets and t not in linear_targets:
                t.apply(group_size)
        inputs = _run(layers[i], inputs)
    return report
