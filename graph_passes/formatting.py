"""Plain-text formatting of shapes and numbers, shared by the pass reports and the exporter's tables
(defined here so ``graph_passes`` does not import ``exporter``; ``exporter.table`` re-exports it)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def fmt_num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def fmt_shape(dims: Sequence[Any]) -> str:
    """``(1, 95, 512)`` -> ``1x95x512`` (a scalar: ``scalar``)."""
    return "x".join(map(str, dims)) if len(dims) else "scalar"


def fmt_shapes(shapes: Mapping[str, Sequence[Any]]) -> str:
    """``{'x': (1, 95, 512), 'ids': (1, 95)}`` -> ``x 1x95x512, ids 1x95`` (no Python reprs in text output)."""
    return ", ".join(f"{name} {fmt_shape(dims)}" for name, dims in shapes.items())
