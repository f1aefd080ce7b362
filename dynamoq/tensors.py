"""Tensor subclasses that carry packed low-bit weights.

DynaMoExperts: one projection of one MoE layer's experts, every expert with its own bit-width.
  logical shape [E, N, K] (or [E, K, N] when the family stores experts transposed)
  scale, zero  [E, N, K // g]          float16 scale and uint8 zero point per group of g inputs
  q{b}         [E_b, N, K * b // 8]    codes of the E_b experts that have b bits, in expert order
SwitchableLinear: the same format for a 2D nn.Linear weight [N, K] (shared experts, dense MLPs).
Optional switching cache (METHOD.md §3, switching.py), r input channels per expert:
  cache_idx   [E, r]      int64   the cached (most dynamic) input channels of each expert
  cache_fp    [E, N, r]   16-bit  their full-precision columns
  cache_delta [E, N, r]   16-bit  live correction: re-quantized columns minus packed columns (0 = baseline)
  cache_level [E]         int32   bit-width the cached columns are at now

Any op without a dedicated implementation sees the dequantized weight, so every experts
implementation of transformers runs on these tensors; `expert_linear` is the fused fast path.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from . import packing
from .packing import BITS, QuantizationError

aten = torch.ops.aten
_CODE_NAMES = [f"q{b}" for b in BITS]
CACHE_NAMES = ["cache_idx", "cache_fp", "cache_delta", "cache_level"]
_OPTIONAL = tuple(_CODE_NAMES + CACHE_NAMES)


class _PackedWeight(TorchAOBaseTensor):
    tensor_data_names = ["scale", "zero"]
    tensor_attribute_names = ["expert_bits", "group_size", "transposed", "dtype"]
    optional_tensor_data_names = list(_OPTIONAL)

    def __new__(cls, scale, zero, expert_bits, group_size, transposed, dtype,
                q2=None, q3=None, q4=None, q6=None, q8=None,
                cache_idx=None, cache_fp=None, cache_delta=None, cache_level=None):
        e, n, k = scale.shape[0], scale.shape[1], scale.shape[2] * group_size
        shape = tuple(cls._logical_shape(e, n, k, transposed))
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=scale.device, requires_grad=False)
        t._shape, t._device = shape, scale.device      # plain copies for __tensor_flatten__ (t.shape costs microseconds)
        return t

    def __init__(self, scale, zero, expert_bits, group_size, transposed, dtype,
                 q2=None, q3=None, q4=None, q6=None, q8=None,
                 cache_idx=None, cache_fp=None, cache_delta=None, cache_level=None):
        self.scale, self.zero, self._dtype = scale, zero, dtype
        self.expert_bits = tuple(int(b) for b in expert_bits)
        self.group_size, self.transposed = int(group_size), bool(transposed)
        self.q2, self.q3, self.q4, self.q6, self.q8 = q2, q3, q4, q6, q8
        self.cache_idx, self.cache_fp, self.cache_delta, self.cache_level = cache_idx, cache_fp, cache_delta, cache_level

    def __tensor_flatten__(self):
        # torchao's generic version (hasattr / getattr on the tensor) took ~4 us, and torch.compile calls it
        # twice per packed weight on every call of a compiled model (guards) and once more to unwrap it
        # (dynamo's metadata guard compares the second part; with "present" it also covers the first, and with
        # shape and device the weight's own tensor guard, so kernels.guard_filter can drop those)
        d = self.__dict__                  # (self.dtype alone, a property of a subclass, costs ~2.4 us)
        present = tuple(n for n in _OPTIONAL if d[n] is not None)
        return ["scale", "zero", *present], {
            "expert_bits": d["expert_bits"], "group_size": d["group_size"], "transposed": d["transposed"],
            "dtype": d["_dtype"], "present": present, "shape": d["_shape"], "device": d["_device"]}

    @staticmethod
    def _logical_shape(e, n, k, transposed):
        return (e, k, n) if transposed else (e, n, k)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, scale, zero, expert_bits, group_size, transposed=False, dtype=torch.bfloat16,
                   cache_idx=None, w_fp=None):
        """codes [E, N, K] integers, scale/zero [E, N, K // g], expert_bits: E ints; with cache_idx [E, r]
        and the full-precision w_fp [E, N, K], keep those columns for run-time switching."""
        packed = {}
        for b, idx in experts_by_width(expert_bits).items():
            packed[f"q{b}"] = packing.pack(codes[idx], b, group_size)
        if cache_idx is not None:
            cdt = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16
            cols = cache_idx[:, None, :].expand(-1, w_fp.shape[1], -1)
            fp = w_fp.gather(-1, cols).to(cdt)                                              # [E, N, r]
            packed.update(cache_idx=cache_idx.long(), cache_fp=fp, cache_delta=torch.zeros_like(fp),
                          cache_level=torch.tensor(expert_bits, dtype=torch.int32, device=fp.device))
        return cls(scale.to(packing.SCALE_DTYPE), zero.to(torch.uint8), expert_bits, group_size, transposed,
                   dtype, **packed)

    @classmethod
    def from_float(cls, w, expert_bits, group_size=128, transposed=False, cache_idx=None, quantizer="rtn"):
        """A data-free quantizer (packing.DATA_FREE: "rtn" min-max grids, "clip" searched grids). w is the
        logical weight; expert_bits one bit-width per leading row."""
        w3 = cls._to_nk(w, transposed)
        if len(expert_bits) != w3.shape[0]:
            raise QuantizationError(f"got {len(expert_bits)} bit-widths for {w3.shape[0]} experts")
        for b in expert_bits:
            packing.check_bits(b)
        packing.check_group(w3.shape[-1], group_size, f"weight of shape {tuple(w.shape)}")
        e, n, k = w3.shape
        codes = torch.empty(e, n, k, dtype=torch.int32, device=w.device)
        scale = torch.empty(e, n, k // group_size, dtype=packing.SCALE_DTYPE, device=w.device)
        zero = torch.empty(e, n, k // group_size, dtype=torch.uint8, device=w.device)
        for b, idx in experts_by_width(expert_bits).items():
            idx = torch.tensor(idx, device=w.device)
            codes[idx], scale[idx], zero[idx] = packing.DATA_FREE[quantizer](w3[idx], b, group_size)
        return cls.from_codes(codes, scale, zero, expert_bits, group_size, transposed, w.dtype, cache_idx, w3)

    @staticmethod
    def _to_nk(w, transposed):
        return w.transpose(-1, -2) if transposed else w

    # ---- reading --------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.expert_bits)

    def _slots(self):
        """expert -> (bit-width, position among the experts of that bit-width)."""
        seen = {b: 0 for b in BITS}
        out = []
        for b in self.expert_bits:
            out.append((b, seen[b]))
            seen[b] += 1
        return out

    def codes(self) -> torch.Tensor:
        """All codes [E, N, K] int32, in expert order (for tests and re-quantization)."""
        parts = {b: packing.unpack(getattr(self, f"q{b}"), b, self.group_size) for b in set(self.expert_bits)}
        return torch.stack([parts[b][s] for b, s in self._slots()])

    def dequantize_nk(self, dtype=None):
        """[E, N, K] in dtype (storage layout, never transposed)."""
        groups, order = [], []
        for idx in experts_by_width(self.expert_bits).values():
            groups.append(self.dequantize_experts(idx, dtype))
            order += idx
        w = torch.cat(groups) if len(groups) > 1 else groups[0]
        if order != sorted(order):
            w = w[torch.tensor(inverse_permutation(order), device=w.device)]
        return w

    def dequantize_experts(self, experts: list[int], dtype=None) -> torch.Tensor:
        """[len(experts), N, K] in dtype: the given experts, which must share one bit-width, in that order."""
        b, slot_of = self.expert_bits[experts[0]], self._slots()
        slots = [slot_of[e][1] for e in experts]
        assert all(self.expert_bits[e] == b for e in experts), "dequantize_experts: experts of several widths"
        pick = _rows(experts, self.num_rows)
        w = packing.dequantize_packed(_rows(slots, getattr(self, f"q{b}").shape[0])(getattr(self, f"q{b}")), b,
                                      pick(self.scale), pick(self.zero), self.group_size, dtype or self.dtype)
        if self.cache_idx is not None:
            cols = pick(self.cache_idx)[:, None, :].expand(-1, w.shape[1], -1)
            w = w.scatter_add(-1, cols, pick(self.cache_delta).to(w.dtype))
        return w

    def packed_expert_nk(self, e: int, dtype=torch.float32) -> torch.Tensor:
        """[N, K] of expert e's packed codes alone (no switching correction): one expert dequantized."""
        b, slot = self._slots()[e]
        return packing.dequantize_packed(getattr(self, f"q{b}")[slot], b, self.scale[e], self.zero[e],
                                         self.group_size, dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The logical weight as a plain tensor."""
        w = self.dequantize_nk(dtype)
        w = w.transpose(-1, -2) if self.transposed else w
        return w if self._is_3d else w[0]

    def storage_bytes(self) -> int:
        """Bytes really held by the packed codes, scales and zero points."""
        names = self.tensor_data_names + [n for n in _CODE_NAMES if getattr(self, n) is not None]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def cache_bytes(self) -> int:
        """Bytes of the switching cache (0 without one)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in CACHE_NAMES if getattr(self, n) is not None)

    def _stable_hash_for_caching(self) -> str:
        # the compiled graph depends on the layout metadata and on dynamoq's code that reads it (the
        # packing layout, the kernels), not on the weight values: a graph cached by another version of
        # that code must never be reused (it would read the bytes in the wrong order)
        shapes = [tuple(getattr(self, n).shape) for n in self.tensor_data_names + self.optional_tensor_data_names
                  if getattr(self, n) is not None]
        return (f"{type(self).__name__}-{self.expert_bits}-{self.group_size}-{self.transposed}-{self.dtype}-{shapes}"
                f"-{_code_hash()}")

    def __repr__(self):
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, bits={self.expert_bits}, "
                f"group_size={self.group_size}, transposed={self.transposed}, dtype={self.dtype})")


class DynaMoExperts(_PackedWeight):
    """Fused 3D expert weights of one projection, one bit-width per expert."""
    _is_3d = True

    def expert_linear(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """y[s] = W[ids[s]] @ x[s] for x [S, K], ids [S] -> [S, N] float32: the fused fast path
        (kernels.expert_linear)."""
        from . import kernels
        return kernels.expert_linear(self, x, ids)


class SwitchableLinear(_PackedWeight):
    """A packed 2D nn.Linear weight [N, K] (shared experts, dense MLPs)."""
    _is_3d = False

    @staticmethod
    def _logical_shape(e, n, k, transposed):
        return (n, k)

    @classmethod
    def from_float(cls, w, bits, group_size=128, quantizer="rtn"):
        return super().from_float(w[None], (bits,), group_size, quantizer=quantizer)

    @property
    def bits(self) -> int:
        return self.expert_bits[0]


def _rows(idx: list[int], total: int):
    """t -> t[idx] along dim 0: a slice (a view) when idx is a run of consecutive rows."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return (lambda t: t) if len(idx) == total else (lambda t: t[idx[0]:idx[0] + len(idx)])  # noqa: E731
    return lambda t: packing.own_buffer(t[torch.tensor(idx, device=t.device)])  # noqa: E731


def experts_by_width(expert_bits) -> dict[int, list[int]]:
    """bit-width -> the experts that have it, in expert order; widths ascending."""
    out: dict[int, list[int]] = {}
    for e, b in sorted(enumerate(expert_bits), key=lambda eb: eb[1]):
        out.setdefault(b, []).append(e)
    return out


def inverse_permutation(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for pos, e in enumerate(perm):
        inv[e] = pos
    return inv


@functools.cache
def _code_hash() -> str:
    """Digest of the sources that decide how packed weights are read."""
    from . import kernels
    h = hashlib.sha256()
    for mod in (packing, kernels, sys.modules[__name__]):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


# ---- ops ----------------------------------------------------------------------------------------
_ONCE: dict[int, tuple] | None = None


@contextmanager
def dequantized_once():
    """Inside, an eager op on a packed weight dequantizes it once, not once per call: for passes that
    run many batches through a few quantized modules (GPTQ's layer by layer replay). Every weight
    dequantized inside is held until the block ends, so keep it around one layer's calls."""
    global _ONCE
    outer, _ONCE = _ONCE, {}
    try:
        yield
    finally:
        _ONCE = outer


def _plain(x):
    if not isinstance(x, _PackedWeight):
        return x
    if _ONCE is None:
        return x.dequantize()
    hit = _ONCE.get(id(x))
    if hit is None:
        hit = _ONCE[id(x)] = (x, x.dequantize())     # x kept alive: its id is not reused meanwhile
    return hit[1]


def _to_copy(func, types, args, kwargs):
    self = args[0]
    kw = self._get_to_kwargs(*args[1:], **kwargs)
    moved = self._apply_fn_to_data(lambda t: t.to(kw["device"]))
    out = type(self)(moved.scale, moved.zero, self.expert_bits, self.group_size, self.transposed, kw["dtype"],
                     **{n: getattr(moved, n) for n in _CODE_NAMES + CACHE_NAMES})
    return return_and_correct_aliasing(func, args, kwargs, out)


for _cls in (DynaMoExperts, SwitchableLinear):  # .to(dtype) changes the dtype it dequantizes to
    _cls.implements(aten._to_copy.default)(_to_copy)


@DynaMoExperts.implements(aten.select.int)
def _select(func, types, args, kwargs):
    self, dim, index = args
    if dim != 0:
        return func(self.dequantize(), dim, index)
    index = index % self.num_rows
    w = self.packed_expert_nk(index, self.dtype)
    if self.cache_idx is not None:
        cols = self.cache_idx[index][None, :].expand(w.shape[0], -1)
        w = w.scatter_add(-1, cols, self.cache_delta[index].to(w.dtype))
    return w.transpose(-1, -2) if self.transposed else w


@SwitchableLinear.implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]                       # x [..., K], w [N, K]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    from . import kernels
    if kernels.use_native(w, x):                  # the experts' kernel, every token a pair of "expert" 0
        x2 = x.reshape(-1, x.shape[-1])
        y = kernels.native_linear(w, x2, x2.new_zeros(x2.shape[0], dtype=torch.long))
        y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias
    return F.linear(x, _plain(w).to(x.dtype), bias)


def _fallback(func, types, args, kwargs):
    """Any other op: run it on the dequantized weight (correct everywhere, fast nowhere)."""
    args = torch.utils._pytree.tree_map(_plain, args)
    kwargs = torch.utils._pytree.tree_map(_plain, kwargs or {})
    return func(*args, **kwargs)


def _dispatch(cls, func, types, args=(), kwargs=None):
    table = cls._ATEN_OP_TABLE[cls]
    if func in table:
        return table[func](func, types, args, kwargs or {})
    return _fallback(func, types, args, kwargs)


_PackedWeight.__torch_dispatch__ = classmethod(_dispatch)
