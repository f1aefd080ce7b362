"""tutorials/: each walkthrough runs end to end in its fast mode, in this process (as
`python tutorials/NN_name.py --fast` would, without paying the imports again), on a tiny MoE; the
values it prints are checked from its globals."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

import dynamoq

TUTORIALS = Path(__file__).parents[1] / "tutorials"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, str(TUTORIALS))
    import _tutorial
    return _tutorial.tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def run(name, tiny, out, monkeypatch, *extra):
    monkeypatch.setattr(sys, "argv", [str(TUTORIALS / name), "--fast", "--model", tiny, "--out", str(out), *extra])
    torch.manual_seed(0)
    return runpy.run_path(str(TUTORIALS / name), run_name="__main__")


def test_every_tutorial_is_tested_and_runnable_as_a_script():
    names = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py"))
    assert names == ["01_quantize_reference.py", "02_multi_dataset_analysis.py", "03_adapt_new_domain.py",
                     "04_distributed_calibration.py", "05_save_load_generate.py", "06_lm_eval.py"]
    tested = Path(__file__).read_text()
    for n in names:
        text = (TUTORIALS / n).read_text()
        assert f'"{n}"' in tested, n
        assert text.count("# %%") >= 4 and "# %% [markdown]" in text, n       # percent-format cells
        assert f"python tutorials/{n} --fast" in text, n


def test_01_quantize_reference(tiny, tmp_path, monkeypatch):
    g = run("01_quantize_reference.py", tiny, tmp_path, monkeypatch)
    report, budget = g["report"], g["budget"]
    assert budget == pytest.approx(3 + 24 / 64)                              # uniform 3-bit, g64, as a budget
    assert report["storage_bits"] <= budget + 1e-9 and len(set(sum(report["experts"].values(), []))) > 1
    assert set(g["results"]) == {"full precision", "uniform 3-bit RTN", f"DynaMo {budget:.3f} bits, rtn"}
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert dynamoq.bits_report(loaded)["experts"] == report["experts"]
    assert dynamoq.Analysis.load(tmp_path / "analysis").datasets == ["drama", "python", "german"]


def test_02_multi_dataset_analysis(tiny, tmp_path, monkeypatch):
    g = run("02_multi_dataset_analysis.py", tiny, tmp_path, monkeypatch)
    assert len(g["rho"]) == 3 and all(-1 <= r <= 1 for r in g["rho"].values())
    assert 0 < g["summary"]["all"] <= 1
    assert [Path(p).name for p in g["pngs"]] == ["significance.png", "routing.png", "dynamics.png", "bits.png"]
    for p in g["pngs"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000


def test_03_adapt_new_domain(tiny, tmp_path, monkeypatch):
    g = run("03_adapt_new_domain.py", tiny, tmp_path, monkeypatch)
    assert g["changed"] and g["reverted"]
    assert dynamoq.switching.state(g["model"]) == {k: v for k, v in g["report"]["experts"].items()}


def test_04_distributed_calibration(tiny, tmp_path, monkeypatch):
    g = run("04_distributed_calibration.py", tiny, tmp_path, monkeypatch)
    assert [r["rank"] for r in g["ranks"]] == [0, 1] and all(r["world"] == 2 for r in g["ranks"])
    assert all(r["backend"] == "gloo" for r in g["ranks"])
    assert sum(r["windows"] for r in g["ranks"]) == g["windows"] and g["same"]


def test_05_save_load_generate(tiny, tmp_path, monkeypatch):
    g = run("05_save_load_generate.py", tiny, tmp_path, monkeypatch)
    assert g["same"] and g["after"].shape[1] > g["inputs"]["input_ids"].shape[1]
    assert g["qc"]["quant_method"] == "dynamoq" and g["text"].startswith("The king said")


def test_06_lm_eval(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    g = run("06_lm_eval.py", tiny, tmp_path, monkeypatch)
    assert g["tasks"] == ["dynamoq_drama", "dynamoq_python", "dynamoq_domains"]
    for result in g["results"].values():
        for task in g["tasks"]:
            r = result["results"][task]
            assert 0 <= r["acc,none"] <= 1 and result["n-samples"][task]["effective"] == 6


def test_tutorials_take_the_reference_model_or_a_tiny_stand_in(tmp_path, monkeypatch):
    """--model if given; else dynamoq.models.reference("tiny") with --fast, "real" without; where
    dynamoq has no reference(), --fast builds a tiny random checkpoint beside the output folder."""
    sys.path.insert(0, str(TUTORIALS))
    import _tutorial
    calls = []
    monkeypatch.setattr(dynamoq.models, "reference", lambda name: calls.append(name) or f"/ref/{name}", raising=False)

    def path(*argv):
        monkeypatch.setattr(sys, "argv", ["x", *argv, "--out", str(tmp_path / "01")])
        return _tutorial.model_path(_tutorial.options("doc", "01"))

    assert (path("--fast"), path(), path("--fast", "--model", "/m")) == ("/ref/tiny", "/ref/real", "/m")
    assert calls == ["tiny", "real"]
    monkeypatch.delattr(dynamoq.models, "reference")
    assert path("--fast") == str(tmp_path / "_tiny") and (tmp_path / "_tiny" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="--model"):
        path()
