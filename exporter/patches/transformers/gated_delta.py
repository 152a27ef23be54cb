"""Gated DeltaNet (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-hybrid, and every modeling module that defines
``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``) -> ``lrexport::linear_attention``
with rule ``gated_delta``.

transformers' torch code loops over chunks of 64 in Python (torch.export unrolls it, pinning the sequence to a
multiple of the chunk, and the in-export branch replaces the triangular solve by a 63-step forward
substitution: minutes of export), and with fla importable the layer runs fla's Triton kernel instead (no CPU
path). Both compute, per value head, ``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - (e^{g_t} S_{t-1})^T k_t)^T``,
``o_t = S_t^T q_t / sqrt(dk)``, a query/key head serving ``Hv / Hk`` consecutive value heads, with q and k
L2-normalised first (``x * rsqrt(sum x^2 + 1e-6)``) when ``use_qk_l2norm_in_kernel``: exactly the op's
``gated_delta`` rule with ``scale = dk ** -0.5`` (the op repeats k's heads to v's the same way).

The parity reference runs transformers' own torch code (``__wrapped__`` under the kernel dispatch), never
fla's Triton kernel and never lrexport's op.
"""

from __future__ import annotations

from typing import Any

import torch
from exporter.linear_attention import linear_attention
from exporter.patches import Patch
from exporter.patches.transformers.common import swap_finders

_TORCH = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
_FLA = (("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
        ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"))


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """transformers' (and fla's) ``l2norm``, in float32."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                     cu_seqlens: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch_chunk_gated_delta_rule`` (and the recurrent one: same arguments but ``chunk_size``) as one op."""
    if cu_seqlens is not None:
        raise NotImplementedError("lrexport's gated-delta patch exports unpacked sequences only (no cu_seqlens)")
    dtype = query.dtype
    if use_qk_l2norm_in_kernel:
        query, key = _l2norm(query), _l2norm(key)
    query, key, value = query.float(), key.float(), value.float()
    state = None if initial_state is None else initial_state.float()
    out, final = linear_attention(query, key, value, g=g.float(), beta=beta.float(), initial_state=state,
                                  rule="gated_delta", scale=query.shape[-1] ** -0.5)
    return out.to(dtype), (final if output_final_state else None)


_find, _find_reference = swap_finders(_TORCH, _FLA, gated_delta_rule)


PATCHES = [
    Patch("transformers", "gated delta rule (torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule, "
          "fla's Triton kernels)", "lrexport linear_attention gated_delta", _find, lambda: True,
          reference=_find_reference),
]
