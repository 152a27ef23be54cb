"""Cast an ONNX model to fp16 or bf16 for strongly typed TensorRT networks (TensorRT-RTX has no fp16 flag:
precision is whatever the tensor types in the network say).

Everything float32 becomes the low type except what must stay float32:

* ``LayerNormalization`` with its scale and bias (fp16 LayerNorm overflows its variance),
* normalizer and running-state sums: ``CumSum`` / ``ReduceSum`` and the ops reading them, up to and
  including the ``Div`` / ``Reciprocal`` that normalizes (linear attention's S_i and Z_i grow with n),
* ``Softmax`` and the constant scaling right before it (its logits),
* model inputs and outputs keep their type (Casts at the boundary) unless ``keep_io_types=False``,
* on request, named nodes (``keep_nodes``: a user's module choice) and named values (``keep_values``: what
  the range analysis, ``exporter/fp16_range.py``, measured past fp16's range). A kept value keeps its
  producer *and every reader* in float32: a reader in fp16 would get it through a Cast, which is where
  it would overflow. Readers compute in fp32 and hand a result in range to the fp16 region.

Casts are inserted wherever a value crosses between the fp32 and low-precision regions; initializers
read by both get a low-precision copy. Implemented on onnx-ir, so external data and >2 GB models work
through :func:`cast_precision_file`.
"""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.errors import LrexportError
from graph_passes.precisions import LOW_PRECISIONS as PRECISIONS, normalize_low_precision as normalize_precision

DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "CumSum", "ReduceSum", "Softmax")

# From a running/normalizer sum, fp32 spreads forward through these ops until a Div/Reciprocal.
_SUM_OPS = frozenset({"CumSum", "ReduceSum"})
_SUM_PASS_THROUGH = frozenset({
    "Einsum", "MatMul", "Add", "Sub", "Mul", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Expand",
    "Slice", "Concat", "Gather", "Pad", "Identity", "Max", "Clip", "CumSum", "ReduceSum", "Flatten",
})
_SUM_STOP = frozenset({"Div", "Reciprocal"})
# Before a Softmax, fp32 spreads backward through scaling by a constant (q k^T / sqrt(d), + bias).
_SOFTMAX_SCALING = frozenset({"Div", "Mul", "Add", "Sub"})
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


def _const_tensor(value: ir.Value) -> bool:
    """An initializer or the output of a Constant node."""
    if value.is_initializer() or value.const_value is not None:
        return True
    prod = value.producer()
    return prod is not None and prod.op_type == "Constant" and prod.domain in ("", "ai.onnx")


def _keep_set(graph: ir.Graph, keep_ops: frozenset[str], keep_nodes: Collection[str] = (),
              keep_values: Collection[str] = ()) -> tuple[set[ir.Node], set[ir.Node]]:
    """The nodes that stay float32: (all of them, those kept only because ``keep_nodes``/``keep_values``
    asked)."""
    keep = _structural_keep_set(graph, keep_ops)
    requested: set[ir.Node] = set()
    nodes_by_name = {n.name: n for n in graph if n.name}
    missing = [n for n in keep_nodes if n not in nodes_by_name]
    if missing:
        raise LrexportError(f"cannot keep node {missing[0]!r} in float32: the model has no node of that name",
                            "name nodes of the model being cast")
    requested.update(nodes_by_name[n] for n in keep_nodes)
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
            requested.add(prod)
        requested.update(u for u in value.consumers() if u.op_type not in _SHAPE_ONLY)
    return keep | requested, requested - keep


def _structural_keep_set(graph: ir.Graph, keep_ops: frozenset[str]) -> set[ir.Node]:
    keep: set[ir.Node] = set()
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            keep.add(node)  # custom ops: run them as they were exported
            continue
        if node.op_type not in keep_ops:
            continue
        keep.add(node)
        if node.op_type in _SUM_OPS:
            queue: deque[ir.Node] = deque([node])
            while queue:
                cur = queue.popleft()
                for out in cur.outputs:
                    for user in out.consumers():
                        if user in keep and user is not node:
                            continue
                        if user.op_type in _SUM_STOP:
                            keep.add(user)
                        elif user.op_type in _SUM_PASS_THROUGH and _is_float(user.outputs[0]):
                            keep.add(user)
                            queue.append(user)
        elif node.op_type in ("Softmax", "LogSoftmax"):
            src = node.inputs[0]
            while src is not None:
                prod = src.producer()
                if prod is None or prod.op_type not in _SOFTMAX_SCALING or len(prod.inputs) != 2:
                    break
                a, b = prod.inputs
                if b is not None and _const_tensor(b):
                    nxt = a
                elif a is not None and _const_tensor(a):
                    nxt = b
                else:
                    break
                keep.add(prod)
                src = nxt
    return keep


def _infer_types(model: ir.Model) -> None:
    if all(o.dtype is not None for n in model.graph for o in n.outputs if o.name):
        return
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # best effort: values without a type are left alone
        pass


def _cast_ir(model: ir.Model, precision: str, keep_io_types: bool, keep_fp32_ops: Sequence[str],
             keep_nodes: Collection[str] = (), keep_values: Collection[str] = ()) -> dict:
    low = PRECISIONS[normalize_precision(precision)]
    graph = model.graph
    for node in graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise LrexportError(f"precision cast does not handle control flow (node {node.name!r}, {node.op_type})",
                                "build in fp32, or inline/unroll the If/Loop/Scan before casting")
    _infer_types(model)
    keep, requested = _keep_set(graph, frozenset(keep_fp32_ops), keep_nodes, keep_values)

    def region(node: ir.Node) -> str:
        if node.op_type in _SHAPE_ONLY:
            return "any"
        if node.op_type == "Constant" and node not in keep:
            # a constant lives in the region of its readers (eps = 1e-12 must not round to 0 in fp16)
            users = [u for out in node.outputs for u in out.consumers()]
            if users and any(u in keep for u in users):
                return "fp32"
        return "fp32" if node in keep else "low"

    # Record the original float values before any type changes.
    float_values: set[ir.Value] = set()
    for v in graph.inputs:
        if _is_float(v):
            float_values.add(v)
    for v in graph.initializers.values():
        if _is_float(v):
            float_values.add(v)
    for node in graph:
        for v in (*node.inputs, *node.outputs):
            if v is not None and _is_float(v):
                float_values.add(v)

    value_region: dict[ir.Value, str] = {}
    for v in graph.inputs:
        if v in float_values:
            value_region[v] = "fp32" if keep_io_types else "low"

    report: dict[str, Any] = {"precision": normalize_precision(precision), "keep_io_types": keep_io_types,
                              "tensors_cast": 0, "initializers_cast": 0, "constants_cast": 0,
                              "casts_inserted": 0, "kept_fp32_nodes": [], "kept_fp32_by_op": {},
                              "kept_on_request": sorted(n.name or f"<{n.op_type}>" for n in requested),
                              "compute_nodes": 0, "low_nodes": 0}
    if not keep_io_types:
        for v in graph.inputs:
            if v in float_values:
                v.dtype = low
                report["tensors_cast"] += 1

    cast_cache: dict[tuple[int, str], ir.Value] = {}
    low_inits: dict[int, ir.Value] = {}
    used_names = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
    used_names |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in used_names:
            name, i = f"{base}_{i}", i + 1
        used_names.add(name)
        return name

    def low_initializer(v: ir.Value) -> ir.Value:
        """The low-precision twin of a float32 initializer (in place when only low nodes read it)."""
        if id(v) in low_inits:
            return low_inits[id(v)]
        assert v.const_value is not None
        users = v.consumers()
        only_low = (not v.is_graph_output() and v not in graph.inputs
                    and all(region(u) == "low" and not _needs_fp32_input(u, v) for u in users))
        if only_low:
            v.const_value = _low_tensor(v.const_value, low)
            v.dtype = low
            out = v
        else:
            name = fresh(f"{v.name}_{report['precision']}")
            out = ir.Value(name=name, shape=v.shape, type=ir.TensorType(low),
                           const_value=_low_tensor(v.const_value, low, name))
            graph.register_initializer(out)
        report["initializers_cast"] += 1
        low_inits[id(v)] = out
        return out

    def cast_of(v: ir.Value, target: str, before: ir.Node) -> ir.Value:
        key = (id(v), target)
        if key not in cast_cache:
            to = low if target == "low" else _FLOAT
            suffix = report["precision"] if target == "low" else "fp32"
            cast = ir.Node("", "Cast", [v], [ir.AttrInt64("to", int(to))],
                           name=fresh(f"{v.name}_cast_{suffix}"), num_outputs=1)
            out = cast.outputs[0]
            out.name = fresh(f"{v.name}_{suffix}")
            out.dtype = to
            out.shape = v.shape
            graph.insert_before(before, cast)
            report["casts_inserted"] += 1
            cast_cache[key] = out
        return cast_cache[key]

    for node in list(graph):
        reg = region(node)
        if reg == "fp32" and node.op_type not in ("Constant",):
            report["kept_fp32_nodes"].append(node.name or f"<{node.op_type}>")
        if reg != "any" and node.op_type != "Constant" and any(o in float_values for o in node.outputs):
            report["compute_nodes"] += 1  # nodes computing a float value: the ones a precision applies to
            report["low_nodes"] += reg == "low"
        # Inputs: route each float input from the region it lives in.
        if reg != "any":
            for i, v in enumerate(node.inputs):
                if v is None or v not in float_values:
                    continue
                want = "fp32" if (reg == "fp32" or _needs_fp32_input(node, v, i)) else "low"
                if v.is_initializer() and not v.is_graph_input():
                    if want == "low":
                        node.replace_input_with(i, low_initializer(v))
                    continue
                have = value_region.get(v, "fp32")
                if have != want:
                    node.replace_input_with(i, cast_of(v, want, node))
        # Outputs and dtype-carrying attributes of low-precision nodes.
        if reg == "low":
            attr_name = _DTYPE_ATTR.get(node.op_type)
            if attr_name and attr_name in node.attributes and node.attributes[attr_name].value == int(_FLOAT):
                node.attributes[attr_name] = ir.AttrInt64(attr_name, int(low))
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].value
                if isinstance(tensor, ir.TensorProtocol) and tensor.dtype == _FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", _low_tensor(tensor, low))
                    report["constants_cast"] += 1
            for out in node.outputs:
                if out in float_values:
                    out.dtype = low
                    if out.const_value is not None and out.const_value.dtype == _FLOAT:
                        out.const_value = _low_tensor(out.const_value, low)
                    value_region[out] = "low"
                    report["tensors_cast"] += 1
        else:
            for out in node.outputs:
                if out in float_values:
                    value_region[out] = "fp32" if reg == "fp32" else value_region.get(node.inputs[0], "fp32")
                    if reg == "any":  # Shape/Size outputs are ints; not reached
                        pass

    # Graph outputs: keep float32 (or make them low when keep_io_types=False).
    for idx, out in enumerate(list(graph.outputs)):
        if out not in float_values:
            continue
        have = value_region.get(out, "fp32")
        want = "fp32" if keep_io_types else "low"
        if have == want or (out.const_value is not None and out.producer() is None):
            continue
        to = _FLOAT if want == "fp32" else low
        original_name = out.name
        out.name = fresh(f"{original_name}_{report['precision'] if have == 'low' else 'fp32'}")
        used_names.add(original_name)
        cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", int(to))], name=fresh(f"{original_name}_cast_out"),
                       num_outputs=1)
        new_out = cast.outputs[0]
        new_out.name = original_name
        new_out.dtype = to
        new_out.shape = out.shape
        graph.append(cast)
        graph.outputs[idx] = new_out
        report["casts_inserted"] += 1

    report["kept_fp32_by_op"] = dict(Counter(n.op_type for n in keep if n.op_type != "Constant"))
    report["low_fraction"] = report["low_nodes"] / report["compute_nodes"] if report["compute_nodes"] else 1.0
    return report


def fp32_node_names(model: onnx.ModelProto, keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS) -> set[str]:
    """Names of the nodes the structural rules keep in float32 (before any range-based keep-list): the
    range analysis needs them to know which values the cast would turn fp16/bf16."""
    ir_model = ir.from_proto(model)
    _infer_types(ir_model)
    return {n.name for n in _structural_keep_set(ir_model.graph, frozenset(keep_fp32_ops)) if n.name}


def _needs_fp32_input(node: ir.Node, value: ir.Value, index: int | None = None) -> bool:
    positions = _FP32_INPUTS.get(node.op_type)
    if not positions:
        return False
    idxs = [index] if index is not None else [i for i, v in enumerate(node.inputs) if v is value]
    return any(i in positions for i in idxs)


def _check_inline(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise LrexportError(f"initializer {init.name!r} is stored as external data that was not loaded",
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
    _check_inline(model)
    ir_model = ir.from_proto(model)
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
