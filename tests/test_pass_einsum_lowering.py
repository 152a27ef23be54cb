"""einsum: Einsum nodes become MatMul/Mul/ReduceSum/Transpose/Reshape, agreeing with numpy.einsum."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graph_passes import run_passes
from graph_passes.einsum_lowering import split_order
from passes_helpers import export_sample, feeds_for, make_model, max_err, op_count, run

SIZES = {"b": 2, "h": 3, "i": 5, "j": 7, "n": 6, "d": 4, "e": 3, "u": 2, "k": 5, "m": 4, "z": 3, "A": 2}


def _graph(equation: str, shapes: list[tuple]):
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, list(s)) for nm, s in zip(names, shapes)]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    return make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), names


def _shapes(equation: str, sizes: dict[str, int]) -> list[tuple[int, ...]]:
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    return [tuple(sizes[c] for c in t.replace("...", "bh")) for t in lhs]


EQUATIONS = [
    "bhnd,bhne->bhnde",  # outer product (the causal state)
    "bhnd,bhnde->bhne",  # query contraction
    "bhnd,bhnd->bhn",  # normalizer (dot product)
    "bhnd,bhne->bhde",  # non-causal state
    "b h i d, b h j d -> b h i j",  # spaced, attention scores
    "bhij,bhjd->bhid",
    "bid,dj->bij",  # projection with a weight-like operand
    "bhnd,bhde->bhen",  # output transposed
    "bkdz,bdze->bkez",  # two contracted letters
    "bij,bjk->bk",  # summed free letter
    "bhund,bhude,bhun->bhune",  # 3 operands (chunked attention)
    "...nde,...nd,...n->...ne",  # 3 operands with ellipsis
    "bhnd->bhdn",  # single operand transpose
    "bhnd->bhd",  # single operand sum
]


@pytest.mark.parametrize("equation", EQUATIONS)
def test_lowered_matches_numpy(equation):
    shapes = _shapes(equation, SIZES)
    model, names = _graph(equation, shapes)
    rng = np.random.default_rng(0)
    feeds = [{nm: rng.standard_normal(s).astype(np.float32) for nm, s in zip(names, shapes)}]
    out, report = run_passes(model, ["einsum", "cleanup"], feeds=feeds)
    assert report.passes[0].matches == 1
    assert op_count(out, "Einsum") == 0
    got = run(out, feeds)[0][0]
    ref = np.einsum(equation.replace(" ", ""), *[feeds[0][nm].astype(np.float64) for nm in names])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_dynamic_shapes():
    """Lowered graph is shape-generic: one model, several sequence lengths."""
    eq = "bkdz,bdze->bkez"
    model, names = _graph(eq, [("b", "k", 4, 3), ("b", 4, 3, "e")])
    rng = np.random.default_rng(1)
    feeds = [{"x0": rng.standard_normal((b, k, 4, 3)).astype(np.float32),
              "x1": rng.standard_normal((b, 4, 3, e)).astype(np.float32)} for b, k, e in [(1, 1, 2), (3, 9, 5)]]
    out, _ = run_passes(model, ["einsum"], feeds=feeds)
    for f, got in zip(feeds, run(out, feeds)):
        np.testing.assert_allclose(got[0], np.einsum(eq, f["x0"], f["x1"]), rtol=1e-4, atol=1e-4)


def test_split_order_keeps_needed_letters():
    assert split_order(["bhund", "bhude", "bhun"], "bhune") == [("bhund", "bhude", "bhune"), ("bhune", "bhun", "bhune")]


def test_refuses_diagonal_and_implicit():
    for eq in ("ii->i", "ij,jk"):
        shapes = [(3, 3)] if eq == "ii->i" else [(3, 4), (4, 5)]
        model, names = _graph(eq, shapes)
        out, report = run_passes(model, ["einsum"])
        assert report.passes[0].matches == 0 and op_count(out, "Einsum") == 1
        assert [d["action"] for d in report.passes[0].details] == ["left"]


@pytest.mark.parametrize("name", ["causal_block", "noncausal_encoder"])
def test_samples_have_no_einsum_left(name):
    model = export_sample(name)
    feeds = feeds_for(name, (1, 37, 100))
    out, report = run_passes(model, ["einsum", "cleanup"], feeds=feeds)
    assert op_count(out, "Einsum") == 0
    assert report.passes[0].matches == op_count(model, "Einsum") >= 3
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
