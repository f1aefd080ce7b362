"""The native kernel: packed low-bit experts times token-expert pairs, on x86-64 CPUs with AVX-512 VNNI
(native_decode.c, described here) or, lacking it, AVX2 and FMA (native_avx2.c: vpmaddubsw and vpmaddwd in place of
vpdpbusd, 32 codes per instruction, the same quantized x and the same result up to the order of float additions;
no GFNI, no AMX path).

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
first before the product (one vpdpbusd per 64 codes, not two). A switching cache's corrections (cache_delta times
x, as rounded here, at each expert's cached channels) are added in the tiles' accumulators (native_decode.c's
"switching cache"): the layer needs no product of its own for them, and experts whose correction is all zero
(unswitched; judged once per version of cache_delta) skip them.

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

The C source (native_decode.c) and the operator's C++ kernel (native_op.cpp: from the compiled graph to the C
kernel without Python) are compiled once per machine and torch version, with the system's C and C++ compilers
against torch's headers, into $DYNAMOQ_CACHE/native (or ~/.cache/dynamoq/native): about 20 s. The kernel threads
with OpenMP, in the libgomp torch has loaded (torch's own thread pool). `available()` is False without x86-64
Linux, AVX2 and FMA (or AVX-512 F, BW, VL, DQ, VNNI) or the compilers, or with DYNAMOQ_NATIVE=0; kernels.NATIVE = False turns
it off in-process (DYNAMOQ_NATIVE=avx2 takes the AVX2 build on an AVX-512 CPU: isa()). Then Inductor's loops and the grouped path run, as on GPU. Under torch.compile the kernel is
one opaque operator (dynamoq::native_decode): fullgraph, a dynamic number of pairs, no recompiles when the
routing changes. The first call that reads a weight moves its memory to 2 MB pages (huge_pages).
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
from pathlib import Path

import torch

from . import packing

OP_SOURCE = Path(__file__).with_name("native_op.cpp")      # its operator for PyTorch's dispatcher
# The builds, fastest first: C source, compiler flags, the CPU flags it needs (/proc/cpuinfo's names)
BUILDS = {
    "avx512": (Path(__file__).with_name("native_decode.c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"],
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")),
    "avx2": (Path(__file__).with_name("native_avx2.c"), ["-mavx2", "-mf16c", "-mfma"], ("avx2", "f16c", "fma")),
}
C_FLAGS = ["-O3", "-std=c11", "-fPIC", "-fopenmp"]
AMX_FLAGS = ["-mamx-tile", "-mamx-int8", "-DDYNAMOQ_AMX"]
AMX_CPU_FLAGS = ("amx_tile", "amx_int8")
GFNI_FLAGS = ["-mgfni", "-DDYNAMOQ_GFNI"]        # one instruction per part of a code byte instead of two


def _cpu_ok(needed) -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in needed)


@functools.cache
def isa() -> str | None:
    """The build this CPU runs: "avx512" (AVX-512 VNNI), "avx2" (AVX2 and FMA), or None. DYNAMOQ_NATIVE=avx2 asks
    for the AVX2 build on an AVX-512 CPU; DYNAMOQ_NATIVE=0 for none."""
    want = os.environ.get("DYNAMOQ_NATIVE", "1")
    if want == "0":
        return None
    return next((name for name, (_, _, needed) in BUILDS.items() if want in ("1", name) and _cpu_ok(needed)), None)


def _compiler(env: str, *names: str) -> str:
    found = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
    if not found:
        raise RuntimeError(f"no {' or '.join(names)} on PATH (or set {env})")
    return found


def _build(source: Path, flags: list[str]) -> Path:
    """Compile the kernel's C source (native_decode.c or native_avx2.c) and native_op.cpp against this torch (once per sources, flags, compilers and
    torch version: ~20 s) into one shared library and return it."""
    from .reference._common import cache_base
    cc, cxx = _compiler("CC", "cc", "gcc", "clang"), _compiler("CXX", "c++", "g++", "clang++")
    torch_dir = Path(torch.__file__).parent
    cxx_flags = ["-O2", "-std=c++17", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                 f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    link = ["-shared", "-fopenmp", f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = hashlib.sha256(source.read_bytes() + OP_SOURCE.read_bytes()
                         + " ".join([cc, cxx, torch.__version__] + flags).encode()).hexdigest()[:16]
    out = cache_base() / "native" / f"decode-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            c_obj, op_obj, part = Path(tmp) / "decode.o", Path(tmp) / "op.o", Path(tmp) / out.name
            for what, cmd in ((source.name, [cc, *flags, "-c", str(source), "-o", str(c_obj)]),
                              (OP_SOURCE.name, [cxx, *cxx_flags, "-c", str(OP_SOURCE), "-o", str(op_obj)]),
                              ("the link", [cxx, str(c_obj), str(op_obj), "-o", str(part), *link])):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"{cmd[0]} failed on {what}:\n{r.stderr[-2000:]}")
            os.replace(part, out)            # atomic: a concurrent build or a stopped one leaves no half file
    return out


@functools.cache
def _lib():
    source, isa_flags, _ = BUILDS[isa()]
    flags = C_FLAGS + isa_flags
    if isa() == "avx512":
        gfni = _cpu_ok(("gfni",)) and os.environ.get("DYNAMOQ_GFNI", "1") != "0"
        flags += GFNI_FLAGS if gfni else []
        try:                                 # with the AMX path where the compiler knows AMX, else without
            path = _build(source, flags + AMX_FLAGS)
        except RuntimeError:
            path = _build(source, flags)
    else:
        path = _build(source, flags)
    torch.ops.load_library(str(path))        # registers dynamoq::native_decode's CPU kernel (native_op.cpp)
    lib = ctypes.CDLL(str(path))
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.dynamoq_amx_init.restype = lib.dynamoq_amx_ready.restype = i32
    lib.dynamoq_huge_pages.argtypes = lib.dynamoq_huge_pages_seen.argtypes = [p, ctypes.c_size_t]
    lib.dynamoq_huge_pages.restype = lib.dynamoq_huge_pages_seen.restype = i32
    planes = torch.zeros(9, 2, 2, dtype=torch.int32)                 # [bits, plane, (offset, width)]
    for b, pls in packing.PLANES.items():
        for i, pl in enumerate(pls):
            planes[b, i] = torch.tensor(pl)
    lanes = torch.tensor([packing.lanes(g) if g % 8 == 0 else 0 for g in range(1025)], dtype=torch.int32)
    lib.dynamoq_set_tables(p(planes.data_ptr()), p(lanes.data_ptr()))
    if isa() == "avx512" and _cpu_ok(AMX_CPU_FLAGS) and os.environ.get("DYNAMOQ_AMX", "1") != "0":
        lib.dynamoq_amx_init()               # asks Linux for the tile state, once; the C side keeps the answer
    return lib


def amx() -> bool:
    """Whether experts with many pairs take the AMX path: AMX-INT8 on the CPU, granted by Linux, a compiler
    that knows it; DYNAMOQ_AMX=0 turns it off."""
    return _probe() and bool(_lib().dynamoq_amx_ready())


@contextlib.contextmanager
def _knob(name: str, value: int):
    """The C global `name` set to value for the duration (torch.compile does not see it)."""
    v = ctypes.c_int.in_dll(_lib(), name)
    before, v.value = v.value, value
    try:
        yield
    finally:
        v.value = before


def amx_min_pairs(n: int):
    """Experts with at least n pairs take the AMX path (where amx()) for the duration: 1 every expert with a
    pair, a huge n none. For tests and benchmarks."""
    return _knob("dynamoq_amx_min_pairs", min(n, 2 ** 31 - 1))


def cache_after(on: bool):
    """For the duration, the packed path adds a switching cache's correction to its stored outputs, as the AMX
    path does, rather than in its accumulators (native_decode.c's cache_after; the AVX2 build ignores it). For tests."""
    return _knob("dynamoq_cache_after", int(on))


@torch.compiler.assume_constant_result      # torch.compile calls it and keeps the answer as a constant
def available() -> bool:
    """Whether the native kernel runs here (CPU features, a compiler; DYNAMOQ_NATIVE=0 turns it off)."""
    return _probe()


@functools.cache
def _probe() -> bool:
    if isa() is None:
        return False
    try:
        _lib()
    except (OSError, RuntimeError) as e:
        warnings.warn(f"dynamoq: the native decode kernel is unavailable ({e}); using Inductor's loops")
        return False
    return True


@torch.compiler.assume_constant_result      # called with a weight's metadata: no guards on packing's tables
def supports(expert_bits, group_size: int, k: int) -> bool:
    """Whether the kernel takes this layout: every int32 lane (4 code bytes) of a plane inside one group."""
    widths = {w for b in set(expert_bits) for _, w in packing.PLANES[b]}
    return k % group_size == 0 and group_size <= 1024 and all(group_size * w % 32 == 0 for w in widths)


def quantize_x(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel does to x (in C; here for tests): x [S, K] ->
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
# 2 MB-aligned part of its codes, scales and zeros into huge pages (native_op.cpp, MADV_COLLAPSE, Linux 6.1+;
# about 2 s per GB, once; where Linux refuses, nothing changes). DYNAMOQ_HUGE_PAGES=0 turns it off.
def huge_pages(t: torch.Tensor) -> bool:
    """Back the 2 MB-aligned part of t's memory with huge pages, once per buffer, as the kernel does with the
    weights it reads (see above; False where the native library does not run). -> whether Linux did it now."""
    return _probe() and bool(_lib().dynamoq_huge_pages(t.data_ptr(), t.numel() * t.element_size()))


def huge_pages_seen(t: torch.Tensor) -> bool:
    """Whether t's buffer has been through huge_pages (or a kernel call that read it)."""
    return _probe() and bool(_lib().dynamoq_huge_pages_seen(t.data_ptr(), t.numel() * t.element_size()))


# The operator; its CPU kernel is native_op.cpp's, registered when _lib() loads the library (available() does):
# a Python kernel (torch.library.custom_op, or a plain Library impl calling ctypes) cost 10-45 us a call.
_LIB = torch.library.Library("dynamoq", "FRAGMENT")
_LIB.define("native_decode(Tensor x, Tensor ids, Tensor[] codes, int[] expert_bits, Tensor scale, Tensor zero, "
            "int group_size, Tensor? cache_idx=None, Tensor? cache_delta=None) -> Tensor")
native_decode = torch.ops.dynamoq.native_decode.default
"""x [X, K], ids [S] (each pair's expert; S = X, or S = k X: pair s reads row s / k, as a token's k routed experts
share its x, quantized once), codes: q{b} [E_b, N, K * b / 8] of each width present (ascending), expert_bits [E],
scale / zero [E, N, G] -> y [S, N] fp32 = sum_k scale * (q - zero) * x, x in int8 per group; with a switching
cache (cache_idx [E, r] channels, cache_delta [E, N, r]) plus sum_i cache_delta[e, n, i] * x[cache_idx[e, i]]."""


def _load_and_call(x, ids, codes, expert_bits, scale, zero, group_size, cache_idx=None, cache_delta=None):
    """The operator's kernel until the library is loaded (a first call with nothing asking available() before):
    load it, which registers the CPU kernel, and call again."""
    if x.device.type != "cpu" or not _probe():
        raise RuntimeError("dynamoq::native_decode runs on CPU, where dynamoq.native.available()")
    return native_decode(x, ids, codes, expert_bits, scale, zero, group_size, cache_idx, cache_delta)


_LIB.impl("native_decode", _load_and_call, "CompositeExplicitAutograd")    # CPU's own kernel comes first


@torch.library.register_fake("dynamoq::native_decode")
def _(x, ids, codes, expert_bits, scale, zero, group_size, cache_idx=None, cache_delta=None):
    return x.new_empty(ids.shape[0], scale.shape[1], dtype=torch.float32)
