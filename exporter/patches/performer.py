"""performer-pytorch (1.1.4): its causal attention as one running sum.

``FastAttention`` binds ``causal_linear_fn`` per instance, in ``__init__``: without the CUDA extension of
fast-transformers to ``causal_linear_attention_noncuda``, a Python loop over ``chunk(128)`` (128 chunks) with
a carried sum (torch.export unrolls it and pins the sequence), with it to ``causal_linear_attention``
(the ``CausalDotProduct`` kernel, which torch.export cannot trace). Both compute, with eps added to every
element of the key prefix sum,

    out_i = (q_i . sum_{j<=i} k_j v_j^T) / (q_i . (sum_{j<=i} k_j + eps))

which is what :func:`causal_linear_attention_cumsum` writes in the textbook form the causal-chunk pass
chunks (``q . (z + eps) = q . z + eps * sum(q)``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from exporter.patches import Patch, Swap, instances, loaded_module


def causal_linear_attention_cumsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 128,
                                   eps: float = 1e-6) -> torch.Tensor:
    """performer's causal linear attention with one cumsum over the sequence (``chunk_size`` is unused:
    the chunks only bounded memory in eager PyTorch, the graph pass chunks the exported sum)."""
    del chunk_size
    state = torch.einsum("...nd,...ne->...nde", k, v).cumsum(dim=-3)
    num = torch.einsum("...nd,...nde->...ne", q, state)
    z = k.cumsum(dim=-2).type_as(q)
    den = torch.einsum("...nd,...nd->...n", q, z) + eps * q.sum(dim=-1)
    return num / den.unsqueeze(-1)


def _bound(fn: Any, target: Any) -> bool:
    return fn is target or (isinstance(fn, functools.partial) and fn.func is target and not fn.args)


def _finder(attr: str):
    def find(model: nn.Module) -> list[Swap]:
        mod = loaded_module("performer_pytorch.performer_pytorch")
        if mod is None:
            return []
        target = getattr(mod, attr)
        return [Swap(m, "causal_linear_fn", _with_eps(m.causal_linear_fn))
                for _, m in instances(model, mod.FastAttention)
                if getattr(m, "causal", False) and _bound(getattr(m, "causal_linear_fn", None), target)]
    return find


def _with_eps(fn: Any) -> Any:
    """The cumsum form with the eps (and chunk size) the bound function was given."""
    keywords = dict(fn.keywords) if isinstance(fn, functools.partial) else {}
    return functools.partial(causal_linear_attention_cumsum, **keywords)


PATCHES = [
    Patch("performer-pytorch", "causal_linear_attention_noncuda", "cumsum form",
          _finder("causal_linear_attention_noncuda")),
    Patch("performer-pytorch", "causal_linear_attention (CausalDotProduct kernel)", "cumsum form",
          _finder("causal_linear_attention")),
]
