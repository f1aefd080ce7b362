"""Calibration data the model writes itself, for the experts a user's datasets never reach.

A calibration set covers a few domains; an expert that only another domain routes to gets almost no
significance and, in the budget allocation, the lowest width. The model itself knows every domain it
was trained on: sampled from a random first token (the data-free recipe of LLM-QAT, Liu et al. 2023),
its text wanders across them. Pooled into one dataset that text adds little (every expert a small
share); grouped by where it is routed, each group is a pseudo-domain whose experts stand out, and the
synthesis across datasets (mean + lam x std) lifts them as it lifts a real domain's.

Measured on the reference model (validation splits, BQ budget 3.0, GPTQ, group 192; share of uniform
GPTQ 3-bit's perplexity loss recovered; 16 sequences of 256 tokens; scratch runs, the groups there made by
each sequence's most-routed expert, 7 groups; this module's k-means over routing profiles gave the
test-split row of recipes/results/baseline_g192_own_text.md):
  calibration only:                       drama 75 python 47 german 72 | bible -144 dictionary -94 latex -61 chinese 6
  + the text as one dataset:              82 / 45 / 73 | -126 / -37 / 5 / 5
  + grouped, weighing 1 in all:           84 / 42 / 74 | -48 / -36 / 18 / 40
  + grouped, weighing 0.5 a group:        73 / 35 / 71 | -31 / -25 / 18 / 36
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .calibration import collecting, input_device, rank_world

SEQ_LEN = 256           # tokens of each generated sequence
MAX_GROUPS = 8          # pseudo-domains at most
PREFIX = "generated-"   # dataset names: generated-1, generated-2, ...


@torch.no_grad()
def self_generate(model, tokens: int, seq_len: int = SEQ_LEN, temperature: float = 1.0, seed: int = 0,
                  batch_size: int = 16, vocab: int | None = None, progress: bool = True) -> torch.Tensor:
    """Sequences the model samples from a uniformly random first token: LongTensor [N, seq_len],
    N = ceil(tokens / seq_len), every id below `vocab` (default the model's vocabulary; pass
    len(tokenizer) when the embedding has rows beyond the tokenizer's). Sampled on the CPU from a seeded
    generator, so every process of a torchrun / accelerate launch gets the same sequences."""
    if tokens <= 0 or seq_len < 2:
        raise ValueError(f"self_generate needs tokens > 0 and seq_len >= 2 (got {tokens}, {seq_len})")
    from transformers import DynamicCache

    model_vocab = model.config.get_text_config().vocab_size
    vocab = min(vocab or model_vocab, model_vocab)
    n = -(-tokens // seq_len)
    gen = torch.Generator().manual_seed(seed)
    device = input_device(model)
    out = []
    bar = tqdm(total=n * (seq_len - 1), desc="model writing calibration text", unit="tok",
               disable=not progress or rank_world()[0] != 0)
    for i in range(0, n, batch_size):
        seqs = torch.randint(0, vocab, (min(batch_size, n - i), 1), generator=gen)     # [B, 1]
        cache, step = DynamicCache(config=model.config), seqs
        for t in range(seq_len - 1):
            logits = model(input_ids=step.to(device), cache=cache, use_cache=True,
                           cache_position=torch.tensor([t], device=device)).logits[:, -1]     # [B, V]
            probs = torch.softmax(logits.float().cpu() / temperature, -1)[:, :vocab]
            step = torch.multinomial(probs, 1, generator=gen)                                 # [B, 1]
            seqs = torch.cat([seqs, step], 1)
            bar.update(seqs.shape[0])
        out.append(seqs)
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def routing_profiles(model, windows: torch.Tensor) -> torch.Tensor:
    """Share of each MoE layer's top-k slots every expert got, per window: [N, layers x E]. Every process
    runs every window (no reduction), so the profiles are the same everywhere."""
    device = input_device(model)
    rows = []
    with collecting(model) as hooks:
        for w in windows:
            for h in hooks.values():
                h.stats = None
            model(input_ids=w[None].to(device), use_cache=False)
            counts = [hooks[layer].stats.count.cpu() for layer in sorted(hooks)]                # [E] each
            rows.append(torch.cat([c / c.sum().clamp(min=1) for c in counts]))
    return torch.stack(rows).float()


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. x [N, D] -> cluster of each row [N] (0 .. k-1, none empty)."""
    n = x.shape[0]
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(0, n, (1,), generator=gen)]
    while centres.shape[0] < k:
        d = torch.cdist(x, centres).min(1).values.pow(2)                                 # [N]
        pick = torch.multinomial(d / d.sum(), 1, generator=gen) if d.sum() > 0 else torch.randint(0, n, (1,), generator=gen)
        centres = torch.cat([centres, x[pick]])
    for _ in range(iters):
        label = torch.cdist(x, centres).argmin(1)                                         # [N]
        new = torch.stack([x[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    _, label = torch.unique(label, return_inverse=True)                                 # drop empty clusters
    return label


def pseudo_domains(model, tokens: int, vocab: int | None = None, seed: int = 0,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """The model's own text in sequences of SEQ_LEN, grouped by routing: {"generated-1": LongTensor
    [n_1, SEQ_LEN], ...}, at most MAX_GROUPS groups, of two sequences each on average."""
    seqs = self_generate(model, tokens, SEQ_LEN, seed=seed, vocab=vocab, progress=progress)
    label = kmeans(routing_profiles(model, seqs), min(MAX_GROUPS, max(1, seqs.shape[0] // 2)), seed=seed)
    return {f"{PREFIX}{j + 1}": seqs[label == j] for j in range(int(label.max()) + 1)}
