"""Lower ``lrexport.LinearAttention`` nodes with a scalar (per-head) decay or none to standard ONNX ops,
loop-free: for runtimes without ``com.microsoft.LinearAttention`` (TensorRT's parser stops at opset 25).

The form (chunks of ``C`` positions; ``b`` the cumulative log decay inside a chunk, ``L_n`` the total
log decay before chunk ``n``):

* intra-chunk: ``(q k^T ⊙ exp(b_i - b_j)) v`` over ``j <= i``;
* inter-chunk, with no loop and no Scan: the state at the start of every chunk (and the final state)
  at once, ``S_n = exp(L_n) S_0 + sum_{m<n} exp(L_n - L_{m+1}) ΔS_m`` with ``ΔS_m`` chunk m's own
  contribution: an ``(nc+1) x nc`` decay matrix times the stacked ``ΔS``, memory linear in T.

Every exponent is masked to -inf before ``Exp`` where it does not apply, and is <= 0 where it does
(log decay <= 0), so no inf/NaN. One ``CumSum`` axis only (inside the chunk): ``L`` is a MatMul with a
``p < n`` mask, as TensorRT miscomputes several CumSums on different axes. ``L`` is a prefix sum in
float32: with very strong decays over very long sequences the difference ``L_n - L_{m+1}`` loses
absolute precision ~1e-7 |L| (the delta rules and per-key decay are not lowered here: they need the UT
transform and sub-chunking).

Not in the default pass list yet.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes._base import GraphPass, Match, record
from graph_passes._util import node_label
from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE, _attr, _Builder

PORTABLE_RULES = ("linear", "gated")


def _refusal(node: ir.Node) -> str | None:
    rule = _attr(node, "rule")
    if rule not in PORTABLE_RULES:
        return f"rule {rule!r}: only {PORTABLE_RULES} have a portable lowering yet"
    if _attr(node, "decay", "none") == "key":
        return "per-key decay has no portable lowering yet"
    if any(_attr(node, a) is None for a in ("q_heads", "k_heads", "v_heads")):
        return "the node carries no head layout (q_heads/k_heads/v_heads)"
    v = node.inputs[2]
    if v is None or v.shape is None or len(v.shape) != 4 or not isinstance(v.shape[3], int):
        return "the head dim of v is not static"
    return None


class LinearAttentionPortablePass(GraphPass):
    """Rewrite ``lrexport.LinearAttention`` (rules linear / gated with a per-head decay) to standard ops."""

    name = "linear-attention-portable"
    min_opset = 18  # Pad with an axes-free pads input, ReduceSum-free; Where, Range, Less, Trilu-free

    def run(self, model: ir.Model) -> bool:
        changed = False
        for node in list(model.graph):
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            label = node_label(node)
            reason = _refusal(node)
            if reason is not None:
                record(Match("linear-attention", "left", [label], reason=reason, matched=False))
                continue
            new_nodes, outs = _lower(node, label, self.options.chunk_size)
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], new_nodes, list(node.outputs), outs)
            changed = True
            record(Match("linear-attention", "lowered (standard ops, chunked)", [label], rewritten=True,
                         info={"rule": _attr(node, "rule"), "chunk": self.options.chunk_size}))
        if changed and not any(n.domain == DOMAIN for n in model.graph.all_nodes()):
            model.opset_imports.pop(DOMAIN, None)
        return changed


def _lower(node: ir.Node, label: str, C: int) -> tuple[list[ir.Node], list[ir.Value]]:
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, g, _beta, s0 = inputs
    hq, hk, hv = (int(_attr(node, a)) for a in ("q_heads", "k_heads", "v_heads"))
    hs = max(hk, hv)
    h = max(hq, hs)
    normalize = bool(_attr(node, "normalize", 0))
    eps = float(_attr(node, "eps", 0.0))
    scale = float(_attr(node, "scale", 1.0))
    out_dtype = q.dtype
    f32 = ir.DataType.FLOAT
    b = _Builder(label)
    c = b.const
    q, k, v, g = (b.to_float(x) for x in (q, k, v, g))
    # every tensor on h heads (a state head serving r query heads is computed r times, then picked once)
    q, k, v = b.repeat_heads(q, hq, h // hq), b.repeat_heads(k, hk, h // hk), b.repeat_heads(v, hv, h // hv)
    if g is not None:
        g = b.op("Squeeze", [b.repeat_heads(b.op("Unsqueeze", [g, c([3])]), hs, h // hs), c([3])])
    if s0 is not None and h != hs:
        s0 = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [s0, c([2])]), c([1, 1, h // hs, 1, 1])]),
                              c([0, h, -1, int(node.inputs[2].shape[3]) + int(normalize)])])
    if normalize:
        shape = b.op("Shape", [v], {"start": 0, "end": 3})
        ones = b.op("ConstantOfShape", [b.op("Concat", [shape, c([1])], {"axis": 0})],
                    {"value": ir.tensor(np.ones(1, np.float32))})
        v = b.op("Concat", [v, ones], {"axis": -1})
    dv = int(node.inputs[2].shape[3]) + (1 if normalize else 0)

    # pad T up to nc * C (zeros: k = 0 adds nothing, g = 0 decays nothing)
    t = b.op("Shape", [q], {"start": 1, "end": 2})
    pad = b.op("Mod", [b.op("Sub", [c([C]), b.op("Mod", [t, c([C])])]), c([C])])
    nc = b.op("Div", [b.op("Add", [t, pad]), c([C])])

    def chunks(x: ir.Value, rank: int) -> ir.Value:  # (B,T,H[,d]) -> (B,H,nc,C[,d])
        pads = b.op("Concat", [c([0] * (rank + 1)), pad, c([0] * (rank - 2))], {"axis": 0})
        x = b.op("Pad", [x, pads])
        x = b.op("Reshape", [x, b.op("Concat", [c([0]), nc, c([C, h] + ([-1] if rank == 4 else []))], {"axis": 0})])
        return b.op("Transpose", [x], {"perm": [0, 3, 1, 2, 4] if rank == 4 else [0, 3, 1, 2]})

    Q, K, V = chunks(q, 4), chunks(k, 4), chunks(v, 4)  # (B,h,nc,C,d)
    neg_inf = c(np.float32(-np.inf), np.float32)
    idx_c = b.op("Range", [c(0), c(C), c(1)])
    incl = b.op("LessOrEqual", [b.op("Unsqueeze", [idx_c, c([0])]), b.op("Unsqueeze", [idx_c, c([1])])])  # j<=i
    qk = b.op("MatMul", [Q, b.op("Transpose", [K], {"perm": [0, 1, 2, 4, 3]})])  # (B,h,nc,C,C)
    if g is not None:
        bcum = b.op("CumSum", [chunks(g, 3), c(3)])  # (B,h,nc,C): the one CumSum, along the chunk
        diff = b.op("Sub", [b.op("Unsqueeze", [bcum, c([4])]), b.op("Unsqueeze", [bcum, c([3])])])
        qk = b.op("Mul", [qk, b.op("Exp", [b.op("Where", [incl, diff, neg_inf])])])
        blast = b.op("Slice", [bcum, c([C - 1]), c([C]), c([3])])  # (B,h,nc,1): chunk totals
        Qd = b.op("Mul", [Q, b.op("Exp", [b.op("Unsqueeze", [bcum, c([4])])])])
        Kd = b.op("Mul", [K, b.op("Exp", [b.op("Unsqueeze", [b.op("Sub", [blast, bcum]), c([4])])])])
    else:
        qk = b.op("Where", [incl, qk, c(np.float32(0), np.float32)])
        Qd, Kd = Q, K
    o = b.op("MatMul", [qk, V])  # intra-chunk, (B,h,nc,C,dv)
    dS = b.op("MatMul", [b.op("Transpose", [Kd], {"perm": [0, 1, 2, 4, 3]}), V])  # (B,h,nc,dk,dv)
    dS_flat = b.op("Reshape", [dS, c([0, 0, 0, -1])])  # (B,h,nc,dk*dv)
    # chunk-start states for n = 0..nc (row nc: the final state)
    idx_n = b.op("Range", [c(0), b.op("Add", [b.op("Squeeze", [nc, c([0])]), c(1)]), c(1)])  # nc+1
    idx_m = b.op("Range", [c(0), b.op("Squeeze", [nc, c([0])]), c(1)])  # nc
    before = b.op("Less", [b.op("Unsqueeze", [idx_m, c([1])]), b.op("Unsqueeze", [idx_n, c([0])])])  # m < n
    if g is not None:
        totals = b.op("Squeeze", [blast, c([3])])  # (B,h,nc)
        L = b.op("MatMul", [b.op("Unsqueeze", [totals, c([2])]), b.op("Cast", [before], {"to": f32})])
        L = b.op("Squeeze", [L, c([2])])  # (B,h,nc+1): log decay before chunk n
        L_next = b.op("Slice", [L, c([1]), c([2**62]), c([2])])  # L_{m+1}, (B,h,nc)
        expo = b.op("Sub", [b.op("Unsqueeze", [L, c([3])]), b.op("Unsqueeze", [L_next, c([2])])])
        M = b.op("Exp", [b.op("Where", [b.op("Transpose", [before], {"perm": [1, 0]}), expo, neg_inf])])
    else:
        M = b.op("Cast", [b.op("Transpose", [before], {"perm": [1, 0]})], {"to": f32})  # (nc+1, nc)
    S_all = b.op("MatMul", [M, dS_flat])  # (B,h,nc+1,dk*dv)
    S_all = b.op("Reshape", [S_all, b.op("Concat", [c([0, 0]), b.op("Add", [nc, c([1])]), c([-1, dv])],
                                         {"axis": 0})])  # (B,h,nc+1,dk,dv)
    if s0 is not None:
        S0 = b.op("Unsqueeze", [s0, c([2])])
        if g is not None:
            S0 = b.op("Mul", [S0, b.op("Exp", [b.op("Unsqueeze", [L, c([3, 4])])])])
        S_all = b.op("Add", [S_all, S0])
    S_start = b.op("Slice", [S_all, c([0]), nc, c([2])])
    o = b.op("Add", [o, b.op("MatMul", [Qd, S_start])])  # inter-chunk
    o = b.op("Mul", [o, c(np.float32(scale), np.float32)])
    o = b.op("Transpose", [o], {"perm": [0, 2, 3, 1, 4]})  # (B,nc,C,h,dv)
    o = b.op("Reshape", [o, c([0, -1, h, dv])])
    o = b.op("Slice", [o, c([0]), t, c([1])])
    if normalize:
        num, den = b.op("Split", [o, c([dv - 1, 1])], {"axis": 3}, outputs=2)
        if eps:
            den = b.op("Add", [den, c(np.float32(eps), np.float32)])
        o = b.op("Div", [num, den])
    if out_dtype is not None and out_dtype != f32:
        o = b.op("Cast", [o], {"to": out_dtype})
    final = b.op("Squeeze", [b.op("Slice", [S_all, nc, b.op("Add", [nc, c([1])]), c([2])]), c([2])])
    if h != hs:  # state head s was computed for its r query heads: take one
        final = b.op("Slice", [final, c([0]), c([h]), c([1]), c([h // hs])])
    return b.nodes, [o, final]
