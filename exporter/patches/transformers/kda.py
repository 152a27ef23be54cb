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

from exporter.patches import Patch
from exporter.patches.transformers.common import swap_finders
from exporter.patches.transformers.gated_delta import gated_delta_rule

_TORCH = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
_FLA = (("fla.ops.kda", "chunk_kda"), ("fla.ops.kda", "fused_recurrent_kda"))


def kimi_delta_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                         cu_seqlens: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_kimi_delta_attention`` (and the recurrent one) as one op: the gated delta rule of
    :func:`gated_delta_rule` with ``g`` per key dim ``(B, T, H, K)``, which the op takes as it is."""
    return gated_delta_rule(query, key, value, g, beta, chunk_size, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, cu_seqlens, **kwargs)


_find, _find_reference = swap_finders(_TORCH, _FLA, kimi_delta_attention)

PATCHES = [
    Patch("transformers", "Kimi delta attention (chunk_kimi_delta_attention / recurrent_kimi_delta_attention, "
          "fla's Triton chunk_kda)", "lrexport linear_attention gated_delta per-key decay", _find, lambda: True,
          reference=_find_reference),
]
