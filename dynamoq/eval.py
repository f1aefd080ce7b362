"""Evaluation: perplexity with bootstrap intervals, paired comparisons, KL divergence to a reference,
top-1 next-token accuracy, and zero-shot multiple-choice scoring with two tasks built from corpora.

Every function takes a causal LM whose forward returns ``.logits`` (any transformers causal LM).
Data is either a list of strings (needs ``tokenizer=``) or a LongTensor of token ids ``[N, T]``,
cut into windows by ``dynamoq.data.token_windows`` as everywhere in dynamoq: rows of a tensor with
``T == seq_len`` are the windows; otherwise texts or rows are joined and cut into windows of
``seq_len`` (the last partial window dropped), at most ``max_tokens // seq_len`` of them. Within a
window every token after the first is scored given all tokens before it in that window.

Intervals are percentile bootstraps over windows (or items): 1000 resamples with a fixed seed, so a
result is reproducible; two results computed on the same windows can be compared with ``paired``,
which resamples the same windows for both models.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = ["perplexity", "paired", "kl_divergence", "top1_accuracy", "multiple_choice", "continuation_task",
           "domain_task", "PerplexityResult", "PairedResult", "KLResult", "MultipleChoiceResult", "Windows",
           "MCItem"]

N_BOOTSTRAP = 1000
SEED = 0


# --------------------------------------------------------------------------------------------------
# results

@dataclass
class Windows:
    """Per-window sums, in window order: what a paired comparison resamples.

    nll: summed negative log-likelihood (nats) of the scored tokens of each window (float64);
    count: scored tokens per window; correct: tokens whose top-1 prediction was right;
    key: a fingerprint of each window's token ids (int64), to check that two results share windows.
    """
    nll: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor
    key: torch.Tensor

    def __len__(self):
        return int(self.count.numel())


@dataclass
class PerplexityResult:
    ppl: float
    ci_low: float
    ci_high: float
    nll: float                      # mean NLL per scored token (nats)
    tokens: int                     # scored tokens
    windows: Windows = field(repr=False)
    seconds: float
    tokens_per_second: float        # tokens fed to the model per second
    top1: float                     # fraction of next tokens predicted exactly (argmax)

    def __str__(self):
        return f"ppl {self.ppl:.2f} [{self.ci_low:.2f}, {self.ci_high:.2f}] over {self.tokens} tokens"

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "windows"}
        d["n_windows"] = len(self.windows)
        return d


@dataclass
class PairedResult:
    """b compared with a on the same windows. ratio = ppl_b / ppl_a = exp(nll_diff)."""
    nll_diff: float                 # mean per-token NLL of b minus that of a (nats)
    nll_diff_ci_low: float
    nll_diff_ci_high: float
    ratio: float
    ci_low: float                   # paired bootstrap 95% interval of the ratio
    ci_high: float
    ppl_a: float
    ppl_b: float
    top1_diff: float                # top-1 accuracy of b minus that of a
    tokens: int
    n_windows: int

    @property
    def significant(self) -> bool:
        """Whether the 95% interval of the ratio excludes 1."""
        return self.ci_low > 1.0 or self.ci_high < 1.0

    def __str__(self):
        return (f"ppl {self.ppl_a:.2f} -> {self.ppl_b:.2f}, ratio {self.ratio:.4f} "
                f"[{self.ci_low:.4f}, {self.ci_high:.4f}] over {self.tokens} tokens")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class KLResult:
    kl: float                       # mean KL(reference || model) per token (nats)
    ci_low: float
    ci_high: float
    top1_agreement: float           # fraction of positions where both models' argmax agree
    tokens: int
    seconds: float
    tokens_per_second: float
    kl_per_window: torch.Tensor = field(repr=False)      # summed KL per window
    count_per_window: torch.Tensor = field(repr=False)

    def __str__(self):
        return (f"KL {self.kl:.4f} [{self.ci_low:.4f}, {self.ci_high:.4f}] nats/token, top-1 agreement "
                f"{self.top1_agreement:.4f} over {self.tokens} tokens")

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("kl_per_window", "count_per_window")}


@dataclass
class MultipleChoiceResult:
    accuracy: float                 # argmax of the summed log-likelihood of each choice
    ci_low: float
    ci_high: float
    n: int
    accuracy_norm: float            # argmax of log-likelihood per byte of the choice (UTF-8)
    norm_ci_low: float
    norm_ci_high: float
    correct: torch.Tensor = field(repr=False)           # bool [n]
    correct_norm: torch.Tensor = field(repr=False)      # bool [n]
    loglik: list = field(repr=False)                    # per item: summed log-likelihood of each choice
    seconds: float = 0.0

    def __str__(self):
        return (f"acc {self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}], acc_norm "
                f"{self.accuracy_norm:.3f} over {self.n} items")

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("correct", "correct_norm", "loglik")}


class MCItem(NamedTuple):
    context: str
    choices: list
    answer_index: int


# --------------------------------------------------------------------------------------------------
# helpers

def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _config_limit(model, name):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    value = getattr(text, name, None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _accepts_use_cache(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _Eval:
    """Puts a model in eval mode for the duration, restoring training mode after."""

    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    kw = {"use_cache": False} if _accepts_use_cache(model) else {}
    out = model(input_ids=ids.to(_device(model)), **kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}")
    return logits.float()


def _check_positive(**kw):
    for name, value in kw.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _windows(model, data, tokenizer, max_tokens, seq_len) -> torch.Tensor:
    """The windows to score, LongTensor [N, L] on the CPU, by ``dynamoq.data.token_windows`` (texts and
    token tensors alike, so evaluation cuts data the way the rest of dynamoq does)."""
    _check_positive(max_tokens=max_tokens, seq_len=seq_len)
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (a window scores each token after its first)")
    if isinstance(data, str):
        raise ValueError("data must be a list of strings or a LongTensor of token ids, not a single string")
    if data is None or (not isinstance(data, torch.Tensor) and len(data) == 0):
        raise ValueError("no data to evaluate: the list of texts is empty")
    if not isinstance(data, torch.Tensor) and tokenizer is None:
        raise ValueError("texts need a tokenizer: pass tokenizer=... (or pass a LongTensor of token ids)")
    limit = _config_limit(model, "max_position_embeddings")
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} is larger than the model's max_position_embeddings={limit}")
    from .data import token_windows

    windows = token_windows(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"no window of at least 2 tokens to score (windows of shape {tuple(windows.shape)})")
    vocab = _config_limit(model, "vocab_size")
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model, found [{lo}, {hi}]")
    return windows.long().cpu()


def _key(w: torch.Tensor) -> int:
    digest = hashlib.blake2b(w.numpy().astype("<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _progress(total, desc, progress):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, unit="tok")


def _resample(n: int, n_boot: int = N_BOOTSTRAP, seed: int = SEED, chunk: int = 100):
    """Yields index tensors [<=chunk, n] of the bootstrap resamples, the same for a given n and seed."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        yield torch.randint(0, n, (k, n), generator=g)
        done += k


def _ratio_ci(num: torch.Tensor, den: torch.Tensor, transform=lambda x: x) -> tuple[float, float]:
    """Percentile 95% interval of transform(sum(num) / sum(den)) under resampling of the units."""
    num, den = num.double(), den.double()
    stats = []
    for idx in _resample(num.numel()):
        stats.append(transform(num[idx].sum(1) / den[idx].sum(1).clamp_min(1e-300)))
    s = torch.cat(stats)
    lo, hi = torch.quantile(s, torch.tensor([0.025, 0.975], dtype=s.dtype)).tolist()
    return lo, hi


# --------------------------------------------------------------------------------------------------
# perplexity, top-1, paired comparison, KL

@torch.no_grad()
def perplexity(model, texts_or_tokens, tokenizer=None, max_tokens=32768, seq_len=512, batch_size=4,
               progress=True) -> PerplexityResult:
    """Perplexity over at most max_tokens tokens cut into windows of seq_len, with a 95% bootstrap
    interval over windows; also top-1 next-token accuracy and throughput."""
    _check_positive(batch_size=batch_size)
    windows = _windows(model, texts_or_tokens, tokenizer, max_tokens, seq_len)
    nll, count, correct = [], [], []
    fed = windows.numel()
    t0 = time.perf_counter()
    with _Eval(model), _progress(fed, "perplexity", progress) as bar:
        for batch in windows.split(batch_size):
            logits = _logits(model, batch)[:, :-1]
            target = batch[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll.append(loss.double().sum(1).cpu())
            correct.append((logits.argmax(-1) == target).sum(1).cpu())
            count.append(torch.full((batch.shape[0],), target.shape[1], dtype=torch.long))
            bar.update(batch.numel())
    seconds = time.perf_counter() - t0
    win = Windows(nll=torch.cat(nll), count=torch.cat(count), correct=torch.cat(correct),
                  key=torch.tensor([_key(w) for w in windows], dtype=torch.long))
    tokens = int(win.count.sum())
    mean = float(win.nll.sum()) / tokens
    lo, hi = _ratio_ci(win.nll, win.count, torch.exp)
    return PerplexityResult(ppl=math.exp(mean), ci_low=lo, ci_high=hi, nll=mean, tokens=tokens, windows=win,
                            seconds=seconds, tokens_per_second=fed / max(seconds, 1e-9),
                            top1=float(win.correct.sum()) / tokens)


def top1_accuracy(model, texts_or_tokens, tokenizer=None, max_tokens=32768, seq_len=512, batch_size=4,
                  progress=True) -> float:
    """Fraction of next tokens whose argmax prediction is exactly right (also PerplexityResult.top1)."""
    return perplexity(model, texts_or_tokens, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                      batch_size=batch_size, progress=progress).top1


def paired(result_a: PerplexityResult, result_b: PerplexityResult) -> PairedResult:
    """Compares b with a on the same windows: mean per-token NLL difference (b - a), ppl ratio b / a,
    and paired bootstrap 95% intervals (the same resampled windows for both)."""
    wa, wb = getattr(result_a, "windows", None), getattr(result_b, "windows", None)
    if not isinstance(wa, Windows) or not isinstance(wb, Windows):
        raise ValueError("paired() takes two PerplexityResults (from dynamoq.eval.perplexity)")
    if len(wa) != len(wb):
        raise ValueError(f"the two results were not computed on the same windows: {len(wa)} windows vs "
                         f"{len(wb)} (use the same data, seq_len and max_tokens for both)")
    differ = (wa.key != wb.key) | (wa.count != wb.count)
    if bool(differ.any()):
        i = int(differ.nonzero()[0])
        raise ValueError(f"the two results were not computed on the same windows: window {i} holds different "
                         f"tokens ({int(differ.sum())} of {len(wa)} windows differ)")
    diff = wb.nll - wa.nll
    tokens = int(wa.count.sum())
    mean = float(diff.sum()) / tokens
    lo, hi = _ratio_ci(diff, wa.count)
    return PairedResult(nll_diff=mean, nll_diff_ci_low=lo, nll_diff_ci_high=hi, ratio=math.exp(mean),
                        ci_low=math.exp(lo), ci_high=math.exp(hi), ppl_a=result_a.ppl, ppl_b=result_b.ppl,
                        top1_diff=float((wb.correct - wa.correct).sum()) / tokens, tokens=tokens,
                        n_windows=len(wa))


@torch.no_grad()
def kl_divergence(model, reference, texts_or_tokens, tokenizer=None, max_tokens=32768, seq_len=512,
                  batch_size=4, progress=True) -> KLResult:
    """Mean KL(reference || model) per token in nats, with a 95% bootstrap interval over windows, and
    the fraction of positions where the two models' top-1 predictions agree."""
    _check_positive(batch_size=batch_size)
    windows = _windows(model, texts_or_tokens, tokenizer, max_tokens, seq_len)
    ref_limit = _config_limit(reference, "max_position_embeddings")
    if ref_limit is not None and seq_len > ref_limit:
        raise ValueError(f"seq_len={seq_len} is larger than the reference's max_position_embeddings={ref_limit}")
    kl, agree, count = [], [], []
    fed = windows.numel()
    t0 = time.perf_counter()
    with _Eval(model, reference), _progress(fed, "KL divergence", progress) as bar:
        for batch in windows.split(batch_size):
            logits = _logits(model, batch)[:, :-1]
            ref = _logits(reference, batch)[:, :-1].to(logits.device)
            if ref.shape[-1] != logits.shape[-1]:
                raise ValueError(f"model and reference have different vocabularies: {logits.shape[-1]} vs "
                                 f"{ref.shape[-1]} logits")
            rows_kl = []
            for lm, lr in zip(logits, ref):  # one window at a time keeps memory at one [T, V] pair
                lp, lq = F.log_softmax(lm, -1), F.log_softmax(lr, -1)
                rows_kl.append(F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1).clamp_min(0)
                               .double().sum())
            kl.append(torch.stack(rows_kl).cpu())
            agree.append((logits.argmax(-1) == ref.argmax(-1)).sum(1).cpu())
            count.append(torch.full((batch.shape[0],), logits.shape[1], dtype=torch.long))
            bar.update(batch.numel())
    seconds = time.perf_counter() - t0
    kl, agree, count = torch.cat(kl), torch.cat(agree), torch.cat(count)
    tokens = int(count.sum())
    lo, hi = _ratio_ci(kl, count)
    return KLResult(kl=float(kl.sum()) / tokens, ci_low=lo, ci_high=hi, top1_agreement=float(agree.sum()) / tokens,
                    tokens=tokens, seconds=seconds, tokens_per_second=fed / max(seconds, 1e-9),
                    kl_per_window=kl, count_per_window=count)


# --------------------------------------------------------------------------------------------------
# zero-shot multiple choice

def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def _prefix_token(tokenizer):
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    return None


def _check_items(items):
    if items is None or len(items) == 0:
        raise ValueError("no items to score: items is empty")
    for i, item in enumerate(items):
        try:
            context, choices, answer = item
        except (TypeError, ValueError):
            raise ValueError(f"item {i} must be (context: str, choices: list[str], answer_index: int)") from None
        if not isinstance(context, str) or isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"item {i} must be (context: str, choices: list[str], answer_index: int)")
        if len(choices) < 2:
            raise ValueError(f"item {i} has {len(choices)} choice(s); at least 2 are needed")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"item {i}: answer_index {answer!r} is not an index into its {len(choices)} choices")
        if any(not c for c in choices):
            raise ValueError(f"item {i} has an empty choice")


@torch.no_grad()
def multiple_choice(model, tokenizer, items, progress=True, max_length=None) -> MultipleChoiceResult:
    """Zero-shot multiple choice: each item (context, choices, answer_index) is answered by the choice
    whose tokens have the highest summed log-likelihood given the context (accuracy), or the highest
    log-likelihood per UTF-8 byte of the choice (accuracy_norm). Contexts are encoded without special
    tokens, after the tokenizer's BOS token (or EOS when it has none, as in lm-eval); whitespace at the
    end of a context moves to the start of the choices. Contexts too long for max_length (default: the
    model's max_position_embeddings) lose their oldest tokens. 95% bootstrap intervals over items."""
    if tokenizer is None:
        raise ValueError("multiple_choice needs a tokenizer")
    _check_items(items)
    limit = max_length or _config_limit(model, "max_position_embeddings")
    vocab = _config_limit(model, "vocab_size")
    prefix = _prefix_token(tokenizer)
    device = _device(model)
    loglik, correct, correct_norm = [], [], []
    t0 = time.perf_counter()
    from tqdm.auto import tqdm
    with _Eval(model):
        for i, (context, choices, answer) in enumerate(tqdm(items, desc="multiple choice", disable=not progress)):
            stripped = context.rstrip()
            moved = context[len(stripped):]
            ctx = ([prefix] if prefix is not None else []) + _encode(tokenizer, stripped)
            conts = [_encode(tokenizer, moved + c) for c in choices]
            if not ctx:
                raise ValueError(f"item {i} has an empty context and the tokenizer has neither a BOS nor an EOS "
                                 "token to condition on")
            if any(len(c) == 0 for c in conts):
                raise ValueError(f"item {i}: a choice encodes to no tokens")
            longest = max(len(c) for c in conts)
            if limit is not None:
                if longest >= limit:
                    raise ValueError(f"item {i}: a choice of {longest} tokens does not fit in {limit} positions")
                ctx = ctx[-(limit - longest):]
            seqs = [ctx + c for c in conts]
            width = max(len(s) for s in seqs)
            # right padding: a causal model's logits at real positions never see the pads
            ids = torch.tensor([s + [ctx[-1]] * (width - len(s)) for s in seqs], dtype=torch.long)
            if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise ValueError(f"item {i}: token ids fall outside the model's vocabulary of {vocab}")
            logp = F.log_softmax(_logits(model, ids.to(device)), -1)
            scores = []
            for j, c in enumerate(conts):
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=logp.device)
                scores.append(float(logp[j, pos, torch.tensor(c, device=logp.device)].double().sum()))
            nbytes = [max(len((moved + c).encode("utf-8")), 1) for c in choices]
            best = max(range(len(choices)), key=lambda k: scores[k])
            best_norm = max(range(len(choices)), key=lambda k: scores[k] / nbytes[k])
            loglik.append(scores)
            correct.append(best == answer)
            correct_norm.append(best_norm == answer)
    seconds = time.perf_counter() - t0
    c, cn = torch.tensor(correct), torch.tensor(correct_norm)
    ones = torch.ones(len(c))
    lo, hi = _ratio_ci(c.double(), ones)
    nlo, nhi = _ratio_ci(cn.double(), ones)
    return MultipleChoiceResult(accuracy=float(c.double().mean()), ci_low=lo, ci_high=hi, n=len(c),
                                accuracy_norm=float(cn.double().mean()), norm_ci_low=nlo, norm_ci_high=nhi,
                                correct=c, correct_norm=cn, loglik=loglik, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# task builders

_SPACE = re.compile(r"\s")


def _span(doc: str, start: int, n_chars: int, align: bool = True) -> str | None:
    """Text of doc from a whitespace boundary at or after start, about n_chars long and ending before
    a whitespace (so it starts with whitespace and ends on a whole word; text without whitespace
    nearby is cut where it falls; align=False starts exactly at start); None if it does not fit."""
    m = _SPACE.search(doc, start, start + n_chars) if align else None
    a = m.start() if m else start  # text without whitespace (CJK) is cut anywhere
    while a > start and _SPACE.match(doc[a - 1]):  # the whole run of whitespace belongs to the span
        a -= 1
    end = a + n_chars
    if end >= len(doc):
        return None
    m = _SPACE.search(doc, end, end + n_chars)
    b = m.start() if m else end
    text = doc[a:b]
    return text if text.strip() else None


def _context(doc: str, context_chars: int, continuation_chars: int):
    """(context, continuation) cut from the start of doc, or None: the context ends on a whole word,
    the continuation starts with the whitespace after it."""
    if len(doc) < context_chars + continuation_chars:
        return None
    m = _SPACE.search(doc, context_chars, 2 * context_chars)
    cut = m.start() if m else context_chars
    while cut > 0 and _SPACE.match(doc[cut - 1]):
        cut -= 1
    context = doc[:cut]
    cont = _span(doc, cut, continuation_chars, align=False)  # starts right where the context ends
    if not context.strip() or cont is None:
        return None
    return context, cont


def _distractor(rng: random.Random, doc: str, n_chars: int, tries: int = 8) -> str | None:
    hi = len(doc) - n_chars - 1
    for _ in range(tries):
        if hi < 1:
            return None
        span = _span(doc, rng.randrange(1, hi + 1), n_chars)
        if span is not None:
            return span
    return None


def _check_task_args(n_items, n_choices, context_chars, continuation_chars):
    _check_positive(n_items=n_items, n_choices=n_choices, context_chars=context_chars,
                    continuation_chars=continuation_chars)
    if n_choices < 2:
        raise ValueError(f"n_choices must be at least 2, got {n_choices}")


def continuation_task(docs: Sequence[str], n_items=200, n_choices=4, context_chars=400, continuation_chars=100,
                      seed=0) -> list[MCItem]:
    """Items: the start of a document (about context_chars, cut at a word boundary) and n_choices
    continuations, one the document's true continuation (about continuation_chars), the others spans
    taken from other documents of the list. Documents too short are skipped; as many items as there
    are usable documents, up to n_items. The answer position is drawn at random; same seed, same items."""
    _check_task_args(n_items, n_choices, context_chars, continuation_chars)
    if isinstance(docs, str) or not docs or not all(isinstance(d, str) for d in docs):
        raise ValueError("docs must be a non-empty list of strings")
    rng = random.Random(seed)
    usable = [(i, cc) for i, d in enumerate(docs) if (cc := _context(d, context_chars, continuation_chars))]
    if not usable:
        raise ValueError(f"no document is long enough (>= {context_chars + continuation_chars} characters with "
                         "whitespace) to build an item")
    sources = [i for i, d in enumerate(docs) if len(d) > continuation_chars + 2]
    if len(set(sources)) < 2:
        raise ValueError("continuation_task needs at least 2 documents long enough to draw continuations from")
    rng.shuffle(usable)
    items = []
    for i, (context, truth) in usable:
        if len(items) == n_items:
            break
        others = [j for j in sources if j != i]
        choices, seen = [], {truth}
        for _ in range(20 * n_choices):
            if len(choices) == n_choices - 1:
                break
            span = _distractor(rng, docs[rng.choice(others)], continuation_chars)
            if span is not None and span not in seen:
                seen.add(span)
                choices.append(span)
        if len(choices) < n_choices - 1:
            continue
        answer = rng.randrange(n_choices)
        choices.insert(answer, truth)
        items.append(MCItem(context, choices, answer))
    if not items:
        raise ValueError("could not build any item: the documents are too few or too short")
    return items


def domain_task(docs_by_domain: dict, n_items=200, n_choices=None, context_chars=300, continuation_chars=100,
                seed=0) -> list[MCItem]:
    """Items: the start of a document of one domain and n_choices passages, one from another document
    of the same domain, the others from documents of other domains (each a different domain); the
    model should find the passage that fits the context's domain. n_choices defaults to the number of
    domains, at most 4. Domains take turns as the context's domain; same seed, same items."""
    if not isinstance(docs_by_domain, dict) or len(docs_by_domain) < 2:
        raise ValueError("domain_task needs a dict of at least 2 domains -> list of documents")
    for name, docs in docs_by_domain.items():
        if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
            raise ValueError(f"domain {name!r}: documents must be a list of strings")
    if n_choices is None:
        n_choices = min(4, len(docs_by_domain))
    _check_task_args(n_items, n_choices, context_chars, continuation_chars)
    if n_choices > len(docs_by_domain):
        raise ValueError(f"n_choices={n_choices} needs at least {n_choices} domains, got {len(docs_by_domain)}")
    rng = random.Random(seed)
    names = list(docs_by_domain)
    contexts, sources = {}, {}
    for name in names:
        docs = docs_by_domain[name]
        cs = [(i, cc[0]) for i, d in enumerate(docs) if (cc := _context(d, context_chars, continuation_chars))]
        rng.shuffle(cs)
        contexts[name] = cs
        sources[name] = [i for i, d in enumerate(docs) if len(d) > continuation_chars + 2]
    pools = [n for n in names if contexts[n] and len(sources[n]) >= 2]
    if not pools:
        raise ValueError("no domain has a document long enough for a context and another to draw a passage from")
    items, cursor = [], {n: 0 for n in names}
    while len(items) < n_items and pools:
        for name in list(pools):
            if len(items) == n_items:
                break
            if cursor[name] >= len(contexts[name]):
                pools.remove(name)
                continue
            i, context = contexts[name][cursor[name]]
            cursor[name] += 1
            docs = docs_by_domain[name]
            truth = None
            for _ in range(20):
                j = rng.choice([j for j in sources[name] if j != i])
                truth = _distractor(rng, docs[j], continuation_chars)
                if truth is not None:
                    break
            others = [n for n in names if n != name and sources[n]]
            if truth is None or len(others) < n_choices - 1:
                continue
            choices = []
            for other in rng.sample(others, len(others)):
                if len(choices) == n_choices - 1:
                    break
                od = docs_by_domain[other]
                for _ in range(20):
                    span = _distractor(rng, od[rng.choice(sources[other])], continuation_chars)
                    if span is not None and span != truth:
                        choices.append(span)
                        break
            if len(choices) < n_choices - 1:
                continue
            answer = rng.randrange(n_choices)
            choices.insert(answer, truth)
            items.append(MCItem(context, choices, answer))
    if not items:
        raise ValueError("could not build any item: the documents are too few or too short")
    return items
