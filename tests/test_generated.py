"""The model's own text as calibration data (dynamoq/generated.py)."""
import pytest
import torch
from conftest import build

import dynamoq
from dynamoq.analysis import Analysis, AnalysisError, analyze
from dynamoq.generated import kmeans, routing_profiles, self_generate


def test_the_model_writes_seeded_sequences_of_its_vocabulary():
    m = build("qwen3_moe")
    a = self_generate(m, 100, seq_len=32, progress=False)
    assert a.shape == (4, 32) and a.dtype == torch.long                      # ceil(100 / 32) sequences
    assert int(a.min()) >= 0 and int(a.max()) < m.config.vocab_size
    assert torch.equal(a, self_generate(m, 100, seq_len=32, progress=False))   # same seed, same text
    assert not torch.equal(a, self_generate(m, 100, seq_len=32, seed=1, progress=False))
    assert len({tuple(r.tolist()) for r in a}) == 4                           # sampled, not one greedy path
    assert int(self_generate(m, 256, seq_len=64, vocab=10, progress=False).max()) < 10   # a smaller tokenizer
    with pytest.raises(ValueError, match="tokens > 0"):
        self_generate(m, 0, progress=False)


def test_the_text_follows_the_model():
    """Each token after the first is drawn from the model's next-token distribution through the cache:
    near temperature 0 sampling is greedy, so every token is the argmax of a forward over the whole prefix."""
    m = build("qwen3_moe")
    a = self_generate(m, 24, seq_len=12, temperature=1e-4, progress=False)
    with torch.no_grad():
        logits = m(input_ids=a, use_cache=False).logits                          # [2, 12, V]
    assert torch.equal(a[:, 1:], logits[:, :-1].argmax(-1))


def test_kmeans_finds_separated_groups_and_numbers_them_from_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5, 3, generator=g) * 0.01 + c for c in (0.0, 5.0, -5.0)])
    label = kmeans(x, 3)
    assert sorted(label.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert all(len(set(label[i:i + 5].tolist())) == 1 for i in (0, 5, 10))    # each blob one cluster
    assert kmeans(x[:2], 8).tolist() in ([0, 1], [1, 0])                      # k clipped to the rows


def test_routing_profiles_are_each_layers_shares():
    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    p = routing_profiles(m, w)
    blocks = dynamoq.moe_blocks(m)
    e = blocks[0].num_experts
    assert p.shape == (3, len(blocks) * e)
    assert torch.allclose(p.view(3, len(blocks), e).sum(-1), torch.ones(3, len(blocks)))
    one = analyze(m, {"x": w[1:2]}, sensitivity_tokens=0, progress=False)      # the analysis' own count
    assert torch.allclose(p[1, :e].double(), one.usage()[blocks[0].layer], atol=1e-6)


def test_analyze_adds_pseudo_domains_weighing_one_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(dynamoq.generated, "SEQ_LEN", 32)
    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    a = analyze(m, {"x": w}, generated_tokens=256, sensitivity_tokens=64, progress=False)
    gen = [d for d in a.datasets if d.startswith("generated-")]
    assert a.datasets[0] == "x" and 2 <= len(gen) <= 4                        # 8 sequences of 32 tokens
    assert sum(a.windows[d].shape[0] for d in gen) == 8
    weights = a.meta["dataset_weights"]
    assert set(weights) == set(gen) and sum(weights.values()) == pytest.approx(1.0)
    assert all(a.stats[d][a.layers[0]].gx2 is not None for d in gen)         # every group has a loss sensitivity
    # the synthesis weighs the groups by the analysis' weights unless the caller says otherwise
    explicit = a.synthesized({"x": 1.0, **weights}, loss=True)
    alike = a.synthesized({d: 1.0 for d in a.datasets}, loss=True)
    own = a.synthesized(loss=True)
    assert all(torch.allclose(own[k], explicit[k]) for k in a.layers)
    assert any(not torch.allclose(own[k], alike[k]) for k in a.layers)
    a.save(tmp_path / "a")
    b = Analysis.load(tmp_path / "a")
    assert b.meta["dataset_weights"] == weights
    assert all(torch.allclose(b.synthesized(loss=True)[k], own[k]) for k in a.layers)


def test_generated_tokens_reach_the_analysis_through_the_config(monkeypatch):
    import dynamoq.analysis as an
    seen, real = [], an.analyze
    monkeypatch.setattr(an, "analyze", lambda *a, **k: seen.append(k["generated_tokens"]) or real(*a, **k))
    monkeypatch.setattr(dynamoq.generated, "SEQ_LEN", 32)
    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    dynamoq.quantize_(m, dynamoq.DynaMoConfig(datasets={"x": w}, generated_tokens=128, target_bits=4.0,
                                              group_size=16, cache_fraction=0.0))
    assert seen == [128]
    assert dynamoq.bits_report(m)["storage_bits"] <= 4.0 + 1e-9


def test_bad_input_gets_clear_errors():
    m = build("qwen3_moe")
    w = torch.randint(0, m.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AnalysisError, match="generated_tokens=-1"):
        analyze(m, {"x": w}, generated_tokens=-1, progress=False)
    with pytest.raises(AnalysisError, match="kept for the model's own text"):
        analyze(m, {"generated-1": w}, generated_tokens=256, progress=False)
