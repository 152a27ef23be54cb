"""Plain-text tables for the terminal (the same data goes to --json).

Number and shape formatting lives in :mod:`graph_passes.formatting` (the pass reports use it too) and is
re-exported here."""

from __future__ import annotations

from typing import Any, Sequence

from graph_passes.formatting import fmt_num, fmt_shape, fmt_shapes

__all__ = ["fmt_num", "fmt_shape", "fmt_shapes", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    cells = [[fmt_num(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(out)
