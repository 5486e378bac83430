"""Deployment exporters: ONNX QDQ (``to_onnx``) run by onnxruntime."""

from .onnx_qdq import ExportResult, prepare_for_export, run_onnx, to_onnx

__all__ = ["to_onnx", "run_onnx", "prepare_for_export", "ExportResult"]
