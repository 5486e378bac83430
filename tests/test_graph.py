"""Capture: every supported family traces to a graph that reproduces the model, with attention
visible as q·kᵀ → softmax → A·v, and the user's model untouched."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import fxquant
from fxquant import match
from fxquant.errors import TraceError
from conftest import tiny_vit


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8, num_labels=10)
    return ViTForImageClassification(cfg).eval()


FAMILIES = {
    # name: (constructor, input shape, attention blocks, layer norms)
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224"), (2, 3, 224, 224), 12, 25),
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224"), (2, 3, 224, 224), 12, 25),
    "deit_tiny_distilled_patch16_224": (lambda: timm.create_model("deit_tiny_distilled_patch16_224"), (2, 3, 224, 224), 12, 25),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), (2, 3, 224, 224), 12, 29),
    "hf_vit": (_hf_vit, (2, 3, 32, 32), 2, 5),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_reproduces_model_and_exposes_attention(family):
    make, shape, n_attn, n_ln = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    gm = fxquant.trace(model, (x,))
    with torch.no_grad():
        ref = fxquant.graph.logits_of(model(x))
        got = fxquant.graph.logits_of(gm(x))
    assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5)
    modules = match.modules_of(gm)
    attn = match.find_attention(gm, modules)
    assert len(attn) == n_attn
    assert len(match.nodes_of_kind(gm, "layer_norm", modules)) == n_ln
    assert len(match.stem_layers(gm, modules)) == 1
    gm.graph.lint()
    # other batch sizes run (HF is exported with a dynamic batch dimension)
    with torch.no_grad():
        assert fxquant.graph.logits_of(gm(torch.randn(3, *shape[1:]))).shape[0] == 3


def test_layer_norm_found_as_function_and_as_module():
    vit = fxquant.trace(tiny_vit(), (torch.randn(1, 3, 32, 32),))
    swin = fxquant.trace(timm.create_model("swin_tiny_patch4_window7_224").eval(), (torch.randn(1, 3, 224, 224),))
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
    gm = fxquant.trace(_hf_vit(), (torch.randn(2, 3, 32, 32),))
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
