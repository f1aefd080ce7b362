import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_products(request, monkeypatch):
    """Tests compare quantized models with their dequantized weights to float rounding: they run the exact
    paths (x in fp32). The native kernel (int8 x) has its own tests: marked `native`, or through the
    decode_mode fixture, which sets kernels.NATIVE itself."""
    if "native" not in request.keywords:
        from dynamoq import kernels
        monkeypatch.setattr(kernels, "NATIVE", False)


def build(model_type: str, dtype=torch.float32):
    """A tiny random model of one family, as users build one from a config."""
    from transformers import AutoModelForCausalLM

    from families import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).to(dtype).eval()


def tokens(model, batch=2, length=8):
    return torch.randint(0, model.config.get_text_config().vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def experts_calls(model, x):
    """Inputs and outputs of every experts call in one forward: [(block index, args, kwargs, out)]
    (a looped model calls the same experts module more than once)."""
    import dynamoq
    calls, handles = [], []
    for i, b in enumerate(dynamoq.moe_blocks(model)):
        hook = lambda m, a, k, out, i=i: calls.append((i, a, k, out))  # noqa: E731
        handles.append(b.experts.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return calls


def experts_errors(model, calls):
    """Relative error of each experts call of `model` on exactly the inputs recorded by
    experts_calls (so a routing decision flipped by a tiny change cannot hide or fake an error)."""
    import dynamoq
    blocks = dynamoq.moe_blocks(model)
    with torch.no_grad():
        return [((blocks[i].experts(*a, **k) - ref).norm() / ref.norm()).item() for i, a, k, ref in calls]
