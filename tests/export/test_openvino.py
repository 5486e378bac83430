"""OpenVINO IR export: the IR files, the CPU plugin's logits against fxquant's fake-quant model
(the ONNX QDQ tolerance of test_onnx_qdq.py: W8A8 max |Δ| <= 0.15 on logits of size ~5; OpenVINO
may run float parts in bf16 on CPUs that have it, so the check pins f32), the layer-precision
record, and the errors."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import ConfigError
from fxquant.quant import QuantLinear
from fxquant.testing import toy_calib, toy_vit

ov = pytest.importorskip("openvino")

from fxquant.export import run_openvino, runtime_precisions, to_openvino  # noqa: E402


def test_openvino_ir_matches_fake_quant_and_reports_int8_layers(tmp_path):
    calib = toy_calib()
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=calib, example_inputs=(calib[0],), progress=False)
    res = to_openvino(q, (calib[0],), tmp_path / "toy.xml")
    assert res.xml.exists() and res.bin.exists() and res.bin.stat().st_size > 0
    x = torch.cat(calib)
    with torch.no_grad():
        ref = q(x)
    core = ov.Core()
    compiled = core.compile_model(str(res.xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled([x.numpy()])[compiled.output(0)].copy())
    assert (got - ref).abs().max().item() <= 0.15
    assert run_openvino(res.xml, (x,)).shape == ref.shape
    # the record is the compiled model's own: every executed layer type with its precisions
    assert res.layers == runtime_precisions(res.xml)
    linears = sum(isinstance(m, QuantLinear) for m in q.modules())
    i8, total = res.int8_count("FullyConnected")
    assert total == linears and i8 == total  # read_model's graph: every quantized Linear in int8


def test_openvino_export_wants_an_xml_path(tmp_path):
    calib = toy_calib()
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=calib, example_inputs=(calib[0],), progress=False)
    with pytest.raises(ConfigError, match=r"<name>.xml"):
        to_openvino(q, (calib[0],), tmp_path / "toy.onnx")


def test_export_command_writes_openvino_ir(tmp_path, capsys):
    from fxquant.cli import main

    out = tmp_path / "vit.xml"
    assert main(["export", "--model", "embedded", "--recipe", "w8a8", "--format", "openvino", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and out.with_suffix(".bin").exists()
    assert "FullyConnected layers run in int8" in text and "max |Δlogit|" in text


def test_openvino_target_moves_quantizers_above_reshapes_exactly(tmp_path):
    """``target="openvino"``: each per-tensor activation Q/DQ fed by reshapes/transposes moves above
    them (the attention output's head merge before ``proj``); the same function (onnxruntime gives
    the same logits for both placements), and OpenVINO still runs every Linear in int8."""
    from fxquant.export import prepare_for_export, run_onnx, to_onnx
    from fxquant.export.onnx_qdq import ExportActQuant, _moves_data_only

    calib = toy_calib()
    q = fxquant.compile(toy_vit(), recipe="w8a8-sym", calib=calib, example_inputs=(calib[0],), progress=False,
                        attention_matmuls=("qk",))

    def quantizer_inputs(gm):
        mods = dict(gm.named_modules())
        return [n.args[0] for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], ExportActQuant)]

    ort_form, ov_form = quantizer_inputs(prepare_for_export(q)), quantizer_inputs(prepare_for_export(q, target="openvino"))
    assert len(ort_form) == len(ov_form) == 8
    # onnxruntime: q's and kᵀ's quantizers read transposes, proj's the head-merging reshape; OpenVINO: none
    assert sum(map(_moves_data_only, ort_form)) == 3 and sum(map(_moves_data_only, ov_form)) == 0
    assert any(n.target is torch.matmul or n.target == "matmul" or "matmul" in n.name for n in ov_form)  # A·v's output
    x = torch.cat(calib)
    a = run_onnx(to_onnx(q, (calib[0],), tmp_path / "ort.onnx").path, (x,))
    b = run_onnx(to_onnx(q, (calib[0],), tmp_path / "ov.onnx", target="openvino").path, (x,))
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item())  # fp32 ulps: integer vs float MatMul in ORT
    res = to_openvino(q, (calib[0],), tmp_path / "toy.xml")
    i8, total = res.int8_count("FullyConnected")
    assert i8 == total == 7
    with pytest.raises(ConfigError, match=r"export target must be one of \['onnxruntime', 'openvino'\], got 'tensorrt'"):
        prepare_for_export(q, target="tensorrt")


def test_cifar_vit_w8a8_ov_runs_like_nncf_in_openvino(cifar_compiled, cifar_data, tmp_path):
    """The real model, recipe ``w8a8-ov`` exported for OpenVINO: every Linear, the patch conv and the
    six fused attention subgraphs in int8, and no FakeQuantize left standalone beyond NNCF's 14 (image
    input, q and k of each block, the head input): the projection inputs' Q/DQ, moved above the
    head merge, fused into the attention output. Logits within the QDQ tolerance."""
    import collections

    q = cifar_compiled("w8a8-ov")
    _, x, _ = cifar_data
    res = to_openvino(q, (x[:2],), tmp_path / "m.xml")
    assert res.int8_count("FullyConnected") == (25, 25) and res.int8_count("Convolution") == (1, 1)
    assert res.int8_count("Subgraph") == (6, 6)
    compiled = ov.Core().compile_model(str(res.xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
    assert kinds["FakeQuantize"] == 14
    got = torch.from_numpy(compiled([x[:64].numpy()])[compiled.output(0)].copy())
    with torch.no_grad():
        ref = q(x[:64])
    assert (got - ref).abs().max().item() <= 0.15


def test_openvino_export_warns_about_grouped_activation_quantizers(tmp_path):
    """Per-channel/per-group activation Q/DQ (IGQ's contiguous groups) runs differently in OpenVINO's CPU
    plugin (measured: mean |Δlogit| 0.46 vs onnxruntime's 0.002 on the CIFAR ViT): the export says so."""
    calib = toy_calib()
    q = fxquant.compile(toy_vit(), recipe="igq-w4a4", calib=calib, example_inputs=(calib[0],), progress=False,
                        group_mode="contiguous")
    with pytest.warns(UserWarning, match="activation quantizers with per-channel/per-group scales"):
        to_openvino(q, (calib[0],), tmp_path / "igq.xml")
