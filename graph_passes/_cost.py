"""Parameter and FLOP counts of a model at one concrete input shape (onnx shape inference)."""

from __future__ import annotations

import numpy as np
import onnx

from graph_passes._util import expand_ellipsis, ort_session

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "CumSum", "ReduceSum", "Elu", "Relu", "Gelu", "Erf", "Tanh",
                "Sigmoid", "Softmax", "Exp", "Pow", "Sqrt", "LayerNormalization", "Reciprocal"}


def count_params(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                              onnx.TensorProto.DOUBLE):
            if init.name.startswith("lrexport_"):  # structural constants (masks), not parameters
                continue
            total += int(np.prod(init.dims)) if len(init.dims) else 1
    return total


def default_shapes(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]] | None = None) -> dict[str, tuple[int, ...]]:
    """Feed shapes if given, else symbolic dims set to 1 (first axis) and 128 (others)."""
    if feeds:  # the largest feed: FLOPs at n=1 say little
        big = max(feeds, key=lambda f: sum(v.size for v in f.values()))
        return {k: tuple(v.shape) for k, v in big.items()}
    shapes = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 128))
        shapes[inp.name] = tuple(dims)
    return shapes


def _shape(info: dict[str, list[int | None]], name: str) -> list[int] | None:
    s = info.get(name)
    if s is None or any(d is None for d in s):
        return None
    return s  # type: ignore[return-value]


def _shapes_by_running(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]] | None:
    """Every intermediate shape at the given input shapes: run ORT once with all node outputs exposed.

    (onnx shape inference cannot follow the Shape->Mod->Pad arithmetic of dynamic padding.)
    """
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in known:
                m.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    feeds = {}
    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = np.zeros(shapes[inp.name], dtype=elem)
    try:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort_session(m, so)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(None, feeds)
    except Exception:
        return None
    info = {n: list(np.shape(v)) for n, v in zip(names, values)}
    for k, v in shapes.items():
        info[k] = list(v)
    for init in model.graph.initializer:
        info[init.name] = list(init.dims)
    return info


def count_flops(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """2*MACs of MatMul/Gemm/Conv/Einsum plus one per output element of elementwise/scan ops.

    Returns None when the model cannot be run at those shapes.
    """
    return measure(model, shapes)[0]


def measure(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """(FLOPs, elements of the largest intermediate tensor) at the given input shapes."""
    info = _shapes_by_running(model, shapes)
    if info is None:
        return None, None
    inits = {i.name for i in model.graph.initializer}
    largest = max((int(np.prod(s)) for n, s in info.items() if n not in inits), default=0)
    return _flops(model, info), largest


def _flops(model: onnx.ModelProto, info: dict[str, list[int]]) -> int | None:
    total = 0
    for node in model.graph.node:
        op = node.op_type
        out = info.get(node.output[0]) if node.output else None
        if op in ("MatMul", "Gemm"):
            a = info.get(node.input[0])
            if out is None or a is None:
                return None
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if (op == "Gemm" and trans_a) else a[-1]
            total += 2 * int(np.prod(out)) * k
        elif op == "Conv":
            w = info.get(node.input[1])
            if out is None or w is None:
                return None
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif op == "Einsum":
            eq = next(at.s.decode() for at in node.attribute if at.name == "equation")
            eq = expand_ellipsis(eq, [len(info[i]) if i in info else None for i in node.input])
            if eq is None:
                return None
            lhs = eq.split("->")[0].split(",")
            sizes: dict[str, int] = {}
            for term, name in zip(lhs, node.input):
                s = info.get(name)
                if s is None or "." in term:
                    return None
                for c, d in zip(term, s):
                    sizes[c] = max(sizes.get(c, 1), d)
            total += 2 * int(np.prod(list(sizes.values())))
        elif op in _ELEMENTWISE and out is not None:
            total += int(np.prod(out))
    return total
