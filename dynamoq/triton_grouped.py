"""The GPU prefill kernel, hand-written in Triton: a grouped matrix product of packed mixed-width experts and the
token-expert pairs routed to them, dequantized in registers and multiplied on the tensor cores (tl.dot).

Without it a GPU prefill (kernels.grouped_linear) writes every expert of each bit-width out in 16 bits and runs
one grouped product per width (0.8 GB of copies a call at OLMoE shape): the mixed-width OLMoE-shaped layer at 128
tokens cost 2.58 ms on the H200 against 0.49 for bf16 (recipes/results/kernels_gpu.md). Here one
program owns a block of BN output rows of one expert: it branches once on that expert's width, walks the
expert's pairs in blocks of BM (sorted by expert, kernels.use_grouped: many pairs) and, per group of the input
dimension, loads each plane's code bytes (packing.py: byte l of chunk h holds the inputs h * c * L + p * L + l),
takes the c parts out with shifts and masks into one [BN, c * bytes] tile of integer codes, loads the pairs' x
at the matching inputs and multiplies the two exactly (codes <= 255 are exact in bf16 and fp16; the products
are summed in fp32; fp32 x in two tf32 parts, tf32x3); then scale * (sum q x - zero * sum x) per group, as every other path, plus a switching
cache's correction. Nothing but the codes is read from memory, and each code byte once per BM pairs.

Not measured on a GPU yet (none was lent since it was written): on with kernels.TRITON, like triton_decode.py,
checked under Triton's interpreter against the dequantized product and compiled for sm_90 without a GPU
(tests/test_triton_kernels.py); on a GPU the first call of each shape picks the tile (_TUNED). Group sizes of 16
and more (tl.dot multiplies >= 16 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import INTERPRET, codes_and_cache, layout

BLOCKS = (16, 32)     # (pairs, rows) per program under the interpreter (on a GPU: autotuned, _TUNED)
MIN_GROUP = 16


@triton.jit
def _plane_dot(codes, row_bytes, start, rows, mask_n, x, xr, mask_m, g, K: tl.constexpr, GS: tl.constexpr,
               L: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr, BGP: tl.constexpr, F32: tl.constexpr):
    # group g of one plane of width W at byte `start` of each row, times the pairs' x -> [BM, BN] fp32:
    # sum over the group's inputs of (plane value << OFF) * x
    BG: tl.constexpr = GS * W // 8            # bytes per group
    C: tl.constexpr = 8 // W                  # codes per byte
    f = tl.arange(0, C * BGP)                 # part f / BGP of byte f % BGP of the group (padded to a power of two)
    j, p = f % BGP, f // BGP
    mj = j < BG
    byte = tl.load(codes + rows[:, None] * row_bytes + start + g * BG + j[None, :],
                   mask=mask_n[:, None] & mj[None, :], other=0)                                  # [BN, C * BGP]
    q = (byte >> (W * p).to(tl.uint8)[None, :]) & ((1 << W) - 1)
    k = g * GS + j // L * (C * L) + p * L + j % L                                               # input of each
    xt = tl.load(x + xr[:, None] * K + k[None, :], mask=mask_m[:, None] & mj[None, :], other=0.0)  # [BM, C * BGP]
    if F32:                                   # fp32 x: split in two tf32 parts (tf32x3), near fp32
        t = tl.dot(xt, tl.trans(q.to(tl.float32)), input_precision="tf32x3")
    else:                                     # bf16 / fp16 x: the codes are exact in its type
        t = tl.dot(xt, tl.trans(q.to(xt.dtype)))
    return t * (1 << OFF)


@triton.jit
def _expert(q, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
            K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, L: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
            W1: tl.constexpr, P1: tl.constexpr, W2: tl.constexpr, OFF2: tl.constexpr, P2: tl.constexpr,
            F32: tl.constexpr, BM: tl.constexpr):
    # rows of expert e (slot among the experts of its width: codes q [E_b, N, K * (W1 + W2) / 8], planes as
    # packing.PLANES: W1 at offset 0, then W2 at offset OFF2 where W2 > 0) times its pairs order[start:end], BM at
    # a time, into y (one width per call, so that one width's addresses are live at a time)
    ROW: tl.constexpr = K * (W1 + W2) // 8
    base = q + slot * N * ROW
    for m0 in range(start, end, BM):
        i = m0 + tl.arange(0, BM)
        mask_m = i < end
        pair = tl.load(order + i, mask=mask_m, other=0).to(tl.int64)
        xr = pair // PER
        acc = tl.zeros([BM, rows.shape[0]], tl.float32)
        for g in range(G):
            t = _plane_dot(base, ROW, 0, rows, mask_n, x, xr, mask_m, g, K, GS, L, W1, 0, P1, F32)
            if W2 > 0:
                t += _plane_dot(base, ROW, K * W1 // 8, rows, mask_n, x, xr, mask_m, g, K, GS, L, W2, OFF2, P2, F32)
            at = (e * N + rows) * G + g
            sc = tl.load(scale + at, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zero + at, mask=mask_n, other=0).to(tl.float32)
            xs = tl.load(xsum + xr * G + g, mask=mask_m, other=0.0)
            acc += t * sc[None, :] - xs[:, None] * (z * sc)[None, :]
        if R > 0:                   # cache_idx [E, R], cache_delta [E, N, R]: sum_i delta[n, i] * x[idx[i]]
            c = tl.arange(0, RP)
            mc = c < R
            idx = tl.load(cache_idx + e * R + c, mask=mc, other=0)
            xg = tl.load(x + xr[:, None] * K + idx[None, :], mask=mask_m[:, None] & mc[None, :], other=0.0)
            d = tl.load(cache_delta + (e * N + rows)[:, None] * R + c[None, :], mask=mask_n[:, None] & mc[None, :],
                        other=0.0)
            acc += tl.dot(xg.to(tl.float32), tl.trans(d.to(tl.float32)), input_precision="tf32x3")
        tl.store(y + pair[:, None] * N + rows[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped(x, xsum, order, offs, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, y, N, PER,
             K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
             RP: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B4: tl.constexpr, B8: tl.constexpr,
             F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # x [X, K], xsum [X, G] fp32 its sums per group, order [S] the pairs sorted by expert, offs [E + 1] where each
    # expert's run of them starts, meta [E, 2] int32 (bits, slot among the experts of its width), q{b}
    # [E_b, N, K * b / 8] uint8, scale [E, N, G] fp16, zero [E, N, G] uint8; pair s reads x row s / PER; B{w}: a
    # group's bytes in a plane of width w, rounded up to a power of two; a switching cache where R > 0 (RP: R
    # rounded up to a power of two, >= 16). y [S, N] fp32. Program (e, block of BN rows).
    e = tl.program_id(0)
    start, end = tl.load(offs + e), tl.load(offs + e + 1)
    b = tl.load(meta + 2 * e)
    slot = tl.load(meta + 2 * e + 1).to(tl.int64)
    rows = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    mask_n = rows < N
    if b == 2:
        _expert(q2, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
                K, G, GS, L, R, RP, 2, B2, 0, 0, 1, F32, BM)
    elif b == 3:
        _expert(q3, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
                K, G, GS, L, R, RP, 2, B2, 1, 2, B1, F32, BM)
    elif b == 4:
        _expert(q4, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
                K, G, GS, L, R, RP, 4, B4, 0, 0, 1, F32, BM)
    elif b == 6:
        _expert(q6, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
                K, G, GS, L, R, RP, 4, B4, 2, 4, B2, F32, BM)
    else:
        _expert(q8, slot, e, start, end, order, x, xsum, scale, zero, cache_idx, cache_delta, y, rows, mask_n, N, PER,
                K, G, GS, L, R, RP, 8, B8, 0, 0, 1, F32, BM)


# On a GPU the first call of each shape times these and keeps the fastest (pairs and rows per program, warps,
# pipeline stages); under the interpreter (tests) the kernel runs as written, BLOCKS a program. Compiled for sm_90
# without a GPU (Triton 3.9, bf16 x, groups of 128), each of these fits in registers (146-242 a thread, no spill);
# bigger tiles spilled (32 or 64 pairs x 128 rows: 80-256 bytes of stack a thread).
TILES = ((16, 32, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2))
_TUNED = _grouped if INTERPRET else triton.autotune(
    [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in TILES],
    key=["N", "K", "GS", "F32"])(_grouped)


@torch.library.triton_op("dynamoq::triton_grouped", mutates_args={})
def triton_grouped(x: torch.Tensor, ids: torch.Tensor, meta: torch.Tensor, q2: torch.Tensor, q3: torch.Tensor,
                   q4: torch.Tensor, q6: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   cache_idx: torch.Tensor, cache_delta: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [X, K] (fp32, bf16 or fp16), ids [S], meta [E, 2] int32 (each expert's bits and slot among the experts of
    its width), q{b} [E_b, N, K * b / 8] (any uint8 tensor for a width without experts), scale / zero [E, N, G], a
    switching cache cache_idx [E, r], cache_delta [E, N, r] (r = 0: none); pair s reads x row s / (S / X)
    -> [S, N] fp32. An operator torch.compile sees into: its Triton kernel lands in the compiled graph."""
    s_, x_rows = ids.shape[0], x.shape[0]
    e_, n, g_ = scale.shape
    gs, r = group_size, cache_idx.shape[1]
    y = x.new_zeros(s_, n, dtype=torch.float32)
    if s_:
        sorted_ids, order = ids.sort(stable=True)
        offs = torch.searchsorted(sorted_ids, torch.arange(e_ + 1, device=ids.device, dtype=sorted_ids.dtype))
        xsum = x.float().view(x_rows, g_, gs).sum(-1)                                  # [X, G]
        block = dict(zip(("BM", "BN"), BLOCKS)) if INTERPRET else {}
        torch.library.wrap_triton(_TUNED)[lambda cfg: (e_, triton.cdiv(n, cfg["BN"]))](
            x, xsum, order, offs, meta, q2, q3, q4, q6, q8, scale, zero, cache_idx, cache_delta, y, n, s_ // x_rows,
            R=r, RP=max(16, triton.next_power_of_2(max(r, 1))), F32=x.dtype == torch.float32, **layout(g_, gs),
            **block)
    return y


def supports(w) -> bool:
    """Whether this kernel takes a DynaMoExperts w (tl.dot multiplies whole groups of >= MIN_GROUP inputs)."""
    return w.group_size >= MIN_GROUP


def linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """kernels.expert_linear by this kernel: y[s] = W[ids[s]] @ x[s / k] for a DynaMoExperts w (storage [E, N, K]),
    x [X, K] (X = S, or S = k X: a token's k pairs share its row), ids [S] -> [S, N] fp32, a switching cache's
    corrections included."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (INTERPRET and x.dtype == torch.bfloat16):
        x = x.float()       # (Triton 3.9's interpreter gets bf16 products wrong: its tests run fp32 and fp16)
    meta, codes, cache = codes_and_cache(w, x, ids)
    return triton_grouped(x.contiguous(), ids.contiguous(), meta, *codes, w.scale, w.zero, *cache, w.group_size)
