"""The `dynamoq` experts implementation: transformers calls it for every fused experts module when
config._experts_implementation == "dynamoq". Packed weights go through DynaMoExperts.expert_linear
(gather + unpack + dequantize + product, fused by Inductor); plain weights through batched_mm."""
from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward

from .tensors import DynaMoExperts

NAME = "dynamoq"


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
