"""The fast paths of DynaMoExperts, and the `dynamoq` experts implementation.

transformers calls `dynamoq_experts_forward` for every fused experts module when
config._experts_implementation == "dynamoq". Packed weights go through expert_linear, which picks one
of the paths below; plain weights through transformers' batched_mm.

native_linear (CPUs with AVX-512 VNNI or AVX2, any number of pairs): the hand-written kernel of native.py
  (codes as bytes times x in int8, one opaque operator under torch.compile; AMX tiles for experts with
  many pairs where the CPU has AMX-INT8). On GPU with TRITON = True (off until a GPU has timed them): the
  hand-written Triton kernels, triton_decode.py for few pairs (gate_up with its gate, and down with the routing
  weights' sum, one kernel each where the module gates by default), triton_grouped.py for many (codes
  dequantized in registers, tensor-core products). Elsewhere, or with NATIVE = False, Inductor generates the code:
decode_linear (few token-expert pairs): plain PyTorch that Inductor (torch.compile) turns into one
  loop nest per projection and bit-width, C++ on CPU and Triton on GPU. Each width's loop nest runs
  over all pairs with the other widths' pairs masked out, or, for big experts on CPU, over its own pairs
  only (positions_of splits them: a custom op whose output sizes are known only at run time, so no
  routing recompiles). For every pair and
  output row it walks the groups of the input dimension; each step reads one group of packed codes of
  the pair's expert (gathered by expert id, never copied), unpacks it with masks, multiplies with x and
  adds, then applies the group's zero point and scale. On CPU compile with compile_options() (FMA).
grouped_linear (many pairs, prefill): a few experts of one width at a time dequantized to 16 bits
  (at most CHUNK_BYTES), and one grouped matrix product over the pairs routed to them.

Layout of one step of decode_linear (one group of g inputs of one pair and one output row), for a
bit-plane of width w (packing.PLANES: c = 8 / w codes per byte, bit offset `off` inside the code):
  the plane holds g * w / 8 bytes per group, H chunks of L = packing.lanes(g) bytes; byte (h, l)
  holds the codes of inputs h * c * L + p * L + l, p = 0..c-1, at bits w * p; so the term (h, p) is
  (byte & (mask << w * p)) * x[h * c * L + p * L + l] * 2**(off - w * p) summed over l, and x is
  viewed (and scaled by those powers of two, exactly) once per call as [S, G, H, c, L].
  The zero point enters once per group: sum_k (q_k - z) x_k = sum_k q_k x_k - z * sum_k x_k.
"""
from __future__ import annotations

import contextlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, PatternMatcherPass, register_graph_pattern
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate, batched_mm_experts_forward

from . import native, packing
from .tensors import DynaMoExperts, _PackedWeight, experts_by_width

try:                          # the hand-written GPU kernels (TRITON below) where the triton package is installed
    from . import triton_decode, triton_grouped
except ImportError:
    triton_decode = triton_grouped = None

NAME = "dynamoq"
aten = torch.ops.aten

# Options for torch.compile(model, options=dynamoq.compile_options()) on CPU: "fp-contract=fast" lets the
# C++ compiler fuse each multiply and add of the decode loop into one FMA. That loop is bound by how many
# of its loads are in flight, and fewer instructions per byte keep more of them in flight (OLMoE gate_up,
# 8 pairs, 1 thread: 2-bit 3.8 -> 3.1 ms, 4-bit 6.9 -> 4.5 ms). Inductor's default is "off".
# Not here: "cpp_wrapper" (the graph's wrapper in C++ rather than Python, whose bytecode and objects a decode
# step's weights evict from the caches): a 1-token OLMoE-shaped layer 1.91-2.09 -> 1.66-1.76 ms, the real
# reference model's decode step 4% faster (bf16 9%), but its first compile took 619 s instead of 24.
COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def compile_options() -> dict:
    """Options for torch.compile on CPU: Inductor's that make the low-bit expert paths faster (COMPILE_OPTIONS),
    narrow matrix products as reductions (NarrowMatmul: the routers) and dynamo's guard_filter_fn (guard_filter:
    fewer guards per packed weight)."""
    return {**COMPILE_OPTIONS, "post_grad_custom_pre_pass": NarrowMatmul(), "guard_filter_fn": guard_filter}


# A product with few outputs on CPU, such as a MoE router's (2048 inputs, 64 experts), written as a reduction
# that Inductor generates among the graph's own C++ loops, rather than an external oneDNN call: at decode that
# call's code and state come from memory, evicted by the layer's weights. One OLMoE-shaped layer, 1 token, 1
# thread, compiled, caches evicted before each call, interleaved: bf16 4.41 -> 4.21 ms, DynaMo mixed 1.68 ->
# 1.47 ms; at 128 tokens within 1-2% (87.2 -> 87.9 ms mixed). Both accumulate the products in fp32 and round
# once, in another order: near-ties of the router may break the other way. Outputs: a static count <= this.
NARROW_MM_OUTPUTS = 256
_narrow_mm = PatternMatcherPass()


def _is_narrow(match) -> bool:
    a, b = (n.meta.get("val") if hasattr(n, "meta") else None for n in match.args[:2])
    return (a is not None and b is not None and a.device.type == "cpu" and a.dim() == b.dim() == 2
            and a.dtype == b.dtype and a.dtype.is_floating_point
            and isinstance(b.shape[1], int) and b.shape[1] <= NARROW_MM_OUTPUTS)


@register_graph_pattern(CallFunction(aten.mm.default, Arg(), Arg()), pass_dict=_narrow_mm, extra_check=_is_narrow)
def _mm_as_reduction(match, a, b):
    def reduction(a, b):            # a [M, K], b [K, N] -> [M, N]
        y = (a[:, None, :].float() * b.t()[None, :, :].float()).sum(-1)
        return (_round_bf16(y) if a.dtype == torch.bfloat16 else y).to(a.dtype)
    match.replace_by_example(reduction, [a, b])


def _round_bf16(y: torch.Tensor) -> torch.Tensor:
    """fp32 y rounded to bf16's precision (to nearest, ties to even), kept in fp32. Inductor drops a plain
    round trip through bf16 inside a fused kernel and would feed the unrounded sum to what follows (a router's
    softmax): near-ties then break unlike in eager (1-2 of 64 experts' picks differed per 128 random tokens)."""
    u = y.view(torch.int32)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & -65536          # & 0xFFFF0000 as a signed int32
    return u.view(torch.float32)


class NarrowMatmul(CustomGraphPass):
    """Inductor's post-grad pass for compile_options: narrow products as reductions (above)."""

    def __call__(self, graph) -> None:
        _narrow_mm.apply(graph)

    def uuid(self) -> bytes:           # Inductor's FX graph cache: this file's code and the threshold
        return get_hash_for_files((__file__,)) + str(NARROW_MM_OUTPUTS).encode()


# Guards a packed weight does not need: dynamo guards each inner tensor of a tensor subclass (dtype, shape,
# strides, no aliasing, dynamic-shape marks), the subclass itself (the same, in TENSOR_MATCH) and each attribute
# the code reads, all on every call. For a packed weight the subclass metadata guard (which stays, with the
# weight's type guard) compares expert_bits, group_size, transposed, dtype, shape, device and the names of its
# tensors, which fix the shapes of scale, zero and the codes (a packed weight is never marked dynamic, and its
# wrapper holds no storage to alias); the switching cache's tensors keep theirs (their width r is not in the
# metadata). Evaluating the guards of a compiled OLMoE-shaped layer from cold caches (as in decode, where each
# layer's weights evict the last's) took 206-230 us with all, 132-180 without the inner tensors' and attributes'
# (bf16's layer: 94); the 1-token layer, interleaved with bf16's, 1.92-2.00 -> 1.70-1.73 ms (1 thread). At Qwen3
# shape, without the weights' own tensor guards as well: 145 -> 122 us (bf16's: 101).
_IMPLIED = frozenset(["scale", "zero", *(f"q{b}" for b in packing.BITS), "expert_bits", "group_size",
                      "transposed", "__tensor_flatten__()[0]"])
_IMPLIED_OWN = frozenset(["HASATTR", "TENSOR_MATCH"])       # guard types on the packed weight itself


def guard_filter(entries) -> list[bool]:
    """torch.compile's guard_filter_fn: keep every guard but those a packed weight's metadata implies."""
    packed = {e.name for e in entries if isinstance(e.value, _PackedWeight)}
    keep = []
    for e in entries:
        base, _, attr = e.name.rpartition(".")
        drop = (base in packed and attr in _IMPLIED) or (e.name in packed and e.guard_type in _IMPLIED_OWN)
        keep.append(not drop)
    return keep


# ---- decode ---------------------------------------------------------------------------------------
def _x_for_plane(xf: torch.Tensor, width: int, group_size: int) -> torch.Tensor:
    """x [S, K] -> [S, G, H, c, L]: entry (g, h, p, l) = x[g * gs + h * c * L + p * L + l] * 2**(-width * p),
    the inputs of byte l of chunk h at bits width * p (packing.py's layout: a view, then the powers)."""
    s, k = xf.shape
    c, lanes = 8 // width, packing.lanes(group_size)
    xp = xf.view(s, k // group_size, group_size // (c * lanes), c, lanes)
    if c > 1:
        xp = xp * (2.0 ** (-width * torch.arange(c, dtype=torch.float32, device=xf.device))).view(c, 1)
    return packing.own_buffer(xp.contiguous())


# Terms of one reduced piece (see _plane_pieces). 8 was tried (one thread, 2048 x 2048 experts g128,
# 8 pairs, ms with 4 / 8 terms: 2-bit 3.37 / 3.30, 3-bit 3.50 / 5.58, 4-bit 5.03 / 4.34, 6-bit 5.40 /
# 7.37), but 4-bit's gain at a fixed size turned into a loss in the graph with a dynamic token count
# (OLMoE layer, 4 tokens: 1.5x bf16 -> 0.68x; 16 tokens 0.35x).
PIECE_TERMS = 4


def _plane_pieces(codes: torch.Tensor, xp: torch.Tensor, width: int, offset: int, scale, member=None):
    """codes [S, N, G, H, L] uint8 (one plane of the pairs' experts), xp [S, G, H, c, L]
    -> pieces [S, N, G, L] whose sum is, per lane, the group's scale [S, N, G, 1] times the sum over h
    and p of plane value * 2**offset * x. With `member` [S] bool, the pairs outside it skip each piece
    (masked loads) and give 0.

    A piece is PIECE_TERMS terms: Inductor computes a pointwise expression of more than about 50
    operations into a buffer of its own before a reduction reads it (here: [S, N, K / 16] floats); each
    piece is reduced on its own instead, and all the reductions share one loop nest."""
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


# Mixed widths on CPU: split the pairs by width (below) for experts of at least SPLIT_ABOVE weights in
# groups of >= 128 (16-byte lanes); otherwise one loop nest per width over all pairs, masked. One
# thread, 64 experts of mixed widths, compiled, ms split / masked: 2048 x 768 g128 8 pairs 1.42 / 1.77,
# 2048 x 1024 g128 2.03 / 2.21; g64: 2048 x 1024 3.53 / 3.55, 3072 x 576 8 pairs 4.11 / 3.52, 2 pairs
# 1.31 / 1.13, 576 x 1536 2 pairs 0.50 / 0.37 (the real reference model's experts; end to end 14.8
# against 12.5 tokens/s with everything masked). On GPU always masked: the split's sizes would need a
# device-to-host copy per projection. Masked pairs skip their loads there but not their share of the
# work: on an H200, OLMoE shape, mixed widths took 0.50 ms against uniform 3-bit's 0.42 at 1 token,
# 2.8 against 0.8 at 16.
SPLIT_ABOVE = 1 << 20


def _nk(w) -> tuple[int, int]:
    """(N, K) of one expert of w in storage layout."""
    return w.scale.shape[1], w.scale.shape[2] * w.group_size


# The native kernel (native.py: codes as bytes, int8 x, AVX-512 VNNI or AVX2) for every number of pairs on CPUs
# that have it; False keeps Inductor's loops and the grouped path (the benchmark's A/B, their tests).
NATIVE = True
# The hand-written Triton kernels on GPU (triton_decode.py in place of Inductor's loops, triton_grouped.py in place
# of the grouped path): off until a GPU has measured them (recipes/bench_gpu.sh runs them beside those).
TRITON = False
_TRITON_INTERPRET = triton_decode is not None and triton_decode.INTERPRET     # the kernel on CPU (tests)


@contextlib.contextmanager
def _setting(name: str, on: bool):
    """The module global `name` = on for the duration (torch.compile guards on it: one graph per value)."""
    before = globals()[name]
    globals()[name] = on
    try:
        yield
    finally:
        globals()[name] = before


def native_kernel(on: bool):
    """NATIVE = on for the duration."""
    return _setting("NATIVE", on)


def triton_kernel(on: bool):
    """TRITON = on for the duration."""
    return _setting("TRITON", on)


def use_native(w, x: torch.Tensor) -> bool:
    """Whether expert_linear runs native_linear."""
    return (NATIVE and x.device.type == "cpu" and native.available()
            and native.supports(w.expert_bits, w.group_size, _nk(w)[1]))


def native_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """expert_linear by the native kernel, x in int8 per group (native.py), switched channels included.
    x [S, K], or [T, K] with S = k T: pair s reads row s / k (a token's k experts)."""
    return native.native_decode(x, ids, [getattr(w, f"q{b}") for b in sorted(set(w.expert_bits))],
                                list(w.expert_bits), w.scale, w.zero, w.group_size, w.cache_idx, w.cache_delta)


def split_by_width(w, x: torch.Tensor) -> bool:
    """Whether decode_linear splits the pairs by width first (else: masks them per width)."""
    n, k = _nk(w)
    return x.device.type == "cpu" and packing.lanes(w.group_size) == 16 and n * k >= SPLIT_ABOVE


def decode_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y[s] = W[ids[s]] @ x[s] for a DynaMoExperts w (storage [E, N, K]), x [S, K], ids [S] -> [S, N] fp32.
    Experts of several bit-widths either run one loop nest per width over all pairs, each pair masked
    out of the widths its expert does not have, or (big experts on CPU, where masked loads cost
    instructions) are first split by width: positions_of, sizes known only at run time, so one graph
    serves every routing, and each width's loop nest runs over its own pairs."""
    widths = sorted(set(w.expert_bits))
    if len(widths) == 1:
        return decode_width(w, widths[0], x, ids)
    bits = aten._unsafe_index(torch.tensor(w.expert_bits, device=x.device), [ids.clamp(0, w.num_rows - 1)])
    if split_by_width(w, x):
        y = x.new_empty(x.shape[0], _nk(w)[0], dtype=torch.float32)
        for b, sel in zip(widths, positions_of(bits, widths)):
            y = y.index_put((sel,), decode_width(w, b, x[sel], ids[sel]))
        return y
    xf, ids, scale = _pair_inputs(w, x, ids)
    y = _offset_terms(w, xf, ids, scale)
    for b in widths:
        y = y + _code_terms(w, b, xf, ids, scale, member=packing.own_buffer(bits == b))
    return y


@torch.library.custom_op("dynamoq::positions_of", mutates_args=())
def positions_of(keys: torch.Tensor, values: list[int]) -> list[torch.Tensor]:
    """keys [S] (one per token-expert pair: its bit-width, its chunk of experts) -> for each of `values`,
    the positions [S_v] where keys == v, in order. Under torch.compile each S_v is a size known only
    at run time (unbacked): the graph neither guards on it nor recompiles when the routing changes."""
    return [(keys == v).nonzero()[:, 0] for v in values]


@positions_of.register_fake
def _(keys, values):
    ctx, s = torch.library.get_ctx(), keys.shape[0]
    bound = {"max": s} if isinstance(s, int) else {}      # a bound must be a plain int
    return [keys.new_empty(ctx.new_dynamic_size(**bound), dtype=torch.int64) for _ in values]


def decode_width(w, b: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """decode_linear for pairs whose experts all have b bits.
    Cost: every pair reads its own expert's packed codes, scales and zeros once; nothing is materialized
    per pair but [S, N, K / g] fp32 scales."""
    xf, ids, scale = _pair_inputs(w, x, ids)
    return _offset_terms(w, xf, ids, scale) + _code_terms(w, b, xf, ids, scale)


def _pair_inputs(w, x, ids):
    """x [S, K] -> (x fp32, ids clamped [S], the pairs' scales [S, N, G, 1] fp32)."""
    ids = ids.clamp(0, w.num_rows - 1)        # in range by construction: the gathers need no bounds checks
    scale = packing.own_buffer(aten._unsafe_index(w.scale, [ids]).float())[..., None]
    return x.float(), ids, scale


def _offset_terms(w, xf, ids, scale) -> torch.Tensor:
    """The parts of y that do not depend on the codes: minus zero point times the sum of x, per group
    (sum_k (q_k - z) x_k = sum_k q_k x_k - z sum_k x_k), and the switched channels' corrections -> [S, N]."""
    s_, k = xf.shape
    lanes = packing.lanes(w.group_size)
    zero = aten._unsafe_index(w.zero, [ids])                                        # [S, N, G] uint8
    # sum of x over each group, split over the lanes (any split does: only the lane total counts)
    xsum = xf.view(s_, k // w.group_size, w.group_size // lanes, lanes).sum(2)     # [S, G, L]
    y = -((zero.float()[..., None] * xsum[:, None]) * scale).sum((-2, -1))
    return y if w.cache_idx is None else y + _cache_terms(w, xf, ids)


def _cache_terms(w, xf, ids) -> torch.Tensor:
    """The switched channels' corrections (cached full-precision columns minus their codes) -> [S, N]. The
    pairs' x at the cached columns go to a buffer of their own first: fused into the product, Inductor gathered
    x again for every output row, ~8 ns a product."""
    cols = aten._unsafe_index(w.cache_idx, [ids])                                   # [S, r]
    xg = packing.own_buffer(xf.gather(1, cols))                                     # [S, r]
    return (aten._unsafe_index(w.cache_delta, [ids]).float() * xg[:, None, :]).sum(-1)


def _code_terms(w, b: int, xf, ids, scale, member=None) -> torch.Tensor:
    """sum over k of scale * code * x for the pairs' b-bit experts -> [S, N]; with member [S] bool,
    only the pairs in it (the others' rows are read as slot 0 and masked out)."""
    s_, k = xf.shape
    gs, n = w.group_size, scale.shape[1]
    lanes = packing.lanes(gs)
    rows = torch.tensor([sl if eb == b else 0 for eb, sl in w._slots()], device=xf.device)
    rows = packing.own_buffer(aten._unsafe_index(rows, [ids]))                     # [S] slot among the b-bit experts
    codes = aten._unsafe_index(getattr(w, f"q{b}"), [rows])                        # [S, N, K*b/8], never copied
    y, start = 0, 0
    for off, width in packing.PLANES[b]:
        nbytes = k * width // 8
        plane = codes[..., start:start + nbytes].view(s_, n, k // gs, gs * width // 8 // lanes, lanes)
        start += nbytes
        for piece in _plane_pieces(plane, _x_for_plane(xf, width, gs), width, off, scale, member):
            y = y + piece.sum((-2, -1))
    return y


# ---- prefill --------------------------------------------------------------------------------------
GROUPED_PAIRS_PER_EXPERT = 2   # more token-expert pairs than this per expert on average: grouped path


def use_grouped(num_pairs, num_experts: int) -> bool:
    """Decode or prefill path. Under torch.compile with a dynamic token count this is decided once per
    graph: a backed size is guarded (decode sizes share one graph, prefill sizes a second); an
    unbacked one (torch._dynamo.decorators.mark_unbacked), or a backed one under
    backed_size_oblivious, is not, and takes the decode path."""
    return guard_or_false(num_pairs > GROUPED_PAIRS_PER_EXPERT * num_experts)


# Experts dequantized per step of the prefill path. On CPU, glibc's malloc maps every block over 32 MB
# afresh (and unmaps it when freed): a bigger buffer would be page-faulted in on every call, which cost
# more than the dequantization itself (OLMoE gate_up, 64 experts at once: 0.8 G weights/s; 2 at a time:
# 4.1). CUDA's caching allocator keeps its blocks: there one step per width (fewer, bigger kernels).
CHUNK_BYTES = 16 << 20
CHUNK_BYTES_GPU = 4 << 30


def expert_chunks(w, itemsize: int, device: torch.device = torch.device("cpu")) -> list[list[int]]:
    """The experts in steps of at most CHUNK_BYTES (on CPU) of dequantized weights, each of one bit-width."""
    n, k = _nk(w)
    per = max(1, (CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES_GPU) // (n * k * itemsize))
    return [idx[i:i + per] for idx in experts_by_width(w.expert_bits).values() for i in range(0, len(idx), per)]


def grouped_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The same product for many pairs: a few experts at a time dequantized to 16 bits (expert_chunks)
    and one grouped matmul over the pairs routed to them."""
    from transformers.integrations.moe import _grouped_mm
    dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32   # the model's own 16 bits
    chunks = expert_chunks(w, dtype.itemsize, x.device)
    chunk_of, local_of = [0] * w.num_rows, [0] * w.num_rows
    for c, experts in enumerate(chunks):
        for j, e in enumerate(experts):
            chunk_of[e], local_of[e] = c, j
    dev = ids.device
    local_of = torch.tensor(local_of, device=dev)
    y = x.new_empty(x.shape[0], _nk(w)[0], dtype=torch.float32)
    parts = positions_of(torch.tensor(chunk_of, device=dev)[ids], list(range(len(chunks))))
    for experts, pos in zip(chunks, parts):
        local = local_of[ids[pos]]                                                 # [P] expert within the chunk
        order = local.argsort(stable=True)
        pos, local = pos[order], local[order]
        offs = torch.zeros(len(experts), dtype=torch.int32, device=dev).scatter_add_(
            0, local, torch.ones_like(local, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        wc = w.dequantize_experts(experts, dtype)                                  # [C, N, K]
        y = y.index_put((pos,), _grouped_mm(x[pos].to(dtype), wc.transpose(-1, -2), offs).float())
    return y


# ---- the experts implementation -----------------------------------------------------------------
def use_triton(x: torch.Tensor) -> bool:
    """Whether the products run the Triton kernels (TRITON, on GPU or under Triton's interpreter)."""
    if not (TRITON and (x.device.type == "cuda" or _TRITON_INTERPRET)):
        return False
    if triton_decode is None:
        raise RuntimeError("dynamoq.kernels.TRITON = True needs the triton package (pip install triton)")
    return True


def _silu_gated(experts) -> bool:
    """Whether an experts module gates as transformers does by default: silu(gate) * up, no biases, no norm."""
    return (experts.has_gate and not experts.has_bias and not experts.has_post_expert_norm
            and type(experts)._apply_gate is _default_apply_gate
            and isinstance(getattr(experts, "act_fn", None), (torch.nn.SiLU, SiLUActivation)))


def expert_linear(w, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y[s] = W[ids[s]] @ x[s] for a DynaMoExperts w, x [S, K] (or [T, K] with S = k T: pair s reads row
    s / k, a token's k experts), ids [S] -> [S, N] float32: the native kernel where it runs (it reads a token's
    row once for its k pairs); else the decode path for few token-expert pairs, the grouped path for many (each by
    a Triton kernel of ours where TRITON is on)."""
    if use_native(w, x):
        return native_linear(w, x, ids)
    grouped, triton = use_grouped(ids.shape[0], w.num_rows), use_triton(x)
    if triton and not grouped:
        return triton_decode.linear(w, x, ids)
    if triton and triton_grouped.supports(w):
        return triton_grouped.linear(w, x, ids)
    if guard_or_true(x.shape[0] != ids.shape[0]):          # (unbacked token counts: T != k T)
        x = x.repeat_interleave(ids.shape[0] // x.shape[0], dim=0)                 # [S, K]
    return grouped_linear(w, x, ids) if grouped else decode_linear(w, x, ids)


def dynamoq_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    # hidden_states [T, H]; top_k_index, top_k_weights [T, k]
    first = self.gate_up_proj if self.has_gate else self.up_proj
    if not isinstance(first, DynaMoExperts):
        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, k = top_k_index.shape
    ids = top_k_index.reshape(-1)                                          # [S = T * k]
    if (isinstance(self.down_proj, DynaMoExperts) and use_triton(hidden_states) and _silu_gated(self)
            and not use_grouped(ids.shape[0], first.num_rows)):
        # two Triton kernels: gate_up with the gate, then down with the routing weights' sum (launches dominate decode)
        h = triton_decode.gated(first, hidden_states, ids)                          # [S, I]
        return triton_decode.combined(self.down_proj, h, ids, top_k_weights).to(hidden_states.dtype)
    h = expert_linear(first, hidden_states, ids)                             # [S, 2I] or [S, I]
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[ids].float()
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)           # [S, I]
    y = expert_linear(self.down_proj, h, ids)                                # [S, H]
    if self.has_bias:
        y = y + self.down_proj_bias[ids].float()
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y.to(hidden_states.dtype)).float()
    y = y * top_k_weights.reshape(-1, 1).float()
    return y.view(num_tokens, k, -1).sum(1).to(hidden_states.dtype)


def register() -> None:
    ALL_EXPERTS_FUNCTIONS.register(NAME, dynamoq_experts_forward)
