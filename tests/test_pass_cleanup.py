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


def _noop_reshape_model():
    """x [N, 16] -> Gemm (r=4) -> Reshape([-1, 4]) -> Gemm -> Reshape([0, 2, 8]) -> y: the first Reshape is
    a no-op with N symbolic (the Hugging Face Conv1D pair's), the second changes the shape."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("A", (16, 4)), ("B", (4, 16)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s1", [-1, 4]), ("s2", [0, 2, 8]))]
    nodes = [helper.make_node("Gemm", ["x", "A"], ["h"], name="g1"),
             helper.make_node("Reshape", ["h", "s1"], ["h2"], name="noop"),
             helper.make_node("Gemm", ["h2", "B"], ["o"], name="g2"),
             helper.make_node("Reshape", ["o", "s2"], ["y"], name="split")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_cleanup_removes_noop_reshapes_only():
    model = _noop_reshape_model()
    feeds = [{"x": np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)} for n in (1, 7)]
    out, report = run_passes(model, ["cleanup"], feeds=feeds)
    p = report.passes[0]
    assert p.changed and p.parity == 0.0
    assert [(d["kind"], d["nodes"]) for d in p.details if d["kind"] == "noop-reshape"] == [("noop-reshape", ["noop"])]
    assert [n.name for n in out.graph.node if n.op_type == "Reshape"] == ["split"]
    assert [n.input[0] for n in out.graph.node if n.name == "g2"] == ["h"]  # the Gemms are now adjacent


def test_noop_reshape_decision():
    from graph_passes.noop_reshape import noop_reason

    assert noop_reason(["N", 8], [-1, 8], None, False) is None  # symbolic leading dim, -1 takes it
    assert noop_reason(["b", "s", 64], [0, 0, 64], None, False) is None  # 0 copies the input dim
    assert noop_reason(["b", "s", 64], None, ["b", "s", 64], False) is None  # computed target, same shape
    assert "rank" in noop_reason(["b", "s", 64], [-1, 64], None, False)
    assert "symbolic" in noop_reason(["N", 8], [4, 8], None, False)
    assert "changes" in noop_reason([2, 8], [2, 4], None, False)
    assert "more than one -1" in noop_reason(["a", "b"], [-1, -1], None, False)
    assert noop_reason([0, 8], [0, 8], None, True) is None  # allowzero: a 0 is a real 0, equal here
    assert "symbolic" in noop_reason(["N", 8], [0, 8], None, True)  # N may be nonzero
    assert "not fully known" in noop_reason(["b", None], None, ["b", None], False)  # unknown dims never match
    assert "shape changes" in noop_reason(["b", "s"], None, ["s", "b"], False)


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
