"""Export-time graph rewrites for OpenVINO, as registered passes.

``prepare_for_export(target="openvino")`` runs them through the pass manager, after the handlers
made the graph export-ready. They change the Q/DQ placement, not the function: each fused qkv
Linear whose output is unbound into q, k and v becomes three Linears over its three blocks of
output channels (``SplitFusedProjections``, pass ``split_fused_projections``), and then every
per-tensor activation Q/DQ moves above the reshapes/transposes that feed it
(``HoistActQuantAboveMoves``, pass ``hoist_act_quant``), so that q's, k's and v's Q/DQ sit on
their Linears' outputs and the projection input's on the attention output. OpenVINO's CPU plugin
fuses all of them into their producers (CIFAR ViT ``w8a8-sym``: 2 standalone FakeQuantize left,
the image and head inputs; NNCF's model has 14) and runs its fused attention subgraphs on int8 q,
k and v (``openvino_ir.PluginRecord.attention``). Each pass reports how many it rewrote in its
summary; the functions behind them (``split_fused_projections``, ``hoist_act_quant_above_moves``)
return the count.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxquant.core import match
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass

from .modules import ExportActQuant, ExportLinear

# single-tensor data movement: a per-tensor quantizer commutes with these exactly (it is elementwise
# with one scale and zero point), so its Q/DQ pair may sit before or after them
_MOVES_METHODS = {"reshape", "view", "transpose", "permute", "flatten", "contiguous"}
_MOVES_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten}


def _moves_data_only(node: object, modules: dict | None = None) -> bool:
    """Reshape/transpose-like ops, and identity-like ones (``match`` kind "passthrough": Identity,
    dropout in eval), on one tensor input."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method" and node.target in _MOVES_METHODS:
        return True
    if node.op == "call_function" and node.target in _MOVES_FUNCTIONS:
        return True
    return modules is not None and match.op_kind(node, modules) == "passthrough" and match.tensor_input(node) is node.args[0]


def hoist_act_quant_above_moves(gm: fx.GraphModule) -> int:
    """Move every per-tensor activation quantizer (``ExportActQuant``) above the chain of reshape /
    transpose / permute / flatten / identity ops that feeds it (each used once): the same function exactly.
    OpenVINO's CPU plugin then fuses the FakeQuantize into the op that produced the tensor (e.g. the
    attention output before its head-merging transpose/reshape, as in NNCF's graphs) instead of
    running it standalone; onnxruntime instead wants the DQ right before its MatMul. Returns how
    many quantizers moved."""
    modules = dict(gm.named_modules())
    moved = 0
    for node in list(gm.graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(mod, ExportActQuant) or mod.spec.scheme != "uniform" or mod.axis is not None \
                or len(node.args) != 1 or node.kwargs:
            continue
        chain = []
        cur = node.args[0]
        while _moves_data_only(cur, modules) and len(cur.users) == 1:
            chain.append(cur)
            cur = cur.args[0]
        if not chain:
            continue
        top = chain[-1]
        with gm.graph.inserting_before(top):
            new = gm.graph.call_module(node.target, (cur,))
        top.args = (new,) + tuple(top.args[1:])
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def _permute_dims(node: fx.Node, rank: int) -> list[int] | None:
    """The dimension order of a ``permute`` node (all ints), normalized to ``[0, rank)``."""
    dims = list(node.args[1:]) if node.args[1:] else list(node.kwargs.get("dims", ()))
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    return [d % rank for d in dims]


def _reshape_sizes(node: fx.Node) -> list | None:
    """The size arguments of a ``reshape``/``view`` call (ints or nodes), flattened."""
    sizes = list(node.args[1:]) if node.args[1:] else list(node.kwargs.get("shape", ()))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return sizes or None


def split_fused_projections(gm: fx.GraphModule) -> int:
    """Export a Linear whose output is reshaped, permuted and ``unbind``-ed into P pieces (timm's
    fused ``qkv``: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``) as P Linears
    over the P contiguous blocks of output channels, each followed by the same reshape without the
    size-P dimension and the permutation without it (``q = q_proj(x).reshape(B, N, H, d)
    .permute(0, 2, 1, 3)``, as Hugging Face models are written). Every output channel keeps its
    weight codes, scale, zero point and bias, and each output is the same dot product: the same
    function.

    Why: each piece's per-tensor quantizer (q, k, v at the attention matmuls) can then move onto
    its own Linear's output (``hoist_act_quant_above_moves``), where OpenVINO's CPU plugin fuses it
    into the FullyConnected (int8 output), instead of running a standalone FakeQuantize, between two
    layout reorders, on each piece of the split tensor. (One per-channel quantizer on the fused
    output was tried too: OpenVINO then runs the attention in bf16, not carrying per-channel
    dequantization through the head-splitting reshape; on the ``[3, B, H, N, d]`` tensor, per axis
    0, it decomposes the FakeQuantize into slow elementwise ops.)

    Which channels go to which piece is checked, not assumed: an index probe of the Linear's
    recorded output shape (``tensor_meta``: ``graph.propagate_shapes``) is run through the
    original reshape/permute/unbind and through each piece's new chain, and they must agree element
    for element. Returns how many Linears were split."""
    modules = dict(gm.named_modules())
    split_count = 0
    for split in list(gm.graph.nodes):
        if not (split.op == "call_method" and split.target == "unbind") and not (
                split.op == "call_function" and split.target is torch.unbind):
            continue
        dim = split.args[1] if len(split.args) > 1 else split.kwargs.get("dim", 0)
        permute = split.args[0]
        if not isinstance(dim, int) or not isinstance(permute, fx.Node) or len(permute.users) != 1:
            continue
        if permute.op == "call_method" and permute.target == "permute":
            reshape = permute.args[0]
        else:  # unbind right after the reshape
            reshape, permute = permute, None
        if not (isinstance(reshape, fx.Node) and reshape.op == "call_method" and reshape.target in ("reshape", "view")
                and len(reshape.users) == 1):
            continue
        linear = reshape.args[0]
        if not (isinstance(linear, fx.Node) and linear.op == "call_module"
                and isinstance(modules.get(linear.target), ExportLinear) and len(linear.users) == 1):
            continue
        if any(n is not linear and n.op == "call_module" and n.target == linear.target for n in gm.graph.nodes):
            continue  # a Linear module called more than once: its other calls still need it whole
        lin_shape, out_shape, sizes = match.tensor_shape(linear), match.tensor_shape(reshape), _reshape_sizes(reshape)
        if lin_shape is None or out_shape is None or sizes is None or len(sizes) != len(out_shape) or -1 in lin_shape:
            continue
        rank = len(out_shape)
        perm = _permute_dims(permute, rank) if permute is not None else list(range(rank))
        if perm is None:
            continue
        dim %= rank
        j = perm[dim]  # the reshape's output dimension that is unbound
        n_pieces, channels = out_shape[j], lin_shape[-1]
        pieces = list(split.users)
        if (sizes[j] != n_pieces or n_pieces < 2 or channels % n_pieces or not all(
                p.op == "call_function" and p.target is operator.getitem and isinstance(p.args[1], int) for p in pieces)):
            continue
        new_sizes = sizes[:j] + sizes[j + 1:]
        new_perm = [p - (p > j) for p in perm if p != j]
        # the probe: element indices of the Linear's output, through the old chain and the new ones
        index = torch.arange(math.prod(lin_shape), dtype=torch.int64).reshape(lin_shape)
        old = index.reshape(out_shape).permute(perm).unbind(dim)
        width = channels // n_pieces
        piece_shape = list(out_shape[:j]) + list(out_shape[j + 1:])
        if not all(torch.equal(old[i], index[..., i * width:(i + 1) * width].reshape(piece_shape).permute(new_perm))
                   for i in range(n_pieces)):
            continue
        mod = modules[linear.target]
        for p in pieces:
            i = p.args[1] % n_pieces
            rows = slice(i * width, (i + 1) * width)
            part = ExportLinear(mod.w.rows(rows, f"{linear.target}[{i}]"), None if mod.bias is None else mod.bias[rows],
                                mod.act)
            target = f"{linear.target}_{i}"
            gm.add_submodule(target, part)
            with gm.graph.inserting_before(p):
                y = gm.graph.call_module(target, linear.args, linear.kwargs)
                y = gm.graph.call_method(reshape.target, (y, *new_sizes))
                if permute is not None:
                    y = gm.graph.call_method("permute", (y, *new_perm))
            p.replace_all_uses_with(y)
            gm.graph.erase_node(p)
        for node in (split, permute, reshape, linear):
            if node is not None:
                gm.graph.erase_node(node)
        gm.delete_submodule(linear.target)
        split_count += 1
    if split_count:
        gm.graph.lint()
        gm.recompile()
    return split_count


@register_pass
@dataclass(frozen=True)
class SplitFusedProjections(Pass):
    """Export for OpenVINO: a fused qkv Linear unbound into pieces becomes one Linear per piece.

    ``split_fused_projections`` on the recorded shapes (the manager's ``SHAPES`` fact, from
    ``ctx.example_inputs``; ``prepare_for_export`` drops the compile-time shapes of its copy first,
    so they are the export inputs' shapes). Without example inputs nothing is split."""

    name = "split_fused_projections"
    requires = (SHAPES,)
    provides = ("projections_split",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.example_inputs:
            return PassResult(gm, modified=False, summary="no example inputs (no shapes): nothing split")
        n = split_fused_projections(gm)
        return PassResult(gm, modified=n > 0, summary=f"split {n} fused Linear(s) into one Linear per piece")


@register_pass
@dataclass(frozen=True)
class HoistActQuantAboveMoves(Pass):
    """Export for OpenVINO: per-tensor activation Q/DQ moved above the reshapes/transposes feeding it.

    ``hoist_act_quant_above_moves``; best after ``split_fused_projections`` (q's, k's and v's
    quantizers then reach their own Linears' outputs)."""

    name = "hoist_act_quant"
    provides = ("act_quant_hoisted",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        n = hoist_act_quant_above_moves(gm)
        return PassResult(gm, modified=n > 0, summary=f"moved {n} activation quantizer(s) above reshapes/transposes")
