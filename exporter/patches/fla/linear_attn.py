"""flash-linear-attention / fla-core (0.6.0): torch forms of the Triton ops ``fla.layers.LinearAttention`` uses.

Every forward of an fla layer runs Triton kernels, which need a GPU (on CPU: ``RuntimeError: 0 active
drivers``) and which torch.export cannot trace. ``fla.layers.linear_attn`` imports its three ops by name
(``chunk_linear_attn``, ``fused_chunk_linear_attn``, ``fused_recurrent_linear_attn``); all three compute
``o_i = scale * sum_{j<=i} (q_i . k_j) v_j`` (layout ``[B, T, H, D]``), divided with ``normalize`` by
``scale * q_i . sum_{j<=i} k_j + 1e-10``. Swapped there for the cumsum form (the causal-chunk pass chunks it),
and every ``fla.modules.RMSNorm`` of the model gets a torch forward (``F.rms_norm``). ``elu_p1`` already
takes a torch branch on CPU. Gated layers (``GatedLinearAttention``, ``MultiScaleRetention``) decay the
state per position or head, which the chunked rewrite does not support: refused, with that reason.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from exporter.patches import Patch, Swap, instances, loaded_module

_OPS = {"chunk_linear_attn": True, "fused_chunk_linear_attn": True, "fused_recurrent_linear_attn": False}
_GATED = {"fla.layers.gla": "GatedLinearAttention", "fla.layers.multiscale_retention": "MultiScaleRetention"}


def linear_attn_cumsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       initial_state: Any = None, output_final_state: bool = False, normalize: bool = True,
                       cu_seqlens: Any = None, reverse: bool = False) -> tuple[torch.Tensor, None]:
    """fla's linear-attention ops as one running sum over the sequence (float32 sums, output in q's dtype)."""
    if initial_state is not None or output_final_state or cu_seqlens is not None or reverse:
        raise NotImplementedError("lrexport's fla patch exports a whole sequence from zero state: no cache "
                                  "(use_cache / past_key_values), varlen cu_seqlens or reverse scan")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qs, k32, v32 = (q.float() * scale), k.float(), v.float()
    state = torch.einsum("bthd,bthe->bthde", k32, v32).cumsum(dim=1)
    o = torch.einsum("bthd,bthde->bthe", qs, state)
    if normalize:
        z = k32.cumsum(dim=1)
        o = o / (torch.einsum("bthd,bthd->bth", qs, z).unsqueeze(-1) + 1e-10)
    return o.to(q.dtype), None


def _rms_norm_forward(norm: nn.Module):
    """fla's RMSNorm forward (residual, prenorm) with ``F.rms_norm`` in float32 instead of Triton."""
    def forward(x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False) -> Any:
        dtype = x.dtype
        if residual is not None:
            x = x.float() + residual.float() if residual_in_fp32 else x + residual
        out = F.rms_norm(x.float(), (x.shape[-1],), None, norm.eps)
        if norm.weight is not None:
            out = out * norm.weight.float()
        if norm.bias is not None:
            out = out + norm.bias.float()
        return (out.to(dtype), x) if prenorm else out.to(dtype)
    return forward


def _triton_unusable() -> bool:
    """Without a CUDA GPU fla's Triton ops cannot run at all, so the PyTorch reference needs the patch too."""
    return not torch.cuda.is_available()


def _find_ops(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.layers.linear_attn")
    if mod is None or not instances(model, getattr(mod, "LinearAttention", None)):
        return []
    return [Swap(mod, name, functools.partial(linear_attn_cumsum, normalize=norm)) for name, norm in _OPS.items()
            if getattr(mod, name, None) is not None]


def _find_norms(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.modules.norm.layernorm")
    cls = getattr(mod, "RMSNorm", None) if mod is not None else None
    return [Swap(m, "forward", _rms_norm_forward(m)) for _, m in instances(model, cls)]


def refusals(model: nn.Module) -> list[str]:
    """fla layers whose state decays: no patch (the chunked causal rewrite has no decay)."""
    found = []
    for mod_name, cls_name in _GATED.items():
        mod = loaded_module(mod_name)
        for path, _ in instances(model, getattr(mod, cls_name, None) if mod is not None else None):
            found.append(f"fla {cls_name} in module {path!r} has no export patch: its state decays per "
                         "position/head (gated or retention decay), which lrexport's chunked causal rewrite "
                         "does not support, and its Triton kernels cannot be exported")
    return found


PATCHES = [
    Patch("fla-core", "linear_attn ops (chunk/fused_chunk/fused_recurrent, Triton)", "cumsum form", _find_ops,
          _triton_unusable),
    Patch("fla-core", "RMSNorm (Triton)", "F.rms_norm", _find_norms, _triton_unusable),
]
