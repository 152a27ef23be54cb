"""Building blocks shared by the sample models: low-rank linears and linear-attention layers.

They are written the straightforward way users write them (so the exported graphs show the
patterns lrexport's graph passes must recognize), not in the pre-optimized form.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LowRankLinear(nn.Module):
    """``Linear(a, b)`` replaced by ``Linear(a, r) -> Linear(r, b)``, biases on both factors."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=bias)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def make_linear(in_features: int, out_features: int, rank: int | None) -> nn.Module:
    """A dense ``nn.Linear`` when ``rank`` is None, else a :class:`LowRankLinear`."""
    if rank is None:
        return nn.Linear(in_features, out_features)
    return LowRankLinear(in_features, out_features, rank)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, so the normalizer never vanishes."""
    return F.elu(x) + 1.0


class MultiHeadProjections(nn.Module):
    """q/k/v/out projections (optionally low-rank) and the head split shared by the attention layers."""

    def __init__(self, d_model: int, heads: int, rank: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.q_proj = make_linear(d_model, d_model, rank)
        self.k_proj = make_linear(d_model, d_model, rank)
        self.v_proj = make_linear(d_model, d_model, rank)
        self.out_proj = make_linear(d_model, d_model, rank)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)  # b h n d


class CausalLinearAttention(MultiHeadProjections):
    """Causal linear attention with running sums written the straightforward way.

    S_i = sum_{j<=i} phi(K_j) V_j^T is an Einsum -> CumSum over the sequence -> Einsum with phi(Q),
    Z_i = sum_{j<=i} phi(K_j) is a CumSum; this materializes an n x d x d state per head, which is
    exactly what lrexport's chunked-causal pass removes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = elu_feature_map(self._split(self.q_proj(x)))
        k = elu_feature_map(self._split(self.k_proj(x)))
        v = self._split(self.v_proj(x))
        kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(dim=2)  # b h n d e
        z = k.cumsum(dim=2)  # b h n d
        num = torch.einsum("bhnd,bhnde->bhne", q, kv)
        den = torch.einsum("bhnd,bhnd->bhn", q, z).unsqueeze(-1) + self.eps
        out = (num / den).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class LinearAttention(MultiHeadProjections):
    """Non-causal linear attention: phi(Q) (phi(K)^T V) summed over the sequence first (already cheap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = elu_feature_map(self._split(self.q_proj(x)))
        k = elu_feature_map(self._split(self.k_proj(x)))
        v = self._split(self.v_proj(x))
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        z = k.sum(dim=2)  # b h d
        num = torch.einsum("bhnd,bhde->bhne", q, kv)
        den = torch.einsum("bhnd,bhd->bhn", q, z).unsqueeze(-1) + self.eps
        return self.out_proj((num / den).transpose(1, 2).reshape(b, n, c))


class LinformerAttention(nn.Module):
    """Linformer self-attention: keys and values projected along the sequence by E, F (n -> k).

    The sequence length is fixed at ``seq_len`` by construction (E and F are Linear(n, k)).
    """

    def __init__(self, d_model: int, heads: int, seq_len: int, k: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.E = nn.Linear(seq_len, k, bias=False)
        self.F = nn.Linear(seq_len, k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_proj(x).reshape(b, n, self.heads, -1).transpose(1, 2)  # b h n d
        k = self.E(self.k_proj(x).transpose(1, 2)).transpose(1, 2)  # b k c
        v = self.F(self.v_proj(x).transpose(1, 2)).transpose(1, 2)
        kk = k.shape[1]
        k = k.reshape(b, kk, self.heads, -1).transpose(1, 2)  # b h k d
        v = v.reshape(b, kk, self.heads, -1).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class SoftmaxAttention(MultiHeadProjections):
    """Plain multi-head softmax attention with optionally factorized projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        attn = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, rank: int | None = None):
        super().__init__()
        self.fc1 = make_linear(d_model, hidden, rank)
        self.fc2 = make_linear(hidden, d_model, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block around any attention module."""

    def __init__(self, d_model: int, attention: nn.Module, ff_hidden: int, rank: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = attention
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, ff_hidden, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))
