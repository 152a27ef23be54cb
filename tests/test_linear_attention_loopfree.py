"""The loop-free lowering of ``lrexport.LinearAttention`` (graph_passes/linear_attention_loopfree.py): the
delta rules and a per-key decay with no Scan and no Loop, the chunk-to-chunk state by doubling levels,
against the float64 recurrence token by token (tests/test_linear_attention_op.py: reference)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes._base import PassOptions
from graph_passes.linear_attention_loopfree import LinearAttentionLoopFreePass, levels_for
from test_linear_attention_op import (
    SCAN_CASES, _assert_lowered_matches_float64, _onnx, assert_strong_decay_stays_finite, make_inputs, reference,
    rel_err)


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", SCAN_CASES)
def test_loop_free_lowering_matches_float64(case):
    """Standard ops, opset <= 25, no Scan or Loop anywhere, one CumSum axis; T = 1 .. 130 (odd chunk
    counts pad a level with identity maps), with and without an initial state."""
    with_state = case != "gated_delta-gqa"
    model, kw = _onnx(case, with_state)
    p = LinearAttentionLoopFreePass(PassOptions(max_positions=256))
    p(model)
    assert p.matches == 1 and p.records[0].rewritten, p.records[0].reason
    assert p.records[0].info["levels"] == 4 and p.records[0].info["max_positions"] == 256
    ops = [n.op_type for n in model.graph.all_nodes()]
    assert all(n.domain == "" for n in model.graph.all_nodes()) and model.opset_imports[""] <= 25
    assert not {"Scan", "Loop", "If"} & set(ops) and ops.count("CumSum") <= 1
    _assert_lowered_matches_float64(model, case, kw, with_state)


def test_loop_free_lowering_levels_follow_the_longest_sequence():
    """Chunks of 16: 64 positions take 2 levels, 65 take 3, and an unknown maximum takes the default's."""
    assert (levels_for(64, 16), levels_for(65, 16), levels_for(16, 16), levels_for(1, 16)) == (2, 3, 1, 1)
    assert levels_for(None, 16) == 16


def test_loop_free_lowering_is_nan_past_the_positions_it_serves():
    """Sized for 64 positions: right at 64, NaN (never a wrong number) at 65 and beyond."""
    model, kw = _onnx("gated_delta-head")
    LinearAttentionLoopFreePass(PassOptions(max_positions=64))(model)
    sess = _session(model)
    for t, served in ((50, True), (64, True), (65, False), (200, False)):
        args, _ = make_inputs("gated_delta-head", t, seed=3)
        out, state = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
        if served:
            want_out, want_state = reference(*args[:5], kw["scale"], args[5])
            assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, t
        else:
            assert np.isnan(out).all() and np.isnan(state).all(), t


def test_loop_free_lowering_strong_decay_stays_finite():
    """Per-key decays of e^-60 per token beside slow ones: maps composed over many chunks stay finite."""
    model, kw = _onnx("gated_delta-key")
    LinearAttentionLoopFreePass(PassOptions(max_positions=512))(model)
    assert_strong_decay_stays_finite(model, kw, 300)


@pytest.mark.parametrize("case", ["gated-key", "gated_delta-head"])
def test_loop_free_lowering_is_right_at_every_edge_of_its_range(case):
    """Sized for 256 positions (chunks of 16): right at 1, a chunk -1 / +0 / +1, the last chunk's edge and the
    stated maximum; NaN one position past it."""
    model, kw = _onnx(case)
    p = LinearAttentionLoopFreePass(PassOptions(max_positions=256))
    p(model)
    assert p.records[0].info["max_positions"] == 256
    sess = _session(model)
    names = [i.name for i in sess.get_inputs()]
    for t in (1, 15, 16, 17, 255, 256, 257):
        args, _ = make_inputs(case, t, seed=7)  # beta is None for the gated rule: not an input
        out, state = sess.run(None, dict(zip(names, [a.numpy() for a in args if a is not None])))
        if t > 256:
            assert np.isnan(out).all() and np.isnan(state).all(), t
            continue
        want_out, want_state = reference(*args[:5], kw["scale"], args[5])
        assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, (case, t)


@pytest.mark.parametrize("case", ["linear", "gated-head"])
def test_loop_free_lowering_keeps_the_portable_form_where_it_has_no_loop(case):
    """The linear rule and a per-head decay are loop-free in the portable lowering already: the same form."""
    model, kw = _onnx(case)
    p = LinearAttentionLoopFreePass()
    p(model)
    assert p.records[0].action == "lowered (standard ops, chunked)"
    _assert_lowered_matches_float64(model, case, kw, True)


def test_loop_free_lowering_sizes_a_static_sequence_from_the_node():
    """A node whose sequence is static (40: 3 chunks) gets the 2 levels that serve it, whatever the
    options say."""
    model, kw = _onnx("gated_delta-head")
    for v in model.graph.inputs[:5]:  # q, k, v, g, beta (the state has no sequence axis)
        v.shape = ir.Shape([2, 40, *v.shape[2:]])
    (node,) = list(model.graph)
    assert node.inputs[0].shape[1] == 40
    p = LinearAttentionLoopFreePass(PassOptions(max_positions=1 << 20))
    p(model)
    assert (p.records[0].info["levels"], p.records[0].info["max_positions"]) == (2, 64)
    sess = _session(model)
    args, _ = make_inputs("gated_delta-head", 40, seed=6)
    out, state = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    want_out, want_state = reference(*args[:5], kw["scale"], args[5])
    assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5


def test_build_sizes_the_levels_from_the_shapes_with_a_floor():
    """Twice the longest input sequence (axis 1), at least 4096 positions (the op's sequence need not be
    an input's axis 1); none where no input has a second axis."""
    from exporter.specs import build_specs
    from exporter.stages import served_positions

    assert served_positions(build_specs(["x:1x8x32:float32"], ["x:min=1x1x32,opt=1x8x32,max=2x130x32"])) == 4096
    assert served_positions(build_specs(["x:1x8x32:float32"], ["x:min=1x1x32,opt=1x8x32,max=2x5000x32"])) == 10000
    assert served_positions(build_specs(["x:4:float32"], [])) is None
