"""Shared by the family recipes; each family file holds only its `Recipe` (the settings, and why).

    python recipes/families/<family>.py MODEL --out DIR [--data drama python german] [--target-bits B] [--fast]

MODEL is a local checkpoint folder or a hub id. The recipe
  1. loads it with AutoModelForCausalLM.from_pretrained (checkpoints shipped in MXFP4 or FP8, such
     as GPT-OSS and DeepSeek-V3, are dequantized on load: dynamoq quantizes from 16/32-bit weights);
  2. runs dynamoq.analyze on the named datasets: built-in domains (dynamoq.data.domains()) read from
     their calibration split, or your own text files / folders of .txt files;
  3. quantizes with the family's DynaMoConfig (expert bits from the analysis under a budget of
     --target-bits stored bits per expert weight, GPTQ, the switching cache kept);
  4. saves DIR with save_pretrained (plus the tokenizer, and the analysis under DIR/analysis, for
     dynamoq.adapt_ or a later re-quantization) and prints dynamoq.bits_report.
The saved checkpoint loads with AutoModelForCausalLM.from_pretrained(DIR) once dynamoq is imported.
--fast calibrates on fewer tokens with round-to-nearest: a quick look, not the recommended setting.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_DATA = ("drama", "python", "german")
FAST = dict(quantizer="rtn", calib_tokens=2048, seq_len=128)


@dataclass(frozen=True)
class Recipe:
    """A family's recommended settings; the field comments say what each one sets."""
    family: str                           # name for people
    model_types: tuple[str, ...]          # config.model_type values it was written for
    checkpoints: tuple[str, ...]          # real checkpoints it fits (hub ids)
    group_size: int = 128                 # must divide every quantized input dim of the family
    target_bits: float = 3.0              # average stored bits per routed-expert weight (codes + scales + zeros)
    shared_bits: int | None = 8           # shared experts (None: kept in 16 bit)
    dense_bits: int | None = None         # dense MLP layers (None: kept)
    quantizer: str = "gptq"
    lam: float = 1.0                      # weight of the across-dataset spread of significance
    cache_fraction: float = 0.01          # switchable channels per expert (dynamoq.adapt_)
    calib_tokens: int = 16384             # per dataset
    seq_len: int = 512

    def config(self, analysis, **overrides):
        """The DynaMoConfig of this recipe for an analysis of the model; overrides replace fields."""
        from dynamoq import DynaMoConfig
        s = {k: overrides.get(k) if overrides.get(k) is not None else getattr(self, k)
             for k in ("group_size", "target_bits", "quantizer", "cache_fraction")}
        return DynaMoConfig(analysis=analysis, target_bits=s["target_bits"], quantizer=s["quantizer"],
                            group_size=s["group_size"], shared_bits=self.shared_bits, dense_bits=self.dense_bits,
                            lam=self.lam, cache_fraction=s["cache_fraction"])


def parser(recipe: Recipe, doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"dynamoq recipe for {recipe.family} ({', '.join(recipe.checkpoints)}).",
        epilog=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--out", required=True, help="where to save the quantized checkpoint")
    p.add_argument("--data", nargs="+", default=list(DEFAULT_DATA),
                   help="calibration datasets: built-in domain names or paths of .txt files / folders of them")
    p.add_argument("--target-bits", type=float, default=None, help=f"default {recipe.target_bits}")
    p.add_argument("--group-size", type=int, default=None, help=f"default {recipe.group_size}")
    p.add_argument("--quantizer", choices=("rtn", "gptq"), default=None, help=f"default {recipe.quantizer}")
    p.add_argument("--cache-fraction", type=float, default=None, help=f"default {recipe.cache_fraction}")
    p.add_argument("--calib-tokens", type=int, default=None, help=f"per dataset; default {recipe.calib_tokens}")
    p.add_argument("--seq-len", type=int, default=None, help=f"default {recipe.seq_len}")
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="also measure test perplexity of built-in domains before and after (tokens per domain)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: the model's)")
    p.add_argument("--dtype", default="auto", help="dtype to load in: auto, bfloat16, float16, float32")
    p.add_argument("--device-map", default=None, help='passed to from_pretrained, e.g. "auto"')
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fast", action="store_true", help="quick look: RTN, 2048 calibration tokens per dataset")
    return p


def dequantize_on_load(path) -> dict:
    """from_pretrained arguments that dequantize a checkpoint shipped quantized (GPT-OSS: MXFP4,
    DeepSeek-V3: FP8 blocks); refuses one dynamoq already quantized."""
    from transformers import AutoConfig
    q = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    method = (q or {}).get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        return {}
    if method == "mxfp4":
        from transformers import Mxfp4Config
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    if method == "fp8":
        from transformers import FineGrainedFP8Config
        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    if method == "dynamoq":
        raise SystemExit(f"{path} is already quantized by dynamoq; start from the original checkpoint")
    raise SystemExit(f"{path} is stored quantized ({method}); start from a 16-bit copy of it")


def load(recipe: Recipe, args):
    import transformers
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    kw = dequantize_on_load(args.model)
    if args.device_map:
        kw["device_map"] = args.device_map
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw).eval()
    mt = model.config.model_type
    if mt not in recipe.model_types:
        print(f"note: this recipe is for {recipe.family} ({', '.join(recipe.model_types)}); {args.model} is {mt!r}")
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    return model, tok


def datasets(names) -> dict[str, list[str]]:
    """Built-in domain names -> their calibration split; paths -> the documents they hold."""
    import dynamoq
    out = {}
    for name in names:
        if name in dynamoq.data.domains():
            out[name] = dynamoq.data.load(name, "calib")
        elif Path(name).exists():
            out[Path(name).stem] = dynamoq.data.as_texts(name)
        else:
            raise SystemExit(f"--data {name}: neither a built-in domain ({', '.join(dynamoq.data.domains())}) "
                             "nor a file or folder")
    return out


def group_size_for(model, recipe: Recipe, asked: int | None) -> int:
    """The recipe's group size, or the largest smaller power of two that fits a model of other dimensions."""
    from dynamoq import DynaMoConfig, QuantizationError
    from dynamoq.quantize import plan
    if asked is not None:
        return asked
    for g in [recipe.group_size] + [g for g in (64, 32, 16) if g < recipe.group_size]:
        try:
            plan(model, DynaMoConfig(bits=4, group_size=g, shared_bits=recipe.shared_bits,
                                     dense_bits=recipe.dense_bits))
        except QuantizationError:
            continue
        if g != recipe.group_size:
            print(f"note: group_size {recipe.group_size} does not divide every quantized input dim of this model; "
                  f"using {g}")
        return g
    return recipe.group_size  # quantize_ will say why


def perplexities(model, tok, names, tokens: int, seq_len: int) -> dict[str, float]:
    import dynamoq
    return {d: dynamoq.eval.perplexity(model, dynamoq.data.load(d, "test"), tokenizer=tok, max_tokens=tokens,
                                       seq_len=seq_len, progress=False).ppl
            for d in names if d in dynamoq.data.domains()}


def summary(report: dict) -> list[str]:
    lines = []
    for layer, bits in report["experts"].items():
        if bits is None:
            continue
        counts = collections.Counter(bits)
        per = ", ".join(f"{counts[b]} x {b}-bit" for b in sorted(counts, reverse=True))
        lines.append(f"  layer {layer:>3}: {per}")
    lines.append(f"storage bits per expert weight: {report['storage_bits']:.3f}"
                 + (f", usage-weighted: {report['usage_bits']:.3f}" if report["usage_bits"] else ""))
    lines.append(f"expert bytes: {report['bytes']:,} (+ switching cache {report['cache_bytes']:,})")
    if report["other"]:
        kinds = collections.Counter(v["bits"] if isinstance(v["bits"], int) else max(v["bits"])
                                    for v in report["other"].values())
        per = ", ".join(f"{n} at {b}-bit" for b, n in sorted(kinds.items()))
        lines.append(f"other quantized weights (shared experts, dense layers): {len(report['other'])} ({per}), "
                     f"{report['other_bytes']:,} bytes")
    return lines


def run(recipe: Recipe, argv=None, doc: str | None = None) -> dict:
    """Everything the command line does (doc: the family's notes, for --help); returns
    {"model", "report", "config", "settings", "out", "ppl"}."""
    import dynamoq
    args = parser(recipe, doc).parse_args(argv)
    fast = FAST if args.fast else {}
    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else fast.get(k, getattr(recipe, k))  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load(recipe, args)
    data = datasets(args.data)
    group_size = group_size_for(model, recipe, args.group_size)
    seq_len = pick("seq_len")
    ppl = {"fp": perplexities(model, tok, data, args.eval_tokens, seq_len)} if args.eval_tokens else {}
    analysis = dynamoq.analyze(model, data, tokenizer=tok, seq_len=seq_len, max_tokens=pick("calib_tokens"))
    config = recipe.config(analysis, group_size=group_size, target_bits=args.target_bits,
                           quantizer=pick("quantizer"), cache_fraction=args.cache_fraction)
    dynamoq.quantize_(model, config)
    report = dynamoq.bits_report(model)
    if args.eval_tokens:
        ppl["quantized"] = perplexities(model, tok, data, args.eval_tokens, seq_len)
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    analysis.save(out / "analysis")
    settings = {k: v for k, v in asdict(recipe).items() if k not in ("family", "model_types", "checkpoints")}
    settings.update(group_size=group_size, target_bits=config.target_bits, quantizer=config.quantizer,
                    cache_fraction=config.cache_fraction, calib_tokens=pick("calib_tokens"), seq_len=seq_len)
    print(f"{recipe.family} recipe: {args.model} -> {out}  ({time.perf_counter() - t0:.1f} s)")
    print("settings: " + json.dumps(settings))
    print(f"calibration: {', '.join(f'{d} ({n} tokens)' for d, n in analysis.meta['tokens'].items())}")
    print("\n".join(summary(report)))
    for d in ppl.get("fp", {}):
        print(f"test perplexity {d}: {ppl['fp'][d]:.2f} -> {ppl['quantized'][d]:.2f}")
    return {"model": model, "report": report, "config": config, "settings": settings, "out": out, "ppl": ppl}
