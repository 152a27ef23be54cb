"""Small helpers shared by the graph passes: constants, einsum parsing, cost counting."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import basic_constant_propagation


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant initializer/Constant output, else None.

    Graph inputs that also carry an initializer are *not* constant: the user may override them.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def is_weight(value: ir.Value | None) -> bool:
    """A constant initializer (not a graph input) whose only consumers are the matched ones."""
    return const_array(value) is not None


def single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def shared_weight_users(value: ir.Value) -> int:
    return len(value.uses())


def node_label(node: ir.Node | None) -> str:
    if node is None:
        return "?"
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs and node.outputs[0].name else None
    return f"{node.op_type}({out})" if out else node.op_type  # unnamed nodes: the output tells them apart


def static_dims(value: ir.Value | None) -> tuple[int | None, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


_EINSUM_RE = re.compile(r"^[A-Za-z]*$")


def parse_einsum(equation: str) -> tuple[list[str], str] | None:
    """'b h i d, b h j d -> b h i j' -> (['bhid', 'bhjd'], 'bhij'); None for ellipsis/implicit forms."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if not all(_EINSUM_RE.match(t) for t in [*ins, out]):
        return None
    for t in [*ins, out]:
        if len(set(t)) != len(t):  # repeated letter inside an operand: diagonal, not handled
            return None
    return ins, out


def expand_ellipsis(equation: str, ranks: list[int | None]) -> str | None:
    """Replace '...' with explicit letters when operand ranks are known."""
    eq = equation.replace(" ", "")
    if "..." not in eq:
        return eq
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks) or any(r is None for r in ranks):
        return None
    known = [int(r) for r in ranks if r is not None]
    used = set(c for c in eq if c.isalpha())
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    n_ell = 0
    for t, r in zip(ins, known):
        if "..." in t:
            n_ell = max(n_ell, r - (len(t) - 3))
    ell = "".join(free[:n_ell])
    new_ins = []
    for t, r in zip(ins, known):
        if "..." in t:
            k = r - (len(t) - 3)
            if k < 0:
                return None
            t = t.replace("...", ell[n_ell - k:])
        new_ins.append(t)
    out = out.replace("...", ell)
    return ",".join(new_ins) + "->" + out


def einsum_equation(node: ir.Node) -> tuple[list[str], str] | None:
    attr = node.attributes.get("equation")
    if attr is None:
        return None
    ranks = [len(v.shape) if v is not None and v.shape is not None else None for v in node.inputs]
    eq = expand_ellipsis(attr.as_string(), ranks)
    if eq is None:
        return None
    return parse_einsum(eq)


def fold_light(model: ir.Model) -> None:
    """Propagate Constant nodes into values so weights like Transpose(W) are visible as constants."""
    basic_constant_propagation(model.graph)


def prepare(model: ir.Model) -> None:
    """Constants visible and shapes/ranks known: the checks of every rule rely on both."""
    basic_constant_propagation(model.graph)
    try:
        common_passes.ShapeInferencePass()(model)
    except Exception:  # shape inference is best effort; rules refuse matches with unknown shapes
        pass


def params_count(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None and v.const_value.dtype.is_floating_point():
            total += int(np.prod(v.const_value.shape.numpy())) if v.const_value.shape else 1
    return total


def cleanup_unused(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)


@dataclass
class Records:
    """Per-rule bookkeeping the rewrite rules append to (the rewriter gives no per-match hook)."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **kw: Any) -> None:
        self.items.append(kw)


PROTO_LIMIT = 2**31 - 64 * 2**20  # protobuf refuses to serialize 2 GB; keep a margin


def ort_session(model: Any, options: Any = None) -> Any:
    """An ONNX Runtime CPU session on an in-memory model of any size.

    Below 2 GB the model goes over as bytes; above, it is saved (weights in one external-data file) to a
    temporary folder that lives as long as the session.
    """
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
    if model.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tmp = tempfile.TemporaryDirectory(prefix="lrexport-ort-")
    path = os.path.join(tmp.name, "model.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session._lrexport_tmp = tmp  # removed with the session
    return session
