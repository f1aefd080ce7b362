import copy

import pytest
import torch
import torchao
from conftest import build, tokens

import dynamoq
from dynamoq import DynaMoConfig, DynaMoExperts, QuantizationError, SwitchableLinear, UnsupportedModelError
from dynamoq.packing import dequantize, quantize_rtn


def _flat(model):
    """Every tensor of the model, quantized ones split into their packed parts."""
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DynaMoExperts | SwitchableLinear):
            names, attrs = t.__tensor_flatten__()
            out.update({f"{name}.{n}": getattr(t, n) for n in names})
            out[f"{name}.meta"] = attrs
        else:
            out[name] = t
    return out


def _plain_params(model):
    return {n: p for n, p in model.named_parameters()}


def test_dynamoq_quantize_equals_torchao_quantize_with_moe_filter():
    a = build("qwen2_moe")
    b = copy.deepcopy(a)
    cfg = DynaMoConfig(expert_bits={0: [2, 3, 4, 8], 1: [6, 4, 4, 2]}, group_size=32)
    dynamoq.quantize_(a, cfg)
    torchao.quantization.quantize_(b, cfg, filter_fn=dynamoq.moe_filter)
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert (fa[k] == fb[k]) if k.endswith(".meta") else torch.equal(fa[k], fb[k]), k
    x = tokens(a)
    assert torch.equal(a(x).logits, b(x).logits)


def test_clip_quantizer_packs_searched_grids_through_both_entry_points():
    """quantizer="clip" is data-free: dynamoq.quantize_ and torchao's quantize_ with the filter give the same
    model, whose experts and attention hold quantize_searched's codes and grids, not round-to-nearest's."""
    from dynamoq.packing import quantize_searched
    a = build("qwen3_moe")
    ref = a.model.layers[0].mlp.experts.down_proj.detach().clone()          # [E, H, I]
    att = a.model.layers[0].self_attn.q_proj.weight.detach().clone()
    b = copy.deepcopy(a)
    cfg = DynaMoConfig(expert_bits={0: [2, 3, 4, 8], 1: [6, 4, 4, 2]}, attention_bits=3, group_size=32,
                       quantizer="clip")
    dynamoq.quantize_(a, cfg)
    torchao.quantization.quantize_(b, cfg, filter_fn=dynamoq.moe_filter)
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa if not k.endswith(".meta"))
    down = a.model.layers[0].mlp.experts.down_proj
    nk = ref.transpose(-1, -2) if down.transposed else ref                  # [E, N, K]
    for e, bits in enumerate([2, 3, 4, 8]):
        codes, scale, zero = quantize_searched(nk[e], bits, 32)
        assert torch.equal(down.codes()[e], codes)
        assert torch.equal(down.dequantize_nk(torch.float32)[e], dequantize(codes, scale, zero))
    assert not torch.equal(down.dequantize_nk(torch.float32)[0], dequantize(*quantize_rtn(nk[0], 2, 32)))
    q = a.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q.dequantize(torch.float32), dequantize(*quantize_searched(att, 3, 32)))


def test_per_expert_bits_are_applied_and_reported():
    m = build("mixtral")
    bits = {0: [2, 3, 4, 8], 1: [6, 4, 4, 2]}
    dynamoq.quantize_(m, DynaMoConfig(expert_bits=bits, group_size=32))
    rep = dynamoq.bits_report(m)
    assert rep["experts"] == bits
    for layer, bs in bits.items():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(m.model.layers[layer].mlp.experts, name)
            assert isinstance(w, DynaMoExperts) and w.expert_bits == tuple(bs)
            assert all(int(w.codes()[e].max()) < 2 ** b for e, b in enumerate(bs))
    # storage counted from the tensors: codes + fp16 scale + uint8 zero per group of 32
    n_weights = sum(getattr(m.model.layers[i].mlp.experts, p).numel() for i in bits for p in ("gate_up_proj", "down_proj"))
    per_expert = n_weights // 8
    expected = sum(per_expert * (b + 24 / 32) for bs in bits.values() for b in bs) / 8
    assert rep["bytes"] == expected
    assert rep["storage_bits"] == pytest.approx(sum(b for bs in bits.values() for b in bs) / 8 + 24 / 32)


def test_routers_embeddings_head_and_norms_stay_as_they_are():
    m = build("qwen2_moe")
    before = _plain_params(m)
    dynamoq.quantize_(m, DynaMoConfig(bits=4, group_size=32))
    after = _plain_params(m)
    changed = {n for n in before if after[n] is not before[n]}
    assert changed and all(".experts." in n or ".shared_expert." in n for n in changed), changed
    assert after["model.layers.0.mlp.shared_expert_gate.weight"] is before["model.layers.0.mlp.shared_expert_gate.weight"]
    assert isinstance(after["model.layers.0.mlp.shared_expert.up_proj.weight"], SwitchableLinear)
    assert after["model.layers.0.mlp.shared_expert.up_proj.weight"].bits == 8


def test_shared_experts_dense_layers_and_attention_take_their_own_widths():
    m = build("deepseek_v3")
    dynamoq.quantize_(m, DynaMoConfig(bits=3, shared_bits=6, dense_bits=4, attention_bits=8, group_size=32))
    assert m.model.layers[0].mlp.gate_proj.weight.bits == 4               # dense first layer
    attn = {n: p for n, p in m.model.layers[1].self_attn.named_parameters() if n.endswith("proj.weight")}
    assert len(attn) >= 4 and all(isinstance(p, SwitchableLinear) and p.bits == 8 for p in attn.values()), attn
    assert "kv_b_proj.weight" in attn                                      # MLA's low-rank projections too
    assert m.model.layers[1].mlp.shared_experts.down_proj.weight.bits == 6
    assert m.model.layers[1].mlp.experts.down_proj.expert_bits == (3,) * 4
    assert not isinstance(m.model.layers[1].mlp.gate.weight, SwitchableLinear | DynaMoExperts)  # router
    assert torch.isfinite(m(tokens(m)).logits).all()


@pytest.mark.parametrize("model_type", ["gemma4_text", "nemotron_h", "kimi_linear", "mixtral"])
def test_attention_bits_pack_every_attention_linear_and_nothing_else(model_type):
    """Attention inside the MoE block's module (Gemma-4), a hybrid's attention "mixer" (Nemotron-H), a
    linear attention with short convolutions (Kimi-Linear: its 3D conv weights stay as they are)."""
    m = build(model_type)
    linears = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)
               and any(dynamoq.adapters.is_attention(a, f) and n.startswith(f + ".") for f, a in m.named_modules())}
    before = _plain_params(m)
    dynamoq.quantize_(m, DynaMoConfig(bits=4, attention_bits=8, group_size=16 if model_type == "nemotron_h" else 32))
    after = _plain_params(m)
    packed = {n for n, p in after.items() if isinstance(p, SwitchableLinear) and n in linears}
    assert linears and packed == linears, linears - packed
    assert all(after[n].bits == 8 for n in packed)
    others = {n for n in before if n not in linears and ".experts." not in n and ".shared_expert" not in n}
    assert all(after[n] is before[n] for n in others), [n for n in others if after[n] is not before[n]]
    with torch.no_grad():
        assert torch.isfinite(m(tokens(m)).logits).all()


def test_quantizing_twice_is_refused_and_changes_nothing():
    m = build("olmoe")
    dynamoq.quantize_(m, DynaMoConfig(bits=4, group_size=32))
    before = _flat(m)
    with pytest.raises(QuantizationError, match="already quantized"):
        dynamoq.quantize_(m, DynaMoConfig(bits=2, group_size=32))
    after = _flat(m)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(".meta"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bit-width 5 is not supported"),
    (dict(expert_bits={0: [4, 4, 4, 7]}), "bit-width 7 is not supported"),
])
def test_unknown_bit_width_is_a_clear_error(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        DynaMoConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=4, group_size=48), "input dimension 64 is not divisible by group_size=48"),
    (dict(expert_bits={0: [4, 4, 4]}, bits=4, group_size=32), r"expert_bits\[0\] lists 3 bit-widths but layer 0 has 4"),
    (dict(expert_bits={7: [4, 4, 4, 4]}, group_size=32), r"layers \[7\] that have no MoE block"),
    (dict(expert_bits={0: [4, 4, 4, 4]}, group_size=32), "no entry for MoE layer 1"),
])
def test_bad_configs_fail_before_anything_changes(kwargs, match):
    m = build("qwen3_moe")
    before = _plain_params(m)
    with pytest.raises(QuantizationError, match=match):
        dynamoq.quantize_(m, DynaMoConfig(**kwargs))
    after = _plain_params(m)
    assert all(after[n] is before[n] for n in before)


def test_a_failure_midway_puts_every_weight_back(monkeypatch):
    m = build("mixtral")
    before = _plain_params(m)
    impl = m.config._experts_implementation
    x = tokens(m)
    ref = m(x).logits
    calls = []
    real = DynaMoExperts.from_float.__func__

    def flaky(cls, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(cls, *a, **k)

    monkeypatch.setattr(DynaMoExperts, "from_float", classmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated"):
        dynamoq.quantize_(m, DynaMoConfig(bits=4, group_size=32))
    assert len(calls) == 3
    after = _plain_params(m)
    assert all(after[n] is before[n] for n in before)
    assert m.config._experts_implementation == impl != "dynamoq"     # the handler had set it on 2 blocks
    assert torch.equal(m(x).logits, ref)


def test_a_model_without_moe_names_its_class():
    from transformers import AutoModelForCausalLM, LlamaConfig
    m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM has no MoE block"):
        dynamoq.quantize_(m, DynaMoConfig(bits=4, group_size=32))


def test_torchao_quantize_without_the_filter_is_explained():
    m = build("mixtral")
    # torchao's default filter passes only nn.Linear: the handler says what to pass instead
    with pytest.raises(QuantizationError, match="filter_fn=dynamoq.moe_filter"):
        torchao.quantization.quantize_(m, DynaMoConfig(bits=4, group_size=32))


class _ListExperts(torch.nn.Module):
    """An older-style MoE: a ModuleList of per-expert MLPs made of nn.Linear."""

    def __init__(self, n=4, h=64, i=32):
        super().__init__()
        self.gate = torch.nn.Linear(h, n, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(h, i), torch.nn.ReLU(),
                                                               torch.nn.Linear(i, h)) for _ in range(n))

    def forward(self, x):
        top = self.gate(x).softmax(-1).topk(2)
        out = torch.zeros_like(x)
        for k in range(2):
            for e, expert in enumerate(self.experts):
                mask = (top.indices[..., k] == e).unsqueeze(-1)
                out = out + mask * top.values[..., k:k + 1] * expert(x)
        return out


def test_experts_as_a_list_of_linears_are_quantized_per_expert():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"mlp": _ListExperts()}) for _ in range(2))
    x = torch.randn(5, 64)
    ref = model.layers[0]["mlp"](x)
    dynamoq.quantize_(model, DynaMoConfig(expert_bits={0: [8, 8, 8, 8], 1: [2, 3, 4, 6]}, group_size=32))
    assert dynamoq.bits_report(model)["experts"] == {0: [8, 8, 8, 8], 1: [2, 3, 4, 6]}
    assert model.layers[1]["mlp"].experts[3][2].weight.bits == 6
    assert not isinstance(model.layers[0]["mlp"].gate.weight, SwitchableLinear)   # the router stays
    assert ((model.layers[0]["mlp"](x) - ref).norm() / ref.norm()) < 0.01
