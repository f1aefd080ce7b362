"""The GPU decode kernel, hand-written in Triton: packed experts of mixed bit-widths times token-expert pairs.

Inductor's loops (kernels.decode_linear) on a GPU run one loop nest per bit-width over every pair, the pairs of
the other widths masked: they skip their loads but not their share of the work, so a mixed-width layer cost
several times a uniform one (H200, OLMoE shape, 16 tokens: mixed 2.81 ms, uniform 3-bit 0.81, bf16 0.47;
recipes/results/kernels_gpu.md). Here one program computes a block of rows of one pair and branches once on its
expert's width (a scalar branch: every program runs the code of its own width only), so a mixed layer costs
what its bytes cost. Per step of a few groups it loads the rows' code bytes of each plane (packing.py's layout:
byte l of chunk h holds the inputs h * c * L + p * L + l, p = 0..c-1), takes each part out with a shift and a
mask, multiplies by the pair's x (fp32) at those inputs and sums per group; then scale * (sum q x - zero *
sum x) per group, as the other paths do, plus a switching cache's correction (cache_delta times x at the cached
channels). At one token a GPU layer is bound by its launches more than by its bytes, so an experts module that
gates as transformers does by default (kernels._silu_gated) takes two kernels: gate_up with silu(gate) * up
(gated), then down with each token's sum over its pairs, weighted by the router (combined).

Not measured on a GPU yet (none was lent since it was written): off by default (kernels.TRITON), checked against
the dequantized product under Triton's interpreter, traced by torch.compile and compiled for sm_90 without a GPU
(tests/test_triton_kernels.py); recipes/bench_gpu.sh measures it beside Inductor's loops, and on a GPU each shape's
first call picks the rows per program and warps (_TUNED). Importing this module needs the triton package (on a CUDA machine it comes with
torch; on CPU only TRITON_INTERPRET=1 runs the kernel); kernels.py imports it where triton is installed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import packing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"     # Triton's interpreter: the kernel on CPU (tests)
BLOCK_N = 32          # output rows per program under the interpreter (on a GPU: autotuned, _TUNED)
STEP_BYTES = 128      # code bytes per row and step, about (whole groups, a power of two of them)


@triton.jit
def _plane_terms(codes, xrow, rows, row_bytes, mask_n, g, start, G: tl.constexpr, GS: tl.constexpr,
                 L: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr, BGP: tl.constexpr):
    # one plane of width W at byte `start` of each row: [BLOCK_N, GB] sums over each group of
    # (plane value << OFF) * x; g [GB] the step's groups
    BG: tl.constexpr = GS * W // 8            # bytes per group
    C: tl.constexpr = 8 // W                  # codes per byte
    j = tl.arange(0, BGP)                     # byte of the group (padded to a power of two)
    mg = (g < G)[:, None] & (j < BG)[None, :]                                   # [GB, BGP]
    at = rows[:, None, None] * row_bytes + start + (g[:, None] * BG + j[None, :])[None, :, :]
    byte = tl.load(codes + at, mask=mask_n[:, None, None] & mg[None, :, :], other=0).to(tl.int32)
    h, lane = j // L, j % L
    acc = tl.zeros([rows.shape[0], g.shape[0]], tl.float32)
    for p in tl.static_range(C):
        xv = tl.load(xrow + g[:, None] * GS + (h * (C * L) + p * L + lane)[None, :], mask=mg, other=0.0)
        part = ((byte >> (W * p)) & ((1 << W) - 1)).to(tl.float32)              # [BLOCK_N, GB, BGP]
        acc += tl.sum(part * xv[None, :, :], axis=2)
    return acc * (1 << OFF)


@triton.jit
def _width_rows(q, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K: tl.constexpr, G: tl.constexpr,
                GS: tl.constexpr, L: tl.constexpr, GB: tl.constexpr, W1: tl.constexpr, P1: tl.constexpr,
                W2: tl.constexpr, OFF2: tl.constexpr, P2: tl.constexpr):
    # rows of expert e (slot among the experts of its width: codes q [E_b, N, K * (W1 + W2) / 8], planes as
    # packing.PLANES: W1 at offset 0, then W2 at offset OFF2 where W2 > 0) times one pair's x -> [BLOCK_N] fp32,
    # GB groups a step
    ROW: tl.constexpr = K * (W1 + W2) // 8
    base = q + slot * N * ROW
    acc = tl.zeros([rows.shape[0]], tl.float32)
    for g0 in range(0, G, GB):
        g = g0 + tl.arange(0, GB)
        t = _plane_terms(base, xrow, rows, ROW, mask_n, g, 0, G, GS, L, W1, 0, P1)
        if W2 > 0:
            t += _plane_terms(base, xrow, rows, ROW, mask_n, g, K * W1 // 8, G, GS, L, W2, OFF2, P2)
        mg = g < G
        at = (e * N + rows)[:, None] * G + g[None, :]
        m2 = mask_n[:, None] & mg[None, :]
        sc = tl.load(scale + at, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(zero + at, mask=m2, other=0).to(tl.float32)
        xsum = tl.load(xsum_row + g, mask=mg, other=0.0)
        acc += tl.sum(sc * (t - z * xsum[None, :]), axis=1)
    return acc


@triton.jit
def _pair_rows(s, rows, mask_n, x, xsum, ids, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, N, PER,
               K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
               RP: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B4: tl.constexpr, B8: tl.constexpr,
               GB2: tl.constexpr, GB3: tl.constexpr, GB4: tl.constexpr, GB6: tl.constexpr, GB8: tl.constexpr):
    # rows [BLOCK_N] of pair s's expert times the pair's x (row s / PER) -> [BLOCK_N] fp32, with its switching
    # cache's correction where R > 0
    e = tl.load(ids + s).to(tl.int64)
    b = tl.load(meta + 2 * e)
    slot = tl.load(meta + 2 * e + 1).to(tl.int64)
    row = (s // PER).to(tl.int64)
    xrow, xsum_row = x + row * K, xsum + row * G
    if b == 2:
        acc = _width_rows(q2, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K, G, GS, L, GB2, 2, B2, 0, 0, 1)
    elif b == 3:
        acc = _width_rows(q3, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K, G, GS, L, GB3, 2, B2, 1, 2, B1)
    elif b == 4:
        acc = _width_rows(q4, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K, G, GS, L, GB4, 4, B4, 0, 0, 1)
    elif b == 6:
        acc = _width_rows(q6, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K, G, GS, L, GB6, 4, B4, 2, 4, B2)
    else:
        acc = _width_rows(q8, slot, e, xrow, xsum_row, scale, zero, rows, mask_n, N, K, G, GS, L, GB8, 8, B8, 0, 0, 1)
    if R > 0:                       # cache_idx [E, R], cache_delta [E, N, R]: sum_i delta[n, i] * x[idx[i]]
        i = tl.arange(0, RP)
        mi = i < R
        xg = tl.load(xrow + tl.load(cache_idx + e * R + i, mask=mi, other=0), mask=mi, other=0.0)
        d = tl.load(cache_delta + (e * N + rows)[:, None] * R + i[None, :], mask=mask_n[:, None] & mi[None, :],
                    other=0.0)
        acc += tl.sum(d.to(tl.float32) * xg[None, :], axis=1)
    return acc


@triton.jit
def _decode(x, xsum, ids, weights, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, y, N, PER,
            K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, L: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
            BLOCK: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B4: tl.constexpr, B8: tl.constexpr,
            GB2: tl.constexpr, GB3: tl.constexpr, GB4: tl.constexpr, GB6: tl.constexpr, GB8: tl.constexpr,
            GATED: tl.constexpr, PAIRS: tl.constexpr):
    # x [X, K] fp32, xsum [X, G] its sums per group, ids [S], meta [E, 2] int32 (bits, slot among the experts of
    # its width), q{b} [E_b, N, K * b / 8] uint8, scale [E, N, G] fp16, zero [E, N, G] uint8; pair s reads x row
    # s / PER; B{w}: a group's bytes in a plane of width w, rounded up to a power of two; GB{b}: groups per step for
    # b bits; a switching cache where R > 0 (RP: R rounded up to a power of two). y:
    #   GATED: [S, N / 2] = silu(first half's rows . x) * (second half's rows . x), each pair (program axis 0)
    #   PAIRS = k > 0: [T, N] = sum over a token's k pairs (t k .. t k + k - 1) of weights[pair] * rows . x
    #   else: [S, N] = rows . x, each pair
    i = tl.program_id(0)
    rows = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    if GATED:
        half = N // 2
        mask = rows < half
        a = _pair_rows(i, rows, mask, x, xsum, ids, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, N,
                       PER, K, G, GS, L, R, RP, B1, B2, B4, B8, GB2, GB3, GB4, GB6, GB8)
        u = _pair_rows(i, rows + half, mask, x, xsum, ids, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx,
                       cache_delta, N, PER, K, G, GS, L, R, RP, B1, B2, B4, B8, GB2, GB3, GB4, GB6, GB8)
        tl.store(y + i * half + rows, a / (1.0 + tl.exp(-a)) * u, mask=mask)
    elif PAIRS > 0:
        mask = rows < N
        out = tl.zeros([BLOCK], tl.float32)
        for j in range(PAIRS):
            s = i * PAIRS + j
            out += tl.load(weights + s).to(tl.float32) * _pair_rows(
                s, rows, mask, x, xsum, ids, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, N, PER,
                K, G, GS, L, R, RP, B1, B2, B4, B8, GB2, GB3, GB4, GB6, GB8)
        tl.store(y + i * N + rows, out, mask=mask)
    else:
        mask = rows < N
        out = _pair_rows(i, rows, mask, x, xsum, ids, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, N,
                         PER, K, G, GS, L, R, RP, B1, B2, B4, B8, GB2, GB3, GB4, GB6, GB8)
        tl.store(y + i * N + rows, out, mask=mask)


# On a GPU the first call of each shape times these and keeps the fastest (rows per program, warps); under the
# interpreter (tests) the kernel runs as written, BLOCK_N rows a program.
_TUNED = _decode if INTERPRET else triton.autotune(
    [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 2), (16, 4), (32, 4), (64, 4), (64, 8))],
    key=["N", "K", "GS", "GATED", "PAIRS"])(_decode)


def layout(groups: int, group_size: int) -> dict:
    """The kernels' constants for rows of `groups` groups of `group_size` inputs: K, G, GS, the chunk bytes L
    (packing.lanes) and B{w}, a group's bytes in a plane of width w rounded up to a power of two."""
    pow2 = triton.next_power_of_2
    return dict(K=groups * group_size, G=groups, GS=group_size, L=packing.lanes(group_size), B1=pow2(group_size // 8),
                B2=pow2(group_size // 4), B4=pow2(group_size // 2), B8=pow2(group_size))


@torch.library.triton_op("dynamoq::triton_decode", mutates_args={})
def triton_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, meta: torch.Tensor, q2: torch.Tensor,
                  q3: torch.Tensor, q4: torch.Tensor, q6: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, cache_idx: torch.Tensor, cache_delta: torch.Tensor, group_size: int,
                  gated: bool, pairs: int) -> torch.Tensor:
    """x [X, K] fp32, ids [S], meta [E, 2] int32 (each expert's bits and slot among the experts of its width),
    q{b} [E_b, N, K * b / 8] (any uint8 tensor for a width without experts), scale / zero [E, N, G], a switching
    cache cache_idx [E, r], cache_delta [E, N, r] (r = 0: none); pair s reads x row s / (S / X). -> fp32:
    gated: [S, N / 2], silu of the first half of the rows times the second (transformers' gate_up);
    pairs = k > 0: [S / k, N], each token's k pairs summed with weights [S]; else [S, N].
    An operator torch.compile sees into: its Triton kernel lands in the compiled graph."""
    s_, x_rows = ids.shape[0], x.shape[0]
    n, g_ = scale.shape[1], scale.shape[2]
    gs, r = group_size, cache_idx.shape[1]
    rows_out, cols_out = (s_, n // 2) if gated else (s_ // pairs, n) if pairs else (s_, n)
    y = x.new_empty(rows_out, cols_out, dtype=torch.float32)
    if s_:
        pow2 = triton.next_power_of_2
        xsum = x.view(x_rows, g_, gs).sum(-1)                                     # [X, G]
        steps = {f"GB{b}": min(pow2(g_), pow2(max(1, STEP_BYTES * 8 // (gs * b)))) for b in packing.BITS}
        block = {"BLOCK": BLOCK_N} if INTERPRET else {}
        torch.library.wrap_triton(_TUNED)[lambda cfg: (rows_out, triton.cdiv(cols_out, cfg["BLOCK"]))](
            x, xsum, ids, weights, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, y, n, s_ // x_rows,
            R=r, RP=pow2(max(r, 1)), GATED=gated, PAIRS=pairs, **layout(g_, gs), **steps, **block)
    return y


def codes_and_cache(w, x, ids):
    """A DynaMoExperts w as the kernels take it: meta [E, 2] int32 (each expert's bits and slot among the experts of
    its width), the codes of each width of packing.BITS (another width's for a width without experts) and the
    switching cache (cache_idx [E, r], cache_delta [E, N, r]; r = 0 without one)."""
    meta = torch.tensor([v for pair in w._slots() for v in pair], dtype=torch.int32, device=x.device)  # [E, 2]
    codes = [getattr(w, f"q{b}") for b in packing.BITS]
    some = next(c for c in codes if c is not None)
    if w.cache_idx is None:
        cache = (ids.new_zeros(w.num_rows, 0), x.new_zeros(w.num_rows, 0, 0, dtype=torch.float32))
    else:
        cache = (w.cache_idx, w.cache_delta)
    return meta, [some if c is None else c for c in codes], cache


def _call(w, x, ids, weights=None, gated=False, pairs=0):
    xf = x.float().contiguous()
    meta, codes, cache = codes_and_cache(w, xf, ids)
    return triton_decode(xf, ids.contiguous(), xf if weights is None else weights.reshape(-1).contiguous(), meta,
                         *codes, w.scale, w.zero, *cache, w.group_size, gated, pairs)


def linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """kernels.expert_linear by this kernel: y[s] = W[ids[s]] @ x[s / k] for a DynaMoExperts w (storage [E, N, K]),
    x [X, K] (X = S, or S = k X: a token's k pairs share its row), ids [S] -> [S, N] fp32, a switching cache's
    corrections included."""
    return _call(w, x, ids)


def gated(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' gate_up and its default gate in one call: silu(gate . x) * (up . x) for a DynaMoExperts w whose
    rows are [gate; up] (storage [E, 2 I, K]), x [X, K], ids [S] -> [S, I] fp32."""
    return _call(w, x, ids, gated=True)


def combined(w, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The down projection and the routing weights' sum in one call: for a token t with pairs t k .. t k + k - 1,
    sum_j weights[t, j] W[ids[t k + j]] @ x[t k + j]; x [S, K], ids [S], weights [T, k] -> [T, N] fp32."""
    return _call(w, x, ids, weights, pairs=weights.shape[-1])
