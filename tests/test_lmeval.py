"""dynamoq.lmeval: local multiple-choice tasks from the corpora, and a dynamoq-quantized model
evaluated through lm-eval's Hugging Face model class (HFLM), with no hub."""
import json

import pytest
import torch
import torch.nn.functional as F

import dynamoq
import tiny_checkpoints
from conftest import build
from dynamoq import lmeval


def test_write_tasks_local_deterministic_and_lm_eval_configs(tmp_path):
    names = lmeval.write_tasks(tmp_path / "a", ["drama", "python"], n_items=5)
    assert names == ["dynamoq_drama", "dynamoq_python", "dynamoq_domains"] == sorted(names, key=names.index)
    assert lmeval.tasks_in(tmp_path / "a") == sorted(names)
    lmeval.write_tasks(tmp_path / "b", ["drama", "python"], n_items=5)
    for n in names:
        rows = [json.loads(line) for line in (tmp_path / "a" / f"{n}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and rows == [json.loads(line) for line in
                                           (tmp_path / "b" / f"{n}.jsonl").read_text().splitlines()]
        for r in rows:
            assert len(r["choices"]) == (4 if n != "dynamoq_domains" else 2) and 0 <= r["answer"] < len(r["choices"])
        cfg = json.loads((tmp_path / "a" / f"{n}.yaml").read_text())   # JSON is YAML
        assert cfg["task"] == n and cfg["tag"] == ["dynamoq"] and cfg["output_type"] == "multiple_choice"
        assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["test"].endswith(f"{n}.jsonl")
    own = lmeval.write_tasks(tmp_path / "c", docs={"mine": dynamoq.data.load("bible", "test")}, n_items=3)
    assert own == ["dynamoq_mine"]


@pytest.fixture(scope="module")
def quantized():
    model = build("qwen3_moe")
    dynamoq.quantize_(model, dynamoq.DynaMoConfig(expert_bits={0: [8, 4, 3, 2], 1: [2, 3, 4, 8]}, group_size=32))
    return model, tiny_checkpoints.tokenizer(model.config.vocab_size)


def test_quantized_model_through_lm_eval_hflm(quantized, tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = quantized
    lmeval.write_tasks(tmp_path, ["python"], n_items=6, context_chars=150, continuation_chars=40)
    result = lmeval.evaluate(model, tok, tmp_path, log_samples=True, batch_size=16)
    r = result["results"]["dynamoq_python"]
    assert result["n-samples"]["dynamoq_python"]["effective"] == 6
    samples = result["samples"]["dynamoq_python"]
    correct = [s["acc"] for s in samples]
    assert r["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # lm-eval's log-likelihoods are those of the packed low-bit model, computed here directly
    s = samples[0]
    context = s["doc"]["context"]
    with torch.no_grad():
        for choice, (ll, _) in zip(s["doc"]["choices"], s["filtered_resps"]):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + choice, add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            direct = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert float(ll) == pytest.approx(direct, abs=1e-3)


def test_command_line_on_a_saved_checkpoint(quantized, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model, tok = quantized
    tiny_checkpoints.save(model, tmp_path / "ckpt")
    assert lmeval.main([str(tmp_path / "ckpt"), str(tmp_path / "tasks"), "--domains", "drama", "json", "--items", "4",
                        "--tasks", "dynamoq_json", "--limit", "3", "--json", str(tmp_path / "r.json")]) == 0
    assert "dynamoq_json" in capsys.readouterr().out
    assert set(lmeval.tasks_in(tmp_path / "tasks")) == {"dynamoq_drama", "dynamoq_json", "dynamoq_domains"}
    assert json.loads((tmp_path / "r.json").read_text())["dynamoq_json"]["sample_len"] == 3


def test_missing_lm_eval_is_a_clear_error(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"dynamoq\[lmeval\]"):
        lmeval.evaluate(None, None, tmp_path)
