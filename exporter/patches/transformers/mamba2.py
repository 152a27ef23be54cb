"""Mamba-2 SSD (``mamba2_chunk_scan`` of Mamba2, Bamba, FalconH1, NemotronH, GraniteMoeHybrid, Zamba2, and
every modeling module that defines it) -> ``lrexport::linear_attention`` with rule ``gated``.

transformers' torch code pads the sequence to a multiple of ``chunk_size`` with Python ints, so torch.export
serves only multiples of the chunk (and nothing below it). The scan is the gated rule with a scalar decay per
head: with ``dt = clamp(softplus(dt + dt_bias))`` and ``x`` (head_dim p), ``B``/``C`` (state n, per group,
a group serving consecutive heads), ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` and
``y_t = h_t C_t + D x_t``; i.e. ``q = C``, ``k = dt * B``, ``v = x``, ``g = dt * A``, scale 1 (state
``(n, p)``: the transpose of transformers' ``(p, n)``), plus the ``D`` skip. The output is float32, as
transformers' torch code returns it.

The parity reference runs transformers' own torch code (``__wrapped__`` under the kernel dispatch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from exporter.linear_attention import linear_attention
from exporter.patches import Patch
from exporter.patches.transformers.common import swap_finders

_TORCH = ("mamba2_chunk_scan",)


def ssd_chunk_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, chunk_size: int = 256, D: torch.Tensor | None = None,
                   dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                   dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                   return_final_states: bool = False, z: torch.Tensor | None = None, seq_idx: Any = None,
                   **kwargs: Any) -> Any:
    """``mamba2_chunk_scan``: x (b, T, h, p), dt (b, T, h), A (h,), B/C (b, T, groups, n) as one op."""
    if z is not None or seq_idx is not None:
        raise NotImplementedError("lrexport's Mamba-2 patch exports the scan without a fused z gate or seq_idx")
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = hidden_states.float()
    heads, groups = x.shape[2], B.shape[2]
    k = B.float().repeat_interleave(heads // groups, dim=2) * dt.unsqueeze(-1)  # (b, T, h, n)
    state = None if initial_states is None else initial_states.float().transpose(-1, -2)  # (b, h, n, p)
    out, final = linear_attention(C.float(), k, x, g=dt * A.float(), initial_state=state, rule="gated", scale=1.0)
    if D is not None:
        out = out + D.float()[:, None] * x
    if return_final_states:
        return out, final.transpose(-1, -2)
    return out


_find, _find_reference = swap_finders(_TORCH, (), ssd_chunk_scan)


PATCHES = [
    Patch("transformers", "Mamba-2 SSD (mamba2_chunk_scan, chunks padded with Python ints)",
          "lrexport linear_attention gated", _find, lambda: True, reference=_find_reference),
]
