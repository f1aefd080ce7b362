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


def build(model_type: str, dtype=torch.float32):
    """A tiny random model of one family, as users build one from a config."""
    from transformers import AutoModelForCausalLM

    from families import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).to(dtype).eval()


def tokens(model, batch=2, length=8):
    return torch.randint(0, model.config.get_text_config().vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
