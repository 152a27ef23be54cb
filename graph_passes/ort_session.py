"""The one way lrexport opens an ONNX Runtime CPU session: on a file, or on an in-memory model of any size.

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

import onnx
import onnx.defs
import onnxruntime as ort

from graph_passes.errors import LrexportError

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
    try:
        return _session(model, options, providers)
    except LrexportError:
        raise
    except Exception as err:
        refusal = _opset_refusal(str(err))
        if refusal is None:
            raise
        raise refusal from None


def _session(model: onnx.ModelProto | str | Path, options: ort.SessionOptions,
             providers: list[str]) -> ort.InferenceSession:
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
