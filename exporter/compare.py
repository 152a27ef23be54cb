"""Compare a backend's outputs with the reference, per output: the numbers a user needs to decide.

The rule (an element fails only past atol AND rtol * |r|; any NaN/Inf fails) is
:mod:`graph_passes.tolerance`'s, shared with the per-pass check.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from exporter.errors import LrexportError
from graph_passes.tolerance import Tolerance, errors, failing

if TYPE_CHECKING:
    from exporter.specs import InputSpec

DEFAULT_TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2),
}


@dataclass
class Tolerances:
    """Default tolerance for a precision, overridable per output name (glob patterns allowed)."""

    default: Tolerance
    per_output: Mapping[str, Tolerance]

    @classmethod
    def for_precision(cls, precision: str, atol: float | None = None, rtol: float | None = None,
                      per_output: Mapping[str, Tolerance] | None = None) -> "Tolerances":
        if precision not in DEFAULT_TOLERANCES:
            raise LrexportError(f"unknown precision {precision!r}", f"use one of {', '.join(DEFAULT_TOLERANCES)}")
        base = DEFAULT_TOLERANCES[precision]
        return cls(Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol),
                   dict(per_output or {}))

    def get(self, output: str) -> Tolerance:
        for pattern, tol in self.per_output.items():
            if fnmatch.fnmatchcase(output, pattern):
                return tol
        return self.default


def parse_output_tolerance(text: str) -> tuple[str, Tolerance]:
    """``NAME:atol=1e-3,rtol=1e-2`` (NAME may be a glob)."""
    name, sep, rest = text.partition(":")
    values: dict[str, float] = {}
    for item in rest.split(",") if sep else []:
        key, eq, val = item.partition("=")
        try:
            if key.strip() not in ("atol", "rtol") or not eq:
                raise ValueError
            values[key.strip()] = float(val)
            if not np.isfinite(values[key.strip()]) or values[key.strip()] < 0:
                raise ValueError
        except ValueError:
            values = {}
            break
    if not name or not values:
        raise LrexportError(f"bad output tolerance {text!r}",
                            "write NAME:atol=1e-3,rtol=1e-2 with finite numbers >= 0")
    base = DEFAULT_TOLERANCES["fp32"]
    return name, Tolerance(values.get("atol", base.atol), values.get("rtol", base.rtol))


def check_output_tolerances(per_output: Mapping[str, Tolerance], outputs: Sequence[str]) -> None:
    """A --tol glob that matches no output is a typo, refused once the outputs are known (else it would
    silently leave that output at the default tolerance)."""
    for pattern in per_output:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in outputs):
            shown = ", ".join(repr(o) for o in list(outputs)[:12]) + (", ..." if len(outputs) > 12 else "")
            raise LrexportError(f"--tol {pattern!r} matches no output of the model (its outputs: {shown})",
                                "name an output, or a glob that matches some")


@dataclass
class OutputComparison:
    output: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    mismatches: int  # finite elements past both atol and rtol (fail/total adds nonfinite)
    total: int
    worst_index: tuple[int, ...]  # where |a - r| is largest (or the first NaN/Inf)
    worst_actual: float
    worst_expected: float
    min_atol: float  # smallest atol that would pass at this rtol
    min_rtol: float  # smallest rtol that would pass at this atol
    nonfinite: int
    module: str | None = None  # module path of the node that produced the output (dynamo metadata)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.nonfinite == 0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["ok"] = self.ok
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def compare_arrays(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> OutputComparison:
    if actual.shape != expected.shape:
        raise LrexportError(f"output {name!r} has shape {list(actual.shape)} but the reference has "
                            f"{list(expected.shape)}", "the ONNX model does not match the PyTorch model")
    a = actual.astype(np.float64, copy=False)
    r = expected.astype(np.float64, copy=False)
    diff, rel, finite = errors(a, r)
    nonfinite = int(a.size - finite.sum())
    bad = finite & failing(diff, rel, tol)  # NaN/Inf are counted once, in nonfinite
    if a.size:
        worst = np.unravel_index(int(np.argmax(diff)), a.shape)
        max_abs = float(diff.max())
        max_rel = float(rel[finite].max()) if finite.any() else float("inf")
        beyond_rtol, beyond_atol = rel > tol.rtol, diff > tol.atol
        min_atol = float(diff[beyond_rtol].max()) if beyond_rtol.any() else 0.0
        min_rtol = float(rel[beyond_atol].max()) if beyond_atol.any() else 0.0
        af, rf = a[finite], r[finite]
        norm_r = float(np.linalg.norm(rf))
        rel_l2 = float(np.linalg.norm(af - rf) / norm_r) if norm_r > 0 else float(np.linalg.norm(af - rf))
        denom = float(np.linalg.norm(af) * norm_r)
        cosine = float(np.dot(af.ravel(), rf.ravel()) / denom) if denom > 0 else (1.0 if not af.any() else 0.0)
        worst_a, worst_e = float(a[worst]), float(r[worst])
    else:
        worst, max_abs, max_rel, min_atol, min_rtol, rel_l2, cosine, worst_a, worst_e = (
            (), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    return OutputComparison(
        output=name, shape=tuple(a.shape), atol=tol.atol, rtol=tol.rtol, max_abs=max_abs, max_rel=max_rel,
        rel_l2=rel_l2, cosine=cosine, mismatches=int(bad.sum()), total=int(a.size),
        worst_index=tuple(int(i) for i in worst), worst_actual=worst_a, worst_expected=worst_e,
        min_atol=min_atol, min_rtol=min_rtol, nonfinite=nonfinite)


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    tolerances: Tolerances) -> list[OutputComparison]:
    missing = [k for k in expected if k not in actual]
    if missing:
        raise LrexportError(f"backend output {missing[0]!r} is missing", "the ONNX outputs do not match the model's")
    return [compare_arrays(name, actual[name], expected[name], tolerances.get(name)) for name in expected]


def tokens_only(outputs: dict[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """``outputs`` with the positions a padding mask (``InputSpec.mask_for``) marks as padding set to 0: what a
    model computes there (a query that may attend to nothing) is meaningless, so parity compares the tokens only.
    Outputs whose leading (batch, seq) axes are not the mask's are left as they are."""
    masks = [np.asarray(feeds[s.name]) == 0 for s in specs if s.mask_for and s.name in feeds
             and np.asarray(feeds[s.name]).ndim == 2]
    masks = [m for m in masks if m.any()]
    if not masks:
        return outputs
    out = {}
    for name, arr in outputs.items():
        for pad in masks:
            if arr.ndim >= 2 and arr.shape[:2] == pad.shape:
                arr = arr.copy() if arr is outputs[name] else arr
                arr[pad] = 0
        out[name] = arr
    return out
