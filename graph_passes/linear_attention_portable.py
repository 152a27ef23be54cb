"""Lower ``lrexport.LinearAttention`` nodes to standard ONNX ops (opset <= 25, one ``CumSum`` axis): for
runtimes without ``com.microsoft.LinearAttention`` (TensorRT's parser stops at opset 25).

Rules ``linear`` / ``gated`` with a per-head decay or none, loop-free (chunks of ``C`` positions; ``b``
the cumulative log decay inside a chunk, ``L_n`` the total log decay before chunk ``n``):

* intra-chunk: ``(q k^T ⊙ exp(b_i - b_j)) v`` over ``j <= i``;
* inter-chunk, with no loop and no Scan: the state at the start of every chunk (and the final state)
  at once, ``S_n = exp(L_n) S_0 + sum_{m<n} exp(L_n - L_{m+1}) ΔS_m`` with ``ΔS_m`` chunk m's own
  contribution, in two levels (``_chunk_states``): a decay matrix inside groups of 16 chunks, then one
  across the groups; one level would be an ``(nc+1) x nc`` matrix times the stacked ``ΔS``, work
  quadratic in T (at T = 16384, C = 64: twice the multiply-adds of all the rest). Memory linear in T.

Rules ``delta`` / ``gated_delta`` and a per-key decay (``_lower_scan``, chunks of 16): everything inside a
chunk is batched over all chunks, and only the (dk x dv) state crosses chunks, in one ``Scan`` over the
chunk axis (trip count ``ceil(T/C)``, dynamic). The delta rules' UT transform ``(I + diag(beta) KK)^-1``
(``KK`` strictly lower triangular) is ``prod_{k<log2 C} (I + N^(2^k))`` with ``N = -diag(beta) KK``
nilpotent: matmuls, no loop over positions and no triangular solve. A per-key decay's products ``sum_d a_id
k_jd exp(b_id - b_jd)`` are MatMuls of queries and keys each scaled by one exponential, fla-style: blocks of
8 against their middle position, then halves against the boundary between them (``_SubChunks``), never a
``[C, C, dk]`` tensor. Without a state-dependent update (the gated rule) the Scan body reads the state,
decays it and adds the chunk's ``K^T V``. The Scan is the cheapest way on ONNX Runtime CPU to carry the
delta rules' state-dependent update and a per-key decay; graph_passes/linear_attention_loopfree.py carries
the same state with no Scan (doubling levels, more arithmetic) for TensorRT engines.

Speed (benchmarks/bench_linear_attention.py, ORT CPU): the chunk layout is a Transpose that keeps the
last axis, then a Reshape, so the MatMuls' transposed operands are Transposes ORT folds into the MatMul;
masks are added (0 / -inf) or multiplied rather than selected by ``Where`` on large tensors.

Every exponent is masked to -inf before ``Exp`` where it does not apply, and is <= 0 where it does
(log decay <= 0), so no inf/NaN; the one exception, a per-key decay's factors inside a leaf of 8
positions, is bounded (by 64) by clipping the log decay per step (``_SubChunks``). One ``CumSum`` axis
only (inside the chunk): ``L`` is a MatMul with a ``p < n`` mask, as TensorRT miscomputes several
CumSums on different axes. ``L`` is a prefix sum in float32: with very strong decays over very long
sequences the difference ``L_n - L_{m+1}`` loses absolute precision ~1e-7 |L|.

The default pipeline's ``linear-attention`` pass (graph_passes/linear_attention.py) runs this lowering
unless ONNX Runtime's native op is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.linear_attention_ort import LinearAttentionLowering, Lowered, _attr, _Builder

PORTABLE_RULES = ("linear", "gated", "delta", "gated_delta")
# the delta rules' chunk: their product-form inverse loses float32 precision as C grows (delta rule, unit
# keys of dk = 4, max error vs float64: 3.5e-7 at C = 16, 1.7e-6 at C = 32, 1.7e-4 at C = 64)
DELTA_CHUNK = 16
# per-key decay (gated rule): larger chunks mean fewer Scan steps but more levels of products; 16 ran
# fastest of 16 / 32 / 64 (n = 1024 and 4096, ORT CPU, 2 threads)
KEY_CHUNK = 16
GROUP = 16  # linear / per-head gated: chunks per group of the loop-free inter-chunk sum (_chunk_states)
LEAF = 8  # per-key decay: the blocks whose pairs are one MatMul with bounded factors (see _SubChunks)
MAX_LOG_DECAY = 16.0  # per-key decay: log decays per step are clipped at -MAX_LOG_DECAY (see _SubChunks)


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


def chunk_for(node: ir.Node, chunk_size: int) -> int:
    """The chunk a node is lowered with: ``chunk_size``, capped per form (see DELTA_CHUNK, KEY_CHUNK)."""
    if _attr(node, "rule") in ("delta", "gated_delta"):
        return min(chunk_size, DELTA_CHUNK)
    if _attr(node, "decay", "none") == "key":
        return min(chunk_size, KEY_CHUNK)
    return chunk_size


class LinearAttentionPortablePass(LinearAttentionLowering):
    """Rewrite ``lrexport.LinearAttention`` (every rule) to standard ops."""

    name = "linear-attention-portable"
    min_opset = 18  # Pad with an axes-free pads input, ReduceSum-free; Where, Range, Less, Trilu-free

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        reason = _refusal(node)
        if reason is not None:
            return reason
        scan = _needs_scan(node)
        chunk = chunk_for(node, self.options.chunk_size)
        if scan:
            if chunk & (chunk - 1):
                return f"chunk size {chunk} is not a power of 2 (the UT inverse and sub-chunks need one)"
            new_nodes, outs = _lower_scan(_Prep(node, label, chunk))
        else:
            new_nodes, outs = _lower(_Prep(node, label, chunk))
        action = "lowered (standard ops, chunked" + (", Scan over chunks)" if scan else ")")
        return new_nodes, outs, action, {"rule": _attr(node, "rule"), "chunk": chunk}


class _Prep:
    """What every form shares: the node's inputs in float32 on ``h`` heads, zero-padded to ``nc * C``
    positions (k = 0 adds nothing, g = 0 decays nothing) and cut in chunks ``(B, h, nc, C[, d])``.

    The chunk layout is reached by a Transpose that keeps the last axis in place, then a Reshape; the
    transposed operands of MatMuls (``tr``) are then last-two-axes Transposes of a Reshape, which ONNX
    Runtime folds into its MatMul (a Transpose of a Transpose it merges into one slow copy instead)."""

    def __init__(self, node: ir.Node, label: str, C: int) -> None:
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        q, k, v, g, beta, s0 = inputs
        self.rule = _attr(node, "rule")
        self.delta = self.rule in ("delta", "gated_delta")
        self.per_key = _attr(node, "decay", "none") == "key"
        hq, hk, hv = (int(_attr(node, a)) for a in ("q_heads", "k_heads", "v_heads"))
        self.hs = hs = max(hk, hv)
        self.h = h = max(hq, hs)
        self.normalize = bool(_attr(node, "normalize", 0))
        self.eps = float(_attr(node, "eps", 0.0))
        self.scale = float(_attr(node, "scale", 1.0))
        self.dv = dv = int(v.shape[3]) + int(self.normalize)
        dk = q.shape[3] if q.shape is not None and len(q.shape) == 4 else None
        self.dk = dk if isinstance(dk, int) else None  # None: known only at run time
        self.out_dtype = q.dtype
        self.C = C
        self.b = b = _Builder(label)
        c = b.const
        q, k, v, g, beta = (b.to_float(x) for x in (q, k, v, g, beta))
        q, k, v = b.repeat_heads(q, hq, h // hq), b.repeat_heads(k, hk, h // hk), b.repeat_heads(v, hv, h // hv)

        def per_head_to_h(x: ir.Value) -> ir.Value:  # (B,T,hs) -> (B,T,h)
            return b.op("Squeeze", [b.repeat_heads(b.op("Unsqueeze", [x, c([3])]), hs, h // hs), c([3])])

        if g is not None:
            g = b.repeat_heads(g, hs, h // hs) if self.per_key else per_head_to_h(g)
        if beta is not None:
            beta = per_head_to_h(beta)
        if s0 is not None and h != hs:
            s0 = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [s0, c([2])]), c([1, 1, h // hs, 1, 1])]),
                                  c([0, h, -1, dv])])
        if s0 is not None and s0.dtype not in (None, ir.DataType.FLOAT):
            s0 = b.op("Cast", [s0], {"to": ir.DataType.FLOAT})
        if self.normalize:
            shape = b.op("Shape", [v], {"start": 0, "end": 3})
            ones = b.op("ConstantOfShape", [b.op("Concat", [shape, c([1])], {"axis": 0})],
                        {"value": ir.tensor(np.ones(1, np.float32))})
            v = b.op("Concat", [v, ones], {"axis": -1})
        self.q_in, self.s0 = q, s0
        self.t = t = b.op("Shape", [q], {"start": 1, "end": 2})
        self.pad = b.op("Mod", [b.op("Sub", [c([C]), b.op("Mod", [t, c([C])])]), c([C])])
        self.nc = b.op("Div", [b.op("Add", [t, self.pad]), c([C])])
        self.Q, self.K, self.V = (self.chunks(x) for x in (q, k, v))
        self.G = None if g is None else self.chunks(g, 4 if self.per_key else 3)  # (B,h,nc,C[,dk])
        self.Beta = None if beta is None else self.chunks(beta, 3)  # (B,h,nc,C)

    def chunks(self, x: ir.Value, rank: int = 4) -> ir.Value:
        """(B,T,h[,d]) -> (B,h,nc,C[,d]), zero padded."""
        b, c = self.b, self.b.const
        pads = b.op("Concat", [c([0] * (rank + 1)), self.pad, c([0] * (rank - 2))], {"axis": 0})
        x = b.op("Transpose", [b.op("Pad", [x, pads])], {"perm": [0, 2, 1, 3] if rank == 4 else [0, 2, 1]})
        if rank == 3:
            return b.op("Reshape", [x, c([0, 0, -1, self.C])])
        return b.op("Reshape", [x, b.op("Concat", [c([0, 0]), self.nc, c([self.C, -1])], {"axis": 0})])

    def tr(self, x: ir.Value) -> ir.Value:
        """Swap the last two axes of a rank-5 tensor."""
        return self.b.op("Transpose", [x], {"perm": [0, 1, 2, 4, 3]})

    def const(self, x: np.ndarray) -> ir.Value:
        return self.b.const(x, x.dtype)

    def finish(self, o: ir.Value, final: ir.Value, chunk_first: bool = False) -> tuple[list[ir.Node], list[ir.Value]]:
        """o (B,h,nc,C,dv), or (nc,B,h,C,dv) with ``chunk_first``, -> (B,T,h,dv) scaled, normalized, cast."""
        b, c, h, dv = self.b, self.b.const, self.h, self.dv
        o = b.op("Mul", [o, c(np.float32(self.scale), np.float32)])
        if chunk_first:
            o = b.op("Reshape", [b.op("Transpose", [o], {"perm": [1, 0, 3, 2, 4]}), c([0, -1, h, dv])])
        else:
            o = b.op("Transpose", [b.op("Reshape", [o, c([0, 0, -1, dv])])], {"perm": [0, 2, 1, 3]})
        o = b.op("Slice", [o, c([0]), self.t, c([1])])
        if self.normalize:
            num, den = b.op("Split", [o, c([dv - 1, 1])], {"axis": 3}, outputs=2)
            if self.eps:
                den = b.op("Add", [den, c(np.float32(self.eps), np.float32)])
            o = b.op("Div", [num, den])
        if self.out_dtype is not None and self.out_dtype != ir.DataType.FLOAT:
            o = b.op("Cast", [o], {"to": self.out_dtype})
        if h != self.hs:  # state head s was computed for its r query heads: take one
            final = b.op("Slice", [final, c([0]), c([h]), c([1]), c([h // self.hs])])
        return b.nodes, [o, final]


def _tri(C: int, strict: bool) -> np.ndarray:
    """(C, C) additive mask: 0 where j <= i (j < i if strict), -inf after."""
    i = np.arange(C)
    keep = i[None, :] < i[:, None] if strict else i[None, :] <= i[:, None]
    return np.where(keep, 0.0, -np.inf).astype(np.float32)


def _lower(p: _Prep) -> tuple[list[ir.Node], list[ir.Value]]:
    """``linear`` and per-head ``gated``: loop-free."""
    b, c, C, Q, K, V = p.b, p.b.const, p.C, p.Q, p.K, p.V
    qk = b.op("MatMul", [Q, p.tr(K)])  # (B,h,nc,C,C)
    if p.G is not None:
        bcum = b.op("CumSum", [p.G, c(3)])  # (B,h,nc,C): the one CumSum, along the chunk
        diff = b.op("Sub", [b.op("Unsqueeze", [bcum, c([4])]), b.op("Unsqueeze", [bcum, c([3])])])
        qk = b.op("Mul", [qk, b.op("Exp", [b.op("Add", [diff, p.const(_tri(C, False))])])])
        blast = b.op("Slice", [bcum, c([C - 1]), c([C]), c([3])])  # (B,h,nc,1): chunk totals
        e_q = b.op("Exp", [b.op("Unsqueeze", [bcum, c([4])])])  # q_i exp(b_i) reads the chunk-start state
        Vd = b.op("Mul", [V, b.op("Exp", [b.op("Unsqueeze", [b.op("Sub", [blast, bcum]), c([4])])])])
    else:
        qk = b.op("Mul", [qk, p.const(np.tril(np.ones((C, C), np.float32)))])
        e_q, Vd = None, V
    o = b.op("MatMul", [qk, V])  # intra-chunk, (B,h,nc,C,dv)
    dS = b.op("MatMul", [p.tr(p.K), Vd])  # (B,h,nc,dk,dv): chunk n's own contribution to the next state
    dS_flat = b.op("Reshape", [dS, c([0, 0, 0, -1])])  # (B,h,nc,dk*dv)
    totals = None if p.G is None else b.op("Squeeze", [blast, c([3])])  # (B,h,nc)
    S_start, final = _chunk_states(p, dS_flat, totals)
    inter = b.op("MatMul", [Q, S_start])
    if e_q is not None:
        inter = b.op("Mul", [inter, e_q])
    o = b.op("Add", [o, inter])  # inter-chunk
    return p.finish(o, final)


def _decay_prefix(p: _Prep, x: ir.Value, t: ir.Value | None, n: ir.Value, axis: int,
                  static: int | None = None) -> tuple[ir.Value, ir.Value | None]:
    """``P_k = sum_{m<k} exp(L_k - L_{m+1}) x_m`` for k = 0..n (row n: after all), ``L_k = sum_{m<k} t_m``,
    along ``axis`` of x (..., n, F) and t (..., n): (..., n+1, F) and L (..., n+1). ``L`` is a MatMul with a
    ``m < k`` mask (one CumSum axis per network); every exponent is masked to -inf or is <= 0. An n x n
    decay matrix: callers keep n small (``static``: n known, the masks are constants)."""
    b, c = p.b, p.b.const
    f32 = ir.DataType.FLOAT
    if static is not None:
        keep = np.arange(static)[:, None] < np.arange(static + 1)[None, :]  # (n, n+1): m < k
        before = p.const(keep.astype(np.float32))
        keep_t = p.const(keep.T)  # (n+1, n)
        mask01 = p.const(keep.T.astype(np.float32))
    else:
        n0 = b.op("Squeeze", [n, c([0])])
        idx_k = b.op("Range", [c(0), b.op("Add", [n0, c(1)]), c(1)])
        idx_m = b.op("Range", [c(0), n0, c(1)])
        lt = b.op("Less", [b.op("Unsqueeze", [idx_m, c([1])]), b.op("Unsqueeze", [idx_k, c([0])])])  # m < k
        before = b.op("Cast", [lt], {"to": f32})
        mask01 = b.op("Transpose", [before], {"perm": [1, 0]})
        keep_t = b.op("Transpose", [lt], {"perm": [1, 0]})
    if t is None:
        return b.op("MatMul", [mask01, x]), None
    L = b.op("Squeeze", [b.op("MatMul", [b.op("Unsqueeze", [t, c([axis])]), before]), c([axis])])  # (..., n+1)
    L_next = b.op("Slice", [L, c([1]), c([2**62]), c([axis])])  # L_{m+1}
    expo = b.op("Sub", [b.op("Unsqueeze", [L, c([axis + 1])]), b.op("Unsqueeze", [L_next, c([axis])])])
    M = b.op("Exp", [b.op("Where", [keep_t, expo, c(np.float32(-np.inf), np.float32)])])  # (..., n+1, n)
    return b.op("MatMul", [M, x]), L


def _chunk_states(p: _Prep, dS: ir.Value, totals: ir.Value | None) -> tuple[ir.Value, ir.Value]:
    """The state at the start of every chunk (B,h,nc,dk,dv) and the final state (B,h,dk,dv), loop-free,
    from each chunk's own contribution ``dS`` (B,h,nc,dk*dv) and log decay ``totals`` (B,h,nc), in two
    levels so that no decay matrix grows with nc squared times the state: inside groups of ``GROUP``
    chunks (a (G+1) x G matrix per group), then across the groups' totals (an (ng+1) x ng matrix,
    ng = nc / G), and each chunk's state is its group-start state decayed plus its in-group prefix."""
    b, c, G = p.b, p.b.const, GROUP
    pad = b.op("Mod", [b.op("Sub", [c([G]), b.op("Mod", [p.nc, c([G])])]), c([G])])
    ng = b.op("Div", [b.op("Add", [p.nc, pad]), c([G])])
    grouped = b.op("Concat", [c([0, 0]), ng, c([G])], {"axis": 0})
    # padded chunks add nothing and decay nothing: they leave the final state as it is
    x = b.op("Reshape", [b.op("Pad", [dS, b.op("Concat", [c([0, 0, 0, 0, 0, 0]), pad, c([0])], {"axis": 0})]),
                         b.op("Concat", [grouped, c([-1])], {"axis": 0})])  # (B,h,ng,G,F)
    t = None if totals is None else b.op("Reshape", [b.op("Pad", [totals, b.op("Concat", [c([0, 0, 0, 0, 0]), pad],
                                                                                 {"axis": 0})]), grouped])
    S_loc, L_loc = _decay_prefix(p, x, t, c([G]), 3, static=G)  # (B,h,ng,G+1,F), (B,h,ng,G+1)
    E = b.op("Squeeze", [b.op("Slice", [S_loc, c([G]), c([G + 1]), c([3])]), c([3])])  # (B,h,ng,F)
    T = None if t is None else b.op("Squeeze", [b.op("Slice", [L_loc, c([G]), c([G + 1]), c([3])]), c([3])])
    S_grp, L_grp = _decay_prefix(p, E, T, ng, 2)  # (B,h,ng+1,F): the state at each group's start
    if p.s0 is not None:
        S0 = b.op("Reshape", [p.s0, c([0, 0, 1, -1])])
        if L_grp is not None:
            S0 = b.op("Mul", [S0, b.op("Exp", [b.op("Unsqueeze", [L_grp, c([3])])])])
        S_grp = b.op("Add", [S_grp, S0])
    final = b.op("Reshape", [b.op("Slice", [S_grp, ng, b.op("Add", [ng, c([1])]), c([2])]), c([0, 0, -1, p.dv])])
    carried = b.op("Unsqueeze", [b.op("Slice", [S_grp, c([0]), ng, c([2])]), c([3])])  # (B,h,ng,1,F)
    if L_loc is not None:
        carried = b.op("Mul", [carried, b.op("Exp", [b.op("Unsqueeze", [
            b.op("Slice", [L_loc, c([0]), c([G]), c([3])]), c([4])])])])
    S = b.op("Add", [b.op("Slice", [S_loc, c([0]), c([G]), c([3])]), carried])  # (B,h,ng,G,F)
    S = b.op("Reshape", [S, b.op("Concat", [c([0, 0]), b.op("Mul", [ng, c([G])]), c([-1])], {"axis": 0})])
    S = b.op("Slice", [S, c([0]), p.nc, c([2])])
    return b.op("Reshape", [S, c([0, 0, 0, -1, p.dv])]), final


@dataclass
class ChunkTerms:
    """What one chunk contributes, batched over all chunks (B,h,nc,...), for the forms that carry the state
    from chunk to chunk (the delta rules and a per-key decay): with ``S`` the state at the chunk's start,

    * output ``o = Qd S + QK U`` and next state ``S' = D S + KdT U``, where ``U = V`` (gated rule) or
      ``U = X - Wk S`` (delta rules: the UT transform's ``X = A^-1 beta V``, ``Wk = A^-1 beta exp(b) K``);
    * ``D`` (B,h,nc,dk|1,1) the chunk's total decay of the state (None: no decay)."""

    QK: ir.Value  # (B,h,nc,C,C): q_i . k_j decayed, j <= i
    Qd: ir.Value  # (B,h,nc,C,dk): q_i exp(b_i), reads the chunk's initial state
    KdT: ir.Value  # (B,h,nc,dk,C): k_j exp(b_last - b_j), transposed: writes the next state
    D: ir.Value | None
    U: ir.Value  # V (gated rule) or X (delta rules)
    Wk: ir.Value | None  # delta rules only


def chunk_terms(p: _Prep) -> ChunkTerms:
    """The per-chunk terms of the delta rules and a per-key decay (:class:`ChunkTerms`), loop-free: a
    per-key decay's products by sub-chunks (:class:`_SubChunks`), the UT inverse by :func:`_inverse`."""
    b, c, C, Q, K, V = p.b, p.b.const, p.C, p.Q, p.K, p.V
    KT = p.tr(K)
    bcum = None
    if p.G is not None:
        # the one CumSum, along the chunk; per-head decay as a trailing axis of 1 (broadcasts over dk)
        G = b.op("Max", [p.G, c(np.float32(-MAX_LOG_DECAY), np.float32)]) if p.per_key else \
            b.op("Unsqueeze", [p.G, c([4])])
        bcum = b.op("CumSum", [G, c(3)])
        blast = b.op("Slice", [bcum, c([C - 1]), c([C]), c([3])])  # (B,h,nc,1,dk|1)

    if p.per_key:
        intra = _SubChunks(p, bcum)
        decayed = intra.products
    else:
        if bcum is not None:
            b0 = b.op("Squeeze", [bcum, c([4])])
            diff = b.op("Sub", [b.op("Unsqueeze", [b0, c([4])]), b.op("Unsqueeze", [b0, c([3])])])

        def decayed(a: ir.Value, strict: bool) -> ir.Value:
            """P[i, j] = a_i . k_j exp(b_i - b_j) for j <= i (j < i if strict), else 0: (B,h,nc,C,C)."""
            if bcum is None:
                return b.op("Mul", [b.op("MatMul", [a, KT]), p.const(np.tril(np.ones((C, C), np.float32),
                                                                              -1 if strict else 0))])
            return b.op("Mul", [b.op("MatMul", [a, KT]), b.op("Exp", [b.op("Add", [diff, p.const(_tri(C, strict))])])])

    QK = decayed(Q, False)
    if bcum is not None:
        eb = b.op("Exp", [bcum])
        Qd = b.op("Mul", [Q, eb])
        KdT = p.tr(b.op("Mul", [K, b.op("Exp", [b.op("Sub", [blast, bcum])])]))
        D = p.tr(b.op("Exp", [blast]))
    else:
        Qd, KdT, D, eb = Q, KT, None, None
    if not p.delta:
        return ChunkTerms(QK, Qd, KdT, D, V, None)
    bt = b.op("Unsqueeze", [p.Beta, c([4])])  # (B,h,nc,C,1)
    # (I + diag(beta) KK)^-1, KK strictly lower triangular (_inverse)
    inv = _inverse(p, b.op("Neg", [b.op("Mul", [bt, decayed(K, True)])]))
    X = b.op("MatMul", [inv, b.op("Mul", [bt, V])])  # A^-1 beta V
    Kb = K if eb is None else b.op("Mul", [K, eb])
    Wk = b.op("MatMul", [inv, b.op("Mul", [bt, Kb])])  # A^-1 beta exp(b) K
    return ChunkTerms(QK, Qd, KdT, D, X, Wk)


def initial_state(p: _Prep) -> ir.Value:
    """The node's initial state in float32 on h heads (B,h,dk,dv), zeros where it has none."""
    if p.s0 is not None:
        return p.s0
    b, c = p.b, p.b.const
    shp = b.op("Concat", [b.op("Shape", [p.q_in], {"start": 0, "end": 1}), c([p.h]),
                          b.op("Shape", [p.q_in], {"start": 3, "end": 4}), c([p.dv])], {"axis": 0})
    return b.op("ConstantOfShape", [shp], {"value": ir.tensor(np.zeros(1, np.float32))})


def _lower_scan(p: _Prep) -> tuple[list[ir.Node], list[ir.Value]]:
    """Delta rules (UT transform, loop-free inside a chunk) and per-key decay; the state crosses chunks
    in a ``Scan`` over the chunk axis (its trip count follows T). The chunk axis stays axis 2: a
    chunk-first layout, (nc,B,h,C,d), spares the Scan its transposes of the scanned tensors but its own
    5-D Transposes ran slower (ORT CPU, n = 4096: 117 ms vs 70 ms for the delta rule)."""
    b = p.b
    f32 = ir.DataType.FLOAT
    t = chunk_terms(p)
    s0 = initial_state(p)

    # the Scan body: one chunk, state S (B,h,dk,dv); its outputs are node outputs (no Identity copies)
    body = _Builder(f"{b.label}/scan")
    names = iter(range(10**6))

    def bval() -> ir.Value:
        return ir.Value(name=f"{b.label}/scan/in{next(names)}", type=ir.TensorType(f32))

    S_in = bval()
    scan_ins, body_ins, body_outs = [], [S_in], []

    def scanned(x: ir.Value) -> ir.Value:
        scan_ins.append(x)
        body_ins.append(bval())
        return body_ins[-1]

    D_n = None if t.D is None else scanned(t.D)
    S_dec = S_in if D_n is None else body.op("Mul", [D_n, S_in])
    if p.delta:  # U = X - W S, o = Qd S + QK U, S' = D S + KdT U
        Qd_n, QK_n, X_n, KdT_n, Wk_n = (scanned(x) for x in (t.Qd, t.QK, t.U, t.KdT, t.Wk))
        U = body.op("Sub", [X_n, body.op("MatMul", [Wk_n, S_in])])
        body_outs.append(body.op("Add", [body.op("MatMul", [Qd_n, S_in]), body.op("MatMul", [QK_n, U])]))
        S_out = body.op("Add", [S_dec, body.op("MatMul", [KdT_n, U])])
    else:  # no state-dependent update: o = Qd S, S' = D S + KdT V (the chunk's contribution, made here
        # rather than stacked up front: a (dk x dv) tensor per chunk is dk dv / C floats per position)
        Qd_n, KdT_n, V_n = (scanned(x) for x in (t.Qd, t.KdT, t.U))
        body_outs.append(body.op("MatMul", [Qd_n, S_in]))
        S_out = body.op("Add", [S_dec, body.op("MatMul", [KdT_n, V_n])])
    for i, n in enumerate(body.nodes):
        for j, out in enumerate(n.outputs):
            out.name = f"{b.label}/scan/v{i}_{j}"
    graph = ir.Graph(body_ins, [S_out] + body_outs, nodes=body.nodes, name=f"{b.label}/scan_body")
    n_scan = len(scan_ins)
    S_fin, o = b.op("Scan", [s0] + scan_ins,
                    {"body": ir.AttrGraph("body", graph), "num_scan_inputs": n_scan,
                     "scan_input_axes": [2] * n_scan, "scan_output_axes": [2]}, outputs=2)
    if not p.delta:
        o = b.op("Add", [o, b.op("MatMul", [t.QK, t.U])])  # no state in it: batched over all chunks
    return p.finish(o, S_fin)


def _inverse(p: _Prep, N: ir.Value) -> ir.Value:
    """``(I - N)^-1`` for N (B,h,nc,C,C) strictly lower triangular, so nilpotent (N^C = 0):
    ``sum_{k<C} N^k = prod_{i<log2 C} (I + N^(2^i))``, log2(C) squarings, no loop over positions and no
    triangular solve."""
    b, C = p.b, p.C
    inv = b.op("Add", [N, p.const(np.eye(C, dtype=np.float32))])
    Np = N
    for _ in range(1, C.bit_length() - 1):
        Np = b.op("MatMul", [Np, Np])
        inv = b.op("Add", [inv, b.op("MatMul", [inv, Np])])
    return inv


class _SubChunks:
    """Per-key decay's ``P[i, j] = sum_d a_id k_jd exp(b_id - b_jd)`` (j <= i, j < i if strict) with no
    [C, C, dk] tensor: every part is a MatMul of keys and queries each scaled by one exponential.

    * Leaves of ``LEAF`` positions: ``(a_i exp(b_i - b_r)) . (k_j exp(b_r - b_j))``, ``b_r`` the log decay
      at the leaf's middle position. Either factor may grow, by at most ``LEAF / 2 * MAX_LOG_DECAY`` = 64
      in the exponent (e^64 ~ 6e27, far from float32's e^88 both ways), because the log decay per step
      is clipped at ``-MAX_LOG_DECAY`` (``_lower_scan``): a decay of e^-16 ~ 1.1e-7 already scales what
      crosses it to float32 resolution, so the clip changes no weight by more than that. Pairs with
      j > i (finite, or inf/NaN at worst) are dropped by a ``Where``. A middle reference halves the
      exponent bound of a first-position one: leaves of 8 rather than 4, one level fewer below.
    * Blocks of 2m built from two blocks of m: pairs with j in the first half and i in the second as
      ``(a_i exp(b_i - r)) . (k_j exp(r - b_j))``, r the log decay at the end of the first half: both
      exponents <= 0 (what underflows is below 1e-38 of its term).
    The scaled keys and exponentials are shared by the products with q and with k (the delta rules' KK)."""

    def __init__(self, p: _Prep, bcum: ir.Value) -> None:
        self.p, self.bcum = p, bcum
        b, c, C = p.b, p.b.const, p.C
        self.leaf = leaf = min(LEAF, C)
        view = c([0, 0, 0, C // leaf, leaf, -1])
        b_l = b.op("Reshape", [bcum, view])  # (B,h,nc,C/leaf,leaf,dk)
        mid = leaf // 2
        ref = b.op("Slice", [b_l, c([mid]), c([mid + 1]), c([4])])
        d = b.op("Sub", [b_l, ref])  # |d| <= (leaf / 2) MAX_LOG_DECAY
        self.e_row = b.op("Exp", [d])
        self.leaf_view = view
        self.k_col = b.op("Mul", [b.op("Reshape", [p.K, view]), b.op("Exp", [b.op("Neg", [d])])])
        self.k_colT = b.op("Transpose", [self.k_col], {"perm": [0, 1, 2, 3, 5, 4]})
        self.levels = []  # per level (half size m): exp factors of each half and the scaled first-half keys
        m = leaf
        while m < C:
            view = c([0, 0, 0, C // (2 * m), 2, m, -1])
            b_v = b.op("Reshape", [bcum, view])  # (B,h,nc,C/2m,2,m,dk)
            b1, b2 = b.op("Split", [b_v], {"axis": 4, "num_outputs": 2}, outputs=2)
            r = b.op("Slice", [b1, c([m - 1]), c([m]), c([5])])  # end of the first half
            e2 = b.op("Exp", [b.op("Sub", [b2, r])])  # <= 1
            k1 = b.op("Split", [b.op("Reshape", [p.K, view])], {"axis": 4, "num_outputs": 2}, outputs=2)[0]
            k1T = b.op("Transpose", [b.op("Mul", [k1, b.op("Exp", [b.op("Sub", [r, b1])])])],
                       {"perm": [0, 1, 2, 3, 4, 6, 5]})
            self.levels.append((m, view, e2, k1T))
            m *= 2

    def products(self, a: ir.Value, strict: bool) -> ir.Value:
        p, b, c, C, leaf = self.p, self.p.b, self.p.b.const, self.p.C, self.leaf
        a_row = b.op("Mul", [b.op("Reshape", [a, self.leaf_view]), self.e_row])
        P = b.op("MatMul", [a_row, self.k_colT])  # (B,h,nc,C/leaf,leaf,leaf)
        ii = np.arange(leaf)
        keep = (ii[None, :] < ii[:, None]) if strict else (ii[None, :] <= ii[:, None])
        P = b.op("Where", [p.const(keep), P, c(np.float32(0), np.float32)])
        for m, view, e2, k1T in self.levels:
            a2 = b.op("Split", [b.op("Reshape", [a, view])], {"axis": 4, "num_outputs": 2}, outputs=2)[1]
            X = b.op("MatMul", [b.op("Mul", [a2, e2]), k1T])  # (B,h,nc,C/2m,1,m,m): i second half, j first
            halves = b.op("Reshape", [P, c([0, 0, 0, C // (2 * m), 2, m, m])])
            Pa, Pb = b.op("Split", [halves], {"axis": 4, "num_outputs": 2}, outputs=2)
            top = b.op("Pad", [Pa, c([0] * 6 + [0] + [0] * 6 + [m])])
            P = b.op("Concat", [top, b.op("Concat", [X, Pb], {"axis": 6})], {"axis": 5})
            P = b.op("Reshape", [P, c([0, 0, 0, C // (2 * m), 2 * m, 2 * m])])
        return b.op("Reshape", [P, c([0, 0, 0, C, C])])
