"""The exporter dispatches through one handler per runtime module kind: every kind fxquant's
passes create has one, a kind without one is an error naming the module, and lowered graphs
(``compile(..., lower=True)``) export to the same QDQ model as their fake-quant form."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import fxquant
from fxquant.core.errors import ConfigError
from fxquant.core.quant import modules as quant_modules
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.export import EXPORT_HANDLERS, export_handler, int8_dot_exact, prepare_for_export, run_onnx, to_onnx
from fxquant.kernels import lowered


def _runtime_module_kinds() -> list[type]:
    """Every public nn.Module class defined where fxquant's runtime modules live."""
    return [c for m in (quant_modules, lowered) for _, c in inspect.getmembers(m, inspect.isclass)
            if issubclass(c, nn.Module) and c.__module__ == m.__name__ and not c.__name__.startswith("_")]


def test_every_runtime_module_kind_has_a_handler():
    kinds = _runtime_module_kinds()
    assert {k.__name__ for k in kinds} >= {"FakeQuantize", "QuantLinear", "QuantConv2d", "CompensationLinear",
                                          "LoweredLinear", "LoweredPatchConv", "LoweredMatmul"}
    assert [k.__name__ for k in kinds if export_handler(k.__new__(k)) is None] == []


def test_a_kind_without_handler_is_an_error_naming_it(monkeypatch):
    q = fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=toy_calib(), progress=False)
    monkeypatch.delitem(EXPORT_HANDLERS, quant_modules.CompensationLinear)
    with pytest.raises(ConfigError, match=r"no export handler for 'qwt.block' \(CompensationLinear\); register one "
                                          r"with fxquant.export.register_export_handler\(CompensationLinear\)"):
        prepare_for_export(q)


@pytest.mark.parametrize("recipe,options", [("w8a8", {}), ("bitlog2-w4a4", {}),
                                            pytest.param("repq-qwt-w4a4", {}, marks=pytest.mark.slow),
                                            pytest.param("igq-w4a4", {"group_mode": "contiguous"}, marks=pytest.mark.slow),
                                            pytest.param("repq-w4a4", {}, marks=pytest.mark.slow)])
def test_lowered_graph_exports_like_its_fake_quant_form(recipe, options, tmp_path):
    """A lowered Linear already holds the signed integer codes QDQ needs: the export of the
    lowered model computes what the export of the fake-quant model computes, in onnxruntime
    (IGQ's contiguous groups: ``LoweredGroupedLinear``)."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fake = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False, **options)
    low = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False, lower=True, **options)
    assert any(isinstance(m, (lowered.LoweredLinear, lowered.LoweredGroupedLinear)) for m in low.modules())
    assert isinstance(low.get_submodule("patch"), lowered.LoweredPatchConv)  # exported as Q/DQ(x), DQ(W) → Conv
    # without VNNI/AMX onnxruntime's fused int8 GEMM saturates (fxquant.export.cpu): check the exported function op by op
    got_fake = run_onnx(to_onnx(fake, (x[:2],), tmp_path / "fake.onnx").path, (x,), optimize=int8_dot_exact())
    got_low = run_onnx(to_onnx(low, (x[:2],), tmp_path / "low.onnx").path, (x,), optimize=int8_dot_exact())
    assert torch.equal(got_low, got_fake)
    with torch.no_grad():
        ref = low(x)
    # onnxruntime's float kernels vs PyTorch's integer path + float epilogue: ulps, and a rare code
    # step where an ulp crosses a rounding boundary (see test_onnx_qdq.py for the whole-model bounds)
    assert (got_low - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
