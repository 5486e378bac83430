"""LoweredPatchConv (a patch-embedding convolution as an integer Linear over patches) against the
int64 reference on independently unfolded patches (``F.unfold``): exactly, on the CPU integer path
and on the Triton kernels (under TRITON_INTERPRET=1 on CPU), on a shape that is no block multiple
(C=3, k=4, 12x12 and 13x14 inputs: M=18, K=48, N=10); and against the fake-quant convolution
within fp32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.core.errors import ConfigError
from fxquant.core.quant import FakeQuantize, PerAxis, QuantConv2d, QuantSpec, choose_qparams, code_offset, to_signed_codes
from fxquant.core.testing import KERNEL_DEVICE, on_device
from fxquant.kernels.int_linear import HAS_TRITON, int_linear_ref
from fxquant.kernels.lowered import LoweredLinear, LoweredPatchConv, patch_conv_mismatch

# (weight bits, activation bits, symmetric activations): 8-bit weights symmetric, 4-bit weights
# asymmetric (non-zero zero points) and int4-packed; 4-bit activations are packed too on Triton
CASES = [(8, 8, False), (8, 8, True), (4, 8, False), (4, 4, False), (4, 4, True)]
CIN, COUT, K = 3, 10, 4


def _input(h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, CIN, h, w, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def _quant_conv(w_bits: int, a_bits: int, a_symmetric: bool, *, bias: bool = True) -> tuple[QuantConv2d, FakeQuantize]:
    """A calibrated ``QuantConv2d`` (per-output-channel weights) and its per-tensor input quantizer,
    whose range clips the input's tails."""
    torch.manual_seed(0)
    w_spec = QuantSpec(bits=w_bits, symmetric=w_bits == 8, granularity=PerAxis(0))
    conv = QuantConv2d.from_float(nn.Conv2d(CIN, COUT, K, K, bias=bias), w_spec, label="conv").eval()
    conv.weight_fake_quant.calibrate_from(conv.weight.detach())
    conv.weight_fake_quant.fake_quant_enabled = True
    a_spec = QuantSpec(bits=a_bits, symmetric=a_symmetric)
    x = _input()
    act = FakeQuantize(a_spec, label="conv.in")
    act.set_qparams(*choose_qparams(x.min() * 0.8, x.max() * 0.8, a_spec))
    act.fake_quant_enabled = True
    return conv, act


def _reference(conv: QuantConv2d, act: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    """int64 reference: ``F.unfold`` patches ((c, u, v) order, remainder dropped), their codes,
    ``int_linear_ref`` against the weight codes, back to NCHW."""
    b, _, h, w = x.shape
    wq = conv.weight_fake_quant
    patches = F.unfold(x.float(), K, stride=K).transpose(1, 2).reshape(-1, CIN * K * K)
    a = to_signed_codes(patches, act.scale, act.zero_point, act.spec)
    wc = to_signed_codes(conv.weight.detach(), wq.scale, wq.zero_point, wq.spec).reshape(COUT, -1)
    y = int_linear_ref(a, act.scale.reshape(()), act.zero_point.reshape(()) - code_offset(act.spec), wc,
                       wq.scale.reshape(-1), wq.zero_point.reshape(-1) - code_offset(wq.spec),
                       None if conv.bias is None else conv.bias.detach())
    return y.reshape(b, h // K, w // K, COUT).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("w_bits,a_bits,a_symmetric", CASES)
def test_cpu_path_equals_integer_reference_and_fake_quant_conv(w_bits, a_bits, a_symmetric):
    conv, act = _quant_conv(w_bits, a_bits, a_symmetric)
    low = LoweredPatchConv.from_quantized(conv, act, label="patch")
    assert low.w_packed == (w_bits == 4) and low.in_features == CIN * K * K and low.kernel_size == (K, K)
    for h, w in ((12, 12), (13, 14)):  # 13x14: Conv2d drops the last row / two columns, and so must the patches
        x = _input(h, w, seed=h + w)
        with torch.no_grad():
            got = low(x)
            fq = conv(act(x))
        ref = _reference(conv, act, x)
        assert got.shape == fq.shape == (2, COUT, 3, 3) and got.is_contiguous() and got.dtype == torch.float32
        assert torch.equal(got, ref), (got - ref).abs().max()  # exact integer accumulation, same float epilogue
        # vs Conv2d on dequantized values (fp32 accumulation of K=48 products): fp32 rounding
        assert torch.allclose(got, fq, rtol=1e-5, atol=1e-5 * fq.abs().max().item()), (got - fq).abs().max()
    x = _input(seed=5)
    with torch.no_grad():
        assert torch.equal(low(x[0]), low(x)[0])  # unbatched [C, H, W], as Conv2d takes
        half = low(x.half())
    assert half.dtype == torch.float16 and torch.equal(half, _reference(conv, act, x.half().float()).half())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("w_bits,a_bits,a_symmetric", CASES)
def test_triton_path_equals_integer_reference(w_bits, a_bits, a_symmetric, monkeypatch):
    """The module's Triton branch (``quantize_act`` + ``int_linear``): on the GPU when there is one,
    else forced onto CPU tensors, which the Triton interpreter runs."""
    conv, act = _quant_conv(w_bits, a_bits, a_symmetric)
    low = LoweredPatchConv.from_quantized(conv, act).to(KERNEL_DEVICE)
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setattr(LoweredLinear, "_use_triton", lambda self, x: True)
    for h, w in ((12, 12), (13, 14)):
        x = _input(h, w, seed=h * w)
        with torch.no_grad():
            got = on_device(low, x)
        ref = _reference(conv, act, x)
        assert got.shape == (2, COUT, 3, 3) and got.is_contiguous()
        assert torch.equal(got, ref), (got - ref).abs().max()


def test_only_patch_embeddings_and_clear_input_errors():
    conv, act = _quant_conv(8, 8, False, bias=False)
    assert patch_conv_mismatch(conv) == "" and patch_conv_mismatch(nn.Conv2d(3, 4, 4, 4, padding="valid")) == ""
    assert "stride (2, 2) != kernel (4, 4)" in patch_conv_mismatch(nn.Conv2d(3, 4, 4, 2))
    assert "padding" in patch_conv_mismatch(nn.Conv2d(3, 4, 4, 4, padding=1))
    assert "dilation" in patch_conv_mismatch(nn.Conv2d(3, 4, 4, 4, dilation=2))
    assert "groups" in patch_conv_mismatch(nn.Conv2d(4, 4, 4, 4, groups=2))
    overlapping = QuantConv2d.from_float(nn.Conv2d(CIN, COUT, K, 2), conv.weight_fake_quant.spec)
    with pytest.raises(ConfigError, match=r"'stem': convolution is not a patch embedding \(stride"):
        LoweredPatchConv.from_quantized(overlapping, act, label="stem")
    low = LoweredPatchConv.from_quantized(conv, act, label="patch")
    assert low.bias is None
    with pytest.raises(ValueError, match=r"patch convolution 'patch': input 3x12 is smaller than the 4x4 kernel"):
        low(torch.randn(1, CIN, 3, 12))
    with pytest.raises(ValueError, match=r"patch convolution 'patch' expects \[B, 3, H, W\] input, got \(1, 4, 8, 8\)"):
        low(torch.randn(1, 4, 8, 8))
