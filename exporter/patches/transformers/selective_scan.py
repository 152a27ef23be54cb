"""Mamba-1's selective scan (transformers' ``mamba_selective_scan``: Mamba, FalconMamba, Jamba, Zamba) as the
linear-attention op.

transformers' torch path runs the scan as a Python loop over positions: torch.export unrolls it, so the
sequence is pinned to the example's length (and the graph grows with it). The recurrence, per channel ``c``
of the inner width and state index ``n``, is

    h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] B_t[n] u_t[c],    y_t[c] = sum_n C_t[n] h_t[c, n]

which is the op's ``gated`` rule with a per-key decay: one state head per channel (key dim = the state size,
value dim 1), ``k = B_t`` and ``q = C_t`` shared by every head (one k / q head serving all), ``v = dt_t u_t``,
``g = dt_t A`` (<= 0: A < 0, dt > 0 after softplus). ``D`` skip and the ``silu(z)`` gate stay as written. The
function is found in each modeling module of the model's own classes that defines it (four identical copies
in transformers 5.23), by its signature, and swapped only during export: transformers' loop is the
reference for parity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap
from exporter.patches.transformers.common import model_modules, takes_params

_NAME = "mamba_selective_scan"
_PARAMS = ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")


def selective_scan_op(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, use_mambapy: bool = False,
                      use_associative_scan: bool = False, **kwargs: Any) -> Any:
    """``mamba_selective_scan`` (layouts ``u, dt, z: (B, Di, T)``, ``A: (Di, N)``, ``B, C: (B, N, T)``) through
    ``lrexport::linear_attention``; returns what it returns (with ``return_last_state``, the state
    ``(B, Di, N)``)."""
    dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.float().transpose(1, 2)  # (B, T, Di)
    u = hidden_states.float().transpose(1, 2)  # (B, T, Di)
    q = C.float().transpose(1, 2).unsqueeze(2)  # (B, T, 1, N)
    k = B.float().transpose(1, 2).unsqueeze(2)
    v = (dt * u).unsqueeze(-1)  # (B, T, Di, 1)
    g = dt.unsqueeze(-1) * A.float()  # (B, T, Di, N)
    out, state = linear_attention(q, k, v, g=g, rule="gated", scale=1.0)
    y = out.squeeze(-1).transpose(1, 2)  # (B, Di, T)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    y = y.to(dtype)
    return (y, state.squeeze(-1).to(dtype)) if return_last_state else y


def _find(model: nn.Module) -> list[Swap]:
    """The model's own modeling modules that define a selective scan with transformers' signature."""
    return [Swap(mod, _NAME, selective_scan_op) for mod in model_modules(model)
            if takes_params(getattr(mod, _NAME, None), _PARAMS)]


PATCHES = [Patch("transformers", "mamba_selective_scan (a Python loop over positions: Mamba, FalconMamba, Jamba, "
                 "Zamba)", "linear-attention op (gated, per-key decay)", _find)]
