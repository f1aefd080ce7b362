"""Helpers shared by the reference-model builders: cache paths, seeding, threads, atomic output
directories, a cross-process build lock, digests, and routing statistics (normalised mutual
information between a text's domain and the expert a router picks)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

DEFAULT_THREADS = 2


def cache_base() -> Path:
    """``$DYNAMOQ_CACHE`` or ``~/.cache/dynamoq`` (the convention of ``dynamoq.data``)."""
    return Path(os.environ.get("DYNAMOQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynamoq"))


def default_threads() -> int:
    return max(1, min(DEFAULT_THREADS, os.cpu_count() or 1))


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16; True where it cannot tell). Without
    it oneDNN emulates bf16: a [2048, 576] x [576, 1536] product with its backward ran 6.5x slower under bf16
    autocast than in float32 (2 threads, AMD Zen 3, AVX2 only)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), None)
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def determinism(seed: int, threads: int | None):
    """Seeds Python and torch, fixes the thread count, flushes denormals (they make CPU training
    crawl: Adam's second moments of tiny gradients are denormal) and asks torch for deterministic
    algorithms; everything is restored on exit. Results are reproducible for a seed on one machine
    with one thread count (CPU reductions may differ across CPUs or thread counts)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    rng_state = torch.get_rng_state()
    py_state = random.getstate()
    torch.set_num_threads(threads or default_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_flush_denormal(False)
        torch.set_rng_state(rng_state)
        random.setstate(py_state)


@contextlib.contextmanager
def build_lock(path: Path, what: str):
    """An exclusive lock file, so that two processes never build the same model at once (the second
    waits, then finds the model built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the atomic rename still keeps the output whole
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"dynamoq: another process is building {what}; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yields a fresh temporary directory beside ``out``; on success it replaces ``out`` in one rename,
    on failure it is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.iterdir():   # some writers create 0600 files: a model is for everyone to read
        if f.is_file():
            os.chmod(f, 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dir_digest(path: str | os.PathLike) -> str:
    """``state_digest`` of the safetensors weights of a saved model directory."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state_digest(state)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}
        self._last = self.t0

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(self.marks.get(name, 0.0) + now - self._last, 2)
        self._last = now

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


# ---------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def expert_choices(model, windows: torch.Tensor, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """For each MoE layer, the expert each token's router ranks first: ``{layer: LongTensor [N*T]}``
    (``windows`` LongTensor [N, T]). Works for any model ``dynamoq.moe_blocks`` finds, whose router
    returns (logits, ...)."""
    from ..adapters import moe_blocks

    blocks = [b for b in moe_blocks(model) if b.router is not None]
    if not blocks:
        raise ValueError("the model has no MoE block with a router")
    picks: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    hooks = []
    for b in blocks:
        def hook(mod, args, out, layer=b.layer):
            logits = out[0] if isinstance(out, (tuple, list)) else out
            picks[layer].append(logits.reshape(-1, logits.shape[-1]).argmax(-1).cpu())
        hooks.append(b.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {layer: torch.cat(v) for layer, v in picks.items()}


def nmi(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Normalised mutual information I(L; C) / sqrt(H(L) H(C)) of two integer labellings (0 when
    either has a single value). In [0, 1]: 0 for independence, 1 when each determines the other."""
    labels, clusters = labels.long().reshape(-1), clusters.long().reshape(-1)
    if labels.numel() != clusters.numel() or labels.numel() == 0:
        raise ValueError("nmi needs two labellings of the same, non-zero length")
    _, li = labels.unique(return_inverse=True)
    _, ci = clusters.unique(return_inverse=True)
    nl, nc = int(li.max()) + 1, int(ci.max()) + 1
    joint = torch.zeros(nl * nc, dtype=torch.float64).index_add_(
        0, li * nc + ci, torch.ones(li.numel(), dtype=torch.float64)).reshape(nl, nc)
    p = joint / joint.sum()
    pl, pc = p.sum(1), p.sum(0)

    def h(q):
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    hl, hc = h(pl), h(pc)
    if hl <= 0 or hc <= 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pl[:, None] * pc[None, :])[nz]).log()).sum())
    return max(0.0, mi / math.sqrt(hl * hc))


def routing_nmi(model, windows_by_domain: dict[str, torch.Tensor], batch_size: int = 4) -> dict[int, float]:
    """Per MoE layer: NMI between a token's domain and its top-1 expert, over the given windows
    (give every domain the same number of tokens, so that H(domain) is log of the domain count)."""
    names = list(windows_by_domain)
    per = {n: expert_choices(model, w, batch_size) for n, w in windows_by_domain.items()}
    layers = list(per[names[0]])
    out = {}
    for layer in layers:
        clusters = torch.cat([per[n][layer] for n in names])
        labels = torch.cat([torch.full_like(per[n][layer], k) for k, n in enumerate(names)])
        out[layer] = nmi(labels, clusters)
    return out


def usage(model, windows_by_domain: dict[str, torch.Tensor], batch_size: int = 4) -> dict[str, dict[int, list[float]]]:
    """Per domain and MoE layer: the share of tokens whose top-1 expert is each expert."""
    out = {}
    for n, w in windows_by_domain.items():
        ch = expert_choices(model, w, batch_size)
        out[n] = {}
        for layer, c in ch.items():
            e = int(getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "num_local_experts", 0)
                    or getattr(model.config, "num_experts", 0) or int(c.max()) + 1)
            out[n][layer] = (torch.bincount(c, minlength=e).double() / c.numel()).tolist()
    return out
