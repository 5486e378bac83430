"""IGQ-ViT passes: ``group_quant`` annotations on a hand-built graph and on the CIFAR ViT, the
allocation's knapsack (exact, never over budget), ``allocate_groups`` end to end with artifact
replay, recipes and the ``fxquant platform`` command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxquant
from fxquant import artifact
from fxquant.cli import main
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.meta import input_specs
from fxquant.core.quant import FakeQuantize, InstanceGroups, PerAxis, PerGroup, PerTensor, QuantSpec
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.passes import AllocateGroups, AnnotateUniform, Calibrate, GroupQuant, InsertQuantizers
from fxquant.passes.igq import group_quantizers

W4 = QuantSpec(bits=4, granularity=PerAxis(0))
A4 = QuantSpec(bits=4, granularity=PerTensor())


class TwoLinears(nn.Module):
    def __init__(self, c: int = 12):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _calib(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, 12, generator=g) * torch.logspace(-1, 1, 12) for _ in range(n)]


def _passes(mode: str = "instance", g: int = 4, allocate: bool = False):
    out = [AnnotateUniform(weight=W4, act=A4), GroupQuant(num_groups=g, mode=mode), InsertQuantizers(), Calibrate()]
    return out + ([AllocateGroups(candidates=(1, 2, 4), budget_groups=2, max_images=8)] if allocate else [])


@pytest.mark.parametrize("mode,gran", [("instance", InstanceGroups), ("contiguous", PerGroup)])
def test_group_quant_annotates_every_linear_input(mode, gran):
    q = fxquant.compile(TwoLinears(), passes=_passes(mode), calib=_calib(), progress=False)
    linears = [n for n in q.graph.nodes if n.op == "call_module" and n.target in ("fc1", "fc2")]
    assert all(isinstance(input_specs(n)[0].granularity, gran) for n in linears)
    assert len(group_quantizers(q)) == 2
    for _, fq in group_quantizers(q):
        assert isinstance(fq.spec.granularity, gran) and fq.spec.bits == 4
        assert fq.scale.numel() == 4 if mode == "instance" else fq.scale.shape[-1] == 4
    q.graph.lint()
    x = _calib(seed=9)[0]
    model = TwoLinears()
    model.load_state_dict({k: v for k, v in q.state_dict().items() if k in model.state_dict()})
    with torch.no_grad():
        err = (q(x) - model(x)).abs().mean() / model(x).abs().mean()
    assert 0 < err < 0.3  # quantized, and close to the float function


def test_contiguous_groups_that_do_not_divide_name_the_layer():
    with pytest.raises(ConfigError, match=r"Linear .fc1.: 12 channels do not split into 5 contiguous groups \(C % G must be 0\)"):
        fxquant.compile(TwoLinears(), passes=_passes("contiguous", g=5), calib=_calib(), progress=False)


def test_group_quant_needs_annotations_and_a_known_mode():
    with pytest.raises(ConfigError, match="mode must be one of"):
        GroupQuant(mode="sorted")
    with pytest.raises(ConfigError, match=r"budget_groups=8 must be one of the candidates \[1, 2, 4\]"):
        AllocateGroups(candidates=(1, 2, 4))
    with pytest.raises(ConfigError, match="candidates must be group counts >= 1"):
        AllocateGroups(candidates=("a",))
    assert AllocateGroups(candidates=("8", "2", "2")).candidates == (2, 8)  # command-line strings
    with pytest.raises(PassError, match="no Linear input quantizer to group"):
        fxquant.compile(TwoLinears(), passes=[AnnotateUniform(weight=W4, act=A4), GroupQuant(skip=("fc1", "fc2"))],
                        calib=_calib(), progress=False)


def test_allocate_groups_stays_within_budget_and_replays(tmp_path):
    q = fxquant.compile(toy_vit(), passes=[AnnotateUniform(weight=W4, act=A4), GroupQuant(num_groups=2), InsertQuantizers(),
                                           Calibrate(), AllocateGroups(candidates=(1, 2, 4), budget_groups=2, max_images=8,
                                                                       max_budget_units=3)],  # a coarse DP
                        calib=toy_calib(), progress=False)
    rec = fxquant.report(q)["allocate_groups"].record
    assert rec["group_bops"] <= rec["budget_bops"]
    chosen = {name: fq.spec.granularity.num_groups for name, fq in group_quantizers(q)}
    assert chosen == rec["groups"] and set(chosen.values()) <= {1, 2, 4}
    assert all(fq.scale.shape == (g,) for (_, fq), g in zip(group_quantizers(q), chosen.values()))
    x = toy_calib(n=1, batch=2)[0]
    path = artifact.save(q, tmp_path / "igq", example_inputs=(x,))
    back = artifact.load(path, model=toy_vit())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_igq_recipe_on_the_cifar_vit(cifar_compiled, cifar_data):
    q = cifar_compiled("igq-w4a4")
    groups = group_quantizers(q)
    rows = [fq for _, fq in groups if fq.spec.granularity.axis == -2]
    assert len(groups) == 6 * 4 + 1 + 6 and len(rows) == 6  # every Linear input + the head + one A per block
    assert all(fq.scale.shape == (8,) for _, fq in groups)
    stem = [m for _, m in q.named_modules() if isinstance(m, FakeQuantize) and not m.weight and "patch_embed" in m.label]
    assert stem and all(m.spec.bits == 8 for m in stem)
    _, x, y = cifar_data
    with torch.no_grad():
        acc = (q(x[:200]).argmax(1) == y[:200]).float().mean().item()
    assert acc > 0.6  # FP32 on these 200 images: 0.74


def test_platform_recipe_options():
    r = fxquant.get_recipe("platform", channel_wise=False, n_groups=4, head_stem="int8", eps=1e-4)
    names = [p.name for p in r.build_passes()]
    assert names == ["annotate_uniform", "group_quant", "insert_quantizers", "calibrate"]
    ann = r.build_passes()[0]
    assert ann.head_stem_8bit and not ann.head_stem_float and ann.act.estimator.p == pytest.approx(1 - 1e-4)
    cw = fxquant.get_recipe("platform").build_passes()
    assert [p.name for p in cw] == ["annotate_uniform", "insert_quantizers", "calibrate"]
    assert cw[0].layer_act.granularity == PerAxis(-1) and cw[0].head_stem_float
    with pytest.raises(ConfigError, match="head_stem must be one of"):
        fxquant.get_recipe("platform", head_stem="half")


def test_platform_command_line_both_flag_spellings(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["platform", "--model", "embedded", "--channel_wise=True", "--head_stem_8bit", "--eps=1e-4", "--n_bits", "4",
               "--n_groups=8", "--data", "cifar10", "--limit", "16", "--calib_images", "8", "--test_before_calibration",
               "--quiet", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Test accuracy before calibration (fp32)" in text and "has no effect" in text
    res = json.loads(out.read_text())
    assert set(res) == {"model", "recipe", "top1", "fp32_top1", "test_images", "calib_images", "calib_seconds",
                        "eval_seconds", "seed"}
    assert res["seed"] == 1 and res["test_images"] == 16 and "head_stem=float" in res["recipe"]
    with pytest.raises(SystemExit):  # --name and --model exclude each other (argparse)
        main(["platform", "--name", "deit_small", "--model", "cifar-vit"])


@pytest.mark.slow
@pytest.mark.parametrize("allocate", [False, True])
def test_igq_on_swin_groups_window_attention(allocate):
    from fxquant.core.testing import family_data, family_model

    model, res = family_model("swin_tiny_patch4_window7_224", reduced=True)
    calib, x = family_data(res)
    q = fxquant.compile(model, recipe="igq-w4a4", calib=calib, progress=False, allocate=allocate, candidates=(2, 8),
                        w_estimator="minmax", a_estimator="minmax")  # the range searches are tested elsewhere
    if allocate:
        rec = fxquant.report(q)["allocate_groups"].record
        assert rec["group_bops"] <= rec["budget_bops"] and set(rec["groups"].values()) <= {2, 8}
    rows = [fq for _, fq in group_quantizers(q) if fq.spec.granularity.axis == -2]
    assert len(rows) == 12  # one attention map per Swin block (2 + 2 + 6 + 2)
    with torch.no_grad():
        y, ref = q(x), model(x)
    assert torch.isfinite(y).all() and y.shape == ref.shape


def test_group_quant_after_repq_keeps_the_layer_norm_sites():
    """``repq-igq-w4a4``: RepQ-ViT folds the post-LayerNorm inputs; the other Linear inputs and the
    attention rows get instance-aware groups."""
    q = fxquant.compile(toy_vit(), recipe="repq-igq-w4a4", calib=toy_calib(), progress=False)
    rec = fxquant.report(q)["group_quant"].record
    assert rec["kept"] >= 2 and rec["linear_inputs"] >= 2 and rec["attention_rows"] == 1
    assert fxquant.report(q)["repq_reparam"].modified
    labels = {fq.label for _, fq in group_quantizers(q)}
    assert not any("qkv" in lab or "fc1" in lab for lab in labels)


def test_allocation_with_one_candidate_is_the_calibrated_model():
    """With G itself the only candidate, allocation recalibrates every quantizer exactly as the
    parallel calibrate pass did: the same model."""
    base = [AnnotateUniform(weight=W4, act=A4), GroupQuant(num_groups=2), InsertQuantizers(), Calibrate()]
    x = toy_calib(n=1, batch=2)[0]
    plain = fxquant.compile(toy_vit(), passes=base, calib=toy_calib(), progress=False)
    alloc = fxquant.compile(toy_vit(), passes=base + [AllocateGroups(candidates=(2,), budget_groups=2, max_images=None)],
                            calib=toy_calib(), progress=False)
    with torch.no_grad():
        assert torch.equal(alloc(x), plain(x))
