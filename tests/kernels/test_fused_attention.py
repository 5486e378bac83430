"""Fused lowered attention (q·kᵀ → softmax → A's codes → A·v in one Triton kernel) against the
unfused integer path, under TRITON_INTERPRET=1 on CPU, on shapes that are not block multiples.

Exactness: the A·v sums the kernel returns equal the integer reference *on the codes it formed*
bit for bit; those codes equal the unfused path's (``torch.softmax`` + the quantizer core) except
where the float softmax (summed in another order) puts a probability within 1e-5 (relative) of a
code boundary."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.quant import QuantSpec, code_offset, to_signed_codes
from fxquant.core.quant.logcodes import bitlog2_codes_from_int, bitlog2_input, bitlog2_level_table
from fxquant.core.testing import on_device
from fxquant.kernels.fused_attention import fused_attention, fused_attention_ref

A_SPECS = {
    "half17": (QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half17"), 330.0, 0.0),
    "half16": (QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half16"), 240.0, 0.0),
    "single17": (QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="single17"), 49131.0, 0.0),
    "uniform8": (QuantSpec(bits=8), 1 / 255, 0.0),
    "uniform4-asym": (QuantSpec(bits=4), 0.021, 2.0),
}
SHAPES = [(1, 1, 8, 8), (3, 21, 12, 20), (2, 65, 64, 64)]  # (batch·heads, tokens, head dim, v dim)


def _codes_of(p: torch.Tensor, spec: QuantSpec, a_scale: float, a_zp: float) -> torch.Tensor:
    if spec.scheme == "bitlog2":
        return bitlog2_codes_from_int(bitlog2_input(p, spec.bitlog2_variant), spec.bitlog2_variant).to(torch.int32)
    return to_signed_codes(p, torch.tensor(a_scale), torch.tensor(a_zp), spec).to(torch.int32)


def _sums_of_codes(codes, v, v_zp, spec, a_zp) -> torch.Tensor:
    vv = v.to(torch.int64) - v_zp
    if spec.scheme == "bitlog2":
        return bitlog2_level_table(spec.bitlog2_variant).to(torch.int64)[codes.to(torch.int64)] @ vv
    return (codes.to(torch.int64) - (round(a_zp) - code_offset(spec))) @ vv


@pytest.mark.parametrize("a_name", list(A_SPECS))
@pytest.mark.parametrize("b,n,d,dv", SHAPES)
def test_fused_attention_equals_unfused_integer_path(a_name, b, n, d, dv):
    spec, a_scale, a_zp = A_SPECS[a_name]
    g = torch.Generator().manual_seed(n * d + dv)
    q, k = (torch.randint(-128, 128, (b, n, d), generator=g, dtype=torch.int8) for _ in range(2))
    v = torch.randint(-128, 128, (b, n, dv), generator=g, dtype=torch.int8)
    zq, zk, zv, s_qk = 3, -5, 11, 4e-4
    got, codes = on_device(fused_attention, q, zq, k, zk, v, zv, s_qk, spec, a_scale, a_zp, 1.0, return_codes=True)
    codes = codes.to(torch.int32)
    # 1. the integer A·v on the kernel's own codes, bit for bit (out_scale 1: the int32 sums as fp32)
    assert torch.equal(got, _sums_of_codes(codes, v, zv, spec, a_zp).to(torch.float32))
    # 2. the codes: the unfused path's, except at a float-softmax boundary
    ref_sums, ref_codes = fused_attention_ref(q, zq, k, zk, v, zv, s_qk, spec, a_scale, a_zp)
    ref_codes = ref_codes.to(torch.int32)
    differ = codes != ref_codes
    if differ.any():
        scores = (q.double() - zq) @ (k.double() - zk).transpose(-1, -2) * s_qk
        p = torch.softmax(scores, -1).float()
        lo, hi = _codes_of(p * (1 - 1e-5), spec, a_scale, a_zp), _codes_of(p * (1 + 1e-5), spec, a_scale, a_zp)
        assert bool(((codes >= lo) & (codes <= hi))[differ].all()), "a code flipped away from any boundary"
        assert differ.float().mean().item() < 1e-3
    else:
        assert torch.equal(got, ref_sums.to(torch.float32))


def test_output_scale_fp16_and_leading_dims():
    spec, a_scale, _ = A_SPECS["half17"]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randint(-128, 128, (2, 3, 17, 16), generator=g, dtype=torch.int8) for _ in range(2))
    v = torch.randint(-128, 128, (2, 3, 17, 24), generator=g, dtype=torch.int8)
    sums = on_device(fused_attention, q, 0, k, 0, v, 4, 3e-4, spec, a_scale, 0.0, 1.0)
    scaled = on_device(fused_attention, q, 0, k, 0, v, 4, 3e-4, spec, a_scale, 0.0, 0.0125, out_dtype=torch.float16)
    assert sums.shape == (2, 3, 17, 24) and scaled.dtype == torch.float16
    assert torch.equal(scaled, (sums * torch.tensor(0.0125)).half())
    # kᵀ given as a transposed view (the lowered graph's operand): same result, no copy needed
    kt = k.transpose(-1, -2).contiguous()
    assert torch.equal(on_device(fused_attention, q, 0, kt.transpose(-1, -2), 0, v, 4, 3e-4, spec, a_scale, 0.0, 1.0), sums)


def test_errors_name_the_problem():
    spec = A_SPECS["half17"][0]
    q = torch.zeros(1, 4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 codes, got k: torch.float32"):
        on_device(fused_attention, q, 0, q.float(), 0, q, 0, 1.0, spec, 300.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        on_device(fused_attention, q, 0, q, 0, torch.zeros(1, 5, 8, dtype=torch.int8), 0, 1.0, spec, 300.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="log2/log√2 A runs unfused"):
        on_device(fused_attention, q, 0, q, 0, q, 0, 1.0, QuantSpec(bits=4, scheme="log_sqrt2"), 1.0, 0.0, 1.0)
