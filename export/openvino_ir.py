"""OpenVINO IR export (``.xml`` + ``.bin``) of fxquant's quantized graphs, and what OpenVINO's CPU
plugin makes of them.

``to_openvino(qmodel, example_inputs, path)`` writes the ONNX QDQ model (``to_onnx``, the same
Q/DQ placement and integer initializers), reads it with ``openvino.Core().read_model`` and writes
it with ``openvino.save_model`` (weights kept in their int8/f32 types: ``compress_to_fp16=False``).

What the CPU plugin runs in int8 (openvino 2026.4, CIFAR ViT): every quantized Linear and the
patch-embedding conv (the export for OpenVINO splits each fused qkv Linear into q, k and v Linears:
37 FullyConnected, all int8); the attention matmuls only when their operands are quantized
symmetrically (recipe ``w8a8-sym``, or ``--set a_symmetric=true``: 12/12; ``w8a8-ov`` leaves
softmax·v in float, 6/12; with the default asymmetric activations both stay float). On CPUs with
AVX-512 the plugin fuses each attention into a ``Subgraph`` that takes int8 q, k and v; on AVX2-only
CPUs it runs them as standalone int8 MatMuls. OpenVINO reads the FakeQuantize form of each Q→DQ
pair; its low-precision transformations then decide which layers run in int8.

That holds however the IR is compiled (``CompileConfig``: dynamic or static batch, default/f32
precision hint, LATENCY/THROUGHPUT), and ``to_openvino`` checks it: it compiles the IR in each of
``compile_configs()`` and keeps one ``PluginRecord`` each (``OpenVINOResult.inconsistent`` lists
the configurations that differ). It did not hold before the export stopped sharing one all-zero
weight zero-point constant across layers (``runner.drop_zero_weight_zero_points``): compiled with
a static shape, or after ``openvino.convert_model``, 30 of the 37 FullyConnected layers and the
conv then ran in float. ``plugin_record`` reads every executed layer's ``layerType`` and the
precision of its primitive (``primitiveType``, else ``runtimePrecision``) from
``compiled.get_runtime_model()``, the way to check what actually runs in integer arithmetic.

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


@dataclass(frozen=True)
class CompileConfig:
    """One way a user compiles an IR for OpenVINO's CPU plugin: the input shape (``"dynamic"``: the
    IR's dynamic batch; ``"static"``: ``model.reshape`` to ``batch``, as ``benchmark_app -shape`` and
    static-shape devices do), the inference precision hint (``"default"``: the plugin's own choice,
    bf16 on CPUs with AVX512-BF16/AMX and f32 elsewhere) and the performance hint."""

    shape: str = "dynamic"
    batch: int = 1
    precision: str = "default"
    hint: str = "LATENCY"

    def __post_init__(self) -> None:
        if self.shape not in ("dynamic", "static"):
            raise ConfigError(f"OpenVINO compile shape must be 'dynamic' or 'static', got {self.shape!r}")
        if self.precision not in ("default", "f32", "bf16", "f16"):
            raise ConfigError(f"OpenVINO inference precision must be default, f32, bf16 or f16, got {self.precision!r}")
        if self.hint not in ("LATENCY", "THROUGHPUT"):
            raise ConfigError(f"OpenVINO performance hint must be LATENCY or THROUGHPUT, got {self.hint!r}")
        if self.batch < 1:
            raise ConfigError(f"a static batch must be >= 1, got {self.batch}")

    @property
    def label(self) -> str:
        shape = "dynamic" if self.shape == "dynamic" else f"static b{self.batch}"
        return f"{shape}, {self.precision}, {self.hint.lower()}"

    def properties(self, threads: int | None = None) -> dict:
        props: dict = {"PERFORMANCE_HINT": self.hint}
        if self.precision != "default":
            props["INFERENCE_PRECISION_HINT"] = self.precision
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        return props


def compile_configs(batch: int = 1) -> tuple[CompileConfig, ...]:
    """Every configuration ``to_openvino`` checks: dynamic and static (``batch``) shape × the
    plugin's default and f32 precision × LATENCY and THROUGHPUT."""
    return tuple(CompileConfig(shape, batch, precision, hint) for shape in ("dynamic", "static")
                 for precision in ("default", "f32") for hint in ("LATENCY", "THROUGHPUT"))


INT8_PRECISIONS = ("i8", "u8")


def int8_share(counts: dict[str, int]) -> tuple[int, int]:
    """``(int8 or u8, all)`` of one layer type's ``{precision: count}`` (``runtime_precisions``)."""
    return sum(v for k, v in counts.items() if k in INT8_PRECISIONS), sum(counts.values())


@dataclass
class PluginRecord:
    """What the CPU plugin runs for one compile configuration: ``layers`` maps each executed layer
    type to ``{precision: count}``; ``attention`` is ``(attention matmuls in int8, all)``, an
    attention matmul being a MatMul of two activations in the IR (q·kᵀ, softmax·v), wherever the
    plugin put it: a standalone MatMul layer (int8 when its primitive is) or a fused attention
    ``Subgraph`` (int8 when all of its inputs are)."""

    config: CompileConfig
    layers: dict[str, dict[str, int]]
    attention: tuple[int, int]
    precision: str = ""  # the inference precision the compiled model reports

    def int8_count(self, layer_type: str) -> tuple[int, int]:
        """``(int8 or u8 layers, all layers)`` of one type (``FullyConnected``, ``MatMul``, ``Convolution``)."""
        return int8_share(self.layers.get(layer_type, {}))

    def int8_summary(self) -> dict[str, tuple[int, int]]:
        """The int8 shares a deployment cares about: the Linears, the convolutions, the attention matmuls."""
        out = {kind: self.int8_count(kind) for kind in ("FullyConnected", "Convolution")}
        out["attention matmuls"] = self.attention
        return {k: v for k, v in out.items() if v[1]}


@dataclass
class OpenVINOResult:
    """Where the IR went and what the CPU plugin runs: ``records`` holds one ``PluginRecord`` per
    compile configuration checked (``compile_configs``); ``layers`` and ``int8_count`` are the first
    one's (the dynamic-shape default compile)."""

    xml: Path
    bin: Path
    onnx: Path | None
    records: list[PluginRecord] = field(default_factory=list)

    @property
    def layers(self) -> dict[str, dict[str, int]]:
        return self.records[0].layers if self.records else {}

    def int8_count(self, layer_type: str) -> tuple[int, int]:
        """``(int8 or u8 layers, all layers)`` of one type in the first configuration."""
        return self.records[0].int8_count(layer_type) if self.records else (0, 0)

    def int8_attention(self) -> tuple[int, int]:
        """``(attention matmuls in int8, all)`` in the first configuration."""
        return self.records[0].attention if self.records else (0, 0)

    def inconsistent(self) -> list[PluginRecord]:
        """The configurations whose int8 shares differ from the first one's (empty: the IR runs the
        same layers in int8 however it is compiled)."""
        return [r for r in self.records[1:] if r.int8_summary() != self.records[0].int8_summary()]


def to_openvino(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
                act_dtype: str = "int8", opset: int = DEFAULT_OPSET, keep_onnx: bool = False,
                configs: Sequence[CompileConfig] | None = None) -> OpenVINOResult:
    """Export a quantized GraphModule to OpenVINO IR at ``path`` (``.xml``; the weights go to the
    ``.bin`` beside it) through the ONNX QDQ export, and record what the CPU plugin runs in int8 in
    each compile configuration of ``configs`` (default ``compile_configs()``: dynamic and static
    batch-1 shapes × default and f32 precision × LATENCY and THROUGHPUT; ``()`` checks none)."""
    ov = _openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"OpenVINO IR is written as <name>.xml (+ <name>.bin); got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fxquant-ov-") as tmp:
        onnx_path = path.with_suffix(".onnx") if keep_onnx else Path(tmp) / "model.onnx"
        to_onnx(qmodel, example_inputs, onnx_path, act_dtype=act_dtype, opset=opset, target="openvino")
        # read_model keeps the ONNX graph as written; openvino.convert_model (which also runs
        # OpenVINO's offline transformations) gives the same int8 layers since the export stopped
        # sharing weight zero points (runner.drop_zero_weight_zero_points)
        model = ov.Core().read_model(str(onnx_path))
        ov.save_model(model, str(path), compress_to_fp16=False)
    records = [plugin_record(path, c) for c in (compile_configs() if configs is None else configs)]
    return OpenVINOResult(path, path.with_suffix(".bin"), onnx_path if keep_onnx else None, records)


def compile_for_cpu(model, config: CompileConfig = CompileConfig(), *, threads: int | None = None):
    """Compile a model (a path of an IR or ONNX file, or an ``openvino.Model``) for the CPU plugin in
    one configuration: a static ``config`` reshapes every input's batch dimension first."""
    ov = _openvino()
    core = ov.Core()
    if not isinstance(model, ov.Model):
        model = core.read_model(str(model))
    if config.shape == "static":
        model.reshape({p.get_any_name(): [config.batch, *(d.get_length() for d in list(p.get_partial_shape())[1:])]
                       for p in model.inputs})
    return core.compile_model(model, "CPU", config.properties(threads))


def plugin_record(model_path: str | Path, config: CompileConfig = CompileConfig(), *, threads: int | None = None) -> PluginRecord:
    """What the CPU plugin runs in int8 for ``model_path`` compiled in ``config``."""
    ov = _openvino()
    model = ov.Core().read_model(str(model_path))
    attention = len(_attention_matmul_names(model))
    compiled = compile_for_cpu(model, config, threads=threads)
    runtime = compiled.get_runtime_model()
    return PluginRecord(config, _precisions(runtime), _attention_int8(runtime, attention),
                        _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")))


def _type_name(value) -> str:
    """An OpenVINO element type (or its text) as its short name: ``f32``, ``bf16``."""
    return value.get_type_name() if hasattr(value, "get_type_name") else _text(value)


def _attention_matmul_names(model) -> list[str]:
    """Friendly names of the IR's MatMuls whose two inputs are both computed (not constants behind
    a dequantization): the attention matmuls."""
    def computed(output) -> bool:  # follow the data input through a weight's dequantization and layout ops
        node = output.get_node()
        while node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"):
            node = node.input(0).get_source_output().get_node()
        return node.get_type_name() != "Constant"

    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul" and all(computed(op.input(i).get_source_output()) for i in range(2))]


def _attention_int8(runtime, total: int) -> tuple[int, int]:
    """``(attention matmuls in int8, total)``. The compiled model keeps each attention matmul as a
    standalone ``MatMul`` layer (Linears become ``FullyConnected``), int8 when its primitive is, or
    fuses a whole attention into a ``Subgraph`` taking q, kᵀ and v (AVX-512 CPUs): q·kᵀ is int8
    there when q and kᵀ enter in int8, softmax·v when v does (the softmax output's quantizer is
    inside). Friendly names do not identify them: the plugin renames a matmul it fuses a scale
    into. ``total`` is the IR's count (``_attention_matmul_names``)."""
    int8 = 0
    for op in runtime.get_ordered_ops():
        kind = _layer_type(op)
        if kind == "MatMul":
            int8 += _exec_precision(op) in INT8_PRECISIONS
        elif kind == "Subgraph" and op.get_input_size() >= 3 and all(
                op.input(i).get_partial_shape().rank.get_length() == 4 for i in range(3)):
            types = [op.input(i).get_element_type().get_type_name() for i in range(3)]
            int8 += (types[0] in INT8_PRECISIONS and types[1] in INT8_PRECISIONS) + (types[2] in INT8_PRECISIONS)
    return int8, total


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


def runtime_precisions(model_path: str | Path, *, threads: int | None = None,
                       config: CompileConfig = CompileConfig()) -> dict[str, dict[str, int]]:
    """``{layer type: {precision: count}}`` of a model (IR or ONNX) compiled for the CPU in
    ``config``: the precision each layer computes in (``_exec_precision``: a FullyConnected counts
    as i8 only when its GEMM is integer, not when it merely stores int8 weights)."""
    return _precisions(compile_for_cpu(model_path, config, threads=threads).get_runtime_model())


def _text(value) -> str:
    """An rt_info entry (an ``OVAny``) as text."""
    return value.astype(str) if hasattr(value, "astype") else str(value)


def run_openvino(model_path: str | Path, inputs: Sequence[torch.Tensor], *, threads: int | None = None,
                 config: CompileConfig = CompileConfig()) -> torch.Tensor:
    """The model's first output on ``inputs`` (CPU plugin, compiled in ``config``), as a float tensor."""
    compiled = compile_for_cpu(model_path, config, threads=threads)
    out = compiled([t.numpy() for t in inputs])[compiled.output(0)]
    return torch.from_numpy(out.copy())


__all__ = ["to_openvino", "runtime_precisions", "run_openvino", "OpenVINOResult", "CompileConfig", "PluginRecord",
           "compile_configs", "compile_for_cpu", "plugin_record", "int8_share"]
