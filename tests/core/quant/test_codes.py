"""The integer storage of codes (``fxquant.core.quant.codes``): signed offset and int4 packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.core.quant import QuantSpec, choose_qparams, code_offset, pack_int4, quantize, to_signed_codes, unpack_int4


@settings(max_examples=300, deadline=None)
@given(signed=st.booleans(), lead=st.lists(st.integers(0, 4), max_size=3), n=st.integers(1, 17), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(signed, lead, n, seed):
    lo, hi = (-8, 7) if signed else (0, 15)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, (*lead, n), generator=g, dtype=torch.int8)
    packed = pack_int4(codes, signed=signed)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, (n + 1) // 2)
    out = unpack_int4(packed, n, signed=signed)
    assert out.dtype == torch.int8 and torch.equal(out, codes)
    if n % 2 == 0:  # the default length is every nibble
        assert torch.equal(unpack_int4(packed, signed=signed), codes)
    else:  # the odd tail is padded with a 0 code
        assert torch.equal(unpack_int4(packed, signed=signed)[..., n], torch.zeros(lead, dtype=torch.int8))


def test_byte_layout_even_index_in_low_nibble():
    assert pack_int4(torch.tensor([1, -1, -8, 7]), signed=True).tolist() == [0xF1, 0x78]
    assert pack_int4(torch.tensor([[1, 2, 15]]), signed=False).tolist() == [[0x21, 0x0F]]
    assert unpack_int4(torch.tensor([0xF1], dtype=torch.uint8), signed=True).tolist() == [1, -1]
    assert unpack_int4(torch.tensor([0xF1], dtype=torch.uint8), signed=False).tolist() == [1, 15]


@pytest.mark.parametrize("signed,bad", [(True, -9), (True, 8), (False, -1), (False, 16)])
def test_pack_range_errors(signed, bad):
    ok = torch.tensor([0, 3, bad])
    with pytest.raises(ValueError, match=r"\[-8, 7\]" if signed else r"\[0, 15\]"):
        pack_int4(ok, signed=signed)


def test_unpack_length_errors():
    packed = torch.zeros(2, 3, dtype=torch.uint8)
    assert unpack_int4(packed, 5, signed=True).shape == (2, 5)
    for n in (4, 7):
        with pytest.raises(ValueError, match="hold 5 or 6 codes"):
            unpack_int4(packed, n, signed=False)


def test_pack_empty():
    assert pack_int4(torch.zeros(3, 0, dtype=torch.int8), signed=True).shape == (3, 0)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_signed_codes_are_the_codes_minus_the_offset(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.randn(300, generator=torch.Generator().manual_seed(bits)) * 3
    s, z = choose_qparams(x.min(), x.max(), spec)
    c = to_signed_codes(x, s, z, spec)
    assert code_offset(spec) == (0 if symmetric else 2 ** (bits - 1))
    assert c.dtype == torch.int8 and torch.equal(c.to(torch.float32), quantize(x, s, z, spec) - code_offset(spec))
    assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1  # always a signed b-bit integer
