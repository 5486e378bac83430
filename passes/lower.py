"""``LowerToKernels``: replace fake-quantized Linears and attention matmuls by integer modules.

A node ``FakeQuantize(x) → QuantLinear`` whose activation quantizer is uniform, per tensor, with
an integer zero point, and whose weight quantizer is uniform per output channel (or per tensor),
becomes one ``LoweredLinear(x)`` holding the signed integer weight codes (int8, or int4 packed two
per byte for ≤ 4-bit weights), the scales, zero points and weight column sums. It quantizes its
input itself and runs ``fxquant.kernels.int_linear``: the Triton kernels on CUDA, the exact
integer CPU path (``torch._int_mm``) elsewhere.

A node ``matmul(FakeQuantize(a), FakeQuantize(b))`` (q·kᵀ and A·v) with per-tensor quantizers,
``b`` uniform, becomes ``LoweredMatmul(a, b)`` (``fxquant.kernels.int_attention``): an integer
GEMM when ``a`` is uniform, shift accumulators when ``a`` is RepQ-ViT's log2/log√2 quantizer (up
to 6 bits; 8-bit log levels reach 2^-128 and stay in float), integer BitLog2 levels otherwise.

Everything else stays as it is, and the pass reports why (log-quantized Linear inputs,
per-channel activations, fractional zero points, convolutions, QwT compensation). RepQ-ViT's
folded weights and QwT's compensation nodes are untouched, so they survive lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant import match
from fxquant.errors import ConfigError
from fxquant.kernels.bitlog2 import bitlog2_av
from fxquant.kernels.int_attention import (
    MAX_LOG_SHIFT, bitlog2_av_int, int_bmm, int_bmm_cpu, log_av, log_codes_of, log_max_shift,
)
from fxquant.kernels.int_linear import (
    HAS_TRITON, code_offset, int_linear, int_linear_cpu, pack_int4, quantize_act, to_signed_codes, unpack_int4,
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


def _per_tensor(fq: FakeQuantize) -> bool:
    return isinstance(fq.spec.granularity, PerTensor) and fq.scale.numel() == 1


def _integer_zero_point(fq: FakeQuantize) -> bool:
    return fq.spec.integer_zero_point and torch.equal(fq.zero_point, fq.zero_point.round())


class LoweredMatmul(nn.Module):
    """An integer attention matmul ``a @ b`` on quantized operands (``kernels/int_attention.py``).

    ``kind`` follows ``a``'s quantizer: ``"uniform"`` (q·kᵀ, or A·v with a uniform A: integer
    GEMM), ``"log"`` (RepQ-ViT's log2/log√2 A: shift accumulators) or ``"bitlog2"`` (integer
    levels D). ``b`` is always uniform, per tensor, with an integer zero point."""

    def __init__(self, a_spec: QuantSpec, b_spec: QuantSpec):
        super().__init__()
        self.a_spec, self.b_spec = a_spec, b_spec
        self.kind = "uniform" if a_spec.scheme == "uniform" else ("bitlog2" if a_spec.scheme == "bitlog2" else "log")
        for name in ("a_scale", "a_zp", "b_scale", "b_zp"):
            self.register_buffer(name, torch.zeros(()))

    @classmethod
    def from_quantizers(cls, a_fq: FakeQuantize, b_fq: FakeQuantize) -> "LoweredMatmul":
        new = cls(a_fq.spec, b_fq.spec)
        with torch.no_grad():
            for side, fq in (("a", a_fq), ("b", b_fq)):
                setattr(new, f"{side}_scale", fq.scale.reshape(()).float().clone())
                setattr(new, f"{side}_zp", fq.zero_point.reshape(()).float().clone())
        return new

    def _signed(self, x: torch.Tensor, side: str) -> tuple[torch.Tensor, int]:
        """int8 codes of one uniform operand and its signed zero point."""
        spec = self.a_spec if side == "a" else self.b_spec
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zp")
        return to_signed_codes(x.float(), scale, zp, spec), int(zp.item()) - code_offset(spec)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        vb, zb = self._signed(b, "b")
        gpu = a.is_cuda and HAS_TRITON
        if self.kind == "uniform":
            va, za = self._signed(a, "a")
            if gpu:
                lead = torch.broadcast_shapes(va.shape[:-2], vb.shape[:-2])
                return int_bmm(va.expand(*lead, *va.shape[-2:]), self.a_scale, za, vb.expand(*lead, *vb.shape[-2:]),
                               self.b_scale, zb, out_dtype=a.dtype)
            return int_bmm_cpu(va, self.a_scale, za, vb, self.b_scale, zb,
                               bits=(self.a_spec.bits, self.b_spec.bits)).to(a.dtype)
        codes = log_codes_of(a, self.a_scale, self.a_spec)
        v = vb.to(torch.int32) - zb
        if self.kind == "log":
            return log_av(codes, self.a_scale, v, self.b_scale, self.a_spec).to(a.dtype)
        variant = self.a_spec.bitlog2_variant
        if gpu and codes.shape[-1] == codes.shape[-2] and codes.shape[:-2] == v.shape[:-2]:
            acc = bitlog2_av(codes.to(torch.int8), v, variant, packed=False)
        else:
            acc = bitlog2_av_int(codes, v, variant)
        return (acc.to(torch.float32) * (self.b_scale / self.a_scale)).to(a.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, a={self.a_spec.short()}, b={self.b_spec.short()}"


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
    if not _per_tensor(act):
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
                    kept[str(node.target)] = "float Linear (not quantized: skipped, or a QwT compensation)"
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
            _drop_if_unused(gm, src)
            lowered.append(str(node.target))
        lowered_mm = self._lower_matmuls(gm, kept, set(ctx.record().get("lowered_matmuls", [])) if ctx.replay else None)
        if not lowered and not lowered_mm and replay is None:
            raise ConfigError("lower_to_kernels: no Linear or attention matmul could be lowered: " + "; ".join(f"{k}: {v}" for k, v in kept.items())[:500])
        summary = (f"{len(lowered)} Linears and {len(lowered_mm)} attention matmuls lowered to integer kernels; "
                   f"{len(kept)} kept: " + ", ".join(sorted(set(kept.values())))[:300])
        return PassResult(gm, summary=summary, record={"lowered": lowered, "lowered_matmuls": lowered_mm, "kept": kept})

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
