"""APHQ-ViT stage A (mlp_reconstruct): the swap, iteration-0 equality, ub, reproducibility, learning,
real models, composition with the quantization passes, the recipe, artifacts and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import artifact
from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import logits_of
from fxquant.core.quant import FakeQuantize
from fxquant.core.testing import ToyBlock, ToyViT, hf_vit, tiny_vit, toy_calib, toy_vit
from fxquant.passes import AnnotateUniform, Calibrate, InsertQuantizers, MLPReconstruct


def _mr(model=None, calib=None, seed=0, **options):
    return fxquant.compile(model if model is not None else toy_vit(), passes=[MLPReconstruct(**options)],
                           calib=calib if calib is not None else toy_calib(), progress=False, seed=seed)


def _plain_swap(model, x):
    """The float graph with F.gelu replaced by F.relu by hand (the toy calls F.gelu)."""
    gm = fxquant.trace(model, (x,))
    for n in gm.graph.nodes:
        if n.target is F.gelu:
            n.target = F.relu
    gm.recompile()
    return gm


def _rec(q):
    return fxquant.report(q)["mlp_reconstruct"].record


def test_iters_zero_and_lr_zero_equal_the_plain_swap():
    x = toy_calib()[0]
    ref = _plain_swap(toy_vit(), x)
    for opts in ({"iters": 0}, {"iters": 3, "lr": 0.0}):
        q = _mr(**opts)
        q.graph.lint()
        assert not [n for n in q.graph.nodes if match.op_kind(n, match.modules_of(q)) == "gelu"]
        with torch.no_grad():
            assert torch.equal(q(x), ref(x)), opts
    rec = _rec(_mr(iters=3, lr=0.0))["blocks"]["block"]
    assert rec["fc1"] == "block_fc1" and rec["fc2"] == "block_fc2" and rec["residual"] == "add_1"
    assert rec["loss_first"] > 0


def test_ub_is_the_positive_post_gelu_quantile_and_below_the_fp_max():
    model, calib = toy_vit(), toy_calib()
    seen = []
    handle = model.block.fc1.register_forward_hook(lambda m, i, o: seen.append(F.gelu(o)))
    with torch.no_grad():
        for x in calib:
            model(x)
    handle.remove()
    h = torch.cat([s.flatten() for s in seen])
    pos = h[h > 0]
    for q in (0.98, 0.99):
        rec = _rec(_mr(iters=1, ub_quantile=q))["blocks"]["block"]
        assert rec["ub"] <= rec["fp_max"] and rec["fp_max"] == pytest.approx(pos.max().item(), rel=1e-6)
        # histogram quantile: within two bins (2 · 2·max/16384) of the exact one
        assert abs(rec["ub"] - torch.quantile(pos, q).item()) <= 4 * pos.max().item() / 16384


def test_same_seed_is_bit_identical_and_the_seed_matters():
    a, b, c = _mr(iters=5, lr=1e-3), _mr(iters=5, lr=1e-3), _mr(iters=5, lr=1e-3, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["block.fc1.weight"], sc["block.fc1.weight"])
    x = toy_calib()[1]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_reconstruction_brings_the_relu_mlp_closer_to_the_gelu_model():
    model, calib = toy_vit(), toy_calib(n=4)
    q = _mr(model, calib, iters=60, lr=3e-3)
    rec = _rec(q)["blocks"]["block"]
    assert rec["loss_last"] < 0.5 * rec["loss_first"]
    x = torch.cat(calib)
    with torch.no_grad():
        fp, mr, swap = model(x), q(x), _plain_swap(model, x)(x)
    assert (mr - fp).pow(2).mean() < (swap - fp).pow(2).mean()
    # only fc1/fc2 changed
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {"block.fc1.weight", "block.fc1.bias", "block.fc2.weight", "block.fc2.bias"}


@pytest.mark.parametrize("make", [tiny_vit, hf_vit], ids=["timm-tiny-vit", "hf-vit"])
def test_runs_on_real_models(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    q = _mr(model, calib, iters=2)
    q.graph.lint()
    rec = _rec(q)
    assert len(rec["blocks"]) == 2 and len(rec["swapped"]) == 2
    assert all(r["ub"] <= r["fp_max"] and r["aph_rms"] > 0 for r in rec["blocks"].values())
    mods = match.modules_of(q)
    kinds = [match.op_kind(n, mods) for n in q.graph.nodes]
    assert kinds.count("relu") == 2 and "gelu" not in kinds
    assert len(match.find_blocks(q)) == 2  # blocks are still found with ReLU MLPs
    if make is tiny_vit:  # timm's nn.GELU modules become nn.ReLU modules at the same path
        assert isinstance(q.get_submodule("blocks.0.mlp.act"), nn.ReLU)
    with torch.no_grad():
        assert torch.isfinite(logits_of(q(calib[0]))).all()


def test_composes_before_the_quantization_passes():
    passes = [MLPReconstruct(iters=2), AnnotateUniform(), InsertQuantizers(), Calibrate()]
    q = fxquant.compile(toy_vit(), passes=passes, calib=toy_calib(), progress=False)
    assert [p.name for p in fxquant.report(q).passes] == ["mlp_reconstruct", "annotate_uniform", "insert_quantizers",
                                                          "calibrate"]
    assert any(isinstance(m, FakeQuantize) for m in q.modules())
    mods = match.modules_of(q)
    assert [match.op_kind(n, mods) for n in q.graph.nodes].count("relu") == 1
    with torch.no_grad():
        assert torch.isfinite(q(toy_calib()[0])).all()


def test_recipe_aphq_mr():
    r = fxquant.get_recipe("aphq-mr", iters="3")
    assert r.calib_images == 1024 and [p.name for p in r.build_passes()] == ["mlp_reconstruct"]
    assert r.option("iters") == 3 and r.option("ub_quantile") == 0.98
    q = fxquant.compile(toy_vit(), recipe="aphq-mr", iters=2, calib=toy_calib(), progress=False)
    assert len(_rec(q)["blocks"]) == 1
    assert "no quantization" in fxquant.list_recipes()["aphq-mr"]


def test_artifact_replays_the_swap_and_loads_the_trained_weights(tmp_path):
    q = _mr(iters=4, lr=1e-3)
    artifact.save(q, tmp_path / "mr")
    loaded = artifact.load(tmp_path / "mr", model=toy_vit())
    x = toy_calib()[2]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert fxquant.report(loaded)["mlp_reconstruct"].summary.startswith("replayed the GELU→ReLU swap of 1 MLPs")


class _NoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _GeluTwiceBlock(ToyBlock):
    """A ToyBlock whose GELU output is also read outside fc2 (not a Linear → GELU → Linear MLP)."""

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).reshape(b, n, 2, c // 2).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = torch.softmax((q @ k.transpose(-2, -1)) * (c // 2) ** -0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        g = F.gelu(self.fc1(self.norm2(x)))
        return x + self.fc2(g) + g.mean(-1, keepdim=True)


def _gelu_twice_vit() -> ToyViT:
    torch.manual_seed(0)
    m = ToyViT()
    m.block = _GeluTwiceBlock()
    return m.eval()


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(PassError, match="GELU node 'gelu' in block 'block' is not a Linear → GELU → Linear MLP"):
        _mr(_gelu_twice_vit(), iters=1)
    with pytest.raises(PassError, match="needs calibration data"):
        fxquant.compile(toy_vit(), passes=[MLPReconstruct()], example_inputs=toy_calib()[0], progress=False)
    with pytest.raises(PassError, match="iterable of batches"):
        fxquant.compile(toy_vit(), passes=[MLPReconstruct()], calib=lambda m: m(toy_calib()[0]),
                        example_inputs=toy_calib()[0], progress=False)
    with pytest.raises(PassError, match="found no transformer block"):
        _mr(_NoBlock().eval(), [torch.randn(2, 3, 4)], iters=1)
    with pytest.raises(PassError, match="node 'patch' is already annotated.*before='annotate_uniform'"):
        fxquant.compile(toy_vit(), passes=[AnnotateUniform(), MLPReconstruct()], calib=toy_calib(), progress=False)
    with pytest.raises(PassError, match="already use ReLU: was mlp_reconstruct run twice"):
        fxquant.compile(toy_vit(), passes=[MLPReconstruct(iters=0), MLPReconstruct(iters=0)], calib=toy_calib(),
                        progress=False)
    with pytest.raises(ConfigError, match="ub_quantile must be in"):
        MLPReconstruct(ub_quantile=1.5)
    with pytest.raises(ConfigError, match="aph_direction must be one of"):
        MLPReconstruct(aph_direction="diag")
