import torch
from conftest import build, tokens
from torch._dynamo.utils import counters

import dynamoq
from dynamoq import DynaMoConfig


def test_quantized_model_compiles_fullgraph_at_decode_shapes_without_graph_breaks():
    m = build("qwen3_moe")
    dynamoq.quantize_(m, DynaMoConfig(expert_bits={0: [2, 3, 4, 8], 1: [8, 6, 4, 3]}, group_size=32))
    assert m.config._experts_implementation == "dynamoq"
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for x in (tokens(m, 1, 1), tokens(m, 4, 1)):   # decode: one new token per sequence
            assert torch.allclose(compiled(x).logits, m(x).logits, atol=1e-4, rtol=1e-4)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] >= 1
