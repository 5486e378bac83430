"""RepQ-ViT passes: reparameterization exactness, per-channel → layer-wise code equality,
log√2 softmax quantizer, sites left alone (with reasons), composition, artifacts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant import artifact
from fxquant.core import match
from fxquant.core.quant import PctMSE, PerAxis, PerTensor, QuantLinear, QuantSpec
from fxquant.core.testing import (
    PostLNBlock,
    ToyViT,
    codes_and_output,
    family_model,
    float_rel_change,
    outlier_ln_two_linears,
    rel_max_diff,
    toy_calib,
    toy_vit,
)
from fxquant.passes import AnnotateRepQ, AnnotateUniform, Calibrate, InsertQuantizers, ReparameterizeLayerNorm

REPARAM_SITES = {
    # name: LayerNorm sites folded
    "deit_small_patch16_224": 25,
    "swin_tiny_patch4_window7_224": 27,
    "hf_vit": 5,
}
# default run: DeiT-S and Swin-T reduced (64 px, same depth; fxquant.core.testing.family_model);
# pytest -m slow: at 224 px
CASES = [pytest.param(name, True, id=name if name == "hf_vit" else f"{name}-64px") for name in REPARAM_SITES] + [
    pytest.param(name, False, id=f"{name}-224px", marks=pytest.mark.slow) for name in REPARAM_SITES if name != "hf_vit"]
SWIN = [pytest.param(True, id="64px"), pytest.param(False, id="224px", marks=pytest.mark.slow)]


def test_reparam_is_exact_in_float_cifar_vit(cifar_info, cifar_data, cifar_compiled):
    calib, x, _ = cifar_data
    q = cifar_compiled("repq-w4a4")
    sites = [f"blocks.{i}.norm{j}" for i in range(6) for j in (1, 2)] + ["norm"]
    assert fxquant.report(q)["repq_reparam"].record["sites"] == sites
    assert float_rel_change(cifar_info.model, q, x[:64]) < 1e-5


@pytest.mark.parametrize("name,reduced", CASES)
def test_reparam_is_exact_in_float_timm_and_hf(name, reduced):
    n_sites = REPARAM_SITES[name]
    model, res = family_model(name, reduced)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, res, res, generator=g)]
    q = fxquant.compile(model, recipe="repq-w4a4", calib=calib, progress=False, order="parallel")
    assert len(fxquant.report(q)["repq_reparam"].record["sites"]) == n_sites
    assert float_rel_change(model, q, torch.randn(2, 3, res, res, generator=g)) < 1e-5


@pytest.mark.parametrize("reduced", SWIN)
def test_swin_reduction_gets_a_bias_and_window_attention_is_log_quantized(reduced):
    model, res = family_model("swin_tiny_patch4_window7_224", reduced)
    assert model.layers[1].downsample.reduction.bias is None
    q = fxquant.compile(model, recipe="repq-w4a4", calib=[torch.randn(2, 3, res, res)], progress=False, order="parallel")
    red = q.get_submodule("layers.1.downsample.reduction")
    assert isinstance(red, QuantLinear) and isinstance(red.bias, nn.Parameter)
    assert "layers.1.downsample.norm" in fxquant.report(q)["repq_reparam"].record["sites"]
    skipped = fxquant.report(q)["annotate_repq"].record["skipped"]
    # the patch-embedding norm feeds the residual stream; the final norm feeds average pooling
    assert sorted(skipped) == ["norm", "patch_embed.norm"] and all("not only Linear" in r for r in skipped.values())
    mods = dict(q.named_modules())
    log_q = [mods[a.av.args[0].target] for a in match.find_attention(q, mods)]
    assert len(log_q) == 12 and all(fq.spec.scheme == "log_sqrt2" for fq in log_q)  # masked (shifted) windows too


def _ln_pipeline(reparam: ReparameterizeLayerNorm | None):
    # the same pipeline is in tools/repq_exactness.py (it needs fxquant.passes: not in fxquant.core.testing)
    act = QuantSpec(bits=4, estimator=PctMSE())
    passes = [AnnotateUniform(act=act), AnnotateRepQ(stem_input_bits=None, log_softmax=False), InsertQuantizers(), Calibrate()]
    return passes + ([reparam] if reparam else [])


@pytest.mark.parametrize("round_zp", [True, False])
def test_layerwise_codes_equal_per_channel_codes(round_zp):
    model = outlier_ln_two_linears()
    g = torch.Generator().manual_seed(7)
    calib = [torch.randn(64, 7, 12, generator=g)]
    x = torch.randn(32, 7, 12, generator=g)
    per_channel = fxquant.compile(model, passes=_ln_pipeline(None), calib=calib, progress=False)
    layerwise = fxquant.compile(model, passes=_ln_pipeline(ReparameterizeLayerNorm(round_target_zero_point=round_zp)),
                                calib=calib, progress=False)
    codes_c, y_c, fq_c = codes_and_output(per_channel, x)
    codes_t, y_t, fq_t = codes_and_output(layerwise, x)
    assert isinstance(fq_c.spec.granularity, PerAxis) and isinstance(fq_t.spec.granularity, PerTensor)
    assert fq_t.scale.numel() == 1
    if round_zp:
        # z̃ integer: x'/s̃ + z̃ = x/s_c + z_c, so the codes are the same integers (up to fp ties at .5,
        # none here) and the outputs agree to float rounding.
        assert torch.equal(codes_t, codes_c + 0)
        assert rel_max_diff(y_c, y_t) < 1e-5
    else:
        # RepQ's fractional z̃: codes shift by frac(z_c - z̃); each input channel's dequantized value moves
        # by less than one step s_c, so |Δy_j| <= Σ_c |W'_jc / r_c| s_c = Σ_c |W_jc| s_c.
        assert fq_t.zero_point.item() != round(fq_t.zero_point.item())  # this data gives a fractional z̃
        assert not torch.equal(codes_t, torch.round(codes_t))
        s_c = fq_c.scale.flatten()
        w = model.a.weight.abs() + model.b.weight.abs()
        bound = (w * s_c).sum(dim=1)
        assert ((y_c - y_t).abs() <= bound + 1e-5).all()


def test_layer_norm_feeding_a_residual_is_left_alone_and_reported():
    model = PostLNBlock().eval()
    before = model.norm.weight.clone()
    calib = [torch.randn(8, 5, 12)]
    q = fxquant.compile(model, recipe="repq-w8a8", calib=calib,
                        progress=False)
    rec = fxquant.report(q)["annotate_repq"].record
    assert rec["sites"] == [] and "norm" in rec["skipped"]
    assert "also feeds" in rec["skipped"]["norm"] and "add" in rec["skipped"]["norm"]
    assert torch.equal(q.get_submodule("norm").weight, before)
    assert fxquant.report(q)["repq_reparam"].record["sites"] == []


def test_log_sqrt2_softmax_has_17_levels_at_4_bits():
    q = fxquant.compile(toy_vit(), recipe="repq-w4a4", calib=toy_calib(), progress=False)
    mods = dict(q.named_modules())
    att = match.find_attention(q, mods)[0]
    fq = mods[att.av.args[0].target]
    assert fq.spec.scheme == "log_sqrt2" and fq.spec.bits == 4
    seen = {}
    h = fq.register_forward_hook(lambda m, i, o: seen.update(y=o))
    with torch.no_grad():
        q(torch.randn(64, 3, 8, 8))
    h.remove()
    assert seen["y"].unique().numel() <= 17


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_repq_accepts_any_uniform_width_and_composes(bits):
    m = ToyViT(head_bias=False).eval()
    calib = toy_calib()
    recipe = fxquant.get_recipe("repq-w4a4", w_bits=bits, a_bits=bits)
    passes = recipe.build_passes() + [Calibrate()]  # a later pass after the RepQ ones
    q = fxquant.compile(m, passes=passes, calib=calib, progress=False)
    assert isinstance(q.get_submodule("head").bias, nn.Parameter)  # created by the fold into a bias-free head
    assert float_rel_change(m, q, calib[0]) < 1e-5
    assert torch.isfinite(q(calib[0])).all()


def test_repq_artifact_round_trip_recreates_structure(tmp_path):
    m = ToyViT(head_bias=False).eval()
    q = fxquant.compile(m, recipe="repq-w4a4", calib=toy_calib(), progress=False)
    artifact.save(q, tmp_path / "r")
    loaded = artifact.load(tmp_path / "r", model=ToyViT(head_bias=False).eval())
    x = toy_calib()[1]
    assert torch.equal(loaded(x), q(x))
    assert isinstance(loaded.get_submodule("quantizers.block_q_in0").spec.granularity, PerTensor)
