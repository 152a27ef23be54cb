"""Tiny fla layers whose state decays (GLA, HGRN2, retention), and fla's LinearAttention, each wrapped to return a
tensor; factories for ``lrexport build --factory fla_gated_models:NAME`` (tests/test_fla_gated.py)."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 32


class Layer(nn.Module):
    """An fla layer returning ``(o, attentions, cache)``; this returns ``o``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def gla(seed: int = 0) -> nn.Module:
    """GatedLinearAttention: per-key decay gk, FusedRMSNormGated output gate."""
    from fla.layers import GatedLinearAttention

    torch.manual_seed(seed)
    return Layer(GatedLinearAttention(hidden_size=HIDDEN, num_heads=2, expand_k=1.0, expand_v=1.0)).eval()


def gla_gqa(seed: int = 0) -> nn.Module:
    """GatedLinearAttention with one key/value head for two query heads, a swish feature map, and the unfused
    RMSNorm + swish gate (ACT2FN's Triton swish stored on the layer)."""
    from fla.layers import GatedLinearAttention

    torch.manual_seed(seed)
    return Layer(GatedLinearAttention(hidden_size=HIDDEN, num_heads=2, num_kv_heads=1, expand_k=1.0, expand_v=1.0,
                                      feature_map="swish", fuse_norm=False)).eval()


def retention(seed: int = 0) -> nn.Module:
    """MultiScaleRetention: fixed decay per head, rotary q/k, FusedRMSNormGated."""
    from fla.layers import MultiScaleRetention

    torch.manual_seed(seed)
    return Layer(MultiScaleRetention(hidden_size=HIDDEN, num_heads=2)).eval()


def simple_gla(seed: int = 0) -> nn.Module:
    """SimpleGatedLinearAttention (one decay per head and position), without its short convolutions."""
    from fla.layers.simple_gla import SimpleGatedLinearAttention

    torch.manual_seed(seed)
    return Layer(SimpleGatedLinearAttention(hidden_size=HIDDEN, num_heads=2, use_short_conv=False)).eval()


def hgrn2(seed: int = 0) -> nn.Module:
    """HGRN2Attention: GLA with k = 1 - exp(g), swish on q, rms_norm_linear output."""
    from fla.layers import HGRN2Attention

    torch.manual_seed(seed)
    return Layer(HGRN2Attention(hidden_size=HIDDEN, num_heads=2, expand_ratio=None)).eval()


def linear_attention(seed: int = 0) -> nn.Module:
    """LinearAttention: elu+1 features, normalized, RMSNorm output norm."""
    from fla.layers import LinearAttention

    torch.manual_seed(seed)
    return Layer(LinearAttention(hidden_size=HIDDEN, num_heads=2, feature_map="elu", do_feature_map_norm=True)).eval()


def rwkv7(seed: int = 0) -> nn.Module:
    """RWKV7Attention: its generalized delta rule has no rule in the op (refused)."""
    from fla.layers import RWKV7Attention

    torch.manual_seed(seed)
    return Layer(RWKV7Attention(hidden_size=HIDDEN, head_dim=16, layer_idx=0, num_hidden_layers=2)).eval()


class Masked(Layer):
    """Calls the layer with an all-ones padding mask (fla unpads the batch into varlen sequences)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long))[0]


def gla_masked(seed: int = 0) -> nn.Module:
    return Masked(gla(seed).layer).eval()
