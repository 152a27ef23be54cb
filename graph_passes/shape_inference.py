"""Shape inference that keeps a sequence a sequence; every pass and helper that infers shapes uses it."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils


class TypedShapeInferencePass(ir.passes.InPlacePass):
    """onnx shape inference, merged back by whole type for values that are not tensors.

    onnx-ir's ``ShapeInferencePass`` copies back only the inferred ``dtype``, and setting a dtype on a value
    makes it a tensor: a sequence (``SequenceEmpty``, a ``Loop`` carrying a list) became a tensor of its
    element type, which ONNX Runtime then refuses. Here a sequence, optional or map value takes the inferred
    type as a whole (or keeps its own) and no shape; tensors merge as onnx-ir does. A model shape inference
    fails on is left unchanged."""

    def __init__(self, check_type: bool = True, strict_mode: bool = True, data_prop: bool = True) -> None:
        super().__init__()
        self.options = {"check_type": check_type, "strict_mode": strict_mode, "data_prop": data_prop}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(proto, **self.options)

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
