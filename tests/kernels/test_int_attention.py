"""Integer attention matmuls vs their references (Triton under TRITON_INTERPRET=1 on CPU), on
shapes that are not multiples of the block sizes and on strided (transposed) operands."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.quant import QuantSpec, choose_qparams, code_offset, fake_quantize, to_signed_codes
from fxquant.core.quant.logcodes import bitlog2_codes_from_int, bitlog2_input
from fxquant.core.testing import on_device
from fxquant.kernels.bitlog2 import bitlog2_av_ref
from fxquant.kernels.int_attention import (
    bitlog2_av_int,
    int_bmm,
    int_bmm_cpu,
    int_bmm_float64_ref,
    int_bmm_ref,
    log_av,
    log_av_float64_ref,
    log_av_int,
    log_codes_of,
    log_max_shift,
)

BMM_SHAPES = [(1, 1, 16, 16, 16), (2, 3, 17, 40, 33), (1, 4, 50, 32, 50)]  # (B, H, M, K, N)


def _quantized(x: torch.Tensor, spec: QuantSpec):
    s, z = choose_qparams(x.min(), x.max(), spec)
    return to_signed_codes(x, s, z, spec), s, int(z.item()) - code_offset(spec), fake_quantize(x, s, z, spec)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (6, True)])
@pytest.mark.parametrize("shape", BMM_SHAPES)
@pytest.mark.parametrize("transposed_b", [False, True])
def test_int_bmm_equals_integer_reference(bits, symmetric, shape, transposed_b):
    b_, h, m, k, n = shape
    g = torch.Generator().manual_seed(m * k + n)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    qa, sa, za, fa = _quantized(torch.randn(b_, h, m, k, generator=g), spec)
    raw_b = torch.randn(b_, h, n, k, generator=g) + 0.3  # kᵀ as a view, like q·kᵀ in timm
    qb, sb, zb, fb = _quantized(raw_b, spec)
    qb, fb = qb.transpose(-2, -1), fb.transpose(-2, -1)
    if not transposed_b:
        qb = qb.contiguous()
    ref = int_bmm_ref(qa, za, qb, zb)
    expect = ref.to(torch.float32) * (float(sa) * float(sb))  # same epilogue as the kernels
    cpu = int_bmm_cpu(qa, sa, za, qb, sb, zb, bits=(bits, bits))
    tri = on_device(int_bmm, qa, sa, za, qb, sb, zb)
    assert torch.equal(cpu, expect) and torch.equal(tri, expect)
    f64 = int_bmm_float64_ref(qa, sa, za, qb, sb, zb)
    assert torch.allclose(tri.double(), f64, rtol=1e-6, atol=1e-6 * f64.abs().max().item())
    # ... which is the float matmul of the fake-quantized operands
    assert torch.allclose(tri, fa @ fb, rtol=1e-5, atol=1e-5 * f64.abs().max().item())


def test_int_bmm_fp16_output_and_bad_input():
    qa = torch.randint(-128, 128, (2, 20, 24), dtype=torch.int8)
    qb = torch.randint(-128, 128, (2, 24, 18), dtype=torch.int8)
    out = on_device(int_bmm, qa, 0.01, 3, qb, 0.02, -5, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out, (int_bmm_ref(qa, 3, qb, -5).float() * (0.01 * 0.02)).half())
    with pytest.raises(TypeError, match="int8"):
        on_device(int_bmm, qa.int(), 1.0, 0, qb, 1.0, 0)
    with pytest.raises(ValueError, match="do not multiply"):
        on_device(int_bmm, qa, 1.0, 0, qb[:, :20], 1.0, 0)


def _softmax_rows(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, n, n, generator=g) * 3, dim=-1)


@pytest.mark.parametrize("scheme,bits", [("log2", 3), ("log2", 4), ("log_sqrt2", 3), ("log_sqrt2", 4), ("log_sqrt2", 6)])
def test_log_av_accumulators_are_exact_shift_sums(scheme, bits):
    spec = QuantSpec(bits=bits, scheme=scheme)
    p = _softmax_rows(3, 37, bits)
    delta = p.max()
    codes = log_codes_of(p, delta, spec)
    v = torch.randint(-128, 128, (3, 37, 20), generator=torch.Generator().manual_seed(1))
    acc0, acc1 = log_av_int(codes, v, spec)
    # independent formulation: 2^(E - t·c) (parity-split) as exact float64 weights
    e, t = log_max_shift(spec), (1.0 if scheme == "log2" else 0.5)
    live = codes <= spec.qmax
    odd = (codes % 2 == 1) & live if scheme == "log_sqrt2" else torch.zeros_like(live)
    w0 = torch.where(live & ~odd, torch.exp2(e - t * codes.double()), torch.zeros((), dtype=torch.float64))
    w1 = torch.where(odd, torch.exp2(e - t * (codes.double() + 1)), torch.zeros((), dtype=torch.float64))
    assert torch.equal(acc0.double(), w0 @ v.double()) and torch.equal(acc1.double(), w1 @ v.double())
    # and A·v equals the float product of the dequantized log codes within fp32 rounding
    s_v = 0.05
    out, ref = log_av(codes, delta, v, s_v, spec), log_av_float64_ref(codes, delta, v, s_v, spec)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    fq = fake_quantize(p, delta, torch.zeros(()), spec)
    assert torch.allclose(out, fq @ (v.float() * s_v), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_log_zero_code_contributes_nothing():
    spec = QuantSpec(bits=4, scheme="log_sqrt2")
    codes = torch.full((1, 4, 4), spec.zero_code)
    acc0, acc1 = log_av_int(codes, torch.randint(-8, 8, (1, 4, 3)), spec)
    assert not acc0.any() and not acc1.any()


def test_log_av_rejects_levels_beyond_the_shift_width():
    spec = QuantSpec(bits=8, scheme="log_sqrt2")
    with pytest.raises(ValueError, match="2\\^-128"):
        log_av_int(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), spec)
    with pytest.raises(TypeError, match="integer v"):
        log_av_int(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), QuantSpec(bits=4, scheme="log2"))


@pytest.mark.parametrize("variant", ["single16", "single17", "half16", "half17"])
def test_bitlog2_av_int_equals_shift_reference(variant):
    p = _softmax_rows(2, 29, 7)
    codes = bitlog2_codes_from_int(bitlog2_input(p, variant), variant)
    spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=variant)
    assert torch.equal(log_codes_of(p, torch.tensor(1.0), spec), codes.long())
    v = torch.randint(-128, 128, (2, 29, 24), generator=torch.Generator().manual_seed(2))
    assert torch.equal(bitlog2_av_int(codes, v, variant), bitlog2_av_ref(codes, v, variant))


@pytest.mark.parametrize("variant", ["half16", "half17", "single16"])
def test_bitlog2_av_from_integer_inputs_equals_the_code_path(variant):
    from fxquant.core.quant.logcodes import bitlog2_codes_from_int
    from fxquant.core.quant.spec import BITLOG2_VARIANTS
    from fxquant.kernels.int_attention import bitlog2_av_from_input

    m, _ = BITLOG2_VARIANTS[variant]
    g = torch.Generator().manual_seed(m)
    n = torch.randint(0, m, (2, 3, 17, 23), generator=g, dtype=torch.int32)
    n.view(-1)[:m if m < n.numel() else n.numel()] = torch.arange(min(m, n.numel()), dtype=torch.int32)  # every level
    v = torch.randint(-255, 256, (2, 3, 23, 8), generator=g, dtype=torch.int32)
    codes = bitlog2_codes_from_int(n, variant)
    assert torch.equal(bitlog2_av_from_input(n, v, variant), bitlog2_av_int(codes, v, variant))


@pytest.mark.parametrize("scheme", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("bits", [3, 4])
def test_log_av_from_ratio_equals_the_code_path(scheme, bits):
    from fxquant.core.quant.logcodes import log_codes
    from fxquant.kernels.int_attention import log_av_from_ratio

    spec = QuantSpec(bits=bits, scheme=scheme)
    g = torch.Generator().manual_seed(bits)
    attn = torch.softmax(torch.randn(2, 3, 19, 19, generator=g) * 3, dim=-1)
    attn.view(-1)[:5] = torch.tensor([0.0, 1.0, 1e-30, 0.5, 0.25])
    ratio = attn / 0.9
    v = torch.randint(-255, 256, (2, 3, 19, 8), generator=g, dtype=torch.int32)
    expect = log_av(log_codes(ratio, spec), 0.9, v, 0.03, spec)
    assert torch.equal(log_av_from_ratio(ratio, 0.9, v, 0.03, spec), expect)
