"""The one way lrexport opens an ONNX Runtime CPU session: on a file, or on an in-memory model of any size.

Every session gets the same options: spin-waiting off, because sessions that alternate in one process
(reference and candidate in parity, before and after in the per-pass check) slow each other down 2-3x
when their idle threads spin (measured); and ORT's own log quiet (our errors say what failed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

# protobuf refuses to serialize a message of 2 GB; keep a margin for the graph around the weights
PROTO_LIMIT = 2**31 - 64 * 2**20


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
                providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on an ONNX file, or on an in-memory model of any size.

    Below :data:`PROTO_LIMIT` an in-memory model goes over as bytes; above, it is saved (weights in one
    external-data file) to a temporary folder that lives as long as the session.
    """
    options = options or session_options()
    providers = providers or ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    if model.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    tmp = tempfile.TemporaryDirectory(prefix="lrexport-ort-")
    path = os.path.join(tmp.name, "model.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    session = ort.InferenceSession(path, options, providers=providers)
    setattr(session, "_lrexport_tmp", tmp)  # removed with the session
    return session

