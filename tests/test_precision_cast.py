"""fp16/bf16 casting for strongly typed networks: ONNX Runtime still runs it and stays close to fp32,
LayerNorm / running sums / Softmax stay fp32, I/O types are kept, TensorRT-RTX parses and builds it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_helpers import exported_chunked, exported_sample, ln_softmax_model, sample_specs

from exporter.errors import LrexportError
from exporter.specs import random_feeds
from graph_passes.precision_cast import (
    PrecisionCastPass,
    apply_cast,
    cast_precision,
    cast_precision_file,
    plan_cast,
)

ORT_SAMPLES = ("lowrank_mlp", "causal_block", "causal_lm", "linformer_encoder", "lowrank_block")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    out = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                          *model.graph.output)}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    return out


def _inferred(model: onnx.ModelProto) -> dict[str, int]:
    return _types(onnx.shape_inference.infer_shapes(model, strict_mode=True))


@pytest.mark.parametrize("sample", ORT_SAMPLES)
def test_fp16_close_to_fp32_on_ort(sample: str) -> None:
    model = onnx.load(str(exported_sample(sample)))
    before = model.SerializeToString()
    low, report = cast_precision(model, "fp16")
    assert model.SerializeToString() == before  # the input model is not modified
    onnx.checker.check_model(low)
    specs = sample_specs(sample)
    for case in ("opt", "odd"):
        feeds = random_feeds(specs, case, seed=3)
        ref, got = _run(model, feeds)[0], _run(low, feeds)[0]
        assert got.dtype == ref.dtype == np.float32  # outputs keep their type
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max())
        assert err <= 1e-2 * scale + 1e-2, f"{case}: max err {err:.3g} vs scale {scale:.3g}"
    # inputs keep their type; most weights became fp16; something was kept fp32
    assert [i.type.tensor_type.elem_type for i in low.graph.input] == \
           [i.type.tensor_type.elem_type for i in model.graph.input]
    dtypes = Counter(i.data_type for i in low.graph.initializer)
    assert dtypes[TensorProto.FLOAT16] >= 4 and report["initializers_cast"] >= dtypes[TensorProto.FLOAT16] - 1
    assert report["tensors_cast"] > 0 and report["casts_inserted"] >= 2
    types = _inferred(low)
    for node in low.graph.node:
        if node.op_type in ("LayerNormalization", "CumSum", "Softmax"):
            assert node.name in report["kept_fp32_nodes"]
            assert all(types[i] == TensorProto.FLOAT for i in node.input[:1]), node.name
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and node.name not in report["kept_fp32_nodes"]:
            assert types[node.output[0]] == TensorProto.FLOAT16, node.name


def test_causal_sums_kept_fp32_up_to_the_div() -> None:
    low, report = cast_precision(onnx.load(str(exported_sample("causal_block"))), "fp16")
    kept = report["kept_fp32_by_op"]
    assert kept.get("CumSum") == 2 and kept.get("Div") == 1 and kept.get("Einsum") == 2
    types = _inferred(low)
    div = next(n for n in low.graph.node if n.op_type == "Div")
    assert types[div.input[0]] == types[div.input[1]] == TensorProto.FLOAT
    equations = {n.attribute[0].s.decode(): n for n in low.graph.node if n.op_type == "Einsum"}
    assert types[equations["bhnd,bhnde->bhne"].output[0]] == TensorProto.FLOAT  # reads the running state
    assert types[equations["bhnd,bhnd->bhn"].output[0]] == TensorProto.FLOAT  # reads the normalizer sum
    assert types[equations["bhnd,bhne->bhnde"].output[0]] == TensorProto.FLOAT16  # k v^T before the sum
    # the eps added to the normalizer stays an fp32 initializer
    eps_adds = [n for n in low.graph.node if n.op_type == "Add" and n.name in report["kept_fp32_nodes"]]
    assert eps_adds and all(types[i] == TensorProto.FLOAT for n in eps_adds for i in n.input)


def test_chunked_causal_fp16_on_ort() -> None:
    path, specs = exported_chunked()
    model = onnx.load(str(path))
    low, report = cast_precision(model, "fp16")
    why = report["kept_fp32_why"]
    # the exclusive CumSums over chunks grow with n: fp32 from there up to the division
    cumsums = [n.name for n in model.graph.node if n.op_type == "CumSum"]
    assert len(cumsums) == 2 and set(cumsums) <= set(report["kept_for_growing_sums"])
    assert {why[c] for c in cumsums} == {"sum along an axis whose length varies (CumSum: grows with the input)"}
    assert report["kept_fp32_by_op"]["Div"] == 1 and why["node_div"].startswith("normalizes the growing sum")
    # the sums within a chunk (a fixed 16 terms) stay fp16: the range analysis measures them
    sums = [n.name for n in model.graph.node if n.op_type == "ReduceSum"]
    assert len(sums) == 2 and not set(sums) & set(report["kept_fp32_nodes"])
    types = _inferred(low)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in low.graph.node if n.name in sums)
    for case in ("min", "odd", "max"):
        feeds = random_feeds(specs, case, seed=0)
        ref, got = _run(model, feeds)[0], _run(low, feeds)[0]
        assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max() + 1e-2


def test_layernorm_softmax_graph() -> None:
    model = ln_softmax_model()
    low, report = cast_precision(model, "fp16")
    onnx.checker.check_model(low, full_check=True)
    types = _inferred(low)
    assert report["kept_fp32_why"] == {"ln": "LayerNorm (an fp16 variance overflows)",
                                       "softmax": "Softmax (exp and row sum in float32)"}
    assert types["ln_scale"] == types["ln_bias"] == TensorProto.FLOAT  # LayerNorm scale/bias stay fp32
    # the scaling before the Softmax reads an fp16 MatMul: it stays fp16, the Softmax reads it through a Cast
    assert types["scale"] == types["w1"] == types["w2"] == types["logits"] == TensorProto.FLOAT16
    (softmax,) = [n for n in low.graph.node if n.op_type == "Softmax"]
    assert types[softmax.input[0]] == types["p"] == TensorProto.FLOAT and types["x"] == types["y"] == TensorProto.FLOAT
    assert report["low_nodes"] == 3 and report["compute_nodes"] == 5  # mm1, scale_div, mm2 of 5
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    ref, got = _run(model, {"x": x})[0], _run(low, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max() + 1e-2
    # nothing kept: everything fp16 but the boundary casts
    low2, rep2 = cast_precision(model, "fp16", keep_fp32_ops=())
    assert rep2["kept_fp32_nodes"] == [] and _inferred(low2)["ln_scale"] == TensorProto.FLOAT16


def _sums_model() -> onnx.ModelProto:
    """x[b, n, 8] -> x / (its sum over the 8 features) / (half its sum over the n positions) -> MatMul: one
    sum of a fixed length, one that grows with n. Shape-inferred, so planning has nothing to annotate."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([2], np.int64), "ax_feat"),
             numpy_helper.from_array(np.array([1], np.int64), "ax_seq"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("ReduceSum", ["x", "ax_feat"], ["s_feat"], name="sum_feat"),
             helper.make_node("Div", ["x", "s_feat"], ["a"], name="div_feat"),
             helper.make_node("ReduceSum", ["x", "ax_seq"], ["s_seq"], name="sum_seq"),
             helper.make_node("Mul", ["s_seq", "half"], ["s_half"], name="scale_seq"),
             helper.make_node("Div", ["a", "s_half"], ["y0"], name="div_seq"),
             helper.make_node("MatMul", ["y0", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "sums", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_only_sums_that_grow_with_the_input_stay_fp32() -> None:
    """A sum over the sequence keeps itself and its readers up to the division in float32; a sum over
    the fixed feature axis is fp16 (the range analysis measures it). Checked on ONNX Runtime."""
    model = _sums_model()
    low, report = cast_precision(model, "fp16")
    assert report["kept_fp32_why"] == {
        "sum_seq": "sum along an axis whose length varies (ReduceSum: grows with the input)",
        "scale_seq": "reads the growing sum of sum_seq", "div_seq": "normalizes the growing sum of sum_seq"}
    assert report["kept_for_growing_sums"] == ["sum_seq", "scale_seq", "div_seq"]
    types = _inferred(low)
    assert types["s_feat"] == types["a"] == TensorProto.FLOAT16
    assert types["s_seq"] == types["s_half"] == types["y0"] == TensorProto.FLOAT and report["low_nodes"] == 3
    (mm,) = [n for n in low.graph.node if n.name == "mm"]
    assert types[mm.input[0]] == types[mm.output[0]] == TensorProto.FLOAT16  # the quotient is back in range
    x = np.random.default_rng(1).uniform(0.5, 1.0, (2, 300, 8)).astype(np.float32)
    ref, got = _run(model, {"x": x})[0], _run(low, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_plan_then_apply() -> None:
    """The plan decides and changes nothing; the apply step takes any plan (here: one with nothing kept)."""
    model = ir.from_proto(_sums_model())
    before = ir.to_proto(model).SerializeToString()
    plan = plan_cast(model, "fp16")
    assert ir.to_proto(model).SerializeToString() == before
    assert {n.name for n in plan.fp32} == {"sum_seq", "scale_seq", "div_seq"} and not plan.requested
    assert plan.report(model.graph)["low_fraction"] == 0.5
    plan.fp32.clear()
    counts = apply_cast(model, plan)
    low = ir.to_proto(model)
    types = _inferred(low)
    assert counts == {"tensors_cast": 6, "initializers_cast": 2, "constants_cast": 0, "casts_inserted": 2}
    assert {n.op_type for n in low.graph.node if types[n.output[0]] == TensorProto.FLOAT} == {"Cast"}  # y out
    assert types["ax_feat"] == TensorProto.INT64 and types["w"] == types["half"] == TensorProto.FLOAT16
    x = np.random.default_rng(1).uniform(0.5, 1.0, (2, 30, 8)).astype(np.float32)
    ref, got = _run(_sums_model(), {"x": x})[0], _run(low, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_cast_as_a_graph_pass() -> None:
    """The cast is a GraphPass like the rewrites: one detail per node kept float32, with why."""
    model = ir.from_proto(_sums_model())
    cast = PrecisionCastPass("half")
    assert cast(model).modified and cast.matches == 3 and cast.report["precision"] == "fp16"
    assert [(m.nodes, m.reason) for m in cast.records] == [
        (["sum_seq"], "sum along an axis whose length varies (ReduceSum: grows with the input)"),
        (["scale_seq"], "reads the growing sum of sum_seq"), (["div_seq"], "normalizes the growing sum of sum_seq")]
    assert ir.to_proto(model).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_low_precision_io() -> None:
    model = ln_softmax_model()
    low, report = cast_precision(model, "fp16", keep_io_types=False)
    assert low.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert low.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    ref, got = _run(model, {"x": x})[0], _run(low, {"x": x.astype(np.float16)})[0]
    assert got.dtype == np.float16 and np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max() + 1e-2


def test_bf16_is_valid_onnx() -> None:
    low, report = cast_precision(ln_softmax_model(), "bf16")
    onnx.checker.check_model(low, full_check=True)
    assert _inferred(low)["w1"] == TensorProto.BFLOAT16 and report["precision"] == "bf16"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(LrexportError, match="cannot cast to precision 'int8'"):
        cast_precision(ln_softmax_model(), "int8")
    lazy = onnx.load(str(exported_sample("lowrank_mlp")), load_external_data=False)
    with pytest.raises(LrexportError, match="external data.*load_external_data=True"):
        cast_precision(lazy, "fp16")
    with pytest.raises(LrexportError, match="does not exist"):
        cast_precision_file(tmp_path / "none.onnx", tmp_path / "o.onnx", "fp16")


def test_cast_file_with_external_data(tmp_path: Path) -> None:
    src = exported_sample("causal_lm")
    dst = tmp_path / "lm.fp16.onnx"
    report = cast_precision_file(src, dst, "fp16")
    assert dst.is_file() and dst.with_name(dst.name + ".data").is_file()
    src_bytes = src.with_name(src.name + ".data").stat().st_size
    assert dst.with_name(dst.name + ".data").stat().st_size < 0.7 * src_bytes  # weights halved
    feeds = random_feeds(sample_specs("causal_lm"), "opt")
    ref = _run(onnx.load(str(src)), feeds)[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max() + 1e-2 and report["casts_inserted"] > 0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_rtx_parses_and_builds(precision: str, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    dst = tmp_path / f"lm.{precision}.onnx"
    cast_precision_file(exported_sample("causal_lm"), dst, precision)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(dst)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    want = trt.DataType.HALF if precision == "fp16" else trt.DataType.BF16
    layer_types = Counter(network.get_layer(i).get_output(0).dtype for i in range(network.num_layers))
    assert layer_types[want] > network.num_layers // 4
    assert network.get_output(0).dtype == trt.DataType.FLOAT
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("ids", (1, 1), (2, 16), (2, 64))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
