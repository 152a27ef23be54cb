# mypy: disable-error-code="override"
"""Einsum -> Transpose/Reshape/MatMul (or Mul/ReduceSum), 3-operand einsums split into two.

ONNX Runtime's Einsum kernel is slower than MatMul on the shapes attention produces, and TensorRT's
einsum layer takes at most two inputs, so every Einsum whose operand ranks are known is lowered:
  - operand-only letters that are summed away: ReduceSum first;
  - no contracted letter: Mul with broadcasting (outer products, scaling);
  - contracted letters but no free letter on one side or both: Mul + ReduceSum (batched dot products);
  - otherwise: Transpose to [batch, free, contracted] x [batch, contracted, free], merge groups with
    Reshape (dynamic shapes), MatMul, Reshape back, Transpose into the output order.
Equations with spaces and '...' (expanded from the operand ranks) are accepted; repeated letters
inside one operand (diagonals) are refused.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from graph_passes._base import GraphPass, Match, record
from graph_passes._util import einsum_equation, node_label, prepare


def _i64(op, values):
    return op.Constant(value_ints=list(values))


def _transpose(op, x: ir.Value, letters: str, order: str) -> ir.Value:
    if letters == order:
        return x
    return op.Transpose(x, perm=[letters.index(c) for c in order])


def _reduce(op, x: ir.Value, letters: str, drop: set[str]) -> tuple[ir.Value, str]:
    axes = [i for i, c in enumerate(letters) if c in drop]
    if not axes:
        return x, letters
    return op.ReduceSum(x, _i64(op, axes), keepdims=0), "".join(c for c in letters if c not in drop)


def _expand_to(op, x: ir.Value, letters: str, order: str) -> ir.Value:
    """x (letters, a subset of order) -> broadcastable tensor laid out as order (1 where missing)."""
    present = "".join(c for c in order if c in letters)
    x = _transpose(op, x, letters, present)
    missing = [i for i, c in enumerate(order) if c not in letters]
    if missing:
        x = op.Unsqueeze(x, _i64(op, missing))
    return x


def _group_shape(op, shape: ir.Value, groups: list[tuple[int, int]]) -> ir.Value:
    """Concat of one dim per [start, end) group of `shape` (product when the group is wider than 1)."""
    parts = []
    for start, end in groups:
        part = op.Slice(shape, _i64(op, [start]), _i64(op, [end]), _i64(op, [0]))
        if end - start != 1:
            part = op.ReduceProd(part, keepdims=1)
        parts.append(part)
    return op.Concat(*parts, axis=0) if len(parts) > 1 else parts[0]


def lower_pair(op, x: ir.Value, xl: str, y: ir.Value, yl: str, out: str) -> ir.Value:
    """Two-operand einsum 'xl,yl->out' with MatMul/Mul/ReduceSum/Transpose/Reshape."""
    x, xl = _reduce(op, x, xl, set(xl) - set(yl) - set(out))
    y, yl = _reduce(op, y, yl, set(yl) - set(xl) - set(out))
    batch = "".join(c for c in out if c in xl and c in yl)
    contracted = "".join(c for c in xl if c in yl and c not in out)
    x_free = "".join(c for c in out if c in xl and c not in yl)
    y_free = "".join(c for c in out if c in yl and c not in xl)
    if not contracted:
        return op.Mul(_expand_to(op, x, xl, out), _expand_to(op, y, yl, out))
    if not x_free or not y_free:
        full = batch + x_free + y_free + contracted
        prod = op.Mul(_expand_to(op, x, xl, full), _expand_to(op, y, yl, full))
        red = op.ReduceSum(prod, _i64(op, list(range(len(full) - len(contracted), len(full)))), keepdims=0)
        return _transpose(op, red, batch + x_free + y_free, out)
    nb = len(batch)
    xt = _transpose(op, x, xl, batch + x_free + contracted)
    yt = _transpose(op, y, yl, batch + contracted + y_free)
    simple = len(x_free) == 1 and len(y_free) == 1 and len(contracted) == 1
    if simple:
        prod = op.MatMul(xt, yt)
    else:
        xs, ys = op.Shape(xt), op.Shape(yt)
        bgroups = [(i, i + 1) for i in range(nb)]
        x3 = op.Reshape(xt, _group_shape(op, xs, bgroups + [(nb, nb + len(x_free)),
                                                           (nb + len(x_free), nb + len(x_free) + len(contracted))]))
        y3 = op.Reshape(yt, _group_shape(op, ys, bgroups + [(nb, nb + len(contracted)),
                                                           (nb + len(contracted), nb + len(contracted) + len(y_free))]))
        prod = op.MatMul(x3, y3)
        parts = []
        if nb:
            parts.append(op.Max(op.Slice(xs, _i64(op, [0]), _i64(op, [nb]), _i64(op, [0])),
                                op.Slice(ys, _i64(op, [0]), _i64(op, [nb]), _i64(op, [0]))))
        parts.append(op.Slice(xs, _i64(op, [nb]), _i64(op, [nb + len(x_free)]), _i64(op, [0])))
        parts.append(op.Slice(ys, _i64(op, [nb + len(contracted)]), _i64(op, [nb + len(contracted) + len(y_free)]),
                              _i64(op, [0])))
        prod = op.Reshape(prod, op.Concat(*parts, axis=0))
    return _transpose(op, prod, batch + x_free + y_free, out)


def lower_single(op, x: ir.Value, xl: str, out: str) -> ir.Value:
    x, xl = _reduce(op, x, xl, set(xl) - set(out))
    return op.Identity(x) if xl == out else _transpose(op, x, xl, out)


def split_order(ins: list[str], out: str) -> list[tuple[str, str, str]]:
    """Left-to-right pairwise plan for n operands: [(left, right, intermediate letters), ...]."""
    steps = []
    cur = ins[0]
    for i in range(1, len(ins)):
        later = set(out).union(*[set(t) for t in ins[i + 1:]])
        seen = []
        for c in cur + ins[i]:
            if c not in seen and c in later:
                seen.append(c)
        target = out if i == len(ins) - 1 else "".join(seen)
        steps.append((cur, ins[i], target))
        cur = target
    return steps


def _plan(node: ir.Node) -> tuple[list[str], str] | str:
    """The equation as (operand letters, output letters), or why the Einsum cannot be lowered."""
    eq = einsum_equation(node)
    if eq is None:
        return "equation not understood (implicit output, diagonal, or '...' with unknown ranks)"
    ins, out = eq
    if len(ins) > 3:
        return f"{len(ins)} operands (the rules lower up to 3)"
    for v, letters in zip(node.inputs, ins):
        if v is not None and v.shape is not None and len(v.shape) != len(letters):
            return "operand rank differs from the equation"
        if v is not None and v.dtype is not None and not v.dtype.is_floating_point():
            return "integer einsum left to the runtime"
    if any(ch not in "".join(ins) for ch in out):
        return "output letter missing from the operands"
    return eq


class EinsumLoweringRule(orp.RewriteRuleClassBase):
    """Einsum with ``arity`` operands whose equation and ranks are understood -> MatMul/Mul/ReduceSum."""

    def __init__(self, arity: int):
        super().__init__(name=f"EinsumLowering[{arity}]")
        self.arity = arity
        self._eq: tuple[list[str], str] | None = None

    def pattern(self, op, a, b, c):
        args = [a, b, c][: self.arity]
        return op.Einsum(*args, _outputs=["y"])

    def check(self, context, y, **_):
        check = orp.MatchResult()
        plan = _plan(y.producer())
        if isinstance(plan, str):
            return check.fail(plan, y.producer())
        self._eq = plan
        return check

    def rewrite(self, op, y, **kw):
        assert self._eq is not None
        ins, out = self._eq
        node = y.producer()
        vals = list(node.inputs)
        record(Match("einsum", f"lowered ({len(ins)} operands)", [node_label(node)], rewritten=True,
                     info={"equation": node.attributes["equation"].as_string()}))
        if len(ins) == 1:
            return lower_single(op, vals[0], ins[0], out)
        cur = vals[0]
        for (left, right, target), nxt in zip(split_order(ins, out), vals[1:]):
            cur = lower_pair(op, cur, left, nxt, right, target)
        return cur


EINSUM_RULES = orp.RewriteRuleSet([EinsumLoweringRule.rule(k) for k in (3, 2, 1)])


class EinsumLoweringPass(GraphPass):
    """Lower every Einsum the rules understand; list the ones left with the reason."""

    name = "einsum"

    def run(self, model: ir.Model) -> bool:
        prepare(model)
        count = self.apply_rules(model, EINSUM_RULES)
        for node in model.graph:
            if node.op_type == "Einsum":
                plan = _plan(node)
                why = plan if isinstance(plan, str) else "no lowering rule matched"
                record(Match("einsum", "left", [node_label(node)], why, matched=False,
                             info={"equation": node.attributes["equation"].as_string()}))
        return bool(count)
