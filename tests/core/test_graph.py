"""Capture: every supported family traces to a graph that reproduces the model, with attention
visible as q·kᵀ → softmax → A·v, and the user's model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.core import match
from fxquant.core.errors import TraceError
from fxquant.core.testing import REDUCED_FAMILIES, family_model, hf_vit, tiny_vit

STRUCTURE = {
    # name: (attention blocks, layer norms)
    "vit_tiny_patch16_224": (12, 25),
    "deit_small_patch16_224": (12, 25),
    "deit_tiny_distilled_patch16_224": (12, 25),
    "swin_tiny_patch4_window7_224": (12, 29),
    "hf_vit": (2, 5),
}
# default run: one model per family at reduced size (same class and depth at 64 px;
# fxquant.core.testing.family_model); pytest -m slow: every family here at 224 px
CASES = [pytest.param(name, True, id=name if name == "hf_vit" else f"{name}-64px") for name in REDUCED_FAMILIES] + [
    pytest.param(name, False, id=f"{name}-224px", marks=pytest.mark.slow) for name in STRUCTURE if name != "hf_vit"]


@pytest.mark.parametrize("family,reduced", CASES)
def test_capture_reproduces_model_and_exposes_attention(family, reduced):
    n_attn, n_ln = STRUCTURE[family]
    model, res = family_model(family, reduced)
    shape = (2, 3, res, res)
    x = torch.randn(*shape)
    gm = fxquant.trace(model, (x,))
    with torch.no_grad():
        ref = fxquant.core.graph.logits_of(model(x))
        got = fxquant.core.graph.logits_of(gm(x))
    assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5)
    modules = match.modules_of(gm)
    attn = match.find_attention(gm, modules)
    assert len(attn) == n_attn
    assert len(match.nodes_of_kind(gm, "layer_norm", modules)) == n_ln
    assert len(match.stem_layers(gm, modules)) == 1
    gm.graph.lint()
    # other batch sizes run (HF is exported with a dynamic batch dimension)
    with torch.no_grad():
        assert fxquant.core.graph.logits_of(gm(torch.randn(3, *shape[1:]))).shape[0] == 3


@pytest.mark.parametrize("reduced", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["swin-64px", "swin-224px"])
def test_layer_norm_found_as_function_and_as_module(reduced):
    vit = fxquant.trace(tiny_vit(), (torch.randn(1, 3, 32, 32),))
    swin_model, res = family_model("swin_tiny_patch4_window7_224", reduced)
    swin = fxquant.trace(swin_model, (torch.randn(1, 3, res, res),))
    vit_lns = match.nodes_of_kind(vit, "layer_norm")
    swin_lns = match.nodes_of_kind(swin, "layer_norm")
    assert vit_lns and all(n.op == "call_function" for n in vit_lns)  # timm LayerNorm is traced through
    assert any(n.op == "call_module" for n in swin_lns)  # Swin's nn.LayerNorm is a module


def test_identity_modules_named_norm_are_not_layer_norms(tiny_vit_model):
    gm = fxquant.trace(tiny_vit_model, (torch.randn(1, 3, 32, 32),))
    modules = match.modules_of(gm)
    q_norm = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).endswith("attn.q_norm"))
    assert match.op_kind(q_norm, modules) == "passthrough"


def test_trace_does_not_mutate_user_model(tiny_vit_model):
    before = {k: v.clone() for k, v in tiny_vit_model.state_dict().items()}
    fused = [m.fused_attn for m in tiny_vit_model.modules() if hasattr(m, "fused_attn")]
    calib = [torch.randn(4, 3, 32, 32)]
    fxquant.compile(tiny_vit_model, recipe="w4a4", calib=calib, progress=False)
    assert [m.fused_attn for m in tiny_vit_model.modules() if hasattr(m, "fused_attn")] == fused
    after = tiny_vit_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__name__.startswith("Quant") for m in tiny_vit_model.modules())


def test_hf_linears_become_modules_with_original_names():
    gm = fxquant.trace(hf_vit(), (torch.randn(2, 3, 32, 32),))
    linears = [n.target for n in match.nodes_of_kind(gm, "linear")]
    assert any(t.endswith("attention.q_proj") or t.endswith("attention.query") for t in linears)
    assert all(isinstance(gm.get_submodule(t), nn.Linear) for t in linears)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x):
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not traceable
            return x
        return -x


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError, match=r"(?s)inner\.1.*_Branchy.*leaf_modules=\[_Branchy\]"):
        fxquant.trace(_DataDependent(), (torch.randn(2, 4),))


def test_leaf_module_makes_it_traceable():
    gm = fxquant.trace(_DataDependent(), (torch.randn(2, 4),), leaf_modules=[_Branchy])
    assert any(n.op == "call_module" and n.target == "inner.1" for n in gm.graph.nodes)
