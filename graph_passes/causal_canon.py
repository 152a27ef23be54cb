# mypy: disable-error-code="override"
"""Canonical form of causal running sums, so that one rule (causal_chunked.StateContractionRule) reads them all.

Exporters and authors write the same causal linear attention in many ways. These rules rewrite, around
prefix sums only (a CumSum, optionally between Casts), each surface form into the canonical one, exactly:

- outer products Mul/MatMul(Unsqueeze(k), Unsqueeze(v)) feeding a CumSum  ->  Einsum(k, v);
- contractions Squeeze(MatMul(Unsqueeze(q, -2), S)) and ReduceSum(Mul(Unsqueeze(q), S))  ->  Einsum(q, S);
- an n-ary einsum that multiplies in a per-position factor (the normalizer's reciprocal in
  'bhund,bhude,bhun->bhune')  ->  Mul(Einsum(q, S), factor), so the contraction is two-operand;
- an exclusive prefix written as Pad(1 before) + Slice(drop the last)  ->  CumSum(exclusive=1).

Casts around the CumSum are read once, by :func:`prefix_sum`, instead of one rule instance per cast form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from graph_passes._util import const_array, einsum_equation

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def single_axis(value: ir.Value | None) -> int | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return int(arr.reshape(-1)[0])


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype is not None and value.dtype.is_floating_point()


@dataclass
class PrefixSum:
    """``value`` = [Cast] CumSum_axis([Cast] increment), as a contraction reads it."""

    value: ir.Value
    cumsum: ir.Node
    increment: ir.Value  # the CumSum's input, Casts stripped
    axis: int  # non-negative, in the increment's axes
    exclusive: bool
    inner: list[ir.Value] = field(default_factory=list)  # values between increment and ``value`` (inclusive)


def _strip_cast(value: ir.Value, inner: list[ir.Value]) -> ir.Value:
    node = value.producer()
    if node is not None and node.op_type == "Cast" and node.domain == "" and _is_float(node.inputs[0]) \
            and _is_float(value):
        inner.append(value)
        return node.inputs[0]
    return value


def prefix_sum(value: ir.Value | None) -> PrefixSum | str:
    """The prefix sum ``value`` is read from, or why it is none (reason for the report)."""
    if value is None:
        return "no value"
    inner: list[ir.Value] = []
    v = _strip_cast(value, inner)
    node = v.producer()
    if node is None or node.op_type != "CumSum" or node.domain != "":
        return "not a prefix sum (CumSum)"
    inner.append(v)
    if node.attributes.get_int("reverse", 0):
        return "reverse CumSum is not a causal prefix sum"
    axis = single_axis(node.inputs[1])
    if axis is None:
        return "CumSum axis is not a constant"
    x = _strip_cast(node.inputs[0], inner)
    if x.shape is None:
        return "prefix-sum input of unknown rank"
    rank = len(x.shape)
    if not -rank <= axis < rank:
        return "cumsum axis out of range"
    exclusive = bool(node.attributes.get_int("exclusive", 0))
    return PrefixSum(value, node, x, axis % rank, exclusive, inner)


def _feeds_prefix_sum(value: ir.Value) -> bool:
    for use in value.uses():
        node = use.node
        if node.op_type == "Cast" and node.domain == "":
            if any(u.node.op_type == "CumSum" for u in node.outputs[0].uses()):
                return True
        elif node.op_type == "CumSum" and use.idx == 0:
            return True
    return False


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


def _equation(ins: list[str], out: str) -> str:
    return ",".join(ins) + "->" + out


class OuterToEinsumRule(orp.RewriteRuleClassBase):
    """Mul(Unsqueeze(a), Unsqueeze(b)) | MatMul(Unsqueeze(k, -1), Unsqueeze(v, -2)) feeding a CumSum -> Einsum."""

    def __init__(self, matmul: bool):
        super().__init__(name=f"CausalCanonOuter[{'matmul' if matmul else 'mul'}]")
        self.matmul = matmul
        self._eq = ""

    def pattern(self, op, a, b, ax_a, ax_b):
        ua, ub = op.Unsqueeze(a, ax_a), op.Unsqueeze(b, ax_b)
        return op.MatMul(ua, ub, _outputs=["outer"]) if self.matmul else op.Mul(ua, ub, _outputs=["outer"])

    def check(self, context, a, b, ax_a, ax_b, outer, **_):
        check = orp.MatchResult()
        if not _feeds_prefix_sum(outer):
            return check.fail("does not feed a prefix sum")
        ra = len(a.shape) if a.shape is not None else None
        rb = len(b.shape) if b.shape is not None else None
        u_a, u_b = single_axis(ax_a), single_axis(ax_b)
        if ra is None or ra != rb or u_a is None or u_b is None:
            return check.fail("outer product operands of unknown/unequal rank")
        got = outer_equation_from_unsqueeze(ra, u_a, u_b, self.matmul)
        if isinstance(got, str):
            return check.fail(got)
        self._eq = _equation(*got)
        return check

    def rewrite(self, op, a, b, **_):
        return op.Einsum(a, b, equation=self._eq)


class ContractionToEinsumRule(orp.RewriteRuleClassBase):
    """(q.unsqueeze(-2) @ S).squeeze(-2) | (q.unsqueeze(i) * S).sum(j), S a prefix sum  ->  Einsum(q, S)."""

    def __init__(self, form: str, state_first: bool = False):
        super().__init__(name=f"CausalCanonContraction[{form}{',state-first' if state_first else ''}]")
        self.form, self.state_first = form, state_first
        self._eq = ""

    def pattern(self, op, q, s, ax_q, ax_r):
        uq = op.Unsqueeze(q, ax_q)
        if self.form == "matmul":
            return op.Squeeze(op.MatMul(uq, s), ax_r, _outputs=["result"])
        prod = op.Mul(s, uq) if self.state_first else op.Mul(uq, s)
        return op.ReduceSum(prod, ax_r, _outputs=["result"])

    def check(self, context, q, s, ax_q, ax_r, result, **_):
        check = orp.MatchResult()
        if isinstance(prefix_sum(s), str):
            return check.fail("the state operand is not a prefix sum")
        if s.shape is None or q.shape is None or len(q.shape) + 1 != len(s.shape):
            return check.fail("query/state ranks unknown or not rank(state) - 1")
        rank = len(s.shape)
        uq, ur = single_axis(ax_q), single_axis(ax_r)
        if uq is None or ur is None:
            return check.fail("contraction axes are not constant")
        uq, ur = uq % rank, ur % rank
        out = _LETTERS[:rank]
        if self.form == "matmul":
            if (uq, ur) != (rank - 2, rank - 2):
                return check.fail("MatMul contraction is not q[..., 1, d] @ S[..., d, e] squeezed")
            self._eq = _equation([out[:-2] + out[-2], out], out[:-2] + out[-1])
            return check
        if result.producer().attributes.get_int("keepdims", 1) != 0:
            return check.fail("ReduceSum keeps the contracted axis")
        if uq == ur:
            return check.fail("query is broadcast along the summed axis")
        self._eq = _equation([out[:uq] + out[uq + 1:], out], out[:ur] + out[ur + 1:])
        return check

    def rewrite(self, op, q, s, **_):
        return op.Einsum(q, s, equation=self._eq)


class SplitScaleRule(orp.RewriteRuleClassBase):
    """Einsum(x, y, f) where f's axes are all output axes (a per-position factor) and x or y is a prefix sum
    ->  Mul(Einsum(x, y), f laid out like the output)."""

    def __init__(self, factor_index: int):
        super().__init__(name=f"CausalCanonSplitScale[{factor_index}]")
        self.factor_index = factor_index
        self._plan: tuple[str, list[int], list[int]] | None = None

    def pattern(self, op, a, b, c):
        return op.Einsum(a, b, c, _outputs=["result"])

    def check(self, context, a, b, c, result, **_):
        check = orp.MatchResult()
        eq = einsum_equation(result.producer())
        if eq is None:
            return check.fail("einsum equation not understood")
        ins, out = eq
        operands = [a, b, c]
        f = self.factor_index
        pair = [i for i in range(3) if i != f]
        if not set(ins[f]) <= set(out):
            return check.fail("the factor sums over an axis (not a per-position factor)")
        if all(isinstance(prefix_sum(operands[i]), str) for i in pair):
            return check.fail("neither other operand is a prefix sum")
        shape = operands[f].shape
        if shape is None or len(shape) != len(ins[f]):
            return check.fail("factor rank unknown")
        letters = ins[f]
        order = sorted(letters, key=out.index)
        perm = [letters.index(ch) for ch in order]
        missing = [i for i, ch in enumerate(out) if ch not in letters]
        self._plan = (_equation([ins[i] for i in pair], out), perm, missing)
        return check

    def rewrite(self, op, a, b, c, **_):
        assert self._plan is not None
        eq, perm, missing = self._plan
        operands = [a, b, c]
        f = operands[self.factor_index]
        x, y = (operands[i] for i in range(3) if i != self.factor_index)
        if perm != sorted(perm):
            f = op.Transpose(f, perm=perm)
        if missing:
            f = op.Unsqueeze(f, op.Constant(value_ints=missing))
        return op.Mul(op.Einsum(x, y, equation=eq), f)


class ShiftedPrefixRule(orp.RewriteRuleClassBase):
    """Slice(Pad(CumSum(x, a), one zero before on a), drop the last on a)  ->  CumSum(x, a, exclusive=1)."""

    def __init__(self) -> None:
        super().__init__(name="CausalCanonShiftedPrefix")
        self._axis = 0
        self._cast: ir.DataType | None = None

    def pattern(self, op, s, pads):
        padded = op.Pad(s, pads, _allow_other_inputs=True, _outputs=["padded"])
        return op.Slice(padded, _allow_other_inputs=True, _outputs=["result"])

    def _pads_reason(self, pad_node: ir.Node, rank: int, axis: int) -> str | None:
        if pad_node.attributes.get_string("mode", "constant") != "constant":
            return "Pad is not constant padding"
        extra = pad_node.inputs[2:]
        if extra and extra[0] is not None:
            value = const_array(extra[0])
            if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
                return "Pad value is not zero"
        if len(extra) > 1 and extra[1] is not None:
            return "Pad with axes input"
        pads = const_array(pad_node.inputs[1])
        want = np.zeros(2 * rank, dtype=np.int64)
        want[axis] = 1
        if pads is None or pads.shape != want.shape or not np.array_equal(pads, want):
            return "Pad is not one zero step before the summed axis"
        return None

    def _slice_reason(self, slice_node: ir.Node, rank: int, axis: int) -> str | None:
        ins = list(slice_node.inputs) + [None] * (5 - len(slice_node.inputs))
        starts, ends, axes, steps = (const_array(v) if v is not None else None for v in ins[1:5])
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return "Slice bounds are not constant"
        ax = int(axes.reshape(-1)[0]) % rank if axes is not None and axes.size == 1 else (0 if ins[3] is None else None)
        if ax != axis or (ins[4] is not None and (steps is None or int(steps.reshape(-1)[0]) != 1)):
            return "Slice is not along the summed axis with step 1"
        if int(starts.reshape(-1)[0]) != 0 or int(ends.reshape(-1)[0]) != -1:
            return "Slice does not drop exactly the last step"
        return None

    def check(self, context, s, pads, padded, result, **_):
        check = orp.MatchResult()
        prefix = prefix_sum(s)
        if isinstance(prefix, str):
            return check.fail(prefix)
        if prefix.exclusive:
            return check.fail("already exclusive: a shift by two steps")
        if s.shape is None or len(s.shape) != len(prefix.increment.shape or ()):
            return check.fail("rank unknown")
        rank = len(s.shape)
        why = self._pads_reason(padded.producer(), rank, prefix.axis) or \
            self._slice_reason(result.producer(), rank, prefix.axis)
        if why:
            return check.fail(why)
        self._axis = prefix.axis
        self._cast = s.dtype if s.producer() is not prefix.cumsum else None
        return check

    def rewrite(self, op, s, **_):
        prefix = prefix_sum(s)
        assert not isinstance(prefix, str)
        out = op.CumSum(prefix.cumsum.inputs[0], op.Constant(value_int=self._axis), exclusive=1)
        return op.Cast(out, to=self._cast) if self._cast is not None else out


# Applied in order, each usable with a stock ``onnxscript.rewriter.rewrite``: the unsqueeze forms first (their
# MatMul/Mul cores must not be read as anything else), then the n-ary split and the exclusive shift.
UNSQUEEZE_FORM_RULES = orp.RewriteRuleSet(
    [OuterToEinsumRule.rule(m) for m in (False, True)] + [ContractionToEinsumRule.rule("matmul")]
    + [ContractionToEinsumRule.rule("mul", sf) for sf in (False, True)])
SPLIT_SHIFT_RULES = orp.RewriteRuleSet([SplitScaleRule.rule(i) for i in (2, 0, 1)] + [ShiftedPrefixRule.rule()])
CANONICAL_RULES = (UNSQUEEZE_FORM_RULES, SPLIT_SHIFT_RULES)
