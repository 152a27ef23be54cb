"""Small helpers shared by the graph passes: constants, node labels, einsum parsing, preparation."""

from __future__ import annotations

import contextlib
import logging
import re

from typing import Any, Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import basic_constant_propagation

from graph_passes.shape_inference import TypedShapeInferencePass


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """onnxscript's constant folder and onnx-ir's passes log what they leave alone ("Skipping constant
    folding for op SequenceEmpty with multiple outputs.") as warnings, which Python prints to stderr in the
    middle of the progress lines: nothing a user can act on. Errors still show."""
    loggers = [logging.getLogger(name) for name in ("onnxscript.optimizer", "onnx_ir.passes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


def const_ints(value: ir.Value | None) -> list[int] | None:
    """A constant's values as a flat list of ints (axes, starts/ends, shapes), else None."""
    arr = const_array(value)
    return None if arr is None else [int(v) for v in arr.reshape(-1)]


def shape_dims(value: ir.Value | None) -> list[Any] | None:
    """A value's dims as ints and symbol names (an unnamed dynamic dim as its text), or None if unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else str(d))
            for d in value.shape]


def node_label(node: ir.Node | None) -> str:
    if node is None:
        return "?"
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs and node.outputs[0].name else None
    return f"{node.op_type}({out})" if out else node.op_type  # unnamed nodes: the output tells them apart


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


def prepare(model: ir.Model) -> None:
    """Constants visible and shapes/ranks known: the checks of every rule rely on both."""
    basic_constant_propagation(model.graph)
    try:
        TypedShapeInferencePass()(model)
    except Exception:  # shape inference is best effort; rules refuse matches with unknown shapes
        pass


def cleanup_unused(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)
