"""``LowerToKernels``: replace fake-quantized Linears and attention matmuls by integer modules.

A node ``FakeQuantize(x) → QuantLinear`` whose activation quantizer is uniform, per tensor, with
an integer zero point, and whose weight quantizer is uniform per output channel (or per tensor),
becomes one ``LoweredLinear(x)`` holding the signed integer weight codes (int8, or int4 packed two
per byte for ≤ 4-bit weights), the scales, zero points and weight column sums. It quantizes its
input itself and runs ``fxquant.kernels.int_linear``: the Triton kernels on CUDA, the exact
integer CPU path (``torch._int_mm``) elsewhere.

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

Everything else stays as it is, and the pass reports why (log-quantized Linear inputs,
per-channel activations, groups on another axis, fractional zero points, convolutions, QwT compensation). RepQ-ViT's
folded weights and QwT's compensation nodes are untouched, so they survive lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant import match
from fxquant.errors import ConfigError
from fxquant.kernels.int_attention import MAX_LOG_SHIFT, log_max_shift
from fxquant.kernels.lowered import LoweredGroupedLinear, LoweredLinear, LoweredMatmul
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import FakeQuantize, InstanceGroups, PerAxis, PerGroup, PerTensor, QuantConv2d, QuantLinear, QuantSpec


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
    parent, _, leaf = str(quantizer_node.target).rpartition(".")
    delattr(gm.get_submodule(parent) if parent else gm, leaf)


def _why_not_matmul(a_fq: FakeQuantize | None, b_fq: FakeQuantize | None) -> str:
    if a_fq is None or b_fq is None or a_fq is b_fq:
        return "operands are not both fake-quantized"
    if not (a_fq.fake_quant_enabled and b_fq.fake_quant_enabled):
        return "quantizers are disabled"
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


def _why_not(linear: nn.Module, act: FakeQuantize | None) -> str:
    if act is None:
        return "input is not fake-quantized"
    a, w = act.spec, linear.weight_fake_quant.spec
    if a.scheme != "uniform":
        return f"input quantizer is {a.scheme}"
    if _channel_groups(a):
        if a.granularity.axis != -1:
            return f"input channel groups ({a.short()}) are not on the last axis"
    elif not _per_tensor(act):
        return "input quantizer is not per tensor"
    if not _integer_zero_point(act):
        return "input zero point is fractional"
    if w.scheme != "uniform" or not isinstance(w.granularity, (PerAxis, PerTensor)):
        return f"weight quantizer {w.short()} is not uniform per channel"
    if isinstance(w.granularity, PerAxis) and w.granularity.axis not in (0, -2):
        return "weight quantizer is not per output channel"
    if not torch.equal(linear.weight_fake_quant.zero_point, linear.weight_fake_quant.zero_point.round()):
        return "weight zero point is fractional"
    if not (act.fake_quant_enabled and linear.weight_fake_quant.fake_quant_enabled):
        return "quantizers are disabled"
    return ""


@register_pass
@dataclass(frozen=True)
class LowerToKernels(Pass):
    """Lower fake-quantized Linears to integer kernels (see module docstring)."""

    name = "lower_to_kernels"
    requires = ("calibrated",)
    provides = ("lowered",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        lowered: list[str] = []
        grouped: list[str] = []
        kept: dict[str, str] = {}
        replay = set(ctx.record().get("lowered", [])) if ctx.replay else None
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = modules.get(node.target)
            if isinstance(mod, QuantConv2d):
                kept[str(node.target)] = "convolution (patch embedding) stays fake-quantized"
                continue
            if not isinstance(mod, QuantLinear):
                if match.op_kind(node, modules) == "linear" and not isinstance(mod, (LoweredLinear, LoweredGroupedLinear)):
                    kept[str(node.target)] = "float Linear (not quantized: skipped, or a QwT compensation)"
                continue
            src = node.args[0]
            act = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            act = act if isinstance(act, FakeQuantize) else None
            if replay is not None:
                if str(node.target) not in replay:
                    continue
                new = _lowered_class(act.spec)(mod.in_features, mod.out_features, act.spec, mod.weight_fake_quant.spec,
                                               mod.bias is not None)
            else:
                why = _why_not(mod, act)
                if why:
                    kept[str(node.target)] = why
                    continue
                new = _lowered_class(act.spec).from_quantized(mod, act)
            parent, _, leaf = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            node.args = (src.args[0],) + tuple(node.args[1:])
            _drop_if_unused(gm, src)
            lowered.append(str(node.target))
            if isinstance(new, LoweredGroupedLinear):
                grouped.append(str(node.target))
        lowered_mm = self._lower_matmuls(gm, kept, set(ctx.record().get("lowered_matmuls", [])) if ctx.replay else None)
        if not lowered and not lowered_mm and replay is None:
            why = "; ".join(f"{k}: {v}" for k, v in kept.items())[:500]
            raise ConfigError(f"lower_to_kernels: no Linear or attention matmul could be lowered: {why}")
        summary = (f"{len(lowered)} Linears" + (f" ({len(grouped)} with grouped inputs)" if grouped else "")
                   + f" and {len(lowered_mm)} attention matmuls lowered to integer kernels; "
                   f"{len(kept)} kept: " + ", ".join(sorted(set(kept.values())))[:300])
        return PassResult(gm, summary=summary, record={"lowered": lowered, "grouped": grouped, "lowered_matmuls": lowered_mm,
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
