"""Deployment exporters: ONNX QDQ (``to_onnx``) run by onnxruntime."""

from .onnx_qdq import (
    EXPORT_HANDLERS,
    ExportResult,
    export_handler,
    prepare_for_export,
    register_export_handler,
    run_onnx,
    to_onnx,
)

__all__ = ["to_onnx", "run_onnx", "prepare_for_export", "ExportResult", "EXPORT_HANDLERS", "register_export_handler",
           "export_handler"]
