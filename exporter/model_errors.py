"""Failures that are the model's own, told apart from lrexport's: a model that fails or gives NaN/Inf in
PyTorch itself at a size inside its range, and the one-line errors that say so (exit 2, not "internal
error ... please report", and not "pass X broke parity")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.loading import LoadedModel
from graph_passes.formatting import fmt_shapes


def describe_model(loaded: LoadedModel | nn.Module | None) -> str:
    """How an error line names the model: the archive for a .pt2 (whose program is what runs)."""
    if isinstance(loaded, LoadedModel) and loaded.kind == "exported-program":
        return f"the model archive {Path(loaded.source).name}"
    return "the model"


def error_text(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit] if text else type(err).__name__


def _frame_modules(err: BaseException) -> list[str]:
    """The module name of every frame the error passed through, outermost first."""
    names = []
    tb = err.__traceback__
    while tb is not None:
        names.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    return names


def triton_without_gpu(err: BaseException) -> LrexportError | None:
    """An error raised inside Triton (its driver finds no GPU: "0 active drivers"; or a kernel launch):
    the model runs Triton kernels, which have no CPU path. Names the package that called them."""
    chain, seen = [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:  # the error itself, or one it was raised from
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        mods = _frame_modules(e)
        first = next((i for i, m in enumerate(mods) if m.split(".")[0] == "triton"), None)
        if first is None:
            continue
        callers = [m.split(".")[0] for m in mods[:first] if m.split(".")[0] not in ("torch", "triton", "")]
        by = f" ({callers[-1]})" if callers else ""
        return LrexportError(
            f"the model runs Triton kernels{by}, which have no CPU path, and lrexport runs the model on the CPU "
            f"(Triton: {error_text(e, 200)})",
            "use a layer or mode of the library that has a plain PyTorch path, or a model lrexport has an export "
            "patch for (README: Export patches)")
    return None


def fails_in_pytorch(what: str, where: str, err: BaseException, archive: bool) -> LrexportError:
    """The model raised in PyTorch at a size inside the range it was given (or ran Triton kernels)."""
    triton = triton_without_gpu(err)
    if triton is not None:
        return triton
    inside = "the range it was exported for" if archive else "the requested range"
    return LrexportError(f"{what} itself fails in PyTorch at {where}, a size inside {inside} ({error_text(err)})",
                         "choose --shapes the model runs at, or fix the model and export it again")


def nonfinite_in_pytorch(what: str, output: str, where: str) -> LrexportError:
    return LrexportError(f"{what} itself produces NaN/Inf in output {output!r} in PyTorch at {where}",
                         "check the weights and the --input value ranges; the graph passes and parity need "
                         "finite outputs")


def run_torch(module: nn.Module, input_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[Any]:
    """The module's tensor outputs on ``feed`` (inputs in ``input_names`` order), float32 as given."""
    from exporter.export import flatten_outputs

    args = [torch.from_numpy(np.ascontiguousarray(feed[name])) for name in input_names]
    with torch.no_grad():
        return flatten_outputs(module(*args))


def explain_input_model_error(err: Any, loaded: LoadedModel | None, input_names: Sequence[str]) -> LrexportError | None:
    """For a model that fails (or gives NaN/Inf) in ONNX Runtime before any pass ran: the error naming the
    PyTorch model where it fails the same way there (its own fault); None when PyTorch runs it cleanly
    (then the exported model is at fault, which is a bug)."""
    where = f"inputs {fmt_shapes(err.feed_shapes)}"
    if loaded is None:  # lrexport optimize: the ONNX file is the user's model
        return LrexportError(f"the input ONNX model {err}",
                             "check --shapes: the model may not serve these sizes" if err.error else
                             "check its weights: the passes are checked on finite outputs")
    what = describe_model(loaded)
    try:
        outs = run_torch(loaded.module, input_names, err.feed)
    except Exception as torch_err:
        return fails_in_pytorch(what, where, torch_err, loaded.kind == "exported-program")
    for name, value in outs:
        if value.is_floating_point() and not torch.isfinite(value).all():
            return nonfinite_in_pytorch(what, err.output or name, where)
    return None
