"""Which embedding table an integer input indexes: its valid token ids are 0..size-1."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exporter.specs import InputSpec


def _bound(value: Any) -> int | None:
    """An integer range bound from torch, or None for an infinite one (torch's ``int_oo`` claims
    ``is_finite`` and fails ``int()``, so both are checked)."""
    try:
        out = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return out if abs(out) < 2**62 else None


_INDEX_PASSTHROUGH = {"view", "reshape", "_reshape_alias", "clone", "contiguous", "_to_copy", "to", "unsqueeze",
                      "squeeze", "flatten", "expand", "slice", "select", "permute", "transpose", "t", "alias",
                      "lift_fresh_copy", "detach"}


def embedding_sizes(ep: Any) -> dict[str, int]:
    """User input name -> the smallest embedding table its values index (through view-like ops), read
    from an exported program's graph: the valid token ids are 0..size-1."""
    user_inputs = set(ep.graph_signature.user_inputs)
    sizes: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] != "embedding":
            continue
        weight, idx = node.args[0], node.args[1]
        while getattr(idx, "op", None) == "call_function" and \
                getattr(idx.target, "__name__", "").split(".")[0] in _INDEX_PASSTHROUGH:
            idx = idx.args[0]
        val = getattr(weight, "meta", {}).get("val")
        if getattr(idx, "op", None) == "placeholder" and idx.name in user_inputs and val is not None:
            size = _bound(val.shape[0])
            if size:
                sizes[idx.name] = min(size, sizes.get(idx.name, size))
    return sizes


def module_embedding_sizes(module: nn.Module, specs: list[InputSpec]) -> dict[str, int]:
    """The same for an nn.Module: run it once on all-zero inputs (a valid token id for any table) and
    see which ``nn.Embedding`` reads each integer input (the tensor itself or a view of it)."""
    ints = [s for s in specs if not s.dtype.startswith(("float", "bool"))]
    tables = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if not ints or not tables:
        return {}
    feeds = {s.name: torch.zeros(s.export_shape(), dtype=getattr(torch, s.dtype)) for s in specs}
    sizes: dict[str, int] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        idx = args[0] if args else None
        base = getattr(idx, "_base", None)
        for s in ints:
            if idx is feeds[s.name] or (base is not None and base is feeds[s.name]):
                sizes[s.name] = min(mod.num_embeddings, sizes.get(s.name, mod.num_embeddings))

    handles = [m.register_forward_pre_hook(hook) for m in tables]
    try:
        with torch.no_grad():
            module(*[feeds[s.name] for s in specs])
    except Exception:  # the caller's export reports a model that does not run
        return {}
    finally:
        for h in handles:
            h.remove()
    return sizes
