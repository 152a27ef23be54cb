"""Parameter and FLOP counts, and the memory one run needs, of a model at one concrete input shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes._util import expand_ellipsis, quiet_libraries
from graph_passes.ort_session import ort_session, session_options

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "CumSum", "ReduceSum", "Elu", "Relu", "Gelu", "Erf", "Tanh",
                "Sigmoid", "Softmax", "Exp", "Pow", "Sqrt", "LayerNormalization", "Reciprocal"}


def _ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    return model if isinstance(model, ir.Model) else ir.from_proto(model)


def count_params(model: onnx.ModelProto | ir.Model) -> int:
    """Elements of the floating-point initializers, less lrexport's structural constants (masks)."""
    total = 0
    for name, v in _ir(model).graph.initializers.items():
        if v.dtype is not None and v.dtype.is_floating_point() and not name.startswith("lrexport_"):
            shape = v.const_value.shape if v.const_value is not None else v.shape  # the tensor's, never symbolic
            total += int(np.prod([d if isinstance(d, int) else 0 for d in (shape or ())], dtype=np.int64))
    return total


def default_shapes(model: onnx.ModelProto | ir.Model,
                   feeds: list[dict[str, np.ndarray]] | None = None) -> dict[str, tuple[int, ...]]:
    """Feed shapes if given, else symbolic dims set to 1 (first axis) and 128 (others)."""
    if feeds:  # the largest feed: FLOPs at n=1 say little
        big = max(feeds, key=lambda f: sum(v.size for v in f.values()))
        return {k: tuple(v.shape) for k, v in big.items()}
    graph = _ir(model).graph
    return {v.name or "": tuple(d if isinstance(d, int) else (1 if i == 0 else 128)
                                for i, d in enumerate(v.shape or ()))
            for v in graph.inputs if v.name not in graph.initializers}


def _shapes_by_running(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                       base_dir: str | Path | None = None) -> dict[str, list[int]] | None:
    """Every intermediate shape at the given input shapes: run ORT once with all node outputs exposed.

    (onnx shape inference cannot follow the Shape->Mod->Pad arithmetic of dynamic padding.)
    """
    m = ir.from_proto(model)
    graph = m.graph
    exposed = set(graph.outputs)
    for node in graph:
        for out in node.outputs:
            if out.name and out not in exposed:
                graph.outputs.append(out)
                exposed.add(out)
    feeds = {v.name: np.zeros(shapes[v.name], dtype=v.dtype.numpy() if v.dtype is not None else np.float32)
             for v in graph.inputs if v.name in shapes}
    try:
        sess = ort_session(ir.to_proto(m), session_options(optimize=False), base_dir=base_dir)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(None, feeds)
    except Exception:
        return None
    info = {n: list(np.shape(v)) for n, v in zip(names, values)}
    for k, shape in shapes.items():
        info[k] = list(shape)
    for name, v in graph.initializers.items():  # the tensor's shape: a value's may carry a symbolic dim
        info[name] = [int(d) for d in (v.const_value.shape if v.const_value is not None else v.shape or ())]
    return info


def bind_shapes(model: onnx.ModelProto | str | Path, shapes: dict[str, tuple[int, ...]],
                base_dir: str | Path | None = None) -> tuple[ir.Model, dict[str, ir.Value]] | None:
    """An onnx-ir copy of ``model`` with the input dims bound to ``shapes`` and every value's shape inferred,
    without running it (a path loads lazily: external weights stay on disk), plus every value of the
    original graph by name (those folded into constants keep their inferred shape). ``base_dir``: where
    the external weights of a ``model`` loaded without them lie.

    onnxscript's constant folding, with ONNX shape inference per node, evaluates the shape arithmetic, so
    dynamic padding (Shape->Mod->Pad) resolves too, where plain ``onnx.shape_inference`` stops.
    None when the model cannot be loaded or folded.
    """
    from onnxscript.optimizer import fold_constants

    try:
        m = ir.load(str(model)) if isinstance(model, (str, Path)) else ir.serde.deserialize_model(model)
        if base_dir is not None:
            ir.external_data.set_base_dir(m.graph, base_dir)
        values: dict[str, ir.Value] = {v.name: v for v in [*m.graph.inputs, *m.graph.initializers.values()]
                                       if v.name}
        for v in m.graph.inputs:
            if v.name in shapes:
                v.shape = ir.Shape(list(shapes[v.name]))
        for node in m.graph:  # forget the exporter's symbolic shapes: they would win the merge
            for out in node.outputs:
                out.shape = None
                if out.name:
                    values[out.name] = out
        with quiet_libraries():
            fold_constants(m, onnx_shape_inference=True)
    except Exception:  # best effort: a model the folder cannot handle is simply not estimated
        return None
    return m, values


# ONNX Runtime hands back a view of the input for these (no new buffer); every other op allocates.
_ALIASING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def _ort_scratch(op: str, out: int, ins: list[int]) -> int:
    """Temporary bytes an ONNX Runtime CPU kernel takes while it runs, beyond its output (measured with
    peak RSS on single-node models, ORT 1.32): Einsum permutes operands and result through copies, up to
    twice its output plus its largest input (bhnd,bhne->bhnde: 3.0x the output; bhnd,bhnde->bhne: 1.06x
    the larger input). Others measured (CumSum, MatMul, elementwise) need none worth counting."""
    if op == "Einsum":
        return 2 * out + max(ins, default=0)
    return 0


@dataclass
class MemoryEstimate:
    """Bytes one run of a model needs at one input shape, on top of its weights.

    ``peak``: the largest sum of live tensors over a walk of the nodes in graph order: a tensor is live
    from the node that makes it to its last reader (inputs and outputs for the whole run; an aliasing op
    such as Reshape shares its input's buffer), and a node's inputs and outputs are live together, plus
    the kernel's scratch space with ``ort_scratch``. ONNX Runtime's memory planner (in its arena) and
    PyTorch's eager frees both come close to this (measured: benchmarks/bench_memory_estimate.py).
    ``largest``: the largest single intermediate. ``all_values``: every intermediate at once (a run that
    exposes all of them, as drift localization does). ``unknown``: values of unknown shape (counted as 0).
    ``outputs``: each graph output's shape (None where unknown); ``output_bytes``: their total size.
    """

    peak: int
    largest: int
    all_values: int
    unknown: int
    outputs: dict[str, tuple[int, ...] | None]
    output_bytes: int


def _nbytes(value: ir.Value, float_bytes: float | None) -> int | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    item = value.dtype.itemsize if value.dtype is not None else 4.0
    if float_bytes is not None and value.dtype is not None and value.dtype.is_floating_point():
        item = float_bytes
    return int(np.prod(tuple(value.shape), dtype=np.int64) * item)


def estimate_memory(model: onnx.ModelProto | str | Path, shapes: dict[str, tuple[int, ...]], *,
                    float_bytes: float | None = None, ort_scratch: bool = False,
                    base_dir: str | Path | None = None) -> MemoryEstimate | None:
    """The :class:`MemoryEstimate` of ``model`` at input ``shapes``. ``float_bytes=8`` prices every float
    tensor as float64 (a PyTorch reference run in double of a float32 graph); ``ort_scratch`` adds ONNX
    Runtime's kernel scratch space. None when the shapes cannot be inferred."""
    bound = bind_shapes(model, shapes, base_dir)
    if bound is None:
        return None
    graph = bound[0].graph
    nodes = list(graph)
    end = len(nodes)
    buffer: dict[ir.Value, ir.Value] = {}  # value -> the value whose buffer it uses
    size: dict[ir.Value, int] = {}
    last: dict[ir.Value, int] = {}  # buffer -> index of the node after which it is freed
    unknown = 0
    for v in graph.inputs:
        if v.const_value is None:
            buffer[v] = v
            size[v] = _nbytes(v, float_bytes) or 0
            last[v] = end
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None and v in buffer:
                last[buffer[v]] = max(last[buffer[v]], i)
        for k, out in enumerate(node.outputs):
            src = node.inputs[0] if node.inputs else None
            if node.op_type in _ALIASING and node.domain in ("", "ai.onnx") and k == 0 and src in buffer:
                buffer[out] = buffer[src]
                continue
            buffer[out] = out
            nb = _nbytes(out, float_bytes)
            unknown += nb is None
            size[out] = nb or 0
            last[out] = i
    for v in graph.outputs:
        if v in buffer:
            last[buffer[v]] = end
    freed: dict[int, int] = {}
    for b, i in last.items():
        freed[i] = freed.get(i, 0) + size[b]
    live = peak = sum(size[v] for v in graph.inputs if v in size)
    for i, node in enumerate(nodes):
        made = sum(size[o] for o in node.outputs if buffer.get(o) is o)
        live += made
        scratch = _ort_scratch(node.op_type, made, [size.get(buffer[v], 0) for v in node.inputs
                                                    if v is not None and v in buffer]) if ort_scratch else 0
        peak = max(peak, live + scratch)
        live -= freed.get(i, 0)
    inputs = set(graph.inputs)
    inter = [n for b, n in size.items() if b not in inputs]
    outs = {v.name or "": (tuple(v.shape) if v.shape is not None and all(isinstance(d, int) for d in v.shape)
                           else None) for v in graph.outputs}
    return MemoryEstimate(peak=int(peak), largest=max(inter, default=0), all_values=int(sum(inter)),
                          unknown=unknown, outputs=outs,
                          output_bytes=sum(_nbytes(v, float_bytes) or 0 for v in graph.outputs))


def _shapes_by_inference(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                         base_dir: str | Path | None = None) -> dict[str, list[int]] | None:
    """Every value's shape at the given input shapes without running (None if any stays unknown)."""
    bound = bind_shapes(model, shapes, base_dir)
    if bound is None:
        return None
    info: dict[str, list[int]] = {}
    for name, v in bound[1].items():
        if v.shape is None or not all(isinstance(d, int) for d in v.shape):
            return None
        info[name] = list(v.shape)
    return info


def measure(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
            base_dir: str | Path | None = None) -> tuple[int | None, int | None]:
    """(FLOPs, elements of the largest intermediate tensor) at the given input shapes: from inferred shapes,
    else from one ORT run exposing every value (memory: all intermediates at once).

    FLOPs: 2*MACs of MatMul/Gemm/Conv/Einsum plus one per output element of elementwise/scan ops."""
    info = _shapes_by_inference(model, shapes, base_dir) or _shapes_by_running(model, shapes, base_dir)
    if info is None:
        return None, None
    graph = ir.from_proto(model).graph
    largest = max((int(np.prod(s)) for n, s in info.items() if n not in graph.initializers), default=0)
    return _flops(graph, info), largest


def _flops(graph: ir.Graph, info: dict[str, list[int]]) -> int | None:
    total = 0
    for node in graph:
        known = [info.get(v.name) if v is not None and v.name else None for v in node.inputs]
        out = info.get(node.outputs[0].name or "") if node.outputs else None
        flops = _node_flops(node, known, out)
        if flops is None:
            return None
        total += flops
    return total


def _node_flops(node: ir.Node, ins: list[list[int] | None], out: list[int] | None) -> int | None:
    """FLOPs of one node from its input and output shapes; None where a shape it needs is unknown."""
    op = node.op_type
    if op in ("MatMul", "Gemm"):
        if out is None or ins[0] is None:
            return None
        k = ins[0][0] if (op == "Gemm" and node.attributes.get_int("transA", 0)) else ins[0][-1]
        return 2 * int(np.prod(out)) * k
    if op == "Conv":
        if out is None or len(ins) < 2 or ins[1] is None:
            return None
        return 2 * int(np.prod(out)) * int(np.prod(ins[1][1:]))
    if op == "Einsum":
        eq = expand_ellipsis(node.attributes.get_string("equation", ""), [None if s is None else len(s) for s in ins])
        if eq is None:
            return None
        sizes: dict[str, int] = {}
        for term, s in zip(eq.split("->")[0].split(","), ins):
            if s is None or "." in term:
                return None
            for c, d in zip(term, s):
                sizes[c] = max(sizes.get(c, 1), d)
        return 2 * int(np.prod(list(sizes.values())))
    return int(np.prod(out)) if op in _ELEMENTWISE and out is not None else 0
