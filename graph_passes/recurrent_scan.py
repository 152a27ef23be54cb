"""States a step model carries through an ONNX ``Scan`` over the sequence and through a token shift.

* A ``Scan`` whose scan inputs run along the sequence (their scan axis is the symbolic sequence dimension,
  forward) is a recurrence already: its body maps (state, inputs at position t) to (new state, outputs at t),
  its state inputs are the state before position 0 and its state outputs the state after the last position.
  Fed a chunk, the same Scan continues where the previous chunk ended if its state inputs are the previous
  chunk's state outputs: each carried state becomes a step-model input and the Scan's final value of it the
  matching output; its scan outputs stay per-token outputs. That needs an initial state that does not depend
  on the tokens (computed from constants and shapes only): zeros become the step model's zero states; any
  other such value (a running max starting at -1e38) is what the step model uses at position 0
  (``Where(position_offset == 0, initial, state)``), the state input after that. A Scan that reads the
  sequence backwards, writes its outputs reversed, or whose body reads a per-token value of the outer graph
  (every position of it at each step) is refused by name.
* A token shift, ``y[t] = x[t - k]`` with zeros for ``t < k`` (a Pad of ``k`` zeros before the sequence and
  ``-k`` after it, or a Pad of ``k`` before followed by a Slice that drops the last ``k`` positions), reads
  the ``k`` inputs before each position: the step model prepends the last ``k`` inputs of the earlier tokens
  (zeros before the first chunk, as the full model pads) and returns the last ``k`` inputs of that
  concatenation as the new window, like a causal convolution's window (``graph_passes.recurrent_carry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx_ir as ir

from graph_passes._util import const_ints, shape_dims
from graph_passes.recurrent_carry import (
    StateTap,
    _crop_start,
    _zero_pad_along,
    _zeros,
    carry_window,
    export_meta,
    int64_initializer,
    replace_value,
)



def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _seq_at(value: ir.Value | None, seq: str) -> list[int]:
    return [i for i, d in enumerate(shape_dims(value) or []) if d == seq]


# --------------------------------------------------------------------------------------------- Scan

@dataclass
class ScanState:
    """State variable ``index`` of the sequence Scan ``node``: ``zeros`` when it starts from zeros."""

    node: ir.Node
    index: int
    zeros: bool


def _token_free(value: ir.Value | None, graph: ir.Graph) -> bool:
    """Whether ``value`` is computed from constants and shapes only (no graph input's values)."""
    inputs = {v for v in graph.inputs if v.const_value is None}
    seen: set[int] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen or v.const_value is not None:
            continue
        seen.add(id(v))
        if v in inputs:
            return False
        node = v.producer()
        if node is None or node.op_type in ("Shape", "Size"):
            continue
        todo += list(node.inputs)
        for attr in node.attributes.values():  # values a subgraph reads from this graph
            if attr.type == ir.AttributeType.GRAPH:
                todo += [u for n in ir.traversal.RecursiveGraphIterator(attr.value) for u in n.inputs
                         if u is not None and u.graph is graph]
    return True


def scan_states(node: ir.Node, seq: str, graph: ir.Graph) -> list[ScanState] | str | None:
    """The states a Scan over the sequence carries, a reason it cannot carry them (str), or None when ``node``
    is no Scan over the sequence."""
    if node.op_type != "Scan" or node.domain not in ("", "ai.onnx"):
        return None
    m = int(_attr(node, "num_scan_inputs", 0))
    n_states = len(node.inputs) - m
    scans = node.inputs[n_states:]
    axes = list(_attr(node, "scan_input_axes", None) or [0] * m)
    dirs = list(_attr(node, "scan_input_directions", None) or [0] * m)
    over = []
    for v, a, d in zip(scans, axes, dirs):
        rank = len(shape_dims(v) or [])
        a = a + rank if a < 0 else a
        pos = _seq_at(v, seq)
        over.append(pos == [a])
        if pos and pos != [a]:
            return "scans a tensor whose sequence axis is not its scan axis"
    if not any(over):
        return None
    if not all(over):
        return "scans the sequence together with a tensor that does not run along it"
    if any(d for d, o in zip(dirs, over) if o):
        return "scans the sequence backwards (anti-causal: a step model cannot know the tokens after the chunk)"
    k_out = len(node.outputs) - n_states
    if any(_attr(node, "scan_output_directions", None) or [0] * k_out):
        return "writes its outputs in reverse order along the sequence"
    body = _attr(node, "body")
    for inner in ir.traversal.RecursiveGraphIterator(body):
        for v in inner.inputs:
            if v is not None and v.graph is graph and _seq_at(v, seq):
                return f"reads the whole sequence {v.name} inside its loop body (every position at each step)"
    states = []
    for k in range(n_states):
        init = node.inputs[k]
        if _seq_at(init, seq) or _seq_at(node.outputs[k], seq):
            return f"carries a state ({init.name if init is not None else k}) that has the sequence axis"
        if not _token_free(init, graph):
            return (f"starts from a state ({init.name if init is not None else k}) computed from the tokens, so the "
                    "step model cannot feed it the state of the earlier tokens")
        states.append(ScanState(node, k, _zeros(init)))
    return states


def carry_scan_state(graph: ir.Graph, site: ScanState, state_name: str, out_name: str,
                     offset: Callable[[], ir.Value]) -> tuple[ir.Value, ir.Value, StateTap]:
    """Feed graph input ``state_name`` as the Scan's state ``site.index`` (through ``Where(position_offset == 0,
    initial, state)`` when the initial value is not zeros) and return its final value as graph output
    ``out_name``."""
    node, k = site.node, site.index
    init, final = node.inputs[k], node.outputs[k]
    label = f"{node.name or 'scan'}_state{k}"
    dtype = final.dtype or (init.dtype if init is not None else None) or ir.DataType.FLOAT
    dims = list(final.shape or (init.shape if init is not None else None) or [])
    state = ir.Value(name=state_name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
    graph.inputs.append(state)
    new: list[ir.Node] = []
    fed = state
    if not site.zeros:
        zero = int64_initializer(graph, f"{label}_first_position", 0)
        first = ir.node("Equal", [offset(), zero], name=f"{label}_at_start", metadata_props=export_meta(node))
        pick = ir.node("Where", [first.outputs[0], init, state], name=f"{label}_start_or_carried",
                       metadata_props=export_meta(node))
        pick.outputs[0].shape, pick.outputs[0].type = ir.Shape(dims), ir.TensorType(dtype)
        new += [first, pick]
        fed = pick.outputs[0]
    ident = ir.node("Identity", [final], name=f"{label}_final", metadata_props=export_meta(node))
    out = ident.outputs[0]
    out.name, out.shape, out.type = out_name, ir.Shape(dims), ir.TensorType(dtype)
    if new:
        graph.insert_before(node, new)
    node.replace_input_with(k, fed)
    graph.insert_after(node, [ident])
    graph.outputs.append(out)
    return state, out, StateTap(final.name or "", "final")


# -------------------------------------------------------------------------------------- token shifts

@dataclass
class TokenShift:
    """``pad`` (and ``crop``) shift ``data`` by ``size`` positions along ``axis`` (zeros first)."""

    pad: ir.Node
    crop: ir.Node | None
    data: ir.Value
    axis: int
    size: int

    @property
    def nodes(self) -> list[ir.Node]:
        return [n for n in (self.pad, self.crop) if n is not None]

    @property
    def result(self) -> ir.Value:
        return (self.crop or self.pad).outputs[0]


def token_shift(node: ir.Node, seq: str, graph: ir.Graph) -> TokenShift | None:
    """The token shift the Pad ``node`` starts, or None."""
    if node.op_type != "Pad" or not node.inputs or node.inputs[0] is None:
        return None
    data = node.inputs[0]
    pos = _seq_at(data, seq)
    if len(pos) != 1:
        return None
    rank, p = len(shape_dims(data) or []), pos[0]
    pads = _zero_pad_along(node, p, rank)
    if pads is None or pads[0] <= 0:
        return None
    before, after = pads
    if after == -before:
        return TokenShift(node, None, data, p, before)
    if after != 0:
        return None
    y = node.outputs[0]
    users = list(y.uses())
    if len(users) != 1 or users[0][1] != 0 or any(o is y for o in graph.outputs):
        return None
    crop = users[0][0]
    if _crop_start(crop, p, rank) != 0 or const_ints(crop.inputs[2]) != [-before]:
        return None
    return TokenShift(node, crop, data, p, before)


def carry_shift(graph: ir.Graph, site: TokenShift, state_name: str, out_name: str
                ) -> tuple[ir.Value, ir.Value, StateTap]:
    """Prepend graph input ``state_name`` (the last ``size`` inputs before the chunk) instead of zeros, drop the
    last ``size`` positions, and return the new last ``size`` inputs as graph output ``out_name``."""
    data, k, p = site.data, site.size, site.axis
    label = site.pad.name or "token_shift"
    meta = export_meta(site.pad)
    state, cat, keep = carry_window(graph, data, p, k, f"{label}_shift", meta, state_name, out_name)
    shifted = ir.node("Slice", [cat.outputs[0], int64_initializer(graph, f"{label}_shift_from", [0]),
                                int64_initializer(graph, f"{label}_shift_drop", [-k]), keep.inputs[3]],
                      name=f"{label}_shift", metadata_props=dict(meta))
    result, old = shifted.outputs[0], site.result
    result.shape, result.type = old.shape, old.type
    graph.insert_before(site.pad, [cat, keep, shifted])
    replace_value(graph, old, result, suffix="unshifted")
    for n in reversed(site.nodes):
        graph.remove(n, safe=True)
    return state, keep.outputs[0], StateTap(data.name or "", "window", p, k)
