"""The native kernel: packed low-bit experts times token-expert pairs, with AVX-512 VNNI, on CPU.

Inductor's loops (kernels.decode_linear) turn each code into a float and multiply in fp32: about 0.35
instructions per weight, so one core reads codes far slower than memory allows. Here codes stay bytes:
x is quantized per group to int8 (scale = max |x| / 127, as llama.cpp's Q8 activations), and vpdpbusd
multiplies 64 unsigned codes by 64 signed inputs per instruction; code bytes are prefetched ahead. Where
the CPU has GFNI, one GF2P8AFFINEQB takes a part (2-bit, 1-bit codes ...) out of the code bytes, instead of
a shift and a mask (DYNAMOQ_GFNI=0 builds without it). The pairs are grouped by expert and a tile of rows
meets up to 4 pairs of its expert, so one kernel serves decode and prefill (many pairs): kernels.expert_linear
uses it for every number of pairs. An expert with a single pair (every expert at decode of one token) has a
loop of its own: the pair's x scales folded into the row factors, and where a group spans whole 64-byte
blocks, one broadcast factor per group. A 3- or 6-bit code's second plane is merged into each part of the
first before the product (one vpdpbusd per 64 codes, not two).

Prefill, on CPUs with AMX-INT8 (amx()): an expert with at least 4 pairs (amx_min_pairs) has its rows
unpacked once into one byte per code, and AMX's tile product multiplies 16 rows by 16 pairs, 64 inputs at
a time, summed in int32 per group as above: the same result up to the order of float additions. A DynaMo
mixed layer at 128 tokens ran 1.6-1.7x (OLMoE shape) and 1.25-1.3x (Qwen3 shape) faster than without it
(on an Intel CPU with AMX, an earlier session; git history of recipes/results/kernels_cpu.md, "(no AMX)"). Needs groups of a multiple of 64 inputs; Linux grants the
tile state once per process; DYNAMOQ_AMX=0 turns it off.

The price of the int8 x: each output is off by about 0.5% of its norm (random data; the zero point
uses the sum of the rounded x, which centres the error), against 10-30% from 2-4-bit weights. On the
real reference model, perplexity through decode with int8 x stays within 0.8% of one exact forward
over the same text, the size of bf16's own difference between the two (recipes/results/kernels_cpu.md).

The C source (native_decode.c) is compiled once per machine with the system C compiler into
$DYNAMOQ_CACHE/native (or ~/.cache/dynamoq/native) and loaded with ctypes: no torch headers, a second
or two. It threads with OpenMP, in the libgomp torch has loaded (torch's own thread pool).
`available()` is False without x86-64 Linux, AVX-512 (F, BW, VL, DQ, VNNI) or a compiler, or with
DYNAMOQ_NATIVE=0; kernels.NATIVE = False turns it off in-process. Then Inductor's loops and the grouped
path run, as on GPU. Under torch.compile the kernel is one opaque operator (dynamoq::native_decode):
fullgraph, a dynamic number of pairs, no recompiles when the routing changes. A weight's first call makes its
call plan (_Plan) and moves its memory to 2 MB pages (huge_pages).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from . import packing

SOURCE = Path(__file__).with_name("native_decode.c")
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
AMX_FLAGS = ["-mamx-tile", "-mamx-int8", "-DDYNAMOQ_AMX"]
AMX_CPU_FLAGS = ("amx_tile", "amx_int8")
GFNI_FLAGS = ["-mgfni", "-DDYNAMOQ_GFNI"]        # one instruction per part of a code byte instead of two


def _cpu_ok(needed=CPU_FLAGS) -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in needed)


def _build(flags: list[str]) -> Path:
    """Compile native_decode.c (once per source and flags) and return the shared library."""
    from .reference._common import cache_base
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc] + flags).encode()).hexdigest()[:16]
    out = cache_base() / "native" / f"decode-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            part = Path(tmp) / out.name
            r = subprocess.run([cc, *flags, str(SOURCE), "-o", str(part)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{r.stderr[-2000:]}")
            os.replace(part, out)            # atomic: a concurrent build or a stopped one leaves no half file
    return out


@functools.cache
def _lib():
    gfni = _cpu_ok(("gfni",)) and os.environ.get("DYNAMOQ_GFNI", "1") != "0"
    flags = FLAGS + (GFNI_FLAGS if gfni else [])
    try:                                     # with the AMX path where the compiler knows AMX, else without
        lib = ctypes.CDLL(str(_build(flags + AMX_FLAGS)))
    except RuntimeError:
        lib = ctypes.CDLL(str(_build(flags)))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dynamoq_decode.argtypes = [i64, i64, i64, i64, i64, p, i32, p, p, p, p, p, p, i32, p, p, p, i32]
    lib.dynamoq_decode.restype = i32
    lib.dynamoq_amx_init.restype = lib.dynamoq_amx_ready.restype = i32
    if _cpu_ok(AMX_CPU_FLAGS) and os.environ.get("DYNAMOQ_AMX", "1") != "0":
        lib.dynamoq_amx_init()               # asks Linux for the tile state, once; the C side keeps the answer
    return lib


def amx() -> bool:
    """Whether experts with many pairs take the AMX path: AMX-INT8 on the CPU, granted by Linux, a compiler
    that knows it; DYNAMOQ_AMX=0 turns it off."""
    return _probe() and bool(_lib().dynamoq_amx_ready())


@contextlib.contextmanager
def amx_min_pairs(n: int):
    """Experts with at least n pairs take the AMX path (where amx()) for the duration: 1 every expert with a
    pair, a huge n none. For tests and benchmarks; torch.compile does not see it."""
    v = ctypes.c_int.in_dll(_lib(), "dynamoq_amx_min_pairs")
    before, v.value = v.value, min(n, 2 ** 31 - 1)
    try:
        yield
    finally:
        v.value = before


@torch.compiler.assume_constant_result      # torch.compile calls it and keeps the answer as a constant
def available() -> bool:
    """Whether the native kernel runs here (CPU features, a compiler; DYNAMOQ_NATIVE=0 turns it off)."""
    return _probe()


@functools.cache
def _probe() -> bool:
    if os.environ.get("DYNAMOQ_NATIVE", "1") == "0" or not _cpu_ok():
        return False
    try:
        _lib()
    except (OSError, RuntimeError) as e:
        warnings.warn(f"dynamoq: the native decode kernel is unavailable ({e}); using Inductor's loops")
        return False
    return True


def supports(expert_bits, group_size: int, k: int) -> bool:
    """Whether the kernel takes this layout: every int32 lane (4 code bytes) of a plane inside one group."""
    widths = {w for b in set(expert_bits) for _, w in packing.PLANES[b]}
    return k % group_size == 0 and group_size <= 1024 and all(group_size * w % 32 == 0 for w in widths)


@functools.cache
def _planes() -> torch.Tensor:
    t = torch.zeros(9, 2, 2, dtype=torch.int32)                     # [bits, plane, (offset, width)]
    for b, planes in packing.PLANES.items():
        for i, pl in enumerate(planes):
            t[b, i] = torch.tensor(pl)
    return t


@functools.cache
def _lane_group(k: int, group_size: int, width: int) -> torch.Tensor:
    """[blocks * 16] int32: the group of each int32 lane of a plane, minus the first group of its 64-byte block."""
    nbytes, bpg = k * width // 8, group_size * width // 8
    lane = torch.arange((nbytes + 63) // 64 * 16)
    return ((4 * lane) // bpg - (64 * (lane // 16)) // bpg).to(torch.int32)


@functools.cache
def _expert_meta(expert_bits: tuple) -> torch.Tensor:
    """[E, 2] int32: each expert's bit-width and its position among the experts of that width."""
    seen: dict[int, int] = {}
    rows = []
    for b in expert_bits:
        rows.append((b, seen.get(b, 0)))
        seen[b] = rows[-1][1] + 1
    return torch.tensor(rows, dtype=torch.int32)


@functools.cache
def _lane_tables(k: int, group_size: int, widths: tuple):
    """The lane-group tables of the plane widths of these bit-widths (kept alive) and their addresses [9]."""
    keep = {w: _lane_group(k, group_size, w) for w in {w for b in widths for _, w in packing.PLANES[b]}}
    return keep, (ctypes.c_int64 * 9)(*[keep[w].data_ptr() if w in keep else 0 for w in range(9)])


def quantize_x(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel does to x (in C; here for tests and the cache correction): x [S, K] ->
    (x8 [S, G, gs] int8, xs [S, G] fp32), x ~= x8 * xs per group of inputs, max |x8| = 127."""
    xg = x.float().reshape(x.shape[0], -1, group_size)
    xs = (xg.abs().amax(-1) / 127).clamp_min(1e-30)
    return torch.round(xg / xs[..., None]).to(torch.int8), xs


def rounded_x(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [S, K] as the kernel sees it: x8 * xs, [S, K] fp32."""
    x8, xs = quantize_x(x, group_size)
    return (x8.float() * xs[..., None]).flatten(1)


# Transparent huge pages for what the kernel reads. With 4 KB pages a decode step's expert rows (megabytes,
# evicted between layers) cost a TLB miss, a page walk from memory, every 4 KB; backed by 2 MB pages, the
# 1-token layer ran 7-10% faster (one thread, interleaved with bf16's, caches flushed between calls: OLMoE
# shape 1.96 -> 1.78 ms, Qwen3 1.53 -> 1.41). PyTorch allocates without them (THP_MEM_ALLOC_ENABLE, read at
# import, turns them on for every tensor), so the first call that reads a weight asks Linux to move the
# 2 MB-aligned part of it into huge pages (MADV_COLLAPSE, Linux 6.1+; about 2 s per GB, once; where Linux
# refuses, nothing changes). DYNAMOQ_HUGE_PAGES=0 turns it off.
_MADV_COLLAPSE = 25
_HUGE = 2 << 20
_collapsed: set[tuple[int, int]] = set()


@functools.cache
def _madvise():
    if os.environ.get("DYNAMOQ_HUGE_PAGES", "1") == "0":
        return None
    f = ctypes.CDLL(None, use_errno=True).madvise
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


def huge_pages(t: torch.Tensor) -> bool:
    """Back the 2 MB-aligned part of t's memory with huge pages, once per buffer (see above).
    -> whether Linux did it on this call."""
    key = (t.data_ptr(), t.numel() * t.element_size())
    if key in _collapsed:
        return False
    _collapsed.add(key)
    lo, hi = -(-key[0] // _HUGE) * _HUGE, (key[0] + key[1]) // _HUGE * _HUGE
    madvise = _madvise()
    return hi > lo and madvise is not None and madvise(lo, hi - lo, _MADV_COLLAPSE) == 0


class _Plan:
    """What the kernel needs of one packed weight besides x and ids, made on its first call: a decode step
    calls the kernel twice per layer, and making these each time cost ~8 us of Python a call."""

    def __init__(self, codes, expert_bits, scale, zero, group_size):
        self.e, self.n, g = scale.shape
        self.k = g * group_size
        self.bits = list(expert_bits)
        self.codes = list(codes)                                 # compared by identity
        self.scale, self.zero = weakref.ref(scale), zero         # (a strong scale would keep the plan alive)
        widths = tuple(sorted(set(expert_bits)))
        keep = [c.contiguous() for c in codes] + [zero.contiguous()]
        sc = scale.contiguous()
        base, stride = (ctypes.c_int64 * 9)(), (ctypes.c_int64 * 9)()
        for b, c in zip(widths, keep):
            base[b], stride[b] = c.data_ptr(), c.stride(0)
        for t in (*keep, sc):
            huge_pages(t)
        meta = _expert_meta(tuple(expert_bits))
        tables = _lane_tables(self.k, group_size, widths)
        self.keep = keep + ([sc] if sc is not scale else [])   # what args points into (meta, tables: in their caches)
        self.args = (meta.data_ptr(), base, stride, _planes().data_ptr(), tables[1], packing.lanes(group_size),
                     sc.data_ptr(), keep[-1].data_ptr())

    def fits(self, codes, expert_bits, scale, zero) -> bool:
        return (self.scale() is scale and self.zero is zero and len(codes) == len(self.codes)
                and all(a is b for a, b in zip(codes, self.codes)) and self.bits == expert_bits)


_plans: dict[int, _Plan] = {}        # by id(scale); dropped when the scale is freed


def _plan(codes, expert_bits, scale, zero, group_size) -> _Plan:
    p = _plans.get(id(scale))
    if p is None:                    # (an entry is always its scale's: it goes when the scale does)
        weakref.finalize(scale, _plans.pop, id(scale), None)
    if p is None or not p.fits(codes, expert_bits, scale, zero):
        p = _plans[id(scale)] = _Plan(codes, expert_bits, scale, zero, group_size)
    return p


def _native_decode(x: torch.Tensor, ids: torch.Tensor, codes: list[torch.Tensor], expert_bits: list[int],
                  scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [S, K], ids [S] expert of each pair, codes: the packed q{b} [E_b, N, K * b / 8] of each width
    present (ascending), scale / zero [E, N, G] -> y [S, N] fp32 (sum_k scale * (q - zero) * x, x in int8)."""
    s_, k = x.shape
    p = _plan(codes, expert_bits, scale, zero, group_size)
    if k != p.k:
        raise ValueError(f"native_decode: x has {k} inputs, the weight {p.k}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x, ids = x.contiguous(), ids.to(torch.int64).contiguous()
    y = torch.empty(s_, p.n, dtype=torch.float32)
    rc = _lib().dynamoq_decode(s_, p.n, k, group_size, p.e, x.data_ptr(), x.dtype == torch.bfloat16, ids.data_ptr(),
                               *p.args, y.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError("dynamoq native decode: could not allocate its scratch memory")
    return y


# A plain operator (torch.library.Library) rather than torch.library.custom_op: the latter's Python layers
# cost about 45 us a call here, against 10 (a decode step of the reference model makes 60 calls).
_LIB = torch.library.Library("dynamoq", "FRAGMENT")
_LIB.define("native_decode(Tensor x, Tensor ids, Tensor[] codes, int[] expert_bits, Tensor scale, Tensor zero, "
            "int group_size) -> Tensor")
_LIB.impl("native_decode", _native_decode, "CPU")
native_decode = torch.ops.dynamoq.native_decode.default


@torch.library.register_fake("dynamoq::native_decode")
def _(x, ids, codes, expert_bits, scale, zero, group_size):
    return x.new_empty(x.shape[0], scale.shape[1], dtype=torch.float32)
