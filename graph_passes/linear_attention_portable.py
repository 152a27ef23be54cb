"""Lower ``lrexport.LinearAttention`` nodes to standard ONNX ops (opset <= 25, one ``CumSum`` axis): for
runtimes without ``com.microsoft.LinearAttention`` (TensorRT's parser stops at opset 25).

Rules ``linear`` / ``gated`` with a per-head decay or none, loop-free (chunks of ``C`` positions; ``b``
the cumulative log decay inside a chunk, ``L_n`` the total log decay before chunk ``n``):

* intra-chunk: ``(q k^T ⊙ exp(b_i - b_j)) v`` over ``j <= i``;
* inter-chunk, with no loop and no Scan: the state at the start of every chunk (and the final state)
  at once, ``S_n = exp(L_n) S_0 + sum_{m<n} exp(L_n - L_{m+1}) ΔS_m`` with ``ΔS_m`` chunk m's own
  contribution: an ``(nc+1) x nc`` decay matrix times the stacked ``ΔS``, memory linear in T.

Rules ``delta`` / ``gated_delta`` and a per-key decay (``_lower_scan``, chunks of 16): everything inside a
chunk is batched over all chunks, and only the (dk x dv) state crosses chunks, in one ``Scan`` over the
chunk axis (trip count ``ceil(T/C)``, dynamic). The delta rules' UT transform ``(I + diag(beta) KK)^-1``
(``KK`` strictly lower triangular) is ``prod_{k<log2 C} (I + N^(2^k))`` with ``N = -diag(beta) KK``
nilpotent: matmuls, no loop over positions and no triangular solve. A per-key decay's products
``sum_d a_id k_jd exp(b_id - b_jd)`` are built fla-style by sub-chunks of 4 (explicit ``[4, 4, dk]`` inside
a sub-chunk, a matmul against keys re-based at the sub-chunk start across them), never ``[C, C, dk]``.
TensorRT generally takes Scan-free graphs better than Scan; the Scan is the price of the delta rules'
state-dependent update (the per-key gated rule could use the loop-free decay-matrix form instead).

Every exponent is masked to -inf before ``Exp`` where it does not apply, and is <= 0 where it does
(log decay <= 0), so no inf/NaN. One ``CumSum`` axis only (inside the chunk): ``L`` is a MatMul with a
``p < n`` mask, as TensorRT miscomputes several CumSums on different axes. ``L`` is a prefix sum in
float32: with very strong decays over very long sequences the difference ``L_n - L_{m+1}`` loses
absolute precision ~1e-7 |L|.

Not in the default pass list yet.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.linear_attention_ort import LinearAttentionLowering, Lowered, _attr, _Builder

PORTABLE_RULES = ("linear", "gated", "delta", "gated_delta")
# the Scan forms' chunk: per-key decay builds [C/4, C, dk] re-based keys per chunk (a small C bounds them), and
# the delta rules' product-form inverse loses float32 precision as C grows (delta rule, unit keys of dk = 4,
# max error vs float64: 3.5e-7 at C = 16, 1.7e-6 at C = 32, 1.7e-4 at C = 64)
SCAN_CHUNK = 16
SUB_CHUNK = 4  # per-key decay: pairs inside a sub-chunk of 4 are the only [., ., dk] products built


def _refusal(node: ir.Node) -> str | None:
    rule = _attr(node, "rule")
    if rule not in PORTABLE_RULES:
        return f"rule {rule!r} is not one of {PORTABLE_RULES}"
    if any(_attr(node, a) is None for a in ("q_heads", "k_heads", "v_heads")):
        return "the node carries no head layout (q_heads/k_heads/v_heads)"
    v = node.inputs[2]
    if v is None or v.shape is None or len(v.shape) != 4 or not isinstance(v.shape[3], int):
        return "the head dim of v is not static"
    return None


def _needs_scan(node: ir.Node) -> bool:
    """The delta rules and a per-key decay carry the state chunk to chunk in a ``Scan``."""
    return _attr(node, "rule") in ("delta", "gated_delta") or _attr(node, "decay", "none") == "key"


class LinearAttentionPortablePass(LinearAttentionLowering):
    """Rewrite ``lrexport.LinearAttention`` (every rule) to standard ops."""

    name = "linear-attention-portable"
    min_opset = 18  # Pad with an axes-free pads input, ReduceSum-free; Where, Range, Less, Trilu-free

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        reason = _refusal(node)
        if reason is not None:
            return reason
        scan = _needs_scan(node)
        chunk = self.options.chunk_size
        if scan:
            chunk = min(chunk, SCAN_CHUNK)
            if chunk & (chunk - 1):
                return f"chunk size {chunk} is not a power of 2 (the UT inverse needs one)"
            new_nodes, outs = _lower_scan(node, label, chunk)
        else:
            new_nodes, outs = _lower(node, label, chunk)
        action = "lowered (standard ops, chunked" + (", Scan over chunks)" if scan else ")")
        return new_nodes, outs, action, {"rule": _attr(node, "rule"), "chunk": chunk}


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


def _lower_scan(node: ir.Node, label: str, C: int) -> tuple[list[ir.Node], list[ir.Value]]:
    """Delta rules (UT transform, loop-free inside a chunk) and per-key decay; the state crosses chunks
    in a ``Scan`` over the chunk axis (its trip count follows T)."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, g, beta, s0 = inputs
    rule = _attr(node, "rule")
    delta = rule in ("delta", "gated_delta")
    per_key = _attr(node, "decay", "none") == "key"
    hq, hk, hv = (int(_attr(node, a)) for a in ("q_heads", "k_heads", "v_heads"))
    hs = max(hk, hv)
    h = max(hq, hs)
    scale = float(_attr(node, "scale", 1.0))
    dv = int(node.inputs[2].shape[3])
    out_dtype = q.dtype
    f32 = ir.DataType.FLOAT
    b = _Builder(label)
    c = b.const
    q, k, v, g, beta = (b.to_float(x) for x in (q, k, v, g, beta))
    q, k, v = b.repeat_heads(q, hq, h // hq), b.repeat_heads(k, hk, h // hk), b.repeat_heads(v, hv, h // hv)

    def per_head_to_h(x: ir.Value) -> ir.Value:  # (B,T,hs) -> (B,T,h)
        return b.op("Squeeze", [b.repeat_heads(b.op("Unsqueeze", [x, c([3])]), hs, h // hs), c([3])])

    if g is not None:
        g = b.repeat_heads(g, hs, h // hs) if per_key else per_head_to_h(g)
    if beta is not None:
        beta = per_head_to_h(beta)
    if s0 is not None and h != hs:
        s0 = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [s0, c([2])]), c([1, 1, h // hs, 1, 1])]),
                              c([0, h, -1, dv])])
    if s0 is None:  # zeros (B, h, dk, dv)
        shp = b.op("Concat", [b.op("Shape", [q], {"start": 0, "end": 1}), c([h]),
                              b.op("Shape", [q], {"start": 3, "end": 4}), c([dv])], {"axis": 0})
        s0 = b.op("ConstantOfShape", [shp], {"value": ir.tensor(np.zeros(1, np.float32))})
    elif s0.dtype not in (None, f32):
        s0 = b.op("Cast", [s0], {"to": f32})

    t = b.op("Shape", [q], {"start": 1, "end": 2})
    pad = b.op("Mod", [b.op("Sub", [c([C]), b.op("Mod", [t, c([C])])]), c([C])])
    nc = b.op("Div", [b.op("Add", [t, pad]), c([C])])

    def chunks(x: ir.Value, rank: int) -> ir.Value:  # (B,T,H[,d]) -> (B,H,nc,C[,d]), zero padded
        pads = b.op("Concat", [c([0] * (rank + 1)), pad, c([0] * (rank - 2))], {"axis": 0})
        x = b.op("Pad", [x, pads])
        x = b.op("Reshape", [x, b.op("Concat", [c([0]), nc, c([C, h] + ([-1] if rank == 4 else []))], {"axis": 0})])
        return b.op("Transpose", [x], {"perm": [0, 3, 1, 2, 4] if rank == 4 else [0, 3, 1, 2]})

    def tr(x: ir.Value) -> ir.Value:  # swap the last two axes of a rank-5 tensor
        return b.op("Transpose", [x], {"perm": [0, 1, 2, 4, 3]})

    Q, K, V = chunks(q, 4), chunks(k, 4), chunks(v, 4)  # (B,h,nc,C,d)
    neg_inf = c(np.float32(-np.inf), np.float32)
    zero = c(np.float32(0), np.float32)
    idx_c = b.op("Range", [c(0), c(C), c(1)])
    row, col = b.op("Unsqueeze", [idx_c, c([1])]), b.op("Unsqueeze", [idx_c, c([0])])
    incl = b.op("LessOrEqual", [col, row])  # j <= i
    strict = b.op("Less", [col, row])  # j < i
    bcum = None
    if g is not None:
        # the one CumSum, along the chunk; per-head decay as a trailing axis of 1 (broadcasts over dk)
        bcum = b.op("CumSum", [chunks(g, 4) if per_key else b.op("Unsqueeze", [chunks(g, 3), c([4])]), c(3)])
        blast = b.op("Slice", [bcum, c([C - 1]), c([C]), c([3])])  # (B,h,nc,1,dk|1)

    def decayed(a: ir.Value, mask: ir.Value) -> ir.Value:
        """P[i, j] = sum_d a_id k_jd exp(b_id - b_jd) where mask[i, j], else 0: (B,h,nc,C,C)."""
        if bcum is None:
            return b.op("Where", [mask, b.op("MatMul", [a, tr(K)]), zero])
        if per_key:
            return sub_chunked(a, mask is strict)
        b0 = b.op("Squeeze", [bcum, c([4])])
        diff = b.op("Sub", [b.op("Unsqueeze", [b0, c([4])]), b.op("Unsqueeze", [b0, c([3])])])
        return b.op("Mul", [b.op("MatMul", [a, tr(K)]), b.op("Exp", [b.op("Where", [mask, diff, neg_inf])])])

    def sub_chunked(a: ir.Value, strict_diag: bool) -> ir.Value:
        """The per-key ``decayed``, with sub-chunks of ``sc`` positions so no [C, C, dk] tensor is built:
        pairs inside one sub-chunk explicitly ([sc, sc, dk]); a pair with j before i's sub-chunk as
        ``(a_i exp(b_i - r)) . (k_j exp(r - b_j))`` with ``r`` the log decay just before i's sub-chunk
        (both exponents <= 0; [C/sc, C, dk] per chunk)."""
        sc = min(C, SUB_CHUNK)
        ns = C // sc
        split = c([0, 0, 0, ns, sc, -1])
        a_s, k_s, b_s = (b.op("Reshape", [x, split]) for x in (a, K, bcum))  # (B,h,nc,ns,sc,dk)
        # inside a sub-chunk
        ii = np.arange(sc)
        sub_mask = c((ii[None, :] < ii[:, None]) if strict_diag else (ii[None, :] <= ii[:, None]), np.bool_)
        diff = b.op("Sub", [b.op("Unsqueeze", [b_s, c([5])]), b.op("Unsqueeze", [b_s, c([4])])])
        w = b.op("Exp", [b.op("Where", [b.op("Unsqueeze", [sub_mask, c([2])]), diff, neg_inf])])
        prod = b.op("Mul", [b.op("Mul", [b.op("Unsqueeze", [a_s, c([5])]), b.op("Unsqueeze", [k_s, c([4])])]), w])
        diag = b.op("ReduceSum", [prod, c([6])], {"keepdims": 0})  # (B,h,nc,ns,sc,sc)
        block = c(np.eye(ns, dtype=np.float32).reshape(ns, 1, ns, 1), np.float32)
        P = b.op("Reshape", [b.op("Mul", [b.op("Unsqueeze", [diag, c([5])]), block]), c([0, 0, 0, C, C])])
        if ns == 1:
            return P
        # across sub-chunks: r_s = b just before sub-chunk s (0 before the chunk)
        b_prev = b.op("Pad", [bcum, c([0, 0, 0, 1, 0, 0, 0, 0, 0, 0])])
        r = b.op("Slice", [b_prev, c([0]), c([C]), c([3]), c([sc])])  # (B,h,nc,ns,dk)
        a_r = b.op("Mul", [a_s, b.op("Exp", [b.op("Sub", [b_s, b.op("Unsqueeze", [r, c([4])])])])])
        before = c((np.arange(C)[None, :] < (np.arange(ns) * sc)[:, None])[:, :, None], np.bool_)  # (ns,C,1)
        e = b.op("Sub", [b.op("Unsqueeze", [r, c([4])]), b.op("Unsqueeze", [bcum, c([3])])])  # (B,h,nc,ns,C,dk)
        k_r = b.op("Mul", [b.op("Unsqueeze", [K, c([3])]), b.op("Exp", [b.op("Where", [before, e, neg_inf])])])
        cross = b.op("MatMul", [a_r, b.op("Transpose", [k_r], {"perm": [0, 1, 2, 3, 5, 4]})])  # (B,h,nc,ns,sc,C)
        return b.op("Add", [P, b.op("Reshape", [cross, c([0, 0, 0, C, C])])])

    QK = decayed(Q, incl)
    if bcum is not None:
        eb = b.op("Exp", [bcum])
        Qd = b.op("Mul", [Q, eb])  # q_i exp(b_i): reads the chunk's initial state
        KdT = tr(b.op("Mul", [K, b.op("Exp", [b.op("Sub", [blast, bcum])])]))  # writes the next state
        D = tr(b.op("Exp", [blast]))  # (B,h,nc,dk|1,1): the chunk's total decay of the state
    else:
        Qd, KdT, D, eb = Q, tr(K), None, None
    X, Wk = V, None
    if delta:
        bt = b.op("Unsqueeze", [chunks(beta, 3), c([4])])  # (B,h,nc,C,1)
        # (I + A)^-1 with A = diag(beta) KK strictly lower triangular: N = -A is nilpotent (N^C = 0), so
        # (I - N)^-1 = sum_{p<C} N^p = prod_{k<log2 C} (I + N^(2^k)): log2(C) squarings, no loop over positions
        N = b.op("Neg", [b.op("Mul", [bt, decayed(K, strict)])])
        inv = b.op("Add", [N, c(np.eye(C, dtype=np.float32), np.float32)])
        Np = N
        for _ in range(1, C.bit_length() - 1):
            Np = b.op("MatMul", [Np, Np])
            inv = b.op("Add", [inv, b.op("MatMul", [inv, Np])])
        X = b.op("MatMul", [inv, b.op("Mul", [bt, V])])  # A^-1 beta V
        Kb = K if eb is None else b.op("Mul", [K, eb])
        Wk = b.op("MatMul", [inv, b.op("Mul", [bt, Kb])])  # A^-1 beta exp(b) K

    # the Scan body: one chunk, state S (B,h,dk,dv)
    scan_ins = [Qd, QK, X, KdT] + ([Wk] if delta else []) + ([D] if D is not None else [])
    body = _Builder(f"{label}/scan")
    names = iter(range(10**6))

    def bval() -> ir.Value:
        return ir.Value(name=f"{label}/scan/in{next(names)}", type=ir.TensorType(f32))

    S_in, Qd_n, QK_n, X_n, KdT_n = (bval() for _ in range(5))
    Wk_n = bval() if delta else None
    D_n = bval() if D is not None else None
    U = X_n if Wk_n is None else body.op("Sub", [X_n, body.op("MatMul", [Wk_n, S_in])])
    o_n = body.op("Add", [body.op("MatMul", [Qd_n, S_in]), body.op("MatMul", [QK_n, U])])
    S_dec = S_in if D_n is None else body.op("Mul", [D_n, S_in])
    S_out = body.op("Add", [S_dec, body.op("MatMul", [KdT_n, U])])
    S_out = body.op("Identity", [S_out])
    o_n = body.op("Identity", [o_n])
    body_ins = [S_in, Qd_n, QK_n, X_n, KdT_n] + ([Wk_n] if delta else []) + ([D_n] if D_n is not None else [])
    for i, n in enumerate(body.nodes):
        for j, out in enumerate(n.outputs):
            out.name = f"{label}/scan/v{i}_{j}"
    graph = ir.Graph(body_ins, [S_out, o_n], nodes=body.nodes, name=f"{label}/scan_body")
    n_scan = len(scan_ins)
    S_fin, o = b.op("Scan", [s0] + scan_ins,
                    {"body": ir.AttrGraph("body", graph), "num_scan_inputs": n_scan,
                     "scan_input_axes": [2] * n_scan, "scan_output_axes": [2]}, outputs=2)
    o = b.op("Mul", [o, c(np.float32(scale), np.float32)])  # (B,h,nc,C,dv)
    o = b.op("Transpose", [o], {"perm": [0, 2, 3, 1, 4]})
    o = b.op("Reshape", [o, c([0, -1, h, dv])])
    o = b.op("Slice", [o, c([0]), t, c([1])])
    if out_dtype is not None and out_dtype != f32:
        o = b.op("Cast", [o], {"to": out_dtype})
    final = S_fin
    if h != hs:
        final = b.op("Slice", [final, c([0]), c([h]), c([1]), c([h // hs])])
    return b.nodes, [o, final]
