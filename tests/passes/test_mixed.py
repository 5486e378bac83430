"""``mixed_precision``: per-layer widths under a size budget (toy graph; the CIFAR ViT figures are
``tools/`` runs in docs/results.md)."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import artifact
from fxquant.core.errors import ConfigError
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.export import run_onnx, to_onnx
from fxquant.passes import MixedPrecision

CALIB = toy_calib(4, 8)


def _compiled(recipe: str = "w4a4", **kw):
    return fxquant.compile(toy_vit(), recipe=recipe, calib=CALIB, progress=False, **kw)


def _mean_weight_bits(gm) -> float:
    from fxquant.core.quant import QuantConv2d, QuantLinear

    w = [(m.weight_fake_quant.spec.bits, m.weight.numel()) for m in gm.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    return sum(b * n for b, n in w) / sum(n for _, n in w)


def test_budget_holds_widths_vary_and_the_plan_beats_uniform_on_its_own_objective():
    gm = _compiled(bit_budget=4)
    rec = fxquant.report(gm)["mixed_precision"].record
    assert rec["mean_weight_bits"] <= 4 and rec["mean_act_bits"] <= 4
    assert len(set(rec["weight_bits"])) > 1 and len(set(rec["act_bits"])) > 1
    mean_w = _mean_weight_bits(gm)
    assert mean_w == pytest.approx(rec["mean_weight_bits"], abs=1e-3)  # the compiled model holds the chosen widths
    cands = rec["candidates"]
    for table, bits in ((rec["kl_weights"], rec["weight_bits"]), (rec["kl_acts"], rec["act_bits"])):
        chosen = sum(row[cands.index(b)] for row, b in zip(table, bits))
        uniform = sum(row[cands.index(4)] for row in table)
        assert chosen <= uniform + 1e-12  # the DP minimises the summed KL; uniform 4-bit is feasible
    x = torch.cat(CALIB)
    ref = torch.log_softmax(toy_vit()(x), -1)
    with torch.no_grad():
        kl = {name: torch.nn.functional.kl_div(torch.log_softmax(g(x), -1), ref, log_target=True, reduction="batchmean").item()
              for name, g in (("mp", gm), ("uniform", _compiled()))}
    assert kl["mp"] < kl["uniform"]


def test_top_budget_is_uniform_8_bit_and_the_plan_replays_exports_and_lowers(tmp_path):
    top = fxquant.report(_compiled(bit_budget=8))["mixed_precision"].record
    assert set(top["weight_bits"]) == {8} and set(top["act_bits"]) == {8}
    gm = _compiled("repq-w4a4", bit_budget=4)  # composes with RepQ-ViT (log√2 softmax searched too)
    x = torch.cat(CALIB)[:4]
    artifact.save(gm, tmp_path / "a")
    back = artifact.load(tmp_path / "a", model=toy_vit())
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))
    res = to_onnx(gm, (x,), tmp_path / "m.onnx")
    with torch.no_grad():
        ref = gm(x)
    assert (run_onnx(res.path, (x,)) - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    lowered = fxquant.compile(toy_vit(), recipe="w4a4", calib=CALIB, progress=False, bit_budget=4, lower=True)
    assert "lower_to_kernels" in [r.name for r in fxquant.report(lowered).passes]
    with torch.no_grad():
        assert (lowered(x) - _compiled(bit_budget=4)(x)).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_budget_errors():
    with pytest.raises(ConfigError, match="bit_budget=5 must be one of the candidate widths"):
        MixedPrecision(bit_budget=5)
    with pytest.raises(ConfigError, match="bit_budget=5 must be one of the candidate widths"):
        fxquant.get_recipe("w4a4", bit_budget=5)
