"""The per-layer error report and the one-layer-at-a-time sensitivity (``fxquant.core.error_report``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxquant
from fxquant.cli import main
from fxquant.core.error_report import ErrorStats, error_report, report_table, write_report
from fxquant.core.evaluate import sqnr_db
from fxquant.core.layer_sensitivity import layer_groups, layer_sensitivity
from fxquant.core.testing import set_all_quantizers, toy_calib, toy_vit

TOY_BLOCK = ["block.q", "block.k", "block.v", "block.proj", "block.fc1", "block.fc2"]


def test_error_stats_are_the_streamed_metrics():
    g = torch.Generator().manual_seed(0)
    r, t = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    t = r + 0.1 * t
    s = ErrorStats()
    for a, b in zip(r.split(300), t.split(300)):
        s.update(a, b)
    assert s.sqnr_db == pytest.approx(sqnr_db(r, t), rel=1e-9)
    assert s.cosine == pytest.approx(torch.nn.functional.cosine_similarity(r.double(), t.double(), dim=0).item(), rel=1e-9)
    assert s.rel_l2 == pytest.approx(((r - t).norm() / r.norm()).item(), rel=1e-6)


def test_toy_report_accumulated_logits_equal_the_model_and_local_errors_use_float_inputs():
    gm = fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False)
    data = toy_calib(4)
    rep = error_report(gm, data, label="w4a4", progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        q = gm(x)
        set_all_quantizers(gm, False)
        f = gm(x)
        set_all_quantizers(gm, True)
    assert rep.sites[-1].kind == "logits" and rep.sites[-1].accumulated.sqnr_db == pytest.approx(sqnr_db(f, q), rel=1e-9)
    layers = rep.layers()
    assert [s.module for s in layers] == ["patch", *TOY_BLOCK, "head"]
    # the first layer sees the graph input: its local and accumulated errors are the same thing
    assert layers[0].local.sqnr_db == pytest.approx(layers[0].accumulated.sqnr_db, rel=1e-9)
    # later layers: accumulated error includes upstream error, local does not
    assert all(s.accumulated.sqnr_db < s.local.sqnr_db for s in layers[1:])
    # a local Linear site is exactly the layer with its input and weight quantizers on float inputs
    fc1 = next(s for s in layers if s.module == "block.fc1")
    assert fc1.local.elements == x.shape[0] * 4 * 32  # 4 tokens (8x8 image, 4x4 patches), 32 channels
    kinds = {s.kind for s in rep.sites}
    assert {"act_quant", "weight", "linear", "conv", "matmul", "softmax", "logits"} <= kinds
    assert len(rep.ln_ranges) == 3 and all(len(r["min"]) == 16 for r in rep.ln_ranges.values())
    # quantizer flags are restored
    assert all(m.fake_quant_enabled for m in gm.modules() if isinstance(m, fxquant.core.quant.FakeQuantize))


def test_sensitivity_groups_layers_and_one_layer_at_a_time_is_what_it_says():
    gm = fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False)
    groups = layer_groups(gm)
    assert set(groups) == {"patch", *TOY_BLOCK, "head", "block:q·k", "block:A·v"}
    assert all(len(g) == 2 for g in groups.values())  # input + weight, or the two matmul operands
    x = torch.cat(toy_calib(4))
    y = torch.zeros(len(x), dtype=torch.long)
    rows = layer_sensitivity(gm, x, y, progress=False)
    assert [r.kl for r in rows] == sorted((r.kl for r in rows), reverse=True) and all(r.kl >= 0 for r in rows)
    # the ranked KL of "head" is the KL of the model with only the head's two quantizers on
    with torch.no_grad():
        set_all_quantizers(gm, False)
        ref = torch.log_softmax(gm(x).double(), -1)
        for q in groups["head"]:
            q.fake_quant_enabled = True
        got = torch.log_softmax(gm(x).double(), -1)
        set_all_quantizers(gm, True)
    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean").item()
    assert next(r for r in rows if r.layer == "head").kl == pytest.approx(kl, rel=1e-9)
    blocks = layer_sensitivity(gm, x, y, granularity="block", progress=False)
    assert {r.layer for r in blocks} == {"block", "patch", "head"}


def test_report_files_and_html_are_written(tmp_path):
    gm = fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False)
    reps = [error_report(gm, toy_calib(2), label=lbl, progress=False) for lbl in ("a", "b")]
    paths = write_report(reps, tmp_path, meta={"model": "toy"})
    data = json.loads(paths["json"].read_text())
    assert [r["label"] for r in data["reports"]] == ["a", "b"]
    assert all(paths[k].stat().st_size > 1000 for k in ("sqnr", "ln_a", "ln_b"))
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and "block.fc1" in page
    assert "a local" in report_table(reps)


def test_report_and_sensitivity_commands_run(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--model", "embedded", "--recipe", "w4a4", "--images", "16", "--out", str(out), "--quiet",
                 "--calib-images", "8"]) == 0
    assert "blocks.5.mlp.fc2" in capsys.readouterr().out and (out / "report.html").exists()
    assert main(["sensitivity", "--model", "embedded", "--recipe", "w4a4", "--images", "16", "--top", "3", "--quiet",
                 "--calib-images", "8", "--granularity", "block", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["layers"]
    assert {r["layer"] for r in rows} == {f"blocks.{i}" for i in range(6)} | {"patch_embed.proj", "head"}


@pytest.mark.slow
def test_report_and_sensitivity_commands_on_the_cifar_vit(tmp_path, capsys):
    """w4a4 vs repq-w4a4 on the outlier model: per-tensor quantization collapses the post-LayerNorm
    Linears (qkv, fc1) and RepQ's reparameterization restores them."""
    out = tmp_path / "rep"
    assert main(["report", "--model", "cifar-vit-outliers", "--recipe", "w4a4", "--recipe", "repq-w4a4", "--images", "200",
                 "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "report.json").read_text())
    w4, repq = ({s["module"]: s for s in r["sites"] if s["kind"] == "linear"} for r in data["reports"])
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1"):
        assert repq[name]["local"]["sqnr_db"] > w4[name]["local"]["sqnr_db"] + 10
    spread = data["reports"][0]["layer_norm_channel_spread"]
    assert max(v["max_over_median_range"] for v in spread.values()) > 20
    assert (out / "report.html").exists() and (out / "sqnr.png").exists()
    assert main(["sensitivity", "--model", "cifar-vit", "--recipe", "w4a4", "--images", "200", "--top", "5", "--quiet",
                 "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["layers"]
    # 24 block Linears, the patch conv and the head; 2 attention matmuls per block
    assert len(rows) == 26 + 12 and math.isfinite(rows[0]["kl"]) and rows[0]["kl"] >= rows[-1]["kl"]
