"""Deployment exporters: ONNX QDQ (``to_onnx``) run by onnxruntime, and OpenVINO IR
(``to_openvino``, through the same QDQ graph) run by OpenVINO's CPU plugin.

One concern per module: ``modules`` (the export-ready modules), ``handlers`` (one handler per
runtime module kind), ``rewrites`` (the export-time graph rewrites for OpenVINO, registered
passes), ``runner`` (``prepare_for_export``, ``to_onnx``, ``run_onnx``), ``openvino_ir`` and ``cpu`` (whether
this CPU's int8 GEMMs are exact)."""

from .cpu import INT8_SATURATION_NOTE, int8_dot_exact
from .handlers import EXPORT_HANDLERS, export_handler, register_export_handler
from .openvino_ir import (
    CompileConfig,
    OpenVINOResult,
    PluginRecord,
    compile_configs,
    compile_for_cpu,
    int8_share,
    plugin_record,
    run_openvino,
    runtime_precisions,
    to_openvino,
)
from .rewrites import HoistActQuantAboveMoves, SplitFusedProjections
from .runner import ExportResult, drop_zero_weight_zero_points, prepare_for_export, run_onnx, to_onnx

__all__ = ["to_onnx", "run_onnx", "to_openvino", "run_openvino", "runtime_precisions", "CompileConfig", "PluginRecord",
           "compile_configs", "compile_for_cpu", "plugin_record", "int8_share", "drop_zero_weight_zero_points",
           "OpenVINOResult", "prepare_for_export", "ExportResult", "EXPORT_HANDLERS", "register_export_handler",
           "export_handler", "SplitFusedProjections", "HoistActQuantAboveMoves", "int8_dot_exact", "INT8_SATURATION_NOTE"]
