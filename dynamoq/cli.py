"""`dynamoq` command line. With no arguments, `dynamoq quantize` quantizes the real reference MoE
(``dynamoq.models.reference("real")``, built on first use) with mixed per-expert bit-widths and prints
what was done: bits, bytes and output error; `dynamoq quantize --builtin` does the same in seconds on
a small built-in MoE with random weights.

Subcommands: quantize, analyze, adapt, eval, bench, inspect, report (each has --help). Every one
takes --json (print one JSON object on stdout), -q/--quiet (no progress bars), --debug (tracebacks)
and --threads. Datasets are given with --data NAME, repeatable: a built-in domain of
dynamoq.data (its calib split, or --split for eval), a .txt file or a directory of them, or
LABEL=PATH; texts are tokenized with the model directory's tokenizer (or --tokenizer DIR).

Exit codes: 0 success; 2 bad input (a missing file, a bad option, a model or analysis that does
not fit: dynamoq's QuantizationError, AnalysisError, UnsupportedModelError, CheckpointError and
other ValueErrors); 1 an unexpected error; 130 interrupted. Errors are one line on stderr; --debug
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import QUANTIZERS
from .htmlreport import _jsonable

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
BUILTIN_NAME = "built-in Qwen3-MoE (4 layers, 8 experts, random weights)"
BENCH_RECIPE = Path("recipes") / "bench_kernels.py"


class UsageError(ValueError):
    """Bad input on the command line (exit code 2)."""


def _mixed_bits(model, pattern=(8, 4, 3, 2)) -> dict[int, list[int]]:
    from .adapters import moe_blocks
    return {b.layer: [pattern[(e + b.layer) % len(pattern)] for e in range(b.num_experts)]
            for b in moe_blocks(model)}


# ---- shared helpers ---------------------------------------------------------------------------------
def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _say(args, msg: str) -> None:
    """A status line on stderr (stdout stays clean for --json)."""
    if _progress(args):
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(args, what: str, timings: dict | None = None, key: str | None = None):
    _say(args, f"{what} ...")
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    if timings is not None and key is not None:
        timings[key] = timings.get(key, 0.0) + dt
    _say(args, f"{what}: done in {dt:.1f} s")


def _emit(args, result: dict, text: list[str]) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=_jsonable))
    else:
        print("\n".join(text))


def _check_model_path(path: str) -> None:
    """A local path that does not exist is an input error (not a hub id to try)."""
    if not os.path.exists(path) and (os.sep in path or path.startswith(".") or path.startswith("~")):
        raise UsageError(f"no model at {path}: give the directory of a transformers checkpoint")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_model(path: str, dtype: str = "float32"):
    """A dynamoq checkpoint (checked against its manifest) or a plain transformers causal LM."""
    import transformers

    import dynamoq
    from .checkpoint import MANIFEST_NAME
    _check_model_path(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return dynamoq.load(path).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).eval()


def _default_model():
    """(model, name, directory): the real reference model, built on first use."""
    from . import models
    path = str(models.reference("real"))
    return load_model(path), path, path


def _model_dir(model, given: str | None) -> str | None:
    src = given or getattr(model, "name_or_path", None) or None
    return src if src and os.path.isdir(src) else None


def _tokenizer(args, model_dir: str | None):
    src = getattr(args, "tokenizer", None) or model_dir
    if src is None:
        raise UsageError("texts need a tokenizer and this model has none: pass --tokenizer DIR (or a model "
                         "directory that holds one)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load a tokenizer from {src}: {_one_line(e)}") from e


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def datasets_from_args(specs: list[str] | None, split: str, corpus_dir=None) -> dict[str, list[str]]:
    """{name: texts} from --data values: a built-in domain (its `split`), a .txt file or directory,
    or LABEL=PATH."""
    from . import data
    if not specs:
        raise UsageError(f"give at least one dataset: --data NAME (a built-in domain: {', '.join(data.domains())}) "
                         "or --data PATH (a .txt file or a directory of them)")
    out: dict[str, list[str]] = {}
    for spec in specs:
        label, src = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        if src in data.domains():           # a domain name wins; write ./NAME for a path of that name
            name, texts = label or src, data.load(src, split, root=corpus_dir)
            if not texts:
                raise UsageError(f"domain {src!r} has no texts in its {split!r} split")
        elif os.path.exists(src):
            name = label or Path(src).stem or Path(src).resolve().name
            texts = data.as_texts(src)
        else:
            raise UsageError(f"--data {spec}: neither a built-in domain ({', '.join(data.domains())}) nor an existing "
                             "file or directory")
        if name in out:
            raise UsageError(f"dataset name {name!r} is given twice; name them with --data LABEL=PATH")
        out[name] = texts
    return out


def _print_perplexity(label: str, results: dict) -> list[str]:
    lines = [f"perplexity ({label}):"]
    width = max(len(d) for d in results)
    for d, r in results.items():
        lines.append(f"  {d:<{width}}  {r.ppl:10.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]  "
                     f"top-1 {100 * r.top1:5.1f}%  over {r.tokens:,} tokens")
    return lines


def _evaluate(args, model, texts: dict, tokenizer, label: str, seq_len: int, max_tokens: int,
              batch_size: int = 4) -> dict:
    import dynamoq
    out = {}
    for name, t in texts.items():
        _say(args, f"evaluating {label} on {name}")
        out[name] = dynamoq.eval.perplexity(model, t, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                                            batch_size=batch_size, progress=_progress(args))
    return out


def _json_report(report: dict) -> dict:
    return json.loads(json.dumps(report, default=_jsonable))


# ---- quantize -----------------------------------------------------------------------------------------
def _check_quantize_args(args) -> None:
    """Bad combinations fail before any model is loaded or any data read."""
    import dynamoq
    if args.data and args.analysis:
        raise UsageError("give --analysis DIR or --data NAME, not both")
    if args.bits and args.target_bits is not None:
        raise UsageError("--bits (uniform) and --target-bits (mixed precision) exclude each other")
    if args.baseline_bits and not args.eval:
        raise UsageError("--baseline-bits needs --eval NAME (the data to compare on)")
    has_data = bool(args.data or args.analysis)
    # the library's own checks of the options (a placeholder stands for the data not read yet)
    dynamoq.DynaMoConfig(bits=args.bits, group_size=args.group_size, target_bits=args.target_bits,
                         allocation=args.allocation, quantizer=args.quantizer, cache_fraction=args.cache_fraction,
                         datasets={"": []} if has_data else None, **_other_bits(args))
    if args.baseline_bits:
        dynamoq.DynaMoConfig(bits=args.baseline_bits, quantizer=args.quantizer,
                             datasets={"": []} if has_data else None)


def _bits_or_keep(v: str) -> int | None:
    if v == "keep":
        return None
    if v not in ("2", "3", "4", "6", "8"):
        raise argparse.ArgumentTypeError(f"{v!r}: choose 2, 3, 4, 6, 8 or keep")
    return int(v)


def _other_bits(args) -> dict:
    """The bit-widths of the weights beside the routed experts (DynaMoConfig fields)."""
    return {f"{part}_bits": getattr(args, f"{part}_bits") for part in ("shared", "dense", "attention", "lm_head")}


def _check_reference_group_size(group_size: int) -> None:
    """The real reference model's expert input dimensions are 576 (hidden) and 1536 (expert MLP)."""
    from .reference.real import EXPERT_INPUT_DIMS
    bad = [k for k in EXPERT_INPUT_DIMS if k % group_size]
    if bad:
        ok = [g for g in (32, 64, 192) if all(k % g == 0 for k in EXPERT_INPUT_DIMS)]
        raise UsageError(f"--group-size {group_size} does not divide the real reference model's expert input "
                         f"dimension {bad[0]}; use one of {ok} (or --builtin)")


def _probe_tokens(model, model_dir: str | None) -> tuple[torch.Tensor, str]:
    """[2, 64] token ids on which the output error is measured: the starts of two built-in test texts
    (drama, python) when the model comes with a tokenizer and the corpus is built, else seeded random ids."""
    try:
        from transformers import AutoTokenizer
        from . import data
        if model_dir is None or not all((data.cache_dir() / f"{d}.json").exists() for d in ("drama", "python")):
            raise FileNotFoundError("no tokenizer or no built corpus")      # never build a corpus for a probe
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(data.load(d, "test")[0][:2000]).input_ids[:64] for d in ("drama", "python")]
        if min(map(len, ids)) == 64:
            return torch.tensor(ids), "the first 64 tokens of a drama and a python test text"
    except Exception:            # no tokenizer, no corpus: random ids still measure the error
        pass
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0)), "2 x 32 random token ids"


def cmd_quantize(args) -> int:
    import transformers
    import dynamoq
    from . import models
    from . import htmlreport

    _check_quantize_args(args)
    texts = datasets_from_args(args.data, "calib", args.corpus_dir) if args.data else None
    eval_texts = datasets_from_args(args.eval, args.eval_split, args.corpus_dir) if args.eval else None
    timings: dict[str, float] = {}
    t_load = time.perf_counter()
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = args.model
    elif args.builtin:
        model, name = models.builtin(), BUILTIN_NAME
    else:
        _check_reference_group_size(args.group_size)       # before a build that takes minutes
        model, name, _ = _default_model()
    timings["load"] = time.perf_counter() - t_load
    dynamoq.quantize.plan(model, dynamoq.DynaMoConfig(bits=4, group_size=args.group_size))  # group size, MoE found
    analysis, tokenizer, analysis_path, model_dir = None, None, None, _model_dir(model, args.model)
    tokens, probe = _probe_tokens(model, model_dir)
    with torch.no_grad():
        ref = model(tokens).logits
    fp_bytes = sum(p.numel() * p.element_size() for b in dynamoq.moe_blocks(model) for p in b.experts.parameters())

    # calibration: an analysis from disk, or one made now from --data
    if args.data or args.eval:
        tokenizer = _tokenizer(args, model_dir)
    if args.analysis:
        with _step(args, f"reading the analysis {args.analysis}", timings, "analysis"):
            analysis = dynamoq.Analysis.load(args.analysis)
            analysis.check_model(model)
        analysis_path = os.path.abspath(args.analysis)
    elif texts:
        with _step(args, f"analysing on {', '.join(texts)}", timings, "analysis"):
            analysis = dynamoq.analyze(model, texts, tokenizer=tokenizer, seq_len=args.seq_len,
                                       max_tokens=args.max_tokens, sensitivity_tokens=args.sensitivity_tokens,
                                       generated_tokens=args.generated_tokens, progress=_progress(args))

    # evaluation of the full-precision model and of a uniform baseline, before quantizing
    evals: dict[str, tuple[dict, float | None]] = {}
    if eval_texts:
        with _step(args, "evaluating the full-precision model", timings, "eval_fp"):
            evals["fp"] = (_evaluate(args, model, eval_texts, tokenizer, "fp", args.seq_len, args.eval_max_tokens), None)
        if args.baseline_bits:
            label = f"uniform-{args.baseline_bits}bit-{args.quantizer}"
            with _step(args, f"quantizing and evaluating the {label} baseline", timings, "baseline"):
                base = copy.deepcopy(model)
                dynamoq.quantize_(base, dynamoq.DynaMoConfig(
                    bits=args.baseline_bits, group_size=args.group_size, quantizer=args.quantizer,
                    analysis=analysis if args.quantizer == "gptq" else None, cache_fraction=0.0, **_other_bits(args)),
                    progress=_progress(args))
                evals[label] = (_evaluate(args, base, eval_texts, tokenizer, label, args.seq_len,
                                          args.eval_max_tokens), dynamoq.bits_report(base)["storage_bits"])
                del base

    mixed = not (args.bits or analysis is not None or args.target_bits is not None or args.allocation)
    expert_bits = _mixed_bits(model) if mixed else None
    allocation = args.allocation
    if allocation is None and analysis is not None and not args.bits and args.target_bits is None:
        allocation = "fuzzy"           # the paper's clustering when data is given and nothing else decides
    config = dynamoq.DynaMoConfig(bits=args.bits, expert_bits=expert_bits, group_size=args.group_size,
                                  analysis=analysis, target_bits=args.target_bits, allocation=allocation,
                                  quantizer=args.quantizer, cache_fraction=args.cache_fraction,
                                  cache_projections=args.cache_projections, **_other_bits(args))
    t0 = time.perf_counter()
    dynamoq.quantize_(model, config, progress=_progress(args))
    seconds = time.perf_counter() - t0
    timings["quantize"] = seconds
    with torch.no_grad():
        out = model(tokens).logits
    report = dynamoq.bits_report(model)
    result = {
        "model": name,
        "experts": report["experts"],
        "storage_bits": report["storage_bits"],
        "expert_bytes": report["bytes"],
        "expert_bytes_fp": fp_bytes,
        "relative_logit_error": ((out - ref).norm() / ref.norm()).item(),
        "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "probe": probe,
        "seconds": seconds,
    }
    if eval_texts:
        with _step(args, "evaluating the quantized model", timings, "eval_quantized"):
            evals["quantized"] = (_evaluate(args, model, eval_texts, tokenizer, "quantized", args.seq_len,
                                            args.eval_max_tokens), report["storage_bits"])
        result["perplexity"] = {label: {d: {k: r.as_dict()[k] for k in ("ppl", "ci_low", "ci_high", "tokens")}
                                        for d, r in res.items()} for label, (res, _) in evals.items()}
    result.update(usage_bits=report["usage_bits"], cache_bytes=report["cache_bytes"],
                  config={"bits": args.bits, "target_bits": args.target_bits, "allocation": config.mode,
                          "quantizer": args.quantizer, "group_size": args.group_size,
                          "cache_fraction": args.cache_fraction if analysis is not None else 0.0,
                          "cache_projections": args.cache_projections,
                          "expert_bits": "mixed 8/4/3/2 demo" if mixed else None,
                          "data": list(analysis.datasets) if analysis is not None else [],
                          "analysis": analysis_path, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                          "eval": list(eval_texts or []), "eval_split": args.eval_split,
                          "baseline_bits": args.baseline_bits, **_other_bits(args)},
                  other_bytes=report["other_bytes"])
    if args.out:
        out_dir = Path(args.out)
        with _step(args, f"saving to {out_dir}", timings, "save"):
            model.save_pretrained(out_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
            if analysis is not None and analysis_path is None:
                analysis.save(out_dir / "analysis")
            for label, (res, bits) in evals.items():
                htmlreport.write_json(out_dir / f"eval-{_safe_label(label)}.json", htmlreport.eval_record(
                    label, name if label != "quantized" else str(out_dir), res, args.eval_split, args.seq_len,
                    args.eval_max_tokens, bits))
        record = {"format": htmlreport.RUN_FORMAT, "version": htmlreport.FORMAT_VERSION,
                  "created": htmlreport._now(), "dynamoq": dynamoq.__version__, "command": "quantize",
                  "model": name, "out": str(out_dir.resolve()), "config": result["config"],
                  "bits_report": _json_report(report), "expert_bytes_fp": fp_bytes,
                  "fp_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "relative_logit_error": result["relative_logit_error"],
                  "top1_agreement": result["top1_agreement"], "timings": timings,
                  "analysis": analysis_path or ("analysis" if analysis is not None else None)}
        htmlreport.write_json(out_dir / htmlreport.RUN_FILE, record)
        result["out"] = str(out_dir)
    result["timings"] = timings
    if args.json:
        print(json.dumps(result, indent=2, default=_jsonable))
        return 0
    print(f"model: {name}")
    for layer, bits in report["experts"].items():
        print(f"  layer {layer:>2}: expert bits {bits}")
    print(f"storage bits per expert weight (codes + scales + zeros): {result['storage_bits']:.3f}")
    if report["usage_bits"] is not None:
        print(f"usage-weighted bits: {report['usage_bits']:.3f}")
    print(f"expert bytes: {report['bytes']:,} quantized vs {fp_bytes:,} in {next(model.parameters()).dtype} "
          f"({fp_bytes / report['bytes']:.2f}x smaller)")
    if report["cache_bytes"]:
        print(f"switching cache: {report['cache_bytes']:,} bytes ({report['cache_bits']:.3f} bits per expert weight)")
    if report["other"]:
        print(f"shared experts, dense layers, attention and head: {report['other_bytes']:,} bytes in "
              f"{len(report['other'])} weights")
    print(f"output: relative logit error {result['relative_logit_error']:.4f}, "
          f"top-1 agreement {100 * result['top1_agreement']:.1f}% on {probe}  ({seconds:.2f} s to quantize)")
    for label, (res, _) in evals.items():
        print("\n".join(_print_perplexity(label, res)))
    if args.out:
        print(f"saved to {args.out} (run record {htmlreport.RUN_FILE}; `dynamoq report {args.out}` writes the report)")
    return 0


# ---- analyze ------------------------------------------------------------------------------------------
def cmd_analyze(args) -> int:
    import dynamoq
    from . import htmlreport, plots

    texts = datasets_from_args(args.data, "calib", args.corpus_dir)     # bad data fails before the model loads
    timings: dict[str, float] = {}
    with _step(args, "loading the model", timings, "load"):
        if args.model:
            model, name = load_model(args.model, args.dtype), args.model
        else:
            model, name, _ = _default_model()
    tokenizer = _tokenizer(args, _model_dir(model, args.model))
    with _step(args, f"analysing on {', '.join(texts)}", timings, "analysis"):
        analysis = dynamoq.analyze(model, texts, tokenizer=tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                   batch_size=args.batch_size, balanced=args.balanced,
                                   sensitivity_tokens=args.sensitivity_tokens, generated_tokens=args.generated_tokens,
                                   progress=_progress(args))
    analysis.meta["model"] = name
    out = Path(args.out)
    analysis.save(out)
    files = {"analysis": str(out)}
    if not args.no_plots:
        with _step(args, "drawing the plots and the report", timings, "report"):
            files["significance"] = plots.significance(analysis, out / "plots" / "significance.png")
            if analysis.has_sensitivity:
                files["sensitivity"] = plots.sensitivity(analysis, out / "plots" / "sensitivity.png")
            files["routing"] = plots.routing(analysis, out / "plots" / "routing.png")
            files["dynamics"] = plots.dynamics(analysis, out / "plots" / "dynamics.png")
            files["report"] = htmlreport.build(out)["path"]
    dyn = plots.dynamics_summary(analysis)
    sig = analysis.synthesized()
    result = {"model": name, "out": str(out), "datasets": analysis.datasets, "tokens": analysis.meta["tokens"],
              "layers": analysis.layers,
              "most_significant_expert": {layer: int(s.argmax()) for layer, s in sig.items()},
              "top1pct_share": dyn["all"], "fallbacks": len(analysis.fallbacks()), "files": files,
              "timings": timings}
    text = [f"model: {name}", f"analysis written to {out}"]
    text += [f"  {d}: {n:,} tokens" for d, n in analysis.meta["tokens"].items()]
    for layer, s in sig.items():
        top = s.argsort(descending=True)[:3].tolist()
        text.append(f"  layer {layer:>2}: most significant experts {top} "
                    f"(synthesized S_exp {', '.join(f'{float(s[e]):.3f}' for e in top)})")
    if len(analysis.datasets) > 1:
        text.append(f"channel dynamics: the top 1% of channels carry {100 * dyn['all']:.1f}% of the cross-dataset change")
    if result["fallbacks"]:
        text.append(f"{result['fallbacks']} expert(s) got too few tokens and use a fallback (see the report)")
    if "report" in files:
        text.append(f"report: {files['report']}")
    _emit(args, result, text)
    return 0


# ---- adapt --------------------------------------------------------------------------------------------
def cmd_adapt(args) -> int:
    import dynamoq
    from . import switching

    texts = datasets_from_args(args.data, "calib", args.corpus_dir)
    with _step(args, f"loading {args.model}"):
        model = load_model(args.model, args.dtype)
    tokenizer = _tokenizer(args, _model_dir(model, args.model))
    before = switching.state(model)
    joined = [t for ts in texts.values() for t in ts]
    with _step(args, f"adapting to {', '.join(texts)}"):
        res = dynamoq.adapt_(model, joined, tokenizer=tokenizer, max_tokens=args.max_tokens, seq_len=args.seq_len,
                             policy=args.policy, progress=_progress(args))
    changed = {int(layer): {int(e): list(v) for e, v in per.items()} for layer, per in res["changed"].items()}
    result = {"model": args.model, "data": list(texts), "changed": changed,
              "experts_changed": sum(len(v) for v in changed.values()), "tokens": res["tokens"],
              "seconds": res["seconds"], "before": before, "after": switching.state(model)}
    if args.out:
        with _step(args, f"saving to {args.out}"):
            model.save_pretrained(args.out)
            tokenizer.save_pretrained(args.out)
        result["out"] = args.out
    text = [f"adapted {args.model} to {', '.join(texts)} ({res['tokens']:,} tokens, {res['seconds']:.2f} s): "
            f"{result['experts_changed']} expert(s) changed the level of their cached channels"]
    for layer, per in changed.items():
        text.append(f"  layer {layer:>2}: " + ", ".join(f"expert {e} {old}->{new} bits" for e, (old, new) in per.items()))
    if args.out:
        text.append(f"saved to {args.out}")
    _emit(args, result, text)
    return 0


# ---- eval ---------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import dynamoq
    from . import htmlreport

    texts = datasets_from_args(args.data, args.split, args.corpus_dir)
    with _step(args, f"loading {args.model}"):
        model = load_model(args.model, args.dtype)
    tokenizer = _tokenizer(args, _model_dir(model, args.model))
    report = dynamoq.bits_report(model)
    label = args.label or ("quantized" if report["storage_bits"] is not None else "fp")
    results = _evaluate(args, model, texts, tokenizer, label, args.seq_len, args.max_tokens, args.batch_size)
    record = htmlreport.eval_record(label, args.model, results, args.split, args.seq_len, args.max_tokens,
                                    report["storage_bits"])
    if args.out:
        path = Path(args.out)
        if path.suffix != ".json":
            path = path / f"eval-{_safe_label(label)}.json"
        htmlreport.write_json(path, record)
        record["path"] = str(path)
    text = _print_perplexity(label, results)
    if args.out:
        text.append(f"written to {record['path']}")
    _emit(args, record, text)
    return 0


# ---- inspect ------------------------------------------------------------------------------------------
def expert_bytes(model) -> dict[int, dict[str, list[int]]]:
    """Per MoE layer, bytes of each routed expert's weights as stored (packed codes + scales + zeros,
    or the plain tensors) and of its switching cache."""
    import dynamoq
    from .tensors import CACHE_NAMES, _PackedWeight

    def nbytes(t):
        return t.numel() * t.element_size()

    out = {}
    for block in dynamoq.moe_blocks(model):
        n = block.num_experts
        weights, cache = [0] * n, [0] * n
        if block.adapter.fused:
            for p in block.projections:
                w = getattr(block.experts, p.name)
                if not isinstance(w, _PackedWeight):
                    for e in range(n):
                        weights[e] += nbytes(w[e])
                    continue
                for e, b in enumerate(w.expert_bits):
                    q = getattr(w, f"q{b}")
                    weights[e] += nbytes(q) // w.expert_bits.count(b) + nbytes(w.scale[e]) + nbytes(w.zero[e])
                    for c in CACHE_NAMES:
                        t = getattr(w, c)
                        if t is not None:
                            cache[e] += nbytes(t[e])
        else:
            for e, module in enumerate(block.experts):
                for t in module.parameters():
                    if isinstance(t, _PackedWeight):
                        weights[e] += t.storage_bytes()
                        cache[e] += t.cache_bytes()
                    else:
                        weights[e] += nbytes(t)
        out[block.layer] = {"bytes": weights, "cache_bytes": cache}
    return out


def cmd_inspect(args) -> int:
    import dynamoq
    with _step(args, f"loading {args.model}"):
        model = load_model(args.model, args.dtype)
    report = dynamoq.bits_report(model)
    per = expert_bytes(model)
    layers = {layer: {"bits": report["experts"].get(layer), **per[layer]} for layer in per}
    quantized = report["storage_bits"] is not None
    result = {"model": args.model, "class": type(model).__name__, "quantized": quantized, "layers": layers,
              "storage_bits": report["storage_bits"], "usage_bits": report["usage_bits"], "bytes": report["bytes"],
              "cache_bytes": report["cache_bytes"], "cache_bits": report["cache_bits"], "weights": report["weights"],
              "other": report["other"], "other_bytes": report["other_bytes"]}
    text = [f"model: {args.model} ({type(model).__name__}, {len(layers)} MoE layers)"]
    if not quantized:
        text.append("not quantized by dynamoq")
    for layer, d in layers.items():
        n = len(d["bytes"])
        text.append(f"  layer {layer:>2}: {n} experts, {sum(d['bytes']):,} bytes"
                    + (f" + {sum(d['cache_bytes']):,} cache bytes" if sum(d["cache_bytes"]) else ""))
        if args.experts or n <= 16:
            for e in range(n):
                bits = d["bits"][e] if d["bits"] else "fp"
                text.append(f"      expert {e:>3}: {bits!s:>2} bits  {d['bytes'][e]:>12,} bytes  "
                            f"cache {d['cache_bytes'][e]:>8,} bytes")
        elif d["bits"]:
            hist = {b: d["bits"].count(b) for b in sorted(set(d["bits"]))}
            text.append("      bits: " + ", ".join(f"{c} experts at {b}" for b, c in hist.items())
                        + "  (--experts lists every expert)")
    if quantized:
        text.append(f"stored bits per expert weight (codes + scales + zeros): {report['storage_bits']:.3f}")
        if report["usage_bits"] is not None:
            text.append(f"usage-weighted bits: {report['usage_bits']:.3f}")
        text.append(f"expert bytes: {report['bytes']:,}; switching cache: {report['cache_bytes']:,} bytes "
                    f"({report['cache_bits']:.3f} bits per expert weight)")
        if report["other"]:
            text.append(f"shared experts, dense layers, attention and head: {report['other_bytes']:,} bytes in "
                        f"{len(report['other'])} weights")
    _emit(args, result, text)
    return 0


# ---- bench --------------------------------------------------------------------------------------------
def _find_recipe() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / BENCH_RECIPE).is_file():
            return root / BENCH_RECIPE
    return None


def _time(model, tokens, repeats: int) -> float:
    with torch.no_grad():
        model(tokens)                                # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_bench(args) -> int:
    import dynamoq
    from . import models

    script = Path(args.script) if args.script else (None if args.builtin else _find_recipe())
    if script is not None:
        if not script.is_file():
            raise UsageError(f"no benchmark script at {script}")
        extra = [a for a in args.args if a != "--"]
        _say(args, f"running {script} {' '.join(extra)}")
        return subprocess.call([sys.executable, str(script), *extra])
    if args.tokens < 1 or args.batch < 1 or args.repeats < 1:
        raise UsageError("--batch, --tokens and --repeats must be positive")
    if args.model:
        model, name = load_model(args.model, "float32"), args.model
    else:
        model, name = models.builtin(), BUILTIN_NAME
    tokens = torch.randint(0, model.config.get_text_config().vocab_size, (args.batch, args.tokens),
                           generator=torch.Generator().manual_seed(0))
    run = (lambda m: torch.compile(m, options=dynamoq.compile_options())) if args.compile else (lambda m: m)  # noqa: E731
    with _step(args, "timing the full-precision model" + (" (compiling first)" if args.compile else "")):
        fp = _time(run(model), tokens, args.repeats)
    fp_bytes = sum(p.numel() * p.element_size() for b in dynamoq.moe_blocks(model) for p in b.experts.parameters())
    dynamoq.quantize_(model, dynamoq.DynaMoConfig(bits=args.bits, group_size=args.group_size), progress=False)
    if args.compile:
        torch._dynamo.reset()
    with _step(args, f"timing the {args.bits}-bit model" + (" (compiling first)" if args.compile else "")):
        q = _time(run(model), tokens, args.repeats)
    n = tokens.numel()
    result = {"model": name, "device": "cpu", "batch": args.batch, "tokens": args.tokens, "bits": args.bits,
              "fp_seconds": fp, "quantized_seconds": q, "fp_tokens_per_second": n / fp,
              "quantized_tokens_per_second": n / q, "speedup": fp / q, "expert_bytes_fp": fp_bytes,
              "expert_bytes": dynamoq.bits_report(model)["bytes"], "compiled": args.compile}
    text = [f"{name}, batch {args.batch} x {args.tokens} tokens, {'compiled' if args.compile else 'eager'}, CPU ({torch.get_num_threads()} threads)",
            f"  full precision: {n / fp:10.1f} tokens/s  ({1000 * fp:.1f} ms per forward)",
            f"  {args.bits}-bit experts: {n / q:10.1f} tokens/s  ({1000 * q:.1f} ms per forward), "
            f"{fp / q:.2f}x; expert bytes {fp_bytes:,} -> {result['expert_bytes']:,}",
            "(a quick check; recipes/bench_kernels.py measures the compiled kernels)"]
    _emit(args, result, text)
    return 0


# ---- report -------------------------------------------------------------------------------------------
def cmd_report(args) -> int:
    from . import htmlreport
    with _step(args, f"writing the report of {args.run_dir}"):
        res = htmlreport.build(args.run_dir, args.out)
    _emit(args, res, [f"report: {res['path']} ({res['images']} plots; sections: {', '.join(res['sections'])})"])
    return 0


# ---- parser and main ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):       # one line, exit code 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _data_options(p, split: bool = False, seq_len: int = 256, max_tokens: int | None = 16384):
    p.add_argument("--data", action="append", metavar="NAME",
                   help="dataset, repeatable: a built-in domain (see `python -m dynamoq.data`), a .txt file or a "
                        "directory of them, or LABEL=PATH")
    p.add_argument("--corpus-dir", metavar="DIR", help="where the built-in domains are read from "
                   "(default: $DYNAMOQ_CORPUS_DIR, else the corpus cache, built on first use)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the model directory's)")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens per dataset at most (default {max_tokens})")
    if split:
        p.add_argument("--split", default="test", choices=("calib", "val", "test"),
                       help="split of the built-in domains (default test)")


def _analysis_options(p):
    from .analysis import SENSITIVITY_TOKENS
    p.add_argument("--sensitivity-tokens", type=int, default=SENSITIVITY_TOKENS, metavar="N",
                   help=f"tokens per dataset that also go through a pass with gradients, for the loss sensitivity "
                        f"that weighs layers in the budget allocation (default {SENSITIVITY_TOKENS}; 0 skips it)")
    p.add_argument("--generated-tokens", type=int, default=0, metavar="N",
                   help="the model also writes N tokens of its own text, grouped by routing into pseudo-domains, "
                        "so that experts the datasets never reach get significance too (4096 is 16 sequences; "
                        "default 0: none)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")

    parser = _Parser(prog="dynamoq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dynamoq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quantize", parents=[common], help="quantize an MoE (the real reference model by default) and report what was done",
                       description="Quantize an MoE: uniform, a mixed 8/4/3/2 demo pattern (default, no data), or "
                                   "DynaMo's per-expert bits from an analysis (--data or --analysis).")
    q.add_argument("model", nargs="?", help="path of a transformers MoE checkpoint (default: the real reference "
                   "model, dynamoq.models.reference('real'), built into the cache on first use: about 15-25 minutes "
                   "with 2 threads on a CPU with native bf16, about an hour without, once)")
    q.add_argument("--builtin", action="store_true", help="quantize the small built-in MoE with random weights "
                   "instead (seconds; for a quick look at the plumbing)")
    q.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8), help="uniform bits (default: a mixed 8/4/3/2 demo, "
                   "or DynaMo's allocation with --data/--analysis)")
    q.add_argument("--group-size", type=int, default=64)
    for part, default, what in (("shared", 8, "shared experts"), ("dense", None, "dense MLP layers"),
                                ("attention", None, "attention projections"),
                                ("lm_head", None, "output head (untied from the embeddings)")):
        q.add_argument(f"--{part.replace('_', '-')}-bits", type=_bits_or_keep, default=default,
                       metavar="{2,3,4,6,8,keep}",
                       help=f"bits of the {what} (default: {default or 'keep'}; keep: left as they are)")
    _data_options(q)
    q.add_argument("--analysis", metavar="DIR", help="an analysis saved by `dynamoq analyze` (instead of --data)")
    q.add_argument("--target-bits", type=float, help="average stored bits per expert weight (budget allocation)")
    q.add_argument("--allocation", choices=("budget", "fuzzy", "frequency"),
                   help="how bits are chosen from the analysis (default: budget with --target-bits, else fuzzy)")
    q.add_argument("--quantizer", choices=QUANTIZERS, default="rtn",
                   help="base quantizer: rtn (fastest), clip (searched grids, data-free) or gptq (needs data)")
    q.add_argument("--cache-fraction", type=float, default=0.01,
                   help="share of each expert's input channels cached for run-time switching (with data; default 0.01)")
    q.add_argument("--cache-projections", choices=("input", "all"), default="input",
                   help="projections that keep a cache: input (gate_up / up, default) or all (down_proj too)")
    q.add_argument("--eval", action="append", metavar="NAME",
                   help="evaluate perplexity on this dataset (repeatable) before and after quantizing")
    q.add_argument("--eval-split", default="test", choices=("calib", "val", "test"))
    q.add_argument("--eval-max-tokens", type=int, default=32768)
    q.add_argument("--baseline-bits", type=int, choices=(2, 3, 4, 6, 8),
                   help="with --eval: also evaluate a uniform baseline at these bits (same quantizer)")
    _analysis_options(q)
    q.add_argument("--out", metavar="DIR", help="save the quantized model (save_pretrained), its tokenizer, the "
                   "analysis, evaluations and a run record for `dynamoq report`")
    q.set_defaults(func=cmd_quantize)

    a = sub.add_parser("analyze", parents=[common], help="multi-level analysis on datasets, with plots and a report",
                       description="Calibrate on each dataset and write the Analysis (safetensors + JSON), PNG plots "
                                   "(expert significance, loss sensitivity, routing, channel dynamics) and report.html.")
    a.add_argument("model", nargs="?", help="path of a transformers MoE checkpoint (default: the reference model)")
    _data_options(a)
    a.add_argument("--out", default="analysis", metavar="DIR", help="output directory (default ./analysis)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--balanced", action="store_true",
                   help="also run every token through every expert (a fallback for experts short of tokens)")
    _analysis_options(a)
    a.add_argument("--no-plots", action="store_true", help="write the analysis only")
    a.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("adapt", parents=[common], help="adapt a quantized model's cached channels to new data",
                       description="Load a quantized checkpoint (saved with a switching cache), run dynamoq.adapt_ "
                                   "on the data and print which experts changed level.")
    d.add_argument("model", help="directory of a dynamoq checkpoint")
    _data_options(d, max_tokens=4096)
    d.add_argument("--policy", choices=("paper", "raise"), default="paper",
                   help="paper: cached channels follow the new level up or down; raise: only up")
    d.add_argument("--out", metavar="DIR", help="save the adapted model here")
    d.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    d.set_defaults(func=cmd_adapt)

    e = sub.add_parser("eval", parents=[common], help="per-domain perplexity with 95%% intervals",
                       description="Perplexity of a model (full precision or quantized) on each dataset, with a "
                                   "bootstrap 95%% interval; --out writes the result for `dynamoq report`.")
    e.add_argument("model", help="model directory")
    _data_options(e, split=True, seq_len=512, max_tokens=32768)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--label", help="name of this model in the report (default: fp or quantized; name a uniform "
                   "baseline uniform-...)")
    e.add_argument("--out", metavar="PATH", help="a .json file, or a directory (a run directory) to write "
                   "eval-LABEL.json into")
    e.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", parents=[common], help="kernel benchmark (recipes/bench_kernels.py, or a quick timing)",
                       description="Runs recipes/bench_kernels.py when it exists (arguments after -- go to it), "
                                   "else a quick eager timing of the built-in MoE, full precision against quantized.")
    b.add_argument("--script", help="benchmark script to run (default: recipes/bench_kernels.py if present)")
    b.add_argument("--builtin", action="store_true", help="the quick built-in timing even if the recipe exists")
    b.add_argument("--model", metavar="DIR", help="model for the quick timing (default: the built-in MoE)")
    b.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8), default=4)
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--compile", action="store_true", help="time torch.compile'd models (compiling takes a while)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (after --)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", parents=[common], help="per-layer, per-expert bits, bytes and cache size",
                       description="Bits, bytes and switching-cache size of every routed expert of a checkpoint.")
    i.add_argument("model", help="model directory")
    i.add_argument("--experts", action="store_true", help="list every expert even in layers with more than 16")
    i.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("report", parents=[common], help="self-contained HTML report of a run directory",
                       description="report.html of a run (from `dynamoq quantize --out DIR`, with the analysis and "
                                   "eval-*.json found there): bits per expert, bytes saved, perplexity against the "
                                   "fp and uniform baselines, significance, routing and channel dynamics.")
    r.add_argument("run_dir", help="run directory (or an analysis directory)")
    r.add_argument("--out", metavar="FILE", help="where to write the HTML (default RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)
    return parser


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 600 else msg[:597] + "..."


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    try:
        if getattr(args, "model", None):     # every command's model path, before its datasets (slow to build)
            _check_model_path(args.model)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"dynamoq {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:   # bad input: dynamoq's errors are ValueErrors; files that are not there
        if args.debug:
            raise
        print(f"dynamoq {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001  one line, the traceback with --debug
        if args.debug:
            raise
        print(f"dynamoq {args.command}: unexpected error: {type(e).__name__}: {_one_line(e)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
