"""One op for every linear-attention recurrence (linear, gated, delta, gated_delta): registration and
fake (``op``), eager chunked math (``chunked``), and its ONNX translation to one ``lrexport`` node
(``onnx_export``). Importing the package registers the op."""

from exporter.linear_attention.op import OP_NAME, linear_attention

__all__ = ["OP_NAME", "linear_attention"]
