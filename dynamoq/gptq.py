"""GPTQ on fused experts (METHOD.md §2): each expert's weight is quantized column by column, the
rounding error of each column pushed onto the columns not yet quantized through the inverse
Hessian of the tokens routed to that expert. Runs decoder layer by layer, so at most one layer's
Hessians are held, and each layer is calibrated on the outputs of the already-quantized layers."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import adapters
from .calibration import collecting, collecting_linears, input_device
from .packing import DATA_FREE, QuantizationError, searched_grid
from .tensors import dequantized_once

MIN_TOKENS = 32   # fewer routed tokens: the expert-balanced Hessian, else round-to-nearest (FALLBACK)
FALLBACK = "clip"  # the data-free quantizer of what GPTQ has no Hessian for: searched grids like its own
BLOCK = 32        # columns updated element-wise per column; the rest by one matrix product per block
# An expert's Hessian from n routed tokens in K dimensions is damped by at least TOKEN_DAMP * K / n of its
# mean diagonal (shrinkage towards the identity: few tokens estimate a K x K matrix badly, and GPTQ would
# fit their noise). On the reference model (3-bit, validation perplexity): chinese 19.07 -> 16.80, bible
# 9.08 -> 8.37, calibration domains within 1% (drama 32.25 -> 32.35, german 31.39 -> 31.08); 4 was worse.
TOKEN_DAMP = 1.0


def _factor(hf: torch.Tensor):
    """hf [B, K, K] = J hd J, a positive definite hd with its indices reversed -> (u [B, K, K] upper with
    u^T u = hd^-1, ok [B]). The Cholesky factor of hf, M M^T (M lower), gives hd = R R^T with R = J M J
    upper, so u = R^-1: a triangular solve, no inverse of hd formed."""
    m, info = torch.linalg.cholesky_ex(hf)
    u = torch.linalg.solve_triangular(m.flip(-2, -1), torch.eye(hf.shape[-1], dtype=hf.dtype), upper=True)
    return u, (info == 0) & u.diagonal(dim1=-2, dim2=-1).isfinite().all(-1)


def _inverse_factor(h: torch.Tensor, damp, max_retries: int):
    """Upper triangular u with u^T u = (h + damping)^-1, h [B, K, K] float32 -> (u [B, K, K] float32,
    damping [B] as a share of each mean diagonal). Factorised in float32, which takes half the time of
    float64 and, with a damping of at least 1% of the mean diagonal, errs far below it (|u^T u (h +
    damping) - I| ~ 1e-6 on K = 1536 Hessians of the reference model); a matrix float32 cannot factor
    is factorised in float64, and one that is not positive definite even so is retried alone with ten
    times the damping."""
    b, k = h.shape[0], h.shape[-1]
    mean_diag = h.diagonal(dim1=-2, dim2=-1).double().mean(-1)                        # [B]
    base = torch.as_tensor(damp, dtype=torch.float64).expand(b)                        # [B]
    tries = torch.zeros(b, dtype=torch.long)
    u = torch.empty(b, k, k)
    todo = torch.arange(b)
    while len(todo):
        if int(tries[todo].max()) >= max_retries:
            raise QuantizationError(f"the Hessian is not positive definite even with damping "
                                    f"{float(base[todo].max()) * 10 ** max_retries:g}")
        d = base[todo] * 10.0 ** tries[todo].double() * mean_diag[todo]                 # [B'] added to the diagonal
        hf = (h if len(todo) == b else h[todo]).flip(-2, -1)                              # a copy: damped in place
        hf.diagonal(dim1=-2, dim2=-1).add_(d.float()[:, None])
        uu, ok = _factor(hf)
        if not ok.all():
            redo = (~ok).nonzero().squeeze(1)
            u64, ok64 = _factor(hf[redo].double())
            uu[redo], ok[redo] = u64.float(), ok64
        if bool(ok.all()) and len(todo) == b:
            u = uu
        else:
            u[todo[ok]] = uu[ok]
        tries[todo[~ok]] += 1
        todo = todo[~ok]
    return u, [float(d) * 10 ** int(t) for d, t in zip(base, tries)]


def gptq(w_nk: torch.Tensor, hessian: torch.Tensor, bits, group_size: int, damp=0.01,
         act_order: bool = False, max_retries: int = 6, keep: torch.Tensor | None = None):
    """w_nk [N, K] or a batch [B, N, K] (the experts of one projection, solved together: one pass over
    the columns for all of them), hessian [K, K] or [B, K, K] (X^T X of the inputs), bits an int or one
    per batch entry, damp (a share of the mean diagonal) a float or one per batch entry -> codes [..., N, K]
    int32, scale, zero [..., N, K // g] (each group's grid from packing.searched_grid), the damping that made each
    Hessian positive definite (a float, or a list for a batch), and updated [..., N, K]: the value each
    column had when it was quantized (the original plus the error fed to it by earlier columns).
    keep [..., K] bool: columns whose rounding error is fed to no other column, the switching cache's,
    so that a switch may re-quantize them (from `updated`) without undoing the others' compensation."""
    single = w_nk.dim() == 2
    w, h = (w_nk[None], hessian[None]) if single else (w_nk, hessian)
    b, n, k = w.shape
    bits = [bits] * b if isinstance(bits, int) else list(bits)
    qmax = torch.tensor([(1 << x) - 1 for x in bits], dtype=torch.float32)[:, None]      # [B, 1]
    w = w.float().clone()
    h = h.to(torch.float32, copy=True)
    dead = h.diagonal(dim1=-2, dim2=-1) == 0                                              # [B, K]
    h.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    ngroups = k // group_size
    rows = torch.arange(b)
    # what a column's rounding error costs when a grid is chosen: its Hessian diagonal; 0 for kept columns
    # (a switch re-quantizes them), so that their values do not move the grid of the others
    grid_w = h.diagonal(dim1=-2, dim2=-1).float()                                        # [B, K]
    if keep is not None:
        grid_w = grid_w * (~keep.reshape(b, k))
    static = None
    if act_order:   # group grids fixed from the original weights, so columns may be visited in any order
        g = w.unflatten(-1, (ngroups, group_size))                                        # [B, N, G, g]
        gw = grid_w.unflatten(-1, (ngroups, group_size))                                  # [B, G, g]
        grids = [searched_grid(g[:, :, j], qmax, gw[:, j, None]) for j in range(ngroups)]
        static = (torch.stack([s for s, _ in grids], -1), torch.stack([z for _, z in grids], -1))  # [B, N, G]
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)       # [B, K]
        w = w.gather(-1, perm[:, None, :].expand(-1, n, -1))
        h = h.gather(-1, perm[:, None, :].expand(-1, k, -1)).gather(-2, perm[:, :, None].expand(-1, -1, k))
    else:
        perm = torch.arange(k).expand(b, k)
    feed = None if keep is None else (~keep.reshape(b, k).gather(-1, perm)).float()     # [B, K] in visiting order
    u, used = _inverse_factor(h, damp, max_retries)
    wt = w.transpose(1, 2).contiguous()                                                   # [B, K, N]: column k is row k
    codes = torch.zeros(b, k, n, dtype=torch.int32)                                       # [B, K, N]
    scale = torch.zeros(b, n, ngroups) if static is None else static[0]
    zero = torch.zeros(b, n, ngroups) if static is None else static[1]
    # columns in blocks: inside one, every column's error updates the block's later columns; the
    # columns after it are updated once per block by a matrix product. A block divides the group, so
    # a group's grid is taken when its first column starts a block and the whole group is up to date.
    block = math.gcd(group_size, BLOCK)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        if static is None and i1 % group_size == 0:
            s, z = searched_grid(wt[:, i1:i1 + group_size].transpose(1, 2), qmax, grid_w[:, None, i1:i1 + group_size])
            scale[:, :, i1 // group_size], zero[:, :, i1 // group_size] = s, z
        w1 = wt[:, i1:i2]                                                                 # [B, block, N], a view
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                grp = perm[:, col] // group_size                                          # [B]
                s, z = static[0][rows, :, grp], static[1][rows, :, grp]                   # [B, N]
            q = torch.minimum((w1[:, i] / s).round().add(z).clamp(min=0), qmax)          # [B, N]
            codes[:, col] = q
            e = (w1[:, i] - (q - z) * s) / u[:, col, col][:, None]                        # [B, N]
            if feed is not None:
                e = e * feed[:, col, None]
            w1[:, i + 1:] -= u[:, col, col + 1:i2, None] * e[:, None, :]
            err1[:, i] = e
        wt[:, i2:] -= u[:, i1:i2, i2:].transpose(1, 2) @ err1
    back = torch.argsort(perm, dim=-1)[:, None, :].expand(-1, n, -1)
    codes = codes.transpose(1, 2).gather(-1, back)
    updated = wt.transpose(1, 2).gather(-1, back)           # a column never changes once quantized
    scale, zero = scale.half(), zero.to(torch.uint8)
    if single:
        return codes[0], scale[0], zero[0], used[0], updated[0]
    return codes, scale, zero, used, updated


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
    round-to-nearest for the rest (the output head too), decoder layer by layer."""
    blocks = {b.layer: b for b in adapters.moe_blocks(model)}
    layers = adapters.decoder_layers(model)
    by_layer: dict[int, list] = {}
    heads = []                                   # outside the decoder layers: no layer pass gives their Hessian
    for t in targets:
        if adapters.is_output_head(t.owner, t.fqn.removesuffix(".weight")):
            heads.append(t)
        else:
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
            with collecting(model, blocks=[block] if gptq_targets else [], hessian=True, keep_inputs=balanced,
                            outputs=False) as hooks, \
                    collecting_linears({t.fqn: t.owner for t in linear_targets}, hessian=True) as lin:
                _run(layers[i], inputs)
            for t in linear_targets:
                s = lin[t.fqn].stats
                if s is None or s.count[0] < MIN_TOKENS:
                    report["fallback_rtn"].append(t.fqn)
                    t.apply(group_size, quantizer=FALLBACK)
                    continue
                codes, scale, zero, d, _ = gptq(t.weight.detach().float().cpu(), s.hessian[0][0].cpu(), t.bits[0],
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
                solve, hessians = [], []
                for e in range(e_n):
                    if stats.count[e] >= MIN_TOKENS:
                        hessians.append(stats.hessian[p][e])
                    elif balanced:
                        hessians.append(hook.balanced_hessian(p, e))
                        report["balanced_hessian"].append(f"{t.fqn}[{e}]")
                    else:
                        codes[e], scale[e], zero[e] = DATA_FREE[FALLBACK](w_nk[e], t.bits[e], group_size)
                        report["fallback_rtn"].append(f"{t.fqn}[{e}]")
                        continue
                    solve.append(e)
                keep = None
                if t.cache_idx is not None:       # [E, r] -> [E, K]: the cached columns feed no error forward
                    keep = torch.zeros(e_n, k, dtype=torch.bool).scatter_(-1, t.cache_idx.cpu(), True)
                if solve:
                    damps = [max(damp, TOKEN_DAMP * k / int(stats.count[e])) if stats.count[e] >= MIN_TOKENS else damp
                             for e in solve]
                    c, s_, z, used, upd = gptq(w_nk[solve], torch.stack([x.cpu() for x in hessians]),
                                               [t.bits[e] for e in solve], group_size, damps, act_order,
                                               keep=None if keep is None else keep[solve])
                    codes[solve], scale[solve], zero[solve] = c, s_, z
                    if keep is not None:
                        w_nk = w_nk.clone()           # may share the model's storage: never written
                        w_nk[solve] = upd
                    for e, d, d0 in zip(solve, used, damps):
                        if d != d0:
                            report["damping"][f"{t.fqn}[{e}]"] = d
                t.apply(group_size, codes=(codes, scale, zero), w_fp=w_nk)
            del stats, hook, hooks
        for t in todo:
            if t not in gptq_targets and t not in linear_targets:
                t.apply(group_size, quantizer=FALLBACK)
        if i + 1 < len(layers):                  # the next layer's inputs, through this layer quantized
            with dequantized_once():
                inputs = _run(layers[i], inputs)
    for t in heads:
        t.apply(group_size, quantizer=FALLBACK)
    return report
