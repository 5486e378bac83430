"""W8A8 on every supported model family (random init): compiles, runs, stays close to FP32.

The default run checks one model per family at a reduced size (the same timm class and depth at 64 px;
``fxquant.core.testing.family_model``); ``pytest -m slow`` runs every family at 224 px.

The SQNR bound (20 dB) is a floor well below what was measured on this machine
(26-37 dB; ``python tools/family_sqnr.py`` prints the table)."""

from __future__ import annotations

import pytest

import fxquant
from fxquant.core.evaluate import compare_outputs
from fxquant.core.testing import FAMILIES, REDUCED_FAMILIES, family_data, family_model

# default run: one model per family at reduced size; pytest -m slow: every family at 224 px
CASES = [pytest.param(name, True, id=name if name == "hf_vit" else f"{name}-64px") for name in REDUCED_FAMILIES] + [
    pytest.param(name, False, id=f"{name}-224px", marks=pytest.mark.slow) for name in FAMILIES if name != "hf_vit"]


@pytest.mark.parametrize("family,reduced", CASES)
def test_w8a8_family_sqnr(family, reduced):
    model, res = family_model(family, reduced)
    calib, x = family_data(res)
    q = fxquant.compile(model, recipe="w8a8", calib=calib, example_inputs=(x[:2],), progress=False)
    sqnr, rep = compare_outputs(model, q, (x,))["sqnr_db"], fxquant.report(q)
    assert rep["insert_quantizers"].record["act_quantizers"] > 0
    assert sqnr > 20.0, f"{family}: W8A8 SQNR {sqnr:.1f} dB"


def test_cifar_vit_family_sqnr(cifar_info, cifar_data, cifar_w8a8):
    _, x, _ = cifar_data
    assert compare_outputs(cifar_info.model, cifar_w8a8, (x[:200],))["sqnr_db"] > 25.0
