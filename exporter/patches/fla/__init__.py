"""flash-linear-attention / fla-core: torch forms of the Triton code its layers run, one module per family
of layers (``linear_attn``: ``LinearAttention`` and fla's Triton norms; ``delta``: the delta-rule layers). ``PATCHES`` and ``refusals`` are the
library's entries in the registry of :mod:`exporter.patches`."""

from __future__ import annotations

from torch import nn

from exporter.patches.fla import delta, linear_attn

_FAMILIES = [linear_attn, delta]

PATCHES = [p for family in _FAMILIES for p in family.PATCHES]


def refusals(model: nn.Module) -> list[str]:
    return [r for family in _FAMILIES if hasattr(family, "refusals") for r in family.refusals(model)]
