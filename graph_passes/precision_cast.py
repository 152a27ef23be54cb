"""Cast an ONNX model to fp16 or bf16 for strongly typed TensorRT networks (TensorRT-RTX has no fp16 flag:
precision is whatever the tensor types in the network say).

Everything float32 becomes the low type except what must stay float32 (:func:`plan_cast` says which
node and why; :func:`apply_cast` rewrites the graph):

* ``LayerNormalization`` with its scale and bias: TensorRT's fp16 LayerNorm overflows its variance
  (the sum of d squares passes 65504 once d |x|^2 does: d = 512 and |x| = 12 are enough),
* running and normalizer sums that grow with the sequence: a ``CumSum`` / ``ReduceSum`` along an axis
  whose length is not fixed in the graph, and the ops reading it, up to and including the ``Div`` /
  ``Reciprocal`` that normalizes (linear attention's S_i and Z_i grow with n; so does the output of a
  lowered linear-rule recurrence without normalizer, whose lowering marks it: :func:`mark_growing`,
  ``graph_passes/linear_attention.py``: an fp16 reader would round values of hundreds to steps of 0.25,
  and an out projection's cancellations turn that into errors past the fp16 tolerance). A sum along static axes
  only (a chunk, a head dimension) has the same length at every input shape, so the range analysis,
  which measures it, decides,
* ``Softmax``: its input is cast to float32 (exp and the row sum run in fp32); the scaling before it
  (``q k^T / sqrt(d)``) reads an fp16 MatMul and stays fp16, measured by the range analysis,
* model inputs and outputs keep their type (Casts at the boundary) unless ``keep_io_types=False``,
* on request, named nodes (``keep_nodes``: a user's module choice) and named values (``keep_values``: what
  the range analysis, ``exporter/fp16_range.py``, measured past fp16's range). A kept value keeps its
  producer *and every reader* in float32: a reader in fp16 would get it through a Cast, which is where
  it would overflow. Readers compute in fp32 and hand a result in range to the fp16 region.

Casts are inserted wherever a value crosses between the fp32 and low-precision regions; initializers
read by both get a low-precision copy. Implemented on onnx-ir, so external data and >2 GB models work
through :func:`cast_precision_file`.

Node share (``low_fraction`` = ``low_nodes / compute_nodes``): the nodes of the source graph that
compute a float value, i.e. have a float32 output. Constants (they take their readers' type: no
arithmetic) and shape/int plumbing (Shape, Size, the integer Concat/Mod/Sub of shape arithmetic) count
neither way; float data movement (Reshape, Transpose, Slice) counts, since its type decides the bytes
the engine moves. The Casts the cast inserts are not counted.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes._base import GraphPass, Match, PassOptions, record
from graph_passes.errors import LrexportError
from graph_passes.precisions import LOW_PRECISIONS as PRECISIONS, normalize_low_precision as normalize_precision

DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "CumSum", "ReduceSum", "Softmax", "LinearAttention")
# Why a kept op stays float32 (the report names the reason of every kept node).
_WHY = {"LayerNormalization": "LayerNorm (an fp16 variance overflows)",
        "Softmax": "Softmax (exp and row sum in float32)", "LogSoftmax": "LogSoftmax (exp and row sum in float32)",
        "LinearAttention": "LinearAttention (its state accumulates over the sequence)"}
# Node metadata key: the pass that wrote the node keeps it float32; the value says why.
FLOAT32_TAG = "lrexport.keep_float32"
# Node metadata key, on a tagged node whose output grows with the sequence (a running sum without decay or
# normalizer, computed by a pass's nodes): its readers stay float32 as a growing CumSum's do.
GROWS_TAG = "lrexport.grows_with_sequence"

# From a growing running/normalizer sum, fp32 spreads forward through these ops until a Div/Reciprocal.
_SUM_OPS = frozenset({"CumSum", "ReduceSum"})
_SUM_PASS_THROUGH = frozenset({
    "Einsum", "MatMul", "Add", "Sub", "Mul", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Expand",
    "Slice", "Concat", "Gather", "Pad", "Identity", "Max", "Clip", "CumSum", "ReduceSum", "Flatten", "Split",
})
_SUM_STOP = frozenset({"Div", "Reciprocal"})
_SUM_REASONS = ("sum along an axis whose length varies", "reads the growing sum", "normalizes the growing sum")
_STANDARD = ("", "ai.onnx")
# Nodes that only look at shapes: no cast needed whatever the region.
_SHAPE_ONLY = frozenset({"Shape", "Size"})
# Inputs that ONNX requires to be float32 whatever the data type.
_FP32_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2)}
# Ops whose float output type comes from an attribute.
_DTYPE_ATTR = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}
_FLOAT = ir.DataType.FLOAT


def _np_low(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.FLOAT16:
        return np.clip(array, -65504.0, 65504.0).astype(np.float16)
    import ml_dtypes  # onnx-ir dependency

    return array.astype(ml_dtypes.bfloat16)


def _low_tensor(tensor: ir.TensorProtocol, dtype: ir.DataType, name: str | None = None) -> ir.TensorProtocol:
    return ir.tensor(_np_low(tensor.numpy(), dtype), dtype=dtype, name=name or tensor.name)


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == _FLOAT


def _label(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def keep_float32(nodes: Collection[ir.Node], why: str) -> None:
    """Tag ``nodes`` (written by a pass) to stay float32 under the cast, ``why`` being the report's reason."""
    for node in nodes:
        node.metadata_props[FLOAT32_TAG] = why


def mark_growing(node: ir.Node, what: str) -> None:
    """Mark a tagged node as computing a value that grows with the sequence (``what`` names it): the cast
    keeps its readers float32 up to the division that normalizes it, as for a growing CumSum."""
    node.metadata_props[GROWS_TAG] = what


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class CastPlan:
    """Which nodes the cast keeps in float32, and why; every other node computing a float value goes low."""

    precision: str  # 'fp16' / 'bf16'
    low: ir.DataType
    fp32: dict[ir.Node, str] = field(default_factory=dict)  # node -> why it stays float32
    requested: set[ir.Node] = field(default_factory=set)  # kept only because keep_nodes/keep_values asked
    float_values: set[ir.Value] = field(default_factory=set)  # the source graph's float32 values

    @property
    def on_growing_sums(self) -> list[ir.Node]:
        """The kept nodes that are, read or normalize a sum growing with the input."""
        return [n for n, why in self.fp32.items() if why.startswith(_SUM_REASONS)]

    def region(self, node: ir.Node) -> str:
        """'fp32', 'low', or 'any' (shape-only nodes: no cast needed either way)."""
        if node.op_type in _SHAPE_ONLY:
            return "any"
        if node in self.fp32:
            return "fp32"
        if node.op_type == "Constant" and any(u in self.fp32 for out in node.outputs for u in out.consumers()):
            return "fp32"  # a constant lives in its readers' region (eps = 1e-12 must not round to 0 in fp16)
        return "low"

    def computes_float(self, node: ir.Node) -> bool:
        """Counted in the node share (module doc): a float output, not a Constant, not shape-only."""
        return (node.op_type not in _SHAPE_ONLY and node.op_type != "Constant"
                and any(o in self.float_values for o in node.outputs))

    def report(self, graph: ir.Graph) -> dict[str, Any]:
        """The kept nodes (with why) and the node share, for the cast report."""
        kept = [n for n in graph if self.region(n) == "fp32" and n.op_type != "Constant"]
        compute = [n for n in graph if self.computes_float(n)]
        low = sum(self.region(n) == "low" for n in compute)
        return {"kept_fp32_nodes": [_label(n) for n in kept],
                "kept_fp32_by_op": dict(Counter(n.op_type for n in kept)),
                "kept_fp32_why": {_label(n): self.fp32[n] for n in kept if n in self.fp32},
                "kept_on_request": sorted(_label(n) for n in self.requested),
                "kept_for_growing_sums": [_label(n) for n in kept if n in set(self.on_growing_sums)],
                "compute_nodes": len(compute), "low_nodes": low,
                "low_fraction": low / len(compute) if compute else 1.0}


def plan_cast(model: ir.Model, precision: str, keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
              keep_nodes: Collection[str] = (), keep_values: Collection[str] = ()) -> CastPlan:
    """Decide the float32 nodes (module doc) without changing the model (shape inference may annotate it)."""
    precision = normalize_precision(precision)
    graph = model.graph
    _infer_types(model)
    structural = structural_fp32(graph, frozenset(keep_fp32_ops))
    for node in graph:
        if _has_subgraph(node) and (node not in structural or _reads_outer_floats(node)):
            raise LrexportError(f"precision cast does not handle control flow (node {node.name!r}, {node.op_type})",
                                "build in fp32, or inline/unroll the If/Loop/Scan before casting")
    floats = {v for v in (*graph.inputs, *graph.initializers.values()) if _is_float(v)}
    floats.update(v for node in graph for v in (*node.inputs, *node.outputs) if _is_float(v))
    plan = CastPlan(precision, PRECISIONS[precision], structural, float_values=floats)
    for node, why in _requested(graph, keep_nodes, keep_values).items():
        if node not in plan.fp32:
            plan.fp32[node] = why
            plan.requested.add(node)
    return plan


def structural_fp32(graph: ir.Graph, keep_ops: Collection[str]) -> dict[ir.Node, str]:
    """The nodes the structural rules keep in float32 (module doc), each with why."""
    keep: dict[ir.Node, str] = {}
    for node in graph:
        if FLOAT32_TAG in node.metadata_props and (_has_subgraph(node) or any(_is_float(o) for o in node.outputs)):
            keep[node] = node.metadata_props[FLOAT32_TAG]
            if GROWS_TAG in node.metadata_props:
                _keep_sum_readers(node, keep)
                if f"{_SUM_REASONS[2]} of {_label(node)}" not in keep.values():  # nothing normalizes it
                    _keep_growing_feeds(node, keep)
        elif node.domain not in _STANDARD:
            keep[node] = "custom op (runs as exported)"
        elif node.op_type in _SUM_OPS:
            if node.op_type in keep_ops and node not in keep and _sum_grows(node):
                keep[node] = f"{_SUM_REASONS[0]} ({node.op_type}: grows with the input)"
                _keep_sum_readers(node, keep)
        elif node.op_type in keep_ops:
            keep[node] = _WHY.get(node.op_type, f"{node.op_type} (keep_fp32_ops)")
    return keep


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def _reads_outer_floats(node: ir.Node) -> bool:
    """Whether a subgraph of ``node`` reads a float value of the graph around it (the cast could retype it:
    only a self-contained body can be left as it is)."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for sub in graphs:
            own = set(sub.inputs) | set(sub.initializers.values())
            own.update(v for n in ir.traversal.RecursiveGraphIterator(sub) for v in n.outputs)
            if any(v is not None and v not in own and v.dtype == _FLOAT
                   for n in ir.traversal.RecursiveGraphIterator(sub) for v in n.inputs):
                return True
    return False


def _keep_sum_readers(start: ir.Node, keep: dict[ir.Node, str]) -> None:
    """Everything reading the growing sum ``start`` through magnitude-preserving ops, up to the division."""
    queue: deque[ir.Node] = deque([start])
    while queue:
        for out in queue.popleft().outputs:
            for user in out.consumers():
                if user in keep:
                    continue
                if user.op_type in _SUM_STOP:
                    keep[user] = f"{_SUM_REASONS[2]} of {_label(start)}"
                elif user.op_type in _SUM_PASS_THROUGH and _is_float(user.outputs[0]):
                    keep[user] = f"{_SUM_REASONS[1]} of {_label(start)}"
                    queue.append(user)


# Back from an unnormalized growing recurrence: through data movement, and through elementwise maps of one
# computed input (a feature map, a bias), to the projection that computes q, k, v (kept, then stop).
_FEED_MOVE = frozenset({"Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Concat", "Identity",
                        "Expand", "Flatten"})
_FEED_MAP = frozenset({"Add", "Sub", "Mul", "Div", "Elu", "Relu", "LeakyRelu", "Exp", "Sigmoid", "Softplus",
                       "Tanh", "Gelu", "Erf", "Abs", "Neg", "Sqrt", "Pow", "Softmax", "Max", "Min", "Clip"})
_FEED_PROJECTION = frozenset({"MatMul", "Gemm", "Einsum"})
_FEEDS_WHY = "computes an input of the growing {} (its fp16 rounding would grow with the sequence in the output)"


def _computed(value: ir.Value | None) -> bool:
    """A value computed from the model's inputs (not a weight or a constant)."""
    if value is None or value.const_value is not None:
        return False
    producer = value.producer()
    return producer is None or producer.op_type != "Constant"


def _keep_growing_feeds(start: ir.Node, keep: dict[ir.Node, str]) -> None:
    """The nodes computing the q, k, v of the growing recurrence whose output ``start`` produces, when nothing
    normalizes that output: its absolute error is the relative rounding of q, k, v times its magnitude, which
    grows with n (a linear rule at n = 4096: outputs of hundreds, errors of 0.1-0.3 from fp16 q, k, v alone),
    so they are computed in float32 from the projection on: data movement, elementwise maps of one computed
    input, and the projection itself (MatMul/Gemm/Einsum, whose input then crosses into float32 with a Cast)."""
    why = start.metadata_props.get(FLOAT32_TAG)
    group, seen = [start], {start}
    frontier: list[ir.Node] = []
    while group:  # the lowered recurrence: its nodes carry the tag of ``start``
        node = group.pop()
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is None or p in seen:
                continue
            seen.add(p)
            (group if p.metadata_props.get(FLOAT32_TAG) == why else frontier).append(p)
    label = _FEEDS_WHY.format(_label(start))
    while frontier:
        node = frontier.pop()
        if node in keep or node.domain not in _STANDARD or not any(_is_float(o) for o in node.outputs):
            continue
        computed = [v for v in node.inputs if _computed(v) and _is_float(v)]
        if node.op_type in _FEED_PROJECTION:
            keep[node] = label
            continue
        if node.op_type in _FEED_MOVE or (node.op_type in _FEED_MAP and len(computed) == 1):
            keep[node] = label
            frontier += [v.producer() for v in computed if v.producer() is not None]


def _sum_grows(node: ir.Node) -> bool:
    """Whether a CumSum/ReduceSum adds up a number of terms that depends on the input shape: one of its
    summed axes has no fixed length. Unknown shapes or axes count as growing."""
    data = node.inputs[0]
    if data is None or data.shape is None:
        return True
    rank = len(data.shape)
    axes = _summed_axes(node, rank)
    if axes is None or any(not -rank <= a < rank for a in axes):
        return True
    return any(not isinstance(data.shape[a % rank], int) for a in axes)


def _summed_axes(node: ir.Node, rank: int) -> list[int] | None:
    if node.op_type == "CumSum":
        return _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _const_ints(node.inputs[1])  # opset >= 13; None when computed at run time
    else:
        attr = node.attributes.get("axes")
        axes = [int(a) for a in attr.value] if attr is not None else []
    if axes == []:
        noop = node.attributes.get("noop_with_empty_axes")
        return [] if noop is not None and noop.value else list(range(rank))
    return axes


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return [int(i) for i in value.const_value.numpy().reshape(-1)]
    prod = value.producer()
    if prod is None or prod.op_type != "Constant":
        return None
    for key, attr in prod.attributes.items():
        if key == "value" and isinstance(attr.value, ir.TensorProtocol):
            return [int(i) for i in attr.value.numpy().reshape(-1)]
        if key in ("value_int", "value_ints"):
            return [int(i) for i in np.atleast_1d(attr.value)]
    return None


def _requested(graph: ir.Graph, keep_nodes: Collection[str], keep_values: Collection[str]) -> dict[ir.Node, str]:
    """The nodes ``keep_nodes`` names, and the producer and readers of each value ``keep_values`` names."""
    out: dict[ir.Node, str] = {}
    nodes_by_name = {n.name: n for n in graph if n.name}
    missing = [n for n in keep_nodes if n not in nodes_by_name]
    if missing:
        raise LrexportError(f"cannot keep node {missing[0]!r} in float32: the model has no node of that name",
                            "name nodes of the model being cast")
    out.update((nodes_by_name[n], "requested") for n in keep_nodes)
    values = {v.name: v for node in graph for v in (*node.inputs, *node.outputs) if v is not None and v.name}
    values.update({v.name: v for v in graph.inputs if v.name})
    missing = [v for v in keep_values if v not in values]
    if missing:
        raise LrexportError(f"cannot keep value {missing[0]!r} in float32: the model has no value of that name",
                            "name values of the model being cast")
    for name in keep_values:
        value = values[name]
        prod = value.producer()
        if prod is not None and prod.op_type not in _SHAPE_ONLY:
            out.setdefault(prod, f"produces {name!r} (out of range)")
        for user in value.consumers():
            if user.op_type not in _SHAPE_ONLY:
                out.setdefault(user, f"reads {name!r} (out of range)")
    return out


def _infer_types(model: ir.Model) -> None:
    if all(o.dtype is not None for n in model.graph for o in n.outputs if o.name):
        return
    try:
        from graph_passes.shape_inference import TypedShapeInferencePass

        TypedShapeInferencePass(strict_mode=False)(model)
    except Exception:  # best effort: values without a type are left alone
        pass


def fp32_node_names(model: onnx.ModelProto, keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS) -> set[str]:
    """Names of the nodes the structural rules keep in float32 (before any range-based keep-list): the
    range analysis needs them to know which values the cast would turn fp16/bf16."""
    ir_model = ir.from_proto(model)
    _infer_types(ir_model)
    return {n.name for n in structural_fp32(ir_model.graph, frozenset(keep_fp32_ops)) if n.name}


# ---------------------------------------------------------------------------------------------- apply


class _CastWriter:
    """Rewrites a graph by a :class:`CastPlan`: retypes the low nodes, inserts a Cast wherever a value
    crosses regions, gives initializers a low-precision copy (in place when only low nodes read them)."""

    def __init__(self, graph: ir.Graph, plan: CastPlan, keep_io_types: bool):
        self.graph, self.plan, self.keep_io_types = graph, plan, keep_io_types
        self.counts = {"tensors_cast": 0, "initializers_cast": 0, "constants_cast": 0, "casts_inserted": 0}
        self.where: dict[ir.Value, str] = {}  # value -> the region it lives in now ('fp32' when absent)
        self._casts: dict[tuple[ir.Value, str], ir.Value] = {}
        self._low_inits: dict[ir.Value, ir.Value] = {}
        self._names = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        self._names |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)

    def run(self) -> dict[str, int]:
        for v in self.graph.inputs:
            if v in self.plan.float_values and not self.keep_io_types:
                v.dtype = self.plan.low
                self.where[v] = "low"
                self.counts["tensors_cast"] += 1
        for node in list(self.graph):
            region = self.plan.region(node)
            if region == "any":
                continue
            self._route_inputs(node, region)
            if region == "low":
                self._lower(node)
            else:
                self.where.update((out, "fp32") for out in node.outputs if out in self.plan.float_values)
        for idx, out in enumerate(list(self.graph.outputs)):
            if out in self.plan.float_values:
                self._cast_output(idx, out)
        return self.counts

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _route_inputs(self, node: ir.Node, region: str) -> None:
        """Feed each float input from the region it lives in to the one ``node`` computes in."""
        for i, v in enumerate(node.inputs):
            if v is None or v not in self.plan.float_values:
                continue
            want = "fp32" if (region == "fp32" or _needs_fp32_input(node, v, i)) else "low"
            if v.is_initializer() and not v.is_graph_input():
                if want == "low":
                    node.replace_input_with(i, self._low_initializer(v))
            elif self.where.get(v, "fp32") != want:
                node.replace_input_with(i, self._cast_of(v, want, node))

    def _lower(self, node: ir.Node) -> None:
        """Retype a low node: its float outputs, its dtype attribute, its constant value."""
        low = self.plan.low
        attr_name = _DTYPE_ATTR.get(node.op_type)
        if attr_name and attr_name in node.attributes and node.attributes[attr_name].value == int(_FLOAT):
            node.attributes[attr_name] = ir.AttrInt64(attr_name, int(low))
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if isinstance(tensor, ir.TensorProtocol) and tensor.dtype == _FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", _low_tensor(tensor, low))
                self.counts["constants_cast"] += 1
        for out in node.outputs:
            if out in self.plan.float_values:
                out.dtype = low
                if out.const_value is not None and out.const_value.dtype == _FLOAT:
                    out.const_value = _low_tensor(out.const_value, low)
                self.where[out] = "low"
                self.counts["tensors_cast"] += 1

    def _low_initializer(self, v: ir.Value) -> ir.Value:
        """The low-precision twin of a float32 initializer (in place when only low nodes read it)."""
        if v in self._low_inits:
            return self._low_inits[v]
        assert v.const_value is not None
        only_low = (not v.is_graph_output() and v not in self.graph.inputs
                    and all(self.plan.region(u) == "low" and not _needs_fp32_input(u, v) for u in v.consumers()))
        if only_low:
            v.const_value = _low_tensor(v.const_value, self.plan.low)
            v.dtype = self.plan.low
            out = v
        else:
            name = self._fresh(f"{v.name}_{self.plan.precision}")
            out = ir.Value(name=name, shape=v.shape, type=ir.TensorType(self.plan.low),
                           const_value=_low_tensor(v.const_value, self.plan.low, name))
            self.graph.register_initializer(out)
        self.counts["initializers_cast"] += 1
        self._low_inits[v] = out
        return out

    def _new_cast(self, v: ir.Value, to: ir.DataType, node_name: str, value_name: str) -> ir.Node:
        cast = ir.Node("", "Cast", [v], [ir.AttrInt64("to", int(to))], name=node_name, num_outputs=1)
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = value_name, to, v.shape
        self.counts["casts_inserted"] += 1
        return cast

    def _cast_of(self, v: ir.Value, target: str, before: ir.Node) -> ir.Value:
        """``v`` in region ``target``, through one Cast shared by every reader there."""
        key = (v, target)
        if key not in self._casts:
            to, suffix = (self.plan.low, self.plan.precision) if target == "low" else (_FLOAT, "fp32")
            cast = self._new_cast(v, to, self._fresh(f"{v.name}_cast_{suffix}"), self._fresh(f"{v.name}_{suffix}"))
            self.graph.insert_before(before, cast)
            self._casts[key] = cast.outputs[0]
        return self._casts[key]

    def _cast_output(self, idx: int, out: ir.Value) -> None:
        """Graph outputs keep float32 (or become low when keep_io_types=False): a Cast under the original name."""
        have = self.where.get(out, "fp32")
        want = "fp32" if self.keep_io_types else "low"
        if have == want or (out.const_value is not None and out.producer() is None):
            return
        original = out.name or "output"
        out.name = self._fresh(f"{original}_{self.plan.precision if have == 'low' else 'fp32'}")
        self._names.add(original)
        cast = self._new_cast(out, _FLOAT if want == "fp32" else self.plan.low, self._fresh(f"{original}_cast_out"),
                              original)
        self.graph.append(cast)
        self.graph.outputs[idx] = cast.outputs[0]


def apply_cast(model: ir.Model, plan: CastPlan, keep_io_types: bool = True) -> dict[str, int]:
    """Rewrite ``model`` in place by ``plan``; returns what was cast and how many Casts were inserted."""
    return _CastWriter(model.graph, plan, keep_io_types).run()


class PrecisionCastPass(GraphPass):
    """The cast as a graph pass (plan, then apply): one detail per node kept float32, with why; the cast
    report (what :func:`cast_precision` returns) is ``self.report``. The precision settings are arguments:
    ``PassOptions`` carries the rewrite passes' settings."""

    name = "precision-cast"

    def __init__(self, precision: str, *, keep_io_types: bool = True,
                 keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS, keep_nodes: Collection[str] = (),
                 keep_values: Collection[str] = (), options: PassOptions | None = None) -> None:
        super().__init__(options)
        self.precision = normalize_precision(precision)
        self.keep_io_types, self.keep_fp32_ops = keep_io_types, tuple(keep_fp32_ops)
        self.keep_nodes, self.keep_values = tuple(keep_nodes), tuple(keep_values)
        self.report: dict[str, Any] = {}

    min_opset = 0  # casts and type changes only: nothing opset-sensitive

    def run(self, model: ir.Model) -> bool:
        plan = plan_cast(model, self.precision, self.keep_fp32_ops, self.keep_nodes, self.keep_values)
        report: dict[str, Any] = {"precision": plan.precision, "keep_io_types": self.keep_io_types}
        report.update(plan.report(model.graph))  # before the rewrite: the share counts the source graph's nodes
        report.update(apply_cast(model, plan, self.keep_io_types))
        self.report = report
        for name, why in report["kept_fp32_why"].items():  # a decision on a node it cast: a match, kept
            record(Match("keep-fp32", "kept float32", [name], reason=why))
        return True


def _cast_ir(model: ir.Model, precision: str, keep_io_types: bool, keep_fp32_ops: Sequence[str],
             keep_nodes: Collection[str] = (), keep_values: Collection[str] = ()) -> dict:
    cast = PrecisionCastPass(precision, keep_io_types=keep_io_types, keep_fp32_ops=keep_fp32_ops,
                             keep_nodes=keep_nodes, keep_values=keep_values)
    cast(model)
    return cast.report


def _needs_fp32_input(node: ir.Node, value: ir.Value, index: int | None = None) -> bool:
    positions = _FP32_INPUTS.get(node.op_type)
    if not positions:
        return False
    idxs = [index] if index is not None else [i for i, v in enumerate(node.inputs) if v is value]
    return any(i in positions for i in idxs)


def _check_inline(model: ir.Model) -> None:
    """An in-memory proto whose weights were left on disk cannot be cast (no base folder to read them from)."""
    for name, value in model.graph.initializers.items():
        if isinstance(value.const_value, ir.ExternalTensor):
            raise LrexportError(f"initializer {name!r} is stored as external data that was not loaded",
                                "load with onnx.load(path, load_external_data=True) or use cast_precision_file()")


def cast_precision(model: onnx.ModelProto, precision: str, *, keep_io_types: bool = True,
                   keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS, keep_nodes: Collection[str] = (),
                   keep_values: Collection[str] = ()) -> tuple[onnx.ModelProto, dict]:
    """Cast a float32 ONNX model to fp16/bf16 with LayerNorm, running sums and Softmax kept in fp32, and
    the nodes named in ``keep_nodes`` and the values named in ``keep_values`` (with their readers).

    Returns the new model and a report: tensors/initializers/constants cast, Casts inserted, which
    nodes were kept in fp32 (by name and by op type; ``kept_on_request``: those kept only because of
    ``keep_nodes``/``keep_values``) and ``low_fraction``, the share of float-computing nodes left in the
    low precision. The input proto is not modified.
    """
    normalize_precision(precision)
    ir_model = ir.from_proto(model)
    _check_inline(ir_model)
    report = _cast_ir(ir_model, precision, keep_io_types, keep_fp32_ops, keep_nodes, keep_values)
    return ir.to_proto(ir_model), report


def cast_precision_file(src: str | Path, dst: str | Path, precision: str, *, keep_io_types: bool = True,
                        keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS, keep_nodes: Collection[str] = (),
                        keep_values: Collection[str] = ()) -> dict:
    """File-to-file variant: reads external data lazily and writes ``dst`` + ``dst.data`` (any size)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise LrexportError(f"ONNX file {src} does not exist", "check the path")
    normalize_precision(precision)
    ir_model = ir.load(src)
    report = _cast_ir(ir_model, precision, keep_io_types, keep_fp32_ops, keep_nodes, keep_values)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()  # onnx-ir appends to an existing data file
    ir.save(ir_model, dst, external_data=data.name)
    return report
