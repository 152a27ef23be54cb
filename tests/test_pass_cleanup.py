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


def test_cleanup_keeps_a_sequence_a_sequence():
    """A list built in a loop (what the TorchScript exporter writes for ``outs.append`` in a scripted
    RNN): ``SequenceEmpty`` carries no type, shape inference infers ``seq(tensor(float))``; the value
    must stay a sequence (onnx-ir's merge copied only the element dtype, making it a tensor that ONNX
    Runtime refuses)."""
    nodes = [
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
        helper.make_node("Neg", ["x"], ["nx"]),
        helper.make_node("SequenceInsert", ["empty", "x"], ["one"]),
        helper.make_node("SequenceInsert", ["one", "nx"], ["two"]),
        helper.make_node("ConcatFromSequence", ["two"], ["y"], axis=0, new_axis=1),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n", 4])])
    feeds = [{"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}]
    out, report = run_passes(model, ["cleanup"], feeds=feeds)
    assert report.passes[0].parity == 0.0
    types = {v.name: v.type for v in out.graph.value_info}
    assert types["empty"].HasField("sequence_type"), types.get("empty")
    np.testing.assert_array_equal(run(out, feeds)[0][0], np.stack([feeds[0]["x"], -feeds[0]["x"]]))
