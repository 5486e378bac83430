"""``LowerToKernels``: replace fake-quantized Linears by integer ``LoweredLinear`` modules.

A node ``FakeQuantize(x) → QuantLinear`` whose activation quantizer is uniform, per tensor, with
an integer zero point, and whose weight quantizer is uniform per output channel (or per tensor),
becomes one ``LoweredLinear(x)`` holding the signed integer weight codes (int8, or int4 packed two
per byte for ≤ 4-bit weights), the scales, zero points and weight column sums. It quantizes its
input itself and runs ``fxquant.kernels.int_linear``: the Triton kernels on CUDA, the exact
integer CPU path (``torch._int_mm``) elsewhere. Everything else stays as it is, and the pass
reports why (log-quantized inputs, per-channel activations, fractional zero points, convolutions,
QwT compensation, attention matmuls). RepQ-ViT's folded weights and QwT's compensation nodes
are untouched, so they survive lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant import match
from fxquant.errors import ConfigError
from fxquant.kernels.int_linear import (
    HAS_TRITON, int_linear, int_linear_cpu, pack_int4, quantize_act, to_signed_codes, unpack_int4,
)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import FakeQuantize, PerAxis, PerTensor, QuantConv2d, QuantLinear, QuantSpec


class LoweredLinear(nn.Module):
    """An integer Linear: ``y = s_a·s_w·Σ(a - z_a)(w - z_w) + bias`` (see ``kernels/int_linear.py``)."""

    def __init__(self, in_features: int, out_features: int, act_spec: QuantSpec, weight_spec: QuantSpec, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_spec, self.weight_spec = act_spec, weight_spec
        self.w_packed = weight_spec.bits <= 4 and in_features % 2 == 0
        k_store = in_features // 2 if self.w_packed else in_features
        self.register_buffer("w_codes", torch.zeros(out_features, k_store, dtype=torch.uint8 if self.w_packed else torch.int8))
        self.register_buffer("w_scale", torch.zeros(out_features))
        self.register_buffer("w_zp", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("w_colsum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("a_scale", torch.zeros(()))
        self.register_buffer("a_zp", torch.zeros(()))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_quantized(cls, linear: QuantLinear, act: FakeQuantize) -> "LoweredLinear":
        wq = linear.weight_fake_quant
        new = cls(linear.in_features, linear.out_features, act.spec, wq.spec, linear.bias is not None)
        with torch.no_grad():
            codes = to_signed_codes(linear.weight.float(), wq.scale, wq.zero_point, wq.spec)
            new.w_codes = pack_int4(codes) if new.w_packed else codes
            new.w_scale = wq.scale.reshape(-1).float().expand(linear.out_features).clone()
            off = 0 if wq.spec.symmetric else 2 ** (wq.spec.bits - 1)
            new.w_zp = (wq.zero_point.reshape(-1).expand(linear.out_features) - off).to(torch.int32).clone()
            new.w_colsum = codes.to(torch.int32).sum(1)
            new.a_scale = act.scale.reshape(()).float().clone()
            new.a_zp = act.zero_point.reshape(()).float().clone()
            if linear.bias is not None:
                new.bias = linear.bias.detach().float().clone()
        return new

    def weight_codes(self) -> torch.Tensor:
        return unpack_int4(self.w_codes) if self.w_packed else self.w_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda and HAS_TRITON:
            pack_a = self.act_spec.bits <= 4 and self.w_packed
            a, s_a, z_a = quantize_act(x2, self.act_spec, self.a_scale, self.a_zp, pack=pack_a)
            y = int_linear(a, s_a, z_a, self.w_codes, self.w_scale, self.w_zp, self.bias, k=self.in_features,
                           a_packed=pack_a, w_packed=self.w_packed, w_colsum=self.w_colsum, out_dtype=x.dtype)
        else:
            off = 0 if self.act_spec.symmetric else 2 ** (self.act_spec.bits - 1)
            a = to_signed_codes(x2.float(), self.a_scale, self.a_zp, self.act_spec)
            y = int_linear_cpu(a, self.a_scale, (self.a_zp - off).round().to(torch.int32), self.weight_codes(), self.w_scale,
                               self.w_zp, self.bias, w_colsum=self.w_colsum).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w={self.weight_spec.short()}"
                f"{' (int4 packed)' if self.w_packed else ''}, a={self.act_spec.short()}")


def _why_not(linear: nn.Module, act: FakeQuantize | None) -> str:
    if act is None:
        return "input is not fake-quantized"
    a, w = act.spec, linear.weight_fake_quant.spec
    if a.scheme != "uniform":
        return f"input quantizer is {a.scheme}"
    if not isinstance(a.granularity, PerTensor) or act.scale.numel() != 1:
        return "input quantizer is not per tensor"
    if not torch.equal(act.zero_point, act.zero_point.round()) or not a.integer_zero_point:
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
                if match.op_kind(node, modules) == "linear" and not isinstance(mod, LoweredLinear):
                    kept[str(node.target)] = "float Linear (not quantized, e.g. QwT compensation)"
                continue
            src = node.args[0]
            act = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            act = act if isinstance(act, FakeQuantize) else None
            if replay is not None:
                if str(node.target) not in replay:
                    continue
                new = LoweredLinear(mod.in_features, mod.out_features, act.spec, mod.weight_fake_quant.spec, mod.bias is not None)
            else:
                why = _why_not(mod, act)
                if why:
                    kept[str(node.target)] = why
                    continue
                new = LoweredLinear.from_quantized(mod, act)
            parent, _, leaf = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            node.args = (src.args[0],) + tuple(node.args[1:])
            if not src.users:
                gm.graph.erase_node(src)
                qparent, _, qleaf = str(src.target).rpartition(".")
                delattr(gm.get_submodule(qparent), qleaf)
            lowered.append(str(node.target))
        n_att = len(match.find_attention(gm, match.modules_of(gm)))
        if n_att:
            kept["attention matmuls"] = f"{n_att} x (q·kᵀ, A·v) stay fake-quantized (no integer attention kernel in the graph yet)"
        if not lowered and replay is None:
            raise ConfigError("lower_to_kernels: no Linear could be lowered: " + "; ".join(f"{k}: {v}" for k, v in kept.items())[:500])
        summary = f"{len(lowered)} Linears lowered to integer kernels; {len(kept)} kept: " + \
                  ", ".join(sorted(set(kept.values())))[:300]
        return PassResult(gm, summary=summary, record={"lowered": lowered, "kept": kept})
