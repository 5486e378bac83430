"""OpenVINO IR export (``.xml`` + ``.bin``) of fxquant's quantized graphs, and what OpenVINO's CPU
plugin makes of them.

``to_openvino(qmodel, example_inputs, path)`` writes the ONNX QDQ model (``to_onnx``, the same
Q/DQ placement and integer initializers), reads it with ``openvino.Core().read_model`` and writes
it with ``openvino.save_model`` (weights kept in their int8/f32 types: ``compress_to_fp16=False``).

What the CPU plugin runs in int8 (openvino 2026.4, CIFAR ViT, ``runtime_precisions``): every
quantized Linear and the patch-embedding conv (the export for OpenVINO splits each fused qkv
Linear into q, k and v Linears: 37 FullyConnected, all int8); the attention matmuls only when
their operands are quantized symmetrically (recipe ``w8a8-sym``, or ``--set a_symmetric=true``:
the fused attention subgraphs then take int8 q, k and v and quantize the softmax output inside,
6/6, ``attention_operand_types``; ``w8a8-ov`` gives them float v; with the default asymmetric
activations q·kᵀ and A·v stay float, 0/12). ``openvino.convert_model`` on the same file gives a
graph with 12 of the 25 Linears in float, hence ``read_model``. OpenVINO
reads the FakeQuantize form of each Q→DQ pair; its CPU plugin's low-precision transformations then
decide which layers run in int8. ``runtime_precisions`` compiles a model for the CPU and reads every
executed layer's ``layerType`` and the precision of its primitive (``primitiveType``, else
``runtimePrecision``) from ``compiled.get_runtime_model()``, the way to check what actually runs in
integer arithmetic.

Per-axis activation quantizers (IGQ's contiguous channel groups, per channel along the last axis)
go to OpenVINO as float ``Div → Round → Max/Min → Mul``, fxquant's rule itself, not as per-axis
Q/DQ (``ExportActQuant.float_per_axis``): OpenVINO 2026.4's CPU plugin refuses a per-axis
FakeQuantize on any axis but 1 ("doesn't support non per-tensor quantization for axis: 2") and,
with the narrow-range ``Max/Min`` clip in front, compiles it into elementwise ops that compute other
codes (up to 36 code steps off on a single ``[2, 5, 8]`` Q/DQ pair; IGQ W4A4 on the CIFAR ViT:
top-1 60.75 vs 66.95 and mean |Δlogit| 0.46 where onnxruntime gives 0.002 on the same file). Those
Linears run in float there, as their per-channel input scales along the reduction axis allow no
integer GEMM anyway.

``openvino`` is an optional dependency (``pip install -e ".[openvino]"``): imported here, lazily.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import fx

from fxquant.core.errors import ConfigError

from .runner import DEFAULT_OPSET, to_onnx


def _openvino():
    try:
        import openvino as ov
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError("OpenVINO export needs the openvino package: pip install -e \".[openvino]\" "
                          "(or pip install openvino)") from None
    return ov


@dataclass
class OpenVINOResult:
    """Where the IR went and what the CPU plugin runs: ``layers`` maps each executed layer type to
    ``{precision: count}`` (``runtime_precisions``)."""

    xml: Path
    bin: Path
    onnx: Path | None
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    attention_operands: list[tuple[str, ...]] = field(default_factory=list)

    def int8_count(self, layer_type: str) -> tuple[int, int]:
        """``(int8 or u8 layers, all layers)`` of one type (``FullyConnected``, ``MatMul``, ``Convolution``)."""
        return int8_share(self.layers.get(layer_type, {}))

    def int8_attention(self) -> tuple[int, int]:
        """``(fused attention subgraphs with q, kᵀ and v all in int8, all of them)``."""
        return int8_attention_share(self.attention_operands)


INT8_PRECISIONS = ("i8", "u8")


def int8_share(counts: dict[str, int]) -> tuple[int, int]:
    """``(int8 or u8, all)`` of one layer type's ``{precision: count}`` (``runtime_precisions``)."""
    return sum(v for k, v in counts.items() if k in INT8_PRECISIONS), sum(counts.values())


def int8_attention_share(operands: list[tuple[str, ...]]) -> tuple[int, int]:
    """``(subgraphs whose operands are all int8, all subgraphs)`` of ``attention_operand_types``:
    both attention matmuls integer."""
    return sum(all(t in INT8_PRECISIONS for t in ops) for ops in operands), len(operands)


def to_openvino(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
                act_dtype: str = "int8", opset: int = DEFAULT_OPSET, keep_onnx: bool = False) -> OpenVINOResult:
    """Export a quantized GraphModule to OpenVINO IR at ``path`` (``.xml``; the weights go to the
    ``.bin`` beside it) through the ONNX QDQ export, and record the CPU plugin's layer precisions."""
    ov = _openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"OpenVINO IR is written as <name>.xml (+ <name>.bin); got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fxquant-ov-") as tmp:
        onnx_path = path.with_suffix(".onnx") if keep_onnx else Path(tmp) / "model.onnx"
        to_onnx(qmodel, example_inputs, onnx_path, act_dtype=act_dtype, opset=opset, target="openvino")
        # Core.read_model, not convert_model: on the same QDQ file (openvino 2026.4, CIFAR ViT w8a8)
        # the graph convert_model builds leaves 12 of the 25 Linears in float on the CPU plugin,
        # the one read_model builds runs all 25 in int8 (measured with runtime_precisions)
        model = ov.Core().read_model(str(onnx_path))
        ov.save_model(model, str(path), compress_to_fp16=False)
    runtime = _runtime_model(path)
    return OpenVINOResult(path, path.with_suffix(".bin"), onnx_path if keep_onnx else None,
                          _precisions(runtime), _attention_operands(runtime))


def _runtime_model(model_path: str | Path, threads: int | None = None):
    ov = _openvino()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    return ov.Core().compile_model(str(model_path), "CPU", config).get_runtime_model()


def _layer_type(op) -> str:
    info = op.get_rt_info()
    return _text(info["layerType"]) if "layerType" in info else op.get_type_name()


_EXEC_PRECISIONS = ("i8", "u8", "bf16", "f16", "f32")


def _exec_precision(op) -> str:
    """The precision a compiled layer computes in: the suffix of its ``primitiveType``
    (``brgemm_avx512_i8``, ``undef_bf16``, ``jit_avx512_I8``), else its ``runtimePrecision``. The
    two differ for a weight-compressed FullyConnected (int8 weights dequantized into a bf16/f32
    GEMM): ``runtimePrecision`` says i8 there, the primitive ``undef_bf16``."""
    info = op.get_rt_info()
    if "primitiveType" in info:
        suffix = _text(info["primitiveType"]).rsplit("_", 1)[-1].lower()
        if suffix in _EXEC_PRECISIONS:
            return suffix
    return _text(info["runtimePrecision"]) if "runtimePrecision" in info else "?"


def _precisions(runtime) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for op in runtime.get_ops():
        counts.setdefault(_layer_type(op), Counter())[_exec_precision(op)] += 1
    return {k: dict(v) for k, v in sorted(counts.items())}


def _attention_operands(runtime) -> list[tuple[str, ...]]:
    return [tuple(op.input(i).get_element_type().get_type_name() for i in range(op.get_input_size()))
            for op in runtime.get_ordered_ops() if _layer_type(op) == "Subgraph"]


def runtime_precisions(model_path: str | Path, *, threads: int | None = None) -> dict[str, dict[str, int]]:
    """``{layer type: {precision: count}}`` of a model (IR or ONNX) compiled for the CPU: the
    precision each layer computes in (``_exec_precision``: a FullyConnected counts as i8 only when
    its GEMM is integer, not when it merely stores int8 weights)."""
    return _precisions(_runtime_model(model_path, threads))


def attention_operand_types(model_path: str | Path, *, threads: int | None = None) -> list[tuple[str, ...]]:
    """The element types of the inputs of each fused subgraph (``Subgraph``: the CPU plugin's fused
    attention, ``q·kᵀ → softmax → ·v``) of a model compiled for the CPU, in graph order: e.g.
    ``("i8", "i8", "i8")`` when q, kᵀ and v enter in int8 (the softmax output's quantizer is then
    inside the subgraph, and both matmuls are integer), ``("i8", "i8", "bf16")`` when v is float."""
    return _attention_operands(_runtime_model(model_path, threads))


def _text(value) -> str:
    """An rt_info entry (an ``OVAny``) as text."""
    return value.astype(str) if hasattr(value, "astype") else str(value)


def run_openvino(model_path: str | Path, inputs: Sequence[torch.Tensor], *, threads: int | None = None) -> torch.Tensor:
    """The model's first output on ``inputs`` (CPU plugin), as a float tensor."""
    ov = _openvino()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = ov.Core().compile_model(str(model_path), "CPU", config)
    out = compiled([t.numpy() for t in inputs])[compiled.output(0)]
    return torch.from_numpy(out.copy())


__all__ = ["to_openvino", "runtime_precisions", "run_openvino", "OpenVINOResult"]
