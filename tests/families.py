"""Tiny configs for every MoE family whose causal-LM class holds an experts module (transformers 5.24).

`tiny_config(mt)` = AutoConfig.for_model(mt, **BASE | TINY[mt]) (composite configs: BASE goes inside text_config).
hidden 64, 4 heads, 4 experts, top-2, expert intermediate 32 or 64: every Linear / expert input dim is a multiple of 32.
Families with dense prefix layers get >=1 dense + >=1 MoE layer.  Survey notes: FAMILIES_SURVEY.md.
"""

from transformers import AutoConfig, PretrainedConfig

# Shared by every family; keys a config does not know just become harmless extra attributes.
BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts_per_tok=2, moe_intermediate_size=32, pad_token_id=0,
)
# Common spellings, merged into the per-family entries below.
QW = dict(num_experts=4)                                     # qwen / olmoe style expert count
LE = dict(num_local_experts=4)                               # mixtral style expert count
DS = dict(n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1)  # deepseek style
MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
IDX = dict(index_n_heads=2, index_head_dim=16, index_topk=4)  # DSA-style sparse-attention indexer
SH = dict(shared_expert_intermediate_size=32)
LIN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)  # gated-delta-net
INK = dict(n_routed_experts=4, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
           sliding_window_size=8, unpadded_vocab_size=128, n_layers_per_attn_res_block=1)

TINY = {
    # CORE
    "mixtral": LE,
    "qwen2_moe": {**QW, **SH},
    "qwen3_moe": QW,
    "olmoe": QW,
    "deepseek_v3": {**DS, **MLA, "first_k_dense_replace": 1},
    # others (alphabetical)
    "afmoe": {**QW, "num_shared_experts": 1, "num_dense_layers": 1},
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
    "axk1": {**DS, **MLA},
    "axk2": {**DS, **MLA, **IDX, "gated_norm_rank": 32},
    "bailing_hybrid": {**DS, **MLA, "num_local_experts": 4, "first_k_dense_replace": 1, "layer_group_size": 2},
    "beam": {**QW, "n_group": 1, "topk_group": 1, "mlp_layer_types": ["dense", "sparse"]},
    "cohere2_moe": {**QW, "num_shared_experts": 1},
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    "deepseek_v2": {**DS, **MLA, "first_k_dense_replace": 1},
    "deepseek_v32": {**DS, **MLA, **IDX, "first_k_dense_replace": 1},
    "deepseek_v4": {**DS, **IDX, "num_key_value_heads": 1, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32,
                    "sliding_window": 4, "hc_mult": 2, "mlp_layer_types": ["hash_moe", "moe"]},
    "dots1": {**DS, "first_k_dense_replace": 1},
    "dots3_note_text": {**DS, **MLA, **IDX, "shared_experts_intermediate_size": 32},
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
    "exaone_moe": {**QW, "num_shared_experts": 1, "first_k_dense_replace": 1},
    "flex_olmo": QW,
    "flint": {**QW, **SH, "mlp_only_layers": [0]},
    "gemma4_text": {**QW, "enable_moe_block": True, "top_k_experts": 2, "global_head_dim": 16,
                    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 32},
    "glm4_moe": {**DS, "first_k_dense_replace": 1},
    "sarvam_moe": {**DS, "first_k_dense_replace": 1},                # built by Glm4MoeForCausalLM
    "sarvam_mla": {**DS, **MLA, "first_k_dense_replace": 1},         # built by DeepseekV3ForCausalLM
    "glm4_moe_lite": {**DS, **MLA, "first_k_dense_replace": 1},
    "glm_moe_dsa": {**DS, **MLA, **IDX, "first_k_dense_replace": 1},
    "gpt_oss": {**LE, "intermediate_size": 32},
    "granitemoe": {**LE, "intermediate_size": 32},
    "granitemoe_swa": {**LE, "intermediate_size": 32, "shared_intermediate_size": 32},
    "granitemoehybrid": {**LE, "intermediate_size": 32, "shared_intermediate_size": 32, "layer_types": ["linear_attention", "full_attention"],
                         "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_d_head": 32, "mamba_chunk_size": 8},
    "granitemoeshared": {**LE, "intermediate_size": 32, "shared_intermediate_size": 32},
    "hunyuan_v1_moe": {**QW, "moe_topk": 2, "intermediate_size": 32},
    "hy_v3": {**QW, "num_shared_experts": 1},
    "hy_v4": {**DS, **MLA, **IDX, "hc_mult": 2},
    "inkling_text": {**INK, "n_shared_experts": 1},
    "inkling2_text": INK,
    "inkling2_loop_text": {**INK, "num_hidden_layers": 3, "loop_layer_index_start": 1, "loop_layer_index_end": 2,
                           "loop_num_passes": 2, "loop_gate_rank": 32},
    "jamba": {**QW, "use_mamba_kernels": False, "mamba_dt_rank": 32, "attn_layer_period": 2, "attn_layer_offset": 0},  # L0 attn+dense, L1 mamba+MoE
    "jetmoe": {**LE, "intermediate_size": 32, "kv_channels": 16},
    "kimi_linear": {**DS, **MLA, "num_local_experts": 4, "linear_head_dim": 32, "linear_num_heads": 2,
                    "layer_types": ["linear_attention", "full_attention"]},
    "kolibri1": {**QW, **SH},
    "laguna": {**QW, **SH},
    "lara_mini": {**QW, **SH, **LIN},
    "lfm2_moe": {**QW, "num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "llama4_text": {**LE, "intermediate_size": 32, "intermediate_size_mlp": 64, "interleave_moe_layer_step": 2},
    # num_hidden_layers=2 -> num_layers=1 longcat layer (2 attn + 2 dense MLP sub-blocks + 1 MoE, 2 zero/identity experts)
    "longcat_flash": dict(ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, moe_topk=2, **MLA),
    "mellum": QW,
    "mimo_v2_flash": {**DS, "v_head_dim": 16},
    "minimax": {**LE, "intermediate_size": 32, "block_size": 4},
    "minimax_m2": {**LE, "intermediate_size": 32},
    "minimax_m3_vl_text": {**LE, **IDX, "intermediate_size": 32, "dense_intermediate_size": 64, "shared_intermediate_size": 32,
                           "rotary_dim": 8, "index_block_size": 4},
    # nemotron_h "layers" are single-mixer blocks: mamba, attention, MoE, dense MLP (= the family's default pattern)
    "nemotron_h": {**DS, "layers_block_type": ["linear_attention", "full_attention", "moe", "mlp"], "moe_shared_expert_intermediate_size": 32,
                   "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1, "chunk_size": 8, "use_mamba_kernels": False},
    "phimoe": LE,
    "qwen3_5_moe_text": {**QW, **SH, **LIN, "layer_types": ["linear_attention", "full_attention"]},
    "qwen3_next": {**QW, **SH, **LIN, "layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp_text": {**QW, **SH, **LIN, "layer_types": ["linear_attention", "full_attention"], "hc_lowrank": 32,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 4},
    "solar_open": DS,
    "zaya": {**QW, "num_experts_per_tok": 1, "router_hidden_size": 32},  # config rejects top-k != 1
}

# Composite (multimodal) configs whose AutoModelForCausalLM target holds the same text MoE as `<type>_text`.
# (dots3_note only validates that its vision/audio adapters output text hidden_size; gemma4 gets no vision tower.)
_ADAPTER = dict(adapter_out_dim=64)
for _mt, _extra in {"dots3_note": dict(vision_config=_ADAPTER, audio_config=_ADAPTER), "gemma4": {}, "llama4": {},
                    "qwen3_5_moe": {}, "qwen4_exp": {}}.items():
    TINY[_mt] = dict(text_config={**BASE, **TINY[f"{_mt}_text"]}, **_extra)

# Every MoE causal-LM family in transformers 5.24 builds and runs on CPU; nothing to list.
UNBUILDABLE: dict[str, str] = {}

CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def tiny_config(model_type: str) -> PretrainedConfig:
    kwargs = TINY[model_type]
    return AutoConfig.for_model(model_type, **(kwargs if "text_config" in kwargs else {**BASE, **kwargs}))
