"""MiniMax's lightning attention (``MiniMaxLightningAttention.forward``) -> ``lrexport::linear_attention`` with
rule ``gated`` and a constant decay per head.

Its forward loops in Python over blocks of ``block_size`` (torch.export unrolls the loop, and the last,
shorter block's slices leave guards: the sequence is served only between two block multiples). The blocks
compute, per head with slope ``s``, ``S_t = e^{-s} S_{t-1} + k_t v_t^T`` and ``o_t = q_t^T S_t`` (no scale):
the intra-block weights ``e^{-s (i - j)}``, the state read at ``e^{-s (i + 1)}`` and carried with
``e^{-s (B - 1 - j)}`` are exactly that recurrence. The rest of the forward (activation, padding mask,
RMSNorm, output gate and projection) is transformers' own, unchanged. With a cache (decode) the layer runs
transformers' forward as it is.

The parity reference runs the layer's own forward (this patch swaps nothing for eager runs).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap, instances, loaded_module

_CLASSES = (("transformers.models.minimax.modeling_minimax", "MiniMaxLightningAttention"),)


def lightning_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None,
                      attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``MiniMaxLightningAttention.forward`` without cache, the block loop as one op."""
    if past_key_values is not None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                  **kwargs)
    apply_mask = sys.modules[type(self).__module__].apply_mask_to_padding_states
    batch_size, seq_len, _ = hidden_states.shape
    heads, dim = self.num_attention_heads, self.head_dim
    qkv = apply_mask(self.act_fn(self.qkv_proj(hidden_states)), attention_mask)
    q, k, v = torch.split(qkv.reshape(batch_size, seq_len, heads, 3 * dim), dim, dim=3)
    g = (-self.slope_rate.reshape(1, 1, heads)).to(torch.float32).expand(batch_size, seq_len, heads)
    out, state = linear_attention(q, k, v, g=g, rule="gated", scale=1.0)
    out = self.norm(out.reshape(batch_size, seq_len, heads * dim))
    out = self.out_proj(F.sigmoid(self.output_gate(hidden_states)) * out)
    return out, state.to(v.dtype)


def _find(model: nn.Module) -> list[Swap]:
    swaps = []
    for module_name, cls_name in _CLASSES:
        mod = loaded_module(module_name)
        for _, m in instances(model, getattr(mod, cls_name, None) if mod is not None else None):
            swaps.append(Swap(m, "forward", functools.partial(lightning_forward, m)))
    return swaps


PATCHES = [
    Patch("transformers", "MiniMax lightning attention (a Python loop over blocks)", "lrexport linear_attention gated",
          _find),
]
