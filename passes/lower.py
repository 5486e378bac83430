"""``LowerToKernels``: replace fake-quantized Linears, patch convolutions and attention matmuls by integer modules.

A node ``FakeQuantize(x) → QuantLinear`` whose activation quantizer is uniform, per tensor, with
an integer zero point, and whose weight quantizer is uniform per output channel (or per tensor),
becomes one ``LoweredLinear(x)`` holding the signed integer weight codes (int8, or int4 packed two
per byte for ≤ 4-bit weights), the scales, zero points and weight column sums. It quantizes its
input itself and runs ``fxquant.kernels.int_linear``: the Triton kernels on CUDA, the exact
integer CPU path (``torch._int_mm``) elsewhere.

A ``FakeQuantize(x) → QuantConv2d`` that is a patch embedding (stride = kernel, padding 0,
dilation 1, one group, zero padding mode: a Linear over non-overlapping patches), with the same
quantizer conditions (input uniform per tensor with an integer zero point, weight uniform per
output channel), becomes a ``LoweredPatchConv(x)``: a ``LoweredLinear`` over the ``C·kh·kw``
patch rows, gathered by reshape/permute, on the same integer kernels.

A ``FakeQuantize(x) → QuantLinear`` whose input quantizer is dynamic per token (or per image), with
no channel groups (``Dynamic(level)``, ``a_dynamic``), becomes a ``LoweredLinear`` too: it computes
each token's (scale, zero point) from its input with the quantizer core's rule and runs the same
integer GEMM with per-row activation parameters. Dynamic token groups raise a ``ConfigError`` (no
kernel takes per-(token, group) parameters yet); dynamic patch-conv inputs and attention operands
are kept in fake quantization, with the reason.

A ``QuantLinear`` whose input quantizer groups the channels (IGQ-ViT, ``passes/igq.py``):
``InstanceGroups`` on the last axis (each instance assigns its channels to the ``G`` static
quantizers) or ``PerGroup`` on the last axis (fixed channel blocks), uniform with integer zero
points, becomes a ``LoweredGroupedLinear(x)``: it computes the codes and the per-instance group
map with the quantizer core and runs ``fxquant.kernels.grouped_linear`` (one integer partial sum
per group, rescaled by ``s_g`` in a float32 epilogue).

A node ``matmul(FakeQuantize(a), FakeQuantize(b))`` (q·kᵀ and A·v) with per-tensor quantizers,
``b`` uniform, becomes ``LoweredMatmul(a, b)`` (``fxquant.kernels.int_attention``): an integer
GEMM when ``a`` is uniform, shift accumulators when ``a`` is RepQ-ViT's log2/log√2 quantizer (up
to 6 bits; 8-bit log levels reach 2^-128 and stay in float), integer BitLog2 levels otherwise.

Then each ``LoweredMatmul(q, kᵀ) → softmax → LoweredMatmul(A, v)`` chain with a uniform ``q·kᵀ``
and a uniform or BitLog2 ``A`` becomes one ``LoweredAttention(q, kᵀ, v)``
(``kernels/fused_attention.py``: scores, softmax, codes and the integer A·v in one kernel on CUDA;
the same two modules and ``torch.softmax`` on CPU), unless ``fuse_attention=False``.

Everything else stays as it is, and the pass reports why (log-quantized Linear inputs,
per-channel activations, groups on another axis, fractional zero points, convolutions that are not
patch embeddings or have grouped inputs, QwT compensation). RepQ-ViT's
folded weights and QwT's compensation nodes are untouched, so they survive lowering.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from timm.layers import attention as timm_attention
from torch import fx, nn

from fxquant.core import match
from fxquant.core.errors import ConfigError
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, InstanceGroups, PerAxis, PerGroup, PerTensor, QuantConv2d, QuantLinear, QuantSpec
from fxquant.kernels.int_attention import MAX_LOG_SHIFT, log_max_shift
from fxquant.kernels.lowered import (
    LoweredAttention,
    LoweredGroupedLinear,
    LoweredLinear,
    LoweredMatmul,
    LoweredPatchConv,
    patch_conv_mismatch,
)


def _per_tensor(fq: FakeQuantize) -> bool:
    return isinstance(fq.spec.granularity, PerTensor) and fq.scale.numel() == 1


def _channel_groups(spec: QuantSpec) -> bool:
    """Channel groups of a Linear input: ``InstanceGroups`` or ``PerGroup`` (not per tensor)."""
    return isinstance(spec.granularity, (InstanceGroups, PerGroup))


def _lowered_class(spec: QuantSpec) -> type:
    """The lowered module for a Linear with input quantizer ``spec`` (one rule for compile and replay)."""
    return LoweredGroupedLinear if _channel_groups(spec) else LoweredLinear


def _integer_zero_point(fq: FakeQuantize) -> bool:
    return (fq.spec.integer_zero_point and fq.spec.zero_point_domain == "int"
            and torch.equal(fq.zero_point, fq.zero_point.round()))


def _drop_if_unused(gm: fx.GraphModule, quantizer_node: fx.Node) -> None:
    """Remove a fake-quantize node, and its module, that the lowered module has made redundant."""
    if quantizer_node.users:
        return
    gm.graph.erase_node(quantizer_node)
    gm.delete_submodule(str(quantizer_node.target))


def _why_not_matmul(a_fq: FakeQuantize | None, b_fq: FakeQuantize | None) -> str:
    if a_fq is None or b_fq is None or a_fq is b_fq:
        return "operands are not both fake-quantized"
    if not (a_fq.fake_quant_enabled and b_fq.fake_quant_enabled):
        return "quantizers are disabled"
    if a_fq.spec.dynamic or b_fq.spec.dynamic:
        return "operand quantizer has dynamic (per-input) ranges; attention matmuls are lowered with static per-tensor operands"
    if not (_per_tensor(a_fq) and _per_tensor(b_fq)):
        return "operand quantizer is not per tensor"
    if b_fq.spec.scheme != "uniform" or not _integer_zero_point(b_fq):
        return f"second operand quantizer {b_fq.spec.short()} is not uniform with an integer zero point"
    a = a_fq.spec
    if a.scheme == "uniform" and not _integer_zero_point(a_fq):
        return "first operand zero point is fractional"
    if a.scheme in ("log2", "log_sqrt2") and log_max_shift(a) > MAX_LOG_SHIFT:
        return f"{a.short()} levels reach 2^-{log_max_shift(a)}, beyond the {MAX_LOG_SHIFT}-bit shift of the integer path"
    return ""


def _why_not(linear: nn.Module, act: FakeQuantize | None, name: str = "") -> str:
    if act is None:
        return "input is not fake-quantized"
    a, w = act.spec, linear.weight_fake_quant.spec
    if a.scheme != "uniform":
        return f"input quantizer is {a.scheme}"
    if a.dynamic:
        if isinstance(linear, nn.Conv2d):
            return f"dynamic input ranges ({a.short()}) are not lowered for convolutions"
        if a.granularity.group_size:
            raise ConfigError(f"lower_to_kernels: '{name}' has dynamic token-group activations ({a.short()}: one range per "
                              f"token and group of {a.granularity.group_size} channels); dynamic token-group activations "
                              f"cannot be lowered yet (per-token ones can: a_group_size=0), or compile without lower=True")
    elif _channel_groups(a):
        if isinstance(linear, nn.Conv2d):
            return f"input channel groups ({a.short()}) are not lowered for convolutions"
        if a.granularity.axis != -1:
            return f"input channel groups ({a.short()}) are not on the last axis"
    elif not _per_tensor(act):
        return "input quantizer is not per tensor"
    if not _integer_zero_point(act):
        return "input zero point is fractional"
    if w.scheme != "uniform" or not isinstance(w.granularity, (PerAxis, PerTensor)):
        return f"weight quantizer {w.short()} is not uniform per channel"
    if isinstance(w.granularity, PerAxis) and w.granularity.axis not in (0, -linear.weight.dim()):
        return "weight quantizer is not per output channel"
    if not torch.equal(linear.weight_fake_quant.zero_point, linear.weight_fake_quant.zero_point.round()):
        return "weight zero point is fractional"
    if not (act.fake_quant_enabled and linear.weight_fake_quant.fake_quant_enabled):
        return "quantizers are disabled"
    return ""


@register_pass
@dataclass(frozen=True)
class LowerToKernels(Pass):
    """Replace fake-quantized Linears, patch convolutions and attention matmuls by integer modules (int8/int4 kernels).

    Args:
        fuse_attention: fuse each lowered ``q·kᵀ → softmax → A·v`` (uniform q·kᵀ, uniform or BitLog2
            A) into one ``LoweredAttention`` (``fuse_lowered_attention``): one Triton kernel on CUDA,
            the unfused integer path elsewhere.
    """

    name = "lower_to_kernels"
    requires = ("calibrated",)
    provides = ("lowered",)

    fuse_attention: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        lowered: list[str] = []
        grouped: list[str] = []
        patch_convs: list[str] = []
        kept: dict[str, str] = {}
        replay = set(ctx.record().get("lowered", [])) if ctx.replay else None
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = modules.get(node.target)
            conv = isinstance(mod, QuantConv2d)
            if not conv and not isinstance(mod, QuantLinear):
                if match.op_kind(node, modules) == "linear" and not isinstance(mod, (LoweredLinear, LoweredGroupedLinear)):
                    kept[str(node.target)] = "float Linear (not quantized: skipped, or a QwT compensation)"
                continue
            src = node.args[0]
            act = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            act = act if isinstance(act, FakeQuantize) else None
            if replay is not None:
                if str(node.target) not in replay:  # artifacts made before convolutions were lowered keep them
                    continue
                if conv:
                    new = LoweredPatchConv(mod.in_channels, mod.out_channels, mod.kernel_size, act.spec,
                                           mod.weight_fake_quant.spec, mod.bias is not None, label=str(node.target))
                else:
                    new = _lowered_class(act.spec)(mod.in_features, mod.out_features, act.spec, mod.weight_fake_quant.spec,
                                                   mod.bias is not None)
            else:
                why = (patch_conv_mismatch(mod) if conv else "") or _why_not(mod, act, str(node.target))
                if why:
                    kept[str(node.target)] = why
                    continue
                new = (LoweredPatchConv.from_quantized(mod, act, label=str(node.target)) if conv
                       else _lowered_class(act.spec).from_quantized(mod, act))
            parent, _, leaf = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            node.args = (src.args[0],) + tuple(node.args[1:])
            _drop_if_unused(gm, src)
            lowered.append(str(node.target))
            if isinstance(new, LoweredGroupedLinear):
                grouped.append(str(node.target))
            if isinstance(new, LoweredPatchConv):
                patch_convs.append(str(node.target))
        lowered_mm = self._lower_matmuls(gm, kept, set(ctx.record().get("lowered_matmuls", [])) if ctx.replay else None)
        # artifacts saved before attention fusion have no "fused_attention" record: they load unfused
        fuse = self.fuse_attention and (not ctx.replay or "fused_attention" in ctx.record())
        fused = fuse_lowered_attention(gm) if fuse else []
        if ctx.replay and fused != ctx.record().get("fused_attention", []):
            raise ConfigError(f"lower_to_kernels: replay fused attention at {fused}, the artifact at "
                              f"{ctx.record().get('fused_attention')}; the graph differs from the saved one")
        if not lowered and not lowered_mm and replay is None:
            why = "; ".join(f"{k}: {v}" for k, v in kept.items())[:500]
            raise ConfigError(f"lower_to_kernels: no Linear or attention matmul could be lowered: {why}")
        summary = (f"{len(lowered) - len(patch_convs)} Linears" + (f" ({len(grouped)} with grouped inputs)" if grouped else "")
                   + (f", {len(patch_convs)} patch convolution{'s' if len(patch_convs) > 1 else ''}" if patch_convs else "")
                   + f" and {len(lowered_mm)} attention matmuls lowered to integer kernels"
                   + (f" ({len(fused)} attention blocks fused)" if fused else "") + "; "
                   f"{len(kept)} kept: " + ", ".join(sorted(set(kept.values())))[:300])
        # "lowered": every lowered Linear and patch convolution (what replay rebuilds); "patch_convs": the convolutions
        return PassResult(gm, summary=summary, record={"lowered": lowered, "grouped": grouped, "patch_convs": patch_convs,
                                                           "lowered_matmuls": lowered_mm, "fused_attention": fused,
                                                           "kept": kept})

    @staticmethod
    def _lower_matmuls(gm: fx.GraphModule, kept: dict[str, str], replay: set[str] | None) -> list[str]:
        """``matmul(FakeQuantize(a), FakeQuantize(b))`` → ``LoweredMatmul(a, b)``; returns the node names."""
        modules = match.modules_of(gm)
        done: list[str] = []
        for node in list(gm.graph.nodes):
            if match.op_kind(node, modules) != "matmul" or node.op == "call_module":
                continue
            operands = list(node.args)
            if len(operands) != 2 or node.kwargs:
                kept[node.name] = "matmul not of the form matmul(a, b)"
                continue
            fqs = [modules.get(x.target) if isinstance(x, fx.Node) and x.op == "call_module" else None for x in operands]
            fqs = [m if isinstance(m, FakeQuantize) else None for m in fqs]
            if replay is not None:
                if node.name not in replay:
                    continue
                new_mod = LoweredMatmul(fqs[0].spec, fqs[1].spec)
            else:
                why = _why_not_matmul(*fqs)
                if why:
                    kept[node.name] = why
                    continue
                new_mod = LoweredMatmul.from_quantizers(*fqs)
            target = f"lowered_matmuls.{node.name}"
            gm.add_submodule(target, new_mod)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target, tuple(x.args[0] for x in operands))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            for q in operands:
                _drop_if_unused(gm, q)
            done.append(node.name)
        return done


def _softmax_dim(node: fx.Node, modules: dict) -> int | None:
    """The ``dim`` of a softmax node (module, function or method form), None when not given."""
    if node.op == "call_module":
        return getattr(modules[node.target], "dim", None)
    if node.kwargs.get("dtype") is not None:
        return None  # a cast inside: not the plain softmax the fused kernel computes
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim if isinstance(dim, int) else None


def _is_lowered_matmul(node: object, modules: dict, kinds: tuple[str, ...]) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(modules.get(node.target), LoweredMatmul) and modules[node.target].kind in kinds)


_SCORE_OPS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
              torch.ops.aten.mul.Tensor: "mul", torch.ops.aten.mul.Scalar: "mul", torch.ops.aten.div.Tensor: "div",
              torch.ops.aten.div.Scalar: "div"}


def _score_scaling(node: fx.Node) -> tuple[fx.Node, str, object] | None:
    """``(scores, "mul" | "div", scalar)`` when ``node`` multiplies or divides a tensor by a scalar (a
    number, or a node that is not a recorded non-scalar tensor), else None."""
    op = _SCORE_OPS.get(node.target) if node.op == "call_function" else (
        node.target if node.op == "call_method" and node.target in ("mul", "div") else None)
    if op is None or len(node.args) != 2 or any(v is not None for v in node.kwargs.values()):
        return None  # a rounding_mode other than None is not a true division
    a, b = node.args
    if op == "mul" and not isinstance(a, fx.Node):
        a, b = b, a  # c * scores
    if not isinstance(a, fx.Node):
        return None
    if isinstance(b, fx.Node):
        shape = match.tensor_shape(b)
        if shape is not None and math.prod(shape) != 1:
            return None
    elif not isinstance(b, (int, float)):
        return None
    return a, op, b


def _timm_mask_functions() -> tuple[object, object] | None:
    """timm's traced mask helpers (timm >= 1.0.20), or None with older timm."""
    fns = (getattr(timm_attention, "maybe_add_mask", None), getattr(timm_attention, "resolve_self_attn_mask", None))
    return fns if all(fns) else None


def fold_static_attention_masks(gm: fx.GraphModule) -> int:
    """Remove timm's ``maybe_add_mask(scores, resolve_self_attn_mask(n, scores, None, False))``: with no
    mask and ``is_causal=False`` the mask resolves to None and the add to ``scores`` itself (timm ≥ 1.0.20
    traces these leaf calls into every attention). Returns how many were folded."""
    fns = _timm_mask_functions()
    if fns is None:
        return 0
    maybe_add, resolve = fns
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not maybe_add or len(node.args) != 2 or node.kwargs:
            continue
        scores, mask = node.args
        static_none = mask is None or (
            isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target is resolve and not mask.kwargs
            and len(mask.args) == 4 and mask.args[2] is None and mask.args[3] is False)
        if not static_none:
            continue
        node.replace_all_uses_with(scores)
        gm.graph.erase_node(node)
        if isinstance(mask, fx.Node) and not mask.users:
            gm.graph.erase_node(mask)
        folded += 1
    return folded


def fuse_lowered_attention(gm: fx.GraphModule) -> list[str]:
    """``LoweredMatmul(q, kᵀ) [→ · or / scalar] → softmax(-1) [→ passthrough ops] → LoweredMatmul(·, v)``
    with a uniform ``q·kᵀ`` and a uniform or BitLog2 ``A`` → one ``LoweredAttention(q, kᵀ, v[, c])``
    (structure only: op types and single-use edges, no names), after folding timm's static
    no-mask calls (``fold_static_attention_masks``). Returns the new modules' names."""
    fold_static_attention_masks(gm)
    modules = match.modules_of(gm)
    done: list[str] = []
    for sm in match.nodes_of_kind(gm, "softmax", modules):
        src = sm.args[0] if sm.args else None
        scaling = _score_scaling(src) if isinstance(src, fx.Node) and len(src.users) == 1 else None
        qk, score_op, scalar = (scaling if scaling else (src, None, None))
        if not _is_lowered_matmul(qk, modules, ("uniform",)) or len(qk.users) != 1:
            continue
        shape = match.tensor_shape(sm)
        dim = _softmax_dim(sm, modules)
        if dim is None or not (dim == -1 or (shape is not None and dim == len(shape) - 1)):
            continue
        uses = match.consumers(sm, modules)
        if len(uses) != 1 or uses[0].arg != 0 or not _is_lowered_matmul(uses[0].node, modules, ("uniform", "bitlog2")):
            continue
        av = uses[0].node
        if len(sm.users) != 1 or any(len(p.users) != 1 for p in uses[0].path):
            continue  # the probabilities are read elsewhere too: keep them
        name = f"lowered_attention.{av.name}"
        gm.add_submodule(name, LoweredAttention(modules[qk.target], modules[av.target], score_op=score_op))
        with gm.graph.inserting_before(av):
            args = (qk.args[0], qk.args[1], av.args[1]) + ((scalar,) if score_op else ())
            fused = gm.graph.call_module(name, args)
        fused.meta = dict(av.meta)
        av.replace_all_uses_with(fused)
        for dead in (av, *reversed(uses[0].path), sm, *((src,) if score_op else ()), qk):
            gm.graph.erase_node(dead)
        for target in (qk.target, av.target):
            gm.delete_submodule(str(target))
        done.append(name)
    return done
