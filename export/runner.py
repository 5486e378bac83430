"""ONNX QDQ export of fxquant's fake-quantized graphs.

``to_onnx(qmodel, example_inputs, path)`` rewrites a copy of the quantized GraphModule into
export-ready modules and runs ``torch.onnx.export(dynamo=True)``. The parts of ``fxquant.export``:

* ``modules``: the export-ready modules (weights as integer initializers + ``DequantizeLinear``,
  activations as ``QuantizeLinear`` → ``DequantizeLinear``, log quantizers as standard ops,
  QwT's compensation Gemm), and what each quantizer kind becomes;
* ``handlers``: one handler per fxquant runtime module kind (``register_export_handler``),
  lowered graphs included;
* ``rewrites``: the export-time graph rewrites for OpenVINO, registered passes;
* here: ``prepare_for_export``, ``to_onnx``, ``run_onnx``.

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

``target="openvino"`` (``prepare_for_export``) changes the placement, not the function: the
passes of ``rewrites`` split each fused qkv Linear into one Linear per piece and move every
per-tensor activation Q/DQ above the reshapes/transposes that feed it, a placement OpenVINO's CPU
plugin fuses into the producers (``openvino_ir``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import fx, nn

from fxquant.core.errors import ConfigError
from fxquant.core.graph import logits_of
from fxquant.core.pipeline import PassContext, PassManager

from .handlers import _is_fxquant_module, export_handler
from .modules import ExportActQuant
from .rewrites import HoistActQuantAboveMoves, SplitFusedProjections

DEFAULT_OPSET = 18


def _set_module(gm: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


TARGETS = ("onnxruntime", "openvino")


def prepare_for_export(qmodel: fx.GraphModule, *, act_dtype: str = "int8", target: str = "onnxruntime",
                       example_inputs: Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
    """A copy of ``qmodel`` whose fxquant runtime modules are export-ready modules (same function).

    Every fxquant module kind goes through its handler in ``EXPORT_HANDLERS``; a kind without one
    is an error naming the module, so a new runtime module cannot be exported silently wrong.
    ``target="openvino"`` also moves per-tensor activation quantizers above the reshapes and
    transposes that feed them (pass ``hoist_act_quant``: the same function, a Q/DQ placement
    OpenVINO fuses), after splitting fused qkv Linears into one Linear per piece (pass
    ``split_fused_projections``, given ``example_inputs`` for the shapes) so that q's, k's and v's
    quantizers land on a Linear's output; both run through the pass manager (``rewrites``).
    ``"onnxruntime"`` keeps each Q/DQ pair right before its consumer and the fused Linear."""
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
        rewrites = [SplitFusedProjections()] if example_inputs is not None else []  # it needs the shapes
        for node in gm.graph.nodes:  # the copy's shapes are the compile-time inputs': SHAPES is re-established for these
            node.meta.pop("tensor_meta", None)
        gm, _ = PassManager([*rewrites, HoistActQuantAboveMoves()]).run(
            gm, PassContext(example_inputs=tuple(example_inputs or ()), progress=False))
    return gm


def drop_zero_weight_zero_points(model) -> int:
    """Remove the zero-point input of every ``DequantizeLinear`` of a constant integer tensor (a
    weight) whose zero points are all 0: the same function (ONNX's default zero point is 0 of the
    input's type), in the form OpenVINO and NNCF write, ``Const(int8) → Convert → Multiply``.

    Why: ``torch.onnx.export`` de-duplicates equal constants, so the all-zero ``int8[C]`` zero
    points of every symmetric weight with ``C`` output channels become one initializer shared by
    those layers (on the CIFAR ViT: the patch conv, q, k, v, proj and fc2 share one). OpenVINO's
    CPU plugin (2026.4) then leaves such layers in float whenever its constant folding runs over
    the weight subgraphs: for a static input shape (``model.reshape``, ``benchmark_app -shape``)
    and after ``openvino.convert_model``: 30 of 37 FullyConnected layers and the conv in f32, where
    the dynamic-shape compile of the same file ran all in int8. Without the shared constant all
    stay int8 in every one of those configurations. ``model`` is the exporter's ``onnx_ir`` model;
    returns how many zero points were removed."""
    removed = 0
    for node in model.graph.all_nodes():
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        codes, zero_point = node.inputs[0], node.inputs[2]
        if codes is None or codes.const_value is None or zero_point is None or zero_point.const_value is None:
            continue  # an activation's pair, or a zero point computed at run time
        if not zero_point.const_value.numpy().any():
            node.resize_inputs(2)
            removed += 1
            if not zero_point.uses() and zero_point.name in model.graph.initializers:
                del model.graph.initializers[zero_point.name]
    return removed


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
        program = torch.onnx.export(wrapper, tuple(example_inputs), None, dynamo=True, opset_version=opset,
                                    dynamic_shapes=dyn, output_names=["logits"], verbose=False, report=False,
                                    input_names=[f"input{i}" if i else "input" for i in range(len(example_inputs))])
        drop_zero_weight_zero_points(program.model)
        program.save(str(path))
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
    code step). ``MatMulNBits`` (what onnxruntime makes of a weight dequantization feeding a MatMul
    with a float input) runs at accuracy level 1 (fp32), not its default 4, which would quantize
    that input again."""
    import onnxruntime as ort  # heavy, and needed only to run an exported model

    opts = ort.SessionOptions()
    # a DQ(int8 W) → MatMul with a float input (dynamic activations, IGQ channel groups) becomes
    # MatMulNBits in onnxruntime, whose default accuracy level 4 re-quantizes that input to int8
    # per block of 32; level 1 computes in fp32, i.e. the exported function (modules.py)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])
