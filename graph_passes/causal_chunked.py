# mypy: disable-error-code="override"
"""Causal linear attention: a prefix sum of k v^T (CumSum over the sequence or its buckets) -> the
linear-attention op, or the chunked form.

A sum per position that includes it (``S_i = sum_{j<=i} k_j v_j^T``) is exactly the op's ``linear`` rule, so
it becomes one ``lrexport.LinearAttention`` node (:func:`op_causal`), lowered for the backend by the
``linear-attention`` pass like every recurrence (ONNX Runtime's native op, or the portable form) and carried
as a state by export-step; the normalizer ``q . sum k`` is the same rule on a value column of ones, and
a numerator and normalizer that read the same q and k are merged into one node on ``[v, 1]``
(:func:`merge_shared_keys`: the op's own ``normalize`` runs that way). The model's own division (its eps,
clamp or reciprocal) is left as it is. Sums per bucket and exclusive prefixes, which the op does not
express, get the chunked form below (the record's ``why`` says which).

The naive export computes S_u = sum_{j<=u} k_j v_j^T as an outer product, CumSum over the sequence, then a
contraction with q. That materializes an n x d x e tensor per head. The chunked form splits the sequence
into chunks of C: inside a chunk it uses the masked (q k^T) v product (C x C per chunk), across chunks it
passes d x e states with an exclusive CumSum over chunks. Memory drops from O(n d e) to O(n (C + d e / C)),
work is about the same.

graph_passes.causal_canon first brings every surface form to one canonical form; then ONE rule,
:class:`StateContractionRule`, reads the state contraction Einsum(q, S) (graph_passes.causal_plan checks its
letters). It covers: increments that also sum a within-bucket axis of size W (then query p = u*W + w sees
the keys of the buckets up to its own: a block-triangular mask, chunks a multiple of W), exclusive prefixes
(a strictly block-triangular mask), a per-position scale after the contraction (left in place: it
multiplies the rewritten contraction), and the normalizer Z = CumSum(k) contracted with q (row sums of the
same masked scores plus q . keys of earlier chunks; its prologue is the numerator's, node for node, so the
cleanup pass's CSE computes the scores once). What is not causal linear attention is refused; the rule's
reason lands in the pass details on the CumSum it leaves (``large-cumsum-left``, action ``left``, not a match).
The rule sets (``causal_canon.CANONICAL_RULES``, then :data:`CAUSAL_RULES`) also run under a stock
``onnxscript.rewriter.rewrite``: chunk 64 and no records unless a :func:`collecting` block is active.

The pass runs before the einsum pass (DEFAULT_PASSES): the canonical form is made of Einsums, and lowering them
first would turn the increment into Transpose + MatMul and the 3-operand einsum into MatMul + Mul chains that
hide which axis is summed where. The TorchScript exporter's computed F.pad pads are folded first (see
:func:`fold_small_shape_constants`).

The sequence is padded inside the graph to a multiple of C (zero keys/values add nothing to the state) and
sliced back, so any length works, including n < C. Sums run in float32 whatever the model dtype. A
normalizer in another form is left as its n x d CumSum (linear size), run in float32 when the model is not.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (CSE)
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import pattern as orp

from graph_passes._base import GraphPass, Match, collecting, record, rule_options
from graph_passes._util import const_array, einsum_equation, node_label, prepare, parse_einsum
from graph_passes.causal_canon import CANONICAL_RULES, PrefixSum, prefix_sum, single_axis
from graph_passes.causal_plan import CausalPlan, broadcast_reason, bucket_size, plan_causal, plan_normalizer
from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE

OP_ACTION = f"rewritten ({DOMAIN}.{OP_TYPE}, rule linear)"

_FLOAT32 = ir.DataType.FLOAT


def _i64(op, values: list[int]) -> ir.Value:
    return op.Constant(value_ints=list(values))


def causal_mask(c: int, bucket: int = 1, exclusive: bool = False) -> np.ndarray:
    """C x C mask of the keys query i sees inside a chunk: its bucket and earlier ones (or earlier only)."""
    b = np.arange(c) // bucket
    seen = b[None, :] < b[:, None] if exclusive else b[None, :] <= b[:, None]
    return seen.astype(np.float32)


def _mask(op, c: int, bucket: int, exclusive: bool, graph: ir.Graph | None) -> ir.Value:
    """The mask as an initializer, shared by every rewritten layer of the graph."""
    name = f"lrexport_causal_mask_{c}" + (f"_b{bucket}" if bucket > 1 else "") + ("_excl" if exclusive else "")
    if graph is not None and name in graph.initializers:
        return graph.initializers[name]
    return op.initializer(ir.tensor(causal_mask(c, bucket, exclusive), name=name))


def _transpose(op, x: ir.Value, perm: list[int]) -> ir.Value:
    return x if perm == sorted(perm) else op.Transpose(x, perm=perm)


def _flat(op, x: ir.Value, perm: list[int], bucketed: bool) -> tuple[ir.Value, ir.Value]:
    """x -> canonical [batch..., u, (w), f] float32 -> [P, n, f] (n = u * w); returns (flat, canonical)."""
    xc = _transpose(op, x, perm)
    if x.dtype != _FLOAT32:
        xc = op.Cast(xc, to=_FLOAT32)
    if bucketed:
        seq = op.Mul(op.Shape(xc, start=-3, end=-2), op.Shape(xc, start=-2, end=-1))
        return op.Reshape(xc, op.Concat(_i64(op, [-1]), seq, op.Shape(xc, start=-1), axis=0)), xc
    return op.Reshape(xc, op.Concat(_i64(op, [-1]), op.Shape(xc, start=-2), axis=0)), xc


def _chunks(op, x3: ir.Value, pads: ir.Value, c: int) -> ir.Value:
    """[P, n, f] -> zero-padded [P, nc, C, f]."""
    return op.Reshape(op.Pad(x3, pads), op.Concat(_i64(op, [0, -1, c]), op.Shape(x3, start=2), axis=0))


def _prologue(op, q: ir.Value, k: ir.Value, plan: CausalPlan, c: int, bucket: int, exclusive: bool,
              graph: ir.Graph | None) -> dict[str, ir.Value]:
    """Shared by numerator and normalizer, node for node, so CSE in cleanup computes it once."""
    q3, qc = _flat(op, q, plan.perm_q, plan.bucketed)
    k3, _ = _flat(op, k, plan.perm_k, plan.bucketed)
    n = op.Shape(q3, start=1, end=2)
    cc = _i64(op, [c])
    pad = op.Mod(op.Sub(cc, op.Mod(n, cc)), cc)
    pads = op.Concat(_i64(op, [0, 0, 0, 0]), pad, _i64(op, [0]), axis=0)
    q4 = _chunks(op, q3, pads, c)  # [P, nc, C, d]
    k4 = _chunks(op, k3, pads, c)
    kt = op.Transpose(k4, perm=[0, 1, 3, 2])  # [P, nc, d, C]
    scores = op.Mul(op.MatMul(q4, kt), _mask(op, c, bucket, exclusive, graph))  # [P, nc, C, C], keys seen only
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


def chunk_for(chunk_size: int, bucket: int) -> int:
    """The chunk: ``chunk_size`` rounded up to a multiple of the bucket (chunks hold whole buckets)."""
    return -(-max(chunk_size, 1) // bucket) * bucket


def chunked_causal(op, q: ir.Value, k: ir.Value, v: ir.Value, plan: CausalPlan, c: int,
                   out_dtype: ir.DataType, graph: ir.Graph | None = None, bucket: int = 1,
                   exclusive: bool = False) -> ir.Value:
    """out[..., i, :] = sum_{j seen by i} (q_i . k_j) v_j, computed chunk by chunk in float32."""
    pro = _prologue(op, q, k, plan, c, bucket, exclusive, graph)
    v3, vc = _flat(op, v, plan.perm_v, plan.bucketed)
    v4 = _chunks(op, v3, pro["pads"], c)  # [P, nc, C, e]
    intra = op.MatMul(pro["scores"], v4)
    states = op.CumSum(op.MatMul(pro["kt"], v4), _i64(op, [1]), exclusive=1)  # [P, nc, d, e] before chunk
    out4 = op.Add(intra, op.MatMul(pro["q4"], states))
    return _epilogue(op, out4, pro["n"], op.Shape(vc), op.Shape(v3, start=2), out_dtype, plan.perm_out)


def chunked_normalizer(op, q: ir.Value, k: ir.Value, plan: CausalPlan, c: int, out_dtype: ir.DataType,
                       graph: ir.Graph | None = None, bucket: int = 1, exclusive: bool = False) -> ir.Value:
    """z[..., i] = sum_{j seen by i} q_i . k_j: row sums of the masked scores plus q . (keys of earlier chunks)."""
    pro = _prologue(op, q, k, plan, c, bucket, exclusive, graph)
    intra = op.ReduceSum(pro["scores"], _i64(op, [-1]), keepdims=1)  # [P, nc, C, 1]
    ksum = op.ReduceSum(pro["kt"], _i64(op, [-1]), keepdims=1)  # [P, nc, d, 1]
    zprev = op.CumSum(ksum, _i64(op, [1]), exclusive=1)
    out4 = op.Add(intra, op.MatMul(pro["q4"], zprev))  # [P, nc, C, 1]
    shape = op.Shape(pro["qc"], end=-1)  # [batch..., u, (w)]
    return _epilogue(op, out4, pro["n"], shape, _i64(op, [1]), out_dtype, plan.perm_out)


def _dims(value: ir.Value, perm: list[int]) -> list | None:
    """The value's dims in canonical order (symbolic dims as their names), None when its shape is unknown."""
    if value.shape is None or len(value.shape) != len(perm):
        return None
    return [d.value if isinstance(d, ir.SymbolicDim) else d for d in (value.shape[p] for p in perm)]


class _OpLayout:
    """How the canonical [batch..., n, f] operands become the op's (B, n, H, f) and back: B the first batch
    axis, H the product of the others when their sizes are static (a static head count; the step model's
    state then has the batch as its only free dim), else B all batch axes flattened and H = 1."""

    def __init__(self, batch: list, heads: int | None):
        self.batch, self.heads = batch, heads

    def shape(self, n, f) -> ir.Shape:
        b0 = self.batch[0] if self.batch else 1
        if self.heads is None:
            b0 = b0 if len(self.batch) <= 1 else None
        return ir.Shape([b0, n, self.heads or 1, f])

    def to_op(self, op, xc: ir.Value) -> ir.Value:
        nb = len(self.batch)
        if nb >= 2 and self.heads is not None:  # [b0, b1.., n, f] -> [b0, n, b1.., f] -> [b0, n, H, f]
            xt = op.Transpose(xc, perm=[0, nb] + list(range(1, nb)) + [nb + 1])
            return op.Reshape(xt, _i64(op, [0, 0, self.heads, -1]))
        if nb == 1:
            return op.Unsqueeze(xc, _i64(op, [2]))
        flat = op.Reshape(xc, op.Concat(_i64(op, [-1]), op.Shape(xc, start=-2), axis=0))
        return op.Unsqueeze(flat, _i64(op, [2]))

    def from_op(self, op, out: ir.Value, like: ir.Value) -> ir.Value:
        """(B, n, H, e) -> canonical [batch..., n, e]; ``like`` is a canonical operand ([batch..., n, f])."""
        nb = len(self.batch)
        if nb >= 2 and self.heads is not None:
            split = op.Reshape(out, _i64(op, [0, 0] + [int(d) for d in self.batch[1:]] + [-1]))
            return op.Transpose(split, perm=[0] + list(range(2, nb + 1)) + [1, nb + 1])
        if nb == 1:
            return op.Squeeze(out, _i64(op, [2]))
        return op.Reshape(out, op.Concat(op.Shape(like, end=-1), op.Shape(out, start=-1), axis=0))


def _op_layout(m: "_Site") -> _OpLayout | str:
    """The op layout of a site, or why it stays in the chunked form (the op is a per-token inclusive sum)."""
    if m.bucket != 1:
        return f"sums per bucket of {m.bucket} positions (the op sums per position)"
    if m.prefix.exclusive:
        return "an exclusive prefix (the op's sum includes the current position)"
    dq, dk = _dims(m.q, m.plan.perm_q), _dims(m.k, m.plan.perm_k)
    dv = _dims(m.v, m.plan.perm_v) if m.v is not None else [None, 1]
    if dq is None or dk is None or dv is None:
        return "operand ranks unknown"
    if not isinstance(dq[-1], int) or not isinstance(dv[-1], int):
        return "the feature dims are not static"
    batch = dq[: len(dq) - (3 if m.plan.bucketed else 2)]
    rest = batch[1:]
    heads = int(np.prod(rest)) if rest and all(isinstance(d, int) for d in rest) else None
    if len(batch) < 2:
        heads = 1
    return _OpLayout(batch, heads)


def op_causal(op, m: "_Site", layout: _OpLayout, out_dtype: ir.DataType) -> ir.Value:
    """The site as one ``lrexport.LinearAttention`` node (rule linear): the numerator's ``q . S``, or for the
    normalizer ``q . z`` as the linear rule on a value of ones (the op's own normalizer runs it that way)."""
    def canonical(x: ir.Value, perm: list[int]) -> ir.Value:
        xc = _transpose(op, x, perm)
        return op.Squeeze(xc, _i64(op, [-2])) if m.plan.bucketed else xc  # the bucket of one position

    qc, kc = canonical(m.q, m.plan.perm_q), canonical(m.k, m.plan.perm_k)
    dq = _dims(m.q, m.plan.perm_q)
    assert dq is not None
    n = dq[-3] if m.plan.bucketed else dq[-2]
    q4, k4 = layout.to_op(op, qc), layout.to_op(op, kc)
    q4.type, q4.shape = m.q.type, layout.shape(n, dq[-1])
    k4.type, k4.shape = m.k.type, layout.shape(n, dq[-1])
    if m.v is not None:
        dv = _dims(m.v, m.plan.perm_v)
        assert dv is not None
        v4 = layout.to_op(op, canonical(m.v, m.plan.perm_v))
        v4.type, v4.shape = m.v.type, layout.shape(n, dv[-1])
    else:
        assert m.k.dtype is not None
        ones = ir.tensor(np.ones(1, dtype=m.k.dtype.numpy()))
        v4 = op.ConstantOfShape(op.Concat(op.Shape(k4, start=0, end=3), _i64(op, [1]), axis=0), value=ones)
        v4.type, v4.shape = m.k.type, layout.shape(n, 1)
    h = layout.heads or 1
    out, state = op.LinearAttention(q4, k4, v4, _domain=DOMAIN, _outputs=2, rule="linear", scale=1.0,
                                    decay="none", normalize=0, eps=0.0, q_heads=h, k_heads=h, v_heads=h)
    e = v4.shape[3]
    out.type, out.shape = m.q.type, layout.shape(n, e)
    b0 = layout.shape(n, e)[0]
    state.type, state.shape = ir.TensorType(_FLOAT32), ir.Shape([b0, h, dq[-1], e])
    res = layout.from_op(op, out, qc)  # [batch..., n, e]
    if m.plan.bucketed:
        res = op.Unsqueeze(res, _i64(op, [-2]))
    if m.v is None:
        res = op.Squeeze(res, _i64(op, [-1]))
    if m.q.dtype != out_dtype:
        res = op.Cast(res, to=out_dtype)
    return _transpose(op, res, m.plan.perm_out)


class _Site:
    """What the check found, for the rewrite (the rule's plan; the report's record is a :class:`Match`)."""

    def __init__(self, kind: str, plan: CausalPlan, prefix: PrefixSum, q: ir.Value, k: ir.Value,
                 v: ir.Value | None, bucket: int = 1):
        self.kind, self.plan, self.prefix, self.q, self.k, self.v = kind, plan, prefix, q, k, v
        self.bucket = bucket


def _numerator(prefix: PrefixSum, q: ir.Value, eq: tuple[list[str], str], state_index: int) -> _Site | str:
    inc = prefix.increment.producer()
    if inc is None or inc.op_type != "Einsum" or len(inc.inputs) != 2:
        return "the prefix sum's increment is not a two-operand outer product"
    inc_eq = einsum_equation(inc)
    if inc_eq is None:
        return "increment einsum equation not understood"
    plan = plan_causal(inc_eq[0], inc_eq[1], prefix.axis, eq[0], eq[1], state_index)
    if isinstance(plan, str):
        return plan
    k, v = inc.inputs if plan.k_index == 0 else inc.inputs[::-1]
    assert k is not None and v is not None
    if prefix.increment.is_graph_output() or len(prefix.increment.uses()) != 1:
        return "outer product is used elsewhere (it would stay materialized)"
    return _Site("numerator", plan, prefix, q, k, v)


def _normalizer(prefix: PrefixSum, q: ir.Value, eq: tuple[list[str], str], state_index: int) -> _Site | str:
    """Z = CumSum(k) | CumSum(ReduceSum_w(k)); the bucketed reading first, then the plain one."""
    inc, reasons = prefix.increment, []
    red = inc.producer()
    candidates: list[tuple[ir.Value, int | None]] = []
    if red is not None and red.op_type == "ReduceSum" and red.attributes.get_int("keepdims", 1) == 0 \
            and len(red.inputs) > 1 and single_axis(red.inputs[1]) is not None and red.inputs[0] is not None \
            and red.inputs[0].shape is not None:
        rank = len(red.inputs[0].shape)
        candidates.append((red.inputs[0], single_axis(red.inputs[1]) % rank))  # type: ignore[operator]
    candidates.append((inc, None))
    for k, w_axis in candidates:
        if k.shape is None:
            reasons.append("key rank unknown")
            continue
        letters = "abcdefghijklmnopqrstuvwxyz"[: len(k.shape)]
        plan = plan_normalizer(letters, prefix.axis, eq[0], eq[1], state_index, w_axis)
        if not isinstance(plan, str):
            return _Site("normalizer", plan, prefix, q, k, None)
        reasons.append(plan)
    return reasons[-1]


class StateContractionRule(orp.RewriteRuleClassBase):
    """Einsum(q, S), S a prefix sum of k (x) v (numerator) or of k (normalizer)  ==>  chunked causal form.

    The one rule of the pass: every surface form reaches it through graph_passes.causal_canon. The chunk comes
    from :func:`rule_options`; a refusal is recorded (not matched, keyed by the CumSum) with its reason."""

    def __init__(self) -> None:
        super().__init__(name="CausalStateContraction")
        self._site: _Site | None = None

    def pattern(self, op, x, y):
        return op.Einsum(x, y, _outputs=["result"])

    @staticmethod
    def _refuse(check: orp.MatchResult, reason: str, prefix: PrefixSum, node: ir.Node):
        label = node_label(prefix.cumsum)
        record(Match("causal-state-contraction", "refused", [label, node_label(node)], reason, matched=False),
               key=("refused", label))
        return check.fail(reason, node)

    def _read(self, x: ir.Value, y: ir.Value, node: ir.Node) -> _Site | str | None:
        """The site, a refusal reason, or None when no operand is a prefix sum (not ours to judge)."""
        eq = einsum_equation(node)
        found = [(i, p) for i, p in enumerate((prefix_sum(x), prefix_sum(y))) if not isinstance(p, str)]
        if not found:
            return None
        state_index, prefix = found[0]
        assert isinstance(prefix, PrefixSum)
        if eq is None:
            return "contraction einsum equation not understood"
        q = (x, y)[1 - state_index]
        inc = prefix.increment.producer()
        if inc is None or inc.op_type != "Einsum" or len(inc.inputs) != 2:
            return _normalizer(prefix, q, eq, state_index)
        got = _numerator(prefix, q, eq, state_index)
        if isinstance(got, str):  # keys that are themselves an einsum: a normalizer, or the numerator's reason
            normal = _normalizer(prefix, q, eq, state_index)
            return normal if isinstance(normal, _Site) else got
        return got

    @staticmethod
    def _vet(m: _Site, result: ir.Value) -> str | None:
        """Uses, broadcasting, bucket size and dtypes of a letters-wise valid site."""
        if any(v.is_graph_output() or len(v.uses()) != 1 for v in m.prefix.inner):
            return "the prefix sum is used elsewhere (it would stay materialized)"
        pairs = [(m.q, m.plan.perm_q), (m.k, m.plan.perm_k)] + ([(m.v, m.plan.perm_v)] if m.v is not None else [])
        why = broadcast_reason(pairs)
        if why:
            return why
        bucket = bucket_size(m.plan, m.k, m.q)
        if isinstance(bucket, str):
            return bucket
        m.bucket = bucket
        for v in (m.q, m.k, m.v, result):
            if v is not None and (v.dtype is None or not v.dtype.is_floating_point()):
                return "dtype unknown or not floating point"
        return None

    def check(self, context, x, y, result, **_):
        check = orp.MatchResult()
        node = result.producer()
        got = self._read(x, y, node)
        if got is None:
            return check.fail("no operand is a prefix sum (CumSum)", node)
        prefix = got.prefix if isinstance(got, _Site) else next(
            p for p in (prefix_sum(x), prefix_sum(y)) if isinstance(p, PrefixSum))
        if isinstance(got, str):
            return self._refuse(check, got, prefix, node)
        why = self._vet(got, result)
        if why:
            return self._refuse(check, why, prefix, node)
        self._site = got
        return check

    def rewrite(self, op, result, **_):
        m = self._site
        assert m is not None
        node = result.producer()
        cumsum = node_label(m.prefix.cumsum)
        layout = _op_layout(m)
        if not isinstance(layout, str):
            out = op_causal(op, m, layout, result.dtype)
            record(Match(f"causal-{m.kind}", OP_ACTION, [cumsum, node_label(node)], rewritten=True,
                         info={"heads": layout.heads or 1}), key=("refused", cumsum))
            return out
        c = chunk_for(rule_options().chunk_size, m.bucket)
        args = dict(graph=node.graph, bucket=m.bucket, exclusive=m.prefix.exclusive)
        if m.kind == "numerator":
            assert m.v is not None
            out = chunked_causal(op, m.q, m.k, m.v, m.plan, c, result.dtype, **args)
        else:
            out = chunked_normalizer(op, m.q, m.k, m.plan, c, result.dtype, **args)
        info: dict[str, object] = {"chunk": c, "why": layout}
        if m.plan.bucketed:
            info["bucket"] = m.bucket
        if m.prefix.exclusive:
            info["prefix"] = "exclusive"
        record(Match(f"causal-{m.kind}", "chunked", [cumsum, node_label(node)], rewritten=True, info=info),
               key=("refused", cumsum))  # a refusal of this CumSum by an earlier reading no longer holds
        return out


class NormalizerFloat32Rule(orp.RewriteRuleClassBase):
    """Z = CumSum(phi(K)) over the sequence in a non-float32 model: run the sum in float32."""

    def __init__(self) -> None:
        super().__init__(name="NormalizerFloat32")

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
        record(Match("causal-normalizer", "float32-sum", [node_label(z.producer())], rewritten=True))
        return op.Cast(op.CumSum(op.Cast(k, to=_FLOAT32), axis), to=k.dtype)


# module-level rule sets, each usable with a stock onnxscript rewrite after causal_canon.CANONICAL_RULES
CAUSAL_RULES = orp.RewriteRuleSet([StateContractionRule.rule()])
NORMALIZER_FLOAT32_RULES = orp.RewriteRuleSet([NormalizerFloat32Rule.rule()])


def _cumsum_left(node: ir.Node, refusals: dict[str, str]) -> Match | None:
    """A CumSum no rule chunked: a large running sum (rank >= 5 from a product), or an n x d normalizer."""
    x = node.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    producer = x.producer() if x is not None else None
    label = node_label(node)
    if rank is not None and rank >= 5 and producer is not None and producer.op_type in ("Einsum", "Mul", "MatMul"):
        why = refusals.get(label, "no causal state contraction reads it")
        return Match("large-cumsum-left", "left", [label], why, matched=False, info={"rank": rank})
    if rank is not None and rank >= 3 and any(u.node.op_type == "Einsum" for u in node.outputs[0].uses()):
        why = refusals.get(label, "an n x d prefix sum: linear size, nothing to gain")
        return Match("causal-normalizer", "left", [label], why, matched=False)
    return None


def _noncausal_left(node: ir.Node) -> Match | None:
    """A two-operand Einsum that sums over the shared sequence first (k^T v) and feeds another Einsum."""
    eq = einsum_equation(node)
    if eq is None:
        return None
    (x, y), out = eq
    shared = set(x) & set(y)
    summed = shared - set(out)
    feeds_einsum = any(u.node.op_type == "Einsum" for u in node.outputs[0].uses())
    if feeds_einsum and len(summed) == 1 and len(set(x) - shared) == 1 and len(set(y) - shared) == 1 \
            and set(out) == (set(x) | set(y)) - summed:
        return Match("noncausal-linear-attention", "left", [node_label(node)],
                     "non-causal: sums over n first, already O(n)", matched=False,
                     info={"equation": node.attributes["equation"].as_string()})
    return None


def survey(model: ir.Model, refusals: dict[str, str] | None = None) -> list[Match]:
    """What is left after the pass: big CumSums (with the reason the rule refused them), causal normalizers,
    non-causal linear attention."""
    found: list[Match] = []
    for node in model.graph:
        left = None
        if node.op_type == "CumSum":
            left = _cumsum_left(node, refusals or {})
        elif node.op_type == "Einsum" and len(node.inputs) == 2:
            left = _noncausal_left(node)
        if left is not None:
            found.append(left)
    return found


__all__ = ["CAUSAL_RULES", "NORMALIZER_FLOAT32_RULES", "CausalChunkPass", "StateContractionRule",
           "NormalizerFloat32Rule", "causal_mask", "chunk_for", "chunked_causal", "chunked_normalizer", "plan_causal",
           "plan_normalizer", "survey", "parse_einsum"]


def fold_small_shape_constants(model: ir.Model) -> None:
    """The TorchScript exporter writes F.pad's pads as a computation over ConstantOfShape, which onnxscript's
    constant folder leaves alone by default; fold it where it makes a small vector, so the shift is readable."""

    def should_fold(node: ir.Node) -> bool | None:
        if node.op_type == "ConstantOfShape":
            shape = const_array(node.inputs[0])
            return True if shape is not None and int(np.prod(shape)) <= 64 else None
        return None

    fold_constants_ir(model, should_fold=should_fold)


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _plain_linear(node: ir.Node) -> bool:
    """A linear-rule node without decay, normalizer, initial state or a read final state."""
    return (node.domain == DOMAIN and node.op_type == OP_TYPE and _attr(node, "rule") == "linear"
            and not _attr(node, "normalize", 0) and len([x for x in node.inputs[3:] if x is not None]) == 0
            and len(node.inputs) >= 3 and all(x is not None and x.shape is not None for x in node.inputs[:3])
            and not node.outputs[1].uses() and not node.outputs[1].is_graph_output()
            and isinstance(node.inputs[2].shape[3], int))


def merge_shared_keys(model: ir.Model) -> list[str]:
    """Linear-rule nodes reading the same q and k (a numerator and its normalizer, after CSE) -> one node on
    their values side by side, its output split: the op runs q . k once, the normalizer being the value
    column of ones (as the op's ``normalize`` does it). Returns the labels of the nodes merged into another."""
    groups: dict[tuple, list[ir.Node]] = {}
    for node in model.graph:
        if _plain_linear(node):
            key = (id(node.inputs[0]), id(node.inputs[1]), _attr(node, "scale", 1.0),
                   *(_attr(node, a) for a in ("q_heads", "k_heads", "v_heads")))
            groups.setdefault(key, []).append(node)
    merged: list[str] = []
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        widths = [int(n.inputs[2].shape[3]) for n in nodes]
        label = node_label(first) + "/merged"

        def mk(op_type, inputs, attrs=None, outputs=1, domain="", _label=label, _meta=dict(first.metadata_props)):
            new = ir.node(op_type, inputs, attrs or {}, domain=domain, num_outputs=outputs,
                          name=f"{_label}/{op_type}", metadata_props=_meta)
            model.graph.append(new)
            return new

        widths_c = ir.node("Constant", [], {"value": ir.tensor(np.array(widths, np.int64))}, name=f"{label}/widths")
        model.graph.append(widths_c)
        cat = mk("Concat", [n.inputs[2] for n in nodes], {"axis": -1})
        v0 = nodes[0].inputs[2]
        cat.outputs[0].type = v0.type
        cat.outputs[0].shape = ir.Shape([*list(v0.shape)[:3], sum(widths)])
        attrs = {k: a for k, a in first.attributes.items()}
        la = mk(OP_TYPE, [first.inputs[0], first.inputs[1], cat.outputs[0]], attrs, outputs=2, domain=DOMAIN)
        out0 = first.outputs[0]
        la.outputs[0].type = out0.type
        la.outputs[0].shape = ir.Shape([*list(out0.shape or [None] * 4)[:3], sum(widths)])
        st = first.outputs[1]
        la.outputs[1].type = st.type
        if st.shape is not None:
            la.outputs[1].shape = ir.Shape([*list(st.shape)[:3], sum(widths)])
        split = mk("Split", [la.outputs[0], widths_c.outputs[0]], {"axis": -1}, outputs=len(nodes))
        for node, part, w in zip(nodes, split.outputs, widths):
            part.type = node.outputs[0].type
            part.shape = node.outputs[0].shape
            ir.convenience.replace_all_uses_with(node.outputs[0], part)
        for node in nodes:
            model.graph.remove(node, safe=True)
        merged += [node_label(n) for n in nodes[1:]]
    if merged:
        model.graph.sort()
    return merged


class CausalChunkPass(GraphPass):
    """Canonicalize, rewrite every causal state contraction to the chunked form; report what is left (and why)."""

    name = "causal-chunk"

    def run(self, model: ir.Model) -> bool:
        fold_small_shape_constants(model)
        prepare(model)
        canonical = sum(self.apply_rules(model, rules) for rules in CANONICAL_RULES)
        if canonical:
            prepare(model)  # shapes of the canonical nodes, for the rule's checks
            record(Match("causal-canonical", f"{canonical} surface form(s) rewritten", rewritten=True, matched=False))
        with collecting(self.options) as found:  # the rule's refusals name why a CumSum is left
            count = self.apply_rules(model, CAUSAL_RULES)
            # only what the chunked rule left: fp16 normalizers in forms it does not know
            count += self.apply_rules(model, NORMALIZER_FLOAT32_RULES)
        if any(m.matched and m.action == OP_ACTION for m in found):
            model.opset_imports.setdefault(DOMAIN, 1)
            ir.passes.common.CommonSubexpressionEliminationPass()(model)  # the q and k the nodes share
            merged = merge_shared_keys(model)
            if merged:
                record(Match("causal-normalizer", "merged", merged, reason="its node reads the numerator's q and k: "
                             "one node on [v, 1]", matched=False, info={"count": len(merged)}))
        refusals = {m.nodes[0]: m.reason or "" for m in found if not m.matched}
        for m in found:
            if m.matched:
                record(m)
        for m in survey(model, refusals):
            record(m)
        return bool(count or canonical)
