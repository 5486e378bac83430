"""Grouped integer linear (IGQ-ViT channel groups) vs its references under TRITON_INTERPRET=1 (CPU),
on shapes that are not multiples of the block or group sizes: the Triton kernel and the CPU path
equal the int64 reference exactly (same integers, same float32 epilogue), the float64 dequantized
product within fp32 rounding, and one group is the per-tensor ``int_linear_ref``."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.quant import pack_int4
from fxquant.core.testing import on_device
from fxquant.kernels.grouped_linear import (
    contiguous_group_idx,
    group_segments,
    grouped_linear,
    grouped_linear_cpu,
    grouped_linear_float64_ref,
    grouped_linear_ref,
)
from fxquant.kernels.int_linear import int_linear_ref

EPS32 = 2.0 ** -24  # unit roundoff of float32


def _operands(inst, rows, k, n, num_groups, a_bits, w_bits, seed):
    """Codes, an uneven per-instance group map (group 2 empty in instance 0 when there are 3+
    groups; later instances skewed towards low groups) and parameters."""
    g = torch.Generator().manual_seed(seed)
    lo_a, lo_w = -(2 ** (a_bits - 1)), -(2 ** (w_bits - 1))
    a = torch.randint(lo_a, -lo_a, (inst * rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(lo_w, -lo_w, (n, k), generator=g, dtype=torch.int8)
    u = torch.rand(inst, k, generator=g) ** (1.0 + torch.arange(inst, dtype=torch.float32)[:, None])
    group_idx = (u * num_groups).long().clamp(max=num_groups - 1)
    if num_groups >= 3:
        group_idx[0][group_idx[0] == 2] = 1
    g_scale = torch.rand(num_groups, generator=g) * 0.05 + 0.005
    g_zp = torch.randint(lo_a // 2, -lo_a // 2, (num_groups,), generator=g, dtype=torch.int32)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    w_zp = torch.randint(-3, 4, (n,), generator=g, dtype=torch.int32)
    bias = torch.randn(n, generator=g)
    return a, group_idx, g_scale, g_zp, w, w_scale, w_zp, bias


def _assert_float64_close(got, a, group_idx, rows, g_scale, g_zp, w, w_scale, w_zp, bias):
    """|got - y64| <= (G + 4)·u·(Σ_c |a_deq|·|w_deq| + |bias|): each term float(P_g)·(s_g·s_w) carries
    3 roundings, the G-term sum and the bias add one each, and Σ_g |term_g| <= Σ_c |a_deq||w_deq|."""
    f64 = grouped_linear_float64_ref(a, group_idx, rows, g_scale, g_zp, w, w_scale, w_zp, bias)
    gi = group_idx.long().repeat_interleave(rows, dim=0)
    da = ((a.double() - g_zp.double()[gi]) * g_scale.double()[gi]).abs()
    dw = ((w.double() - w_zp.double()[:, None]) * w_scale.double()[:, None]).abs()
    mag = da @ dw.T + bias.double().abs()[None, :]
    bound = (g_scale.numel() + 4) * EPS32 * mag
    assert ((got.double() - f64).abs() <= bound).all(), ((got.double() - f64).abs() / mag).max()


CASES = [  # (instances, rows per instance, K, N, G): M = 33, K = 48 with 5 uneven groups, N = 17, ...
    (3, 11, 48, 17, 5),
    (1, 7, 20, 9, 3),     # one instance, K < BLOCK_K
    (4, 5, 70, 12, 8),    # K over two blocks, N < BLOCK_N, some groups empty in some instances
]


@pytest.mark.parametrize("inst,rows,k,n,num_groups", CASES)
@pytest.mark.parametrize("kind", ["w8a8", "w4a4"])  # w4: int4-packed weights, nibbles gathered
def test_grouped_gemm_equals_integer_reference(inst, rows, k, n, num_groups, kind):
    a_bits, w_bits = {"w8a8": (8, 8), "w4a8": (8, 4), "w4a4": (4, 4)}[kind]
    a, gi, gs, gz, w, ws, wz, bias = _operands(inst, rows, k, n, num_groups, a_bits, w_bits, seed=inst + k + n)
    _, seg = group_segments(gi, num_groups)
    assert (seg[:, 1:] == seg[:, :-1]).any() or num_groups < 3  # an empty group is exercised
    w_in = pack_int4(w, signed=True) if w_bits == 4 else w
    got = on_device(grouped_linear, a, gi, rows, gs, gz, w_in, ws, wz, bias, k=k, w_packed=w_bits == 4)
    ref = grouped_linear_ref(a, gi, rows, gs, gz, w, ws, wz, bias)
    assert torch.equal(got, ref), (got - ref).abs().max()  # int32 partial sums are exact; same float epilogue
    assert torch.equal(grouped_linear_cpu(a, gi, rows, gs, gz, w, ws, wz, bias), ref)
    _assert_float64_close(got, a, gi, rows, gs, gz, w, ws, wz, bias)


@pytest.mark.parametrize("weight_zp", ["asymmetric", "symmetric"])  # the kernel skips A's row sums without weight zero points
def test_contiguous_groups_and_block_sizes(weight_zp):
    """PerGroup: every row in one instance with ``g = c // group_size``; odd block sizes too."""
    a, _, gs, gz, w, ws, wz, bias = _operands(1, 33, 48, 17, 4, 8, 8, seed=5)
    if weight_zp == "symmetric":
        wz = torch.zeros_like(wz)
    gi = contiguous_group_idx(48, 12)
    assert gi.shape == (1, 48) and gi[0, 11] == 0 and gi[0, 12] == 1
    ref = grouped_linear_ref(a, gi, 33, gs, gz, w, ws, wz, bias)
    for blocks in (None, (16, 32, 16), (32, 16, 64)):
        got = on_device(grouped_linear, a, gi, 33, gs, gz, w, ws, wz, bias, blocks=blocks)
        assert torch.equal(got, ref), blocks
    assert torch.equal(grouped_linear_cpu(a, gi, 33, gs, gz, w, ws, wz, bias), ref)
    _assert_float64_close(ref, a, gi, 33, gs, gz, w, ws, wz, bias)
    # the same groups written per instance give the same result
    per_inst = gi.expand(3, 48)
    assert torch.equal(grouped_linear_ref(a, per_inst, 11, gs, gz, w, ws, wz, bias), ref)


def test_one_group_is_per_tensor_int_linear():
    a, _, gs, gz, w, ws, wz, bias = _operands(3, 11, 48, 17, 1, 8, 8, seed=9)
    gi = torch.zeros(3, 48, dtype=torch.int64)
    ref = int_linear_ref(a, gs[0], gz[0], w, ws, wz, bias)
    assert torch.equal(grouped_linear_ref(a, gi, 11, gs, gz, w, ws, wz, bias), ref)
    assert torch.equal(grouped_linear_cpu(a, gi, 11, gs, gz, w, ws, wz, bias), ref)
    assert torch.equal(on_device(grouped_linear, a, gi, 11, gs, gz, w, ws, wz, bias), ref)


def test_fp16_output_and_group_segments():
    a, gi, gs, gz, w, ws, wz, bias = _operands(2, 6, 24, 10, 3, 8, 8, seed=2)
    got = on_device(grouped_linear, a, gi, 6, gs, gz, w, ws, wz, bias, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    assert torch.equal(got, grouped_linear_ref(a, gi, 6, gs, gz, w, ws, wz, bias).half())
    perm, seg = group_segments(gi, 3)
    for i in range(2):
        sorted_groups = gi[i][perm[i].long()]
        assert (sorted_groups[1:] >= sorted_groups[:-1]).all()
        for g in range(3):
            members = perm[i, seg[i, g]:seg[i, g + 1]].long()
            assert torch.equal(members, torch.nonzero(gi[i] == g).flatten())  # stable: channel order kept


def test_errors():
    a, gi, gs, gz, w, ws, wz, _ = _operands(3, 4, 16, 8, 3, 8, 8, seed=1)
    with pytest.raises(ValueError, match="do not split into instances"):
        grouped_linear_cpu(a, gi, 5, gs, gz, w, ws, wz)
    with pytest.raises(ValueError, match="group_idx must have shape"):
        grouped_linear_ref(a, gi[:2], 4, gs, gz, w, ws, wz)
    with pytest.raises(ValueError, match=r"group indices must lie in \[0, 3\)"):
        on_device(grouped_linear, a, gi + 1, 4, gs, gz, w, ws, wz)
    with pytest.raises(ValueError, match="inner dimensions"):
        on_device(grouped_linear, a, gi, 4, gs, gz, w[:, :8], ws, wz)
