"""ONNX QDQ export of fxquant's fake-quantized graphs.

``to_onnx(qmodel, example_inputs, path)`` rewrites a copy of the quantized GraphModule into
export-ready modules and runs ``torch.onnx.export(dynamo=True)``:

* **weights** (``QuantLinear``/``QuantConv2d``, per output channel): integer initializers (the codes
  from ``quant.primitives.quantize``) + ``DequantizeLinear(axis=0)``. 2-7-bit codes are stored in
  int8 initializers (onnxruntime's QDQ fusions take int8/uint8; opset-21 int4 is left out).
* **uniform activations** (per tensor): ``QuantizeLinear`` → ``DequantizeLinear``, int8 by default
  (zero point shifted by -128 for asymmetric quantizers, the same integers), uint8 on request.
  Below 8 bits a ``Clip`` to the quantizer's range precedes the 8-bit pair: the codes are then the
  low-bit codes, exactly.
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
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import ConfigError
from fxquant.graph import logits_of
from fxquant.quant import FakeQuantize, PerTensor, QuantConv2d, QuantLinear, QuantSpec, quantize
from fxquant.quant.primitives import BITLOG2_VARIANTS, bitlog2_level_table, log_level_table, log_thresholds

try:  # registers torch.ops.quantized_decomposed (the ops the ONNX exporter maps to Q/DQ)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
except Exception:  # pragma: no cover
    pass

_qd = torch.ops.quantized_decomposed
DEFAULT_OPSET = 18


def _int8_container(spec: QuantSpec, zero_point: torch.Tensor, act_dtype: str) -> tuple[torch.dtype, int, int, torch.Tensor]:
    """ONNX integer type, its range, and the zero point in that type for a uniform spec."""
    if spec.symmetric or act_dtype == "int8":
        shift = 0 if spec.symmetric else -128
        return torch.int8, -128, 127, (zero_point + shift)
    return torch.uint8, 0, 255, zero_point


class ExportActQuant(nn.Module):
    """Export form of an activation ``FakeQuantize`` (see module docstring)."""

    def __init__(self, fq: FakeQuantize, act_dtype: str = "int8"):
        super().__init__()
        spec = fq.spec
        self.spec = spec
        self.register_buffer("scale", fq.scale.detach().clone().reshape(()))
        if spec.scheme == "uniform":
            if not isinstance(spec.granularity, PerTensor) or fq.scale.numel() != 1:
                raise ConfigError(f"ONNX export: activation quantizer '{fq.label}' is not per-tensor ({spec.short()}); "
                                  f"export supports per-tensor activations (run repq_reparam for per-channel LN outputs)")
            zp = fq.zero_point.detach().reshape(())
            if not torch.equal(zp, zp.round()):
                raise ConfigError(f"ONNX export: quantizer '{fq.label}' has a fractional zero point {zp.item():.3f} "
                                  f"(RepQ-faithful z̃); recompile with round_target_zero_point=True")
            self.dtype, self.qlo, self.qhi, zp8 = _int8_container(spec, zp, act_dtype)
            self.zp8 = int(zp8.item())
            self.s = float(self.scale.item())  # python constants: torch.export keeps them as attributes
            self.lo = float(((spec.qmin - zp) * self.scale).item())
            self.hi = float(((spec.qmax - zp) * self.scale).item())
            self.narrow = spec.bits < 8
        elif spec.scheme == "bitlog2":
            m, _ = BITLOG2_VARIANTS[spec.bitlog2_variant]
            self.m = m
            levels = bitlog2_level_table(spec.bitlog2_variant)
            self.register_buffer("thresholds", levels[1:].float())  # code = #levels <= n
            self.register_buffer("table", levels.float() / self.scale)
        else:
            self.register_buffer("thresholds", log_thresholds(spec))
            self.register_buffer("table", log_level_table(spec))
            self.zero_code = spec.zero_code
            self.qmax = spec.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.scheme == "uniform":
            if self.narrow:
                x = torch.clamp(x, self.lo, self.hi)
            q = _qd.quantize_per_tensor(x, self.s, self.zp8, self.qlo, self.qhi, self.dtype)
            return _qd.dequantize_per_tensor(q, self.s, self.zp8, self.qlo, self.qhi, self.dtype)
        if spec.scheme == "bitlog2":
            n = torch.clamp(torch.floor(x * self.m), 0, self.m - 1)
            code = (n.unsqueeze(-1) >= self.thresholds).sum(-1)
            return self.table[code]
        count = ((x / self.scale).unsqueeze(-1) <= self.thresholds).sum(-1)
        code = torch.where(count >= self.thresholds.numel(), torch.full_like(count, self.zero_code), count.clamp(max=self.qmax))
        return self.scale * self.table[code]


class _ExportWeight(nn.Module):
    """Integer weight codes + per-channel dequantization (exports as int initializer → DequantizeLinear)."""

    def __init__(self, weight: torch.Tensor, fq: FakeQuantize):
        super().__init__()
        spec = fq.spec
        codes = quantize(weight.detach().float(), fq.scale, fq.zero_point, spec)
        if not torch.equal(fq.zero_point, fq.zero_point.round()):
            raise ConfigError(f"ONNX export: weight quantizer '{fq.label}' has a fractional zero point")
        # codes fit int8 for every spec fxquant makes: signed [-128, 127] or unsigned [0, 2^b - 1] with b <= 7;
        # 8-bit asymmetric codes [0, 255] shift by -128 (zero point too)
        shift = -128 if (not spec.symmetric and spec.bits == 8) else 0
        self.register_buffer("codes", (codes + shift).to(torch.int8))
        self.register_buffer("scales", fq.scale.detach().reshape(-1).float().clone())
        self.register_buffer("zps", (fq.zero_point.detach().reshape(-1) + shift).to(torch.int64))
        if self.scales.numel() not in (1, weight.shape[0]):
            raise ConfigError(f"ONNX export: weight quantizer '{fq.label}' must be per-tensor or per output channel")
        self.per_tensor = (float(self.scales[0]), int(self.zps[0])) if self.scales.numel() == 1 else None

    def forward(self) -> torch.Tensor:
        if self.per_tensor is not None:
            return _qd.dequantize_per_tensor(self.codes, self.per_tensor[0], self.per_tensor[1], -128, 127, torch.int8)
        return _qd.dequantize_per_channel(self.codes, self.scales, self.zps, 0, -128, 127, torch.int8)


class ExportLinear(nn.Module):
    def __init__(self, mod: QuantLinear):
        super().__init__()
        self.w = _ExportWeight(mod.weight, mod.weight_fake_quant)
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.w(), self.bias)


class ExportConv2d(nn.Module):
    def __init__(self, mod: QuantConv2d):
        super().__init__()
        self.w = _ExportWeight(mod.weight, mod.weight_fake_quant)
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = mod.stride, mod.padding, mod.dilation, mod.groups

    def forward(self, x):
        return F.conv2d(x, self.w(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportCompensation(nn.Module):
    """QwT's compensation Gemm; fp16 compute emulated with fp16 rounding of input, weight, output."""

    def __init__(self, mod):
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


def _set_module(gm: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


def prepare_for_export(qmodel: fx.GraphModule, *, act_dtype: str = "int8") -> fx.GraphModule:
    """A copy of ``qmodel`` whose quantizers are export-ready modules (same function)."""
    from fxquant.passes.qwt import CompensationLinear

    if act_dtype not in ("int8", "uint8"):
        raise ConfigError(f"act_dtype must be 'int8' or 'uint8', got {act_dtype!r}")
    gm = copy.deepcopy(qmodel)
    for name, mod in list(gm.named_modules()):
        if not name:
            continue
        if isinstance(mod, FakeQuantize) and not mod.weight:
            if not mod.fake_quant_enabled:
                raise ConfigError(f"ONNX export: quantizer '{name}' is disabled; export a calibrated model")
            _set_module(gm, name, ExportActQuant(mod, act_dtype))
        elif isinstance(mod, QuantLinear):
            _set_module(gm, name, ExportLinear(mod))
        elif isinstance(mod, QuantConv2d):
            _set_module(gm, name, ExportConv2d(mod))
        elif isinstance(mod, CompensationLinear):
            _set_module(gm, name, ExportCompensation(mod))
    gm.recompile()
    return gm


@dataclass
class ExportResult:
    path: Path
    opset: int
    nodes: dict[str, int]
    initializer_types: dict[str, int]


def to_onnx(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
            act_dtype: str = "int8", opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> ExportResult:
    """Export a quantized GraphModule (any fxquant recipe, or ``fp32``) to ONNX QDQ at ``path``."""
    import onnx

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if opset < 17:
        raise ConfigError(f"ONNX export needs opset >= 17, got {opset}")
    gm = prepare_for_export(qmodel, act_dtype=act_dtype).eval()

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


def run_onnx(path: str | Path, inputs: Sequence[torch.Tensor], *, threads: int | None = None) -> torch.Tensor:
    """Run an exported model with onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])
