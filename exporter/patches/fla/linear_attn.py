"""flash-linear-attention / fla-core (0.6.0): torch forms of the Triton ops ``fla.layers.LinearAttention`` uses.

Every forward of an fla layer runs Triton kernels, which need a GPU (on CPU: ``RuntimeError: 0 active
drivers``) and which torch.export cannot trace. ``fla.layers.linear_attn`` imports its three ops by name
(``chunk_linear_attn``, ``fused_chunk_linear_attn``, ``fused_recurrent_linear_attn``); all three compute
``o_i = scale * sum_{j<=i} (q_i . k_j) v_j`` (layout ``[B, T, H, D]``), divided with ``normalize`` by
``scale * q_i . sum_{j<=i} k_j + 1e-10``. Swapped there for lrexport's linear-attention op (rule ``linear``,
its ``normalize`` with ``eps=1e-10``), and every ``fla.modules.RMSNorm`` of the model gets a torch forward
(``F.rms_norm``). ``elu_p1`` already takes a torch branch on CPU. The recurrent state goes in and out in fla's
form: ``[B, H, K, V]``, and with ``normalize`` the pair ``(kv_state, z_state [B, 1, H, K])``.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap, instances, loaded_module
from exporter.patches.fla.modules import rms_norm, triton_unusable

_OPS = {"chunk_linear_attn": True, "fused_chunk_linear_attn": True, "fused_recurrent_linear_attn": False}


def fla_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    initial_state: Any = None, output_final_state: bool = False, normalize: bool = True,
                    cu_seqlens: Any = None, reverse: bool = False) -> tuple[torch.Tensor, Any]:
    """fla's linear-attention ops on the op; returns what fla's do: ``(o, state)``, with ``normalize``
    ``(o, (state or None, z_state))``."""
    if cu_seqlens is not None or reverse:
        raise NotImplementedError("lrexport's fla patch runs equal-length sequences forward: no varlen "
                                  "cu_seqlens, no reverse scan")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv0, z0 = initial_state if normalize and isinstance(initial_state, tuple) else (initial_state, None)
    h0 = None
    if kv0 is not None or z0 is not None:
        b, h, dk, dv = q.shape[0], k.shape[2], k.shape[3], v.shape[3]
        kv0 = kv0.float() if kv0 is not None else q.new_zeros(b, h, dk, dv, dtype=torch.float32)
        if normalize:
            z = z0.float().reshape(b, h, dk, 1) if z0 is not None else kv0.new_zeros(b, h, dk, 1)
            kv0 = torch.cat([kv0, z], dim=-1)
        h0 = kv0
    o, ht = linear_attention(q, k, v, initial_state=h0, rule="linear", scale=float(scale), normalize=normalize,
                             eps=1e-10 if normalize else 0.0)
    o = o.to(v.dtype)
    if not normalize:
        return o, ht if output_final_state else None
    z_state = ht[..., -1].unsqueeze(1).to(k.dtype)  # (B, 1, H, K)
    return o, (ht[..., :-1] if output_final_state else None, z_state)


def _rms_norm_forward(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                     prenorm: bool = False, residual_in_fp32: bool = False) -> Any:
    """fla's RMSNorm forward (residual, prenorm) with ``F.rms_norm`` in float32 (float64 stays) instead of
    Triton; bound to the instance, so a deep copy of the model (parity's float64 reference) uses its own."""
    dtype = x.dtype
    out, x = rms_norm(x, norm.weight, norm.bias, norm.eps, residual, residual_in_fp32)
    return (out.to(dtype), x) if prenorm else out.to(dtype)


def _find_ops(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.layers.linear_attn")
    if mod is None or not instances(model, getattr(mod, "LinearAttention", None)):
        return []
    return [Swap(mod, name, functools.partial(fla_linear_attn, normalize=norm)) for name, norm in _OPS.items()
            if getattr(mod, name, None) is not None]


def _find_norms(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.modules.norm.layernorm")
    cls = getattr(mod, "RMSNorm", None) if mod is not None else None
    return [Swap(m, "forward", types.MethodType(_rms_norm_forward, m)) for _, m in instances(model, cls)]


PATCHES = [
    Patch("fla-core", "linear_attn ops (chunk/fused_chunk/fused_recurrent, Triton)", "lrexport linear_attention op", _find_ops,
          triton_unusable),
    Patch("fla-core", "RMSNorm (Triton)", "F.rms_norm", _find_norms, triton_unusable),
]
