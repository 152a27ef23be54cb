"""ONNX files: recognized, so a command that takes a PyTorch model can say what to do with one."""

from __future__ import annotations

from pathlib import Path


def is_onnx_file(p: Path) -> bool:
    """True when the file parses as an ONNX model with a graph (read without its external data)."""
    import onnx_ir as ir

    try:
        model = ir.load(str(p))  # weights stay on disk
    except Exception:
        return False
    return bool(model.ir_version and (len(model.graph) or model.graph.inputs))
