"""ONNX QDQ export of fxquant's fake-quantized graphs.

``to_onnx(qmodel, example_inputs, path)`` rewrites a copy of the quantized GraphModule into
export-ready modules and runs ``torch.onnx.export(dynamo=True)``:

* **weights** (``QuantLinear``/``QuantConv2d``, per output channel): integer initializers +
  ``DequantizeLinear(axis=0)``. The codes are the quantizer core's signed codes
  (``fxquant.core.quant.codes``: ``q - 2^(b-1)`` for asymmetric specs, zero point shifted with them),
  int8 for every width (onnxruntime's QDQ fusions take int8/uint8; opset-21 int4 is left out).
* **uniform activations** (per tensor, or per axis: APHQ's per-head attention operands, with
  ``axis``): ``QuantizeLinear`` → ``DequantizeLinear``, int8 by default
  (the same signed-code rule), uint8 (unsigned codes) on request. Below 8 bits a ``Clip`` to the
  quantizer's range precedes the 8-bit pair: the codes are then the low-bit codes, exactly.
* **contiguous channel groups** (``PerGroup(g)`` activations, IGQ's ``group_mode="contiguous"``):
  the same per-axis ``QuantizeLinear`` → ``DequantizeLinear`` on the grouped axis, with each
  block's (scale, zero point) repeated over its ``g`` channels (``expand_params``, C values instead
  of C/g). Every element is divided by the very scale fxquant uses, so the codes are bit-exact, at
  the default opset. The two other forms were measured and rejected (onnxruntime 1.32, CPU):
  opset-21 blocked ``QuantizeLinear(block_size=g)`` needs scales of the input's full shape except
  the blocked axis (``[B, N, C/g]``; onnxruntime refuses broadcast ``[1, 1, C/g]``), so a dynamic
  batch would need a run-time ``Expand`` of the parameters, and torch.onnx has no blocked op to map
  to; ``Reshape [.., C] → [.., C/g, g]`` + per-axis Q/DQ + ``Reshape`` back is exact in itself, but
  the float ``Reshape`` between ``DequantizeLinear`` and the Linear's ``MatMul`` makes
  onnxruntime's default optimization rewrite ``DQ(int8 W) → MatMul`` into ``MatMulNBits``
  (``accuracy_level=4``), which quantizes the float input *again* to int8 per block (IGQ W4A4 on
  the CIFAR ViT: mean |Δlogit| 0.12 instead of 0.002). With the DQ feeding the ``MatMul``
  directly, the Linear stays ``DQ(x)``, ``DQ(W)`` → float ``MatMul`` (per-channel input scales
  along the reduction axis have no ``MatMulIntegerToFloat`` form).
* **instance-aware groups** (``InstanceGroups``, IGQ's default ``group_mode="instance"``) are
  refused with a ``ConfigError`` naming the quantizer: the per-instance channel (row) → group
  assignment is a data-dependent min/max, argmin and gather, and ``QuantizeLinear`` takes only
  static scales. A float ``Div``/``Round``/``Clip`` formulation with gathered per-element
  parameters would be exact but is not QDQ (no runtime would run it as integer arithmetic);
  compile with ``group_mode="contiguous"`` for ONNX. ``InstanceGroups(1)`` is per tensor and is
  exported as such.
* **log quantizers** (log√2, log2, BitLog2) have no ONNX op. They are exported with standard ops as
  the very computation fxquant runs: ``r = x / Δ``, compare ``r`` with the float32 rounding midpoints
  (``LessOrEqual`` + ``ReduceSum`` = the code), then ``Gather`` from the float32 level table and
  ``Mul`` by Δ (BitLog2: ``Floor(x·M)``, compare with the integer levels, ``Gather(levels / δ)``).
  An integer runtime would instead read the codes (a 4-bit index per attention element) and run
  the integer A·v of ``fxquant.kernels.bitlog2``.
* **QwT compensation**: a float ``Gemm`` (fp16 compute is emulated in fp32 with fp16-rounded weights,
  input and output, since onnxruntime's CPU provider has no fp16 Gemm).
* **lowered graphs** (``compile(..., lower=True)``): a ``LoweredLinear`` already holds the signed
  weight codes and its input quantizer; it becomes the same ``Q→DQ(x)``, ``DQ(W)`` → ``MatMul``
  (a ``LoweredPatchConv``: ``Q→DQ(x)``, ``DQ(W)`` → ``Conv``, its codes back in ``[O, C, kh, kw]``). A
  ``LoweredGroupedLinear`` (IGQ) does too, its input quantizer exported as a grouped
  ``FakeQuantize`` is (above: contiguous groups per channel, instance-aware groups refused). A
  ``LoweredMatmul`` becomes ``matmul`` of its two operand quantizers, and a fused
  ``LoweredAttention`` its two matmuls around a ``Softmax`` again.
* RepQ-ViT reparameterization needs nothing: the folded LayerNorm and Linear parameters are the
  graph's parameters.

Numerics: ONNX ``QuantizeLinear`` divides by the scale and rounds half to even, fxquant's rule
(onnxruntime matches it bit for bit). PyTorch's eager ``quantized_decomposed`` ops used to emit
the Q/DQ nodes multiply by the reciprocal instead, so the *prepared* torch module is not the
reference: the fake-quant GraphModule is. onnxruntime's float kernels (GEMM accumulation order,
LayerNorm, Erf, Softmax) differ from PyTorch's by a few ulps, and a quantizer downstream turns an
ulp that crosses a rounding boundary into one code step, so exported and fake-quant logits differ
by small amounts (figures in ``tools/validate_onnx.py``), not by a systematic error.

Placement (measured with onnxruntime's optimized-graph dump): each quantized Linear/attention
matmul is ``Q→DQ(x)``, ``DQ(int8 W)`` → ``MatMul`` with a float output, which onnxruntime fuses into
``MatMulIntegerToFloat`` (int8 GEMM, float result: no requantization); LayerNorm, Softmax, GELU and
residual adds stay float with no Q/DQ around them.

``target="openvino"`` (``prepare_for_export``) changes the placement, not the function: each fused
qkv Linear whose output is unbound into q, k and v becomes three Linears over its three blocks of
output channels (``split_fused_projections``), and every per-tensor activation Q/DQ moves above the
reshapes/transposes that feed it (``hoist_act_quant_above_moves``), so that q's, k's and v's Q/DQ
sit on their Linears' outputs and the projection input's on the attention output. OpenVINO's CPU
plugin fuses all of them into their producers (CIFAR ViT ``w8a8-sym``: 2 standalone FakeQuantize
left, the image and head inputs; NNCF's model has 14) and runs its fused attention subgraphs on int8
q, k and v (``openvino_ir.attention_operand_types``).
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.core import match
from fxquant.core.errors import ConfigError
from fxquant.core.graph import logits_of, propagate_shapes
from fxquant.core.quant import (
    AdaRoundWeight,
    CompensationLinear,
    FakeQuantize,
    InstanceGroups,
    PerAxis,
    PerGroup,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    code_offset,
    expand_params,
    to_signed_codes,
)
from fxquant.core.quant.primitives import (
    bitlog2_codes_by_compare,
    bitlog2_compare_levels,
    bitlog2_input,
    bitlog2_level_table,
    log_code_of_count,
    log_count_by_compare,
    log_level_table,
    log_thresholds,
)
from fxquant.kernels.lowered import LoweredAttention, LoweredGroupedLinear, LoweredLinear, LoweredMatmul, LoweredPatchConv

try:  # registers torch.ops.quantized_decomposed (the ops the ONNX exporter maps to Q/DQ)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
except Exception:  # pragma: no cover
    pass

_qd = torch.ops.quantized_decomposed
DEFAULT_OPSET = 18


def _container(spec: QuantSpec, act_dtype: str) -> tuple[torch.dtype, int, int, int]:
    """ONNX integer type of a uniform spec's codes, its range, and the code offset (the quantizer
    core's signed-code rule for int8; unsigned codes as they are for uint8)."""
    if spec.symmetric or act_dtype == "int8":
        return torch.int8, -128, 127, code_offset(spec)
    return torch.uint8, 0, 255, 0


class ExportActQuant(nn.Module):
    """Export form of an activation quantizer ``(spec, scale, zero point)`` (see module docstring)."""

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor, label: str, act_dtype: str = "int8"):
        super().__init__()
        self.spec = spec
        self.float_per_axis = False  # per-axis uniform only: Div/Round/Clip/Mul instead of per-axis Q/DQ (OpenVINO)
        scale = scale.detach().float().clone()
        self.register_buffer("scale", scale.reshape(()) if scale.numel() == 1 else scale)
        if spec.scheme == "uniform":
            g = spec.granularity
            if isinstance(g, InstanceGroups) and g.num_groups > 1:  # G = 1 is per tensor: exported as such below
                raise ConfigError(
                    f"ONNX export: activation quantizer '{label}' has instance-aware groups ({spec.short()}, "
                    f"InstanceGroups): each input instance assigns every channel (or attention row) to one of "
                    f"{g.num_groups} (scale, zero point) pairs by its own min/max range (a data-dependent argmin + "
                    f"gather), and QuantizeLinear takes only static per-tensor, per-axis or per-block scales, so there is "
                    f"no QDQ form. For ONNX compile with group_mode='contiguous' (fixed channel blocks, exported as "
                    f"per-channel QDQ); to keep instance groups, run the model with fxquant (fake-quant, or lowered to "
                    f"the Triton kernels) instead of ONNX")
            self.axis = None
            if scale.numel() != 1:
                axes = [d for d, n in enumerate(scale.shape) if n != 1]
                if not isinstance(g, (PerAxis, PerGroup)) or len(axes) != 1:
                    raise ConfigError(f"ONNX export: activation quantizer '{label}' is neither per-tensor, per-axis nor "
                                      f"per-group ({spec.short()}); export supports those three (run repq_reparam for "
                                      f"per-channel LN outputs)")
                if isinstance(g, PerGroup):  # contiguous groups: each block's (s, z) repeated over its channels
                    shape = list(scale.shape)
                    shape[axes[0]] *= g.group_size
                    scale, zero_point = expand_params(scale, shape), expand_params(zero_point.reshape(scale.shape), shape)
                # QuantizeLinear(axis=...): e.g. APHQ's per-head attention operands. Counted from the end when
                # the spec counts from the end (channels: -1), so that parameters in a shorter layout (a
                # lowered Linear's [C/g]) fit an input of any rank
                self.axis = axes[0] - scale.dim() if g.axis < 0 else axes[0]
            zp = zero_point.detach().float().reshape(scale.shape)
            if spec.zero_point_domain != "int":
                raise ConfigError(f"ONNX export: quantizer '{label}' has a float-domain zero point (the min-max grid of "
                                  f"OQFV/LoftQ weights); QuantizeLinear takes an integer zero point")
            if not torch.equal(zp, zp.round()):
                raise ConfigError(f"ONNX export: quantizer '{label}' has a fractional zero point "
                                  f"{zp.flatten()[0].item():.3f} (RepQ-faithful z̃); recompile with round_target_zero_point=True")
            self.dtype, self.qlo, self.qhi, offset = _container(spec, act_dtype)
            self.narrow = spec.bits < 8
            if self.axis is None:
                zp = zp.reshape(())
                self.zp8 = int(zp.item()) - offset
                self.s = float(self.scale.item())  # python constants: torch.export keeps them as attributes
                self.lo = float(((spec.qmin - zp) * self.scale).item())
                self.hi = float(((spec.qmax - zp) * self.scale).item())
            else:
                self.register_buffer("scales", scale.reshape(-1).clone())
                self.register_buffer("zps", (zp.reshape(-1) - offset).to(torch.int64))
                self.register_buffer("lo", (spec.qmin - zp) * scale)  # parameter layout: broadcasts against x
                self.register_buffer("hi", (spec.qmax - zp) * scale)
                # the float form (float_per_axis): x/s rounded and clamped to [qmin - z, qmax - z], times s
                self.register_buffer("scale_b", scale.float().clone())
                self.register_buffer("code_lo", spec.qmin - zp)
                self.register_buffer("code_hi", spec.qmax - zp)
        elif spec.scheme == "bitlog2":
            self.register_buffer("thresholds", bitlog2_compare_levels(spec.bitlog2_variant))  # code = #levels <= n
            self.register_buffer("table", bitlog2_level_table(spec.bitlog2_variant).float() / self.scale)
        else:
            self.register_buffer("thresholds", log_thresholds(spec))
            self.register_buffer("table", log_level_table(spec))

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantize, act_dtype: str = "int8") -> "ExportActQuant":
        return cls(fq.spec, fq.scale, fq.zero_point, fq.label, act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.scheme == "uniform":
            if self.axis is not None and self.float_per_axis:
                # fxquant's own rule (primitives.round_clamp_centered_) as Div, Round, Max, Min, Mul
                return torch.clamp(torch.round(x / self.scale_b), self.code_lo, self.code_hi) * self.scale_b
            if self.narrow:
                x = torch.clamp(x, self.lo, self.hi)
            if self.axis is not None:
                q = _qd.quantize_per_channel(x, self.scales, self.zps, self.axis, self.qlo, self.qhi, self.dtype)
                return _qd.dequantize_per_channel(q, self.scales, self.zps, self.axis, self.qlo, self.qhi, self.dtype)
            q = _qd.quantize_per_tensor(x, self.s, self.zp8, self.qlo, self.qhi, self.dtype)
            return _qd.dequantize_per_tensor(q, self.s, self.zp8, self.qlo, self.qhi, self.dtype)
        if spec.scheme == "bitlog2":
            n = bitlog2_input(x, spec.bitlog2_variant)
            return self.table[bitlog2_codes_by_compare(n, self.thresholds)]
        count = log_count_by_compare(x / self.scale, self.thresholds)
        return self.scale * self.table[log_code_of_count(count, spec)]


class _ExportWeight(nn.Module):
    """Signed integer weight codes + per-channel dequantization (exports as an int8 initializer →
    ``DequantizeLinear``). Codes and zero points follow the quantizer core's signed-code rule, so
    they are the very integers a lowered layer holds."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, label: str):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scales.detach().reshape(-1).float().clone())
        self.register_buffer("zps", zero_points.detach().reshape(-1).to(torch.int64).clone())
        if self.scales.numel() not in (1, codes.shape[0]):
            raise ConfigError(f"ONNX export: weight quantizer '{label}' must be per-tensor or per output channel")
        self.per_tensor = (float(self.scales[0]), int(self.zps[0])) if self.scales.numel() == 1 else None

    @classmethod
    def from_fake_quant(cls, weight: torch.Tensor, fq: FakeQuantize) -> "_ExportWeight":
        if fq.spec.zero_point_domain != "int" or not torch.equal(fq.zero_point, fq.zero_point.round()):
            raise ConfigError(f"ONNX export: weight quantizer '{fq.label}' has a fractional or float-domain zero point; "
                              f"QDQ weights need an integer zero point")
        codes = to_signed_codes(weight.detach().float(), fq.scale, fq.zero_point, fq.spec)
        return cls(codes, fq.scale, fq.zero_point - code_offset(fq.spec), fq.label)

    def rows(self, rows: slice, label: str) -> "_ExportWeight":
        """The weight of output channels ``rows`` (a per-tensor scale and zero point are shared)."""
        pick = (lambda t: t) if self.per_tensor is not None else (lambda t: t[rows])
        return _ExportWeight(self.codes[rows], pick(self.scales), pick(self.zps), label)

    def forward(self) -> torch.Tensor:
        if self.per_tensor is not None:
            return _qd.dequantize_per_tensor(self.codes, self.per_tensor[0], self.per_tensor[1], -128, 127, torch.int8)
        return _qd.dequantize_per_channel(self.codes, self.scales, self.zps, 0, -128, 127, torch.int8)


class ExportLinear(nn.Module):
    """``linear(x, DQ(W))``, with the input quantizer in front when the layer quantizes it itself
    (a lowered Linear)."""

    def __init__(self, w: _ExportWeight, bias: torch.Tensor | None, act: ExportActQuant | None = None):
        super().__init__()
        self.act = act
        self.w = w
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.w(), self.bias)


class ExportConv2d(nn.Module):
    """``conv2d(x, DQ(W))``; with ``act`` (a lowered patch convolution, stride = kernel, no padding)
    the input quantizer in front."""

    def __init__(self, mod: QuantConv2d | None = None, *, w: _ExportWeight | None = None, bias: torch.Tensor | None = None,
                 stride: tuple[int, int] | None = None, act: ExportActQuant | None = None):
        super().__init__()
        self.act = act
        if mod is not None:
            self.w = _ExportWeight.from_fake_quant(mod.weight, mod.weight_fake_quant)
            bias = mod.bias
            self.stride, self.padding, self.dilation, self.groups = mod.stride, mod.padding, mod.dilation, mod.groups
        else:
            self.w = w
            self.stride, self.padding, self.dilation, self.groups = stride, 0, 1, 1
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        return F.conv2d(x, self.w(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportMatmul(nn.Module):
    """``matmul(Q/DQ(a), Q/DQ(b))``: a lowered attention matmul, back in QDQ form."""

    def __init__(self, a: ExportActQuant, b: ExportActQuant):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, a, b):
        return torch.matmul(self.a(a), self.b(b))


class ExportCompensation(nn.Module):
    """QwT's compensation Gemm; fp16 compute emulated with fp16 rounding of input, weight, output."""

    def __init__(self, mod: CompensationLinear):
        super().__init__()
        w = mod.weight_fake_quant(mod.weight) if mod.weight_fake_quant is not None else mod.weight
        self.half = mod.compute_dtype == "float16"
        self.weight = nn.Parameter(w.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(mod.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        if self.half:
            x = x.to(torch.float16).to(torch.float32)
            return F.linear(x, self.weight, self.bias).to(torch.float16).to(torch.float32)
        return F.linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------------------
# One handler per runtime module kind (as onnxruntime's quantizer registers one per op type)
# ------------------------------------------------------------------------------------------

ExportHandler = Callable[[nn.Module, str, str], "nn.Module | None"]
EXPORT_HANDLERS: dict[type, ExportHandler] = {}


def register_export_handler(module_type: type) -> Callable[[ExportHandler], ExportHandler]:
    """Register ``handler(module, qualified name, act_dtype) -> export module`` for ``module_type``
    (and its subclasses). Returning None keeps the module as it is."""

    def deco(fn: ExportHandler) -> ExportHandler:
        EXPORT_HANDLERS[module_type] = fn
        return fn

    return deco


def export_handler(mod: nn.Module) -> ExportHandler | None:
    for cls in type(mod).__mro__:
        if cls in EXPORT_HANDLERS:
            return EXPORT_HANDLERS[cls]
    return None


@register_export_handler(FakeQuantize)
def _export_fake_quant(mod: FakeQuantize, name: str, act_dtype: str) -> nn.Module | None:
    if mod.weight:  # a weight quantizer is exported by the layer that owns it
        return None
    if not mod.fake_quant_enabled:
        raise ConfigError(f"ONNX export: quantizer '{name}' is disabled; export a calibrated model")
    return ExportActQuant.from_fake_quant(mod, act_dtype)


@register_export_handler(QuantLinear)
def _export_quant_linear(mod: QuantLinear, name: str, act_dtype: str) -> nn.Module:
    return ExportLinear(_ExportWeight.from_fake_quant(mod.weight, mod.weight_fake_quant), mod.bias)


@register_export_handler(AdaRoundWeight)
def _export_adaround(mod: AdaRoundWeight, name: str, act_dtype: str) -> nn.Module:
    # training-time only: block_reconstruct hardens the weights and puts the FakeQuantize back
    raise ConfigError(f"ONNX export: '{name}' is an AdaRound weight quantizer, which exists only while "
                      f"block_reconstruct trains; export the model that fxquant.compile returned")


@register_export_handler(QuantConv2d)
def _export_quant_conv(mod: QuantConv2d, name: str, act_dtype: str) -> nn.Module:
    return ExportConv2d(mod)


@register_export_handler(CompensationLinear)
def _export_compensation(mod: CompensationLinear, name: str, act_dtype: str) -> nn.Module:
    return ExportCompensation(mod)


@register_export_handler(LoweredLinear)
def _export_lowered_linear(mod: LoweredLinear, name: str, act_dtype: str) -> nn.Module:
    # the lowered layer already holds the signed integer codes QDQ needs
    act = ExportActQuant(mod.act_spec, mod.a_scale, mod.a_zp, f"{name} (input)", act_dtype)
    w = _ExportWeight(mod.weight_codes(), mod.w_scale, mod.w_zp, name)
    return ExportLinear(w, mod.bias, act)


@register_export_handler(LoweredPatchConv)
def _export_lowered_patch_conv(mod: LoweredPatchConv, name: str, act_dtype: str) -> nn.Module:
    # the [O, K] codes back in the convolution's [O, C, kh, kw] layout: the fake-quant conv's QDQ form
    act = ExportActQuant(mod.act_spec, mod.a_scale, mod.a_zp, f"{name} (input)", act_dtype)
    codes = mod.weight_codes().reshape(mod.out_channels, mod.in_channels, *mod.kernel_size)
    return ExportConv2d(w=_ExportWeight(codes, mod.w_scale, mod.w_zp, name), bias=mod.bias, stride=mod.kernel_size, act=act)


@register_export_handler(LoweredGroupedLinear)
def _export_lowered_grouped_linear(mod: LoweredGroupedLinear, name: str, act_dtype: str) -> nn.Module:
    # contiguous groups: the [C/g] block parameters, exported per channel like a PerGroup FakeQuantize;
    # instance-aware groups: ExportActQuant refuses them with the reason
    scale, zp = mod.act_params(1)
    act = ExportActQuant(mod.act_spec, scale, zp, f"{name} (input)", act_dtype)
    return ExportLinear(_ExportWeight(mod.weight_codes(), mod.w_scale, mod.w_zp, name), mod.bias, act)


@register_export_handler(LoweredMatmul)
def _export_lowered_matmul(mod: LoweredMatmul, name: str, act_dtype: str) -> nn.Module:
    return ExportMatmul(ExportActQuant(mod.a_spec, mod.a_scale, mod.a_zp, f"{name} (first operand)", act_dtype),
                        ExportActQuant(mod.b_spec, mod.b_scale, mod.b_zp, f"{name} (second operand)", act_dtype))


class ExportAttention(nn.Module):
    """``matmul(softmax(matmul(Q/DQ(q), Q/DQ(kᵀ))), ...)``: a fused lowered attention, unfused back into QDQ form."""

    def __init__(self, qk: ExportMatmul, av: ExportMatmul, score_op: str | None):
        super().__init__()
        self.qk, self.av, self.score_op = qk, av, score_op

    def forward(self, q, kt, v, scale=None):
        s = self.qk(q, kt)
        s = s * scale if self.score_op == "mul" else s / scale if self.score_op == "div" else s
        return self.av(torch.softmax(s, dim=-1), v)


@register_export_handler(LoweredAttention)
def _export_lowered_attention(mod: LoweredAttention, name: str, act_dtype: str) -> nn.Module:
    return ExportAttention(_export_lowered_matmul(mod.qk, f"{name}.qk", act_dtype),
                           _export_lowered_matmul(mod.av, f"{name}.av", act_dtype), mod.score_op)


def _is_fxquant_module(mod: nn.Module) -> bool:
    return type(mod).__module__.split(".")[0] == "fxquant"


def _set_module(gm: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


TARGETS = ("onnxruntime", "openvino")

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


def prepare_for_export(qmodel: fx.GraphModule, *, act_dtype: str = "int8", target: str = "onnxruntime",
                       example_inputs: Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
    """A copy of ``qmodel`` whose fxquant runtime modules are export-ready modules (same function).

    Every fxquant module kind goes through its handler in ``EXPORT_HANDLERS``; a kind without one
    is an error naming the module, so a new runtime module cannot be exported silently wrong.
    ``target="openvino"`` also moves per-tensor activation quantizers above the reshapes and
    transposes that feed them (``hoist_act_quant_above_moves``: the same function, a Q/DQ placement
    OpenVINO fuses), after splitting fused qkv Linears into one Linear per piece
    (``split_fused_projections``, given ``example_inputs`` for the shapes) so that q's, k's and v's
    quantizers land on a Linear's output; ``"onnxruntime"`` keeps each Q/DQ pair right before its
    consumer and the fused Linear."""
    if act_dtype not in ("int8", "uint8"):
        raise ConfigError(f"act_dtype must be 'int8' or 'uint8', got {act_dtype!r}")
    if target not in TARGETS:
        raise ConfigError(f"export target must be one of {list(TARGETS)}, got {target!r}")
    gm = copy.deepcopy(qmodel)
    replaced: list[str] = []
    for name, mod in list(gm.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue  # the root, or inside a module already replaced as a whole
        handler = export_handler(mod)
        if handler is None:
            if _is_fxquant_module(mod):
                raise ConfigError(f"ONNX export: no export handler for '{name}' ({type(mod).__qualname__}); register one "
                                  f"with fxquant.export.register_export_handler({type(mod).__qualname__})")
            continue
        new = handler(mod, name, act_dtype)
        if new is not None:
            _set_module(gm, name, new)
            replaced.append(name)
    gm.recompile()
    if target == "openvino":
        for mod in gm.modules():
            if isinstance(mod, ExportActQuant) and mod.spec.scheme == "uniform" and mod.axis is not None:
                mod.float_per_axis = True
        if example_inputs is not None:
            propagate_shapes(gm, example_inputs)
            split_fused_projections(gm)
        hoist_act_quant_above_moves(gm)
    return gm


@dataclass
class ExportResult:
    path: Path
    opset: int
    nodes: dict[str, int]
    initializer_types: dict[str, int]


def to_onnx(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
            act_dtype: str = "int8", opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            target: str = "onnxruntime") -> ExportResult:
    """Export a quantized GraphModule (any fxquant recipe, or ``fp32``) to ONNX QDQ at ``path``, with
    the Q/DQ placement of ``target`` (``prepare_for_export``)."""
    import onnx  # heavy, and needed only when exporting

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if opset < 17:
        raise ConfigError(f"ONNX export needs opset >= 17, got {opset}")
    gm = prepare_for_export(qmodel, act_dtype=act_dtype, target=target, example_inputs=example_inputs).eval()

    class _Logits(nn.Module):  # a plain tensor output whatever the model returns (HF ModelOutput)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return logits_of(self.inner(*args))

    wrapper = _Logits(gm).eval()
    # forward(*args): the dynamic-shape spec mirrors the single varargs tuple
    dyn = (tuple({0: torch.export.Dim.AUTO} for _ in example_inputs),) if dynamic_batch else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(example_inputs), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes=dyn, input_names=[f"input{i}" if i else "input" for i in range(len(example_inputs))],
                          output_names=["logits"], verbose=False, report=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    types: dict[str, int] = {}
    for init in model.graph.initializer:
        t = onnx.TensorProto.DataType.Name(init.data_type)
        types[t] = types.get(t, 0) + 1
    return ExportResult(path, model.opset_import[0].version, counts, types)


def run_onnx(path: str | Path, inputs: Sequence[torch.Tensor], *, threads: int | None = None,
             optimize: bool = True) -> torch.Tensor:
    """Run an exported model with onnxruntime's CPU provider.

    ``optimize=False`` turns onnxruntime's graph optimizations off: Q/DQ pairs and float MatMuls
    then run as written (no ``MatMulIntegerToFloat`` fusion), which isolates the exported function
    from the integer GEMM kernel of the machine (on x86 CPUs without VNNI, onnxruntime's u8×s8 GEMM
    sums byte pairs into saturating int16, ``vpmaddubsw``, so its results can differ by more than a
    code step)."""
    import onnxruntime as ort  # heavy, and needed only to run an exported model

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])
