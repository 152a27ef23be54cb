"""Recurrent (step) export of causal linear attention: the step model fed token by token and chunk by
chunk reproduces the PyTorch full-sequence outputs; models without a step form are refused by name.

Real torch exports (dynamo) of the samples, real ONNX Runtime; the engine test uses TensorRT-RTX
(ahead-of-time build on the CPU) when it is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import samples
from exporter.errors import LrexportError
from exporter.export import export_onnx
from exporter.recurrent import (
    check_step_parity,
    export_step,
    initial_states,
    read_step_info,
    run_stepwise,
    step_specs,
)
from exporter.specs import build_specs
from graph_passes.recurrent_state import RecurrentRefusal, RecurrentStatePass
from samples.layers import CausalLinearAttention
from samples.models import LanguageModel

N = 100  # sequence length of the parity runs (not a multiple of 7; < 128)


def _export(name: str, tmp: Path):
    sample = samples.get(name)
    model = sample.factory()
    specs = build_specs(sample.inputs, sample.shapes)
    path = tmp / f"{name}.onnx"
    export_onnx(model, specs, path)
    return model, specs, path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("recurrent")


@pytest.fixture(scope="module")
def causal_lm(work):
    model, specs, path = _export("causal_lm", work)
    result = export_step(path, work / "causal_lm.step.onnx", specs=specs)
    return model, specs, path, result


@pytest.fixture(scope="module")
def causal_block(work):
    model, specs, path = _export("causal_block", work)
    result = export_step(path, work / "causal_block.step.onnx", specs=specs)
    return model, specs, path, result


# ------------------------------------------------------------------------------------------- parity

def test_causal_lm_token_and_chunk_parity(causal_lm):
    model, specs, _, result = causal_lm
    report = check_step_parity(model, result.onnx_path, specs, chunks=(1, 7, 64, 128), length=N)
    report.assert_ok()
    assert report.length == N and report.batch == 2
    assert [c for c, _ in report.results] == [1, 7, 64, 128]
    assert max(report.max_abs().values()) < 1e-5
    assert "step parity: PASS" in report.format_table()
    json.dumps(report.to_dict())


def test_causal_block_token_and_chunk_parity(causal_block):
    model, specs, _, result = causal_block
    report = check_step_parity(model, result.onnx_path, specs, chunks=(1, 7, 128), length=N)
    report.assert_ok()
    assert max(report.max_abs().values()) < 1e-5


def test_causal_lm_states_two_per_layer(causal_lm):
    _, _, _, result = causal_lm
    assert result.state_names == ["state_0", "state_1", "state_2", "state_3"]
    assert [s.output for s in result.states] == ["new_state_0", "new_state_1", "new_state_2", "new_state_3"]
    assert result.layers == {"blocks.0.attn": ["state_0", "state_1"], "blocks.1.attn": ["state_2", "state_3"]}
    assert [s.role for s in result.states] == ["s", "z", "s", "z"]
    assert result.state_shapes["state_0"] == ["batch", 4, 32, 32]
    assert result.state_shapes["state_1"] == ["batch", 4, 32]
    assert set(result.state_dtypes.values()) == {"float32"}
    assert result.position_offset is None
    assert result.inputs == ["ids"] and result.outputs == ["output"]
    assert result.input_seq_axes == {"ids": 1} and result.output_seq_axes == {"output": 1}
    assert result.check["max_abs"]["token"] < 1e-5
    data = json.loads(json.dumps(result.to_dict()))
    assert data["layers"]["blocks.1.attn"] == ["state_2", "state_3"]
    assert data["state_bytes_per_sequence"] == 2 * (4 * 32 * 32 + 4 * 32) * 4

    step = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(step)
    ins = {v.name: v for v in step.graph.input}
    assert list(ins) == ["ids", "state_0", "state_1", "state_2", "state_3"]
    assert ins["state_0"].type.tensor_type.elem_type == TensorProto.FLOAT
    assert ins["state_0"].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in step.graph.output] == ["output", "new_state_0", "new_state_1", "new_state_2",
                                                   "new_state_3"]
    again = read_step_info(result.onnx_path)
    assert again.state_names == result.state_names and again.layers == result.layers


def test_causal_block_root_module(causal_block):
    _, _, _, result = causal_block
    assert result.layers == {"<root>": ["state_0", "state_1"]}
    assert result.state_shapes == {"state_0": ["batch", 8, 64, 64], "state_1": ["batch", 8, 64]}
    assert "cumsum in the root module" in result.format_text()


def test_stepwise_continues_a_sequence(causal_lm):
    """Prefill 60 tokens in chunks of 16, then decode the rest one by one from the returned states."""
    model, _, _, result = causal_lm
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, size=(3, 75), dtype=np.int64)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    zeros = initial_states(result.onnx_path, batch=3)
    assert {k: v.shape for k, v in zeros.items()} == {"state_0": (3, 4, 32, 32), "state_1": (3, 4, 32),
                                                     "state_2": (3, 4, 32, 32), "state_3": (3, 4, 32)}
    assert all(not v.any() for v in zeros.values())
    first = run_stepwise(result.onnx_path, {"ids": ids[:, :60]}, 16)
    states = {s.input: first[s.output] for s in result.states}
    rest = run_stepwise(result, {"ids": ids[:, 60:]}, 1, states=states, position=60)
    got = np.concatenate([first["output"], rest["output"]], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


# -------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name, expected", [
    ("noncausal_encoder", ["node_einsum (Einsum)", "mixes positions along the sequence axis",
                           "sums over the sequence axis"]),
    # non-causal softmax attention: its KV-cache step form differs from the full model, naming the Softmax
    ("lowrank_block", ["differs from the full model", "node_softmax (Softmax) gets a KV cache"]),
    ("linformer_encoder", ["sequence axis (axis 1) of input 'x' is static (128)", "Linformer"]),
])
def test_refuses_models_without_a_step_form(work, name, expected):
    _, specs, path = _export(name, work)
    with pytest.raises(LrexportError) as info:
        export_step(path, work / f"{name}.step.onnx", specs=specs)
    text = str(info.value)
    assert text.startswith("cannot export a step model: ")
    for piece in expected:
        assert piece in text, text
    assert not (work / f"{name}.step.onnx").exists()


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _cumsum_model(axis: int = 1, reverse: int = 0, exclusive: int = 0, dtype=TensorProto.FLOAT):
    x = helper.make_tensor_value_info("x", dtype, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", dtype, ["batch", "seq", 4])
    ax = helper.make_tensor("axis", TensorProto.INT64, [], [axis])
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="node_cumsum", reverse=reverse,
                            exclusive=exclusive)
    return _graph([node], [x], [y], [ax])


@pytest.mark.parametrize("kw, expected", [
    ({"reverse": 1}, "node node_cumsum (CumSum) is a reverse CumSum"),
    ({"exclusive": 1}, "node node_cumsum (CumSum) is an exclusive CumSum"),
])
def test_refuses_reverse_and_exclusive_cumsum(tmp_path, kw, expected):
    with pytest.raises(LrexportError, match=re.escape(expected)):
        export_step(_cumsum_model(**kw), tmp_path / "s.onnx")


def test_refuses_a_graph_without_running_sums(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    with pytest.raises(LrexportError, match="no CumSum over the sequence axis"):
        export_step(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), tmp_path / "s.onnx")


def test_refuses_softmax_over_the_sequence(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    ax = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["c"], name="node_cumsum"),
             helper.make_node("Softmax", ["c"], ["y"], name="node_softmax", axis=1)]
    with pytest.raises(LrexportError) as info:
        export_step(_graph(nodes, [x], [y], [ax]), tmp_path / "s.onnx")
    assert "node node_softmax (Softmax) mixes positions along the sequence axis" in str(info.value)
    assert "the model is not a causal running-sum model" in str(info.value)


class _LengthScaled(nn.Module):
    """Causal linear attention whose output is divided by the sequence length: the output depends on the full
    length n, which a step model does not know (it sees its chunk's length)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = CausalLinearAttention(32, 2)

    def forward(self, x):
        return self.attn(x) / x.shape[1]


def test_refuses_the_length_used_as_a_value(tmp_path):
    specs = build_specs(["x:1x16x32:float32"], ["x:min=1x1x32,opt=1x16x32,max=2x64x32"])
    export_onnx(_LengthScaled().eval(), specs, tmp_path / "m.onnx")
    with pytest.raises(LrexportError) as info:
        export_step(tmp_path / "m.onnx", tmp_path / "s.onnx", specs=specs)
    text = str(info.value)
    assert re.search(r"node \S+ \(Div\) uses the sequence length as a value on per-token data", text), text
    assert "differs from the full model" not in text and not (tmp_path / "s.onnx").exists()


def test_numeric_check_refuses_what_the_structure_hides(tmp_path):
    """A running sum over a flattened (batch, seq * 4) tensor: no axis is the sequence axis, so the structural
    check passes it; the step model restarts that sum every chunk, and the numeric self-check refuses it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    inits = [helper.make_tensor("axis", TensorProto.INT64, [], [1]),
             helper.make_tensor("flat", TensorProto.INT64, [2], [0, -1])]
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["c"], name="node_cumsum"),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("CumSum", ["f", "axis"], ["g"], name="node_flat_cumsum"),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Reshape", ["g", "shape"], ["y"])]
    proto = _graph(nodes, [x], [y], inits)
    proto.graph.value_info.extend([helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "seq", 4]),
                                   helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", "flat"]),
                                   helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch", "flat"]),
                                   helper.make_tensor_value_info("shape", TensorProto.INT64, [3])])
    with pytest.raises(LrexportError) as info:
        export_step(proto, tmp_path / "s.onnx")
    assert "differs from the full model" in str(info.value)
    assert "not a causal running sum" in str(info.value)


def test_pass_refusal_leaves_the_model_unchanged():
    model = ir.from_proto(_cumsum_model(reverse=1))
    with pytest.raises(RecurrentRefusal) as info:
        RecurrentStatePass()(model)
    assert info.value.node == "node_cumsum" and info.value.op == "CumSum"
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]


# ------------------------------------------------------------------------------- dtypes, axes, positions

def test_negative_axis_and_float16_sum_carried_in_float32(tmp_path):
    proto = _cumsum_model(axis=-2, dtype=TensorProto.FLOAT16)
    model = ir.from_proto(proto)
    res = RecurrentStatePass()(model)
    assert res.modified and len(res.states) == 1
    st = res.states[0]
    assert (st.axis, st.shape, st.dtype) == (1, ["batch", 4], "float32")
    result = export_step(proto, tmp_path / "s.onnx")
    x = np.random.default_rng(0).standard_normal((2, 11, 4)).astype(np.float16)
    got = run_stepwise(result.onnx_path, {"x": x}, 3)
    assert got["y"].dtype == np.float16 and got["new_state_0"].dtype == np.float32
    np.testing.assert_allclose(got["y"].astype(np.float32), np.cumsum(x.astype(np.float32), axis=1),
                               atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(got["new_state_0"], x.astype(np.float32).sum(axis=1), atol=1e-2)


class _PositionalLM(LanguageModel):
    """causal_lm-like model with learned absolute position embeddings indexed by arange(n)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(vocab=64, d_model=32, heads=2, layers=1, ff_hidden=64)
        self.pos = nn.Embedding(256, 32)

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def test_absolute_positions_get_an_offset_input(tmp_path):
    model = _PositionalLM().eval()
    specs = build_specs(["ids:2x32:int64:0..63"], ["ids:min=1x1,opt=2x32,max=2x256"])
    export_onnx(model, specs, tmp_path / "m.onnx")
    result = export_step(tmp_path / "m.onnx", tmp_path / "s.onnx", specs=specs)
    assert result.position_offset == "position_offset"
    assert len(result.states) == 2
    check_step_parity(model, result.onnx_path, specs, chunks=(1, 7), length=40).assert_ok()
    sp = {s.name: s for s in step_specs(result, (1, 2), (1, 16))}
    assert sp["position_offset"].opt == () and sp["position_offset"].dtype == "int64"


class _TablePositionLM(LanguageModel):
    """causal_lm-like model adding rows of a learned position table read by slicing: ``head`` reads
    ``table[:, :n]`` (the axial / learned tables of linear-attention-transformer), ``strided`` rows
    3, 5, 7, .. (``table[:, 3:3 + 2n:2]``), ``tail`` the last n rows (``table[:, -n:]``: which row position t
    reads depends on the full length)."""

    def __init__(self, read: str):
        torch.manual_seed(0)
        super().__init__(vocab=64, d_model=32, heads=2, layers=1, ff_hidden=64)
        self.table = nn.Parameter(torch.randn(1, 256, 32))
        self.read = read

    def forward(self, ids):
        n = ids.shape[1]
        if self.read == "head":
            pos = self.table[:, :n]
        elif self.read == "strided":
            pos = self.table[:, 3:3 + 2 * n:2]
        else:
            pos = self.table[:, -n:]
        x = self.embed(ids) + pos
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("read, step", [("head", 1), ("strided", 2)])
def test_position_table_reads_get_the_offset(tmp_path, read, step):
    """A Slice of a table along the sequence axis moves by ``position_offset`` (times its step), as a Range does:
    token-by-token and chunked runs read the rows of their absolute positions."""
    model = _TablePositionLM(read).eval()
    specs = build_specs(["ids:2x32:int64:0..63"], ["ids:min=1x1,opt=2x32,max=2x64"])
    export_onnx(model, specs, tmp_path / "m.onnx")
    result = export_step(tmp_path / "m.onnx", tmp_path / "s.onnx", specs=specs)
    assert result.position_offset == "position_offset" and len(result.states) == 2
    check_step_parity(model, result.onnx_path, specs, chunks=(1, 7, 16), length=40).assert_ok()
    res = RecurrentStatePass()(ir.load(tmp_path / "m.onnx"))
    reads = [m for m in res.matches if m.kind == "position-slice"]
    assert len(reads) == 1 and reads[0].info["step"] == step and res.slices == reads[0].nodes
    assert op_types(res.model).count("Slice") == op_types(ir.load(tmp_path / "m.onnx")).count("Slice") - 1


def test_table_position_step_engine_builds_with_tensorrt_rtx(tmp_path):
    """The offset stays a data tensor (a Gather index, not a Slice start, which would make it a shape tensor):
    TensorRT builds the step model with ``position_offset`` as an input."""
    pytest.importorskip("tensorrt_rtx")
    from exporter.trt_build import build_engine

    specs = build_specs(["ids:2x32:int64:0..63"], ["ids:min=1x1,opt=2x32,max=2x64"])
    export_onnx(_TablePositionLM("head").eval(), specs, tmp_path / "m.onnx")
    result = export_step(tmp_path / "m.onnx", tmp_path / "s.onnx", specs=specs)
    built = build_engine(result.onnx_path, tmp_path / "s.engine", specs=step_specs(result, (1, 2), (1, 16)),
                         precision="fp32", backend="tensorrt-rtx", force=True)
    assert "position_offset" in {i["name"] for i in built.inputs} and built.engine_bytes > 0


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_position_table_sliced_on_two_axes(tmp_path):
    """A table Slice on two axes (rows along the sequence, columns 2..5; shapes as an exporter writes them): the
    rows move by the offset, the columns stay sliced; fed 1 and 4 tokens at a time the step model reproduces
    the full graph."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((1, 300, 8)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    inits = [onnx.numpy_helper.from_array(table, "table"),
             helper.make_tensor("axis", TensorProto.INT64, [], [1]),
             helper.make_tensor("starts", TensorProto.INT64, [2], [0, 2]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("six", TensorProto.INT64, [1], [6])]
    nodes = [helper.make_node("Shape", ["x"], ["n"], start=1, end=2),
             helper.make_node("Concat", ["n", "six"], ["ends"], axis=0),
             helper.make_node("Slice", ["table", "starts", "ends", "axes"], ["pos"], name="node_pos"),
             helper.make_node("Add", ["x", "pos"], ["xp"]),
             helper.make_node("CumSum", ["xp", "axis"], ["y"], name="node_cumsum")]
    proto = _graph(nodes, [x], [y], inits)
    proto.graph.value_info.extend([helper.make_tensor_value_info("pos", TensorProto.FLOAT, [1, "seq", 4]),
                                   helper.make_tensor_value_info("xp", TensorProto.FLOAT, ["batch", "seq", 4])])
    result = export_step(proto, tmp_path / "s.onnx")
    assert result.position_offset == "position_offset"
    feeds = {"x": rng.standard_normal((2, 11, 4)).astype(np.float32)}
    expected = np.cumsum(feeds["x"] + table[:, :11, 2:6], axis=1)
    for chunk in (1, 4):
        np.testing.assert_allclose(run_stepwise(result.onnx_path, feeds, chunk)["y"], expected, rtol=1e-5, atol=1e-5)


def test_refuses_a_position_table_read_from_its_end(tmp_path):
    """``table[:, -n:]``: the rows of position t depend on the full length, which a step model does not know;
    the refusal names the Slice and why (not the generic numeric self-check)."""
    model = _TablePositionLM("tail").eval()
    specs = build_specs(["ids:2x32:int64:0..63"], ["ids:min=1x1,opt=2x32,max=2x64"])
    export_onnx(model, specs, tmp_path / "m.onnx")
    with pytest.raises(LrexportError) as info:
        export_step(tmp_path / "m.onnx", tmp_path / "s.onnx", specs=specs)
    text = str(info.value)
    assert re.search(r"node \S+ \(Slice\) reads a table \(1 x 256 x 32\) at the current positions", text), text
    assert "starts at a row computed in the graph (e.g. the last n rows" in text
    assert "differs from the full model" not in text and not (tmp_path / "s.onnx").exists()


def _length_mask_model(kind: str):
    """``y = cumsum(x * mask)`` reshaped to ``(batch, n, 4)`` (the length as a shape), where the mask compares the
    positions ``arange(n)`` with the length n read from ``x``'s shape (fast-transformers' LengthMask): ``less``
    ``arange(n) < n``, ``greater`` ``n > arange(n)``; models that must stay refused: ``last``
    ``arange(n) == n - 1``, ``half`` ``2 * arange(n) < n``, ``distance`` a weight ``n - arange(n)``."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inits = [helper.make_tensor("axis", i64, [], [1]), helper.make_tensor("zero", i64, [], [0]),
             helper.make_tensor("one", i64, [], [1]), helper.make_tensor("two", i64, [], [2]),
             helper.make_tensor("one1", i64, [1], [1]), helper.make_tensor("four", i64, [1], [4]),
             helper.make_tensor("axes02", i64, [2], [0, 2])]
    nodes = [helper.make_node("Shape", ["x"], ["n"], start=1, end=2),
             helper.make_node("Squeeze", ["n"], ["ns"]),
             helper.make_node("Range", ["zero", "ns", "one"], ["pos"], name="node_arange"),
             helper.make_node("Unsqueeze", ["pos", "axes02"], ["pr"])]
    infos = [("n", i64, [1]), ("ns", i64, []), ("pos", i64, ["seq"]), ("pr", i64, [1, "seq", 1]),
             ("m", TensorProto.BOOL, [1, "seq", 1]), ("mf", f, [1, "seq", 1]), ("xm", f, ["batch", "seq", 4]),
             ("c", f, ["batch", "seq", 4]), ("b", i64, [1]), ("shp", i64, [3])]
    compare = {"less": ("Less", ["pr", "n"]), "greater": ("Greater", ["n", "pr"]), "last": ("Equal", ["pr", "nm1"]),
               "half": ("Less", ["p2", "n"])}
    if kind == "last":
        nodes.append(helper.make_node("Sub", ["n", "one1"], ["nm1"]))
        infos.append(("nm1", i64, [1]))
    if kind == "half":
        nodes.append(helper.make_node("Mul", ["pr", "two"], ["p2"]))
        infos.append(("p2", i64, [1, "seq", 1]))
    if kind == "distance":
        nodes += [helper.make_node("Sub", ["n", "pr"], ["m"], name="node_distance"),
                  helper.make_node("Cast", ["m"], ["mf"], to=f)]
        infos[4] = ("m", i64, [1, "seq", 1])
    else:
        op, ins = compare[kind]
        nodes += [helper.make_node(op, ins, ["m"], name="node_mask"), helper.make_node("Cast", ["m"], ["mf"], to=f)]
    nodes += [helper.make_node("Mul", ["x", "mf"], ["xm"]),
              helper.make_node("CumSum", ["xm", "axis"], ["c"], name="node_cumsum"),
              helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
              helper.make_node("Concat", ["b", "n", "four"], ["shp"], axis=0),
              helper.make_node("Reshape", ["c", "shp"], ["y"], name="node_reshape")]
    x = helper.make_tensor_value_info("x", f, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", f, ["batch", "seq", 4])
    proto = _graph(nodes, [x], [y], inits)
    proto.graph.value_info.extend([helper.make_tensor_value_info(*info) for info in infos])
    return proto


@pytest.mark.parametrize("kind", ["less", "greater"])
def test_length_mask_compares_positions_with_the_tokens_seen(tmp_path, kind):
    """``arange(n) < n`` compares the offset positions with the length: in the step model that length is
    ``position_offset + chunk``, while the same n as a shape (the Reshape, the Range's end) stays the chunk's;
    fed 1, 4 and 11 tokens at a time the step model reproduces the full graph (all ones mask: ``cumsum(x)``)."""
    proto = _length_mask_model(kind)
    res = RecurrentStatePass()(ir.from_proto(proto))
    assert res.bounds == ["node_mask"] and res.ranges == ["node_arange"]
    assert [m.action for m in res.matches if m.kind == "position-bound"] == ["offset added to the length"]
    result = export_step(proto, tmp_path / "s.onnx")
    assert result.position_offset == "position_offset"
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 11, 4)).astype(np.float32)}
    for chunk in (1, 4, 11):
        got = run_stepwise(result.onnx_path, feeds, chunk)["y"]
        np.testing.assert_allclose(got, np.cumsum(feeds["x"], axis=1), rtol=1e-5, atol=1e-5)


def test_length_mask_step_engine_builds_with_tensorrt_rtx(tmp_path):
    """The length plus the offset feeds a comparison of data, so ``position_offset`` stays a data input (not a
    shape tensor, which TensorRT refuses as an input): TensorRT-RTX builds the step model."""
    pytest.importorskip("tensorrt_rtx")
    from exporter.trt_build import build_engine

    result = export_step(_length_mask_model("less"), tmp_path / "s.onnx")
    built = build_engine(result.onnx_path, tmp_path / "s.engine", specs=step_specs(result, (1, 2), (1, 16)),
                         precision="fp32", backend="tensorrt-rtx", force=True)
    assert "position_offset" in {i["name"] for i in built.inputs} and built.engine_bytes > 0


@pytest.mark.parametrize("kind, op, expected", [
    ("last", "Equal", "compares positions with a value computed from the sequence length (not the length itself"),
    ("half", "Less", "compares the sequence length with positions that are not those of Range(0, n, 1)"),
    ("distance", "Sub", "combines positions with the sequence length (e.g. the distance to the last token"),
])
def test_refuses_positions_bounded_by_a_function_of_the_length(tmp_path, kind, op, expected):
    """Masks and weights that depend on the full length (the last token, the first half, the distance to the
    end) have no step form: refused by node and why before any rewrite, not by the numeric self-check."""
    model = ir.from_proto(_length_mask_model(kind))
    with pytest.raises(RecurrentRefusal) as caught:
        RecurrentStatePass()(model)
    assert caught.value.op == op and caught.value.node in ("node_mask", "node_distance")
    assert [v.name for v in model.graph.inputs] == ["x"]
    with pytest.raises(LrexportError) as info:
        export_step(_length_mask_model(kind), tmp_path / "s.onnx")
    text = str(info.value)
    assert f"({op}) {expected}" in text, text
    assert "differs from the full model" not in text and not (tmp_path / "s.onnx").exists()


# ---------------------------------------------------------------------------------------------- engine

def test_step_specs(causal_lm):
    _, _, _, result = causal_lm
    sp = {s.name: s for s in step_specs(result, (1, 2, 4), (1, 16, 64))}
    assert list(sp) == ["ids", "state_0", "state_1", "state_2", "state_3"]
    assert (sp["ids"].min, sp["ids"].opt, sp["ids"].max) == ((1, 1), (2, 16), (4, 64))
    assert (sp["ids"].low, sp["ids"].high) == (0, 255)
    assert (sp["state_0"].min, sp["state_0"].max) == ((1, 4, 32, 32), (4, 4, 32, 32))
    with pytest.raises(LrexportError, match="bad chunk range"):
        step_specs(result, (1, 4), (0, 8))


def test_step_engine_builds_with_tensorrt_rtx(causal_lm, work):
    pytest.importorskip("tensorrt_rtx")
    from exporter.trt_build import build_engine

    _, _, _, result = causal_lm
    engine = work / "causal_lm.step.engine"
    built = build_engine(result.onnx_path, engine, specs=step_specs(result, (1, 4), (1, 64)), precision="fp32",
                         backend="tensorrt-rtx", force=True)
    assert engine.is_file() and built.engine_bytes > 0
    meta = json.loads(built.meta_path.read_text())
    assert meta["backend"] == "tensorrt-rtx"
    names = {i["name"] for i in built.inputs}
    assert names == {"ids", "state_0", "state_1", "state_2", "state_3"}
    assert {o["name"] for o in built.outputs} >= {"output", "new_state_0", "new_state_3"}


def test_causal_chunk_output_steps_on_the_op_states(causal_lm, tmp_path):
    """causal-chunk writes each layer's running sums as one linear-attention node (numerator and normalizer on
    [v, 1]): the step model of its output carries that node's state (its initial/final state), one per layer,
    and reproduces the PyTorch model token by token and in chunks."""
    from graph_passes import run_passes

    model, specs, path, _ = causal_lm
    passed, _ = run_passes(onnx.load(str(path)), ["cleanup", "causal-chunk"])
    result = export_step(passed, tmp_path / "s.onnx", specs=specs)
    assert [s.kind for s in result.states] == ["linear-attention"] * 2
    assert all(list(s.shape[1:]) == [4, 32, 33] for s in result.states)  # heads, d, [v, 1]
    check_step_parity(model, tmp_path / "s.onnx", specs, chunks=(1, 7), length=40).assert_ok()


def test_refuses_the_chunked_form(tmp_path):
    """An exclusive prefix keeps causal-chunk's chunked form, which has no step form: refused."""
    from graph_passes import run_passes
    from test_pass_causal_chunked import _bucketed_graph

    model = _bucketed_graph(1, "pad")  # an exclusive prefix, its inputs [b, h, n, d] read from [b, n, h, d]
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dims[1].dim_param, dims[2].dim_value = "n", 4
        vi.name = f"{vi.name}_in"
    for i, x in enumerate("qkv"):
        model.graph.node.insert(i, helper.make_node("Transpose", [f"{x}_in"], [x], perm=[0, 2, 1, 3]))
    chunked, report = run_passes(onnx.shape_inference.infer_shapes(model), ["cleanup", "causal-chunk"])
    assert [d["action"] for d in report.passes[1].details if d["matched"]] == ["chunked", "chunked"]
    with pytest.raises(LrexportError) as info:
        export_step(chunked, tmp_path / "s.onnx")
    assert "cannot export a step model" in str(info.value)


def test_sequence_local_passes_keep_step_parity(causal_lm, tmp_path):
    """The low-rank and Einsum passes rewrite per-token math only: run on the step model, parity holds."""
    from graph_passes import run_passes

    model, specs, _, result = causal_lm
    optimized, _ = run_passes(onnx.load(str(result.onnx_path)), ["cleanup", "lowrank", "einsum", "cleanup"])
    onnx.save(optimized, str(tmp_path / "step.opt.onnx"))
    assert not any(n.op_type == "Einsum" for n in optimized.graph.node)
    check_step_parity(model, tmp_path / "step.opt.onnx", specs, chunks=(1, 7), length=40).assert_ok()


def test_refuses_a_step_model_as_input(causal_block, tmp_path):
    _, _, _, result = causal_block
    with pytest.raises(LrexportError, match="already has an input/output named 'state_0'"):
        export_step(result.onnx_path, tmp_path / "again.onnx")
