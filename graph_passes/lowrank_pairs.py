# mypy: disable-error-code="override"
"""Low-rank pairs: x @ A (m x r) [+ b1] @ B (r x n) [+ b2] with constant A, B.

A pair costs r*(m+n) MACs per row against m*n for the dense product. When r*(m+n) >= threshold*m*n
the pair does not save work (measured: rank 384 on 512x512 runs 1.10-1.14x slower than dense), so it
is merged into one weight A@B (bias b1@B + b2). Otherwise the pair is kept (rank 64 pairs run at
0.31-0.49x the dense time) and only the inner bias is folded into the outer one: (x A + b1) B + b2 =
x A B + (b1 B + b2).

Forms: MatMul/Add in either order (bias on neither, inner, outer or both factors), Gemm->Gemm
(transB, the Reshape->Gemm->Gemm->Reshape of flattened SVD modules), MatMul->Gemm (TorchScript), and
Conv(k x k, in->r) -> Conv(1 x 1, r->out). Refused: weights that are graph inputs or shared, biases
that are not per-feature, Gemm with alpha/beta/transA, strided/grouped/padded 1x1 convs. A sequence
projection (Linformer: MatMul(W) -> Transpose -> MatMul(E)) never matches, since the Transpose sits
between the factors; it is listed in the report as refused. So is every other candidate no rule took
(a constant-weight MatMul/Gemm/Conv whose r outputs feed another's r inputs, directly or through shape
ops and bias Adds), with the reason: the check's, or the op between the factors (a no-op Reshape, as
between Hugging Face Conv1D factors, is the cleanup pass's to remove).

The rules run again until nothing changes: a merge can form a new pair (in l0 -> l1 -> l2, merging
l1.l2 leaves l0 -> (l1 l2) to decide), and the record of a pair whose factor it took becomes
"superseded" (not a match).

``LOWRANK_RULES`` works with a stock ``onnxscript.rewriter.rewrite`` too (default options, no records).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import pattern as orp

from graph_passes._base import GraphPass, Match, record, recorded, rule_options
from graph_passes._util import const_array, node_label, prepare
from graph_passes.noop_reshape import reshape_noop_reason


def pair_decision(m: int, r: int, n: int, threshold: float) -> str:
    """'merge' when the pair does not save work (r*(m+n) >= threshold*m*n), else 'keep'."""
    return "merge" if r * (m + n) >= threshold * m * n else "keep"


def _per_feature(bias: np.ndarray | None, size: int) -> bool:
    if bias is None:
        return True
    return bias.shape[-1:] == (size,) and all(d == 1 for d in bias.shape[:-1])


def _weight(value: ir.Value | None, check: orp.MatchResult, what: str, shared_ok: bool = False) -> np.ndarray | None:
    """A constant (unshared unless ``shared_ok``) initializer, or None after recording why not.

    Biases may be shared: the rewrite writes a fresh bias and leaves the original to its other users
    (the exporter merges equal initializers, e.g. every all-zero bias of a freshly initialized BERT)."""
    arr = const_array(value)
    if arr is None or value is None:
        check.fail(f"{what} is not a constant initializer (graph input or computed)", value)
        return None
    if len(value.uses()) > 1 and not shared_ok:
        check.fail(f"{what} is shared with other nodes", value)
        return None
    if arr.dtype.kind != "f":
        check.fail(f"{what} is not floating point", value)
        return None
    return arr


@dataclass
class _RunState:
    """What one run of the pass rewrote: the pairs its keep-rewrites emitted (never matched again, so a
    pair is reported once) and, per node a rewrite consumed, the record of that rewrite."""

    emitted: set[tuple[ir.Node, ir.Node]] = field(default_factory=set)
    consumed: dict[ir.Node, Match] = field(default_factory=dict)


_RUN: ContextVar[_RunState | None] = ContextVar("lrexport_lowrank_run", default=None)
_ALREADY = "already rewritten by this pass"


class _PairRule(orp.RewriteRuleClassBase):
    """Shared check/record logic; subclasses extract (A, B, b1, b2) in the MatMul layout in
    ``check_pair``. A refusal is recorded (weakly: another rule of the set may still take the pair)
    under the pair's (second, first) nodes, so the report says why a pair was not taken."""

    form = "?"  # the form a refusal names

    def __init__(self, name: str):
        super().__init__(name=name)
        self._plan: dict[str, Any] | None = None
        self._eff: tuple[np.ndarray, np.ndarray] | None = None  # the weights rewrite() builds from

    def check_pair(self, context, **bindings) -> orp.MatchResult:
        raise NotImplementedError

    def check(self, context, **bindings):
        result = self.check_pair(context, **bindings)
        reason = result.reason if not result else None
        if reason and not reason.startswith(("kept:", _ALREADY)):
            first, second = bindings["h"].producer(), bindings["y"].producer()
            record(Match("lowrank-pair", "refused", [node_label(first), node_label(second)], reason,
                         matched=False, info={"form": self.form}), (second, first), weak=True)
        return result

    def _decide(self, check: orp.MatchResult, a: np.ndarray, b: np.ndarray, b1: np.ndarray | None,
                b2: np.ndarray | None, nodes: list[ir.Node], form: str, *, m_cost: int | None = None
                ) -> orp.MatchResult:
        state = _RUN.get()
        if state is not None and (nodes[-1], nodes[0]) in state.emitted:
            return check.fail(_ALREADY)
        m, r = a.shape
        r2, n = b.shape
        if r != r2:
            return check.fail(f"inner sizes differ ({r} vs {r2})")
        if not _per_feature(b1, r) or not _per_feature(b2, n):
            return check.fail("bias is not a per-feature vector")
        mc = m if m_cost is None else m_cost
        options = rule_options()
        action = pair_decision(mc, r, n, options.merge_threshold)
        before = a.size + b.size + (b1.size if b1 is not None else 0) + (b2.size if b2 is not None else 0)
        key = (nodes[-1], nodes[0])
        info = {"form": form, "m": int(mc), "r": int(r), "n": int(n), "params_before": int(before),
                "macs_per_row_pair": int(r * (mc + n)), "macs_per_row_dense": int(mc * n)}
        labels = [node_label(x) for x in nodes]
        if action == "keep" and (b1 is None or not options.fold_inner_bias):
            why = "the factorization saves work and there is no inner bias to fold"
            record(Match("lowrank-pair", "kept", labels, why, info={**info, "params_after": int(before)}), key)
            return check.fail(f"kept: {why}")
        bias = None
        if b1 is not None or b2 is not None:
            bias = np.zeros((n,), dtype=b.dtype)
            if b1 is not None:
                bias = bias + b1.reshape(-1).astype(np.float64) @ b.astype(np.float64)
            if b2 is not None:
                bias = bias + b2.reshape(-1)
            bias = bias.astype(b.dtype)
        after = (m * n if action == "merge" else a.size + b.size) + (n if bias is not None else 0)
        match = Match("lowrank-pair", "merged" if action == "merge" else "bias-folded", labels, rewritten=True,
                      info={**info, "params_after": int(after)})
        self._plan = {"action": action, "bias": bias, "match": match, "nodes": list(nodes)}
        return check

    def _bias_value(self, op, bias: np.ndarray | None, like: str):
        if bias is None:
            return None
        return op.initializer(ir.tensor(bias), name=f"{like}_lrbias")

    def _commit(self) -> dict[str, Any]:
        assert self._plan is not None
        return self._plan

    def _done(self, plan: dict[str, Any], second: ir.Value, first: ir.Value | None = None) -> None:
        """Record the rewrite under the nodes it leaves: (second, first) of a kept pair, (merged,) of a
        merge; a later rewrite that consumes them makes the record stale (see ``_revise``)."""
        new_second = second.producer()
        new_first = first.producer() if first is not None else None
        old_first, old_second = plan["nodes"][0], plan["nodes"][-1]
        if new_first is not None:  # the report names the pair after the nodes it replaced
            new_first.name, new_second.name = f"{node_label(old_first)}_lr", f"{node_label(old_second)}_lr"
        else:
            new_second.name = f"{node_label(old_first)}+{node_label(old_second)}"
        key = (new_second, new_first) if new_first is not None else (new_second,)
        record(plan["match"], key)
        state = _RUN.get()
        if state is not None:
            if new_first is not None:
                state.emitted.add((new_second, new_first))
            for node in plan["nodes"]:
                state.consumed[node] = plan["match"]


class MatMulPairRule(_PairRule):
    """MatMul(x, A) [+ b1] -> MatMul(., B) [+ b2]."""

    def __init__(self, inner_bias: bool, outer_bias: bool):
        super().__init__(f"LowRankMatMul[{'b1' if inner_bias else '-'},{'b2' if outer_bias else '-'}]")
        self.inner_bias, self.outer_bias = inner_bias, outer_bias

    def pattern(self, op, x, a, b, b1, b2):
        h = op.MatMul(x, a, _outputs=["h"])
        if self.inner_bias:
            h = op.Add(h, b1)
        y = op.MatMul(h, b, _outputs=["y"])
        if self.outer_bias:
            y = op.Add(y, b2, _outputs=["z"])
        return y

    form = "MatMul"

    def check_pair(self, context, x, a, b, h, y, b1=None, b2=None, **_):
        check = orp.MatchResult()
        if not self.outer_bias and len(y.uses()) == 1 and y.uses()[0].node.op_type == "Add" and \
                const_array(_other_input(y.uses()[0].node, y)) is not None:
            return check.fail("an outer bias follows: the pattern with the outer bias takes this pair")
        wa = _weight(a, check, "first factor")
        wb = _weight(b, check, "second factor") if wa is not None else None
        if wa is None or wb is None:
            return check
        if wa.ndim != 2 or wb.ndim != 2:
            return check.fail("factors are not 2-D weights (batched MatMul)")
        bb1 = bb2 = None
        if self.inner_bias:
            bb1 = _weight(b1, check, "inner bias", shared_ok=True)
            if bb1 is None:
                return check
        if self.outer_bias:
            bb2 = _weight(b2, check, "outer bias", shared_ok=True)
            if bb2 is None:
                return check
        nodes = [h.producer(), y.producer()]
        return self._decide(check, wa, wb, bb1, bb2, nodes, "MatMul")

    def rewrite(self, op, x, a, b, h, y, b1=None, b2=None, **_):
        plan = self._commit()
        if plan["action"] == "merge":
            wa, wb = const_array(a), const_array(b)
            assert wa is not None and wb is not None
            w = (wa.astype(np.float64) @ wb.astype(np.float64)).astype(wb.dtype)
            out = op.MatMul(x, op.initializer(ir.tensor(w), name=f"{a.name}_{b.name}_merged"))
            self._done(plan, out)
        else:
            inner = op.MatMul(x, a)
            out = op.MatMul(inner, b)
            self._done(plan, out, inner)
        bias = self._bias_value(op, plan["bias"], b.name)
        return op.Add(out, bias) if bias is not None else out


def _node_biases(check: orp.MatchResult, first: ir.Node | None, second: ir.Node
                 ) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """The optional third (bias) inputs of a Gemm/Conv pair; None when one is present but unusable."""
    out: list[np.ndarray | None] = []
    for node, what in ((first, "inner bias"), (second, "outer bias")):
        value = node.inputs[2] if node is not None and len(node.inputs) > 2 else None
        if value is None:
            out.append(None)
            continue
        arr = _weight(value, check, what, shared_ok=True)
        if arr is None:
            return None
        out.append(arr)
    return out[0], out[1]


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    others = [v for v in node.inputs if v is not value]
    return others[0] if len(others) == 1 else None


def _gemm_ok(node: ir.Node) -> str | None:
    if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with alpha/beta != 1"
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    return None


class GemmPairRule(_PairRule):
    """Gemm(Gemm(x, A, b1), B, b2) and MatMul(x, A) -> Gemm(., B, b2), transB on either."""

    def __init__(self, first: str):
        super().__init__(f"LowRankGemm[{first}]")
        self.first = first

    def pattern(self, op, x, a, b):
        if self.first == "gemm":
            h = op.Gemm(x, a, _allow_other_inputs=True, _outputs=["h"])
        else:
            h = op.MatMul(x, a, _outputs=["h"])
        return op.Gemm(h, b, _allow_other_inputs=True, _outputs=["y"])

    def _factors(self, check, a, b, h, y):
        g1, g2 = h.producer(), y.producer()
        for g in ([g1, g2] if self.first == "gemm" else [g2]):
            why = _gemm_ok(g)
            if why:
                check.fail(why, g)
                return None
        wa = _weight(a, check, "first factor")
        wb = _weight(b, check, "second factor") if wa is not None else None
        if wa is None or wb is None:
            return None
        if wa.ndim != 2 or wb.ndim != 2:
            check.fail("factors are not 2-D weights")
            return None
        if self.first == "gemm" and g1.attributes.get_int("transB", 0):
            wa = wa.T
        if g2.attributes.get_int("transB", 0):
            wb = wb.T
        biases = _node_biases(check, g1 if self.first == "gemm" else None, g2)
        if biases is None:
            return None
        return wa, wb, *biases

    @property
    def form(self) -> str:
        return "Gemm->Gemm" if self.first == "gemm" else "MatMul->Gemm"

    def check_pair(self, context, x, a, b, h, y, **_):
        check = orp.MatchResult()
        got = self._factors(check, a, b, h, y)
        if got is None:
            return check
        wa, wb, b1, b2 = got
        self._eff = (wa, wb)
        return self._decide(check, wa, wb, b1, b2, [h.producer(), y.producer()], self.form)

    def rewrite(self, op, x, a, b, h, y, **_):
        plan = self._commit()
        assert self._eff is not None
        wa, wb = self._eff
        bias = self._bias_value(op, plan["bias"], b.name)
        extra = [bias] if bias is not None else []
        if plan["action"] == "merge":
            w = (wa.astype(np.float64) @ wb.astype(np.float64)).astype(wb.dtype)
            out = op.Gemm(x, op.initializer(ir.tensor(w), name=f"{a.name}_{b.name}_merged"), *extra)
            self._done(plan, out)
            return out
        ga = op.initializer(ir.tensor(np.ascontiguousarray(wa)), name=f"{a.name}_lrA")
        gb = op.initializer(ir.tensor(np.ascontiguousarray(wb)), name=f"{b.name}_lrB")
        inner = op.Gemm(x, ga)
        out = op.Gemm(inner, gb, *extra)
        self._done(plan, out, inner)
        return out


class ConvPairRule(_PairRule):
    """Conv(x, A[r, in, k, k], b1) -> Conv(., B[out, r, 1, 1], b2): a low-rank conv (CED-style)."""

    def __init__(self) -> None:
        super().__init__("LowRankConv")

    def pattern(self, op, x, a, b):
        h = op.Conv(x, a, _allow_other_inputs=True, _outputs=["h"])
        return op.Conv(h, b, _allow_other_inputs=True, _outputs=["y"])

    form = "Conv->Conv1x1"

    def check_pair(self, context, x, a, b, h, y, **_):
        check = orp.MatchResult()
        c1, c2 = h.producer(), y.producer()
        wa = _weight(a, check, "first conv weight")
        wb = _weight(b, check, "second conv weight") if wa is not None else None
        if wa is None or wb is None:
            return check
        if wb.ndim < 3 or any(d != 1 for d in wb.shape[2:]):
            return check.fail("second conv is not 1x1")
        for c in (c1, c2):
            if c.attributes.get_int("group", 1) != 1:
                return check.fail("grouped conv", c)
        a2 = c2.attributes
        if any(v != 1 for v in a2.get_ints("strides", [1]) or [1]) or any(v != 0 for v in a2.get_ints("pads", [0]) or [0]) \
                or any(v != 1 for v in a2.get_ints("dilations", [1]) or [1]) or a2.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return check.fail("second conv has strides/pads/dilations")
        biases = _node_biases(check, c1, c2)
        if biases is None:
            return check
        b1, b2 = biases
        r = wa.shape[0]
        a_mat = wa.reshape(r, -1).T  # [in*k*k, r]
        b_mat = wb.reshape(wb.shape[0], r).T  # [r, out]
        self._eff = (wa, wb)
        return self._decide(check, a_mat, b_mat, b1, b2, [c1, c2], self.form)

    def rewrite(self, op, x, a, b, h, y, **_):
        plan = self._commit()
        assert self._eff is not None
        wa, wb = self._eff
        c1 = h.producer()
        attrs = {k: v for k, v in c1.attributes.items()}
        bias = self._bias_value(op, plan["bias"], b.name)
        extra = [bias] if bias is not None else []
        if plan["action"] == "merge":
            w = np.einsum("or,r...->o...", wb.reshape(wb.shape[0], wa.shape[0]).astype(np.float64),
                          wa.astype(np.float64)).astype(wa.dtype)
            out = op.Conv(x, op.initializer(ir.tensor(w), name=f"{a.name}_{b.name}_merged"), *extra,
                          **{k: v.value for k, v in attrs.items()})
            self._done(plan, out)
            return out
        inner = op.Conv(x, a, **{k: v.value for k, v in attrs.items()})
        out = op.Conv(inner, b, *extra)
        self._done(plan, out, inner)
        return out


_LINEAR = ("MatMul", "Gemm", "Conv")
_BETWEEN = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Add")


def _has_const_weight(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type in _LINEAR and node.domain in ("", "ai.onnx")
            and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None)


def _between(node: ir.Node) -> bool:
    """An op a candidate pair may have between its factors: a shape op or a constant (bias) Add."""
    if node.op_type not in _BETWEEN or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Add":
        return any(const_array(v) is not None for v in node.inputs)
    return True


def _sizes(node: ir.Node) -> tuple[int, int] | None:
    """(input features, output features) of a constant-weight MatMul/Gemm/Conv."""
    w = const_array(node.inputs[1])
    if w is None or w.ndim < 2:
        return None
    if node.op_type == "Conv":
        return int(w.shape[1]), int(w.shape[0])
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return int(w.shape[-1]), int(w.shape[-2])
    return int(w.shape[-2]), int(w.shape[-1])


def _first_factor(node: ir.Node) -> tuple[ir.Node, list[ir.Node]] | None:
    """The constant-weight MatMul/Gemm/Conv that feeds ``node`` through shape ops and bias Adds only,
    and those ops in graph order; None when there is none."""
    path: list[ir.Node] = []
    value = node.inputs[0] if node.inputs else None
    while value is not None and (src := value.producer()) is not None:
        if _has_const_weight(src):
            return src, path[::-1]
        if not _between(src):
            return None
        path.append(src)
        value = next((v for v in src.inputs if v is not None and const_array(v) is None), None)
    return None


def _not_taken_reason(first: ir.Node, path: list[ir.Node], second: ir.Node) -> str:
    """Why no rule took the candidate pair ``first -> path -> second``."""
    shared = [v for v in [first.outputs[0], *(n.outputs[0] for n in path)] if len(v.uses()) > 1 or v.is_graph_output()]
    if shared:
        return f"the value {shared[0].name} between the factors has other users"
    for node in path:
        if node.op_type == "Reshape":
            why = reshape_noop_reason(node)
            if why is None:
                return (f"a no-op Reshape ({node_label(node)}) between the factors: the cleanup pass removes "
                        "it, run cleanup before lowrank")
            return f"a Reshape ({node_label(node)}) between the factors that is not a no-op: {why}"
        if node.op_type != "Add":
            return f"a {node.op_type} ({node_label(node)}) between the factors"
    ops = " -> ".join(n.op_type for n in [first, *path, second])
    return f"no rule for {ops}"


def survey(model: ir.Model, taken: set[object] | frozenset[object] = frozenset()) -> list[Match]:
    """Candidate pairs no rule took (``taken``: the (second, first) keys recorded already): a constant-weight
    MatMul/Gemm/Conv fed by another through shape ops and bias Adds, the first's output features the
    second's input features. A Transpose between them makes the
    second factor contract another axis: a sequence-axis (Linformer) projection, kind "sequence-projection"."""
    found = []
    for node in model.graph:
        if not _has_const_weight(node):
            continue
        got = _first_factor(node)
        if got is None:
            continue
        src, path = got
        if (node, src) in taken:
            continue
        transposes = [t for t in path if t.op_type == "Transpose"]
        if transposes and node.op_type == "MatMul":
            found.append(Match("sequence-projection", "refused", [node_label(src), node_label(transposes[0]),
                                                                  node_label(node)],
                               "a Transpose between the factors: the second one contracts the sequence axis",
                               matched=False))
            continue
        inner, outer = _sizes(src), _sizes(node)
        if inner is None or outer is None or inner[1] != outer[0]:
            continue  # not r features into r features (a Conv flattened into a dense head): no low-rank pair
        found.append(Match("lowrank-pair", "refused", [node_label(src), node_label(node)],
                           _not_taken_reason(src, path, node), matched=False,
                           info={"form": "->".join(n.op_type for n in [src, *path, node])}))
    return found


def _revise(model: ir.Model, state: _RunState) -> None:
    """Records of pairs a later rewrite consumed (a chain l0 -> l1 -> l2 whose l1.l2 merge took l1 from the
    kept pair l0.l1): a refusal is dropped (the pair no longer exists), a keep or bias fold becomes
    "superseded" (not counted) naming the rewrite that took its factor. Merges stay: they happened."""
    alive = set(model.graph)
    records = recorded()
    for key, match in list(records.items()):
        if match.kind != "lowrank-pair" or not isinstance(key, tuple):
            continue
        gone = [i for i, n in enumerate(key) if n not in alive]
        if not gone:
            continue
        if match.action == "refused":
            del records[key]
        elif match.action != "merged":
            i = gone[0]
            by = state.consumed.get(key[i])
            label = match.nodes[-1] if i == 0 else match.nodes[0]
            which = "second" if i == 0 else "first"
            into = f"the {by.action} pair {' -> '.join(by.nodes)}" if by is not None else "a later rewrite"
            match.reason = f"was {match.action}; its {which} factor {label} went into {into}"
            match.action, match.matched = "superseded", False


LOWRANK_RULES = orp.RewriteRuleSet(
    [MatMulPairRule.rule(ib, ob) for ib in (True, False) for ob in (True, False)]
    + [GemmPairRule.rule(first) for first in ("gemm", "matmul")] + [ConvPairRule.rule()],
    commute=True)


class LowRankPairsPass(GraphPass):
    """Merge pairs that do not save work, fold inner biases of the others; report every pair seen."""

    name = "lowrank"
    min_opset = 0  # emits MatMul/Gemm/Conv/Add with the inputs it found

    max_rounds = 16  # a rewrite can form a new pair (a merged weight next to a kept factor): rerun the rules

    def run(self, model: ir.Model) -> bool:
        folded = fold_constants_ir(model, onnx_shape_inference=False)  # Transpose(W) -> constant W^T
        prepare(model)
        state = _RunState()
        token = _RUN.set(state)
        try:
            count = 0
            for _ in range(self.max_rounds):
                n = self.apply_rules(model, LOWRANK_RULES)
                count += n
                if not n:
                    break
        finally:
            _RUN.reset(token)
        _revise(model, state)
        for match in survey(model, set(recorded())):
            record(match)
        return bool(count) or bool(folded.modified)
