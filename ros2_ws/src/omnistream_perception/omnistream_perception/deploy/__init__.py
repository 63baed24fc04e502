"""Deployment runtimes: the streaming step exported to ONNX (``onnx_export``) and run with onnxruntime
(``onnx_session``). onnx/onnxruntime are imported only when used."""

from __future__ import annotations

__all__ = ["OnnxGeometryHeads", "OnnxStreamSession", "attach_onnxruntime", "export_stream_step"]


def __getattr__(name: str):
    if name == "export_stream_step":
        from .onnx_export import export_stream_step

        return export_stream_step
    if name in ("OnnxGeometryHeads", "OnnxStreamSession", "attach_onnxruntime"):
        from . import onnx_session

        return getattr(onnx_session, name)
    raise AttributeError(name)
