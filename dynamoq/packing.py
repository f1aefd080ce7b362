"""Group-wise asymmetric integer quantization and exact bit packing for 2/3/4/6/8 bits.

A b-bit code is stored as planes of 4, 2 or 1 bits (6 = 4 + 2, 3 = 2 + 1), each plane packed
along the input dimension, so a row of K codes takes exactly K * b / 8 bytes and unpacking is
only shifts and masks, which Inductor fuses into the product that consumes the weights.

Byte layout of a plane of width w (c = 8 / w codes per byte), with L = lanes(group_size): the
plane is read in chunks of L bytes; byte l of chunk h holds the codes of inputs h * c * L + p * L + l
for p = 0..c-1, at bits w * p. So unpacking part p of a chunk is one shift and one mask of L
contiguous bytes into L contiguous codes (it vectorizes), and a group of inputs spans whole chunks.

Shapes: w [..., N, K] (N output rows, K input channels, groups of `group_size` along K);
        scale, zero [..., N, K // group_size]; packed codes [..., N, K * b // 8] uint8.
"""
from __future__ import annotations

import torch

BITS = (2, 3, 4, 6, 8)
# bit-width -> planes as (bit offset inside the code, plane width)
PLANES = {8: ((0, 8),), 6: ((0, 4), (4, 2)), 4: ((0, 4),), 3: ((0, 2), (2, 1)), 2: ((0, 2),)}
SCALE_DTYPE = torch.float16  # one scale (16 bits) and one uint8 zero point (8 bits) per group
OVERHEAD_BITS_PER_GROUP = 16 + 8


class QuantizationError(ValueError):
    """A weight, a bit-width or a group size that dynamoq cannot quantize as asked."""


def check_bits(bits: int) -> int:
    if bits not in PLANES:
        raise QuantizationError(f"bit-width {bits!r} is not supported; choose one of {BITS}")
    return int(bits)


def check_group(k: int, group_size: int, what: str = "weight") -> None:
    if group_size <= 0 or group_size % 8:
        raise QuantizationError(f"group_size must be a positive multiple of 8, got {group_size}")
    if k % group_size:
        raise QuantizationError(
            f"{what}: input dimension {k} is not divisible by group_size={group_size}; "
            f"pick a group_size that divides {k} (e.g. {_divisor_hint(k)})")


def _divisor_hint(k: int) -> int:
    for g in (128, 64, 32, 16, 8):
        if k % g == 0:
            return g
    return k


def storage_bits(bits: int, group_size: int) -> float:
    """Average stored bits per weight, counting the scale and zero of every group."""
    return bits + OVERHEAD_BITS_PER_GROUP / group_size


def lanes(group_size: int) -> int:
    """Bytes per chunk of the layout: the largest power of two <= 16 that divides group_size / 8, so
    that every plane of every width holds whole chunks per group."""
    n = 16
    while (group_size // 8) % n:
        n //= 2
    return n


def pack(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """codes [..., K] (integers in [0, 2**bits)) -> packed [..., K * bits // 8] uint8."""
    k = codes.shape[-1]
    check_group(k, group_size, f"codes of shape {tuple(codes.shape)}")
    lane = lanes(group_size)
    codes = codes.to(torch.int32)
    planes = []
    for offset, width in PLANES[check_bits(bits)]:
        c = 8 // width
        v = ((codes >> offset) & ((1 << width) - 1)).view(*codes.shape[:-1], -1, c, lane)   # [..., H, c, L]
        shifts = torch.arange(0, 8, width, dtype=torch.int32, device=codes.device).view(c, 1)
        planes.append((v << shifts).sum(-2).flatten(-2).to(torch.uint8))                  # [..., H * L]
    return torch.cat(planes, dim=-1)


def _unpack_runs(packed: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """packed [..., K * b / 8] -> codes [..., G, H, c, L] int32 (uint8 for 8 bits), where (H, c) are the chunks and parts of
    the first plane (c = 8 / its width; input of the group: h * c * L + p * L + l). A second plane, half
    as wide with half as many chunks, is read as [G, H / 2, 2, c, L], so no loop index is divided: the
    innermost L is contiguous in every load and store and Inductor vectorizes it."""
    lead = packed.shape[:-1]
    k = packed.shape[-1] * 8 // bits
    lane = lanes(group_size)
    (off1, w1), *rest = PLANES[bits]
    c = 8 // w1
    n1 = k * w1 // 8
    plane = packed[..., :n1].view(*lead, k // group_size, -1, 1, lane)                        # [..., G, H, 1, L]
    if c == 1:                                # 8 bits: the bytes are the codes (kept uint8: that converts fastest)
        return plane
    shifts = torch.arange(0, 8, w1, dtype=torch.int32, device=packed.device).view(c, 1)
    code = (plane.to(torch.int32) >> shifts) & ((1 << w1) - 1)                                 # [..., G, H, c, L]
    for off2, w2 in rest:                     # 3 = 2 + 1, 6 = 4 + 2: the second plane has w2 = w1 / 2
        plane2 = packed[..., n1:].view(*lead, k // group_size, -1, 1, 1, lane).to(torch.int32)  # [..., G, H/2, 1, 1, L]
        shifts2 = (torch.arange(2 * c, dtype=torch.int32, device=packed.device) * w2).view(2, c, 1)
        v = ((plane2 >> shifts2) & ((1 << w2) - 1)).flatten(-4, -3)                            # [..., G, H, c, L]
        code = code | (v << off2)
    return code << off1 if off1 else code


def unpack(packed: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """packed [..., K * bits // 8] uint8 -> codes [..., K] int32."""
    return _unpack_runs(packed, bits, group_size).flatten(-4).to(torch.int32)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest on each group's full range (min-max grid).
    w [..., N, K] -> (codes [..., N, K] int32, scale, zero [..., N, K // g])."""
    check_group(w.shape[-1], group_size)
    qmax = (1 << check_bits(bits)) - 1
    g = w.float().unflatten(-1, (-1, group_size))                       # [..., N, K/g, g]
    scale, zero = rtn_grid(g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0), qmax)
    zero = zero.to(torch.uint8)
    codes = quantize_with(w, scale, zero, bits)
    return codes, scale, zero


# Fractions of a group's range tried for its grid. The search minimises |error|^4: clipping a few large
# weights buys a finer grid for the rest, but on the reference model large weights matter more than their
# share of the squared error says. Validation perplexity, uniform 3-bit, g192 (drama / python / german /
# bible / chinese; 1024 tokens each):
#   data-free: min-max 64.3 / 23.9 / 97.6 / 12.9 / 33.5; squared error 78.3 / 25.4 / 116.9 / 19.6 / 53.8;
#     HQQ-style |error|^0.7 (half-quadratic refit of scale and integer zero) 81.0 / 26.8 / 116.8 / 19.7 /
#     50.9; |error|^3 59.8 / 22.0 / 85.6 / 11.9 / 30.8; |error|^4 57.9 / 19.9 / 75.8 / 12.6 / 27.1;
#     |error|^6 63.6 / 21.6 / 77.4 / 12.2 / 29.2 (at 4 bits min-max and |error|^4 within 3% either way);
#   GPTQ, Hessian-diagonal weights (squared error had lowered drama 33.99 -> 32.25 against min-max at g128):
#     squared 35.0 / 10.7 / 33.0 / 9.6 / 20.7; |error|^4 33.4 / 10.1 / 31.9 / 8.5 / 17.5; |error|^6 34.8 /
#     10.2 / 31.7 / 8.9 / 20.6.
SHRINK = torch.linspace(1.0, 0.55, 10)


def searched_grid(w: torch.Tensor, qmax, weight: torch.Tensor | None = None):
    """Asymmetric grid of groups w [..., g] (the range always holds 0): scale (float, rounded to SCALE_DTYPE),
    zero (float) [...]. The group's range is shrunk by the fraction in SHRINK whose rounding error
    sum_j weight_j |w_j - q_j|^4 is least; qmax an int or a tensor broadcasting with w[..., 0],
    weight [..., g] broadcasting with w (None: all ones)."""
    qmax = torch.as_tensor(qmax, dtype=torch.float32)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)                            # [...]
    best = scale = zero = None
    for f in SHRINK.tolist():
        s = ((hi - lo) * f / qmax).clamp(min=1e-6).to(SCALE_DTYPE).float()
        z = torch.minimum((-lo * f / s).round().clamp(min=0), qmax)
        d = rounding_error(w, s, z, qmax).square_().square_()                            # [..., g]
        err = (d if weight is None else d.mul_(weight)).sum(-1) * s.square().square()    # [...]
        if best is None:
            best, scale, zero = err, s, z
        else:
            better = err < best
            best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def quantize_searched(w: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest on searched grids (searched_grid, all weights alike): data-free, like quantize_rtn,
    about 10x its time. w [..., N, K] -> (codes [..., N, K] int32, scale, zero [..., N, K // g])."""
    check_group(w.shape[-1], group_size)
    qmax = (1 << check_bits(bits)) - 1
    scale, zero = searched_grid(w.float().unflatten(-1, (-1, group_size)), qmax)       # [..., N, K/g]
    scale, zero = scale.to(SCALE_DTYPE), zero.to(torch.uint8)
    return quantize_with(w, scale, zero, bits), scale, zero


# the quantizers that need no data, by DynaMoConfig.quantizer name
DATA_FREE = {"rtn": quantize_rtn, "clip": quantize_searched}


def rtn_grid(lo: torch.Tensor, hi: torch.Tensor, qmax):
    """Round-to-nearest grid of groups whose range [lo, hi] holds 0 -> scale (SCALE_DTYPE), zero (float)."""
    scale = ((hi - lo) / qmax).clamp(min=1e-6).to(SCALE_DTYPE)
    return scale, (-lo / scale.float()).round().clamp(0, qmax)


def rounding_error(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax) -> torch.Tensor:
    """Each weight's rounding error in units of its scale, code - zero - g / scale, for groups g [..., g] on
    the grid scale, zero [...] (float; qmax an int or broadcasting with them) -> [..., g]."""
    r = g / scale[..., None]
    return r.round().clamp_(min=-zero[..., None], max=(qmax - zero)[..., None]).sub_(r)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w [..., N, K] on a given grid (scale, zero [..., N, K // g])."""
    qmax = (1 << bits) - 1
    g = w.float().unflatten(-1, (scale.shape[-1], -1))
    q = (g / scale.float().unsqueeze(-1)).round() + zero.float().unsqueeze(-1)
    return q.clamp(0, qmax).flatten(-2).to(torch.int32)


def dequantize_runs(packed: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int, dtype=torch.float32) -> torch.Tensor:
    """unpack + dequantize in one expression whose loops follow the layout:
    packed [..., N, K * b / 8], scale/zero [..., N, G] -> weights [..., N, G, H, c, L] (flat_runs: [..., N, K])."""
    code = _unpack_runs(packed, bits, group_size)
    return ((code.float() - zero[..., None, None, None].float()) * scale[..., None, None, None].float()).to(dtype)


def own_buffer(t: torch.Tensor) -> torch.Tensor:
    """The same values; under Inductor the result is a buffer of its own (as_strided needs one), so the
    kernels that read it see its layout instead of recomputing it in theirs: the dequantization's runs,
    x rearranged per plane, gathered scales and rows (a loop then reads them without indirection)."""
    return t.as_strided(t.shape, t.stride())


def flat_runs(w: torch.Tensor) -> torch.Tensor:
    """[..., G, H, c, L] -> [..., K]: first a buffer of its own in the runs' shape (Inductor would otherwise
    index the dequantization through the flat view, with divisions that defeat vectorization)."""
    return own_buffer(w).flatten(-4)


def dequantize_packed(packed: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor,
                      group_size: int, dtype=torch.float32) -> torch.Tensor:
    """packed [..., N, K * b / 8], scale/zero [..., N, G] -> weights [..., N, K]."""
    return flat_runs(dequantize_runs(packed, bits, scale, zero, group_size, dtype))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes [..., N, K], scale/zero [..., N, K // g] -> weights [..., N, K] in dtype."""
    g = codes.unflatten(-1, (scale.shape[-1], -1)).float()
    w = (g - zero.unsqueeze(-1).float()) * scale.unsqueeze(-1).float()
    return w.flatten(-2).to(dtype)
