"""BitLog2 Triton kernels vs their integer references (TRITON_INTERPRET=1 on CPU in CI), on
irregular shapes; and the integer A·v against the fake-quantized graph."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.quant import pack_int4, unpack_int4
from fxquant.core.quant.spec import BITLOG2_VARIANTS
from fxquant.core.testing import on_device
from fxquant.kernels.bitlog2 import (
    bitlog2_av,
    bitlog2_av_float64_ref,
    bitlog2_av_ref,
    bitlog2_codes_ref,
    softmax_bitlog2_codes,
)

VARIANTS = list(BITLOG2_VARIANTS)
SHAPES = [(1, 1, 1), (2, 3, 13), (1, 2, 65)]  # (batch, heads, tokens): 1, odd, CIFAR ViT's 65


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_bit_identical(variant, shape):
    g = torch.Generator().manual_seed(sum(shape))
    b, h, n = shape
    scores = torch.randn(b, h, n, n, generator=g) * 3
    ref = bitlog2_codes_ref(scores, variant)
    got = on_device(softmax_bitlog2_codes, scores, variant, pack=False)
    assert got.dtype == torch.int8 and torch.equal(got.to(torch.int32), ref)
    probs = torch.softmax(scores, -1)  # codes from given probabilities: same rule, no softmax
    assert torch.equal(on_device(softmax_bitlog2_codes, probs, variant, pack=False, from_logits=False).to(torch.int32),
                       bitlog2_codes_ref(probs, variant, from_logits=False))
    if variant.endswith("16"):
        packed = on_device(softmax_bitlog2_codes, scores, variant)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == (n + 1) // 2
        assert torch.equal(packed, pack_int4(ref, signed=False))
        assert torch.equal(unpack_int4(packed, n, signed=False).to(torch.int32), ref)


def test_pack_round_trip_and_range_check():
    c = torch.randint(0, 16, (3, 7, 11), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(c, signed=False), 11, signed=False).to(torch.int32), c)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16]), signed=False)
    with pytest.raises(ValueError, match="17 levels"):
        on_device(softmax_bitlog2_codes, torch.randn(2, 4), "half17", pack=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 13, 5), (1, 2, 65, 32)])
def test_integer_av_equals_reference(variant, shape):
    b, h, n, d = shape
    g = torch.Generator().manual_seed(n + d)
    scores = torch.randn(b, h, n, n, generator=g) * 2
    v8 = torch.randint(-128, 128, (b, h, n, d), generator=g, dtype=torch.int8)  # signed 8-bit codes of v
    zp = 37
    v = v8.to(torch.int32) - zp  # values minus zero point: int32, re-centred into int8 by the wrapper
    codes = bitlog2_codes_ref(scores, variant)
    ref = bitlog2_av_ref(codes, v, variant)
    assert torch.equal(ref.double(), bitlog2_av_float64_ref(codes, v, variant))  # shifts == D·v
    got = on_device(bitlog2_av, codes.to(torch.int8), v, variant, packed=False)
    assert got.dtype == torch.int32 and torch.equal(got.to(torch.int64), ref)
    # int8 codes with their zero point (the lowered form): the same sums
    assert torch.equal(on_device(bitlog2_av, codes.to(torch.int8), v8, variant, v_zp=zp, packed=False).to(torch.int64), ref)
    if variant.endswith("16"):
        assert torch.equal(on_device(bitlog2_av, pack_int4(codes, signed=False), v, variant).to(torch.int64), ref)
        assert torch.equal(on_device(bitlog2_av, pack_int4(codes, signed=False), v8, variant, v_zp=zp).to(torch.int64), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_level_planes_decompose_every_level(variant):
    """The digit planes the A·v kernel multiplies: 7-bit digits of every level recombine to it, and
    their count (int8 GEMMs per key block) is 2 for the half variants, 3 for the single ones."""
    from fxquant.core.quant.logcodes import bitlog2_level_table
    from fxquant.kernels.bitlog2 import level_planes

    levels = bitlog2_level_table(variant).to(torch.int64)
    p = level_planes(variant)
    assert p == (2 if variant.startswith("half") else 3)
    digits = [(levels >> (7 * i)) & 127 for i in range(p)]
    assert all(int(dg.max()) <= 127 for dg in digits)
    assert torch.equal(sum(dg << (7 * i) for i, dg in enumerate(digits)), levels)


def test_av_rejects_float_v_and_bad_shapes():
    codes = torch.zeros(1, 4, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="integer v"):
        on_device(bitlog2_av, codes, torch.randn(1, 4, 2), "half17")
    with pytest.raises(ValueError, match="do not fit"):
        on_device(bitlog2_av, codes, torch.zeros(1, 5, 2, dtype=torch.int32), "half17")
    with pytest.raises(ValueError, match=r"v spans \[-200, 100\], more than the 256 values of int8 codes"):
        on_device(bitlog2_av, codes, torch.tensor([-200, 100, 0, 0]).reshape(1, 4, 1).to(torch.int32), "half17")
    with pytest.raises(ValueError, match="overflow the int32 accumulator"):
        big = torch.zeros(1, 2**16, 1, dtype=torch.int8)  # 65536 keys × 2^15 levels
        from fxquant.kernels.bitlog2 import av_int32_fits
        assert not av_int32_fits(big.shape[1], "single17")
        on_device(bitlog2_av, torch.zeros(1, 2**16, 1, dtype=torch.int8).expand(1, 2**16, 2**16), big, "single17", packed=False)


def test_integer_av_matches_fake_quant_graph(cifar_compiled, cifar_data):
    """On the real model: the A·v matmul of the bitlog2-w4a4 graph equals the integer path
    (Σ_j D_j·(q_v,j - z_v) in integers, then × s_v/δ) within fp32 rounding of the float matmul."""
    from fxquant.core import match
    from fxquant.core.quant import quantize

    calib, x, _ = cifar_data
    q = cifar_compiled("bitlog2-w4a4")
    mods = dict(q.named_modules())
    att = match.find_attention(q, mods)[2]
    a_fq, v_fq = mods[att.av.args[0].target], mods[att.av.args[1].target]
    seen = {}

    class _Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is att.av.args[0]:
                seen["a"] = self.env[n.args[0]]  # softmax output entering the BitLog2 quantizer
            elif n is att.av.args[1]:
                seen["v"] = self.env[n.args[0]]
            elif n is att.av:
                seen["av"] = out
            return out

    with torch.no_grad():
        _Capture(q).run(x[:8])
    variant = a_fq.spec.bitlog2_variant
    codes = bitlog2_codes_ref(seen["a"], variant, from_logits=False)
    v_int = (quantize(seen["v"], v_fq.scale, v_fq.zero_point, v_fq.spec) - v_fq.zero_point).to(torch.int32)
    acc = on_device(bitlog2_av, codes.to(torch.int8), v_int, variant, packed=False)
    assert torch.equal(acc.to(torch.int64), bitlog2_av_ref(codes, v_int, variant))
    integer_path = acc.double() * (v_fq.scale.double() / a_fq.scale.double())
    float_path = seen["av"].double()
    assert torch.allclose(integer_path, float_path, rtol=1e-5, atol=1e-6 * float_path.abs().max().item())
