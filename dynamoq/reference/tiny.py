"""The "tiny" reference model: a small Qwen3-MoE trained from scratch on the built-in corpora, for
fast tests of the plumbing with a model whose routing means something.

It has its own byte-level BPE tokenizer (4096 tokens) trained on the same data, so the model and
its tokenizer weigh a few MB and are shipped in the package (``dynamoq/reference/tiny/``); ``build``
makes them again, deterministically for a seed on one machine, in tens of minutes (35 recorded with 1 thread on a busy machine).
The data are the calibration splits of the same eight domains the "real" reference model is built
on; french and json are left out of both, as novel data.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._common import Timer, atomic_dir, determinism, say, state_digest, write_json

FORMAT = "tiny-v1"


@dataclass(frozen=True)
class TinyRecipe:
    domains: tuple = ("drama", "bible", "python", "docs_en", "latex_math", "german", "chinese", "dictionary")
    vocab_size: int = 4096
    tokenizer_bytes: int = 600_000        # calibration text per domain the tokenizer is trained on
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    expert_size: int = 128                # moe_intermediate_size: 128 so group 128 divides every expert dim
    seq_len: int = 128
    batch: int = 16                       # windows per step: batch // len(domains) of each domain
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    aux_loss: float = 0.01
    seed: int = 0
    dtype: str = "float32"


def config_for(r: TinyRecipe, tok):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=r.vocab_size, hidden_size=r.hidden_size, intermediate_size=2 * r.expert_size,
        moe_intermediate_size=r.expert_size, num_hidden_layers=r.layers, num_attention_heads=r.heads,
        num_key_value_heads=r.kv_heads, head_dim=r.hidden_size // r.heads, num_experts=r.experts,
        num_experts_per_tok=r.top_k, norm_topk_prob=True, max_position_embeddings=4 * r.seq_len,
        tie_word_embeddings=True, router_aux_loss_coef=r.aux_loss,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation) with one special token,
    ``<|endoftext|>``, serving as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None, model_max_length=1 << 30)


def _head(texts: list[str], nbytes: int) -> list[str]:
    out, used = [], 0
    for t in texts:
        if used >= nbytes:
            break
        out.append(t)
        used += len(t.encode("utf-8"))
    return out


def build(out: str | Path, recipe: TinyRecipe = TinyRecipe(), threads: int | None = None, progress: bool = True,
          corpus_root=None) -> Path:
    """Train the tokenizer and the model, and save both (safetensors + config + tokenizer) to ``out``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from .. import data

    r = recipe
    out = Path(out)
    timer = Timer()
    with determinism(r.seed, threads):
        texts = {d: data.load(d, "calib", root=corpus_root) for d in r.domains}
        tok = train_tokenizer([t for d in r.domains for t in _head(texts[d], r.tokenizer_bytes)], r.vocab_size)
        timer.mark("tokenizer")
        per = max(1, r.batch // len(r.domains))
        need = r.steps * per * r.seq_len
        windows = {}
        for d in r.domains:
            w = data.token_windows(texts[d], tok, seq_len=r.seq_len, max_tokens=need)
            g = torch.Generator().manual_seed(r.seed * 1000 + r.domains.index(d))
            windows[d] = w[torch.randperm(w.shape[0], generator=g)]
        timer.mark("tokenize")
        cfg = config_for(r, tok)
        torch.manual_seed(r.seed)
        model = AutoModelForCausalLM.from_config(cfg)
        model.config.output_router_logits = True
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        other = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))

        def lr_at(s):
            if s < r.warmup:
                return (s + 1) / r.warmup
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - r.warmup) / max(1, r.steps - r.warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        model.train()
        losses = []
        with tqdm(total=r.steps, desc="dynamoq tiny reference", unit="step", disable=not progress) as bar:
            for s in range(r.steps):
                batch = torch.cat([windows[d][(s * per + k) % windows[d].shape[0]][None]
                                   for d in r.domains for k in range(per)])
                outp = model(input_ids=batch, labels=batch)
                outp.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                losses.append(outp.loss.item())
                if s % 25 == 0 or s == r.steps - 1:
                    bar.set_postfix_str(f"loss {sum(losses[-25:]) / len(losses[-25:]):.3f}")
                bar.update(1)
        timer.mark("train")
        model.config.output_router_logits = False
        model.eval()
        model = model.to(getattr(torch, r.dtype))
        digest = state_digest(model.state_dict())
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / "dynamoq_reference.json", {
                "name": "tiny", "format": FORMAT, "recipe": asdict(r), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                "weights_sha256": digest, "seconds": timer.total, "timings": timer.marks,
                "held_out_domains": [d for d in data.domains() if d not in r.domains]})
    say(f"dynamoq: built the tiny reference model in {timer.total:.0f} s -> {out}")
    return out
