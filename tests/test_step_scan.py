"""export-step of models whose recurrence is an ONNX ``Scan`` over the sequence, and of token shifts
(graph_passes/recurrent_scan.py).

Real torch.export and ONNX Runtime: the tiny Hugging Face RWKV-4 and xLSTM of tests/hf_tiny_models.py (one
Scan per layer from exporter/patches/transformers; RWKV's token shift is a Pad of one zero before the sequence
and -1 after it), parity token by token and in chunks against PyTorch at 1, 63, 64, 65, 130 and 40 tokens,
states compared with the full model's. Hand-written graphs: a Pad + Slice token shift, a Scan from a non-zero
initial state (the step model selects it at position 0), and the Scans a step model cannot continue.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from onnx import TensorProto, helper

from exporter.errors import LrexportError
from exporter.recurrent import export_step, initial_states, run_stepwise

pytest.importorskip("transformers")

SCAN_MODELS = {"xlstm_lm": ({"scan"}, False), "rwkv_lm": ({"scan", "token-shift"}, True)}


@pytest.mark.parametrize("name", list(SCAN_MODELS))
def test_export_step_scan_model(cli, tmp_path, name):
    """xLSTM (mLSTM cell state, normalizer, max as a Scan carry from zeros) and RWKV-4 (WKV numerator,
    denominator and running max from -1e38, token shifts): parity PASS, every state compared."""
    kinds, offset = SCAN_MODELS[name]
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", f"hf_tiny_models:{name}", "--input", "ids:2x64:int64:0..127",
              "--shapes", "ids:min=1x1,opt=2x40,max=2x130", "--out", out, "--chunk-max", "16",
              "--length", "40", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    report = json.loads(res.out)
    states = report["step"]["states"]
    assert {s["kind"] for s in states} == kinds
    assert (report["step"]["position_offset"] is not None) == offset
    parity = report["parity"]
    assert parity["ok"] and not parity["constant_states"]
    compared = {o["output"] for r in parity["results"] + parity["runs"] for o in r["outputs"]}
    assert {s["output"] for s in states} <= compared
    lengths = {r["length"] for r in parity["results"] + parity["runs"]}
    assert {1, 63, 64, 65, 130} <= lengths
    ids = np.random.default_rng(0).integers(0, 128, (2, 9), dtype=np.int64)
    end = run_stepwise(out, {"ids": ids}, 4)
    assert all(np.abs(end[s["output"]]).max() > 0 for s in states)  # the states move from their start


# ------------------------------------------------------------------------------------- hand-written graphs

def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _shift_model(after: int, crop: bool):
    """y = x * shift(x): x[t - 2] (zeros first) from a Pad of 2 zeros before the sequence and ``after`` after it,
    cropped by a Slice of the last 2 positions when ``crop``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    inits = [helper.make_tensor("pads", TensorProto.INT64, [6], [0, 2, 0, 0, after, 0]),
             helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("s1", TensorProto.INT64, [1], [-2]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="node_pad")]
    if crop:
        nodes.append(helper.make_node("Slice", ["p", "s0", "s1", "ax"], ["shifted"], name="node_crop"))
    nodes.append(helper.make_node("Mul", ["x", "shifted" if crop else "p"], ["y"], name="node_mul"))
    return _graph(nodes, [x], [y], inits)


@pytest.mark.parametrize("after, crop", [(0, True), (-2, False)])
def test_token_shift_window(tmp_path, after, crop):
    res = export_step(_shift_model(after, crop), tmp_path / "s.onnx", check_lengths=(1, 2, 3, 9))
    (state,) = res.states
    assert state.kind == "token-shift" and state.shape == ["batch", 2, 4]
    x = np.random.default_rng(1).standard_normal((2, 9, 4)).astype(np.float32)
    shifted = np.concatenate([np.zeros((2, 2, 4), np.float32), x[:, :-2]], axis=1)
    for chunk in (1, 4):
        got = run_stepwise(tmp_path / "s.onnx", {"x": x}, chunk)
        np.testing.assert_allclose(got["y"], x * shifted, rtol=1e-6)
        np.testing.assert_array_equal(got[state.output], x[:, -2:])


def test_pad_after_without_crop_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    pads = helper.make_tensor("pads", TensorProto.INT64, [6], [0, 2, 0, 0, 0, 0])
    with pytest.raises(LrexportError, match=re.escape("node node_pad (Pad) mixes positions along the sequence axis: "
                                                      "it pads along the sequence axis")):
        export_step(_graph([helper.make_node("Pad", ["x", "pads"], ["y"], name="node_pad")], [x], [y], [pads]),
                    tmp_path / "s.onnx")


def _scan_model(direction: int = 0, init: str = "const", outer: bool = False):
    """s_t = 0.5 s_{t-1} + x_t, y = s, as a Scan over the sequence (Transposes around it). ``init``: "const"
    (ones of shape batch x 4, from the input's shape), "input" (a graph input h0). ``outer``: the body adds the
    mean of x over the whole sequence (read from the outer graph) to each state."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])),
         helper.make_node("Mul", ["s", "half"], ["sh"]), helper.make_node("Add", ["sh", "xt"], ["s_new"]),
         *([helper.make_node("ReduceMean", ["x", "ax1"], ["mean"], keepdims=0),
            helper.make_node("Add", ["s_new", "mean"], ["yt"])] if outer else
           [helper.make_node("Identity", ["s_new"], ["yt"])])], "body",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", 4]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("s_new", TensorProto.FLOAT, ["b", 4]),
         helper.make_tensor_value_info("yt", TensorProto.FLOAT, ["b", 4])])
    inits = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("four", TensorProto.INT64, [1], [4]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1])]
    inputs = [x]
    nodes = [helper.make_node("Transpose", ["x"], ["xs"], perm=[1, 0, 2])]
    if init == "input":
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 4]))
        nodes.append(helper.make_node("Identity", ["h0"], ["s0"]))
    else:
        nodes += [helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
                  helper.make_node("Concat", ["b", "four"], ["shape"], axis=0),
                  helper.make_node("Expand", ["one", "shape"], ["s0"])]
    nodes += [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="node_scan", body=body,
                               num_scan_inputs=1, scan_input_directions=[direction]),
              helper.make_node("Transpose", ["ys"], ["y"], perm=[1, 0, 2])]
    return _graph(nodes, inputs, [y], inits)


def test_scan_from_a_nonzero_start(tmp_path):
    """The initial state (ones) is what the step model uses at position 0; later chunks continue the state."""
    res = export_step(_scan_model(), tmp_path / "s.onnx", check_lengths=(1, 5, 9))
    (state,) = res.states
    assert state.kind == "scan" and res.position_offset == "position_offset"
    x = np.random.default_rng(2).standard_normal((2, 9, 4)).astype(np.float32)
    s, want = np.ones((2, 4), np.float32), []
    for t in range(9):
        s = 0.5 * s + x[:, t]
        want.append(s)
    assert initial_states(tmp_path / "s.onnx", 2)[state.input].shape == (2, 4)
    got = run_stepwise(tmp_path / "s.onnx", {"x": x}, 4)
    np.testing.assert_allclose(got["y"], np.stack(want, 1), rtol=1e-5)
    np.testing.assert_allclose(got[state.output], s, rtol=1e-5)


@pytest.mark.parametrize("kw, expected", [
    ({"direction": 1}, "scans the sequence backwards"),
    ({"init": "input"}, "starts from a state (s0) computed from the tokens"),
    ({"outer": True}, "reads the whole sequence x inside its loop body"),
])
def test_scans_a_step_model_cannot_continue(tmp_path, kw, expected):
    with pytest.raises(LrexportError) as info:
        export_step(_scan_model(**kw), tmp_path / "s.onnx")
    assert f"node node_scan (Scan) cannot carry the scan's state: it {expected}" in str(info.value)
    assert not (tmp_path / "s.onnx").exists()
