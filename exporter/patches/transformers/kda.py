"""Kimi Delta Attention (``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention`` of Kimi-Linear,
Bailing-hybrid, and every modeling module that defines them) -> ``lrexport::linear_attention`` with rule
``gated_delta`` and a decay per key dim.

transformers' torch code loops over chunks of 64 in Python and builds the chunk's inverse with a 63-step
forward substitution (torch.export unrolls both, pinning the sequence); with fla importable the layer runs
fla's Triton ``chunk_kda`` (no CPU path). Both compute the gated delta rule with ``D_t = diag(exp(g_t))``,
``g`` of shape (B, T, H, dk), q and k L2-normalised first when ``use_qk_l2norm_in_kernel``
(``x / sqrt(sum x^2 + 1e-6)``), ``o_t = S_t^T q_t / sqrt(dk)``: the op's rule with a per-key ``g``.

The parity reference runs transformers' own torch code (``__wrapped__`` under the kernel dispatch).
"""

from __future__ import annotations

from typing import Any

import torch

from exporter.linear_attention import linear_attention
from exporter.patches import Patch
from exporter.patches.transformers.common import swap_finders

_TORCH = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
_FLA = (("fla.ops.kda", "chunk_kda"), ("fla.ops.kda", "fused_recurrent_kda"))


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """Kimi-Linear's ``l2norm`` (fla's form), in float32."""
    x = x.float()
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def kimi_delta_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                         cu_seqlens: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_kimi_delta_attention`` (and the recurrent one) as one op."""
    if cu_seqlens is not None:
        raise NotImplementedError("lrexport's KDA patch exports unpacked sequences only (no cu_seqlens)")
    dtype = query.dtype
    if use_qk_l2norm_in_kernel:
        query, key = _l2norm(query), _l2norm(key)
    query, key, value = query.float(), key.float(), value.float()
    state = None if initial_state is None else initial_state.float()
    out, final = linear_attention(query, key, value, g=g.float(), beta=beta.float(), initial_state=state,
                                  rule="gated_delta", scale=query.shape[-1] ** -0.5)
    return out.to(dtype), (final if output_final_state else None)


_find, _find_reference = swap_finders(_TORCH, _FLA, kimi_delta_attention)

PATCHES = [
    Patch("transformers", "Kimi delta attention (chunk_kimi_delta_attention / recurrent_kimi_delta_attention, "
          "fla's Triton chunk_kda)", "lrexport linear_attention gated_delta per-key decay", _find, lambda: True,
          reference=_find_reference),
]
