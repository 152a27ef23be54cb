"""Recurrent (step) form of causal running-sum models: carry each CumSum over the sequence as a state.

Causal linear attention ("Transformers are RNNs", Katharopoulos et al. 2020) computes
``S_t = sum_{j<=t} phi(k_j) v_j^T`` and ``z_t = sum_{j<=t} phi(k_j)`` as CumSums over the sequence.
Fed a chunk of tokens at positions ``t0 .. t0+c-1``, the same graph computes the right outputs if every
such running sum starts from the sums of the tokens before the chunk:

    y = CumSum(x, seq) + Unsqueeze(state_i, seq)      new_state_i = y[..., -1, ...]   (last position)

:class:`RecurrentStatePass` makes that rewrite: one graph input ``state_<i>`` and one graph output
``new_state_<i>`` per CumSum over the sequence axis (sums in float32 for float models), plus an int64
``position_offset`` input added to every absolute position the graph reads: a ``Range`` over the sequence
length, and a ``Slice`` that reads the rows of the current positions out of a table that has no sequence
axis (``pos_emb[:, :n]``, the axial or learned position tables): it becomes a Gather of the rows
``Range(start, end, step) + offset * step``, the offset added as to a Range's values. A table read that
cannot move so (a start computed in the graph, e.g. the last n rows, or a negative step) is refused by name.
The sequence length read from the input's shape stays the chunk's length where it is a shape, and becomes the
number of tokens seen so far, ``position_offset + n``, where it bounds those positions (a length mask
``arange(n) < n``); any other use of it on per-token data is refused by name (``graph_passes.seq_length``).
``lrexport.LinearAttention`` nodes and causal convolutions over the sequence carry states too
(``graph_passes.recurrent_carry``: the op's initial/final state, a window of the convolution's recent inputs),
so do a forward Scan over the sequence and a token shift (``graph_passes.recurrent_scan``: the Scan's states,
the shift's last inputs; a node whose outputs only Shape reads mixes nothing),
and softmax attention carries its keys and values as a cache that grows by the chunk
(``graph_passes.kv_cache``: ``past_key_<j>``/``past_value_<j>`` in, ``present_key_<j>``/``present_value_<j>``
out); the nodes that build only its masks run on the chunk alone, on the chunk's own positions.
The rewrite is only right when nothing else in the graph mixes positions along the sequence, so the
pass first checks every node and refuses (:class:`RecurrentRefusal`, naming node, op and reason) a
softmax over the sequence, a reduction or contraction over it, a seq x seq matrix, a reverse or
exclusive CumSum, a convolution along it that reads later positions, or a static sequence axis. The check is
structural (from the symbolic ``seq`` dimension); ``exporter.recurrent`` adds a numeric check of the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
from graph_passes.shape_inference import TypedShapeInferencePass

from graph_passes._base import GraphPass, GraphPassResult, Match, record
from graph_passes._util import const_array, const_ints, shape_dims
from graph_passes.kv_cache import AttentionSite, Probe, carry_kv, find_sites, mask_cone, np_dtype
from graph_passes.name_scopes import name_scopes
from graph_passes.recurrent_carry import (
    CausalConv,
    StateTap,
    carry_conv,
    carry_linear_attention,
    causal_conv,
    export_meta,
    is_linear_attention,
    linear_attention_refusal,
    replace_value,
)
from graph_passes.recurrent_scan import ScanState, TokenShift, carry_scan_state, carry_shift, scan_states, token_shift
from graph_passes.seq_length import LengthUseError, PositionBound, classify_length_uses

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

# ops that only read shapes (never values) or merely re-lay out a tensor (Reshape may merge seq with
# another axis: it moves values, it does not mix positions; the numeric check covers what it hides)
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_LAYOUT = frozenset({"Reshape", "Flatten"})
_NORMALIZE_ALONG_AXIS = {"Softmax": "normalizes", "LogSoftmax": "normalizes", "Hardmax": "takes the max",
                         "ArgMax": "takes the arg max", "ArgMin": "takes the arg min", "TopK": "ranks values",
                         "CumSum": "sums", "CumProd": "multiplies", "ReverseSequence": "reverses",
                         "Gather": "indexes", "GatherElements": "indexes", "Compress": "selects",
                         "Slice": "slices", "Pad": "pads", "Concat": "concatenates", "Split": "splits"}
_REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
_CONV = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "AveragePool", "MaxPool", "LpPool"})


class RecurrentRefusal(Exception):
    """The graph has no recurrent form: ``node``/``op`` name where, ``reason`` says why."""

    def __init__(self, reason: str, node: str | None = None, op: str | None = None, hint: str | None = None):
        self.reason, self.node, self.op = reason, node, op
        self.hint = hint or ("only causal running-sum models (causal linear attention) have a step form; "
                             "export the full-sequence model instead")
        where = f"node {node} ({op}) " if node else ""
        super().__init__(f"{where}{reason}")


@dataclass
class CarriedState:
    """One running sum made recurrent: graph input ``input`` -> graph output ``output``."""

    index: int
    input: str
    output: str
    node: str  # the CumSum node
    axis: int  # the sequence axis of the CumSum output
    shape: list[int | str]  # the state's shape (the CumSum output without the sequence axis)
    dtype: str  # numpy dtype name of the state
    module: str | None  # module path from the exporter's name scopes (blocks.0.attn; "" the root module)
    source: str | None  # the torch op's name inside the module (e.g. cumsum_1)
    role: str  # "s" (running sum of outer products k v^T), "z" (running sum of vectors), or what else it is
    tap: StateTap | None = None  # the full model's value whose end is this state (for checks against it)
    kind: str = "running-sum"  # what carries it: "running-sum" (a CumSum), "linear-attention", "conv-window"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "input": self.input, "output": self.output, "node": self.node,
                "axis": self.axis, "shape": list(self.shape), "dtype": self.dtype, "module": self.module,
                "source": self.source, "role": self.role,
                "tap": None if self.tap is None else dict(vars(self.tap)), "kind": self.kind}


@dataclass
class RecurrentStateResult(GraphPassResult):
    states: list[CarriedState] = field(default_factory=list)
    seq_dim: str | None = None
    position_offset: str | None = None  # the input's name when the model uses absolute positions
    ranges: list[str] = field(default_factory=list)  # Range nodes that got the offset
    slices: list[str] = field(default_factory=list)  # Slice nodes (position-table reads) that got the offset
    bounds: list[str] = field(default_factory=list)  # comparisons of positions with the length (offset added)


@dataclass
class PositionRead:
    """A Slice reading the rows of the current positions from a table along ``axis``: entry ``index`` of its
    constant ``starts``/``axes``/``steps`` (its ends are computed from the length) is that axis."""

    node: ir.Node
    axis: int
    index: int
    starts: list[int]
    axes: list[int]
    steps: list[int]

    @property
    def step(self) -> int:
        return self.steps[self.index]


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _norm_axis(axis: int, rank: int) -> int | None:
    axis = int(axis)
    if axis < 0:
        axis += rank
    return axis if 0 <= axis < rank else None


def _fmt_shape(dims: list[Any] | None) -> str:
    return "?" if dims is None else " x ".join(str(d) for d in dims) or "scalar"


def find_seq_dim(graph: ir.Graph, seq_axis: int = 1) -> str:
    """The symbolic name of the sequence axis (axis ``seq_axis`` of the graph inputs); refuse a static one."""
    found: list[str] = []
    static: list[tuple[str, int]] = []
    for value in graph.inputs:
        dims = shape_dims(value)
        if dims is None or len(dims) <= seq_axis:
            continue
        d = dims[seq_axis]
        if isinstance(d, str):
            found.append(d)
        elif isinstance(d, int):
            static.append((value.name or "?", d))
    if found:
        if "seq" in found:
            return "seq"
        return found[0]
    if static:
        name, size = static[0]
        raise RecurrentRefusal(
            f"the sequence axis (axis {seq_axis}) of input {name!r} is static ({size}): the model fixes the "
            "sequence length (a layer sized by it, e.g. a Linformer projection along the sequence), so it "
            "cannot run on one token or a chunk at a time",
            hint="a step model needs a dynamic sequence axis; a model with layers sized by the sequence length has "
                 "no step form (export it with a --shapes seq range if its code allows one)")
    raise RecurrentRefusal("no graph input has a sequence axis (axis 1)",
                           hint="export the model with a dynamic sequence axis (--shapes NAME:min=1x1,...)")


def _seq_positions(dims: list[Any] | None, seq: str) -> list[int]:
    return [i for i, d in enumerate(dims or []) if d == seq]


def mixing_reason(node: ir.Node, seq: str) -> str | None:
    """Why ``node`` mixes positions along the sequence axis, or None when it is sequence-local."""
    op = node.op_type
    if op in _SHAPE_ONLY or node.domain not in ("", "ai.onnx"):
        return None if op in _SHAPE_ONLY else _custom_reason(node, seq)
    ins = [v for v in node.inputs if v is not None and const_array(v) is None]
    in_dims = [shape_dims(v) for v in ins]
    seq_in = [(v, d, _seq_positions(d, seq)) for v, d in zip(ins, in_dims) if _seq_positions(d, seq)]
    for out in node.outputs:
        od = shape_dims(out)
        if len(_seq_positions(od, seq)) > 1:
            return (f"builds a seq x seq tensor ({_fmt_shape(od)}): every position sees every other "
                    "(attention over all positions)")
    if not seq_in:
        return None
    _, first_dims, first_pos = seq_in[0]
    rank = len(first_dims or [])
    p = first_pos[0]
    if op in _NORMALIZE_ALONG_AXIS:
        if op in ("Slice", "Pad", "Split", "Concat"):
            return _axis_list_op(node, op, p, rank)
        default = -1 if op in ("Softmax", "LogSoftmax", "Hardmax", "TopK") else 0
        axis_val = _attr(node, "axis", default)
        if op == "CumSum":
            axis_arr = const_array(node.inputs[1])
            axis_val = int(axis_arr.reshape(-1)[0]) if axis_arr is not None else None
            if axis_val is None:
                return "sums along an axis that is not a constant (cannot tell whether it is the sequence axis)"
        if op == "Gather":
            data = node.inputs[0]
            if data is None or not _seq_positions(shape_dims(data), seq):
                return None  # indexing a table with per-position indices (embedding): local
            dd = shape_dims(data) or []
            if _norm_axis(axis_val, len(dd)) in _seq_positions(dd, seq):
                return "indexes along the sequence axis (picks positions by index)"
            return None
        if _norm_axis(axis_val, rank) == p:
            what = _NORMALIZE_ALONG_AXIS[op]
            extra = ": the model is not a causal running-sum model" if op in ("Softmax", "LogSoftmax") else ""
            return f"{what} along the sequence axis{extra}"
        return None
    if op in _REDUCE:
        axes = _reduce_axes(node)
        if axes is None or any(_norm_axis(a, rank) in first_pos for a in axes):
            return "reduces over the sequence axis (a sum/mean over all positions is not causal)"
        return None
    if op == "LayerNormalization":
        axis = _norm_axis(_attr(node, "axis", -1), rank)
        if axis is not None and p >= axis:
            return "normalizes over the sequence axis"
        return None
    if op in ("GroupNormalization", "InstanceNormalization") and rank > 2 and p >= 2:
        return "normalizes over the sequence axis"
    if op in _CONV:
        if p >= 2:
            return "convolves/pools along the sequence axis (needs a sliding-window state, not a running sum)"
        return None
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
        return _matmul_reason(node, seq)
    if op == "Einsum":
        return _einsum_reason(node, seq)
    if op in _LAYOUT:
        return None
    for out in node.outputs:
        od = shape_dims(out)
        if od is not None and not _seq_positions(od, seq):
            return (f"removes the sequence axis ({_fmt_shape(first_dims)} -> {_fmt_shape(od)}): it combines "
                    "values from all positions")
    return None


def _shape_read_only(node: ir.Node, graph: ir.Graph, seq: str) -> bool:
    """Whether only the shapes of ``node``'s outputs, none of them along the sequence, are read
    (``zeros_like(x[:, 0])``): its values, however they mix positions, reach nothing, and its shapes are the
    chunk's as the full sequence's."""
    outs = set(graph.outputs)
    return bool(node.outputs) and all(
        o not in outs and shape_dims(o) is not None and not _seq_positions(shape_dims(o), seq) and all(u.op_type in _SHAPE_ONLY and u.domain in ("", "ai.onnx") for u, _ in o.uses())
        for o in node.outputs)


def _custom_reason(node: ir.Node, seq: str) -> str | None:
    for v in node.inputs:
        if v is not None and _seq_positions(shape_dims(v), seq):
            return (f"is a custom op (domain {node.domain!r}) on a sequence-shaped tensor: lrexport cannot tell "
                    "whether it mixes positions")
    return None


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)] or None
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _axis_list_op(node: ir.Node, op: str, p: int, rank: int) -> str | None:
    if op in ("Concat", "Split"):
        verb = "concatenates" if op == "Concat" else "splits"
        return f"{verb} along the sequence axis" if _norm_axis(_attr(node, "axis", 0), rank) == p else None
    if op == "Slice":
        starts = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else (
            None if starts is None else list(range(len(starts))))
        if axes is None or any(_norm_axis(a, rank) == p for a in axes):
            return "slices along the sequence axis (selects positions)"
        return None
    if op == "Pad":
        pads = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            return "pads with non-constant pads (cannot tell whether it shifts positions)"
        pad_axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        axes = pad_axes if pad_axes is not None else list(range(rank))
        k = len(axes)
        for j, a in enumerate(axes):
            if _norm_axis(a, rank) == p and (pads[j] != 0 or pads[j + k] != 0):
                return "pads along the sequence axis (shifts positions, e.g. a causal convolution)"
        return None
    return None


def position_read(node: ir.Node, seq: str) -> PositionRead | None:
    """The Slice ``node`` as a read of the current positions' rows from a table without a sequence axis (its
    output gains ``seq`` on the sliced axis: ``pos_emb[:, :n]``), or None when it is not one. A step model
    reads rows ``t0 ..`` instead of ``0 ..``: refuse (naming why) a read that cannot move by the offset."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return None
    dd, od = shape_dims(node.inputs[0]), shape_dims(node.outputs[0])
    if dd is None or od is None or len(dd) != len(od) or _seq_positions(dd, seq) or \
            len(_seq_positions(od, seq)) != 1:
        return None
    p, rank = _seq_positions(od, seq)[0], len(od)
    label, op = node.name or "<unnamed>", node.op_type

    def refuse(why: str) -> RecurrentRefusal:
        return RecurrentRefusal(f"reads a table ({_fmt_shape(dd)}) at the current positions along the sequence "
                                f"axis, but {why}, so the step model cannot read the rows of a chunk that starts "
                                "at a later position", label, op,
                                hint="index the table by absolute positions from 0 (table[:, start:start + n] with "
                                     "a constant start, or an embedding of arange(n))")

    starts = const_ints(node.inputs[1])
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else (
        None if starts is None else list(range(len(starts))))
    if axes is None:
        raise refuse("its axes are computed in the graph (cannot tell which of them is the sequence axis)")
    index = next((j for j, a in enumerate(axes) if _norm_axis(a, rank) == p), None)
    if index is None:
        raise refuse(f"it does not slice axis {p}, where its output has the sequence length")
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(axes)
    if steps is None or steps[index] <= 0:
        raise refuse("its step is computed in the graph" if steps is None else
                     f"it reads the table backwards (step {steps[index]}): the rows of position t depend on the "
                     "full length")
    if starts is None or starts[index] < 0:
        raise refuse("it starts at a row computed in the graph (e.g. the last n rows, table[-n:]): which rows "
                     "position t reads depends on the full length" if starts is None else
                     f"it starts at row {starts[index]}, counted from the table's end")
    return PositionRead(node, p, index, starts, axes, steps)


def _matmul_reason(node: ir.Node, seq: str) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    ad, bd = shape_dims(a), shape_dims(b)
    if node.op_type == "Gemm":
        if ad and len(ad) == 2 and ad[1 - int(_attr(node, "transA", 0))] == seq:
            return "contracts over the sequence axis (a weight sized by the sequence)"
        return None
    if ad and ad[-1] == seq:
        return "contracts over the sequence axis (sums products over all positions)"
    if bd and len(bd) >= 2 and bd[-2] == seq:
        return "contracts over the sequence axis (sums products over all positions)"
    return None


def _einsum_reason(node: ir.Node, seq: str) -> str | None:
    eq = str(_attr(node, "equation", "")).replace(" ", "")
    if "->" not in eq or "..." in eq:
        for out in node.outputs:
            if not _seq_positions(shape_dims(out), seq):
                return "removes the sequence axis (sums over all positions)"
        return None
    lhs, out = eq.split("->")
    letters: set[str] = set()
    for term, v in zip(lhs.split(","), node.inputs):
        dims = shape_dims(v)
        if dims is None or len(dims) != len(term):
            continue
        letters |= {term[i] for i in _seq_positions(dims, seq)}
    summed = [c for c in letters if c not in out]
    if summed:
        return (f"sums over the sequence axis (einsum {eq!r} contracts {summed[0]!r}): "
                "it combines all positions, not only earlier ones")
    return None


def _is_outer_product(node: ir.Node | None) -> bool:
    """An Einsum outer product (each operand brings the output an axis the other lacks; shared axes may also be
    summed, as in a bucketed ``bhund,bhune->bhude``), or a Mul of Unsqueezes."""
    if node is None:
        return False
    if node.op_type == "Einsum":
        eq = str(_attr(node, "equation", "")).replace(" ", "")
        if "->" in eq and "..." not in eq:
            lhs, out = eq.split("->")
            terms = lhs.split(",")
            return len(terms) == 2 and all((set(a) - set(b)) & set(out) and set(a) - set(b) <= set(out)
                                           for a, b in (terms, terms[::-1]))
    if node.op_type == "Mul":
        return all(v is not None and v.producer() is not None and v.producer().op_type == "Unsqueeze"
                   for v in node.inputs)
    return False


class RecurrentStatePass(GraphPass):
    """Carry every CumSum over the sequence axis as a state; refuse graphs that mix positions otherwise.

    ``seq_axis`` is the sequence axis of the graph inputs (lrexport names axis 1 ``seq``). The call returns
    a :class:`RecurrentStateResult` listing the carried states; each carried CumSum, shifted Range, shifted
    position-table Slice and length compared with the positions is a match (a refusal raises
    :class:`RecurrentRefusal`: there is no partial step model).
    """

    name = "recurrent-state"
    min_opset = 13  # emits Unsqueeze with axes as an input

    def __init__(self, seq_axis: int = 1, state_dtype: ir.DataType = ir.DataType.FLOAT,
                 state_prefix: str = "state_", output_prefix: str = "new_state_",
                 offset_name: str = "position_offset", probe: Probe | None = None,
                 probe_runs: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__()
        self.probe, self.probe_runs = probe, probe_runs
        self.seq_axis = seq_axis
        self.state_dtype = state_dtype
        self.state_prefix = state_prefix
        self.output_prefix = output_prefix
        self.offset_name = offset_name
        self._found: dict[str, Any] = {}
        self._masks: set[ir.Node] = set()
        self._offset: ir.Value | None = None

    def opset_too_old(self, model: ir.Model) -> bool:
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if version < self.min_opset:
            raise RecurrentRefusal(f"the model's opset {version} predates {self.min_opset}, which the step form "
                                   "needs (Unsqueeze with axes as an input)", hint="export with opset 13 or newer")
        return False

    def pass_result(self, model: ir.Model, modified: bool) -> RecurrentStateResult:
        return RecurrentStateResult(model, modified, matches=self.records, **self._found)

    # ----------------------------------------------------------------------------------------- analysis
    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        taken = [v.name for v in graph.inputs] + [v.name for v in graph.outputs]
        ours = re.compile(rf"^({re.escape(self.state_prefix)}|{re.escape(self.output_prefix)}|past_key_|past_value_|"
                          rf"present_key_|present_value_)\d+$")
        clash = [n for n in taken if n and (ours.match(n) or n == self.offset_name)]
        if clash:
            raise RecurrentRefusal(f"the graph already has an input/output named {clash[0]!r}",
                                   hint="it looks like a step model already; pass the full-sequence model")
        if any(shape_dims(v) is None for n in graph for v in n.outputs):
            try:
                TypedShapeInferencePass()(model)
            except Exception:  # best effort: the numeric check covers what shapes cannot tell
                pass
        seq = find_seq_dim(graph, self.seq_axis)
        batch = next((d for v in graph.inputs for d in (shape_dims(v) or [])[:1] if isinstance(d, str)), None)
        sites = find_sites(graph, seq, self.probe, self.probe_runs, batch)
        carriers, ranges, reads = self._survey(graph, seq, sites)
        try:
            bounds = classify_length_uses(graph, seq, ranges)
        except LengthUseError as err:
            raise RecurrentRefusal(err.reason, err.node, err.op,
                                   hint="a step model knows the tokens seen so far, not the full length: use the "
                                        "length only for shapes and for masks of positions < length") from None
        # ------------------------------------------------------------------------------------- rewrite
        states = [self._carry_site(graph, i, site) for i, site in enumerate(carriers)]
        for j, site in enumerate(sites):
            states += self._carry_attention(graph, len(states), j, site, seq)
        offset = self._offset_input(graph) if ranges or reads or self._offset is not None else None
        if offset is not None:
            shifted = {self._offset_range(graph, node, offset): node.outputs[0] for node in ranges}
            _unshift(graph, self._masks, shifted)
            for read in reads:
                self._offset_slice(graph, read, offset)
            for bound in bounds:
                self._offset_bound(graph, bound, offset)
        for s in states:
            record(Match(s.kind, "carried", [s.node], rewritten=True,
                         info={"state": s.input, "new_state": s.output, "axis": s.axis, "role": s.role}))
        offset_name = offset.name if offset is not None else None
        range_names = [r.name or "<unnamed>" for r in ranges]
        slice_names = [r.node.name or "<unnamed>" for r in reads]
        for name in range_names:
            record(Match("position-range", "offset added", [name], rewritten=True, info={"offset": offset_name}))
        for read, name in zip(reads, slice_names):
            record(Match("position-slice", "offset added", [name], rewritten=True,
                         info={"offset": offset_name, "step": read.step}))
        bound_names = [b.node.name or "<unnamed>" for b in bounds]
        for name in bound_names:
            record(Match("position-bound", "offset added to the length", [name], rewritten=True,
                         info={"offset": offset_name}))
        self._found = {"states": states, "seq_dim": seq, "position_offset": offset_name, "ranges": range_names,
                       "slices": slice_names, "bounds": bound_names}
        return True

    def _survey(self, graph: ir.Graph, seq: str, sites: Sequence[AttentionSite] = ()
                ) -> tuple[list[Any], list[ir.Node], list[PositionRead]]:
        """What carries a state, in graph order (a CumSum over the sequence as ``(node, axis)``, a linear-attention
        node, a :class:`CausalConv`), the position Ranges and table reads to offset; refuse any other node that
        mixes positions along the sequence. The nodes of softmax-attention ``sites`` (carried with a KV cache) and
        those that build only their masks (run on the chunk alone) are not refused."""
        carriers: list[Any] = []
        ranges: list[ir.Node] = []
        reads: list[PositionRead] = []
        convs: dict[ir.Node, CausalConv] = {}
        in_sites = {n for s in sites for n in s.nodes}
        shifts: set[ir.Node] = set()
        masks = self._masks = mask_cone(graph, sites)
        for node in graph:
            if node in in_sites or node in masks:
                continue
            site = causal_conv(node, seq)
            if isinstance(site, str):
                raise RecurrentRefusal(f"mixes positions along the sequence axis: it {site}",
                                       node.name or "<unnamed>", node.op_type)
            if site is not None:
                convs.update({n: site for n in site.nodes})
        for node in graph:
            if node in in_sites or node in masks:  # masks: of the chunk's own keys, built on the chunk alone
                continue
            if node in convs:
                if node is convs[node].conv and convs[node].window:
                    carriers.append(convs[node])
                continue
            if node in shifts:  # the Slice that ends a token shift
                continue
            scan = scan_states(node, seq, graph)
            if isinstance(scan, str):
                raise RecurrentRefusal(f"cannot carry the scan's state: it {scan}", node.name or "<unnamed>",
                                       node.op_type)
            if scan is not None:
                carriers += scan
                continue
            shift = token_shift(node, seq, graph)
            if shift is not None:
                carriers.append(shift)
                shifts.update(shift.nodes)
                continue
            if is_linear_attention(node):
                why = linear_attention_refusal(node, seq)
                if why:
                    raise RecurrentRefusal(f"cannot carry the linear-attention state: {why}",
                                           node.name or "<unnamed>", node.op_type)
                carriers.append(node)
                continue
            if node.op_type == "CumSum" and node.domain in ("", "ai.onnx"):
                carried = self._cumsum_axis(node, seq)
                if carried is not None:
                    carriers.append((node, carried))
                    continue
            if node.op_type == "Range" and node.domain in ("", "ai.onnx"):
                if self._is_seq_range(node, seq):
                    ranges.append(node)
                    continue
            read = position_read(node, seq)
            if read is not None:
                reads.append(read)
                continue
            if _shape_read_only(node, graph, seq):
                continue
            why = mixing_reason(node, seq)
            if why:
                raise RecurrentRefusal(f"mixes positions along the sequence axis: it {why}",
                                       node.name or "<unnamed>", node.op_type)
        if not carriers and not sites:
            raise RecurrentRefusal(
                "the graph has no CumSum over the sequence axis, linear-attention op or causal convolution, so "
                "there is no state to carry (a model with no mixing across positions needs no step model)",
                hint="export the full-sequence model; it already runs on any chunk independently")
        return carriers, ranges, reads

    def _cumsum_axis(self, node: ir.Node, seq: str) -> int | None:
        """The sequence axis a CumSum sums along, or None if it sums along another axis; refuse bad ones."""
        x = node.inputs[0]
        dims = shape_dims(x)
        pos = _seq_positions(dims, seq)
        if not pos:
            return None
        axis_arr = const_array(node.inputs[1])
        label, op = node.name or "<unnamed>", node.op_type
        if axis_arr is None or axis_arr.size != 1:
            raise RecurrentRefusal("sums along an axis that is not a constant: cannot tell whether it runs over "
                                   "the sequence", label, op)
        axis = _norm_axis(int(axis_arr.reshape(-1)[0]), len(dims or []))
        if axis is None:
            raise RecurrentRefusal(f"has axis {int(axis_arr.reshape(-1)[0])} out of range for rank {len(dims or [])}",
                                   label, op)
        if axis not in pos:
            return None
        if len(pos) > 1:
            raise RecurrentRefusal(f"runs over a tensor with two sequence axes ({_fmt_shape(dims)})", label, op)
        if _attr(node, "reverse", 0):
            raise RecurrentRefusal("is a reverse CumSum (a sum over later positions, i.e. anti-causal): a step "
                                   "model cannot know the future tokens", label, op)
        if _attr(node, "exclusive", 0):
            raise RecurrentRefusal("is an exclusive CumSum: lrexport carries inclusive running sums only", label, op,
                                   hint="write the sum as an inclusive cumsum (x.cumsum(dim) - x)")
        return axis

    @staticmethod
    def _is_seq_range(node: ir.Node, seq: str) -> bool:
        od = shape_dims(node.outputs[0])
        return od is not None and len(od) == 1 and od[0] == seq

    # ------------------------------------------------------------------------------------------ rewrite
    def _carry_site(self, graph: ir.Graph, i: int, site: Any) -> CarriedState:
        if isinstance(site, tuple):
            return self._carry(graph, i, *site)
        name_in, name_out = f"{self.state_prefix}{i}", f"{self.output_prefix}{i}"
        if isinstance(site, ScanState):
            node, axis = site.node, 0
            label = node.name or f"scan_{i}"
            role, kind = f"scan state {site.index}", "scan"
            state, out, tap = carry_scan_state(graph, site, name_in, name_out, lambda: self._offset_input(graph))
        elif isinstance(site, TokenShift):
            node, axis = site.pad, site.axis
            label = node.name or f"token_shift_{i}"
            role, kind = f"token shift of {site.size}", "token-shift"
            state, out, tap = carry_shift(graph, site, name_in, name_out)
        elif isinstance(site, CausalConv):
            node, axis = site.conv, 2
            label = node.name or f"conv_{i}"
            role, kind = f"conv window of {site.window}", "conv-window"
            state, out, tap = carry_conv(graph, site, name_in, name_out)
        else:
            node, axis = site, 1
            label = node.name or f"linear_attention_{i}"
            role, kind = f"linear attention, {_attr(node, 'rule', '?')} rule", "linear-attention"
            state, out, tap = carry_linear_attention(graph, node, name_in, name_out)
        plain = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else str(d))
                 for d in (state.shape or [])]
        scopes = name_scopes(node) or []
        module = scopes[-2] if len(scopes) >= 2 else None
        dtype = np.dtype((state.dtype or ir.DataType.FLOAT).numpy()).name
        return CarriedState(i, name_in, name_out, label, axis, plain, dtype, module,
                            scopes[-1] if scopes else None, role, tap, kind)

    def _carry_attention(self, graph: ir.Graph, i: int, j: int, site: AttentionSite, seq: str
                         ) -> list[CarriedState]:
        """Keys and values of softmax-attention site ``j`` as a cache: ``past_key_<j>``/``past_value_<j>`` in,
        ``present_key_<j>``/``present_value_<j>`` out (graph_passes/kv_cache.py)."""
        names = (f"past_key_{j}", f"past_value_{j}", f"present_key_{j}", f"present_value_{j}")
        keys, values = site.keys, site.values
        taps = [StateTap(keys.name or "", "final"), StateTap(values.name or "", "final")]
        dtypes = [np_dtype(keys), np_dtype(values)]
        ins, outs = carry_kv(graph, site, seq, names)
        scopes = name_scopes(site.softmax) or []
        module = scopes[-2] if len(scopes) >= 2 else None
        label = site.softmax.name or f"softmax_{j}"
        states = []
        for k, (inp, out, tap, dtype, role) in enumerate(zip(ins, outs, taps, dtypes, ("keys", "values"))):
            axis = site.key_rank - 1 if k == 0 else site.value_rank - 2
            plain = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else str(d))
                     for d in (inp.shape or [])]
            states.append(CarriedState(i + k, inp.name or "", out.name or "", label, axis, plain, dtype, module,
                                       scopes[-1] if scopes else None, role, tap, "kv-cache"))
        return states

    def _carry(self, graph: ir.Graph, i: int, node: ir.Node, axis: int) -> CarriedState:
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None
        tap = StateTap(y.name or "", "last", axis)
        dims = list(y.shape) if y.shape is not None else list(x.shape or [])
        state_dims = [d for k, d in enumerate(dims) if k != axis]
        plain = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else str(d))
                 for d in state_dims]
        orig_dtype = x.dtype or y.dtype or ir.DataType.FLOAT
        cast = orig_dtype in _FLOAT_TYPES and orig_dtype != self.state_dtype
        sdtype = self.state_dtype if orig_dtype in _FLOAT_TYPES else orig_dtype
        label = node.name or f"cumsum_{i}"
        new: list[ir.Node] = []

        state = ir.Value(name=f"{self.state_prefix}{i}", shape=ir.Shape(state_dims), type=ir.TensorType(sdtype))
        graph.inputs.append(state)
        uses = list(y.uses())
        meta = export_meta(node)
        if cast:
            cx = ir.node("Cast", [x], {"to": sdtype}, name=f"{label}_state_cast_in", metadata_props=dict(meta))
            graph.insert_before(node, [cx])
            node.replace_input_with(0, cx.outputs[0])
            y.dtype = sdtype
        axes = _initializer(graph, f"{label}_state_axis", np.array([axis], dtype=np.int64))
        last = _initializer(graph, f"{label}_state_last", np.array(-1, dtype=np.int64))
        unsq = ir.node("Unsqueeze", [state, axes], name=f"{label}_state_unsqueeze", metadata_props=dict(meta))
        add = ir.node("Add", [y, unsq.outputs[0]], name=f"{label}_state_add", metadata_props=dict(meta))
        add.outputs[0].name = f"{y.name}_carried"
        add.outputs[0].shape = ir.Shape(dims)
        add.outputs[0].type = ir.TensorType(sdtype)
        gather = ir.node("Gather", [add.outputs[0], last], {"axis": axis}, name=f"{label}_state_last",
                         metadata_props=dict(meta))
        out_state = gather.outputs[0]
        out_state.name = f"{self.output_prefix}{i}"
        out_state.shape = ir.Shape(state_dims)
        out_state.type = ir.TensorType(sdtype)
        new += [unsq, add, gather]
        carried = add.outputs[0]
        if cast:
            back = ir.node("Cast", [carried], {"to": orig_dtype}, name=f"{label}_state_cast_out",
                           metadata_props=dict(meta))
            back.outputs[0].shape = ir.Shape(dims)
            back.outputs[0].type = ir.TensorType(orig_dtype)
            new.append(back)
            carried = back.outputs[0]
        graph.insert_after(node, new)
        replace_value(graph, y, carried, uses=uses, suffix="uncarried")  # the new nodes read y themselves
        graph.outputs.append(out_state)
        scopes = name_scopes(node) or []
        module = scopes[-2] if len(scopes) >= 2 else None  # "" is the root module
        role = "s" if _is_outer_product(x.producer()) else "z"
        return CarriedState(i, state.name or "", out_state.name or "", label, axis, plain,
                            np.dtype(sdtype.numpy()).name, module, scopes[-1] if scopes else None, role, tap)

    def _offset_input(self, graph: ir.Graph) -> ir.Value:
        """The int64 scalar input: the position of the chunk's first token (a data tensor, not a shape
        tensor: TensorRT refuses shape-tensor network inputs)."""
        if self._offset is None:
            self._offset = ir.Value(name=self.offset_name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
            graph.inputs.append(self._offset)
        return self._offset

    @staticmethod
    def _offset_range(graph: ir.Graph, node: ir.Node, offset: ir.Value) -> ir.Value:
        """positions = Range(start, limit, delta) + offset * delta."""
        delta, out = node.inputs[2], node.outputs[0]
        dtype = out.dtype or ir.DataType.INT64
        label = node.name or "range"
        uses = list(out.uses())
        new = _cast_offset(offset, dtype, label)
        off = new[-1].outputs[0] if new else offset
        scaled = ir.node("Mul", [off, delta], name=f"{label}_offset_scale")
        shifted = ir.node("Add", [out, scaled.outputs[0]], name=f"{label}_offset_add",
                          metadata_props=dict(node.metadata_props))
        shifted.outputs[0].name = f"{out.name}_offset"
        shifted.outputs[0].shape = out.shape
        shifted.outputs[0].type = out.type
        new += [scaled, shifted]
        graph.insert_after(node, new)
        replace_value(graph, out, shifted.outputs[0], uses=uses, suffix="unshifted")
        return shifted.outputs[0]

    @staticmethod
    def _offset_bound(graph: ir.Graph, bound: PositionBound, offset: ir.Value) -> None:
        """positions < n -> positions < n + offset: compared with the offset positions, the length is the number
        of tokens seen so far (the same length used as a shape elsewhere stays the chunk's)."""
        node = bound.node
        length = node.inputs[bound.length]
        assert length is not None
        label = node.name or "compare"
        new = _cast_offset(offset, length.dtype or ir.DataType.INT64, f"{label}_bound")
        off = new[-1].outputs[0] if new else offset
        seen = ir.node("Add", [length, off], name=f"{label}_tokens_seen", metadata_props=dict(node.metadata_props))
        seen.outputs[0].name = f"{length.name}_tokens_seen_{label}"
        seen.outputs[0].shape, seen.outputs[0].type = length.shape, length.type
        graph.insert_before(node, [*new, seen])
        node.replace_input_with(bound.length, seen.outputs[0])

    @staticmethod
    def _offset_slice(graph: ir.Graph, read: PositionRead, offset: ir.Value) -> None:
        """table[.., start:end:step, ..] -> Gather(table, Range(start, end, step) + offset * step): the Range
        stays a shape computation and the offset a data tensor, as for a Range (a Slice start computed from
        the offset would make it a shape tensor, and TensorRT refuses shape-tensor inputs). The table's other
        sliced axes stay a Slice."""
        node, j = read.node, read.index
        data, ends, out = node.inputs[0], node.inputs[2], node.outputs[0]
        assert data is not None and ends is not None
        dtype = ends.dtype or ir.DataType.INT64
        label = node.name or "slice"

        def const(name: str, value: Any, np_dtype: Any = dtype.numpy()) -> ir.Value:
            return _initializer(graph, f"{label}_{name}", np.array(value, dtype=np_dtype))

        new = _cast_offset(offset, dtype, label)
        off = new[-1].outputs[0] if new else offset
        step = const("row_step", read.step)
        end = ir.node("Gather", [ends, const("seq_entry", j, np.int64)], {"axis": 0}, name=f"{label}_row_end")
        rows = ir.node("Range", [const("row_start", read.starts[j]), end.outputs[0], step], name=f"{label}_rows")
        shift = ir.node("Mul", [off, step], name=f"{label}_offset_scale")
        shifted = ir.node("Add", [rows.outputs[0], shift.outputs[0]], name=f"{label}_offset_add")
        new += [end, rows, shift, shifted]
        table = data
        others = [k for k in range(len(read.axes)) if k != j]
        if others:
            pick = [read.starts[k] for k in others], [read.axes[k] for k in others], [read.steps[k] for k in others]
            rest_ends = ir.node("Gather", [ends, const("other_entries", others, np.int64)], {"axis": 0},
                                name=f"{label}_other_ends")
            rest = ir.node("Slice", [data, const("other_starts", pick[0]), rest_ends.outputs[0],
                                     const("other_axes", pick[1]), const("other_steps", pick[2])],
                           name=f"{label}_other_axes")
            new += [rest_ends, rest]
            table = rest.outputs[0]
        gather = ir.node("Gather", [table, shifted.outputs[0]], {"axis": read.axis}, name=f"{label}_offset_rows",
                         metadata_props=dict(node.metadata_props))
        gather.outputs[0].shape, gather.outputs[0].type = out.shape, out.type
        graph.insert_before(node, [*new, gather])
        replace_value(graph, out, gather.outputs[0])
        graph.remove(node, safe=True)


def _unshift(graph: ir.Graph, masks: set[ir.Node], shifted: dict[ir.Value, ir.Value]) -> None:
    """Make the mask-building nodes read the chunk's own positions ``0 .. c-1`` (the Ranges before the offset),
    through copies of what they read of the offset positions: they build the mask of the chunk's keys alone, a
    chunk-sized tensor that a mask indexing it by absolute positions (``mask[b, kv_idx]``) would overrun.
    Query and key positions move together, so a causal mask is the same either way."""
    memo: dict[ir.Value, ir.Value] = dict(shifted)

    def depends(v: ir.Value | None, seen: dict[ir.Value, bool]) -> bool:
        if v is None:
            return False
        if v in shifted:
            return True
        if v not in seen:
            seen[v] = False
            p = v.producer()
            seen[v] = p is not None and any(depends(i, seen) for i in p.inputs)
        return seen[v]

    seen: dict[ir.Value, bool] = {}

    def local(v: ir.Value) -> ir.Value:
        if v in memo:
            return memo[v]
        p = v.producer()
        assert p is not None
        ins = [None if i is None else (local(i) if depends(i, seen) else i) for i in p.inputs]
        clone = ir.node(p.op_type, ins, dict(p.attributes), domain=p.domain, num_outputs=len(p.outputs),
                        name=f"{p.name or p.op_type}_chunk_local", metadata_props=dict(p.metadata_props))
        for old, new in zip(p.outputs, clone.outputs):
            new.name = f"{old.name}_chunk_local"
            new.shape, new.type = old.shape, old.type
            memo[old] = new
        graph.insert_after(p, [clone])
        return memo[v]

    for node in [n for n in graph if n in masks]:
        for k, v in enumerate(node.inputs):
            if v is not None and v.producer() not in masks and depends(v, seen):
                node.replace_input_with(k, local(v))


def _cast_offset(offset: ir.Value, dtype: ir.DataType, label: str) -> list[ir.Node]:
    """[Cast] of the int64 offset to ``dtype``, or nothing when it is int64 already."""
    if dtype == ir.DataType.INT64:
        return []
    return [ir.node("Cast", [offset], {"to": dtype}, name=f"{label}_offset_cast")]


def _initializer(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    graph.register_initializer(value)
    return value
