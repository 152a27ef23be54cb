"""The module a node came from, read from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata.

The exporter writes, per node, the cumulative module paths and then the op: ``['', 'ff', 'ff.fc2',
'linear_3']``. Reports name modules, not node numbers, so users can find the code; one parser serves
the graph passes and the exporter's reports.
"""

from __future__ import annotations

import ast
import onnx_ir as ir

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def name_scopes(node: ir.Node) -> list[str] | None:
    """The scopes of an onnx-ir node, or None when the node carries none or they do not parse. ``''`` is
    the root module."""
    text = node.metadata_props.get(SCOPES_KEY)
    if not text:
        return None
    try:
        parts = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [p for p in parts if isinstance(p, str)] if isinstance(parts, (list, tuple)) else None


def module_path(node: ir.Node) -> str:
    """``['', 'ff', 'ff.fc2', 'linear_3']`` -> ``'ff.fc2'``; ops in the model's own forward ->
    ``'<root>'``; no scopes -> ``'<unknown>'``."""
    parts = name_scopes(node)
    if parts is None:
        return "<unknown>"
    return (parts[-2] if len(parts) >= 2 else "") or "<root>"
