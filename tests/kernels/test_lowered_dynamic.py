"""LoweredLinear with a dynamic per-token input (``Dynamic("token")``): per-row activation scales and
zero points through the integer GEMM, equal to the int64 reference on the fake quantizer's codes
exactly, on the CPU integer path and on the Triton kernels (under TRITON_INTERPRET=1 on CPU), on
shapes that are no block multiple; and to the fake-quant Linear within fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.core.quant import (
    Dynamic,
    FakeQuantize,
    PerAxis,
    QuantLinear,
    QuantSpec,
    code_offset,
    dynamic_qparams,
    to_signed_codes,
)
from fxquant.core.testing import KERNEL_DEVICE, on_device
from fxquant.kernels.int_linear import HAS_TRITON, int_linear_ref
from fxquant.kernels.lowered import LoweredLinear

# (weight bits, activation bits, symmetric activations): 4-bit weights are asymmetric and int4-packed
CASES = [(8, 8, False), (8, 8, True), (4, 8, False), (4, 4, False), (4, 4, True)]
K, N = 40, 24


def _layer(w_bits: int, a_bits: int, a_symmetric: bool) -> tuple[QuantLinear, FakeQuantize]:
    torch.manual_seed(0)
    w_spec = QuantSpec(bits=w_bits, symmetric=w_bits == 8, granularity=PerAxis(0))
    lin = QuantLinear.from_float(nn.Linear(K, N), w_spec, label="lin").eval()
    lin.weight_fake_quant.calibrate_from(lin.weight.detach())
    lin.weight_fake_quant.fake_quant_enabled = True
    act = FakeQuantize(QuantSpec(bits=a_bits, symmetric=a_symmetric, granularity=Dynamic("token")), label="lin.in")
    act.fake_quant_enabled = True
    return lin, act


def _input(seed: int, b: int = 3, n: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, K, generator=g) * (0.1 + 3 * torch.rand(b, n, 1, generator=g)) + torch.randn(b, n, 1, generator=g)


def _reference(lin: QuantLinear, act: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    s, z = (p.reshape(-1) for p in dynamic_qparams(x, act.spec))
    a = to_signed_codes(x.reshape(-1, K), s[:, None], z[:, None], act.spec)
    wq = lin.weight_fake_quant
    w = to_signed_codes(lin.weight.detach(), wq.scale, wq.zero_point, wq.spec)
    y = int_linear_ref(a, s, z - code_offset(act.spec), w, wq.scale.reshape(-1), wq.zero_point.reshape(-1) - code_offset(wq.spec),
                       lin.bias.detach())
    return y.reshape(*x.shape[:-1], N)


@pytest.mark.parametrize("w_bits,a_bits,a_symmetric", CASES)
def test_cpu_path_equals_integer_reference_and_fake_quant(w_bits, a_bits, a_symmetric):
    lin, act = _layer(w_bits, a_bits, a_symmetric)
    low = LoweredLinear.from_quantized(lin, act)
    assert low.w_packed == (w_bits == 4) and float(low.a_scale) == 0.0  # no stored activation parameters
    for seed in (1, 2):
        x = _input(seed)
        with torch.no_grad():
            got, fq = low(x), lin(act(x))
        assert torch.equal(got, _reference(lin, act, x))
        assert torch.allclose(got, fq, rtol=1e-5, atol=1e-5 * fq.abs().max().item()), (got - fq).abs().max()
        with torch.no_grad():  # a token's output depends on that token alone
            assert torch.equal(low(x[1:2, 3:4]), got[1:2, 3:4])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("w_bits,a_bits,a_symmetric", CASES)
def test_triton_path_equals_integer_reference(w_bits, a_bits, a_symmetric, monkeypatch):
    """The Triton GEMM with per-row activation parameters (``int_linear``'s ``A_PER_ROW``): on the GPU
    when there is one, else forced onto CPU tensors, which the Triton interpreter runs."""
    lin, act = _layer(w_bits, a_bits, a_symmetric)
    low = LoweredLinear.from_quantized(lin, act).to(KERNEL_DEVICE)
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setattr(LoweredLinear, "_use_triton", lambda self, x: True)
    x = _input(3, b=2, n=9)
    with torch.no_grad():
        got = on_device(low, x)
    ref = _reference(lin, act, x)
    assert torch.equal(got, ref), (got - ref).abs().max()
