"""ONNX export of dynamic activation quantizers (``Dynamic``: per-token, per-token-group, per-image
ranges at run time): the exported quantizer is fake quantization's function bit for bit in
onnxruntime, with a dynamic batch; whole models (fake-quant and lowered) agree with PyTorch within
the tolerances of tests/export/test_onnx_qdq.py."""

from __future__ import annotations

import onnx
import pytest
import torch

import fxquant
from fxquant.core.quant import Dynamic, FakeQuantize, QuantSpec
from fxquant.core.testing import QuantizerOnly, toy_calib, toy_vit
from fxquant.export import prepare_for_export, run_onnx, to_onnx
from fxquant.export.modules import ExportDynamicActQuant


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity=Dynamic("token")),
    QuantSpec(bits=8, symmetric=True, granularity=Dynamic("token")),
    QuantSpec(bits=4, granularity=Dynamic("token", 12)),
    QuantSpec(bits=6, granularity=Dynamic("tensor")),
], ids=lambda s: s.short())
def test_dynamic_quantizer_is_bit_exact_in_onnxruntime(spec, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 50, 48, generator=g) * (0.1 + 3 * torch.rand(16, 50, 1, generator=g))
    fq = FakeQuantize(spec, label="dyn")
    fq.fake_quant_enabled = True
    gm = fxquant.compile(QuantizerOnly(fq), recipe="fp32", example_inputs=(x[:2],), progress=False)
    res = to_onnx(gm, (x[:2],), tmp_path / "d.onnx")
    assert res.nodes.get("ReduceMin") and res.nodes.get("ReduceMax") and "QuantizeLinear" not in res.nodes
    with torch.no_grad():
        ref = fq(x)
    assert torch.equal(run_onnx(res.path, (x,), optimize=False), ref)  # batch 16 through a graph exported at batch 2
    assert torch.equal(run_onnx(res.path, (x,)), ref)


# the lowered model's export covers both handlers (LoweredLinear inputs and the kept FakeQuantize nodes: patch
# conv, attention operands); the fake-quant model's and the OpenVINO placement's (5-6 s each) run under -m slow
@pytest.mark.parametrize("lower", [pytest.param(False, marks=pytest.mark.slow), True])
def test_toy_vit_dynamic_tokens_export_matches_pytorch(lower, tmp_path):
    q = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", calib=toy_calib(), progress=False, lower=lower)
    prepared = prepare_for_export(q)
    assert sum(isinstance(m, ExportDynamicActQuant) for m in prepared.modules()) == (12 if lower else 10)
    x = torch.cat(toy_calib())
    res = to_onnx(q, (x[:2],), tmp_path / "t.onnx")
    onnx.checker.check_model(onnx.load(str(res.path)))
    with torch.no_grad():
        ref = q(x)
    d = (run_onnx(res.path, (x,), optimize=False) - ref).abs()
    assert d.max().item() <= 0.05 * ref.abs().max().item() and d.mean().item() <= 0.01 * ref.abs().mean().item()


@pytest.mark.slow
def test_openvino_target_keeps_the_dynamic_form(tmp_path):
    """target="openvino" moves only per-tensor static Q/DQ; dynamic quantizers stay where they are,
    and the exported function is unchanged."""
    q = fxquant.compile(toy_vit(), recipe="w8a8", a_dynamic="token", calib=toy_calib(), progress=False)
    x = torch.cat(toy_calib())
    res = to_onnx(q, (x[:2],), tmp_path / "ov.onnx", target="openvino")
    with torch.no_grad():
        ref = q(x)
    d = (run_onnx(res.path, (x,), optimize=False) - ref).abs()
    assert d.max().item() <= 0.05 * ref.abs().max().item()


def _run_fp32_matmulnbits(path, x: torch.Tensor) -> torch.Tensor:
    """onnxruntime with its graph optimizations, the ``MatMulNBits`` that its DQ(W) → MatMul fusion
    creates computing in fp32 (``session.qdq_matmulnbits_accuracy_level=1``; the default, 4, quantizes
    the float input again, to int8 per block of 32)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.slow
def test_cifar_vit_dynamic_tokens_export_matches_fake_quant(tmp_path, cifar_compiled, cifar_data):
    """The CIFAR ViT at W4A4 with per-token dynamic activations, 200 real images: the 4-bit tolerances
    of test_onnx_qdq.py (max |Δlogit| <= 1.0, mean <= 0.02, >= 98 % equal predictions), for the
    exported function (no graph optimization) and for onnxruntime's optimized graph with fp32
    ``MatMulNBits``. Measured (onnxruntime 1.32, AVX2): max 0.27 / mean 0.009 / 100 % both ways. With
    onnxruntime's default accuracy level 4, each Linear's float input (dynamic activations have no Q/DQ
    pair for the MatMulIntegerToFloat fusion) is quantized again to int8 per block of 32: max 0.65 /
    mean 0.11 / 93 % equal predictions, onnxruntime's own dynamic quantization, not the exported
    function."""
    _, x, _ = cifar_data
    x = x[:200]
    q = cifar_compiled("w4a4", a_dynamic="token")
    res = to_onnx(q, (x[:2],), tmp_path / "c.onnx")
    with torch.no_grad():
        ref = q(x)
    for got in (run_onnx(res.path, (x,), optimize=False), _run_fp32_matmulnbits(res.path, x)):
        d = (got - ref).abs()
        assert d.max().item() <= 1.0 and d.mean().item() <= 0.02, (d.max().item(), d.mean().item())
        assert (got.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.98
