import pytest
import torch

from dynamoq import QuantizationError
from dynamoq.packing import BITS, check_group, dequantize, lanes, pack, quantize_rtn, storage_bits, unpack


@pytest.mark.parametrize("group_size", [8, 32, 64, 128, 192])
@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_is_exact_and_uses_bits_per_code(bits, group_size):
    k = 3 * group_size if group_size != 8 else 256
    codes = torch.randint(0, 1 << bits, (3, 5, k))
    packed = pack(codes, bits, group_size)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, k * bits // 8)
    assert torch.equal(unpack(packed, bits, group_size), codes.int())


def test_pack_extreme_codes():
    for bits in BITS:
        for v in (0, (1 << bits) - 1):
            codes = torch.full((2, 64), v)
            assert torch.equal(unpack(pack(codes, bits, 64), bits, 64), codes.int())


@pytest.mark.parametrize("group_size,expected", [(8, 1), (32, 4), (64, 8), (128, 16), (192, 8), (256, 16)])
def test_lanes_fill_whole_chunks_of_every_plane(group_size, expected):
    assert lanes(group_size) == expected
    for width in (1, 2, 4, 8):
        assert (group_size * width // 8) % lanes(group_size) == 0


def test_layout_keeps_each_part_of_a_chunk_contiguous():
    """Byte l of chunk h of a 2-bit plane holds inputs h*4*L + p*L + l at bits 2p (packing.py's layout):
    a code set at one input shows up in exactly that byte and those bits."""
    gs = 128
    lane = lanes(gs)                                       # 16
    for h, p, l in [(0, 0, 0), (0, 3, 5), (1, 2, 15), (1, 1, 7)]:
        codes = torch.zeros(1, gs, dtype=torch.int32)
        codes[0, h * 4 * lane + p * lane + l] = 3
        packed = pack(codes, 2, gs)[0]
        assert packed.nonzero().flatten().tolist() == [h * lane + l]
        assert int(packed[h * lane + l]) == 3 << (2 * p)


def test_pack_refuses_rows_that_are_not_whole_groups():
    with pytest.raises(QuantizationError, match="group_size"):
        pack(torch.zeros(2, 100, dtype=torch.int32), 4, 64)


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


@pytest.mark.parametrize("bits", BITS)
def test_searched_grid_never_errs_more_than_the_full_range(bits):
    """The search tries the full range (quantize_rtn's grid) first: per group its |error|^4 is never larger;
    on heavy-tailed weights at 2 and 3 bits it clips (a smaller scale) and errs less on average (at 6 and 8
    bits the full range wins every group of this sample)."""
    from dynamoq.packing import quantize_searched
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((4, 16, 256)) * 0.02
    def err4(q):
        return (dequantize(*q) - w).pow(4).unflatten(-1, (4, 64)).sum(-1)               # [4, 16, 4] per group
    rtn, searched = quantize_rtn(w, bits, 64), quantize_searched(w, bits, 64)
    assert searched[0].min() >= 0 and searched[0].max() < (1 << bits)
    assert searched[1].dtype == rtn[1].dtype and searched[2].dtype == rtn[2].dtype
    assert (err4(searched) <= err4(rtn) * (1 + 1e-3) + 1e-12).all()
    if bits <= 3:
        assert err4(searched).mean() < 0.9 * err4(rtn).mean()
        assert (searched[1].float() < rtn[1].float() - 1e-6).any()


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


@pytest.mark.parametrize("group_size", [32, 64, 128, 192])
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_packed_equals_unpack_then_dequantize(bits, group_size):
    from dynamoq.packing import dequantize_packed
    w = torch.randn(2, 6, 2 * group_size)
    codes, scale, zero = quantize_rtn(w, bits, group_size)
    packed = pack(codes, bits, group_size)
    ref = dequantize(unpack(packed, bits, group_size), scale, zero)
    assert torch.equal(dequantize_packed(packed, bits, scale, zero, group_size), ref)
