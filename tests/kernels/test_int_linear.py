"""Integer linear kernels vs their references under TRITON_INTERPRET=1 (CPU), on shapes that are
not multiples of the block sizes: codes bit-identical, GEMMs equal to the int64 reference exactly
(same float epilogue), and to the float64 dequantized product within fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.quant import QuantSpec, choose_qparams, pack_int4, to_signed_codes, unpack_int4
from fxquant.core.testing import on_device
from fxquant.kernels.int_linear import (
    int_linear,
    int_linear_cpu,
    int_linear_float64_ref,
    int_linear_ref,
    per_token_qparams,
    quantize_act,
)

SHAPES = [(1, 16, 8), (33, 48, 40), (65, 130, 17)]  # (M, K, N)


@pytest.mark.parametrize("bits,symmetric,pack", [(8, False, False), (8, True, False), (6, False, False), (4, False, False),
                                                 (4, False, True), (4, True, True)])
@pytest.mark.parametrize("m,k", [(1, 16), (33, 48), (7, 130)])
def test_activation_quantization_bit_identical(bits, symmetric, pack, m, k):
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g) * 2
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    s, z = choose_qparams(x.min(), x.max(), spec)
    codes, _, zp = on_device(quantize_act, x, spec, s, z, pack=pack)
    ref = to_signed_codes(x, s, z, spec)
    if pack:
        assert codes.dtype == torch.uint8 and torch.equal(codes, pack_int4(ref, signed=True))
        assert torch.equal(unpack_int4(codes, k, signed=True), ref)
    else:
        assert codes.dtype == torch.int8 and torch.equal(codes, ref)
    assert zp.item() == z.item() - (0 if symmetric else 2 ** (bits - 1))


def test_per_token_quantization_bit_identical():
    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 5, 37)[:, None]
    codes, scale, zp = on_device(quantize_act, x, QuantSpec(bits=8, symmetric=True), per_token=True)
    s_ref, _ = per_token_qparams(x, 8)
    assert torch.equal(scale, s_ref) and torch.equal(zp, torch.zeros(37, dtype=torch.int32))
    assert torch.equal(codes, to_signed_codes(x, s_ref[:, None], torch.zeros(37, 1), QuantSpec(bits=8, symmetric=True)))


def _operands(m, k, n, a_bits, w_bits, seed):
    g = torch.Generator().manual_seed(seed)
    lo_a, lo_w = -(2 ** (a_bits - 1)), -(2 ** (w_bits - 1))
    a = torch.randint(lo_a, -lo_a, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(lo_w, -lo_w, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    w_zp = torch.randint(-3, 4, (n,), generator=g, dtype=torch.int32)
    bias = torch.randn(n, generator=g)
    return a, w, w_scale, w_zp, bias


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("kind", ["w8a8", "w4a8", "w4a4"])
@pytest.mark.parametrize("weight_zp", ["asymmetric", "symmetric"])  # the kernel skips A's row sums without weight zero points
def test_int_gemm_equals_integer_reference(kind, m, k, n, weight_zp):
    a_bits, w_bits = {"w8a8": (8, 8), "w4a8": (8, 4), "w4a4": (4, 4)}[kind]
    a, w, ws, wz, bias = _operands(m, k, n, a_bits, w_bits, seed=m + k + n)
    if weight_zp == "symmetric":
        wz = torch.zeros_like(wz)
    a_scale, a_zp = torch.tensor(0.037), torch.tensor(5)
    a_in = pack_int4(a, signed=True) if a_bits == 4 else a
    w_in = pack_int4(w, signed=True) if w_bits == 4 else w
    got = on_device(int_linear, a_in, a_scale, a_zp, w_in, ws, wz, bias, k=k, a_packed=a_bits == 4, w_packed=w_bits == 4)
    ref = int_linear_ref(a, a_scale, a_zp, w, ws, wz, bias)
    assert torch.equal(got, ref), (got - ref).abs().max()  # int32 accumulation is exact; same float epilogue
    f64 = int_linear_float64_ref(a, a_scale, a_zp, w, ws, wz, bias)
    assert torch.allclose(got.double(), f64, rtol=1e-6, atol=1e-6 * f64.abs().max().item())


def test_per_row_activation_scales_and_fp16_output():
    a, w, ws, wz, bias = _operands(20, 64, 24, 8, 8, seed=1)
    sa = torch.rand(20) * 0.05
    za = torch.zeros(20, dtype=torch.int32)
    got = on_device(int_linear, a, sa, za, w, ws, wz, bias, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    ref = int_linear_ref(a, sa, za, w, ws, wz, bias).half()
    assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()


def test_cpu_integer_path_equals_reference():
    """Every epilogue branch: per-tensor or per-row activation scale/zero point, asymmetric or
    symmetric (all-zero) weight zero points, with and without bias, given or computed column sums."""
    for m, k, n in SHAPES:
        a, w, ws, wz, bias = _operands(m, k, n, 8, 8, seed=k)
        g = torch.Generator().manual_seed(m)
        rows_s, rows_z = torch.rand(m, generator=g) * 0.05 + 0.01, torch.randint(-20, 20, (m,), generator=g)
        for sa, za in ((0.02, 7), (torch.tensor(0.02), torch.tensor(-3)), (rows_s, rows_z)):
            for wz_ in (wz, torch.zeros_like(wz)):
                for b in (bias, None):
                    ref = int_linear_ref(a, sa, za, w, ws, wz_, b)
                    assert torch.equal(int_linear_cpu(a, sa, za, w, ws, wz_, b), ref)
                    assert torch.equal(int_linear_cpu(a, sa, za, w, ws, wz_, b, w_colsum=w.to(torch.int32).sum(1)), ref)


def test_pack_round_trip_and_errors():
    c = torch.randint(-8, 8, (5, 6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(c, signed=True), signed=True), c)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8]), signed=True)
    odd = pack_int4(torch.zeros(3, 5, dtype=torch.int8), signed=True)  # packs (tail padded), but the GEMM needs an even K
    with pytest.raises(ValueError, match="inner dimensions|even K"):
        on_device(int_linear, odd, torch.tensor(1.0), torch.tensor(0), odd, torch.ones(3), torch.zeros(3), k=5,
                  a_packed=True, w_packed=True)
    with pytest.raises(ValueError, match="inner dimensions"):
        on_device(int_linear, torch.zeros(2, 16, dtype=torch.int8), torch.tensor(1.0), torch.tensor(0),
                  torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.zeros(4))


def test_autotune_switch_and_known_good_configs(monkeypatch):
    """``FXQUANT_AUTOTUNE=0`` picks one config per shape class; every class's tile is legal for an
    int8 ``tl.dot`` (powers of two, ≥ 16) and no wider than the problem needs; the interpreter runs
    the small-M class's config exactly."""
    from fxquant.kernels.int_linear import autotune_enabled, known_good_gemm_config

    monkeypatch.setenv("FXQUANT_AUTOTUNE", "0")
    assert not autotune_enabled()
    monkeypatch.setenv("FXQUANT_AUTOTUNE", "1")
    assert autotune_enabled()
    for m, n, k in [(1, 384, 384), (197, 2304, 768), (1576, 768, 3072), (12608, 3072, 768), (50, 10, 20)]:
        cfg = known_good_gemm_config(m, n, k)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            size = cfg.kwargs[key]
            assert size >= 16 and size & (size - 1) == 0, (m, n, k, cfg)
        assert cfg.kwargs["BLOCK_N"] <= max(16, 2 * n) and cfg.kwargs["BLOCK_K"] <= max(32, 2 * k)
    a, w, ws, wz, bias = _operands(5, 40, 24, 4, 4, seed=7)
    cfg = known_good_gemm_config(5, 24, 40)
    blocks = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"])
    got = on_device(int_linear, pack_int4(a, signed=True), torch.tensor(0.05), torch.tensor(1), pack_int4(w, signed=True),
                    ws, wz, bias, k=40, a_packed=True, w_packed=True, blocks=blocks)
    assert torch.equal(got, int_linear_ref(a, torch.tensor(0.05), torch.tensor(1), w, ws, wz, bias))
