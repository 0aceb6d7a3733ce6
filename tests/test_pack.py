"""Bit packing (FORMAT.md "Bit-packed integers"): layout, round trips, and refusals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from athena_runtime.format.bits import pack_bits, packed_width, unpack_bits


def reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The spec, literally: one little-endian bit stream per row."""
    R, C = values.shape
    out = torch.zeros(R, (C * bits + 7) // 8, dtype=torch.uint8)
    for r in range(R):
        for c in range(C):
            v = int(values[r, c])
            for t in range(bits):
                if (v >> t) & 1:
                    pos = c * bits + t
                    out[r, pos // 8] |= 1 << (pos % 8)
    return out


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_layout_matches_spec(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (3, 11), generator=g)
    values[0, 0], values[1, -1] = 0, (1 << bits) - 1
    assert torch.equal(pack_bits(values, bits), reference_pack(values, bits))


def test_known_bytes():
    # 3-bit values 1, 2, 3 -> stream 100 010 110 (LSB first) -> byte 0b11010001 = 209, then a zero-padded byte
    assert pack_bits(torch.tensor([[1, 2, 3]]), 3).tolist() == [[209, 0]]
    assert pack_bits(torch.tensor([[0xABC, 0x123]]), 12).tolist() == [[0xBC, 0x3A, 0x12]]


@pytest.mark.parametrize("bits", [4, 6, 8, 12])  # n = 16, 64, 256, 4096 centroids
@pytest.mark.parametrize("C", [1, 7, 33, 101, 288])
def test_round_trip(bits, C):
    g = torch.Generator().manual_seed(bits * 1000 + C)
    values = torch.randint(0, 1 << bits, (5, C), generator=g)
    values[:, 0] = (1 << bits) - 1
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(C, bits))
    out = unpack_bits(packed, bits, C)
    assert out.dtype == torch.int64 and torch.equal(out, values)


def test_int32_and_uint8_inputs_and_empty():
    v = torch.tensor([[5, 0, 7]], dtype=torch.int32)
    assert torch.equal(unpack_bits(pack_bits(v, 3), 3, 3), v.long())
    assert torch.equal(pack_bits(v.to(torch.uint8), 3), pack_bits(v, 3))
    assert pack_bits(torch.zeros(0, 4, dtype=torch.long), 5).shape == (0, 3)
    assert unpack_bits(torch.zeros(2, 0, dtype=torch.uint8), 5, 0).shape == (2, 0)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 16), R=st.integers(1, 4), C=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_round_trip_property(bits, R, C, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (R, C), generator=g)
    assert torch.equal(unpack_bits(pack_bits(values, bits), bits, C), values)


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="range"):
        pack_bits(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="range"):
        pack_bits(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_bits(torch.tensor([1, 2]), 4)
    for bits in (0, 17, 2.5):
        with pytest.raises(ValueError, match="bits"):
            pack_bits(torch.tensor([[1]]), bits)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, 4, dtype=torch.int32), 4, 7)
    bad = pack_bits(torch.tensor([[1, 2, 3]]), 3)
    bad[0, 1] = 0x80  # a padding bit set
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(bad, 3, 3)
