"""Hugging Face transformers: export forms of its own code, one module per family of layers."""

from __future__ import annotations

from torch import nn

from exporter.patches.transformers import rg_lru, rwkv, selective_scan

_FAMILIES = [selective_scan, rg_lru, rwkv]

PATCHES = [p for family in _FAMILIES for p in family.PATCHES]


def refusals(model: nn.Module) -> list[str]:
    return [r for family in _FAMILIES if hasattr(family, "refusals") for r in family.refusals(model)]
