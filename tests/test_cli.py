"""The `dynamoq` command line, in process (dynamoq.cli.main): every subcommand's --help, a whole
analyze -> quantize -> inspect -> eval -> adapt -> report round on a tiny Qwen3-MoE with a tiny
word-level tokenizer and the committed excerpts, --json outputs, exit codes and one-line errors."""
import json
from pathlib import Path

import pytest

from dynamoq import cli, data
from dynamoq.htmlreport import EVAL_FORMAT, RUN_FILE, RUN_FORMAT

DATA = str(Path(__file__).parent / "data")
SUBCOMMANDS = ("quantize", "analyze", "adapt", "eval", "bench", "inspect", "report")
FAST = ["--corpus-dir", DATA, "--seq-len", "32", "-q"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE saved with a word-level tokenizer of 120 tokens (its vocabulary is 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import build

    d = tmp_path_factory.mktemp("tiny") / "model"
    build("qwen3_moe").save_pretrained(d)
    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator((x for n in ("drama", "python", "german") for x in data.load(n, "calib", root=DATA)),
                          trainers.WordLevelTrainer(vocab_size=120, special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


# ---- --help -------------------------------------------------------------------------------------------
def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_of_each_subcommand(capsys, name):
    code, out, _ = run(capsys, name, "--help")
    assert code == 0
    assert out.startswith(f"usage: dynamoq {name}")
    assert "--json" in out and "--debug" in out


# ---- the whole round ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def analysis_dir(model_dir, work):
    out = work / "analysis"
    code = cli.main(["analyze", str(model_dir), "--data", "drama", "--data", "python", "--data", "german",
                     "--max-tokens", "256", "--out", str(out), "--no-plots", *FAST])
    assert code == 0
    return out


def test_analyze_writes_analysis_plots_and_report(capsys, model_dir, work):
    out = work / "analysis-json"
    res = run_json(capsys, "analyze", model_dir, "--data", "drama", "--data", "french", "--max-tokens", "128",
                   "--out", out, *FAST)
    assert res["datasets"] == ["drama", "french"] and res["layers"] == [0, 1]
    assert set(res["tokens"]) == {"drama", "french"} and all(n == 128 for n in res["tokens"].values())
    assert 0.0 < res["top1pct_share"] <= 1.0
    assert (out / "analysis.json").exists() and (out / "analysis.safetensors").exists()
    for name in ("significance", "sensitivity", "routing", "dynamics"):
        assert Path(res["files"][name]).read_bytes().startswith(PNG)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "Expert significance per dataset" in html and "Loss sensitivity per layer" in html
    assert "Channel dynamics" in html
    bare = run_json(capsys, "analyze", model_dir, "--data", "drama", "--max-tokens", "128", "--sensitivity-tokens", "0",
                    "--generated-tokens", "256", "--out", work / "analysis-bare", *FAST)
    assert "sensitivity" not in bare["files"] and "routing" in bare["files"]
    assert bare["datasets"] == ["drama", "generated-1"]            # one sequence of the model's own text


@pytest.fixture(scope="module")
def run_dir(model_dir, analysis_dir, work):
    """quantize with the analysis, a budget of 3.5 bits, and evaluations (fp, uniform 3-bit, quantized)."""
    out = work / "run"
    code = cli.main(["quantize", str(model_dir), "--analysis", str(analysis_dir), "--target-bits", "3.5",
                     "--group-size", "32", "--eval", "drama", "--eval-max-tokens", "256", "--baseline-bits", "3",
                     "--out", str(out), *FAST])
    assert code == 0
    return out


def test_quantize_writes_checkpoint_run_record_and_evals(run_dir, analysis_dir):
    rec = json.loads((run_dir / RUN_FILE).read_text())
    assert rec["format"] == RUN_FORMAT and rec["config"]["target_bits"] == 3.5
    assert rec["config"]["allocation"] == "budget" and rec["analysis"] == str(analysis_dir.resolve())
    assert rec["bits_report"]["storage_bits"] <= 3.5 + 1e-9
    assert rec["bits_report"]["cache_bytes"] > 0
    assert {"load", "analysis", "quantize", "eval_fp", "baseline", "eval_quantized", "save"} <= set(rec["timings"])
    labels = {json.loads(p.read_text())["label"] for p in run_dir.glob("eval-*.json")}
    assert labels == {"fp", "uniform-3bit-rtn", "quantized"}
    for p in run_dir.glob("eval-*.json"):
        e = json.loads(p.read_text())
        assert e["format"] == EVAL_FORMAT and e["split"] == "test"
        r = e["results"]["drama"]
        assert r["ci_low"] <= r["ppl"] <= r["ci_high"] and r["tokens"] > 0
    assert (run_dir / "tokenizer.json").exists() and (run_dir / "dynamoq.json").exists()


def test_inspect_per_expert_bits_bytes_cache(capsys, run_dir):
    res = run_json(capsys, "inspect", run_dir)
    rec = json.loads((run_dir / RUN_FILE).read_text())
    assert res["quantized"] and res["storage_bits"] == pytest.approx(rec["bits_report"]["storage_bits"])
    assert sum(sum(d["bytes"]) for d in res["layers"].values()) == res["bytes"]
    assert sum(sum(d["cache_bytes"]) for d in res["layers"].values()) == res["cache_bytes"]
    for layer, d in res["layers"].items():
        assert d["bits"] == rec["bits_report"]["experts"][layer] and len(d["bytes"]) == 4
    code, out, _ = run(capsys, "inspect", run_dir)
    assert code == 0 and "expert   0:" in out and "cache" in out


def test_inspect_of_a_full_precision_model(capsys, model_dir):
    res = run_json(capsys, "inspect", model_dir, "-q")
    assert not res["quantized"] and res["storage_bits"] is None
    assert all(d["bits"] is None and len(d["bytes"]) == 4 for d in res["layers"].values())


def test_eval_json_and_file_for_the_report(capsys, run_dir, tmp_path):
    res = run_json(capsys, "eval", run_dir, "--data", "drama", "--data", "python", "--max-tokens", "128",
                   "--label", "quantized-again", "--out", tmp_path, *FAST)
    assert res["format"] == EVAL_FORMAT and res["label"] == "quantized-again" and res["split"] == "test"
    assert set(res["results"]) == {"drama", "python"}
    written = json.loads(Path(res["path"]).read_text())
    assert written["results"]["python"]["ppl"] == pytest.approx(res["results"]["python"]["ppl"])
    assert Path(res["path"]).name == "eval-quantized-again.json"
    # the same windows and weights as quantize's own evaluation of the quantized model
    q = json.loads((run_dir / "eval-quantized.json").read_text())["results"]["drama"]
    if q["tokens"] == res["results"]["drama"]["tokens"]:
        assert q["ppl"] == pytest.approx(res["results"]["drama"]["ppl"], rel=1e-4)


def test_adapt_prints_changes_and_saves(capsys, run_dir, tmp_path):
    res = run_json(capsys, "adapt", run_dir, "--data", "french", "--max-tokens", "256", "--out", tmp_path / "ad",
                   *FAST)
    assert res["experts_changed"] == sum(len(v) for v in res["changed"].values())
    for layer, per in res["changed"].items():
        for e, (old, new) in per.items():
            assert res["before"][layer][int(e)] == old and res["after"][layer][int(e)] == new
    again = run_json(capsys, "inspect", tmp_path / "ad", "-q")
    assert again["quantized"]


def test_report_html_embeds_plots_and_tables(capsys, run_dir):
    res = run_json(capsys, "report", run_dir, "-q")
    html = Path(res["path"]).read_text()
    assert res["images"] == 5 and html.count("data:image/png;base64,") == 5
    assert res["sections"][:4] == ["summary", "bits", "bytes", "perplexity"]
    assert html.count("<table>") >= 5
    for s in ("Bits per expert", "Perplexity", "uniform-3bit-rtn", "saved on routed experts against 16-bit", "Routing",
              "Expert significance per dataset", "Loss sensitivity per layer", "Channel dynamics", "drama", "fp"):
        assert s in html
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_quantize_from_a_text_file_with_gptq(capsys, model_dir, tmp_path):
    (tmp_path / "mine.txt").write_text("\n".join(data.load("python", "calib", root=DATA)))
    res = run_json(capsys, "quantize", model_dir, "--data", f"code={tmp_path / 'mine.txt'}", "--bits", "4",
                   "--quantizer", "gptq", "--group-size", "32", "--max-tokens", "128", "--out", tmp_path / "q", *FAST)
    assert res["config"]["data"] == ["code"] and res["config"]["quantizer"] == "gptq"
    assert all(b == [4, 4, 4, 4] for b in res["experts"].values())
    assert (tmp_path / "q" / "analysis" / "analysis.json").exists()
    rep = run_json(capsys, "report", tmp_path / "q", "-q")
    assert "perplexity" in rep["sections"] and rep["images"] == 5       # bits, significance, sensitivity, routing, dynamics


def test_quantize_builtin_json(capsys):
    res = run_json(capsys, "quantize", "--builtin", "-q")
    assert res["model"] == cli.BUILTIN_NAME and len(res["experts"]) == 4
    assert res["expert_bytes"] < res["expert_bytes_fp"] and 0 < res["relative_logit_error"] < 0.5


def test_quantize_attention_and_shared_bits(capsys):
    res = run_json(capsys, "quantize", "--builtin", "--attention-bits", "8", "--shared-bits", "keep", "-q")
    assert res["config"]["attention_bits"] == 8 and res["config"]["shared_bits"] is None
    assert res["other_bytes"] > 0 and 0 < res["relative_logit_error"] < 0.5
    head = run_json(capsys, "quantize", "--builtin", "--attention-bits", "8", "--lm-head-bits", "8", "-q")
    assert head["config"]["lm_head_bits"] == 8 and head["other_bytes"] > res["other_bytes"]
    assert run_json(capsys, "quantize", "--builtin", "-q")["other_bytes"] == 0     # the builtin has no shared experts


def test_quantize_default_is_the_real_reference_model(capsys, model_dir, monkeypatch):
    import dynamoq.models
    asked = []
    monkeypatch.setattr(dynamoq.models, "reference", lambda name="real", **kw: asked.append(name) or str(model_dir))
    res = run_json(capsys, "quantize", "--group-size", "32", "-q")       # no model given: the README's main job
    assert asked == ["real"] and res["model"] == str(model_dir) and len(res["experts"]) == 2


def test_bench_builtin_and_script(capsys, model_dir, tmp_path):
    res = run_json(capsys, "bench", "--builtin", "--model", model_dir, "--group-size", "32", "--tokens", "8",
                   "--repeats", "1", "-q")
    assert res["fp_tokens_per_second"] > 0 and res["quantized_tokens_per_second"] > 0
    script = tmp_path / "b.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    assert cli.main(["bench", "--script", str(script), "-q", "--", "--fast"]) == 3


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["quantize", "./no/such/model"], "no model at"),
    (["quantize", "--group-size", "128"], "does not divide"),      # checked before the real model is built
    (["quantize", "--builtin", "--group-size", "48"], "group"),
    (["quantize", "--allocation", "budget", "--data", "drama"], "target_bits"),
    (["quantize", "--bits", "4", "--target-bits", "3"], "exclude"),
    (["quantize", "--target-bits", "3"], "analysis"),
    (["quantize", "--bits", "5"], "invalid choice"),
    (["quantize", "--attention-bits", "5"], "choose 2, 3, 4, 6, 8 or keep"),
    (["eval", "./no/such/model", "--data", "drama"], "no model at"),
    (["report", "/no/such/run"], "not a directory"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exit_code_2_and_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv, "-q")
    assert code == 2, err
    assert needle in one_line_error(err)
    assert out == ""


def test_bad_data_and_model_errors(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "eval", model_dir, "--data", "klingon", "--corpus-dir", DATA, "-q")
    assert code == 2 and "neither a built-in domain" in one_line_error(err)
    code, _, err = run(capsys, "adapt", model_dir, "--data", "drama", "--corpus-dir", DATA, "-q")
    assert code == 2 and "switching cache" in one_line_error(err)          # a model without a cache
    code, _, err = run(capsys, "quantize", model_dir, "--analysis", tmp_path, "--group-size", "32", "-q")
    assert code == 2 and "cannot read an analysis" in one_line_error(err)
    code, _, err = run(capsys, "report", tmp_path, "-q")                     # an empty directory
    assert code == 2 and "nothing to report" in one_line_error(err)


def test_unexpected_error_exit_1_traceback_with_debug(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("something\nbroke")
    monkeypatch.setattr(cli, "cmd_inspect", boom)
    code, _, err = run(capsys, "inspect", "x")
    assert code == 1 and "RuntimeError: something broke" in one_line_error(err) and "--debug" in err
    with pytest.raises(RuntimeError):
        cli.main(["inspect", "x", "--debug"])


def test_module_entry_point_exit_code():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dynamoq", "report", "/no/such/dir", "-q"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("dynamoq report: error:")


def test_plots_functions_directly(tmp_path, analysis_dir):
    from dynamoq import Analysis, plots
    a = Analysis.load(analysis_dir)
    rep = {"experts": {0: [8, 4, 3, 2], 1: [2, 2, 6, 4]}, "storage_bits": 3.9, "usage_bits": 4.2}
    for f, arg in ((plots.significance, a), (plots.routing, a), (plots.dynamics, a), (plots.bits_heatmap, rep)):
        p = f(arg, tmp_path / f"{f.__name__}.png")
        assert Path(p).read_bytes().startswith(PNG)
    with pytest.raises(ValueError):
        plots.bits_heatmap({"experts": {0: None}}, tmp_path / "x.png")
    s = plots.dynamics_summary(a)
    assert s["datasets"] == 3 and set(s["per_layer"]) == {0, 1} and 0 < s["all"] <= 1
