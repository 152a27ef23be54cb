"""The one pass shape: typed Match records with one meaning of "match" in every pass, module-level rule
sets that run under a stock onnxscript rewrite, records from unmigrated passes, the recurrent state pass,
and graph_passes standing below exporter (errors and formatting)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import pattern as orp
from onnxscript.rewriter import rewrite

import graph_passes.pass_manager as pass_manager
from graph_passes import GraphPass, GraphPassResult, Match, PassOptions, collecting, rule_options, run_passes
from graph_passes.causal_chunked import OP_ACTION
from graph_passes.einsum_lowering import EINSUM_RULES
from graph_passes.lowrank_pairs import LOWRANK_RULES
from graph_passes.recurrent_state import RecurrentRefusal, RecurrentStatePass
from passes_helpers import export_sample, feeds_for, make_model, max_err, op_count, run

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _pair_model(rank: int) -> onnx.ModelProto:
    """x @ A (16 x rank) + b1 -> @ B (rank x 16): merged when rank >= 8, else kept with its bias folded."""
    def w(name, *shape):
        return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) / 4, name)

    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("MatMul", ["hb", "B"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      [w("A", 16, rank), w("b1", rank), w("B", rank, 16)])


def _x_feeds() -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((b, n, 16)).astype(np.float32)} for b, n in ((2, 5), (1, 1))]


def test_kept_pair_is_a_match_left_einsum_is_not():
    """A match is a site the rules accepted, rewritten or kept because keeping is best; a site left alone is
    recorded with the reason the rule gave and does not count."""
    model = export_sample("lowrank_mlp")
    out, report = run_passes(model, ["lowrank"], options=PassOptions(fold_inner_bias=False),
                             feeds=feeds_for("lowrank_mlp", (3,)))
    p = report.passes[0]
    pairs = [(d["action"], d["matched"], d["rewritten"]) for d in p.details if d["kind"] == "lowrank-pair"]
    assert pairs == [("kept", True, False)] * 2 and p.matches == 2
    assert op_count(out, "MatMul") == op_count(model, "MatMul")

    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk")  # implicit output: not lowered
    einsum = make_model([node], [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 3]) for n in "ab"],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    _, report = run_passes(einsum, ["einsum"])
    (left,) = report.passes[0].details
    assert (left["action"], left["matched"], left["rewritten"], report.passes[0].matches) == ("left", False, False, 0)
    tracer = orp.MatchingTracer()
    EINSUM_RULES.apply_to_model(ir.serde.deserialize_model(einsum), tracer=tracer)
    given = {info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos
             if info.status == orp.MatchStatus.CONDITION_FAILED}
    assert given == {left["reason"]}


def test_every_record_has_the_match_fields():
    model = export_sample("lowrank_block")
    _, report = run_passes(model, ["cleanup", "lowrank", "sibling", "einsum", "cleanup"],
                           feeds=feeds_for("lowrank_block", (5,)))
    for p in report.passes:
        assert p.matches == sum(d["matched"] for d in p.details), p.name
        for d in p.details:
            assert {"kind", "action", "nodes", "reason", "matched", "rewritten"} <= d.keys()
            if d["action"] in ("refused", "left"):
                assert d["reason"] and not d["matched"]
    assert sum(d["rewritten"] for d in report.passes[2].details) == 1  # q/k/v concatenated
    assert report.passes[2].changed


@pytest.mark.parametrize("name, matched, left", [
    ("causal_block", ["causal-normalizer", "causal-numerator"], []),
    ("noncausal_encoder", [], ["noncausal-linear-attention"] * 2),
])
def test_causal_chunk_records_have_the_shape(name, matched, left):
    """causal-chunk: a rewritten site is a match; what no rule took is left (not a match) with a reason."""
    _, report = run_passes(export_sample(name), ["causal-chunk"], feeds=feeds_for(name, (5, 37)))
    p = report.passes[0]
    assert sorted(d["kind"] for d in p.details if d["matched"]) == matched == sorted(
        d["kind"] for d in p.details if d["action"] == OP_ACTION and d["rewritten"])
    assert p.matches == len(matched)
    lefts = [d for d in p.details if d["action"] == "left"]
    assert [d["kind"] for d in lefts] == left and all(d["reason"] and not d["matched"] for d in lefts)
    assert {d["action"] for d in p.details} <= {OP_ACTION, "merged", "left"} | {
        d["action"] for d in p.details if d["kind"] == "causal-canonical"}


@pytest.mark.parametrize("rank, merged", [(12, True), (2, False)])
def test_rule_set_under_stock_rewrite(rank, merged):
    """The module-level rule set needs no pass: stock rewrite, default options, nothing recorded anywhere."""
    model = _pair_model(rank)
    feeds = _x_feeds()
    out = rewrite(model, pattern_rewrite_rules=LOWRANK_RULES)
    assert isinstance(out, onnx.ModelProto)
    assert op_count(out, "MatMul") == (1 if merged else 2) and op_count(out, "Add") == 1
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-5


def test_collector_gives_options_and_gathers_records():
    model = _pair_model(12)
    with collecting(PassOptions(merge_threshold=2.0)) as found:
        assert rule_options().merge_threshold == 2.0
        out = rewrite(model, pattern_rewrite_rules=LOWRANK_RULES)
    assert rule_options() == PassOptions()
    assert [(m.kind, m.action, m.rewritten, m.info["r"]) for m in found] == [
        ("lowrank-pair", "bias-folded", True, 12)]
    assert op_count(out, "MatMul") == 2  # threshold 2: the rank-12 pair saves work, kept
    feeds = _x_feeds()
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-5

    einsum = make_model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")],
                        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 3]) for n in "ab"],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with collecting() as found:
        lowered = rewrite(einsum, pattern_rewrite_rules=EINSUM_RULES)
    assert [(m.action, m.info["equation"]) for m in found] == [("lowered (2 operands)", "bij,bjk->bik")]
    feeds = [{n: RNG.standard_normal((2, 3, 3)).astype(np.float32) for n in "ab"}]
    np.testing.assert_allclose(run(lowered, feeds)[0][0], feeds[0]["a"] @ feeds[0]["b"], rtol=1e-5, atol=1e-6)


class _LegacyPass(GraphPass):
    """The shape of a pass not migrated yet: overrides call, appends dicts ("counts": False: no match)."""

    name = "legacy"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details.append({"kind": "thing", "action": "done", "nodes": ["n1"], "size": 3})
        self.details.append({"kind": "thing", "action": "left", "nodes": ["n2"], "counts": False, "reason": "odd"})
        return ir.passes.PassResult(model, False)


def test_unmigrated_pass_records_still_read(monkeypatch):
    monkeypatch.setitem(pass_manager._REGISTRY, "legacy", _LegacyPass)
    _, report = run_passes(export_sample("lowrank_mlp"), ["legacy"])
    p = report.passes[0]
    assert p.matches == 1
    assert p.details == [
        {"kind": "thing", "action": "done", "nodes": ["n1"], "reason": None, "matched": True, "rewritten": True,
         "size": 3},
        {"kind": "thing", "action": "left", "nodes": ["n2"], "reason": "odd", "matched": False, "rewritten": False}]
    assert "thing: left [n2] reason=odd" in report.format_table()


def _cumsum_model(opset: int = 18) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="running")
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    return make_model([node], [x], [y], [axis], opset=opset)


def test_recurrent_state_pass_has_the_shape():
    model = ir.from_proto(_cumsum_model())
    res = RecurrentStatePass()(model)
    assert isinstance(res, GraphPassResult) and res.modified
    assert [(m.kind, m.action, m.nodes, m.rewritten, m.info["state"]) for m in res.matches] == [
        ("running-sum", "carried", ["running"], True, "state_0")]
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    state = RNG.standard_normal((2, 4)).astype(np.float32)
    y, new_state = run(ir.to_proto(model), [{"x": x, "state_0": state}])[0]
    np.testing.assert_allclose(y, np.cumsum(x, axis=1) + state[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state, x.sum(axis=1) + state, rtol=1e-5, atol=1e-6)


def test_recurrent_state_pass_refuses_an_old_opset():
    model = ir.from_proto(_cumsum_model(opset=12))
    with pytest.raises(RecurrentRefusal, match="opset 12 predates 13"):
        RecurrentStatePass()(model)
    assert [v.name for v in model.graph.inputs] == ["x"]


# precision_cast.py (another helper's file) still imports exporter.errors: its one import line changes to
# graph_passes.errors at merge, and this entry goes with it
def test_graph_passes_imports_nothing_from_exporter():
    offenders = set()
    for path in sorted((ROOT / "graph_passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "exporter" or n.startswith("exporter.") for n in names):
                offenders.add(path.name)
    assert not offenders


def test_exporter_sees_the_same_error_and_formatting():
    import exporter.errors
    import exporter.table
    import graph_passes.errors
    import graph_passes.formatting

    assert exporter.errors.LrexportError is graph_passes.errors.LrexportError
    assert issubclass(exporter.errors.ParityFailure, graph_passes.errors.LrexportError)
    assert exporter.table.fmt_shapes is graph_passes.formatting.fmt_shapes
    assert exporter.table.fmt_shapes({"x": (1, 95, 512), "s": ()}) == "x 1x95x512, s scalar"
