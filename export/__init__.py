"""Deployment exporters (ONNX QDQ). Populated by the export work."""
