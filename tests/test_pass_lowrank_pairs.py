"""lowrank: merge pairs that do not save work, fold inner biases of kept ones, refuse unsafe matches."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import PassOptions, run_passes
from graph_passes.lowrank_pairs import pair_decision
from passes_helpers import export_sample, feeds_for, make_model, max_err, op_count, run

RNG = np.random.default_rng(0)


def _w(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)


def _pairs(report, action=None):
    p = next(p for p in report.passes if p.name == "lowrank")
    return [d for d in p.details if d["kind"] == "lowrank-pair" and (action is None or d["action"] == action)]


def _run_checked(model, feeds, **opts):
    out, report = run_passes(model, ["lowrank", "cleanup"], options=PassOptions(**opts), feeds=feeds)
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    return out, report


@pytest.mark.parametrize("name, merged, folded", [
    ("lowrank_mlp", 0, 2),  # rank 64 on 512x2048: keep both pairs, fold their inner biases
    ("lowrank_nopay", 2, 0),  # rank 384 on 512x512: r(m+n) >= mn, merge
    ("lowrank_block", 0, 6),
])
def test_samples(name, merged, folded):
    model = export_sample(name)
    feeds = feeds_for(name, (2, 37, 128))
    out, report = _run_checked(model, feeds)
    assert len(_pairs(report, "merged")) == merged
    assert len(_pairs(report, "bias-folded")) == folded
    matmuls_before, matmuls_after = op_count(model, "MatMul"), op_count(out, "MatMul")
    assert matmuls_before - matmuls_after == merged
    p = report.passes[0]
    assert p.params_after < p.params_before
    if merged:
        assert p.flops_after < p.flops_before


def test_threshold_option_keeps_nopay_pairs():
    model = export_sample("lowrank_nopay")
    feeds = feeds_for("lowrank_nopay", (3,))
    _, report = _run_checked(model, feeds, merge_threshold=2.0)
    assert len(_pairs(report, "merged")) == 0 and len(_pairs(report, "bias-folded")) == 2


def test_linformer_sequence_projection_refused():
    model = export_sample("linformer_encoder")
    feeds = feeds_for("linformer_encoder", (128,))
    out, report = _run_checked(model, feeds)
    p = report.passes[0]
    assert p.matches == 0 and op_count(out, "MatMul") == op_count(model, "MatMul")
    refused = [d for d in p.details if d["kind"] == "sequence-projection"]
    assert len(refused) == 4 and all("sequence axis" in d["reason"] for d in refused)


def test_decision_rule():
    assert pair_decision(512, 384, 512, 1.0) == "merge"
    assert pair_decision(512, 64, 512, 1.0) == "keep"
    assert pair_decision(512, 256, 512, 1.0) == "merge"  # r(m+n) == mn: no saving, merge
    assert pair_decision(512, 255, 512, 1.0) == "keep"


def _x(name="x", shape=("b", "n", 16)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _y():
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, None)


def _feeds(shape=(2, 5, 16), name="x"):
    return [{name: RNG.standard_normal(shape).astype(np.float32)},
            {name: RNG.standard_normal((1,) + tuple(shape[1:])).astype(np.float32)}]


def test_matmul_matmul_add_without_inner_bias():
    """The common third-party form (first factor without bias): kept as is, reported."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    model = make_model(nodes, [_x()], [_y()], [_w("A", 16, 2), _w("B", 2, 16), _w("b2", 16)])
    out, report = _run_checked(model, _feeds())
    assert [d["action"] for d in _pairs(report)] == ["kept"]
    assert op_count(out, "MatMul") == 2


def test_transposed_weight_and_bias_first_add_merged():
    """MatMul(x, Transpose(W)) (weights stored transposed) with Add(bias, h): merged when r is large."""
    nodes = [helper.make_node("Transpose", ["At"], ["A"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Add", ["b1", "h"], ["hb"]),
             helper.make_node("MatMul", ["hb", "B"], ["y"])]
    model = make_model(nodes, [_x()], [_y()], [_w("At", 12, 16), _w("b1", 12), _w("B", 12, 16)])
    out, report = _run_checked(model, _feeds())
    assert [d["action"] for d in _pairs(report)] == ["merged"]
    assert op_count(out, "MatMul") == 1


@pytest.mark.parametrize("rank, action", [(2, "bias-folded"), (12, "merged")])
def test_reshape_gemm_gemm_reshape(rank, action):
    """SVD-factorized module flattened to 2-D (dynamo exporter): Reshape -> Gemm(transB) x2 -> Reshape."""
    nodes = [
        helper.make_node("Constant", [], ["s2"], value=numpy_helper.from_array(np.array([-1, 16], np.int64))),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Reshape", ["x", "s2"], ["x2"]),
        helper.make_node("Gemm", ["x2", "A", "b1"], ["h"], transB=1),
        helper.make_node("Gemm", ["h", "B", "b2"], ["y2"], transB=1),
        helper.make_node("Reshape", ["y2", "xs"], ["y"]),
    ]
    model = make_model(nodes, [_x()], [_y()], [_w("A", rank, 16), _w("b1", rank), _w("B", 16, rank), _w("b2", 16)])
    out, report = _run_checked(model, _feeds())
    assert [d["action"] for d in _pairs(report)] == [action]
    assert op_count(out, "Gemm") == (1 if action == "merged" else 2)


def test_matmul_gemm_torchscript_form():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Gemm", ["h", "B", "b2"], ["y"], transB=1)]
    model = make_model(nodes, [_x(shape=("b", 16))], [_y()], [_w("A", 16, 12), _w("B", 16, 12), _w("b2", 16)])
    out, report = _run_checked(model, _feeds((3, 16)))
    assert [d["action"] for d in _pairs(report)] == ["merged"]
    assert op_count(out, "MatMul") == 0 and op_count(out, "Gemm") == 1


@pytest.mark.parametrize("rank, action", [(2, "bias-folded"), (24, "merged")])
def test_conv_pair(rank, action):
    """CED-style Conv(3x3, in->r) -> Conv(1x1, r->out)."""
    nodes = [helper.make_node("Conv", ["x", "A", "b1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "B", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = [_w("A", rank, 4, 3, 3), _w("b1", rank), _w("B", 8, rank, 1, 1), _w("b2", 8)]
    model = make_model(nodes, [_x(shape=("b", 4, "h", "w"))], [_y()], inits)
    out, report = _run_checked(model, _feeds((2, 4, 7, 9)))
    pairs = _pairs(report)
    assert [d["action"] for d in pairs] == [action] and pairs[0]["m"] == 36
    assert op_count(out, "Conv") == (1 if action == "merged" else 2)


def _refusal(nodes, inputs, inits, feeds):
    model = make_model(nodes, inputs, [_y()], inits)
    out, report = run_passes(model, ["lowrank"], feeds=feeds)
    assert report.passes[0].matches == 0
    assert op_count(out, "MatMul") == op_count(model, "MatMul")
    return out


def _refusal_reason(nodes, inits, inputs) -> str | None:
    """Why the MatMul rule's check refused (via the rewriter's tracer)."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern as orp

    from graph_passes.lowrank_pairs import LOWRANK_RULES

    model = ir.serde.deserialize_model(make_model(nodes, inputs, [_y()], inits))
    tracer = orp.MatchingTracer()
    LOWRANK_RULES.apply_to_model(model, tracer=tracer)
    reasons = [info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos
               if info.status == orp.MatchStatus.CONDITION_FAILED]
    return " | ".join(reasons)


def test_refuses_graph_input_weight():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])]
    inputs = [_x(), helper.make_tensor_value_info("A", TensorProto.FLOAT, [16, 12])]
    feeds = [{"x": RNG.standard_normal((2, 3, 16)).astype(np.float32),
              "A": RNG.standard_normal((16, 12)).astype(np.float32)}]
    _refusal(nodes, inputs, [_w("B", 12, 16)], feeds)
    assert "not a constant initializer" in _refusal_reason(nodes, [_w("B", 12, 16)], inputs)


def test_refuses_shared_weight():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["o"]),
             helper.make_node("MatMul", ["x", "A"], ["h2"]), helper.make_node("Add", ["o", "h2"], ["y"])]
    inits = [_w("A", 16, 16), _w("B", 16, 16)]
    _refusal(nodes, [_x()], inits, _feeds())
    assert "shared" in _refusal_reason(nodes, inits, [_x()])


def test_refuses_non_per_feature_bias():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("MatMul", ["hb", "B"], ["y"])]
    inits = [_w("A", 16, 12), _w("b1", 5, 12), _w("B", 12, 16)]
    _refusal(nodes, [_x()], inits, _feeds())
    assert "per-feature" in _refusal_reason(nodes, inits, [_x()])


def test_refuses_batched_weights():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])]
    inits = [_w("A", 2, 16, 12), _w("B", 2, 12, 16)]
    _refusal(nodes, [_x(shape=(2, "n", 16))], inits, [{"x": RNG.standard_normal((2, 3, 16)).astype(np.float32)}])
    assert "2-D" in _refusal_reason(nodes, inits, [_x(shape=(2, "n", 16))])


def test_shared_bias_is_fine():
    """Exporters merge equal initializers (every all-zero bias of a fresh BERT becomes one): both pairs still match,
    each gets its own folded bias, and the shared original stays for its other users."""
    nodes = [helper.make_node("MatMul", ["x", "A1"], ["h1"]), helper.make_node("MatMul", ["h1", "B1"], ["o1"]),
             helper.make_node("Add", ["o1", "zero"], ["y1"]), helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "A2"], ["h2"]), helper.make_node("MatMul", ["h2", "B2"], ["o2"]),
             helper.make_node("Add", ["o2", "zero"], ["y"])]
    zero = numpy_helper.from_array(np.zeros(16, np.float32), "zero")
    inits = [_w("A1", 16, 2), _w("B1", 2, 16), _w("A2", 16, 2), _w("B2", 2, 16), zero]
    model = make_model(nodes, [_x()], [_y()], inits)
    out, report = _run_checked(model, _feeds())
    assert [d["action"] for d in _pairs(report)] == ["kept", "kept"]


@functools.lru_cache(maxsize=None)
def _gpt2_pairs_bytes() -> bytes:
    """tests/third_party_models.gpt2_conv1d_pairs exported with the dynamo exporter (once per session)."""
    import torch
    from torch.export import Dim

    pytest.importorskip("transformers")
    from third_party_models import gpt2_conv1d_pairs

    path = os.path.join(tempfile.mkdtemp(prefix="lrexport-gpt2-"), "gpt2.onnx")
    with torch.no_grad():
        torch.onnx.export(gpt2_conv1d_pairs(), (torch.randint(0, 100, (2, 16)),), path, dynamo=True,
                          dynamic_shapes=({0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=128)},),
                          input_names=["input_ids"], output_names=["y"], opset_version=18, verbose=False)
    return onnx.load(path).SerializeToString()


def _gpt2_pairs() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = onnx.ModelProto()
    model.ParseFromString(_gpt2_pairs_bytes())
    feeds = [{"input_ids": RNG.integers(0, 100, size=(b, n)).astype(np.int64)} for b, n in ((2, 16), (1, 37))]
    return model, feeds


def test_gpt2_conv1d_pairs_found_after_cleanup():
    """Hugging Face Conv1D pairs export as Gemm -> Reshape([-1, r]) -> Gemm; cleanup drops the no-op Reshape,
    then all 8 pairs match (rank 8 on 64-wide layers: kept, inner biases folded), parity on ORT."""
    model, feeds = _gpt2_pairs()
    out, report = run_passes(model, ["cleanup", "lowrank", "cleanup"], feeds=feeds)
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    cleanup, lowrank = report.passes[0], report.passes[1]
    assert sum(d["kind"] == "noop-reshape" for d in cleanup.details) >= 8
    pairs = _pairs(report)
    assert lowrank.matches == 8 and [d["action"] for d in pairs] == ["bias-folded"] * 8, pairs
    assert {(d["m"], d["r"], d["n"]) for d in pairs} == {(64, 8, 192), (64, 8, 64), (64, 8, 256), (256, 8, 64)}
    assert op_count(out, "Gemm") == 16 and lowrank.params_after < lowrank.params_before


def test_pair_not_taken_is_reported_with_its_reason():
    """Without cleanup the Reshape stays between the factors: each pair is listed as refused, saying why."""
    model, _ = _gpt2_pairs()
    _, report = run_passes(model, ["lowrank"])
    p = report.passes[0]
    refused = _pairs(report, "refused")
    assert p.matches == 0 and len(refused) == 8
    assert all(d["reason"].startswith("a no-op Reshape") and "cleanup" in d["reason"] for d in refused)
    assert "refused [node_addmm -> node_addmm_1]: a no-op Reshape" in report.format_table()


def test_reshape_that_changes_the_shape_is_reported():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="down"),
             helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([-1, 4], np.int64))),
             helper.make_node("Reshape", ["h", "s"], ["h2"], name="flatten"),
             helper.make_node("MatMul", ["h2", "B"], ["y"], name="up")]
    model = make_model(nodes, [_x()], [_y()], [_w("A", 16, 4), _w("B", 4, 16)])
    _, report = _run_checked(model, _feeds())
    (d,) = _pairs(report)
    assert d["action"] == "refused" and d["nodes"] == ["down", "up"]
    assert d["reason"] == "a Reshape (flatten) between the factors that is not a no-op: it changes the rank (3 -> 2)"


def test_check_refusal_is_in_the_report():
    """A pair a rule's check refuses (here: a shared first factor) is listed with the check's reason."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="f1"), helper.make_node("MatMul", ["h", "B"], ["o"], name="f2"),
             helper.make_node("MatMul", ["x", "A"], ["h2"], name="other"), helper.make_node("Add", ["o", "h2"], ["y"])]
    model = make_model(nodes, [_x()], [_y()], [_w("A", 16, 16), _w("B", 16, 16)])
    _, report = _run_checked(model, _feeds())
    (d,) = _pairs(report)
    assert (d["action"], d["nodes"], d["reason"]) == ("refused", ["f1", "f2"], "first factor is shared with other nodes")
    assert report.passes[0].matches == 0


def test_chained_merge_report():
    """l0 -> l1 -> l2 without anything between: l0.l1 (200x76x307) saves work, l1.l2 (76x307x600) does not and is
    merged, which takes l1 from l0.l1. The report must not list l0.l1 as kept; the new pair l0 -> (l1.l2)
    (200x76x600) is decided on its own and kept."""
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="l0"), helper.make_node("MatMul", ["h0", "W1"], ["h1"], name="l1"),
             helper.make_node("MatMul", ["h1", "W2"], ["y"], name="l2")]
    model = make_model(nodes, [_x(shape=("b", 200))], [_y()], [_w("W0", 200, 76), _w("W1", 76, 307), _w("W2", 307, 600)])
    out, report = _run_checked(model, _feeds((3, 200)))
    got = [(d["action"], d["nodes"][0], d["m"], d["r"], d["n"]) for d in _pairs(report)]
    assert got == [("superseded", "l0", 200, 76, 307), ("merged", "l1", 76, 307, 600), ("kept", "l0", 200, 76, 600)]
    superseded = _pairs(report, "superseded")[0]
    assert superseded["reason"] == "was kept; its second factor l1 went into the merged pair l1 -> l2"
    assert not superseded["matched"] and report.passes[0].matches == 2
    assert _pairs(report, "kept")[0]["nodes"] == ["l0", "l1+l2"]  # the merged node is named after its factors
    assert op_count(out, "MatMul") == 2
