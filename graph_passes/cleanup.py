"""Cleanups from onnxscript/onnx-ir: constant folding, identity/unused removal, shape inference, checker."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common import _c_api_utils
from onnxscript.optimizer import fold_constants_ir

from graph_passes._base import GraphPass, Match, record
from graph_passes.noop_reshape import remove_noop_reshapes


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


class TypedShapeInferencePass(ir.passes.InPlacePass):
    """onnx shape inference, merged back by whole type for values that are not tensors.

    onnx-ir's ``ShapeInferencePass`` copies back only the inferred ``dtype``, and setting a dtype on a value
    makes it a tensor: a sequence (``SequenceEmpty``, a ``Loop`` carrying a list) became a tensor of its
    element type, which ONNX Runtime then refuses. Here a sequence, optional or map value takes the inferred
    type as a whole (or keeps its own) and no shape; tensors merge as onnx-ir does. A model shape inference
    fails on is left unchanged."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)

        try:
            inferred_proto = _c_api_utils.call_onnx_api(infer, model)
        except Exception:  # as onnx-ir's pass: inference is best effort
            return ir.passes.PassResult(model, False)
        inferred = ir.serde.deserialize_model(inferred_proto)
        modified = False
        for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
            found = ir.convenience.create_value_mapping(inferred_graph)
            for name, value in ir.convenience.create_value_mapping(graph).items():
                new = found.get(name)
                if new is None or new.type is None:
                    continue
                if not isinstance(new.type, ir.TensorType) or (value.type is not None
                                                               and not isinstance(value.type, ir.TensorType)):
                    if value.type is None:
                        value.type = new.type
                        modified = True
                    continue
                if new.shape is not None and value.shape != new.shape:
                    value.shape = new.shape
                    modified = True
                if new.dtype is not None and value.dtype != new.dtype:
                    value.dtype = new.dtype
                    modified = True
        return ir.passes.PassResult(model, modified)
