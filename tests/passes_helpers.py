"""Shared helpers for the graph-pass tests: export samples once per session, random feeds, ORT runs."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

from samples import SAMPLES

_TMP = tempfile.mkdtemp(prefix="lrexport-passes-")


@functools.lru_cache(maxsize=None)
def export_half_causal_block() -> bytes:
    """causal_block in float16 (the exporter upcasts its CumSums: Cast -> CumSum -> Cast)."""
    model = SAMPLES["causal_block"].factory().half()
    path = os.path.join(_TMP, "causal_block_fp16.onnx")
    dyn = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=2048)},)
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 16, 512).half(),), path, dynamo=True, dynamic_shapes=dyn,
                          input_names=["x"], output_names=["y"], opset_version=18, verbose=False)
    return onnx.load(path).SerializeToString()


@functools.lru_cache(maxsize=None)
def _export_bytes(name: str) -> bytes:
    sample = SAMPLES[name]
    model = sample.factory()
    spec = sample.inputs[0].split(":")
    shape = [int(v) for v in spec[1].split("x")]
    in_name = spec[0]
    if len(spec) > 2 and spec[2] == "int64":
        args = (torch.randint(0, 256, (2, 16)),)
    else:
        shape = [2, 16, *shape[2:]] if name != "linformer_encoder" else shape
        args = (torch.randn(*shape),)
    batch = Dim("batch", min=1, max=8)
    if name == "linformer_encoder":
        dyn = ({0: batch},)
    else:
        dyn = ({0: batch, 1: Dim("seq", min=2, max=2048)},)
    path = os.path.join(_TMP, f"{name}.onnx")
    with torch.no_grad():
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dyn, input_names=[in_name],
                          output_names=["y"], opset_version=18, verbose=False)
    return onnx.load(path).SerializeToString()


def export_sample(name: str) -> onnx.ModelProto:
    """A fresh ModelProto of the sample (exported once per test session, weights inline)."""
    m = onnx.ModelProto()
    m.ParseFromString(_export_bytes(name))
    return m


def feeds_for(name: str, seqs: tuple[int, ...] = (1, 37, 64, 100, 200), batch: int = 2,
              seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sample = SAMPLES[name]
    spec = sample.inputs[0].split(":")
    in_name, shape = spec[0], [int(v) for v in spec[1].split("x")]
    out = []
    for n in seqs:
        if len(spec) > 2 and spec[2] == "int64":
            out.append({in_name: rng.integers(0, 256, size=(batch, n)).astype(np.int64)})
        else:
            out.append({in_name: rng.standard_normal((batch, n, *shape[2:])).astype(np.float32)})
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    s = session(model)
    return [s.run(None, f) for f in feeds]


def max_err(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    return max(float(np.max(np.abs(x - y))) for xa, xb in zip(a, b) for x, y in zip(xa, xb))


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def cumsum_input_ranks(model: onnx.ModelProto) -> list[int | None]:
    """Rank of each CumSum's data input (from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
             [*inferred.graph.value_info, *inferred.graph.input]
             if vi.type.tensor_type.HasField("shape")}
    return [ranks.get(n.input[0]) for n in inferred.graph.node if n.op_type == "CumSum"]


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 18) -> onnx.ModelProto:
    """Hand-built graph with IR version 10 (ORT may refuse the helper's default)."""
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
