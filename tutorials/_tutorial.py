"""What every tutorial needs before its first cell: its options and the path of the model to work on.

Each tutorial runs as `python tutorials/NN_name.py [--fast] [--model PATH] [--out DIR]`; --fast is
the small setting the test suite runs (fewer tokens, a tiny model), the default is the real one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def options(doc: str, name: str, **defaults) -> argparse.Namespace:
    """--fast, --model, --out and the tutorial's own options (name=default); unknown arguments (a
    notebook kernel's) are ignored."""
    p = argparse.ArgumentParser(description=((doc or "").strip().splitlines() or [""])[0])
    p.add_argument("--fast", action="store_true", help="small and quick: what the test suite runs")
    p.add_argument("--model", default=None,
                   help='checkpoint folder (default: dynamoq.models.reference("real"), "tiny" with --fast)')
    p.add_argument("--out", default=str(ROOT / "out" / "tutorials" / name), help="where results go")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    for key, value in defaults.items():
        if isinstance(value, bool):
            p.add_argument(f"--{key.replace('_', '-')}", action="store_true", default=value)
        else:
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args, _ = p.parse_known_args(sys.argv[1:])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return args


def model_path(args) -> str:
    """The reference MoE: --model, else dynamoq.models.reference("tiny" if --fast else "real")."""
    import dynamoq
    if args.model:
        return args.model
    reference = getattr(dynamoq.models, "reference", None)
    if reference is not None:
        return str(reference("tiny" if args.fast else "real"))
    if not args.fast:
        raise SystemExit("this dynamoq has no dynamoq.models.reference; pass --model PATH or --fast")
    return tiny_checkpoint(Path(args.out).parent / "_tiny")


TINY = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
            num_experts_per_tok=2, max_position_embeddings=512)


def tiny_checkpoint(path) -> str:
    """A tiny random Qwen3-MoE (2 layers, 8 experts, top-2) saved with a word-level tokenizer of the
    corpora: a stand-in for quick runs where no reference model is at hand. Built once per path."""
    import dynamoq
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
        kw = dict(TINY)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
        t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.train_from_iterator((x for d in dynamoq.data.domains() for x in dynamoq.data.load(d, "calib")[:10]),
                              trainers.WordLevelTrainer(vocab_size=TINY["vocab_size"],
                                                        special_tokens=["[UNK]", "</s>"]))
        tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>", pad_token="</s>")
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)
