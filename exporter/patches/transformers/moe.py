"""Mixture-of-experts blocks (every experts class decorated by transformers' ``use_experts_implementation``:
Qwen3-Next, Qwen3.5-MoE, Mixtral, ...) -> every expert on every token, weighted by a dense routing matrix.

transformers' default experts implementation, ``grouped_mm``, sorts the tokens by expert and runs
``torch.nn.functional.grouped_mm`` in eager, and inside torch.export its own custom op
``transformers::grouped_mm_fallback`` (a Python loop over data-dependent row ranges), which torch.onnx cannot
translate and a reloaded ``.pt2`` does not know; the ``eager`` implementation loops over the experts a batch
hits (``nonzero``, data-dependent). The dense form is standard ops with static shapes: for each token,
``sum_e r_{t,e} down_e(gate(up_e(x_t)))`` with ``r`` the top-k weights scattered into ``(T, E)`` (zero for the
experts not chosen), which is what every implementation computes. The price: each token runs all ``E``
experts (``E / top_k`` times the expert FLOPs), with a ``(T, E, intermediate)`` intermediate.

The parity reference runs these blocks with transformers' ``batched_mm`` (plain torch, any dtype):
``grouped_mm`` refuses float64 (``Expected mat_a to be Float32, BFloat16 or Float16``), which left the whole
model's reference in float32, and transformers' float32 chunked scans (its gated delta rule, amplified by the
experts) are off by more than the float32 tolerance on a few logits of a tiny Qwen3.5-MoE, where the export
(the native op) is not.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from exporter.patches import Patch, Swap, loaded_module

_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of ``self`` (``use_experts_implementation`` layout) on every token, routed densely."""
    n_tokens, n_experts = hidden_states.shape[0], self.num_experts
    # (T, E): an equality against arange rather than a scatter (TensorRT parses no ScatterElements add)
    chosen = top_k_index.unsqueeze(-1) == torch.arange(n_experts, device=hidden_states.device)  # (T, k, E)
    routing = (chosen.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(1)
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    # weights are (E, out, in), or (E, in, out) when transposed
    proj = torch.einsum("th,eho->teo" if self.is_transposed else "th,eoh->teo", hidden_states, up)
    if up_bias is not None:
        proj = proj + up_bias
    flat = proj.reshape(n_tokens * n_experts, proj.shape[-1])
    flat = self._apply_gate(flat) if self.has_gate else self.act_fn(flat)
    inner = flat.reshape(n_tokens, n_experts, flat.shape[-1])
    if self.has_post_expert_norm:
        out = torch.einsum("tei,eid->ted" if self.is_transposed else "tei,edi->ted", inner, self.down_proj)
        if self.has_bias:
            out = out + self.down_proj_bias
        out = self.post_expert_norm(out)
        return (out * routing.unsqueeze(-1).to(out.dtype)).sum(1).to(hidden_states.dtype)
    weighted = inner * routing.unsqueeze(-1).to(inner.dtype)
    out = torch.einsum("tei,eid->td" if self.is_transposed else "tei,edi->td", weighted, self.down_proj)
    if self.has_bias:
        out = out + routing.to(out.dtype) @ self.down_proj_bias
    return out.to(hidden_states.dtype)


def _experts(model: nn.Module) -> list[nn.Module]:
    """Modules whose class ``use_experts_implementation`` decorated (it sets these flags on each instance)
    and that run another implementation than transformers' plain-torch ``batched_mm``."""
    moe = loaded_module("transformers.integrations.moe")
    if moe is None:
        return []
    batched = getattr(moe, "batched_mm_experts_forward", None)
    interface = getattr(moe, "ALL_EXPERTS_FUNCTIONS", None)
    found = []
    for m in model.modules():
        config = getattr(m, "config", None)
        if not all(hasattr(m, f) for f in _FLAGS) or config is None or m._is_expert_parallel:
            continue
        impl = getattr(config, "_experts_implementation", None)
        if interface is not None and impl in interface and interface[impl] is batched:
            continue
        found.append(m)
    return found


def _find(model: nn.Module) -> list[Swap]:
    return [Swap(m, "forward", functools.partial(dense_experts_forward, m)) for m in _experts(model)]


def _reference(model: nn.Module) -> list[Swap]:
    """The eager (parity reference) form: transformers' own ``batched_mm`` experts, which run in float64."""
    moe = loaded_module("transformers.integrations.moe")
    batched = getattr(moe, "batched_mm_experts_forward", None)
    if batched is None:
        return []
    return [Swap(m, "forward", functools.partial(batched, m)) for m in _experts(model)]


PATCHES = [
    Patch("transformers", "MoE experts (grouped_mm / transformers::grouped_mm_fallback)", "dense routed experts",
          _find, eager=lambda: True, reference=_reference),
]
