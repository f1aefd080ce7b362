"""The fast paths of DynaMoExperts, and the `dynamoq` experts implementation.

transformers calls `dynamoq_experts_forward` for every fused experts module when
config._experts_implementation == "dynamoq". Packed weights go through DynaMoExperts.expert_linear,
which picks one of the two paths below; plain weights through transformers' batched_mm.

decode_linear (few token-expert pairs): plain PyTorch that Inductor (torch.compile) turns into one
  loop nest per projection, C++ on CPU and Triton on GPU. For every pair and output row it walks the
  groups of the input dimension; each step reads one group of packed codes of the pair's expert
  (gathered by expert id, never copied), unpacks it with masks, multiplies with x and adds, then
  applies the group's zero point and scale. Experts of different bit-widths: every bit-width has its
  own unpack expression, and a pair skips the ones of the other widths (a masked load whose body is
  only evaluated for pairs of that width), so mixed precision costs what the pairs' own widths cost.
grouped_linear (many pairs, prefill): dequantize each expert once and run one grouped matrix product.

Layout of one step of decode_linear (one group of g inputs of one pair and one output row), for a
bit-plane of width w (packing.PLANES: c = 8 / w codes per byte, bit offset `off` inside the code):
  the plane holds g * w / 8 bytes per group, H chunks of L = packing.lanes(g) bytes; byte (h, l)
  holds the codes of inputs h * c * L + p * L + l, p = 0..c-1, at bits w * p; so the term (h, p) is
  (byte & (mask << w * p)) * x[h * c * L + p * L + l] * 2**(off - w * p) summed over l, and x is
  viewed (and scaled by those powers of two, exactly) once per call as [S, G, H, c, L].
  The zero point enters once per group: sum_k (q_k - z) x_k = sum_k q_k x_k - z * sum_k x_k.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_or_false
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward

from . import packing
from .tensors import DynaMoExperts, inverse_permutation

NAME = "dynamoq"
aten = torch.ops.aten


# ---- decode ---------------------------------------------------------------------------------------
def _own_buffer(t: torch.Tensor) -> torch.Tensor:
    """The same values; under Inductor the result is a buffer of its own (as_strided needs one), so
    the kernels that read it see its layout instead of recomputing it in theirs. Used for the small
    per-call tensors whose layout must drive the loop order of the big loop (x rearranged per plane)
    or that would otherwise pull 16-bit arithmetic into it (the gathered scales)."""
    return t.as_strided(t.shape, t.stride())


def _x_for_plane(xf: torch.Tensor, width: int, group_size: int) -> torch.Tensor:
    """x [S, K] -> [S, G, H, c, L]: entry (g, h, p, l) = x[g * gs + h * c * L + p * L + l] * 2**(-width * p),
    the inputs of byte l of chunk h at bits width * p (packing.py's layout: a view, then the powers)."""
    s, k = xf.shape
    c, lanes = 8 // width, packing.lanes(group_size)
    xp = xf.view(s, k // group_size, group_size // (c * lanes), c, lanes)
    if c > 1:
        xp = xp * (2.0 ** (-width * torch.arange(c, dtype=torch.float32, device=xf.device))).view(c, 1)
    return _own_buffer(xp.contiguous())


PIECE_TERMS = 4            # terms of one masked, reduced piece (see _plane_pieces)


def _plane_pieces(codes: torch.Tensor, xp: torch.Tensor, width: int, offset: int, member, scale):
    """codes [S, N, G, H, L] uint8 (one plane of the pairs' experts), xp [S, G, H, c, L]
    -> pieces [S, N, G, L] whose sum is, per lane, the group's scale [S, N, G, 1] times the sum over h
    and p of plane value * 2**offset * x.
    With `member` [S] bool, pairs outside it skip the work of each piece and give 0.

    A piece is PIECE_TERMS terms: Inductor computes a pointwise expression of more than about 50
    operations into a buffer of its own before a reduction reads it (here: [S, N, K / 16] floats),
    and a masked piece with such a part would be computed for every pair; each piece is reduced on its
    own instead, and all the reductions share one loop nest."""
    c = 8 // width
    s_ = codes.shape[0]
    terms = [(h, p) for h in range(codes.shape[3]) for p in range(c)]
    for i in range(0, len(terms), PIECE_TERMS):
        piece = None
        for h, p in terms[i:i + PIECE_TERMS]:
            chunk = codes[:, :, :, h]
            v = chunk.to(torch.int32) & (((1 << width) - 1) << (width * p)) if c > 1 else chunk
            term = v.float() * xp[:, None, :, h, p]
            piece = term if piece is None else piece + term
        piece = piece * (scale * float(1 << offset) if offset else scale)
        if member is not None:
            piece = aten._unsafe_masked_index(piece, member.view(s_, 1, 1, 1).expand(piece.shape),
                                              [torch.arange(s_, device=codes.device)], 0.0)
        yield piece


def decode_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y[s] = W[ids[s]] @ x[s] for a DynaMoExperts w (storage [E, N, K]), x [S, K], ids [S] -> [S, N] fp32.
    Cost: every pair reads its own expert's packed codes, scales and zeros once; nothing is materialized
    per pair but [S, N, K / g] fp32 scales."""
    s_, k = x.shape
    gs = w.group_size
    g = k // gs
    widths = sorted(set(w.expert_bits))
    lanes = packing.lanes(gs)
    dev = x.device
    xf = x.float()
    ids = ids.clamp(0, w.num_rows - 1)        # in range by construction: the gathers need no bounds checks
    scale = _own_buffer(aten._unsafe_index(w.scale, [ids]).float())[..., None]    # [S, N, G, 1]
    zero = aten._unsafe_index(w.zero, [ids])                                        # [S, N, G] uint8
    n = scale.shape[1]
    # sum of x over each group, split over the lanes (any split does: only the lane total counts)
    xsum = xf.view(s_, g, gs // lanes, lanes).sum(2)                                # [S, G, L]
    y = -((zero.float()[..., None] * xsum[:, None]) * scale).sum((-2, -1))
    slots = w._slots()
    xps: dict[int, torch.Tensor] = {}
    for b in widths:
        rows = torch.tensor([sl if eb == b else 0 for eb, sl in slots], device=dev)
        rows = _own_buffer(aten._unsafe_index(rows, [ids]))                        # [S] slot among the b-bit experts
        member = None
        if len(widths) > 1:        # only the pairs whose expert has b bits evaluate this width's expressions
            member = torch.tensor([eb == b for eb in w.expert_bits], device=dev)
            member = _own_buffer(aten._unsafe_index(member, [ids]))                 # [S] bool
        codes = aten._unsafe_index(getattr(w, f"q{b}"), [rows])                    # [S, N, K*b/8], never copied
        start = 0
        for off, width in packing.PLANES[b]:
            nbytes = k * width // 8
            plane = codes[..., start:start + nbytes].view(s_, n, g, gs * width // 8 // lanes, lanes)
            start += nbytes
            if width not in xps:
                xps[width] = _x_for_plane(xf, width, gs)
            for piece in _plane_pieces(plane, xps[width], width, off, member, scale):
                y = y + piece.sum((-2, -1))
    if w.cache_idx is not None:                                                     # switched channels
        cols = aten._unsafe_index(w.cache_idx, [ids])                               # [S, r]
        xc = xf.gather(1, cols)
        y = y + (aten._unsafe_index(w.cache_delta, [ids]).float() * xc[:, None, :]).sum(-1)
    return y


# ---- prefill --------------------------------------------------------------------------------------
GROUPED_PAIRS_PER_EXPERT = 2   # more token-expert pairs than this per expert on average: grouped path


def use_grouped(num_pairs, num_experts: int) -> bool:
    """Decode or prefill path. Under torch.compile with a dynamic token count this is decided once per
    graph: a backed size is guarded (decode sizes share one graph, prefill sizes a second); an
    unbacked one (torch._dynamo.decorators.mark_unbacked) cannot be, and takes the decode path."""
    many = num_pairs > GROUPED_PAIRS_PER_EXPERT * num_experts
    if isinstance(many, torch.SymBool) and free_unbacked_symbols(many):
        return guard_or_false(many)
    return bool(many)


def grouped_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The same product for many pairs: every expert dequantized once (16-bit), one grouped matmul."""
    from transformers.integrations.moe import _grouped_mm
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    wt, by_width = w.dequantize_nk(dtype, by_width=True)                      # [E, N, K], experts by width
    if by_width != sorted(by_width):                                           # ids -> positions in that order
        ids = torch.tensor(inverse_permutation(by_width), device=ids.device)[ids]
    order = ids.argsort()
    counts = torch.zeros(w.num_rows, dtype=torch.int32, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    y = _grouped_mm(x[order].to(dtype), wt.transpose(-1, -2), offs)            # [S, N] sorted by expert
    out = torch.empty_like(y, dtype=torch.float32)
    out[order] = y.float()
    return out


# ---- the experts implementation -----------------------------------------------------------------
def dynamoq_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    # hidden_states [T, H]; top_k_index, top_k_weights [T, k]
    first = self.gate_up_proj if self.has_gate else self.up_proj
    if not isinstance(first, DynaMoExperts):
        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, k = top_k_index.shape
    ids = top_k_index.reshape(-1)                                          # [S = T * k]
    x = hidden_states.repeat_interleave(k, dim=0)                          # [S, H]
    h = first.expert_linear(x, ids)                                        # [S, 2I] or [S, I]
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[ids].float()
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)           # [S, I]
    y = self.down_proj.expert_linear(h, ids)                               # [S, H]
    if self.has_bias:
        y = y + self.down_proj_bias[ids].float()
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y.to(hidden_states.dtype)).float()
    y = y * top_k_weights.reshape(-1, 1).float()
    return y.view(num_tokens, k, -1).sum(1).to(hidden_states.dtype)


def register() -> None:
    ALL_EXPERTS_FUNCTIONS.register(NAME, dynamoq_experts_forward)
