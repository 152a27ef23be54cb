"""Hugging Face transformers: export forms of its own code, one module per family of layers
(``gated_delta``: Qwen3-Next / Qwen3.5 / OLMo-hybrid; ``kda``: Kimi-Linear; ``lightning``: MiniMax;
``mamba2``: the Mamba-2 SSD of Mamba2 and its hybrids; ``selective_scan``: Mamba-1's scan in Mamba,
FalconMamba, Jamba, Zamba; ``rg_lru``: RecurrentGemma; ``moe``: the experts blocks; ``rwkv``: RWKV-4's WKV
and ``mlstm``: xLSTM, as torch scans). Each
finds what to swap by identity or signature in the modeling modules of the model's classes (looked up in
``sys.modules``), whether transformers dispatches to fla's Triton kernels or to its own torch code.
``PATCHES`` and ``refusals`` are the library's entries in the registry of :mod:`exporter.patches`."""

from __future__ import annotations

from torch import nn

from exporter.patches.transformers import (gated_delta, kda, lightning, mamba2, mlstm, moe, rg_lru, rwkv,
                                          selective_scan)

_FAMILIES = [gated_delta, kda, lightning, mamba2, selective_scan, rg_lru, moe, rwkv, mlstm]

PATCHES = [p for family in _FAMILIES for p in family.PATCHES]


def refusals(model: nn.Module) -> list[str]:
    return [r for family in _FAMILIES if hasattr(family, "refusals") for r in family.refusals(model)]
