"""Backends that run a model on a feed dict and return named numpy outputs.

Running is kept apart from comparing (polygraphy's split): each runner only executes.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from exporter.errors import LrexportError
from exporter.export import flatten_outputs
from graph_passes.ort_session import ort_session


# Largest float64 copy of the weights the reference makes (float32 weights of 512 MiB): past it a float64
# reference would hold the weights three times over (float32 model, float64 copy twice its size), so
# parity of a model past 2 GB would need 4x its weights with ONNX Runtime's copy; float32 it is.
FLOAT64_COPY_LIMIT = 2**30


class KeepFloat64(TorchFunctionMode):
    """Inside a float64 reference run, the model code's casts to float32 keep float64: ``x.float()``,
    ``x.to(torch.float32)``, ``dtype=torch.float32`` (``softmax(..., dtype=torch.float)``, ``torch.zeros(...,
    dtype=torch.float32)``), and tensors made with the default dtype. Libraries upcast to float32 for
    precision (transformers' RMSNorms, rotary embeddings, router softmax, its torch linear-attention kernels,
    xLSTM's logits); in a float64 copy of the model those casts made float32 islands whose rounding, amplified
    by the layers after them, put the "float64" reference further from the model's function than the float32
    export (a tiny Qwen3.5-MoE: 7.8e-4 against 1.4e-4 at 4 x 130)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif func is torch.Tensor.to or func is torch.Tensor.type:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_run() -> Iterator[None]:
    """:class:`KeepFloat64`, with float64 the default dtype, for one call of the float64 reference."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with KeepFloat64():
            yield
    finally:
        torch.set_default_dtype(default)


class TorchRunner:
    """The PyTorch reference: float64 where the model allows it (a cleaner reference) and its float64
    copy stays below :data:`FLOAT64_COPY_LIMIT`, else float32."""

    name = "pytorch"
    what = "the model"  # how an error line names it (the archive, for a .pt2)
    archive = False  # a .pt2's program: its ranges are the ones it was exported for

    def __init__(self, module: nn.Module, output_names: Sequence[str], input_names: Sequence[str],
                 prefer_float64: bool = True):
        self.module = module
        self.output_names = list(output_names)
        self.input_names = list(input_names)
        self.precision = "float32"
        self._f64: nn.Module | None = None
        weights = sum(t.numel() * 8 for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
        if prefer_float64 and not isinstance(module, torch.jit.ScriptModule) and weights <= FLOAT64_COPY_LIMIT:
            try:
                self._f64 = copy.deepcopy(module).double()
            except Exception:  # some modules refuse deepcopy/double; float32 it is
                self._f64 = None

    def _call(self, module: nn.Module, feeds: dict[str, np.ndarray], f64: bool) -> list[np.ndarray]:
        args = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            args.append(t.double() if f64 and t.is_floating_point() else t)
        with torch.no_grad(), (float64_run() if f64 else contextlib.nullcontext()):
            out = module(*args)
        return [t.detach().cpu().numpy() for _, t in flatten_outputs(out)]

    @property
    def uses_float64(self) -> bool:
        """Whether :meth:`run` computes in float64 (until a float64 run fails, it is tried)."""
        return self._f64 is not None

    def run(self, feeds: dict[str, np.ndarray], float64: bool = True) -> dict[str, np.ndarray]:
        """Outputs for ``feeds``; ``float64=False`` runs this call in float32 (a case too large for float64)."""
        outs = None
        if self._f64 is not None and float64:
            try:
                outs = self._call(self._f64, feeds, True)
                if not any(o.dtype == np.float64 for o in outs):
                    outs = None  # the graph cast back to float32 inside: no gain
                else:
                    self.precision = "float64"
            except Exception:
                outs = None
            if outs is None:
                self._f64 = None
                self.precision = "float32"
        if outs is None:
            outs = self._call(self.module, feeds, False)
        if len(outs) != len(self.output_names):
            raise LrexportError(f"the model returned {len(outs)} outputs but the ONNX file has "
                                f"{len(self.output_names)}", "check that the ONNX file was exported from this model")
        return dict(zip(self.output_names, outs))


def ort_error_text(err: BaseException, limit: int = 400) -> str:
    """ONNX Runtime's message on one line: its detail lines (``index: 1 Got: 128 Expected: 64``) kept,
    its boilerplate advice dropped."""
    lines = [ln.strip() for ln in str(err).strip().splitlines()]
    text = " ".join(ln for ln in lines if ln and not ln.startswith("Please fix"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


class OnnxRuntimeRunner:
    """ONNX Runtime on an ONNX file (CPU by default; CUDA when onnxruntime-gpu and a GPU are present)."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None, name: str = "onnxruntime"):
        self.name = name
        self.path = Path(onnx_path)
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in available]
        if missing:
            raise LrexportError(f"ONNX Runtime provider {missing[0]} is not available here",
                                f"install onnxruntime-gpu for CUDA, or use one of {', '.join(available)}")
        try:
            self.session = ort_session(self.path, providers=providers)
        except LrexportError:
            raise  # already one line (an opset ONNX Runtime does not support)
        except Exception as err:
            raise LrexportError(f"ONNX Runtime cannot load {self.path} ({ort_error_text(err)})",
                                "check the file with `lrexport inspect`; re-export it if it is damaged") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Give the CPU arena back after each run: it otherwise keeps a run's peak for the session's
        # lifetime, and parity runs several sessions and the reference one after another at the largest
        # shapes (measured: the arena reuses buffers better than malloc within a run, so keep it on).
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LrexportError(f"the ONNX model needs input {missing[0]!r}, which the input spec lacks",
                                f"name the inputs {', '.join(self.input_names)} in --input/--shapes")
        try:
            outs = self.session.run(None, {n: feeds[n] for n in self.input_names}, self.run_options)
        except Exception as err:
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise LrexportError(f"ONNX Runtime failed on inputs {shapes} ({ort_error_text(err)})",
                                "check the shape ranges against the model") from None
        return dict(zip(self.output_names, outs))
