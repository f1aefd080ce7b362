"""recipes/families: each family's recipe, run as a user would run it on the real checkpoint, on a tiny
random model of that family saved with a tokenizer; the checkpoint it writes loads with
from_pretrained and is quantized as the recipe recommends."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dynamoq
import tiny_checkpoints
from families import tiny_config
from dynamoq.tensors import DynaMoExperts, _PackedWeight

FAMILIES = Path(__file__).parents[1] / "recipes" / "families"
sys.path.insert(0, str(FAMILIES))
RECIPES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
           "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}     # recipe file -> model type of its tiny model
TINY = ["--group-size", "32", "--calib-tokens", "256", "--seq-len", "64", "--data", "drama", "python"]


def recipe(name):
    return importlib.import_module(name)


def test_one_recipe_per_family_sharing_one_module():
    files = sorted(p.stem for p in FAMILIES.glob("*.py") if not p.stem.startswith("_"))
    assert files == sorted(RECIPES)
    for name in files:
        mod = recipe(name)
        r = mod.RECIPE
        assert RECIPES[name] in r.model_types and r.checkpoints and mod.__doc__ and "why" in mod.__doc__
        assert len((FAMILIES / f"{name}.py").read_text().splitlines()) < 60   # settings and their reasons only
        assert r.quantizer == "gptq" and 2.5 <= r.target_bits <= 4.0
    assert recipe("gpt_oss").RECIPE.group_size == 64          # 2880 = 64 x 45; 128 does not divide it
    assert recipe("deepseek_v3").RECIPE.shared_bits == 8 and recipe("deepseek_v3").RECIPE.dense_bits is None
    assert recipe("qwen2_moe").RECIPE.shared_bits == 8
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert recipe(name).RECIPE.group_size == 128


def _packed(model):
    return {n: p for n, p in model.named_parameters() if isinstance(p, _PackedWeight)}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_on_a_tiny_model_of_its_family(name, tmp_path, capsys):
    mod = recipe(name)
    src = tiny_checkpoints.save_family(RECIPES[name], tmp_path / "model")
    out = tmp_path / "quantized"
    # GPTQ where it is cheap on two cores; the structure checked below does not depend on the quantizer
    fast = [] if name == "deepseek_v3" else ["--quantizer", "rtn"]
    res = mod.main([str(src), "--out", str(out), "--threads", "2", *TINY, *fast])
    printed = capsys.readouterr().out
    r, report = mod.RECIPE, res["report"]
    assert f"{r.family} recipe" in printed and "storage bits per expert weight" in printed
    assert res["settings"]["target_bits"] == r.target_bits and res["settings"]["group_size"] == 32
    assert res["config"].quantizer == (r.quantizer if not fast else "rtn")
    # the budget holds, counting scales and zeros; every MoE layer has its experts' bits
    assert report["storage_bits"] <= r.target_bits + 1e-9
    assert report["storage_bits"] > r.target_bits - 0.5
    blocks = dynamoq.moe_blocks(res["model"])
    assert set(report["experts"]) == {b.layer for b in blocks}
    assert all(len(report["experts"][b.layer]) == b.num_experts for b in blocks)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    again = dynamoq.bits_report(loaded)
    assert again["experts"] == report["experts"] and again["bytes"] == report["bytes"]
    assert again["other"] == report["other"] and again["cache_bytes"] == report["cache_bytes"] > 0
    packed = _packed(loaded)
    assert packed and all(p.group_size == 32 for p in packed.values())
    x = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, res["model"](x).logits)
    assert dynamoq.Analysis.load(out / "analysis").datasets == ["drama", "python"]
    assert (out / "tokenizer.json").is_file()

    # family specifics, as the recipe's docstring says
    shared = {n: p for n, p in packed.items() if ".shared_expert" in n}
    if name == "qwen2_moe":
        assert shared and all(p.expert_bits[0] == 8 for p in shared.values())
        assert not isinstance(loaded.model.layers[0].mlp.shared_expert_gate.weight, _PackedWeight)
    elif name == "deepseek_v3":
        assert shared and all(p.expert_bits[0] == 8 for p in shared.values())
        dense = loaded.model.layers[0].mlp                              # first_k_dense_replace = 1
        assert not any(isinstance(p, _PackedWeight) for p in dense.parameters())
        assert list(report["experts"]) == [1]
    else:
        assert not shared
    if name == "gpt_oss":
        experts = loaded.model.layers[0].mlp.experts
        assert isinstance(experts.gate_up_proj, DynaMoExperts) and experts.gate_up_proj.transposed
        assert not isinstance(experts.gate_up_proj_bias, _PackedWeight)
        assert not isinstance(experts.down_proj_bias, _PackedWeight)


def test_recipe_falls_back_to_a_group_size_that_fits(tmp_path, capsys):
    """GPT-OSS's 64 does not divide the tiny model's 32: the recipe says so and uses 32; --fast is RTN."""
    mod = recipe("gpt_oss")
    src = tiny_checkpoints.save_family("gpt_oss", tmp_path / "model")
    res = mod.main([str(src), "--out", str(tmp_path / "q"), "--fast", "--calib-tokens", "128", "--seq-len", "64",
                    "--data", "json", "--eval-tokens", "128"])
    assert res["settings"]["group_size"] == 32 and "using 32" in capsys.readouterr().out
    assert res["config"].quantizer == "rtn" and res["settings"]["calib_tokens"] == 128
    assert set(res["ppl"]["fp"]) == set(res["ppl"]["quantized"]) == {"json"}


def test_user_text_files_and_checkpoints_stored_quantized(tmp_path):
    mod = recipe("mixtral")
    (tmp_path / "mine.txt").write_text("some text of my own " * 50)
    assert list(sys.modules["_recipe"].datasets(["python", str(tmp_path / "mine.txt")])) == ["python", "mine"]
    with pytest.raises(SystemExit, match="neither a built-in domain"):
        sys.modules["_recipe"].datasets(["no_such_domain"])
    # MXFP4 (GPT-OSS) and FP8 (DeepSeek-V3) checkpoints are dequantized on load; dynamoq's are refused
    from transformers import FineGrainedFP8Config, Mxfp4Config
    cfg = json.loads(tiny_config("mixtral").to_json_string())
    for method, kind in (("mxfp4", Mxfp4Config), ("fp8", FineGrainedFP8Config), ("dynamoq", None)):
        d = tmp_path / method
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": method}}))
        if kind is None:
            with pytest.raises(SystemExit, match="already quantized"):
                mod.main([str(d), "--out", str(tmp_path / "x")])
        else:
            q = sys.modules["_recipe"].dequantize_on_load(d)["quantization_config"]
            assert isinstance(q, kind) and q.dequantize
