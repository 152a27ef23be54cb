"""flash-linear-attention / fla-core: torch forms of the Triton code its layers run, one module per family
of layers (``linear_attn``: ``LinearAttention`` and ``RMSNorm``; ``gated``: GLA, HGRN2, simple GLA, retention;
``delta``: DeltaNet, GatedDeltaNet, KDA and their short convolutions; ``modules``: the Triton norms, rotary
embeddings and activations these layers share). ``PATCHES`` and ``refusals`` are the
library's entries in the registry of :mod:`exporter.patches`."""

from __future__ import annotations

from torch import nn

from exporter.patches.fla import delta, gated, linear_attn, modules

_FAMILIES = [linear_attn, gated, delta, modules]

PATCHES = [p for family in _FAMILIES for p in family.PATCHES]


def refusals(model: nn.Module) -> list[str]:
    return [r for family in _FAMILIES if hasattr(family, "refusals") for r in family.refusals(model)]
