"""RecurrentGemma's RG-LRU scan (transformers' ``RecurrentGemmaRglru._rnn_scan``) as the linear-attention op.

transformers runs the diagonal recurrence ``h_t = a_t * h_{t-1} + x_t`` (per channel; ``a_t`` zeroed where the
position id is 0, the document start) as a Python loop over positions, and branches on ``T == 1``: torch.export
pins the sequence to the example's length. Per channel it is the op's ``gated`` rule with a 1 x 1 state: one
state head per channel, ``q = k = 1``, ``v = x``, ``g = log a_t``. A reset is a decay of exp(-30) (1e-13),
not an exact zero: the chunked forms subtract cumulative log decays, which must stay finite. The method is
found on the model's modules by its signature and swapped only during export; transformers' loop is the
reference for parity.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap
from exporter.patches.transformers.common import MODELS, takes_params

_NAME = "_rnn_scan"
_PARAMS = ("self", "hidden_states", "recurrent_gate", "reset", "recurrent_states")
RESET_LOG_DECAY = -30.0


def rnn_scan_op(self: Any, hidden_states: torch.Tensor, recurrent_gate: torch.Tensor, reset: torch.Tensor,
                recurrent_states: torch.Tensor | None, acc_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rnn_scan`` (``hidden_states, recurrent_gate: (B, T, W)``, ``reset: (B, T, 1)``, state ``(B, W)``)
    through ``lrexport::linear_attention``; returns ``(outputs in the input dtype, final state)``."""
    log_a = torch.log(recurrent_gate.float()).clamp(min=RESET_LOG_DECAY)
    g = torch.where(reset, torch.full_like(log_a, RESET_LOG_DECAY), log_a)
    v = hidden_states.float().unsqueeze(-1)  # (B, T, W, 1)
    ones = torch.ones_like(v[:, :, :1])  # q = k = 1: (B, T, 1, 1)
    s0 = None if recurrent_states is None else recurrent_states.float()[:, :, None, None]
    out, state = linear_attention(ones, ones, v, g=g, initial_state=s0, rule="gated", scale=1.0)
    return out.squeeze(-1).to(hidden_states.dtype), state[..., 0, 0].to(acc_dtype)


def _find(model: nn.Module) -> list[Swap]:
    return [Swap(m, _NAME, types.MethodType(rnn_scan_op, m)) for m in model.modules()
            if type(m).__module__.startswith(MODELS) and takes_params(getattr(type(m), _NAME, None), _PARAMS)]


PATCHES = [Patch("transformers", "RG-LRU _rnn_scan (a Python loop over positions: RecurrentGemma)",
                 "linear-attention op (gated, per channel)", _find)]
