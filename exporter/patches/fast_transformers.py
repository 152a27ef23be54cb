"""pytorch-fast-transformers (0.4.0): ``causal_linear`` as one running sum instead of the C++/CUDA kernel.

``CausalLinearAttention.forward`` (attention_type="causal-linear") calls the module-level ``causal_linear``,
which permutes to ``[N, H, L, E]`` and runs ``CausalDotProduct``, a custom autograd Function over a C++ (CPU)
or CUDA kernel: torch.export cannot trace it ("Cannot access data pointer of Tensor"; upstream issue #88).
The kernel computes ``out_l = sum_{s<=l} (q_l . k_s) v_s``; :func:`causal_linear_cumsum` writes that as the
textbook outer product -> cumsum -> contraction that the causal-chunk pass chunks. The normalizer
(``einsum(Q, K.cumsum(1))``) is already torch code and stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.patches import Patch, Swap, instances, loaded_module


def causal_linear_cumsum(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """fast-transformers' ``causal_linear`` (layout ``[N, L, H, E]``) with one cumsum over L."""
    state = torch.einsum("nlhi,nlhj->nlhij", K, V).cumsum(dim=1)
    return torch.einsum("nlhi,nlhij->nlhj", Q, state)


def _find(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fast_transformers.attention.causal_linear_attention")
    if mod is None or not instances(model, getattr(mod, "CausalLinearAttention", None)):
        return []
    return [Swap(mod, "causal_linear", causal_linear_cumsum)]


PATCHES = [
    Patch("pytorch-fast-transformers", "causal_linear (CausalDotProduct kernel)", "cumsum form", _find),
]
