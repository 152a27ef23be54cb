"""Plain-text tables for the terminal (the same data goes to --json)."""

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


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    cells = [[fmt_num(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(out)
