"""sibling: first factors of low-rank pairs sharing an input become one MatMul + Split."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graph_passes import DEFAULT_PASSES, run_passes
from passes_helpers import export_sample, feeds_for, make_model, max_err, op_count, run


def test_lowrank_block_qkv_concatenated():
    model = export_sample("lowrank_block")
    feeds = feeds_for("lowrank_block", (2, 37, 100))
    out, report = run_passes(model, ["lowrank", "sibling", "cleanup"], feeds=feeds)
    sib = report.passes[1]
    groups = [d for d in sib.details if d["action"] == "concatenated"]
    assert len(groups) == 1 and groups[0]["ranks"] == [64, 64, 64]  # q/k/v; fc1 and out_proj read alone
    assert op_count(out, "Split") == 1
    assert op_count(out, "MatMul") == op_count(model, "MatMul") - 2
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    assert report.passes[2].params_after == report.passes[0].params_after  # same weights, concatenated


def test_not_default():
    assert "sibling" not in DEFAULT_PASSES


def _w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def test_refuses_non_factors():
    """Only MatMuls followed by a constant second factor join a group: dense siblings stay alone."""
    nodes = [
        helper.make_node("MatMul", ["x", "A1"], ["h1"]), helper.make_node("MatMul", ["h1", "B1"], ["o1"]),
        helper.make_node("MatMul", ["x", "D"], ["o2"]),  # dense projection: not a first factor
        helper.make_node("MatMul", ["x", "G"], ["g"]), helper.make_node("MatMul", ["x", "A3"], ["h3"]),
        helper.make_node("MatMul", ["h3", "g"], ["o3"]),  # second factor computed: not a pair
        helper.make_node("Sum", ["o1", "o2", "o3"], ["y"]),
    ]
    inits = [_w("A1", 8, 2), _w("B1", 2, 8, seed=1), _w("D", 8, 8, seed=2), _w("G", 8, 8, seed=3),
             _w("A3", 8, 8, seed=4)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    out, report = run_passes(model, ["sibling"], feeds=[{"x": np.ones((8, 8), np.float32)}])
    assert report.passes[0].matches == 0 and op_count(out, "Split") == 0


def test_two_pairs_with_inner_bias():
    nodes = [
        helper.make_node("MatMul", ["x", "A1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["hb1"]),
        helper.make_node("MatMul", ["hb1", "B1"], ["o1"]),
        helper.make_node("MatMul", ["x", "A2"], ["h2"]), helper.make_node("MatMul", ["h2", "B2"], ["o2"]),
        helper.make_node("Add", ["o1", "o2"], ["y"]),
    ]
    inits = [_w("A1", 8, 2), _w("b1", 2, seed=5), _w("B1", 2, 8, seed=1), _w("A2", 8, 3, seed=2),
             _w("B2", 3, 8, seed=3)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    feeds = [{"x": np.random.default_rng(n).standard_normal((2, n, 8)).astype(np.float32)} for n in (1, 9)]
    out, report = run_passes(model, ["sibling", "cleanup"], feeds=feeds)
    assert report.passes[0].matches == 1 and report.passes[0].details[0]["ranks"] == [2, 3]
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-5
