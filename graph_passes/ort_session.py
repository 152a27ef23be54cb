"""The one way lrexport opens an ONNX Runtime CPU session: on a file, or on an in-memory model of any size.

Sizes of in-memory models are counted from their tensors (:func:`held_bytes`), never with protobuf's
``ByteSize()``: that serializes the whole message, and fails, past 2 GB.

Every session gets the same options: spin-waiting off, because sessions that alternate in one process
(reference and candidate in parity, before and after in the per-pass check) slow each other down 2-3x
when their idle threads spin (measured); and ORT's own log quiet (our errors say what failed).

A model stamped with an opset ONNX Runtime does not support is a one-line error naming the opsets (ORT's
message puts them after a long C++ signature, which a cut to one line drops); :func:`check_opset`
refuses one past what the installed onnx knows before any work.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnx_ir as ir
import onnxruntime as ort

from graph_passes.errors import LrexportError

# protobuf refuses to serialize a message of 2 GB; keep a margin for the graph around the weights
PROTO_LIMIT = 2**31 - 64 * 2**20


def proto_tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers and tensor attributes, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from proto_tensors(sub)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (reading ``raw_data`` would copy it)."""
    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
        try:
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            item = 8
        return int(np.prod(t.dims, dtype=np.int64)) * item
    return (4 * (len(t.float_data) + len(t.int32_data)) + 10 * (len(t.int64_data) + len(t.uint64_data))
            + 8 * len(t.double_data) + sum(len(x) for x in t.string_data))


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether some tensor of ``model`` is stored in an external-data file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto_tensors(model.graph))


def held_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inside the message (external data that is not loaded counts 0)."""
    return sum(_tensor_bytes(t) for t in proto_tensors(model.graph) if t.data_location != onnx.TensorProto.EXTERNAL)


def tensor_bytes(model: onnx.ModelProto | ir.Model) -> int:
    """Bytes of all tensor data of ``model``, held or external: what a file with the weights inline holds."""
    if isinstance(model, onnx.ModelProto):
        return sum(_tensor_bytes(t) for t in proto_tensors(model.graph))
    total = 0
    for graph in model.graphs():
        total += sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    total += attr.value.nbytes
                elif attr.type == ir.AttributeType.TENSORS:
                    total += sum(t.nbytes for t in attr.value)
    return total


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two messages are equal field by field; False (unknown) when either holds 2 GB or more,
    which protobuf may serialize to compare."""
    return held_bytes(a) < PROTO_LIMIT and held_bytes(b) < PROTO_LIMIT and a == b


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    """Options for every lrexport session. ``optimize=False`` keeps the graph as written (a run that
    exposes intermediate values must see the nodes that made them, not ORT's fusions)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # not even errors: the exception raised carries the same text
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def ort_session(model: onnx.ModelProto | str | Path, options: ort.SessionOptions | None = None,
                providers: list[str] | None = None, base_dir: str | Path | None = None) -> ort.InferenceSession:
    """A session on an ONNX file, or on an in-memory model of any size.

    An in-memory model whose held data is below :data:`PROTO_LIMIT` goes over as bytes, its external
    data (if any) read by ONNX Runtime from ``base_dir``; above, it is saved (weights in one
    external-data file) to a temporary folder that lives as long as the session.
    """
    options = options or session_options()
    providers = providers or ["CPUExecutionProvider"]
    try:
        return _session(model, options, providers, base_dir)
    except LrexportError:
        raise
    except Exception as err:
        refusal = _opset_refusal(str(err))
        if refusal is None:
            raise
        raise refusal from None


def _session(model: onnx.ModelProto | str | Path, options: ort.SessionOptions,
             providers: list[str], base_dir: str | Path | None) -> ort.InferenceSession:
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    external = has_external_data(model)
    if external and base_dir is None:
        raise ValueError("the model has external data: pass the folder it lies in as base_dir")
    if held_bytes(model) < PROTO_LIMIT:
        if external:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    tmp = tempfile.TemporaryDirectory(prefix="lrexport-ort-")
    path = os.path.join(tmp.name, "model.onnx")
    lazy = ir.serde.deserialize_model(model)  # views the message's tensors: no copy of the weights
    if external:
        ir.external_data.set_base_dir(lazy.graph, base_dir)
    ir.save(lazy, path, external_data="model.onnx.data")
    del lazy
    session = ort.InferenceSession(path, options, providers=providers)
    setattr(session, "_lrexport_tmp", tmp)  # removed with the session
    return session



def _opset_refusal(message: str) -> LrexportError | None:
    """ORT's refusal of a model's opset as one line, or None for another error. ORT says e.g. "... Opset 30
    is under development ... Current official support for domain ai.onnx is till opset 28."."""
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", " ".join(message.split())) if "opset" in s.lower()]
    if not sentences or "guarantees* support" not in message:
        return None
    got = re.search(r"[Oo]pset (\d+) is", message)
    top = re.search(r"support for domain (\S+) is till opset (\d+)", message)
    if got and top:
        return LrexportError(f"the model has opset {got.group(1)}, but ONNX Runtime {ort.__version__} supports "
                             f"domain {top.group(1)} up to opset {top.group(2)}",
                             f"export it with --opset {top.group(2)} or older")
    detail = " ".join(s for s in sentences if not s.startswith("["))[:300]
    return LrexportError(f"ONNX Runtime {ort.__version__} refuses the model's opset ({detail})",
                         "export it with another --opset")


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset (None where it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(model: onnx.ModelProto, what: str = "the model") -> None:
    """Refuse, before any work, an ai.onnx opset newer than the installed onnx (its checker and shape
    inference; ORT's opset support follows onnx's releases) supports."""
    version, newest = default_opset(model), onnx.defs.onnx_opset_version()
    if version is not None and version > newest:
        raise LrexportError(f"{what} has opset {version}, newer than onnx {onnx.__version__} and ONNX Runtime "
                            f"{ort.__version__} here support (up to opset {newest})",
                            f"export it with --opset {newest} or older")
