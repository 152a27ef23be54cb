# mypy: disable-error-code="override"
"""Causal linear attention: CumSum over an n x d x e outer product -> chunked form.

The naive export computes S_i = sum_{j<=i} k_j v_j^T as an outer product (Einsum, or Mul/MatMul of
Unsqueezes), CumSum over the sequence, then a contraction with q_i. That materializes an n x d x e
tensor per head. The chunked form splits the sequence into chunks of C: inside a chunk it uses the
masked (q k^T) v product (C x C per chunk), across chunks it passes d x e states with an exclusive
CumSum over chunks. Memory drops from O(n d e) to O(n (C + d e / C)), work is about the same.

The sequence is padded inside the graph to a multiple of C (zero keys/values add nothing to the
state) and sliced back, so any length works, including n < C. Sums run in float32 whatever the
model dtype. The normalizer Z = CumSum(phi(K)) contracted with phi(Q) is rewritten the same way (row
sums of the same masked scores plus q . keys of earlier chunks); it shares the numerator's prologue
node for node, so the cleanup pass's CSE computes the scores once. A normalizer in another form is
left as its n x d CumSum (linear size), run in float32 when the model is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp


from graph_passes._base import GraphPass
from graph_passes._util import const_array, einsum_equation, node_label, prepare, parse_einsum

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_FLOAT32 = ir.DataType.FLOAT


@dataclass
class CausalPlan:
    """How to bring q, k, v into [batch..., n, d|e] layout and the result back."""

    perm_q: list[int]
    perm_k: list[int]
    perm_v: list[int]
    perm_out: list[int]
    k_index: int  # which outer-product operand is K (carries the contracted axis)


def plan_causal(outer_ins: list[str], outer_out: str, axis: int, c_ins: list[str], c_out: str,
                state_index: int) -> CausalPlan | str:
    """Check the letters of outer product + cumsum + contraction; a plan, or why it is refused."""
    if len(outer_ins) != 2 or len(c_ins) != 2:
        return "not a two-operand outer product / contraction"
    a, b = outer_ins
    letters = set(a) | set(b)
    if set(outer_out) != letters or len(outer_out) != len(letters):
        return "outer product sums over an axis (not an outer product)"
    shared = set(a) & set(b)
    a_only, b_only = set(a) - shared, set(b) - shared
    if len(a_only) != 1 or len(b_only) != 1:
        return "each factor must have exactly one private axis"
    if not -len(outer_out) <= axis < len(outer_out):
        return "cumsum axis out of range"
    seq = outer_out[axis]
    if seq not in shared:
        return "cumsum runs over a feature axis, not the shared sequence axis"
    s_letters, q_letters = c_ins[state_index], c_ins[1 - state_index]
    if len(s_letters) != len(outer_out):
        return "contraction rank differs from the state rank"
    ren = dict(zip(s_letters, outer_out))
    if any(c not in ren for c in q_letters) or any(c not in ren for c in c_out):
        return "query or output has axes that the state lacks"
    qo = [ren[c] for c in q_letters]
    ro = [ren[c] for c in c_out]
    contracted = set(qo) - set(ro)
    if len(contracted) != 1:
        return "contraction does not sum over exactly one feature axis"
    (d,) = contracted
    if d in a_only:
        k_index, k_letters, v_letters, (e,) = 0, a, b, b_only
    elif d in b_only:
        k_index, k_letters, v_letters, (e,) = 1, b, a, a_only
    else:
        return "contraction sums over a shared axis (non-causal or not attention)"
    if set(qo) != shared | {d} or set(ro) != shared | {e} or len(ro) != len(set(ro)):
        return "query/output axes do not line up with the state"
    batch = [c for c in outer_out if c in shared and c != seq]
    canon_qk = batch + [seq, d]
    canon_v = batch + [seq, e]
    return CausalPlan(
        perm_q=[qo.index(c) for c in canon_qk],
        perm_k=[k_letters.index(c) for c in canon_qk],
        perm_v=[v_letters.index(c) for c in canon_v],
        perm_out=[canon_v.index(c) for c in ro],
        k_index=k_index,
    )


def outer_equation_from_unsqueeze(rank: int, ax_a: int, ax_b: int, matmul: bool) -> tuple[list[str], str] | str:
    """Mul/MatMul(Unsqueeze(a, ax_a), Unsqueeze(b, ax_b)) written as an einsum equation."""
    ax_a = ax_a + rank + 1 if ax_a < 0 else ax_a
    ax_b = ax_b + rank + 1 if ax_b < 0 else ax_b
    if ax_a == ax_b or not (0 <= ax_a <= rank and 0 <= ax_b <= rank):
        return "unsqueeze axes do not form an outer product"
    if matmul and (ax_a, ax_b) != (rank, rank - 1):
        return "MatMul of unsqueezes is not a [..,d,1] @ [..,1,e] outer product"
    out = _LETTERS[: rank + 1]
    a = out[:ax_a] + out[ax_a + 1:]
    b = out[:ax_b] + out[ax_b + 1:]
    return [a, b], out


def _broadcast_reason(values_perms: list[tuple[ir.Value, list[int]]]) -> str | None:
    """Batch and sequence axes (all but the last canonical one) must agree where sizes are known."""
    dims = []
    for v, perm in values_perms:
        if v.shape is None:
            continue
        dims.append([v.shape[p] for p in perm][:-1])
    for pos in range(min((len(d) for d in dims), default=0)):
        sizes = {d[pos] for d in dims if isinstance(d[pos], int)}
        if len(sizes) > 1:
            return "q, k, v broadcast against each other on a batch axis (e.g. keys shared across heads)"
    return None


def _single_axis(value: ir.Value | None) -> int | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return int(arr.reshape(-1)[0])


class CausalChunkRule(orp.RewriteRuleClassBase):
    """outer(k, v) -> CumSum(seq) [-> Cast] -> contraction with q  ==>  chunked causal attention.

    outer: Einsum | Mul(Unsqueeze, Unsqueeze) | MatMul(Unsqueeze(k,-1), Unsqueeze(v,-2));
    contraction: Einsum | Squeeze(MatMul(Unsqueeze(q,-2), S)) | ReduceSum(Mul(Unsqueeze(q), S)).
    """

    def __init__(self, outer: str, cast: str, state_first: bool, chunk_size: int, records: list,
                 contraction: str = "einsum"):
        super().__init__(name=f"CausalChunk[{outer},{contraction}{',cast-' + cast if cast else ''}"
                              f"{',state-first' if state_first else ''}]")
        self.outer, self.cast, self.state_first = outer, cast, state_first
        self.contraction = contraction
        self.chunk_size = chunk_size
        self.records = records
        self._plan: CausalPlan | None = None

    def pattern(self, op, q, a, b, ax_a, ax_b, axis, ax_q, ax_r):
        if self.outer == "einsum":
            outer = op.Einsum(a, b, _outputs=["outer"])
        elif self.outer == "mul":
            outer = op.Mul(op.Unsqueeze(a, ax_a), op.Unsqueeze(b, ax_b), _outputs=["outer"])
        else:
            outer = op.MatMul(op.Unsqueeze(a, ax_a), op.Unsqueeze(b, ax_b), _outputs=["outer"])
        if self.cast == "both":  # fp16 dynamo export: Cast(float32) -> CumSum -> Cast(float16)
            outer = op.Cast(outer)
        state = op.CumSum(outer, axis, _outputs=["state"])
        if self.cast:
            state = op.Cast(state)
        if self.contraction == "matmul":
            return op.Squeeze(op.MatMul(op.Unsqueeze(q, ax_q), state), ax_r, _outputs=["result"])
        if self.contraction == "mul":
            uq = op.Unsqueeze(q, ax_q)
            prod = op.Mul(state, uq) if self.state_first else op.Mul(uq, state)
            return op.ReduceSum(prod, ax_r, _outputs=["result"])
        if self.state_first:
            return op.Einsum(state, q, _outputs=["result"])
        return op.Einsum(q, state, _outputs=["result"])

    def _contraction_letters(self, result: ir.Value, outer_out: str, ax_q, ax_r):
        """(operand letters, output letters, state index) of the contraction, or a refusal reason."""
        if self.contraction == "einsum":
            c_eq = einsum_equation(result.producer())
            if c_eq is None:
                return "contraction einsum equation not understood"
            return c_eq[0], c_eq[1], 0 if self.state_first else 1
        rank = len(outer_out)
        uq, ur = _single_axis(ax_q), _single_axis(ax_r)
        if uq is None or ur is None:
            return "contraction axes are not constant"
        uq, ur = uq % rank, ur % rank
        if self.contraction == "matmul":
            if (uq, ur) != (rank - 2, rank - 2):
                return "MatMul contraction is not q[..., 1, d] @ S[..., d, e] squeezed"
            return [outer_out[:-2] + outer_out[-2], outer_out], outer_out[:-2] + outer_out[-1], 1
        if result.producer().attributes.get_int("keepdims", 1) != 0:
            return "ReduceSum keeps the contracted axis"
        if uq == ur:
            return "query is broadcast along the summed axis"
        q_letters = outer_out[:uq] + outer_out[uq + 1:]
        return [q_letters, outer_out], outer_out[:ur] + outer_out[ur + 1:], 1

    def check(self, context, q, a, b, outer, state, result, axis, ax_a=None, ax_b=None, ax_q=None,
              ax_r=None, **_):
        check = orp.MatchResult()
        cumsum = state.producer()
        if any(cumsum.attributes.get_int(k, 0) for k in ("exclusive", "reverse")):
            return check.fail("exclusive/reverse CumSum is not the inclusive causal prefix sum", cumsum)
        ax = _single_axis(axis)
        if ax is None:
            return check.fail("CumSum axis is not a constant", cumsum)
        if self.outer == "einsum":
            eq = einsum_equation(outer.producer())
            if eq is None:
                return check.fail("outer-product einsum equation not understood", outer.producer())
            outer_ins, outer_out = eq
        else:
            ra = len(a.shape) if a.shape is not None else None
            rb = len(b.shape) if b.shape is not None else None
            u_a, u_b = _single_axis(ax_a), _single_axis(ax_b)
            if ra is None or ra != rb or u_a is None or u_b is None:
                return check.fail("outer product operands of unknown/unequal rank", outer.producer())
            got = outer_equation_from_unsqueeze(ra, u_a, u_b, self.outer == "matmul")
            if isinstance(got, str):
                return check.fail(got, outer.producer())
            outer_ins, outer_out = got
        c = self._contraction_letters(result, outer_out, ax_q, ax_r)
        if isinstance(c, str):
            return check.fail(c, result.producer())
        plan = plan_causal(outer_ins, outer_out, ax, c[0], c[1], c[2])
        if isinstance(plan, str):
            return check.fail(plan, result.producer())
        k, v = (a, b) if plan.k_index == 0 else (b, a)
        why = _broadcast_reason([(q, plan.perm_q), (k, plan.perm_k), (v, plan.perm_v)])
        if why:
            return check.fail(why, result.producer())
        for v in (q, a, b, result):
            if v.dtype is None or not v.dtype.is_floating_point():
                return check.fail("dtype unknown or not floating point", v)
        if self.cast == "both" and len(state.producer().inputs[0].uses()) != 1:
            return check.fail("cast outer product is used elsewhere", outer.producer())
        if len(outer.uses()) != 1:
            return check.fail("outer product is used elsewhere (it would stay materialized)", outer.producer())
        self._plan = plan
        return check

    def rewrite(self, op, q, a, b, result, outer, state, **_):
        plan = self._plan
        assert plan is not None
        k, v = (a, b) if plan.k_index == 0 else (b, a)
        out = chunked_causal(op, q, k, v, plan, self.chunk_size, result.dtype, result.producer().graph)
        self.records.append({
            "kind": "causal-numerator", "action": "chunked", "chunk": self.chunk_size,
            "nodes": [node_label(outer.producer()), node_label(state.producer()), node_label(result.producer())],
            "form": f"{self.outer}->cumsum->{self.contraction}" + (f"+cast-{self.cast}" if self.cast else ""),
        })
        return out


def _i64(op, values: list[int]) -> ir.Value:
    return op.Constant(value_ints=list(values))


def _mask(op, c: int, graph: ir.Graph | None) -> ir.Value:
    """Lower-triangular C x C mask, shared by every rewritten layer of the graph."""
    name = f"lrexport_causal_mask_{c}"
    if graph is not None and name in graph.initializers:
        return graph.initializers[name]
    return op.initializer(ir.tensor(np.tril(np.ones((c, c), dtype=np.float32)), name=name))


def _transpose(op, x: ir.Value, perm: list[int]) -> ir.Value:
    return x if perm == sorted(perm) else op.Transpose(x, perm=perm)


def _flat(op, x: ir.Value, perm: list[int]) -> tuple[ir.Value, ir.Value]:
    """x -> canonical [batch..., n, f] float32 -> [P, n, f]; returns (flat, canonical)."""
    xc = _transpose(op, x, perm)
    if x.dtype != _FLOAT32:
        xc = op.Cast(xc, to=_FLOAT32)
    return op.Reshape(xc, op.Concat(_i64(op, [-1]), op.Shape(xc, start=-2), axis=0)), xc


def _chunks(op, x3: ir.Value, pads: ir.Value, c: int) -> ir.Value:
    """[P, n, f] -> zero-padded [P, nc, C, f]."""
    return op.Reshape(op.Pad(x3, pads), op.Concat(_i64(op, [0, -1, c]), op.Shape(x3, start=2), axis=0))


def _prologue(op, q: ir.Value, k: ir.Value, perm_q: list[int], perm_k: list[int], c: int,
              graph: ir.Graph | None) -> dict[str, ir.Value]:
    """Shared by numerator and normalizer, node for node, so CSE in cleanup computes it once."""
    q3, qc = _flat(op, q, perm_q)
    k3, _ = _flat(op, k, perm_k)
    n = op.Shape(q3, start=1, end=2)
    cc = _i64(op, [c])
    pad = op.Mod(op.Sub(cc, op.Mod(n, cc)), cc)
    pads = op.Concat(_i64(op, [0, 0, 0, 0]), pad, _i64(op, [0]), axis=0)
    q4 = _chunks(op, q3, pads, c)  # [P, nc, C, d]
    k4 = _chunks(op, k3, pads, c)
    kt = op.Transpose(k4, perm=[0, 1, 3, 2])  # [P, nc, d, C]
    scores = op.Mul(op.MatMul(q4, kt), _mask(op, c, graph))  # [P, nc, C, C], j <= i only
    return {"n": n, "pads": pads, "q4": q4, "k4": k4, "kt": kt, "scores": scores, "qc": qc}


def _epilogue(op, out4: ir.Value, n: ir.Value, shape: ir.Value, tail: ir.Value, out_dtype: ir.DataType,
              perm_out: list[int]) -> ir.Value:
    """[P, nc, C, f] -> [P, n_pad, f] -> slice n -> canonical shape -> model dtype -> output order."""
    out3 = op.Reshape(out4, op.Concat(_i64(op, [0, -1]), tail, axis=0))
    out3 = op.Slice(out3, _i64(op, [0]), n, _i64(op, [1]))
    out = op.Reshape(out3, shape)
    if out_dtype != _FLOAT32:
        out = op.Cast(out, to=out_dtype)
    return _transpose(op, out, perm_out)


def chunked_causal(op, q: ir.Value, k: ir.Value, v: ir.Value, plan: CausalPlan, c: int,
                   out_dtype: ir.DataType, graph: ir.Graph | None = None) -> ir.Value:
    """out[..., i, :] = sum_{j<=i} (q_i . k_j) v_j, computed chunk by chunk in float32."""
    pro = _prologue(op, q, k, plan.perm_q, plan.perm_k, c, graph)
    v3, vc = _flat(op, v, plan.perm_v)
    v4 = _chunks(op, v3, pro["pads"], c)  # [P, nc, C, e]
    intra = op.MatMul(pro["scores"], v4)
    states = op.CumSum(op.MatMul(pro["kt"], v4), _i64(op, [1]), exclusive=1)  # [P, nc, d, e] before chunk
    out4 = op.Add(intra, op.MatMul(pro["q4"], states))
    return _epilogue(op, out4, pro["n"], op.Shape(vc), op.Shape(v3, start=2), out_dtype, plan.perm_out)


def chunked_normalizer(op, q: ir.Value, k: ir.Value, plan: CausalPlan, c: int, out_dtype: ir.DataType,
                       graph: ir.Graph | None = None) -> ir.Value:
    """z[..., i] = sum_{j<=i} q_i . k_j: row sums of the masked scores plus q . (keys of earlier chunks)."""
    pro = _prologue(op, q, k, plan.perm_q, plan.perm_k, c, graph)
    intra = op.ReduceSum(pro["scores"], _i64(op, [-1]), keepdims=1)  # [P, nc, C, 1]
    ksum = op.ReduceSum(pro["kt"], _i64(op, [-1]), keepdims=1)  # [P, nc, d, 1]
    zprev = op.CumSum(ksum, _i64(op, [1]), exclusive=1)
    out4 = op.Add(intra, op.MatMul(pro["q4"], zprev))  # [P, nc, C, 1]
    shape = op.Shape(pro["qc"], end=-1)  # [batch..., n]
    return _epilogue(op, out4, pro["n"], shape, _i64(op, [1]), out_dtype, plan.perm_out)


def plan_normalizer(k_letters: str, axis: int, c_ins: list[str], c_out: str, state_index: int) -> CausalPlan | str:
    """Z = CumSum(k, seq) contracted with q over the feature axis: letters check and layout plan."""
    if not -len(k_letters) <= axis < len(k_letters):
        return "cumsum axis out of range"
    seq = k_letters[axis]
    z_letters, q_letters = c_ins[state_index], c_ins[1 - state_index]
    if len(z_letters) != len(k_letters):
        return "contraction rank differs from the prefix-sum rank"
    ren = dict(zip(z_letters, k_letters))
    if any(ch not in ren for ch in q_letters) or any(ch not in ren for ch in c_out):
        return "query or output has axes the prefix sum lacks"
    qo = [ren[ch] for ch in q_letters]
    ro = [ren[ch] for ch in c_out]
    if sorted(qo) != sorted(k_letters):
        return "query and keys do not share their axes"
    summed = set(k_letters) - set(ro)
    if len(summed) != 1 or seq in summed or len(ro) != len(set(ro)):
        return "not a contraction over exactly one feature axis"
    (d,) = summed
    batch = [ch for ch in k_letters if ch not in (seq, d)]
    canon = batch + [seq, d]
    return CausalPlan(perm_q=[qo.index(ch) for ch in canon], perm_k=[k_letters.index(ch) for ch in canon],
                      perm_v=[], perm_out=[(batch + [seq]).index(ch) for ch in ro], k_index=0)


class CausalNormalizerRule(orp.RewriteRuleClassBase):
    """CumSum(k, seq) [-> Cast] -> Einsum with q ('bhnd,bhnd->bhn')  ==>  chunked normalizer.

    Its prologue is the numerator's, node for node, so after CSE both share the masked scores.
    """

    def __init__(self, cast: bool, state_first: bool, chunk_size: int, records: list):
        super().__init__(name=f"CausalNormalizer[{'cast,' if cast else ''}{'z-first' if state_first else 'q-first'}]")
        self.cast, self.state_first, self.chunk_size, self.records = cast, state_first, chunk_size, records
        self._plan: CausalPlan | None = None

    def pattern(self, op, q, k, axis):
        z = op.CumSum(k, axis, _outputs=["z"])
        if self.cast:
            z = op.Cast(z)
        return op.Einsum(z, q, _outputs=["result"]) if self.state_first else op.Einsum(q, z, _outputs=["result"])

    def check(self, context, q, k, axis, z, result, **_):
        check = orp.MatchResult()
        cumsum = z.producer()
        if any(cumsum.attributes.get_int(a, 0) for a in ("exclusive", "reverse")):
            return check.fail("exclusive/reverse CumSum is not the inclusive causal prefix sum", cumsum)
        ax = _single_axis(axis)
        if ax is None or k.shape is None:
            return check.fail("CumSum axis or key rank unknown", cumsum)
        eq = einsum_equation(result.producer())
        if eq is None or len(eq[0]) != 2:
            return check.fail("contraction einsum equation not understood", result.producer())
        plan = plan_normalizer(_LETTERS[: len(k.shape)], ax, eq[0], eq[1], 0 if self.state_first else 1)
        if isinstance(plan, str):
            return check.fail(plan, result.producer())
        why = _broadcast_reason([(q, plan.perm_q), (k, plan.perm_k)])
        if why:
            return check.fail(why, result.producer())
        for v in (q, k, result):
            if v.dtype is None or not v.dtype.is_floating_point():
                return check.fail("dtype unknown or not floating point", v)
        self._plan = plan
        return check

    def rewrite(self, op, q, k, z, result, **_):
        assert self._plan is not None
        self.records.append({"kind": "causal-normalizer", "action": "chunked", "chunk": self.chunk_size,
                             "nodes": [node_label(z.producer()), node_label(result.producer())]})
        return chunked_normalizer(op, q, k, self._plan, self.chunk_size, result.dtype, result.producer().graph)


class NormalizerFloat32Rule(orp.RewriteRuleClassBase):
    """Z = CumSum(phi(K)) over the sequence in a non-float32 model: run the sum in float32."""

    def __init__(self, records: list):
        super().__init__(name="NormalizerFloat32")
        self.records = records

    def pattern(self, op, k, axis):
        return op.CumSum(k, axis, _outputs=["z"])

    def check(self, context, k, axis, z, **_):
        check = orp.MatchResult()
        if k.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return check.fail("already float32 (or not float)")
        if not any(u.node.op_type == "Einsum" for u in z.uses()):
            return check.fail("not contracted by an einsum (not an attention normalizer)")
        if k.shape is not None and len(k.shape) >= 5:
            return check.fail("a d x e state, not an n x d normalizer")
        return check

    def rewrite(self, op, k, axis, z, **_):
        self.records.append({"kind": "causal-normalizer", "action": "float32-sum",
                             "nodes": [node_label(z.producer())]})
        return op.Cast(op.CumSum(op.Cast(k, to=_FLOAT32), axis), to=k.dtype)


def make_rules(chunk_size: int, records: list) -> list:
    rules = []
    for outer in ("einsum", "mul", "matmul"):
        for cast in ("", "after", "both"):
            for contraction, orders in (("einsum", (False, True)), ("matmul", (False,)), ("mul", (False, True))):
                for state_first in orders:
                    rules.append(CausalChunkRule.rule(outer, cast, state_first, chunk_size, records, contraction))
    for norm_cast in (False, True):
        for state_first in (False, True):
            rules.append(CausalNormalizerRule.rule(norm_cast, state_first, chunk_size, records))
    return rules


def survey(model: ir.Model) -> list[dict[str, Any]]:
    """What is left after the pass: big CumSums, causal normalizers, non-causal linear attention."""
    found: list[dict[str, Any]] = []
    for node in model.graph:
        if node.op_type == "CumSum":
            x = node.inputs[0]
            rank = len(x.shape) if x is not None and x.shape is not None else None
            producer = x.producer() if x is not None else None
            outer_like = producer is not None and producer.op_type in ("Einsum", "Mul", "MatMul") and (
                rank is not None and rank >= 5)
            if outer_like:
                found.append({"kind": "large-cumsum-left", "action": "kept", "nodes": [node_label(node)],
                              "rank": rank})
            elif rank is not None and rank >= 3 and any(u.node.op_type == "Einsum" for u in node.outputs[0].uses()):
                found.append({"kind": "causal-normalizer", "action": "kept (n x d prefix sum, linear size)",
                              "nodes": [node_label(node)]})
        elif node.op_type == "Einsum" and len(node.inputs) == 2:
            eq = einsum_equation(node)
            if eq is None:
                continue
            (x, y), out = eq
            shared = set(x) & set(y)
            summed = shared - set(out)
            feeds_einsum = any(u.node.op_type == "Einsum" for u in node.outputs[0].uses())
            if feeds_einsum and len(summed) == 1 and len(set(x) - shared) == 1 and len(set(y) - shared) == 1 \
                    and set(out) == (set(x) | set(y)) - summed:
                found.append({"kind": "noncausal-linear-attention", "action": "left alone (sums over n first: already O(n))",
                              "nodes": [node_label(node)], "equation": node.attributes["equation"].as_string()})
    return found


__all__ = ["CausalChunkPass", "CausalChunkRule", "CausalNormalizerRule", "chunked_normalizer", "plan_normalizer", "NormalizerFloat32Rule", "chunked_causal", "make_rules", "plan_causal", "survey",
           "parse_einsum"]


class CausalChunkPass(GraphPass):
    """Rewrite every causal cumsum state to the chunked form; report what stays (and why)."""

    name = "causal-chunk"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.opset_too_old(model):
            return ir.passes.PassResult(model, False)
        prepare(model)
        records: list = []
        count = self.apply_rules(model, make_rules(self.options.chunk_size, records))
        # only what the chunked rules left: fp16 normalizers in forms they do not know
        count += self.apply_rules(model, [NormalizerFloat32Rule.rule(records)])
        self.details.extend(records)
        for item in survey(model):
            item["counts"] = False
            self.details.append(item)
        return ir.passes.PassResult(model, bool(count))
