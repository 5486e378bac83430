"""W8A8 on every supported model family (random init): compiles, runs, stays close to FP32.

The SQNR bound (20 dB) is a floor well below what was measured on this machine
(26-37 dB; ``python tools/family_sqnr.py`` prints the table)."""

from __future__ import annotations

import pytest
import timm
import torch

import fxquant
from fxquant.evaluate import compare_outputs
from test_graph import _hf_vit

FAMILIES = {
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224"), 224),
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224"), 224),
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224"), 224),
    "deit_tiny_distilled_patch16_224": (lambda: timm.create_model("deit_tiny_distilled_patch16_224"), 224),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), 224),
    "hf_vit": (_hf_vit, 32),
}


def family_w8a8_sqnr(name: str, seed: int = 0) -> tuple[float, fxquant.pipeline.PipelineReport]:
    make, res = FAMILIES[name]
    torch.manual_seed(seed)
    model = make().eval()
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, 3, res, res, generator=g) for _ in range(2)]
    x = torch.randn(4, 3, res, res, generator=g)
    q = fxquant.compile(model, recipe="w8a8", calib=calib, example_inputs=(x[:2],), progress=False)
    return compare_outputs(model, q, (x,))["sqnr_db"], fxquant.report(q)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a8_family_sqnr(family):
    sqnr, rep = family_w8a8_sqnr(family)
    assert rep["insert_quantizers"].record["act_quantizers"] > 0
    assert sqnr > 20.0, f"{family}: W8A8 SQNR {sqnr:.1f} dB"


def test_cifar_vit_family_sqnr(cifar_info, cifar_data, cifar_w8a8):
    _, x, _ = cifar_data
    assert compare_outputs(cifar_info.model, cifar_w8a8, (x[:200],))["sqnr_db"] > 25.0
