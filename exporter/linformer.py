"""Fixed-length models (Linformer) with a dynamic sequence axis: pad up to the length inside the graph.

A Linformer projects keys and values along the sequence with E, F (``Linear(n, k)``, a ``Conv1d`` with
kernel = stride = n/k, or a fixed random n x k matrix), so it only runs at sequence length n. Exported
as it is, torch.export pins the sequence axis to n (lrexport warns and exports it static, batch still
dynamic). :class:`PadToLength` wraps such a model so that it accepts every length 1..n:

    forward(x):  n_in = x.shape[seq_axis]
                 x_pad = F.pad(x, 0 .. length - n_in on seq_axis, value=pad_value)   # symbolic amount
                 y = module(x_pad, [mask_arg = positions < n_in])
                 return y[:, :n_in]          # every output whose seq axis has size `length`

The padding lives in the exported graph (a ``Pad`` whose amount is ``length - seq``), so the ONNX
model and the engine keep a dynamic sequence axis 1..length, like linformer-pytorch's ``Padder``.

What parity means here
----------------------
Padding changes the numbers unless the model masks the padded positions: E·K sums over all n rows,
so padded rows (and, after the first layer, whatever the network made of them) enter every position's
attention. Without ``mask_arg`` the wrapped model is therefore *not* the unpadded model evaluated at a
shorter length (there is no such model: E has exactly n rows); it is a well-defined function of the
short input, the same one linformer-pytorch's Padder computes. lrexport's parity compares the exported
wrapped model against the *wrapped* PyTorch model at lengths 1..n (min, odd, opt, max), which is
exactly what a deployment runs. With ``mask_arg`` (e.g. linformer-pytorch's ``input_mask``) the model
zeroes padded keys/values, and the outputs at real positions no longer depend on the pad contents
(tests/test_linformer.py checks both properties).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from exporter.errors import LrexportError
from exporter.loading import LoadedModel
from exporter.specs import InputSpec


def _pad_axis(x: torch.Tensor, axis: int, amount: Any, value: float) -> torch.Tensor:
    """Pad ``x`` at the end of ``axis`` by ``amount`` (an int or a SymInt)."""
    pads = [0, 0] * (x.dim() - 1 - axis) + [0, amount]
    if x.dtype == torch.bool:  # pad bool masks as uint8 (not every backend has a bool Pad kernel)
        return F.pad(x.to(torch.uint8), pads, value=int(bool(value))).to(torch.bool)
    return F.pad(x, pads, value=value)


class _SignedForward:
    """``PadToLength.forward``: takes ``*args`` but shows the wrapped module's signature.

    torch.export binds the example inputs and ``dynamic_shapes`` to ``inspect.signature(m.forward)``,
    and lrexport orders the input specs by those parameter names; a bare ``(*args)`` signature breaks
    the first and loses the second. So ``forward`` is looked up through this descriptor, which returns
    a callable carrying the wrapped module's own signature (a generic ``(*args, **kwargs)`` when that
    cannot be read).
    """

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return PadToLength._forward
        fn = functools.partial(PadToLength._forward, obj)
        fn.__signature__ = obj._inner_signature()  # type: ignore[attr-defined]
        return fn


class PadToLength(nn.Module):
    """Run a fixed-length ``module`` on inputs of any length 1..``length`` along ``seq_axis``.

    Every positional tensor argument with more than ``seq_axis`` dimensions is padded on ``seq_axis``
    up to ``length`` (they must share that axis' size, as token ids and their attention mask do);
    ``pad_value`` is one value for all of them or one per positional argument (e.g. ``(0, 0)`` for
    ids and an attention mask: padded positions masked out). With ``mask_arg`` the wrapped module also
    gets ``mask_arg=<bool (batch, length), True on real positions>`` as a keyword argument
    (linformer-pytorch: ``mask_arg="input_mask"``). Outputs whose ``seq_axis`` has size ``length`` are
    sliced back to the input length; other outputs (pooled vectors) pass through.
    """

    def __init__(self, module: nn.Module, length: int, seq_axis: int = 1,
                 pad_value: float | Sequence[float] = 0, mask_arg: str | None = None):
        super().__init__()
        if int(length) < 1:
            raise LrexportError(f"pad length {length} is not positive", "pass the model's fixed sequence length")
        if seq_axis < 1:
            raise LrexportError(f"seq_axis {seq_axis} must be >= 1 (axis 0 is the batch)", "use seq_axis=1")
        self.module = module
        self.length = int(length)
        self.seq_axis = int(seq_axis)
        self.pad_value = pad_value
        self.mask_arg = mask_arg
        self.training = module.training  # not .train(): an ExportedProgram's module() refuses it

    def _inner_signature(self) -> inspect.Signature:
        generic = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                                     inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
        try:
            sig = inspect.signature(self.module.forward)
        except (TypeError, ValueError):
            return generic
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return generic
        return sig

    def _value(self, i: int) -> float:
        value = self.pad_value
        if isinstance(value, (list, tuple)):
            return float(value[i]) if i < len(value) else 0.0
        return float(value)  # type: ignore[arg-type]

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        axis, length = self.seq_axis, self.length
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > axis), None)
        if first is None:
            raise ValueError(f"PadToLength: no positional tensor input with a sequence axis {axis}")
        n = first.shape[axis]
        # hints for torch.export: the length is in 1..length (keeps the seq dim symbolic, no 0/1
        # specialization of the pad amount, and a clear error for longer inputs)
        torch._check(n >= 1)
        torch._check(n <= length, lambda: f"PadToLength: sequence length exceeds the padded length {length}")
        amount = length - n
        padded = [_pad_axis(a, axis, amount, self._value(i)) if isinstance(a, torch.Tensor) and a.dim() > axis
                  else a for i, a in enumerate(args)]
        if self.mask_arg is not None:
            pos = torch.arange(length, device=first.device)
            kwargs[self.mask_arg] = (pos < n).unsqueeze(0).expand(first.shape[0], length)
        out = self.module(*padded, **kwargs)

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > axis and isinstance(t.shape[axis], int) \
                    and t.shape[axis] == length:
                # a negative pad crops back to n; t[:, :n] / narrow would make torch.export guard
                # on n != length (the whole-tensor slice is special-cased) and fail the export
                return _pad_axis(t, axis, n - length, 0)
            return t

        return _tree_map(cut, out)

    forward = _SignedForward()

    def extra_repr(self) -> str:
        return (f"length={self.length}, seq_axis={self.seq_axis}, pad_value={self.pad_value!r}, "
                f"mask_arg={self.mask_arg!r}")


def _tree_map(fn: Any, out: Any) -> Any:
    """Map over tensors in nested outputs, keeping dict subclasses (Hugging Face ModelOutput) intact."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict):
        new = {k: _tree_map(fn, v) for k, v in out.items()}
        try:
            return type(out)(**new)
        except TypeError:
            return type(out)(new)
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_tree_map(fn, v) for v in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_tree_map(fn, v) for v in out)
    return out


def padded_specs(specs: Sequence[InputSpec], length: int, seq_axis: int = 1) -> list[InputSpec]:
    """Specs for a padded model: a sequence axis pinned at ``length`` becomes 1..length (opt stays);
    a requested range beyond ``length`` is an error (the model cannot see more than ``length``)."""
    out = []
    for s in specs:
        if s.rank <= seq_axis:
            out.append(s)
            continue
        if s.max[seq_axis] > length:
            raise LrexportError(f"input {s.name!r} asks for sequence length up to {s.max[seq_axis]} but the model "
                                f"is padded to {length}",
                                f"lower max on axis {seq_axis} in --shapes to <= {length}, or raise --pad-to-length")
        if s.min[seq_axis] == s.max[seq_axis] == length:
            pin = lambda dims, v: tuple(v if a == seq_axis else d for a, d in enumerate(dims))  # noqa: E731
            s = replace(s, min=pin(s.min, 1))
        out.append(s)
    return out


def apply_padding(loaded: LoadedModel, length: int, *, seq_axis: int = 1, pad_value: float | Sequence[float] = 0,
                  mask_arg: str | None = None) -> LoadedModel:
    """``--pad-to-length N``: wrap the loaded module in :class:`PadToLength` before export.

    The returned LoadedModel keeps ``kind``/``source`` (the report still names the file) and the
    parameter count; specs read from a .pt2 archive (sequence pinned at N) are widened to 1..N.
    TorchScript archives cannot be wrapped (torch.export cannot trace into a ScriptModule, and the
    TorchScript->torch.export converter needs the unwrapped module): that is a one-line error.
    """
    if loaded.kind == "torchscript":
        raise LrexportError("--pad-to-length cannot wrap a TorchScript archive",
                            "save the model as a torch.export archive (.pt2) or a state dict with --factory")
    if int(length) < 1:
        raise LrexportError(f"--pad-to-length {length} is not positive", "pass the model's fixed sequence length")
    wrapped = PadToLength(loaded.module, length, seq_axis=seq_axis, pad_value=pad_value, mask_arg=mask_arg)
    specs = padded_specs(loaded.inferred_specs, length, seq_axis) if loaded.inferred_specs else []
    return LoadedModel(wrapped, loaded.kind, loaded.source, loaded.exported_program, specs)
