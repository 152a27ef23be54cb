"""The one tolerance rule of lrexport, used by parity reports and by the per-pass check alike.

An element fails only when it is off by more than ``atol`` AND by more than ``rtol * |reference|``
(polygraphy's elementwise rule); any NaN/Inf fails. Why this rule and not ``np.allclose``'s
``|a - r| <= atol + rtol * |r|``: here each knob alone decides, so a report can say "passes with
atol >= X" or "with rtol >= Y" and mean it (with the sum, neither number alone is the answer), and
the bound is ``max(atol, rtol * |r|)``, never the up to 2x looser sum. atol covers elements whose
reference is near zero, where a relative error means nothing; rtol covers large ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(|a - r|, |a - r| / |r|, finite) in float64; where either side is NaN/Inf the error is inf, and
    the relative error is inf where the reference is 0 and the element differs."""
    a = np.asarray(actual).astype(np.float64, copy=False)
    r = np.asarray(expected).astype(np.float64, copy=False)
    finite = np.isfinite(a) & np.isfinite(r)
    diff = np.where(finite, np.abs(a - r), np.inf)
    absr = np.abs(np.where(finite, r, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(absr > 0, diff / absr, np.where(diff > 0, np.inf, 0.0))
    return diff, rel, finite


def failing(diff: np.ndarray, rel: np.ndarray, tol: Tolerance) -> np.ndarray:
    """The elements past both ``atol`` and ``rtol`` (see the module docstring for why both)."""
    return (diff > tol.atol) & (rel > tol.rtol)


def within(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> bool:
    """Whether every element of ``actual`` is within ``tol`` of ``expected`` (shapes must match)."""
    diff, rel, _ = errors(actual, expected)
    return not failing(diff, rel, tol).any()
