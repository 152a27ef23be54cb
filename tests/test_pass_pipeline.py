"""run_passes: registry, default pipeline end to end on the samples, reports, parity failures."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graph_passes.pass_manager as pass_manager
from graph_passes import (
    DEFAULT_PASSES,
    PASS_NAMES,
    GraphPass,
    PassOptions,
    PassParityError,
    PipelineReport,
    run_passes,
)
from passes_helpers import cumsum_input_ranks, export_sample, feeds_for, max_err, op_count, run

SEQS = (1, 37, 64, 100, 200)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def test_registry():
    assert set(PASS_NAMES) == {"lowrank", "sibling", "causal-chunk", "einsum", "quadratic-causal", "linear-attention", "cleanup"}
    assert set(DEFAULT_PASSES) <= set(PASS_NAMES)
    assert "sibling" not in DEFAULT_PASSES  # measured: does not pay beyond very short sequences
    assert DEFAULT_PASSES[-1] == "cleanup"


def test_unknown_pass_name():
    with pytest.raises(ValueError, match=r"unknown pass 'fuse-all'; choose from: lowrank, sibling"):
        run_passes(export_sample("lowrank_mlp"), ["cleanup", "fuse-all"])


@pytest.fixture(scope="module")
def causal_block_result():
    model = export_sample("causal_block")
    feeds = feeds_for("causal_block", SEQS)
    out, report = run_passes(model, None, feeds=feeds)
    return model, feeds, out, report


def test_default_pipeline_causal_block(causal_block_result, tmp_path):
    model, feeds, out, report = causal_block_result
    assert [p.name for p in report.passes] == list(DEFAULT_PASSES)
    assert max(r for r in cumsum_input_ranks(model)) == 5
    assert all(r < 5 for r in cumsum_input_ranks(out)), "an n x d x d CumSum is left"
    assert op_count(out, "Einsum") == 0
    # causal-chunk writes the linear-attention op, which runs once lowered: the passes in between are checked
    # with the lowering, which is compared with the model before causal-chunk
    names = [p.name for p in report.passes]
    unchecked = names[names.index("causal-chunk"):names.index("linear-attention")]
    assert report.passes[names.index("causal-chunk")].parity is None
    assert all(p.parity is not None and p.parity < 1e-4 for p in report.passes if p.name not in unchecked)
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    onnx.checker.check_model(out, full_check=True)
    # weights inline, and the model can be written with external data
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in out.graph.initializer)
    path = tmp_path / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(out)  # onnx.save(..., save_as_external_data=True) rewrites the proto it is given
    onnx.save(copy, str(path), save_as_external_data=True, location="m.onnx.data")
    reloaded = onnx.load(str(path))
    assert max_err(run(out, feeds[:2]), run(reloaded, feeds[:2])) == 0.0
    assert os.path.getsize(tmp_path / "m.onnx.data") > 1_000_000


def test_metadata_kept_and_copied(causal_block_result):
    model, _, out, _ = causal_block_result
    before = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node}
    kept = [n for n in out.graph.node if n.name in before]
    assert kept
    for n in kept:  # nodes the passes did not touch keep their metadata
        md = {p.key: p.value for p in n.metadata_props}
        assert md.get(NAME_SCOPES) == before[n.name].get(NAME_SCOPES), n.name
    new = [n for n in out.graph.node if n.name not in before and n.op_type in ("MatMul", "CumSum")]
    assert new and all(any(p.key == NAME_SCOPES for p in n.metadata_props) for n in new)


def test_report_contents(causal_block_result):
    _, _, _, report = causal_block_result
    assert isinstance(report, PipelineReport)
    d = report.to_dict()
    text = json.dumps(d)
    assert "causal-numerator" in text and "flops_note" in d
    causal = next(p for p in d["passes"] if p["name"] == "causal-chunk")
    assert causal["changed"] and causal["matches"] == 2
    lowered = next(p for p in d["passes"] if p["name"] == "linear-attention")
    assert causal["flops_before"] and lowered["flops_after"] and causal["flops_shape"] == {"x": [2, 200, 512]}
    assert {"params_before", "params_after", "parity", "seconds", "details"} <= set(causal)
    # the n x d x d state (2*8*200*64*64 elements) is gone once the op is lowered; the largest tensor is now a
    # projection
    assert causal["largest_tensor_before"] == 2 * 8 * 200 * 64 * 64
    assert lowered["largest_tensor_after"] < causal["largest_tensor_before"] / 10
    table = report.format_table()
    for name in DEFAULT_PASSES:
        assert name in table
    assert "causal-numerator: rewritten (lrexport.LinearAttention, rule linear)" in table


@pytest.mark.parametrize("name", ["causal_lm", "lowrank_block", "linformer_encoder", "noncausal_encoder"])
def test_default_pipeline_other_samples(name):
    model = export_sample(name)
    feeds = feeds_for(name, (128,) if name == "linformer_encoder" else (1, 37, 100), batch=3)
    out, report = run_passes(model, feeds=feeds)
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    assert all(r is None or r < 5 for r in cumsum_input_ranks(out))
    lowrank = next(p for p in report.passes if p.name == "lowrank")
    if name == "causal_lm":
        assert lowrank.matches == 12  # every inner bias folded into its outer bias
    if name == "linformer_encoder":
        assert lowrank.matches == 0 and any(d["kind"] == "sequence-projection" for d in lowrank.details)


def test_no_feeds_means_no_parity():
    out, report = run_passes(export_sample("lowrank_nopay"), ["lowrank"])
    assert report.passes[0].parity is None and report.passes[0].matches == 2
    assert report.passes[0].flops_shape == {"x": (1, 128, 512)}


class _BrokenPass(GraphPass):
    """Scales one bias: a pass with a bug the pipeline must catch."""

    name = "broken"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        init = model.graph.initializers["out_proj.bias"]
        init.const_value = ir.tensor(init.const_value.numpy() * 1.5 + 0.1)
        return ir.passes.PassResult(model, True)


def test_parity_failure_names_the_pass(monkeypatch):
    monkeypatch.setitem(pass_manager._REGISTRY, "broken", _BrokenPass)
    model = export_sample("causal_block")
    feeds = feeds_for("causal_block", (3, 5))
    with pytest.raises(PassParityError) as err:
        run_passes(model, ["causal-chunk", "linear-attention", "broken", "cleanup"], feeds=feeds)
    msg = str(err.value)
    assert "pass 'broken'" in msg and "'y'" in msg and "max abs err" in msg and "output shape 2x3x512" in msg
    assert isinstance(err.value, RuntimeError) and err.value.pass_name == "broken"


def test_tolerances_are_options():
    model = export_sample("causal_block")
    feeds = feeds_for("causal_block", (100,))
    with pytest.raises(PassParityError, match="linear-attention"):  # causal-chunk's op, checked once lowered
        run_passes(model, ["causal-chunk", "linear-attention"], feeds=feeds,
                   options=PassOptions(check_atol=0.0, check_rtol=0.0))


def test_progress_callback():
    seen: list[str] = []
    run_passes(export_sample("lowrank_mlp"), ["cleanup", "lowrank"], progress=seen.append)
    assert any("lowrank" in s for s in seen) and len(seen) == 4


def test_input_model_not_modified():
    model = export_sample("lowrank_nopay")
    before = model.SerializeToString()
    run_passes(model, ["lowrank", "cleanup"], feeds=feeds_for("lowrank_nopay", (2,)))
    assert model.SerializeToString() == before
    assert np.isfinite(run(model, feeds_for("lowrank_nopay", (2,)))[0][0]).all()


def test_old_opset_is_skipped_with_reason():
    from onnx import TensorProto, helper

    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk->ik")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    out, report = run_passes(model, ["einsum"])
    assert not report.passes[0].changed and op_count(out, "Einsum") == 1
    assert report.passes[0].details[0]["action"] == "opset 12 < 13"


def test_models_past_the_protobuf_limit_go_through_a_file(monkeypatch):
    """ONNX Runtime sessions on models over 2 GB cannot take serialized bytes: the checks save them with
    external data instead (limit lowered here to exercise that path)."""
    import graph_passes.ort_session as util

    monkeypatch.setattr(util, "PROTO_LIMIT", 1024)
    model = export_sample("causal_block")
    feeds = feeds_for("causal_block", (37,))
    out, report = run_passes(model, ["causal-chunk", "linear-attention"], feeds=feeds)
    assert report.passes[0].changed and report.passes[1].parity is not None
    session = util.ort_session(out)
    assert session._lrexport_tmp is not None
    assert max_err(run(model, feeds), [session.run(None, f) for f in feeds]) < 1e-4
