"""Models to work on without a hub: a small built-in MoE made from a config (random weights, for
quick runs of the plumbing), and the reference MoEs (``reference("real" | "tiny")``, see
``dynamoq.reference``): local checkpoints with trained weights, built on first use."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

BUILTIN = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=256, intermediate_size=512,
               moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


def builtin(seed: int = 0):
    """A small Qwen3-MoE (4 layers, 8 experts, top-2) with seeded random weights: a stand-in for
    quick runs of the whole pipeline; quality numbers need a trained model (``reference``)."""
    kw = dict(BUILTIN)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def reference(name: str = "real", *, seed: int = 0, rebuild: bool = False, progress: bool = True,
              threads: int | None = None) -> str:
    """Local path of a reference MoE, built first if missing: "real" (SmolLM2-135M-Instruct made a
    9-expert Mixtral by Branch-Train-MiX; built into the cache on first use, about 15-25 minutes with 2
    threads, an hour on a CPU without native bf16) or "tiny" (a 4-layer Qwen3-MoE trained from scratch, shipped in the package). Load it
    with ``transformers.AutoModelForCausalLM.from_pretrained(path)``; see ``dynamoq.reference``."""
    from .reference import reference as _reference

    return _reference(name, seed=seed, rebuild=rebuild, progress=progress, threads=threads)
