"""``quadratic-causal``: the masked quadratic form of causal linear attention becomes one recurrence node.

People write causal linear attention the short way: ``(phi(Q) phi(K)^T).tril() @ V``, optionally divided by
the row sums of the same masked matrix (the Katharopoulos normalizer). That materializes a T x T matrix per
head: memory and time grow with T^2, which is what linear attention was meant to avoid. The product equals
the causal running sum ``o_i = sum_{j<=i} (q_i . k_j) v_j`` exactly, for any q and k, so it is rewritten to
one ``lrexport.LinearAttention`` node (rule ``linear``, ``normalize`` for the divided form), which the
``linear-attention`` pass then lowers for the backend like every other recurrence.

Runs after the ``einsum`` pass, so every surface form is ``MatMul``. Accepted masks (the canonical mask is
"keep j <= i, zero elsewhere"):

- ``Trilu(S)`` with ``upper=0`` and no diagonal offset (``torch.tril``);
- ``Mul(S, L)`` where ``L`` is a lower-triangular all-ones matrix (``Trilu`` of an all-ones tensor, as a
  float or through a ``Cast``);
- ``Where(L, S, 0)`` and ``Where(Not(L), 0, S)`` with ``L`` such a matrix as booleans (``masked_fill``);
- ``L`` may also be a constant lower-triangular matrix (a registered buffer), or a ``[:T, :T]`` slice of one.

Refused, with the reason: another diagonal offset (a strictly lower mask is not the inclusive sum), a
masked matrix that something else also reads (it would stay materialized), operands whose query and key
lengths are not the same dim, or ranks other than 3 and 4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes._base import GraphPass, Match, record
from graph_passes._util import cleanup_unused, const_array, node_label, prepare, shape_dims
from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE, _Builder


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.domain == "" and node.op_type in op_types else None


def _all_ones(value: ir.Value) -> bool:
    """The value is a tensor of ones: a constant, ``ConstantOfShape(1)``, or ``Expand`` of a constant one."""
    const = const_array(value)
    if const is not None:
        return const.size > 0 and bool(np.all(const == 1))
    node = _producer(value, "ConstantOfShape", "Expand", "Cast")
    if node is None:
        return False
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        fill = np.asarray(attr.value.numpy()) if attr is not None else np.zeros(1)
        return bool(np.all(fill == 1))
    return _all_ones(node.inputs[0])


def _lower_ones(value: ir.Value) -> bool:
    """The value is ``tril`` of all ones, the diagonal included (possibly through a Cast)."""
    cast = _producer(value, "Cast")
    if cast is not None:
        return _lower_ones(cast.inputs[0])
    const = const_array(value)
    if const is not None and const.ndim >= 2 and const.shape[-1] == const.shape[-2]:
        return bool(np.array_equal(const.astype(bool), np.broadcast_to(np.tri(const.shape[-1], dtype=bool),
                                                                       const.shape)))
    sliced = _producer(value, "Slice")  # a registered max x max mask cut to T x T: mask[:T, :T]
    if sliced is not None:
        starts = const_array(sliced.inputs[1])
        steps = const_array(sliced.inputs[4]) if len(sliced.inputs) > 4 and sliced.inputs[4] is not None else None
        return (starts is not None and not starts.any() and (steps is None or bool(np.all(steps == 1)))
                and _lower_ones(sliced.inputs[0]))
    tri = _producer(value, "Trilu")
    return tri is not None and _trilu_reason(tri) is None and _all_ones(tri.inputs[0])


def _trilu_reason(node: ir.Node) -> str | None:
    if node.attributes.get_int("upper", 1):
        return "an upper-triangular mask (Trilu upper=1) is not causal"
    k = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if len(node.inputs) > 1 and node.inputs[1] is not None and k is None:
        return "the diagonal offset of the mask is computed"
    if k is not None and int(k.reshape(-1)[0]) != 0:
        return (f"the mask keeps j <= i{int(k.reshape(-1)[0]):+d}, not j <= i (the inclusive causal sum)")
    return None


def _is_zero(value: ir.Value | None) -> bool:
    const = const_array(value)
    return const is not None and const.size >= 1 and bool(np.all(const == 0))


def _masked_scores(m: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str | None:
    """The unmasked scores S and the mask nodes when ``m`` is S under a causal mask; a reason when it is a
    mask this pass does not take; None when ``m`` is no mask at all."""
    node = m.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Trilu":
        why = _trilu_reason(node)
        return why if why else (node.inputs[0], [node])
    if node.op_type == "Mul":
        a, b = node.inputs
        if _lower_ones(b):
            return a, [node]
        if _lower_ones(a):
            return b, [node]
        return None
    if node.op_type == "Where":
        c, x, y = node.inputs
        if _lower_ones(c) and _is_zero(y):
            return x, [node]
        neg = _producer(c, "Not")
        if neg is not None and _lower_ones(neg.inputs[0]) and _is_zero(x):
            return y, [node]
    return None


def _swap_last_two(node: ir.Node | None, rank: int) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    perm = node.attributes.get_ints("perm", None)
    want = list(range(rank - 2)) + [rank - 1, rank - 2]
    return perm is not None and list(perm) == want


def _same_dim(a: Any, b: Any) -> bool:
    return (isinstance(a, int) and a == b) or (isinstance(a, str) and bool(a) and a == b)


class QuadraticCausalPass(GraphPass):
    """``MatMul(causal_mask(MatMul(Q, K^T)), V)`` [``/ (rowsum + eps)``] -> ``lrexport.LinearAttention``."""

    name = "quadratic-causal"
    min_opset = 13

    def run(self, model: ir.Model) -> bool:
        changed = False
        if not any(n.op_type in ("Trilu", "Where", "Mul") for n in model.graph):
            return False
        prepare(model)  # the einsum pass leaves its Transposes/Reshapes without shapes
        for node in list(model.graph):
            if node.op_type != "MatMul" or node.domain != "" or node.graph is None:
                continue
            found = _masked_scores(node.inputs[0])
            if found is None:
                continue
            label = node_label(node)
            if isinstance(found, str):
                record(Match("quadratic-causal", "refused", [label], reason=found, matched=False))
                continue
            plan = self._plan(node, *found)
            if isinstance(plan, str):
                record(Match("quadratic-causal", "refused", [label], reason=plan, matched=False))
                continue
            self._rewrite(model, node, plan)
            changed = True
            record(Match("quadratic-causal", "rewritten (lrexport.LinearAttention, rule linear"
                         + (", normalize)" if plan["divide"] is not None else ")"),
                         [node_label(plan["scores"]), label], rewritten=True,
                         info={"rank": plan["rank"], "normalize": plan["divide"] is not None}))
        return changed

    def _plan(self, out_mm: ir.Node, scores: ir.Value, mask_nodes: list[ir.Node]) -> dict | str:
        s_mm = _producer(scores, "MatMul")
        if s_mm is None:
            return "the masked matrix is not a product Q K^T"
        masked = out_mm.inputs[0]
        q, kt, v = s_mm.inputs[0], s_mm.inputs[1], out_mm.inputs[1]
        dq, dkt, dv = shape_dims(q), shape_dims(kt), shape_dims(v)
        if dq is None or dkt is None or dv is None or not len(dq) == len(dkt) == len(dv):
            return "the operands' ranks are unknown or differ"
        rank = len(dq)
        if rank not in (3, 4):
            return f"rank {rank} operands (3 or 4 are taken)"
        if not _same_dim(dq[-2], dkt[-1]) or not _same_dim(dq[-2], dv[-2]):
            return (f"the query length ({dq[-2]}) is not the key/value length ({dkt[-1]}, {dv[-2]}): "
                    "not a causal self-attention")
        if any(not _same_dim(a, b) or not _same_dim(a, c) for a, b, c in zip(dq[:-2], dkt[:-2], dv[:-2])):
            return f"leading dims differ or are unknown (q {dq}, k^T {dkt}, v {dv}): no broadcasting is taken"
        if rank == 4 and not isinstance(dq[1], int):
            return f"the head count ({dq[1]}) is not static"
        if not isinstance(dq[-1], int) or not isinstance(dv[-1], int):
            return "the head dims are not static"
        if len(scores.uses()) != 1 or any(len(n.outputs[0].uses()) != 1 for n in mask_nodes[:-1]):
            return "the unmasked scores are also read elsewhere"
        divide = self._normalizer(out_mm, masked)
        users = {id(u.node) for u in masked.uses()}
        expected = {id(out_mm)} | ({id(divide["sum"])} if divide is not None else set())
        if users != expected or masked.is_graph_output() or scores.is_graph_output():
            return "the masked T x T matrix is also read elsewhere, so it would stay materialized"
        return {"scores": s_mm, "q": q, "kt": kt, "v": v, "rank": rank, "heads": dq[1] if rank == 4 else 1,
                "divide": divide, "k_transposed": _swap_last_two(_producer(kt, "Transpose"), rank)}

    @staticmethod
    def _normalizer(out_mm: ir.Node, masked: ir.Value) -> dict | None:
        """``out / (ReduceSum(masked, axes=-1, keepdims=1) [+ eps])`` when that is how ``out`` is used."""
        uses = out_mm.outputs[0].uses()
        if len(uses) != 1 or uses[0].node.op_type != "Div" or uses[0].idx != 0 or out_mm.outputs[0].is_graph_output():
            return None
        div = uses[0].node
        den, eps = div.inputs[1], 0.0
        add = _producer(den, "Add")
        if add is not None:
            for i in (0, 1):
                c = const_array(add.inputs[1 - i])
                if c is not None and c.size == 1 and _producer(add.inputs[i], "ReduceSum") is not None:
                    den, eps = add.inputs[i], float(c.reshape(-1)[0])
                    break
            else:
                return None
        rsum = _producer(den, "ReduceSum")
        if rsum is None or rsum.inputs[0] is not masked or not rsum.attributes.get_int("keepdims", 1):
            return None
        axes = const_array(rsum.inputs[1]) if len(rsum.inputs) > 1 else None
        rank = len(shape_dims(masked) or [])
        if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) % max(rank, 1) != rank - 1:
            return None
        if len(den.uses()) != 1 or (add is not None and len(add.outputs[0].uses()) != 1):
            return None
        return {"div": div, "sum": rsum, "eps": eps}

    def _rewrite(self, model: ir.Model, out_mm: ir.Node, plan: dict) -> None:
        b = _Builder(node_label(out_mm))
        rank, heads = plan["rank"], plan["heads"]
        q, kt, v = plan["q"], plan["kt"], plan["v"]
        transpose = _producer(kt, "Transpose") if plan["k_transposed"] else None
        k = (transpose.inputs[0] if transpose is not None
             else b.op("Transpose", [kt], {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]}))
        if rank == 4:  # (B, H, T, d) -> (B, T, H, d)
            to_op = [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}) for x in (q, k, v)]
        else:  # (N, T, d) -> (N, T, 1, d)
            axis = b.const([2])
            to_op = [b.op("Unsqueeze", [x, axis]) for x in (q, k, v)]
        for value, source in zip(to_op, (q, q, v)):  # the lowerings read the head layout from the shapes
            d = list(shape_dims(source) or [])
            value.type = source.type
            value.shape = ir.Shape([d[0], d[2], d[1], d[3]] if rank == 4 else [d[0], d[1], 1, d[2]])
        divide = plan["divide"]
        attrs = {"rule": "linear", "scale": 1.0, "decay": "none", "normalize": int(divide is not None),
                 "eps": float(divide["eps"]) if divide is not None else 0.0,
                 "q_heads": heads, "k_heads": heads, "v_heads": heads}
        out, _state = b.op(OP_TYPE, to_op, attrs, domain=DOMAIN, outputs=2)
        result = (b.op("Transpose", [out], {"perm": [0, 2, 1, 3]}) if rank == 4
                  else b.op("Squeeze", [out, b.const([2])]))
        final = divide["div"] if divide is not None else out_mm
        result.type, result.shape = final.outputs[0].type, final.outputs[0].shape
        ir.convenience.replace_nodes_and_values(model.graph, final, [final], b.nodes, list(final.outputs),
                                                [result])
        model.opset_imports.setdefault(DOMAIN, 1)
        cleanup_unused(model)
