"""Models to work on without a hub: a small built-in MoE made from a config."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

BUILTIN = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=256, intermediate_size=512,
               moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


def builtin(seed: int = 0):
    """A small Qwen3-MoE (4 layers, 8 experts, top-2) with seeded random weights: a stand-in for
    quick runs of the whole pipeline; quality numbers need a trained model."""
    kw = dict(BUILTIN)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
