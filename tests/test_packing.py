import pytest
import torch

from dynamoq import QuantizationError
from dynamoq.packing import BITS, check_group, dequantize, pack, quantize_rtn, storage_bits, unpack


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_is_exact_and_uses_bits_per_code(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 256))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, 256 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes.int())


def test_pack_extreme_codes():
    for bits in BITS:
        for v in (0, (1 << bits) - 1):
            codes = torch.full((2, 64), v)
            assert torch.equal(unpack(pack(codes, bits), bits), codes.int())


@pytest.mark.parametrize("bits", BITS)
def test_rtn_error_is_within_one_step(bits):
    w = torch.randn(4, 16, 256)
    codes, scale, zero = quantize_rtn(w, bits, 64)
    assert codes.min() >= 0 and codes.max() < (1 << bits)
    err = (dequantize(codes, scale, zero) - w).abs().unflatten(-1, (4, 64))
    # half a step of rounding, plus the rounding of the zero point and of the float16 scale
    assert (err <= scale.float().unsqueeze(-1) + 1e-4).all()
    assert err.mean() < 0.3 * scale.float().mean()


def test_error_falls_as_bits_rise():
    w = torch.randn(8, 64, 256)
    errs = [(dequantize(*quantize_rtn(w, b, 128)) - w).pow(2).mean().item() for b in BITS]
    assert errs == sorted(errs, reverse=True)


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(2, 128)
    w[1] = 0.37
    assert torch.allclose(dequantize(*quantize_rtn(w, 2, 128)), w, atol=1e-3)


def test_storage_bits_formula():
    assert storage_bits(4, 128) == 4 + 24 / 128
    assert storage_bits(3, 64) == 3 + 24 / 64


@pytest.mark.parametrize("bits", [1, 5, 7, 16, "4"])
def test_unknown_bit_width_is_refused(bits):
    with pytest.raises(QuantizationError, match="not supported"):
        quantize_rtn(torch.randn(4, 128), bits, 128)


def test_group_that_does_not_divide_is_refused_with_a_hint():
    with pytest.raises(QuantizationError, match="not divisible by group_size=128.*e.g. 32"):
        check_group(96, 128)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        check_group(96, 12)
