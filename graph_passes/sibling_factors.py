"""Sibling first factors: MatMul(x, A_1) .. MatMul(x, A_k) of low-rank pairs reading the same x
become one MatMul(x, [A_1 .. A_k]) and a Split (q/k/v projections: one GEMM of width sum(r_i)).

Not a pattern-rewriter rule: the onnxscript matcher roots a pattern at one node and cannot express
"k consumers of one value", so this is an onnx-ir pass with the same check discipline (constant,
unshared 2-D weights; only first factors of low-rank pairs, i.e. outputs feeding a constant-weight
MatMul directly or through a bias Add). Only groups are recorded: a lone factor is no site for this pass.

Measured with benchmarks/bench_passes.py (see the report): not in DEFAULT_PASSES.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes._base import GraphPass, Match, record
from graph_passes._util import const_array, node_label, prepare


def _is_first_factor(node: ir.Node) -> bool:
    """MatMul(x, A) with a constant, unshared, 2-D float A whose output feeds (through at most a bias Add)
    a MatMul with a constant second factor: the first factor of a low-rank pair."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return False
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f" or len(node.inputs[1].uses()) != 1:
        return False
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return False
    nxt = out.uses()[0].node
    if nxt.op_type == "Add":
        other = [v for v in nxt.inputs if v is not out]
        if len(other) != 1 or const_array(other[0]) is None or len(nxt.outputs[0].uses()) != 1:
            return False
        nxt = nxt.outputs[0].uses()[0].node
    return nxt.op_type == "MatMul" and const_array(nxt.inputs[1]) is not None


class SiblingFactorsPass(GraphPass):
    """Concatenate the first factors of low-rank pairs that share their input."""

    name = "sibling"

    def run(self, model: ir.Model) -> bool:
        prepare(model)
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in model.graph:
            if _is_first_factor(node):
                groups.setdefault(node.inputs[0], []).append(node)
        changed = False
        for x, nodes in groups.items():
            if len(nodes) < self.options.sibling_min_group:
                continue
            ws = [w for w in (const_array(n.inputs[1]) for n in nodes) if w is not None]
            labels = [node_label(n) for n in nodes]
            if len({w.shape[0] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
                record(Match("sibling-group", "refused", labels, "factors differ in input size or dtype",
                             matched=False))
                continue
            self._fuse(model.graph, x, nodes, ws)
            record(Match("sibling-group", "concatenated", labels, rewritten=True,
                         info={"ranks": [int(w.shape[1]) for w in ws], "m": int(ws[0].shape[0])}))
            changed = True
        return changed

    def _fuse(self, graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], ws: list[np.ndarray]) -> None:
        ranks = [int(w.shape[1]) for w in ws]
        base = nodes[0].name or "sibling"
        w_val = ir.Value(name=f"{base}_sibling_w", const_value=ir.tensor(np.concatenate(ws, axis=1)))
        w_val.shape = ir.Shape(w_val.const_value.shape)
        w_val.type = ir.TensorType(w_val.const_value.dtype)
        graph.register_initializer(w_val)
        split_val = ir.Value(name=f"{base}_sibling_split", const_value=ir.tensor(np.array(ranks, dtype=np.int64)))
        split_val.shape = ir.Shape([len(ranks)])
        split_val.type = ir.TensorType(ir.DataType.INT64)
        graph.register_initializer(split_val)
        mm = ir.Node("", "MatMul", [x, w_val], name=f"{base}_sibling_matmul")
        split = ir.Node("", "Split", [mm.outputs[0], split_val], num_outputs=len(ranks),
                        attributes=[ir.AttrInt64("axis", -1)], name=f"{base}_sibling_split")
        for new in (mm, split):
            new.metadata_props.update(nodes[0].metadata_props)
        first = min(nodes, key=lambda n: list(graph).index(n))
        graph.insert_before(first, [mm, split])
        for old, out in zip(nodes, split.outputs):
            out.name = old.outputs[0].name + "_s"
            out.shape, out.type = old.outputs[0].shape, old.outputs[0].type
            ir.convenience.replace_all_uses_with(old.outputs[0], out)
        old_weights = [old.inputs[1] for old in nodes]
        for old in nodes:
            graph.remove(old, safe=True)
        for w in old_weights:
            if not w.uses() and w.name in graph.initializers and not w.is_graph_input():
                del graph.initializers[w.name]
