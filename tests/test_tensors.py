import copy

import pytest
import torch
import torch.nn.functional as F

from dynamoq import DynaMoExperts, QuantizationError, SwitchableLinear
from dynamoq.packing import OVERHEAD_BITS_PER_GROUP, dequantize, quantize_rtn

MIXED = (2, 3, 4, 6, 8, 4)


def _experts(transposed=False, dtype=torch.float32):
    w = torch.randn(len(MIXED), 48, 128, dtype=dtype)
    w = w.transpose(-1, -2).contiguous() if transposed else w
    return w, DynaMoExperts.from_float(w, MIXED, 64, transposed=transposed)


def test_each_expert_is_quantized_at_its_own_width():
    w, t = _experts()
    assert t.shape == w.shape and t.expert_bits == MIXED
    deq = t.dequantize()
    for e, b in enumerate(MIXED):
        assert torch.equal(deq[e], dequantize(*quantize_rtn(w[e], b, 64)))
        assert int(t.codes()[e].max()) < (1 << b)


def test_storage_is_measured_from_the_real_tensors():
    _, t = _experts()
    n, k, g = 48, 128, 64
    expected_bits = sum(b * n * k + OVERHEAD_BITS_PER_GROUP * n * k // g for b in MIXED)
    assert t.storage_bytes() * 8 == expected_bits
    held = sum(x.untyped_storage().nbytes() for x in (t.scale, t.zero, t.q2, t.q3, t.q4, t.q6, t.q8))
    assert held == t.storage_bytes()
    assert t.q4.shape == (2, n, k * 4 // 8)  # two experts with 4 bits


@pytest.mark.parametrize("transposed", [False, True])
def test_select_and_index_see_the_dequantized_weights(transposed):
    w, t = _experts(transposed)
    deq = t.dequantize()
    assert deq.shape == w.shape
    assert torch.equal(t[3], deq[3])
    ids = torch.tensor([5, 0, 2, 2])
    assert torch.equal(t[ids], deq[ids])
    assert torch.equal(t.transpose(-1, -2), deq.transpose(-1, -2))


def test_dequantized_once_dequantizes_each_weight_once_inside_the_block(monkeypatch):
    from dynamoq import tensors
    _, t = _experts()
    _, other = _experts()
    calls = []
    real = DynaMoExperts.dequantize
    monkeypatch.setattr(DynaMoExperts, "dequantize", lambda self, *a: calls.append(self) or real(self, *a))
    expected = real(t).transpose(-1, -2)
    with tensors.dequantized_once():
        for _ in range(3):
            assert torch.equal(t.transpose(-1, -2), expected)
        other.transpose(-1, -2)
    assert [id(c) for c in calls] == [id(t), id(other)]
    t.transpose(-1, -2)                      # outside the block: dequantized again, nothing kept
    assert [id(c) for c in calls] == [id(t), id(other), id(t)] and tensors._ONCE is None


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_linear_matches_a_dense_reference(transposed):
    _, t = _experts(transposed)
    ids = torch.tensor([0, 5, 3, 3, 1])
    x = torch.randn(5, 128)
    w_nk = t.dequantize_nk()
    ref = torch.einsum("snk,sk->sn", w_nk[ids], x)
    assert torch.allclose(t.expert_linear(x, ids), ref, atol=1e-4)


def test_deepcopy_to_and_state_dict():
    _, t = _experts()
    c = copy.deepcopy(t)
    assert torch.equal(c.dequantize(), t.dequantize()) and c.q3.data_ptr() != t.q3.data_ptr()
    b = t.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b.q8, t.q8)
    assert torch.equal(b.dequantize(), t.dequantize().bfloat16())
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(t, requires_grad=False)
    sd = m.state_dict()
    assert isinstance(sd["w"], DynaMoExperts) and sd["w"].expert_bits == MIXED


def test_switchable_linear_runs_as_a_linear_weight():
    lin = torch.nn.Linear(128, 32)
    ref = lin(torch.ones(2, 128))
    lin.weight = torch.nn.Parameter(SwitchableLinear.from_float(lin.weight.data, 8, 64), requires_grad=False)
    assert lin.weight.shape == (32, 128) and lin.weight.bits == 8
    assert torch.allclose(lin(torch.ones(2, 128)), ref, atol=1e-2)
    assert torch.allclose(F.linear(torch.ones(1, 128), lin.weight), lin.weight.dequantize().sum(1)[None], atol=1e-4)


def test_bad_shapes_are_refused():
    with pytest.raises(QuantizationError, match="not divisible"):
        DynaMoExperts.from_float(torch.randn(2, 8, 96), (4, 4), 64)
    with pytest.raises(QuantizationError, match="2 bit-widths for 3 experts"):
        DynaMoExperts.from_float(torch.randn(3, 8, 64), (4, 4), 64)
    with pytest.raises(QuantizationError, match="not supported"):
        DynaMoExperts.from_float(torch.randn(2, 8, 64), (4, 5), 64)
