"""Tiny random checkpoints of a family, saved as a user's would be: weights, config and a real Hugging
Face fast tokenizer (word-level, trained offline on the built-in corpora, as many tokens as the
model's vocabulary), so scripts that take a checkpoint path run on them unchanged."""
from __future__ import annotations

import functools

import torch

from dynamoq import data


@functools.lru_cache(maxsize=None)
def tokenizer(vocab_size: int, domains: tuple[str, ...] = ("drama", "python", "german")):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator((x for d in domains for x in data.load(d, "calib")[:40]),
                          trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>", pad_token="</s>")


def save(model, path):
    """Save a model with a tokenizer that fits its vocabulary; returns the path."""
    vocab = model.config.get_text_config().vocab_size
    model.save_pretrained(path)
    tokenizer(vocab).save_pretrained(path)
    return path


def save_family(model_type: str, path):
    """A tiny random model of one family (tests/families.py), saved with a tokenizer."""
    from conftest import build
    torch.manual_seed(0)
    return save(build(model_type), path)
