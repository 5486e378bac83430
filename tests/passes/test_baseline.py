"""Baseline passes (annotate → insert → calibrate) on a hand-built graph and on the real CIFAR ViT."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.core import match
from fxquant.core.errors import ConfigError
from fxquant.core.quant import FakeQuantize, QuantConv2d, QuantLinear
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.passes import AnnotateUniform, Calibrate, InsertQuantizers


def _act_quantizer_nodes(gm):
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], FakeQuantize)]


def test_toy_graph_quantizer_counts_and_placement():
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False)
    mods = dict(q.named_modules())
    wq = [m for m in mods.values() if isinstance(m, (QuantLinear, QuantConv2d))]
    assert len(wq) == 8  # patch conv, q, k, v, proj, fc1, fc2, head
    qnodes = _act_quantizer_nodes(q)
    # patch input, shared q/k/v input, proj, fc1, fc2, head inputs, q, kᵀ, A, v
    assert len(qnodes) == 10
    shared = [n for n in qnodes if len(n.users) == 3]
    assert len(shared) == 1 and {u.target for u in shared[0].users} == {"block.q", "block.k", "block.v"}
    for n in q.graph.nodes:  # every Linear/Conv reads a quantizer output
        if match.op_kind(n, mods) in ("linear", "conv"):
            assert n.args[0] in qnodes
    for att in match.find_attention(q, mods):
        for mm in (att.qk, att.av):
            assert mm.args[0] in qnodes and mm.args[1] in qnodes
    assert not any(u in qnodes for u in q.graph.nodes if match.op_kind(u, mods) == "add")  # residuals stay float


def test_weights_lie_on_the_grid_and_specs_are_respected():
    q = fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            wq = m.weight_fake_quant(m.weight)
            for row in wq:
                assert row.unique().numel() <= 16
            assert m.weight_fake_quant.scale.shape == (m.out_features, 1)
    for n in _act_quantizer_nodes(q):
        fq = q.get_submodule(n.target)
        assert fq.spec.bits == 4 and fq.calibrated and fq.fake_quant_enabled and fq.scale.numel() == 1


def test_skip_glob_and_head_stem_8bit():
    q = fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False, skip=("head",), head_stem_8bit=True)
    assert not isinstance(q.get_submodule("head"), QuantLinear)
    assert isinstance(q.get_submodule("patch"), QuantConv2d)
    assert q.get_submodule("patch").weight_fake_quant.spec.bits == 8
    head_node = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == "head")
    head_in = head_node.args[0]
    assert not isinstance(q.get_submodule(head_in.target) if head_in.op == "call_module" else None, FakeQuantize)
    stem_in = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == "patch").args[0]
    assert q.get_submodule(stem_in.target).spec.bits == 8
    assert q.get_submodule("block.fc1").weight_fake_quant.spec.bits == 4


def test_overflow_fix_keeps_stem_or_all_weights_within_seven_bits():
    """``overflow_fix``: 8-bit weights of the patch embedding (``stem``, found by structure: the conv
    fed by the graph input) or of every layer (``all``) quantized at 7 bits, codes within ±64, so
    that no u8×s8 pair sum exceeds int16; lower widths stay as they are; the OpenVINO recipes ship
    with ``stem``; a wrong value is refused by name."""
    calib = toy_calib()

    def weight_bits(q):
        return {name: m.weight_fake_quant.spec.bits for name, m in q.named_modules()
                if isinstance(m, (QuantLinear, QuantConv2d))}

    none = weight_bits(fxquant.compile(toy_vit(), recipe="w8a8-sym", calib=calib, progress=False, overflow_fix="none"))
    stem_q = fxquant.compile(toy_vit(), recipe="w8a8-sym", calib=calib, progress=False)
    stem = weight_bits(stem_q)
    every = weight_bits(fxquant.compile(toy_vit(), recipe="w8a8-sym", calib=calib, progress=False, overflow_fix="all"))
    assert set(none.values()) == {8} and set(every.values()) == {7}
    assert stem == {**none, "patch": 7}
    patch = stem_q.get_submodule("patch")
    codes = torch.round(patch.weight / patch.weight_fake_quant.scale.reshape(-1, 1, 1, 1))
    assert codes.abs().max().item() <= 64
    assert set(weight_bits(fxquant.compile(toy_vit(), recipe="w4a4", calib=calib, progress=False,
                                           overflow_fix="all")).values()) == {4}
    for recipe in ("w8a8-sym", "w8a8-ov", "repq-w8a8-sym"):
        assert fxquant.get_recipe(recipe).overflow_fix == "stem"
    with pytest.raises(ConfigError, match=r"overflow_fix must be one of \['none', 'stem', 'all'\], got 'first'"):
        fxquant.get_recipe("w8a8-sym", overflow_fix="first")


def test_attention_matmuls_selects_the_quantized_attention_operands():
    """``attention_matmuls=("qk",)`` (NNCF's transformer scheme): q and kᵀ quantized, softmax·v in float."""
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False, attention_matmuls=("qk",))
    mods = dict(q.named_modules())
    qnodes = _act_quantizer_nodes(q)
    assert len(qnodes) == 8  # the 10 of w8a8 less A and v
    (att,) = match.find_attention(q, mods)
    assert att.qk.args[0] in qnodes and att.qk.args[1] in qnodes
    assert att.av.args[0] not in qnodes and att.av.args[1] not in qnodes
    with pytest.raises(ConfigError, match=r"attention_matmuls takes a non-empty subset of \['qk', 'av'\], got \['kv'\]"):
        fxquant.recipes.get_recipe("w8a8", attention_matmuls="kv")


def test_layer_kind_selection():
    q = fxquant.compile(toy_vit(), passes=[AnnotateUniform(layer_kinds=("linear",)), InsertQuantizers(), Calibrate()],
                        calib=toy_calib(), progress=False)
    assert not isinstance(q.get_submodule("patch"), QuantConv2d)
    assert isinstance(q.get_submodule("block.fc1"), QuantLinear)


def test_quantizers_inserted_disabled_until_calibrated():
    x = torch.randn(2, 3, 8, 8)
    m = toy_vit()
    q = fxquant.compile(m, passes=[AnnotateUniform(), InsertQuantizers()], example_inputs=(x,), progress=False)
    assert torch.equal(q(x), m(x))


def test_uniform_bits_2_to_8_compile(cifar_info, cifar_data):
    calib, x, _ = cifar_data
    with torch.no_grad():
        ref = cifar_info.model(x[:64])
    errs = []
    for b in (2, 3, 4, 6, 8):
        q = fxquant.compile(cifar_info.model, recipe="w4a4", calib=[calib], progress=False, w_bits=b, a_bits=b)
        with torch.no_grad():
            errs.append(((q(x[:64]) - ref) ** 2).mean().item())
    assert errs == sorted(errs, reverse=True)  # more bits, less error


def test_cifar_vit_w8a8_structure_and_accuracy(cifar_info, cifar_data, cifar_w8a8):
    _, x, y = cifar_data
    mods = dict(cifar_w8a8.named_modules())
    assert sum(isinstance(m, QuantLinear) for m in mods.values()) == 25  # 6 x (qkv, proj, fc1, fc2) + head
    assert sum(isinstance(m, QuantConv2d) for m in mods.values()) == 1
    assert len(_act_quantizer_nodes(cifar_w8a8)) == 26 + 24  # layer inputs + 4 attention operands x 6
    with torch.no_grad():
        fp = (cifar_info.model(x).argmax(1) == y).float().mean().item()
        q8 = (cifar_w8a8(x).argmax(1) == y).float().mean().item()
    assert abs(fp - q8) <= 0.01  # 500 real test images: within 1 pt (10k-image figure in docs/results.md)
