import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

import dynamoq
from dynamoq.eval import (continuation_task, domain_task, kl_divergence, multiple_choice, paired, perplexity,
                          top1_accuracy)

VOCAB = 64


def tiny_model(max_positions=128, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def ids(n, t, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """Word-level tokenizer over "w0".."w61" (ids 2..63), BOS "<s>" = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="[UNK]")


def one_token_model(token_id):
    """A model that puts almost all probability on token_id at every position."""
    m = tiny_model()
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 30.0
    m.lm_head = head
    return m


def docs(n, words, seed, prefix="w"):
    rng = random.Random(seed)
    return [" ".join(f"{prefix}{rng.choice(words)}" for _ in range(rng.randint(60, 120))) for _ in range(n)]


def test_perplexity_is_exp_of_hand_computed_cross_entropy():
    m = tiny_model()
    x = ids(6, 16)
    r = perplexity(m, x, seq_len=16, batch_size=4, progress=False)       # batches of 4 and 2 windows
    nll, n, hits = 0.0, 0, 0
    with torch.no_grad():
        for row in x:
            logits = m(row[None]).logits[0, :-1]
            nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
            hits += int((logits.argmax(-1) == row[1:]).sum())
            n += row.numel() - 1
    assert r.tokens == n == 6 * 15
    assert r.nll == pytest.approx(nll / n, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r.top1 == hits / n == top1_accuracy(m, x, seq_len=16, progress=False)
    assert len(r.windows) == 6 and r.windows.count.tolist() == [15] * 6
    assert r.seconds > 0 and r.tokens_per_second > 0
    assert str(r) == f"ppl {r.ppl:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] over {n} tokens"
    # batching does not change the numbers; a model in training mode is evaluated in eval mode and restored
    m.train()
    r1 = perplexity(m, x, seq_len=16, batch_size=1, progress=False)
    assert m.training
    assert r1.ppl == pytest.approx(r.ppl, rel=1e-5)


def test_windows_are_cut_like_data_token_windows_and_interval_is_reproducible():
    from dynamoq.data import token_windows

    m = tiny_model()
    x = ids(5, 20)                            # 100 tokens: re-cut into 6 windows of 16, 4 tokens dropped
    r = perplexity(m, x, seq_len=16, progress=False)
    assert r.ppl == pytest.approx(perplexity(m, x.reshape(-1)[:96].view(6, 16), seq_len=16, progress=False).ppl)
    assert r.windows.key.tolist() == perplexity(m, token_windows(x, seq_len=16), seq_len=16,
                                                progress=False).windows.key.tolist()
    x = ids(10, 32)
    r = perplexity(m, x, max_tokens=100, seq_len=32, progress=False)
    assert r.windows.count.tolist() == [31, 31, 31] and r.tokens == 93
    again = perplexity(m, x, max_tokens=100, seq_len=32, progress=False)
    assert (again.ci_low, again.ci_high) == (r.ci_low, r.ci_high)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_tokens():
    m = tiny_model()
    x = ids(256, 16, seed=3)
    small = perplexity(m, x[:8], seq_len=16, batch_size=8, progress=False)
    big = perplexity(m, x, seq_len=16, batch_size=64, progress=False)
    for r in (small, big):
        assert r.ci_low < r.ppl < r.ci_high
    assert (big.ci_high - big.ci_low) < 0.6 * (small.ci_high - small.ci_low)


def test_model_against_itself_and_against_a_perturbed_copy():
    m = tiny_model()
    x = ids(8, 24)
    a = perplexity(m, x, seq_len=24, progress=False)
    same = paired(a, perplexity(m, x, seq_len=24, progress=False))
    assert same.ratio == pytest.approx(1.0, abs=1e-6) and same.nll_diff == pytest.approx(0.0, abs=1e-6)
    assert same.ci_low == pytest.approx(1.0, abs=1e-6) and same.ci_high == pytest.approx(1.0, abs=1e-6)
    assert not same.significant
    k = kl_divergence(m, m, x, seq_len=24, progress=False)
    assert k.kl == pytest.approx(0.0, abs=1e-6) and k.top1_agreement == 1.0 and k.tokens == 8 * 23

    p = copy.deepcopy(m)
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    b = perplexity(p, x, seq_len=24, progress=False)
    d = paired(a, b)
    assert d.ratio == pytest.approx(b.ppl / a.ppl, rel=1e-6)
    assert d.ci_low <= d.ratio <= d.ci_high and d.ci_low < d.ci_high
    assert d.nll_diff_ci_low <= d.nll_diff <= d.nll_diff_ci_high
    assert d.top1_diff == pytest.approx(b.top1 - a.top1)
    kp = kl_divergence(p, m, x, seq_len=24, progress=False)
    assert kp.kl > 0 and 0 < kp.ci_low <= kp.kl <= kp.ci_high
    assert kp.top1_agreement < 1.0
    # KL(reference || model) by hand
    with torch.no_grad():
        lq = F.log_softmax(m(x).logits[:, :-1], -1)
        lp = F.log_softmax(p(x).logits[:, :-1], -1)
    assert kp.kl == pytest.approx((lq.exp() * (lq - lp)).sum(-1).mean().item(), rel=1e-4)


def test_paired_refuses_different_windows():
    m = tiny_model()
    a = perplexity(m, ids(4, 16), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="same windows"):
        paired(a, perplexity(m, ids(4, 16, seed=9), seq_len=16, progress=False))
    with pytest.raises(ValueError, match="same windows"):
        paired(a, perplexity(m, ids(4, 16), seq_len=16, max_tokens=32, progress=False))
    with pytest.raises(ValueError, match="same windows"):
        paired(a, perplexity(m, ids(4, 16), seq_len=8, progress=False))


def test_bad_input_errors():
    m = tiny_model(max_positions=32)
    with pytest.raises(ValueError, match="empty"):
        perplexity(m, [], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(m, ["some text"], seq_len=16, progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(m, ids(2, 64), seq_len=64, progress=False)
    with pytest.raises(ValueError, match="integer"):
        perplexity(m, torch.rand(2, 16), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="token ids must lie"):
        perplexity(m, torch.full((2, 16), VOCAB), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(m, ids(2, 16), seq_len=16, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(m, ids(3, 8), seq_len=1, progress=False)
    with pytest.raises(ValueError, match="too few"):
        perplexity(m, ids(3, 4), seq_len=16, progress=False)
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabular"):
        kl_divergence(m, other, ids(2, 16), seq_len=16, progress=False)
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="tokenizer"):
        multiple_choice(m, None, [("w1", [" w2", " w3"], 0)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        multiple_choice(m, tok, [], progress=False)
    with pytest.raises(ValueError, match="answer_index"):
        multiple_choice(m, tok, [("w1", [" w2", " w3"], 2)], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        multiple_choice(m, tok, [("w1", [" w2"], 0)], progress=False)
    with pytest.raises(ValueError, match="long enough"):
        continuation_task(["w1 w2", "w3 w4"])
    with pytest.raises(ValueError, match="at least 2 domains"):
        domain_task({"a": docs(5, range(10), 0)})


def test_multiple_choice_picks_the_likely_choice_sum_and_length_normalised():
    tok = word_tokenizer()
    m = one_token_model(tok.convert_tokens_to_ids("w5"))
    items = [("w1 w2", [" w7 w8", " w5 w5", " w9"], 1),
             ("w3", [" w5 w5 w5 w5", " w6"], 0),
             ("w4 w4 ", ["w9 w9", "w5"], 1)]                 # trailing context space moves to the choices
    r = multiple_choice(m, tok, items, progress=False)
    assert r.n == 3 and r.accuracy == 1.0 and r.accuracy_norm == 1.0
    assert r.ci_low == r.ci_high == 1.0
    assert r.loglik[1][0] > -1e-3 and r.loglik[1][1] < -25      # four likely tokens vs one unlikely one
    # summed log-likelihood prefers one unlikely token; per byte, many likely tokens and two unlikely ones win
    items = [("w1", [" w9", " w5 w5 w5 w5 w5 w5 w5 w5 w9 w9"], 0)] * 2
    r = multiple_choice(m, tok, items, progress=False)
    assert r.accuracy == 1.0 and r.accuracy_norm == 0.0
    assert str(r).startswith("acc 1.000")


def test_multiple_choice_loglik_equals_unpadded_hand_computation():
    tok = word_tokenizer()
    m = tiny_model()
    item = ("w1 w2 w3", [" w4", " w5 w6 w7", " w8 w9"], 2)
    r = multiple_choice(m, tok, [item], progress=False)
    ctx = [0] + tok.encode("w1 w2 w3", add_special_tokens=False)          # BOS then the context
    with torch.no_grad():
        for choice, got in zip(item[1], r.loglik[0]):
            cont = tok.encode(choice, add_special_tokens=False)
            logp = F.log_softmax(m(torch.tensor([ctx + cont])).logits[0], -1)
            want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)


def test_continuation_task_is_deterministic_and_true():
    ds = docs(30, range(60), seed=0)
    items = continuation_task(ds, n_items=20, n_choices=4, context_chars=120, continuation_chars=40, seed=0)
    assert items == continuation_task(ds, n_items=20, n_choices=4, context_chars=120, continuation_chars=40, seed=0)
    assert items != continuation_task(ds, n_items=20, n_choices=4, context_chars=120, continuation_chars=40, seed=1)
    assert len(items) == 20
    assert len({it.answer_index for it in items}) > 1
    for context, choices, answer in items:
        assert len(choices) == 4 and len(set(choices)) == 4
        src = [d for d in ds if d.startswith(context)]
        assert len(src) == 1 and src[0].startswith(context + choices[answer])
        assert all(c[0] == " " and not c.endswith(" ") for c in choices)
        for k, c in enumerate(choices):
            if k != answer:
                assert any(c in d for d in ds if d is not src[0])
    # the whole pipeline runs on them: a random model is around chance
    tok = word_tokenizer()
    r = multiple_choice(tiny_model(), tok, items, progress=False)
    assert r.n == 20 and 0.0 <= r.ci_low <= r.accuracy <= r.ci_high <= 1.0


def test_continuation_task_on_text_without_whitespace():
    rng = random.Random(0)
    ds = ["".join(chr(0x4E00 + rng.randrange(500)) for _ in range(300)) for _ in range(8)]
    items = continuation_task(ds, n_items=8, n_choices=3, context_chars=100, continuation_chars=30)
    assert len(items) == 8
    for context, choices, answer in items:
        assert len(context) == 100 and all(len(c) == 30 for c in choices)
        assert any(d.startswith(context + choices[answer]) for d in ds)


def test_domain_task_is_deterministic_and_answer_is_from_the_same_domain():
    by = {"low": docs(10, range(0, 20), 1), "mid": docs(10, range(20, 40), 2), "high": docs(10, range(40, 60), 3)}
    items = domain_task(by, n_items=12, context_chars=100, continuation_chars=30, seed=0)
    assert items == domain_task(by, n_items=12, context_chars=100, continuation_chars=30, seed=0)
    assert len(items) == 12
    for context, choices, answer in items:
        assert len(choices) == 3
        home = [name for name, ds in by.items() if any(d.startswith(context) for d in ds)]
        assert len(home) == 1
        for k, c in enumerate(choices):
            owners = {name for name, ds in by.items() if any(c in d for d in ds)}
            assert (owners == {home[0]}) == (k == answer)
        assert not any(d.startswith(context + choices[answer]) for d in by[home[0]])  # another document
    assert {[n for n, ds in by.items() if any(d.startswith(it.context) for d in ds)][0] for it in items} == set(by)
    two = domain_task(by, n_items=4, n_choices=2, context_chars=100, continuation_chars=30, seed=5)
    assert all(len(it.choices) == 2 for it in two)


def test_texts_go_through_data_token_windows():
    data = pytest.importorskip("dynamoq.data")
    if not hasattr(data, "token_windows"):
        pytest.skip("dynamoq.data.token_windows not available yet")
    tok = word_tokenizer()
    texts = docs(6, range(60), seed=4)
    m = tiny_model()
    r = perplexity(m, texts, tokenizer=tok, seq_len=32, max_tokens=256, progress=False)
    windows = data.token_windows(texts, tok, seq_len=32, max_tokens=256)
    assert r.ppl == pytest.approx(perplexity(m, windows, seq_len=32, max_tokens=256, progress=False).ppl)
    assert 0 < r.tokens <= 256


def test_exposed_on_the_package():
    assert dynamoq.eval.perplexity is perplexity
