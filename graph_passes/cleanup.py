"""Cleanups from onnxscript/onnx-ir: constant folding, identity/unused removal, shape inference, checker."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants_ir

from graph_passes._base import GraphPass, Match, record
from graph_passes.noop_reshape import remove_noop_reshapes
from graph_passes.shape_inference import TypedShapeInferencePass


class CleanupPass(GraphPass):
    """Library passes, mostly: leaves the graph as the rewrite rules expect it (constants visible, no dead code).

    Its one rule of its own turns no-op Reshapes into Identity (``graph_passes.noop_reshape``, one
    "noop-reshape" record each); one more record gives the node and initializer counts."""

    name = "cleanup"
    min_opset = 0  # library passes only

    def run(self, model: ir.Model) -> bool:
        n_nodes = sum(1 for _ in model.graph)
        n_init = len(model.graph.initializers)
        folded = fold_constants_ir(model, onnx_shape_inference=False)
        reshapes = remove_noop_reshapes(model)  # one "noop-reshape" record each
        result = self._library_passes(model)
        after_nodes = sum(1 for _ in model.graph)
        after_init = len(model.graph.initializers)
        record(Match("cleanup", "library passes", matched=False,
                     info={"nodes_before": n_nodes, "nodes_after": after_nodes,
                           "initializers_before": n_init, "initializers_after": after_init}))
        return bool(reshapes) or bool(folded.modified or result.modified) and (
            after_nodes != n_nodes or after_init != n_init or folded.modified)

    @staticmethod
    def _library_passes(model: ir.Model) -> ir.passes.PassResult:
        manager = ir.passes.PassManager(
            [
                common_passes.IdentityEliminationPass(),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
                common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024),
                common_passes.DeduplicateInitializersPass(),
                common_passes.CommonSubexpressionEliminationPass(),
                common_passes.NameFixPass(),
                TypedShapeInferencePass(),
                common_passes.CheckerPass(),
            ],
        )
        return manager(model)
