"""Deployment exporters: ONNX QDQ (``to_onnx``) run by onnxruntime, and OpenVINO IR
(``to_openvino``, through the same QDQ graph) run by OpenVINO's CPU plugin."""

from .onnx_qdq import (
    EXPORT_HANDLERS,
    ExportResult,
    export_handler,
    prepare_for_export,
    register_export_handler,
    run_onnx,
    to_onnx,
)
from .openvino_ir import (
    OpenVINOResult,
    attention_operand_types,
    int8_attention_share,
    int8_share,
    run_openvino,
    runtime_precisions,
    to_openvino,
)

__all__ = ["to_onnx", "run_onnx", "to_openvino", "run_openvino", "runtime_precisions", "attention_operand_types",
           "int8_share", "int8_attention_share",
           "OpenVINOResult", "prepare_for_export", "ExportResult", "EXPORT_HANDLERS", "register_export_handler",
           "export_handler"]
