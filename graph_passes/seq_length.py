"""Where a step model reads the sequence length: as a shape (the chunk's length) or as a position bound (the
number of tokens seen so far).

A full-sequence graph reads its length ``n`` from ``Shape``. In the step form the same value is the length of
the chunk, which is right where it sizes tensors (Reshape, Expand, Slice ends, the Range of the chunk's
positions) and wrong where it bounds absolute positions: a length mask ``arange(n) < n`` (fast-transformers'
``LengthMask``) compares the offset positions ``t0 .. t0+c-1`` with ``c`` and turns false. There the length is
``position_offset + c``. :func:`classify_length_uses` follows every value computed from the length through the
small integer graph that carries it and sorts each use: a shape operand (kept), a comparison of raw positions
``Range(0, n, 1)`` with the length itself (gets the offset), or anything else that lets the length reach the
per-token data or combines it with positions: refused by node and why, since a step model cannot know the
full length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from graph_passes._util import const_ints, shape_dims

# input slots that only size, index or shape a tensor: the chunk's own length is right there
_SHAPE_SLOTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Slice": frozenset({1, 2, 3, 4}),
    "Range": frozenset({0, 1, 2}), "ConstantOfShape": frozenset({0}), "Tile": frozenset({1}),
    "Pad": frozenset({1, 3}), "Squeeze": frozenset({1}), "Unsqueeze": frozenset({1}), "Split": frozenset({1}),
    "TopK": frozenset({1}), "Resize": frozenset({1, 2, 3}), "CumSum": frozenset({1}), "OneHot": frozenset({1}),
    **{op: frozenset({1}) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")},
}
# ops whose output holds the length in every element when their data input (0) does
_KEEPS_LENGTH = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Expand", "Identity", "Cast", "Flatten", "Tile",
                           "ReduceMax", "ReduceMin", "Gather"})
# ops that move positions without changing them (the values of Range(0, n, 1) stay 0 .. n-1)
_KEEPS_POSITIONS = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Expand", "Identity", "Cast", "Flatten"})
_COMPARE = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"})

EXACT, DERIVED = "length", "derived"  # every element is n / computed from n


class LengthUseError(Exception):
    """A use of the sequence length the step form cannot reproduce: ``node``/``op`` where, ``reason`` why."""

    def __init__(self, reason: str, node: str, op: str):
        self.reason, self.node, self.op = reason, node, op
        super().__init__(reason)


@dataclass
class PositionBound:
    """A comparison of the positions (input ``positions``) with the length (input ``length``)."""

    node: ir.Node
    length: int


def _has_seq(value: ir.Value | None, seq: str) -> bool:
    return seq in (shape_dims(value) or [])


def _mentions(dim: object, seq: str) -> bool:
    """A shape entry that holds or depends on the length (an unknown entry might)."""
    return dim is None or (isinstance(dim, str) and re.search(rf"\b{re.escape(seq)}\b", dim) is not None)


def _shape_entries(node: ir.Node) -> list[object] | None:
    """The dims a Shape node returns (its ``start``/``end`` applied), or None when its input's shape is unknown."""
    dims = shape_dims(node.inputs[0])
    if dims is None:
        return None
    start, end = node.attributes.get("start"), node.attributes.get("end")
    return dims[0 if start is None else int(start.value):len(dims) if end is None else int(end.value)]


def _kind_of_entries(picked: list[object] | None, seq: str) -> str | None:
    """Every entry the length, some computed from it (or unknown), or none of them."""
    if not picked:
        return None
    if all(d == seq for d in picked):
        return EXACT
    return DERIVED if any(_mentions(d, seq) for d in picked) else None


def _entry_kind(node: ir.Node, kinds: dict[ir.Value, str], seq: str) -> tuple[bool, str | None]:
    """A Gather/Slice picking constant entries of a Shape output: (True, their kind); (False, None) otherwise."""
    src = node.inputs[0]
    shape_node = src.producer() if src is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or kinds.get(src) != DERIVED:
        return False, None
    entries = _shape_entries(shape_node)
    if entries is None:
        return False, None
    picked: list[object] | None = None
    if node.op_type == "Gather":
        picks = const_ints(node.inputs[1])
        if picks is not None and all(-len(entries) <= i < len(entries) for i in picks):
            picked = [entries[i] for i in picks]
    else:
        starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
        steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if starts and ends and steps and len(starts) == len(ends) == len(steps) == 1:
            picked = entries[starts[0]:ends[0]:steps[0]]
    return (True, _kind_of_entries(picked, seq)) if picked is not None else (False, None)


def _is_zero_one_range(node: ir.Node) -> bool:
    return const_ints(node.inputs[0]) == [0] and const_ints(node.inputs[2]) == [1]


def _refuse_meeting(node: ir.Node, raw_positions: bool) -> LengthUseError:
    """Why positions and the length meet where the step form cannot follow."""
    label, op = node.name or "<unnamed>", node.op_type
    if op in _COMPARE and not raw_positions:
        why = ("compares the sequence length with positions that are not those of Range(0, n, 1) (shifted, scaled "
               "or computed from them): which of them pass depends on the full length, which a step model does "
               "not know")
    elif op in _COMPARE:
        why = ("compares positions with a value computed from the sequence length (not the length itself, e.g. "
               "n - 1): which positions pass depends on the full length, which a step model does not know")
    else:
        why = ("combines positions with the sequence length (e.g. the distance to the last token, n - t): a step "
               "model does not know the full length")
    return LengthUseError(why, label, op)


def _length_out_kind(node: ir.Node, tracked: list[tuple[int, str]], kinds: dict[ir.Value, str],
                     seq: str) -> str | None:
    """The kind of a node's outputs computed from the length (None: they hold no length, e.g. the batch entry)."""
    op = node.op_type
    if op in ("Gather", "Slice") and any(i == 0 for i, _ in tracked):
        known, kind = _entry_kind(node, kinds, seq)
        if known:
            return kind
    exact = [k == EXACT for _, k in tracked]
    if op in _KEEPS_LENGTH and tracked == [(0, EXACT)]:
        return EXACT
    if op in ("Concat", "Max", "Min") and all(exact) and len(tracked) == len(node.inputs):
        return EXACT
    return DERIVED


def classify_length_uses(graph: ir.Graph, seq: str, ranges: list[ir.Node]) -> list[PositionBound]:
    """The comparisons of positions (outputs of the ``ranges`` of the sequence's positions) with the length
    that need the offset; raise :class:`LengthUseError` for any use of the length that is neither a shape
    operand nor such a comparison and reaches per-token data or positions."""
    kinds: dict[ir.Value, str] = {}  # values computed from the length
    positions: dict[ir.Value, bool] = {}  # values computed from the positions: True while they are 0 .. n-1
    bounds: list[PositionBound] = []
    range_set = set(ranges)
    for node in graph:
        if node.op_type in ("Shape", "Size"):
            entries = _shape_entries(node) if node.op_type == "Shape" else shape_dims(node.inputs[0])
            kind = DERIVED if entries is None else _kind_of_entries(entries, seq)
            if node.op_type == "Size" and kind == EXACT and len(entries or []) > 1:
                kind = DERIVED
            if kind is not None:
                kinds[node.outputs[0]] = kind
            continue
        if node in range_set:
            positions[node.outputs[0]] = _is_zero_one_range(node)
            continue
        slots = _SHAPE_SLOTS.get(node.op_type, frozenset())
        live = [(i, v) for i, v in enumerate(node.inputs) if v is not None and i not in slots]
        lengths = [(i, kinds[v]) for i, v in live if v in kinds]
        pos = [(i, positions[v]) for i, v in live if v in positions]
        label, op = node.name or "<unnamed>", node.op_type
        if lengths and pos:
            (li, lk), (_, raw) = lengths[0], pos[0]
            if op in _COMPARE and len(lengths) == 1 and len(pos) == 1 and raw and lk == EXACT:
                bounds.append(PositionBound(node, li))
                continue
            raise _refuse_meeting(node, raw)
        if lengths:
            others = [v for i, v in live if v not in kinds] + list(node.outputs)
            if any(_has_seq(v, seq) for v in others):
                raise LengthUseError("uses the sequence length as a value on per-token data: a step model only "
                                     "knows the length of its chunk, not the full length", label, op)
            out_kind = _length_out_kind(node, lengths, kinds, seq)
            if out_kind is not None:
                kinds.update({o: out_kind for o in node.outputs})
        elif pos:
            raw = op in _KEEPS_POSITIONS and pos == [(0, True)]
            positions.update({o: raw for o in node.outputs})
    return bounds
