"""Lower ``lrexport.LinearAttention`` nodes to ONNX Runtime's native ``com.microsoft.LinearAttention``.

Why: ONNX Runtime (1.32+) ships a CPU kernel for the four recurrences (linear, gated, delta,
gated_delta; decay per head or per key dim; past/present state), 2-3x faster than the best chunked
graph in standard ops, so on that backend the export's one custom node becomes one native node.

What the rewrite adds around it, and why:
* the contrib op packs heads into the last dim, ``(B, T, H*D)``: a ``Reshape [0, 0, -1]`` per input and
  ``Reshape [0, 0, H, dv]`` on the output (zeros copy B and T, so the sequence stays dynamic);
* its k and v share one head count (the state heads): when k (or v) has fewer heads, each is repeated
  to serve consecutive state heads (``Unsqueeze`` + ``Expand`` + ``Reshape``, i.e. ``repeat_interleave``,
  the convention of the op and of transformers' Qwen3-Next); q with more heads (GQA) or fewer heads
  (one query head per group of value heads) maps natively;
* its CPU kernel is float32 only: other float types are cast to float32 around it (the state is float32);
* the normalizer (``normalize=1``) runs as the linear rule on ``[v, 1]`` and divides by the last column.

The default pipeline runs it through the ``linear-attention`` pass (``graph_passes/linear_attention.py``)
where ONNX Runtime alone runs the model (``lrexport build --backend onnxruntime``, ``--linear-attention``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes._base import GraphPass, Match, record
from graph_passes._util import node_label

DOMAIN = "lrexport"
OP_TYPE = "LinearAttention"
ORT_DOMAIN = "com.microsoft"
RULES = ("linear", "gated", "delta", "gated_delta")


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class _Builder:
    """Appends new nodes (named after the lowered node) to a list, in order."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs, attrs=None, domain: str = "", outputs: int = 1):
        node = ir.node(op_type, list(inputs), attrs or {}, domain=domain, num_outputs=outputs,
                       name=f"{self.label}/{op_type}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, value, dtype=np.int64) -> ir.Value:
        return self.op("Constant", [], {"value": ir.tensor(np.asarray(value, dtype=dtype))})

    def packed(self, x: ir.Value) -> ir.Value:
        return self.op("Reshape", [x, self.const([0, 0, -1])])

    def repeat_heads(self, x: ir.Value, heads: int, r: int) -> ir.Value:
        """(B,T,heads,d) -> (B,T,heads*r,d), each head repeated r times in place (``repeat_interleave``)."""
        if r == 1:
            return x
        u = self.op("Unsqueeze", [x, self.const([3])])
        e = self.op("Expand", [u, self.const([1, 1, 1, r, 1])])
        return self.op("Reshape", [e, self.const([0, 0, heads * r, -1])])

    def to_float(self, x: ir.Value | None) -> ir.Value | None:
        if x is None or x.dtype in (None, ir.DataType.FLOAT):
            return x
        return self.op("Cast", [x], {"to": ir.DataType.FLOAT})


def _refusal(node: ir.Node) -> str | None:
    rule = _attr(node, "rule")
    if rule not in RULES:
        return f"rule {rule!r} is not one of {RULES}"
    if _attr(node, "scale", 1.0) == 0.0:
        return "scale 0 means 1/sqrt(dk) to com.microsoft.LinearAttention"
    if any(_attr(node, a) is None for a in ("q_heads", "k_heads", "v_heads")):
        return "the node carries no head layout (q_heads/k_heads/v_heads)"
    q, v = node.inputs[0], node.inputs[2]
    if q is None or v is None or q.shape is None or v.shape is None or len(q.shape) != 4 \
            or not isinstance(q.shape[3], int) or not isinstance(v.shape[3], int):
        return "the head dims of q and v are not static"
    return None


Lowered = tuple[list[ir.Node], list[ir.Value], str, dict]  # nodes, outputs, action, info


class LinearAttentionLowering(GraphPass):
    """Every ``lrexport.LinearAttention`` node of the main graph lowered by :meth:`lower`, one record each:
    the lowering's action, or the reason the node is left (a string from :meth:`lower`)."""

    extra_opsets: dict[str, int] = {}

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        raise NotImplementedError

    def run(self, model: ir.Model) -> bool:
        changed = False
        for node in list(model.graph):
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            label = node_label(node)
            lowered = self.lower(node, label)
            if isinstance(lowered, str):
                record(Match("linear-attention", "left", [label], reason=lowered, matched=False))
                continue
            new_nodes, outs, action, info = lowered
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], new_nodes, list(node.outputs), outs)
            changed = True
            record(Match("linear-attention", action, [label], rewritten=True, info=info))
        if changed:
            for domain, version in self.extra_opsets.items():
                model.opset_imports.setdefault(domain, version)
            if not any(n.domain == DOMAIN for n in model.graph.all_nodes()):
                model.opset_imports.pop(DOMAIN, None)
        return changed


class LinearAttentionOrtPass(LinearAttentionLowering):
    """Rewrite every ``lrexport.LinearAttention`` node of the main graph to ``com.microsoft.LinearAttention``."""

    name = "linear-attention-ort"
    extra_opsets = {ORT_DOMAIN: 1}

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        reason = _refusal(node)
        if reason is not None:
            return reason
        new_nodes, outs = _lower(node, label)
        return new_nodes, outs, f"lowered ({ORT_DOMAIN}.LinearAttention)", {
            "rule": _attr(node, "rule"), "decay": _attr(node, "decay", "none"),
            "normalize": bool(_attr(node, "normalize", 0))}


def _lower(node: ir.Node, label: str) -> tuple[list[ir.Node], list[ir.Value]]:
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, g, beta, s0 = inputs
    rule = _attr(node, "rule")
    hq, hk, hv = (int(_attr(node, a)) for a in ("q_heads", "k_heads", "v_heads"))
    hs = max(hk, hv)
    h_out = max(hq, hs)
    normalize = bool(_attr(node, "normalize", 0))
    eps = float(_attr(node, "eps", 0.0))
    dv = int(v.shape[3]) + (1 if normalize else 0)
    out_dtype = q.dtype
    b = _Builder(label)
    q, k, v, g, beta = (b.to_float(x) for x in (q, k, v, g, beta))
    k = b.repeat_heads(k, hk, hs // hk)
    v = b.repeat_heads(v, hv, hs // hv)
    if normalize:  # ones column: the state's last column accumulates z = sum k
        shape = b.op("Shape", [v], {"start": 0, "end": 3})
        ones_shape = b.op("Concat", [shape, b.const([1])], {"axis": 0})
        ones = b.op("ConstantOfShape", [ones_shape], {"value": ir.tensor(np.ones(1, np.float32))})
        v = b.op("Concat", [v, ones], {"axis": -1})
    g_packed = None if g is None else (b.packed(g) if g.shape is not None and len(g.shape) == 4 else g)
    ins = [b.packed(q), b.packed(k), b.packed(v), s0, g_packed, beta]
    while ins and ins[-1] is None:
        ins.pop()
    out, state = b.op("LinearAttention", ins,
                      {"q_num_heads": hq, "kv_num_heads": hs, "update_rule": rule,
                       "scale": float(_attr(node, "scale", 1.0))}, domain=ORT_DOMAIN, outputs=2)
    out = b.op("Reshape", [out, b.const([0, 0, h_out, dv])])
    if normalize:
        num, den = b.op("Split", [out, b.const([dv - 1, 1])], {"axis": 3}, outputs=2)
        if eps:
            den = b.op("Add", [den, b.const(np.float32(eps), np.float32)])
        out = b.op("Div", [num, den])
    if out_dtype is not None and out_dtype != ir.DataType.FLOAT:
        out = b.op("Cast", [out], {"to": out_dtype})
    return b.nodes, [out, state]
