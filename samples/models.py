"""Factories for the sample models (usable as ``--factory samples.models:<name>``).

Each factory is deterministic (seeded) and small enough to export and check on a CPU in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from samples.layers import (
    Block,
    CausalLinearAttention,
    FeedForward,
    LinearAttention,
    LinformerAttention,
    SoftmaxAttention,
)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class MLP(nn.Module):
    """Two-layer MLP (with residual) whose Linears are low-rank pairs."""

    def __init__(self, d_model: int, hidden: int, rank: int | None):
        super().__init__()
        self.ff = FeedForward(d_model, hidden, rank)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.ff(x))


class LanguageModel(nn.Module):
    """Token ids -> logits through a stack of blocks (causal linear attention by default)."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, ff_hidden: int,
                 rank: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, CausalLinearAttention(d_model, heads, rank), ff_hidden, rank)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class Encoder(nn.Module):
    def __init__(self, blocks: list[nn.Module], d_model: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def lowrank_mlp(d_model: int = 512, hidden: int = 2048, rank: int = 64, seed: int = 0) -> nn.Module:
    """Every Linear a rank-64 pair: factorization pays (64*(512+2048) << 512*2048)."""
    _seeded(seed)
    return MLP(d_model, hidden, rank).eval()


def lowrank_nopay(d_model: int = 512, rank: int = 384, seed: int = 0) -> nn.Module:
    """512x512 Linears as rank-384 pairs: r*(m+n) > m*n, so the pair is slower than one dense weight."""
    _seeded(seed)
    return MLP(d_model, d_model, rank).eval()


def lowrank_block(d_model: int = 512, heads: int = 8, ff_hidden: int = 2048, rank: int = 64,
                  seed: int = 0) -> nn.Module:
    """Pre-LN softmax-attention transformer block with every Linear a rank-64 pair."""
    _seeded(seed)
    return Block(d_model, SoftmaxAttention(d_model, heads, rank), ff_hidden, rank).eval()


def causal_block(d_model: int = 512, heads: int = 8, seed: int = 0) -> nn.Module:
    """One causal linear-attention layer (h=8, head dim 64): the benchmark's naive cumsum block."""
    _seeded(seed)
    return CausalLinearAttention(d_model, heads).eval()


def causal_lm(vocab: int = 256, d_model: int = 128, heads: int = 4, layers: int = 2,
              ff_hidden: int = 512, rank: int | None = 32, seed: int = 0) -> nn.Module:
    """Causal linear-attention LM over token ids, low-rank projections, Einsum->CumSum->Einsum."""
    _seeded(seed)
    return LanguageModel(vocab, d_model, heads, layers, ff_hidden, rank).eval()


def noncausal_encoder(d_model: int = 128, heads: int = 4, layers: int = 2, ff_hidden: int = 512,
                      seed: int = 0) -> nn.Module:
    """Non-causal linear-attention encoder (sums over n first: already linear in n)."""
    _seeded(seed)
    blocks = [Block(d_model, LinearAttention(d_model, heads), ff_hidden) for _ in range(layers)]
    return Encoder(blocks, d_model).eval()


def linformer_encoder(d_model: int = 128, heads: int = 4, layers: int = 2, seq_len: int = 128,
                      k: int = 32, ff_hidden: int = 512, seed: int = 0) -> nn.Module:
    """Linformer encoder: E/F project keys and values along the (fixed-length) sequence."""
    _seeded(seed)
    blocks = [Block(d_model, LinformerAttention(d_model, heads, seq_len, k), ff_hidden)
              for _ in range(layers)]
    return Encoder(blocks, d_model).eval()


class GainSquare(nn.Module):
    """A gain-then-square feature: ``h = Linear(x) * 400; e = h * h; out = Linear(e / 160000)``.

    Fine in float32; ``e`` reaches ~1e6, far past fp16's 65504, while everything around it is small.
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * 400.0
        e = h * h
        return self.out(e / 160000.0)


def gain_square(d_model: int = 64, hidden: int = 128, seed: int = 0) -> nn.Module:
    """The gain-then-square model: overflows fp16 in one place (``e = h * h``) unless kept float32."""
    _seeded(seed)
    return GainSquare(d_model, hidden).eval()



class RecurrentLinearAttention(nn.Module):
    """One layer calling lrexport's linear-attention op (``exporter/linear_attention``) with one ``rule``
    (``decay``: "head" or "key" for the gated rules), making its inputs as real layers do: log decay by
    logsigmoid, beta by sigmoid, unit keys for the delta rules. x: (batch, seq, heads * head_dim)."""

    def __init__(self, rule: str, decay: str | None, heads: int, head_dim: int, normalize: bool = False):
        super().__init__()
        self.rule, self.heads, self.head_dim, self.normalize = rule, heads, head_dim, normalize
        self.decay = (decay or "head") if rule in ("gated", "gated_delta") else None
        width = heads * head_dim
        self.splits = [width] * 3 + [{"key": width, "head": heads, None: 0}[self.decay]] + [heads * ("delta" in rule)]
        self.proj = nn.Linear(width, sum(self.splits))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from exporter.linear_attention import linear_attention

        b, t, width = x.shape
        h, d = self.heads, self.head_dim
        q, k, v, g, beta = torch.split(self.proj(x), self.splits, -1)
        q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, h, d), v.reshape(b, t, h, d)
        if self.decay is None:
            g = None
        else:
            g = nn.functional.logsigmoid(g + 2)
            g = g.reshape(b, t, h, d) if self.decay == "key" else g
        if "delta" in self.rule:
            beta, k = torch.sigmoid(beta), nn.functional.normalize(k, dim=-1)
        else:
            beta = None
        if self.normalize:  # Katharopoulos: positive features, outputs divided by q . sum k
            q, k = nn.functional.elu(q) + 1, nn.functional.elu(k) + 1
        out, _ = linear_attention(q, k, v, g=g, beta=beta, rule=self.rule, scale=d ** -0.5, normalize=self.normalize)
        return self.out(out.reshape(b, t, width))


def linear_attention_layer(rule: str = "gated_delta", decay: str | None = None, heads: int = 2, head_dim: int = 16,
                           normalize: bool = False, seed: int = 0) -> nn.Module:
    """A layer calling the linear-attention op: gated delta rule by default; ``decay`` "head" (the default
    of the gated rules) or "key"; ``normalize`` (linear rule): the Katharopoulos normalizer."""
    _seeded(seed)
    return RecurrentLinearAttention(rule, decay, heads, head_dim, normalize).eval()
