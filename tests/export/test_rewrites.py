"""The export-time graph rewrites for OpenVINO (``fxquant.export.rewrites``) as registered passes,
run through the pass manager: ``split_fused_projections`` (a fused qkv Linear unbound into q, k, v
becomes one Linear per block of output channels) and ``hoist_act_quant`` (per-tensor activation
Q/DQ moved above the reshapes/transposes that feed it). Each on a small hand-built graph of export
modules and on the CIFAR ViT: the structural change, a graph that lints, idempotence, and the same
function to the bit (max |Δ| == 0: the rewrites move and slice, they do not compute anything new).
Needs neither onnx nor openvino (the exported files' checks are in test_openvino.py)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import fx, nn

from fxquant.core.pipeline import PASS_REGISTRY, PassContext, PassManager
from fxquant.core.quant import PerAxis, QuantSpec
from fxquant.export import HoistActQuantAboveMoves, SplitFusedProjections, prepare_for_export
from fxquant.export.modules import ExportActQuant, ExportLinear, _ExportWeight
from fxquant.export.rewrites import _moves_data_only, hoist_act_quant_above_moves, split_fused_projections

SYM8 = QuantSpec(bits=8, symmetric=True)


def _act(label: str, scale: float = 0.05) -> ExportActQuant:
    return ExportActQuant(SYM8, torch.tensor(scale), torch.tensor(0.0), label)


def _linear(out_features: int, in_features: int, seed: int) -> ExportLinear:
    """Random int8 codes with per-output-channel scales and a bias."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out_features, in_features), generator=g)
    scales = torch.rand(out_features, generator=g) * 0.004 + 0.001
    w = _ExportWeight(codes, scales, torch.zeros(out_features), f"linear{seed}")
    return ExportLinear(w, torch.randn(out_features, generator=g))


class _Attention(nn.Module):
    """timm's attention on export modules: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    .unbind(0)``; q, kᵀ, v, A and proj's input quantized per tensor where they are consumed
    (the onnxruntime placement). ``interleaved``: ``reshape(B, N, H, 3, d)`` (each head's q, k, v
    adjacent: the pieces interleave the output channels, no block split exists). ``reuse``: the qkv
    Linear is called a second time (its other call needs it whole)."""

    def __init__(self, dim: int = 16, heads: int = 2, interleaved: bool = False, reuse: bool = False):
        super().__init__()
        self.heads, self.interleaved, self.reuse = heads, interleaved, reuse
        self.qkv, self.proj = _linear(3 * dim, dim, 0), _linear(dim, dim, 1)
        self.q_act, self.k_act, self.v_act = _act("q", 0.04), _act("k", 0.05), _act("v", 0.03)
        self.a_act, self.p_act = _act("attn", 1 / 127), _act("proj_in", 0.02)

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.heads
        if self.interleaved:
            q, k, v = self.qkv(x).reshape(b, n, self.heads, 3, d).permute(3, 0, 2, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.a_act(torch.softmax(self.q_act(q) @ self.k_act(k.transpose(-2, -1)), dim=-1))
        y = self.proj(self.p_act((a @ self.v_act(v)).transpose(1, 2).reshape(b, n, c)))
        return y + self.qkv(x)[..., :c] if self.reuse else y


class _ExportTracer(fx.Tracer):
    """Export modules stay call_module nodes, as in ``prepare_for_export``'s graphs."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ExportLinear, ExportActQuant)) or super().is_leaf_module(m, qualname)


def _trace(root: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(root, _ExportTracer().trace(root))


def _run(gm: fx.GraphModule, passes, example_inputs=()) -> tuple[fx.GraphModule, list[str]]:
    out, report = PassManager(list(passes)).run(gm, PassContext(example_inputs=tuple(example_inputs), progress=False))
    return out, [r.summary for r in report.passes]


def _linears(gm: nn.Module) -> dict[str, ExportLinear]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, ExportLinear)}


def _quantizer_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    mods = dict(gm.named_modules())
    return [n.args[0] for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], ExportActQuant)]


def _x() -> torch.Tensor:
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(2))


def test_the_rewrites_are_registered_passes():
    assert PASS_REGISTRY["split_fused_projections"] is SplitFusedProjections
    assert PASS_REGISTRY["hoist_act_quant"] is HoistActQuantAboveMoves
    assert SplitFusedProjections().config() == {} == HoistActQuantAboveMoves().config()


def test_split_fused_projections_cuts_the_qkv_linear_into_channel_blocks():
    x = _x()
    gm = _trace(_Attention())
    with torch.no_grad():
        ref = gm(x)
    whole = copy.deepcopy(_linears(gm)["qkv"])
    gm, summaries = _run(gm, [SplitFusedProjections()], (x,))
    assert summaries == ["split 1 fused Linear(s) into one Linear per piece"]
    gm.graph.lint()
    # one Linear per piece, each with its block of output channels' codes, scales, zero points and bias
    assert _linears(gm).keys() == {"qkv_0", "qkv_1", "qkv_2", "proj"}
    for i in range(3):
        part, rows = _linears(gm)[f"qkv_{i}"], slice(16 * i, 16 * (i + 1))
        assert torch.equal(part.w.codes, whole.w.codes[rows]) and torch.equal(part.w.scales, whole.w.scales[rows])
        assert torch.equal(part.w.zps, whole.w.zps[rows]) and torch.equal(part.bias, whole.bias[rows])
    assert not any(n.target in ("unbind", torch.unbind) for n in gm.graph.nodes)
    # each piece: Linear → reshape without the size-3 dimension → permute without it
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("qkv_"):
            (reshape,) = node.users
            (permute,) = reshape.users
            assert (reshape.target, permute.target) == ("reshape", "permute") and permute.args[1:] == (0, 2, 1, 3)
    with torch.no_grad():
        assert torch.equal(gm(x), ref)
    code = gm.code
    assert split_fused_projections(gm) == 0 and gm.code == code  # idempotent


@pytest.mark.parametrize("variant", ["interleaved", "reuse", "no_shapes"])
def test_split_fused_projections_leaves_what_it_cannot_prove(variant):
    """Interleaved pieces (the index probe disagrees), a Linear called twice, or no example inputs
    (no shapes): nothing split, the graph as it was."""
    x = _x()
    gm = _trace(_Attention(interleaved=variant == "interleaved", reuse=variant == "reuse"))
    code = gm.code
    gm, summaries = _run(gm, [SplitFusedProjections()], () if variant == "no_shapes" else (x,))
    expected = "no example inputs (no shapes): nothing split" if variant == "no_shapes" else \
        "split 0 fused Linear(s) into one Linear per piece"
    assert summaries == [expected]
    assert gm.code == code and _linears(gm).keys() == {"qkv", "proj"}


def test_hoist_act_quant_moves_per_tensor_quantizers_above_the_moves():
    x = _x()
    gm = _trace(_Attention())
    with torch.no_grad():
        ref = gm(x)
    # onnxruntime placement: kᵀ's quantizer reads the transpose, proj's input quantizer the head-merging reshape
    assert sum(map(_moves_data_only, _quantizer_inputs(gm))) == 2
    gm, summaries = _run(gm, [HoistActQuantAboveMoves()])
    assert summaries == ["moved 2 activation quantizer(s) above reshapes/transposes"]
    gm.graph.lint()
    inputs = _quantizer_inputs(gm)
    assert len(inputs) == 5 and not any(map(_moves_data_only, inputs))
    mods = dict(gm.named_modules())
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], ExportActQuant)}
    assert by_target["k_act"].args[0].target is operator.getitem  # k itself, before its transpose
    assert by_target["p_act"].args[0].target is operator.matmul  # A·v, before the head merge
    with torch.no_grad():
        assert torch.equal(gm(x), ref)
    code = gm.code
    assert hoist_act_quant_above_moves(gm) == 0 and gm.code == code  # idempotent


def test_split_then_hoist_puts_q_k_v_quantizers_on_their_linears():
    """The order ``prepare_for_export(target="openvino")`` runs them in: after the split, q's, k's and
    v's quantizers reach their own Linears' outputs."""
    x = _x()
    gm = _trace(_Attention())
    with torch.no_grad():
        ref = gm(x)
    gm, summaries = _run(gm, [SplitFusedProjections(), HoistActQuantAboveMoves()], (x,))
    assert summaries == ["split 1 fused Linear(s) into one Linear per piece",
                         "moved 4 activation quantizer(s) above reshapes/transposes"]
    mods = dict(gm.named_modules())
    read = {n.target: n.args[0].target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods[n.target], ExportActQuant) and n.args[0].op == "call_module"}
    assert read == {"q_act": "qkv_0", "k_act": "qkv_1", "v_act": "qkv_2"}
    with torch.no_grad():
        assert torch.equal(gm(x), ref)
    again, summaries = _run(gm, [SplitFusedProjections(), HoistActQuantAboveMoves()], (x,))
    assert summaries == ["split 0 fused Linear(s) into one Linear per piece",
                         "moved 0 activation quantizer(s) above reshapes/transposes"]


class _Stays(nn.Module):
    """Quantizers the hoist must leave: a per-axis one (its axis would move with the transpose) and
    one whose reshape has a second user."""

    def __init__(self):
        super().__init__()
        self.per_axis = ExportActQuant(QuantSpec(bits=8, symmetric=True, granularity=PerAxis(-1)),
                                       torch.full((5,), 0.05), torch.zeros(5), "per_axis")
        self.shared = _act("shared")

    def forward(self, x):
        r = x.reshape(4, 80)
        return self.per_axis(x.transpose(1, 2)).sum() + (self.shared(r) + r).sum()


def test_hoist_act_quant_leaves_per_axis_and_shared_moves():
    x = _x()
    gm = _trace(_Stays())
    code = gm.code
    with torch.no_grad():
        ref = gm(x)
    gm, summaries = _run(gm, [HoistActQuantAboveMoves()])
    assert summaries == ["moved 0 activation quantizer(s) above reshapes/transposes"] and gm.code == code
    with torch.no_grad():
        assert torch.equal(gm(x), ref)


@pytest.fixture(scope="module")
def cifar_w8a8_sym(cifar_info):
    """The CIFAR ViT compiled by ``w8a8-sym`` on 8 calibration images (the rewrites' counts are
    structural; a few images keep the test short), and those images."""
    import fxquant
    from fxquant.core.data import load_data

    calib = load_data(cifar_info, "cifar10", calib_images=8, limit=8).calib
    q = fxquant.compile(cifar_info.model, recipe="w8a8-sym", calib=[calib], example_inputs=(calib[:2],), progress=False)
    return q, calib


def test_rewrite_passes_on_the_cifar_vit(cifar_w8a8_sym):
    """The real model (``w8a8-sym``): the six fused qkv Linears split (25 + 12 = 37 Linears) and 31
    per-tensor quantizers moved, none left reading a reshape/transpose; the very graph
    ``prepare_for_export(target="openvino")`` builds, and the same logits to the bit."""
    q, x = cifar_w8a8_sym
    gm = prepare_for_export(q)  # the onnxruntime placement: what the rewrites start from
    assert len(_linears(gm)) == 25 and sum(map(_moves_data_only, _quantizer_inputs(gm))) > 0
    passes = [SplitFusedProjections(), HoistActQuantAboveMoves()]
    out, summaries = _run(copy.deepcopy(gm), passes, (x[:2],))
    assert summaries == ["split 6 fused Linear(s) into one Linear per piece",
                         "moved 31 activation quantizer(s) above reshapes/transposes"]
    out.graph.lint()
    assert len(_linears(out)) == 37 and not any(n.target in ("unbind", torch.unbind) for n in out.graph.nodes)
    mods = dict(out.named_modules())
    assert not any(_moves_data_only(n, mods) for n in _quantizer_inputs(out))
    assert out.code == prepare_for_export(q, target="openvino", example_inputs=(x[:2],)).code
    with torch.no_grad():
        assert (out(x) - gm(x)).abs().max().item() == 0
    _, summaries = _run(out, passes, (x[:2],))  # idempotent
    assert summaries == ["split 0 fused Linear(s) into one Linear per piece",
                         "moved 0 activation quantizer(s) above reshapes/transposes"]
