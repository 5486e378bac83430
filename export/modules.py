"""Export-ready modules: fxquant's quantized layers in the form ``torch.onnx.export`` writes as ONNX
QDQ (``handlers`` builds them from the runtime modules, ``onnx.to_onnx`` exports them):

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
* **dynamic activations** (``Dynamic``: ranges from each input at run time, per image, token or
  token and channel group; ``ExportDynamicActQuant``) are the very function fake quantization
  computes, in standard ops: ``ReduceMin``/``ReduceMax`` over the token's channels (or the image,
  or a ``Reshape``-d channel group), the quantizer core's ``choose_qparams`` as ``Sub``/``Div``/
  ``Max``/``Round``/``Clip``, then ``x/s`` rounded, clamped to ``[qmin - z, qmax - z]`` and times
  ``s``: float ops, exact, with a dynamic batch. ``QuantizeLinear`` takes a scalar or per-axis
  scale, not one per token (``DynamicQuantizeLinear`` is per tensor, uint8), so there is no QDQ
  form; the graph runs on onnxruntime and OpenVINO as float. onnxruntime's default optimization
  (1.32) turns each ``DQ(W) → MatMul`` with a float input into ``MatMulNBits`` at accuracy level 4,
  which quantizes that input again, to int8 per block of 32 (CIFAR ViT W4A4 per-token: mean
  |Δlogit| 0.11 instead of 0.009); the session config ``session.qdq_matmulnbits_accuracy_level=1``
  keeps the exported function (tests/export/test_onnx_dynamic.py).
* **log quantizers** (log√2, log2, BitLog2) have no ONNX op. They are exported with standard ops as
  the very computation fxquant runs: ``r = x / Δ``, compare ``r`` with the float32 rounding midpoints
  (``LessOrEqual`` + ``ReduceSum`` = the code), then ``Gather`` from the float32 level table and
  ``Mul`` by Δ (BitLog2: ``Floor(x·M)``, compare with the integer levels, ``Gather(levels / δ)``).
  An integer runtime would instead read the codes (a 4-bit index per attention element) and run
  the integer A·v of ``fxquant.kernels.bitlog2``.
* **QwT compensation**: a float ``Gemm`` (fp16 compute is emulated in fp32 with fp16-rounded weights,
  input and output, since onnxruntime's CPU provider has no fp16 Gemm).
* RepQ-ViT reparameterization needs nothing: the folded LayerNorm and Linear parameters are the
  graph's parameters.

The Q/DQ pairs are PyTorch's ``quantized_decomposed`` ops, which the ONNX exporter maps to
``QuantizeLinear``/``DequantizeLinear`` (see ``onnx`` for the numerics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    CompensationLinear,
    Dynamic,
    FakeQuantize,
    InstanceGroups,
    PerAxis,
    PerGroup,
    QuantConv2d,
    QuantSpec,
    choose_qparams,
    code_offset,
    dynamic_ranges,
    expand_params,
    round_clamp_centered,
    to_signed_codes,
)
from fxquant.core.quant.logcodes import (
    bitlog2_codes_by_compare,
    bitlog2_compare_levels,
    bitlog2_input,
    bitlog2_level_table,
    log_code_of_count,
    log_count_by_compare,
    log_level_table,
    log_thresholds,
)

try:  # registers torch.ops.quantized_decomposed (the ops the ONNX exporter maps to Q/DQ)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
except Exception:  # pragma: no cover
    pass

_qd = torch.ops.quantized_decomposed


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
                self.register_buffer("zp_b", zp.float().clone())
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
                # fxquant's own rule as Div, Round, Max, Min, Mul
                return round_clamp_centered(x / self.scale_b, self.zp_b, spec) * self.scale_b
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


class ExportDynamicActQuant(nn.Module):
    """Export form of a dynamic activation quantizer (``Dynamic`` spec, see module docstring): the
    per-input ranges (``quant.dynamic_ranges``), parameters (``quant.choose_qparams``, the rule of
    every uniform quantizer) and ``round(x/s)`` clamped to ``[qmin - z, qmax - z]`` times ``s``
    (``quant.round_clamp_centered``, the core's rule out of place), so fake
    quantization and the exported graph compute the same function."""

    def __init__(self, spec: QuantSpec, label: str = ""):
        super().__init__()
        if not isinstance(spec.granularity, Dynamic) or spec.scheme != "uniform":
            raise ConfigError(f"ONNX export: '{label}' ({spec.short()}) is not a dynamic uniform quantizer")
        self.spec = spec
        self.label = label

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantize) -> "ExportDynamicActQuant":
        return cls(fq.spec, fq.label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, g = self.spec, self.spec.granularity
        scale, zp = choose_qparams(*dynamic_ranges(x, g), spec)
        grouped = g.level == "token" and g.group_size > 0
        if grouped:  # [.., C] -> [.., C/g, g]: each group's parameters broadcast over its channels, no repeat
            x = x.unflatten(-1, (-1, g.group_size))
            scale, zp = scale.unsqueeze(-1), zp.unsqueeze(-1)
        out = round_clamp_centered(x / scale, zp, spec) * scale
        return out.flatten(-2) if grouped else out


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

    def __init__(self, w: _ExportWeight, bias: torch.Tensor | None, act: ExportActQuant | ExportDynamicActQuant | None = None):
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


class ExportAttention(nn.Module):
    """``matmul(softmax(matmul(Q/DQ(q), Q/DQ(kᵀ))), ...)``: a fused lowered attention, unfused back into QDQ form."""

    def __init__(self, qk: ExportMatmul, av: ExportMatmul, score_op: str | None):
        super().__init__()
        self.qk, self.av, self.score_op = qk, av, score_op

    def forward(self, q, kt, v, scale=None):
        s = self.qk(q, kt)
        s = s * scale if self.score_op == "mul" else s / scale if self.score_op == "div" else s
        return self.av(torch.softmax(s, dim=-1), v)
