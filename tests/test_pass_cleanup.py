"""cleanup: constant folding, identity/unused removal, CSE, shape inference, checker."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graph_passes import run_passes
from passes_helpers import make_model, op_count, run


def _model():
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "wt")
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),  # foldable
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("MatMul", ["xi", "w"], ["h"]),
        helper.make_node("Relu", ["x"], ["dead"]),  # unused
        helper.make_node("Neg", ["h"], ["a"]),
        helper.make_node("Neg", ["h"], ["b"]),  # duplicate of the line above
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])


def test_cleanup_folds_and_removes():
    model = _model()
    feeds = [{"x": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)} for n in (1, 5)]
    out, report = run_passes(model, ["cleanup"], feeds=feeds)
    p = report.passes[0]
    assert p.changed and p.parity == 0.0
    assert op_count(out, "Transpose") == 0 and op_count(out, "Identity") == 0 and op_count(out, "Relu") == 0
    assert op_count(out, "Neg") == 1
    assert out.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3  # shape inference ran
    for f, got in zip(feeds, run(out, feeds)):
        np.testing.assert_allclose(got[0], -2 * f["x"] @ np.arange(12, dtype=np.float32).reshape(3, 4).T, rtol=1e-6)


def test_cleanup_on_clean_model_reports_no_change():
    model = _model()
    out, _ = run_passes(model, ["cleanup"])
    _, report = run_passes(out, ["cleanup"])
    assert not report.passes[0].changed
