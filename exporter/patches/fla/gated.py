"""flash-linear-attention / fla-core (0.6.0): layers whose state decays, on lrexport's linear-attention op.

``GatedLinearAttention`` and ``HGRN2Attention`` run GLA (``S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T``, a
per-key log decay), ``SimpleGatedLinearAttention`` simple GLA (one decay per head and position) and
``MultiScaleRetention`` retention (simple GLA with a fixed decay per head, ``log(1 - 2^(-5-h))``); all
read ``o_t = scale * S_t^T q_t``, which is the op's ``gated`` rule (``linear`` when there is no decay).
Each fla op these layers imported by name (``chunk_gla``, ``fused_recurrent_gla``, ``chunk_simple_gla``,
``chunk_retention``, ...: Triton) is swapped, in the layer's own module, for a function with its signature
that calls :func:`exporter.linear_attention.linear_attention`: layout ``[B, T, H, D]`` as fla's, ``scale``
defaulting to ``1/sqrt(K)``, ``initial_state`` in and the final state out in fla's layout (``[N, H, K, V]``,
``[N, H, V, K]`` with ``state_v_first``), so a cache made by one call feeds the next. Varlen
(``cu_seqlens``) and reverse scans are not supported (an error says so). The Triton activations, norms and
rotary embeddings on these layers' paths get torch forms from :mod:`exporter.patches.fla.modules`.

fla's layers pick a kernel by length (``fused_recurrent`` up to 64 tokens, their ``mode`` above), a Python
comparison with the sequence length that torch.export would record as a guard and narrow the dynamic range
by. Every kernel computes the same function and every one is swapped for the same op, so the comparison
decides nothing: that comparison, made in the layer's own forward, is answered without a guard
(:func:`_mode_blind_forward`). A layer called with an ``attention_mask`` (fla then unpads the batch into
varlen sequences) is refused, naming it.

Refused by name: ``RWKV7Attention`` (its generalized delta rule is none of the op's rules).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap, instances, loaded_module
from exporter.patches.fla import modules as fla_modules

# the layers patched here: (module, class)
_LAYERS = (("fla.layers.gla", "GatedLinearAttention"), ("fla.layers.hgrn2", "HGRN2Attention"),
           ("fla.layers.simple_gla", "SimpleGatedLinearAttention"),
           ("fla.layers.multiscale_retention", "MultiScaleRetention"))
_REFUSED = {
    ("fla.layers.rwkv7", "RWKV7Attention"): "its generalized delta rule (S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + "
    "v_t k_t^T, with a and b independent vectors) is none of the linear-attention op's rules (linear, gated, "
    "delta, gated_delta)",
}


def _unsupported(cu_seqlens: Any, reverse: bool = False) -> None:
    if cu_seqlens is not None or reverse:
        raise NotImplementedError("lrexport's fla patch runs equal-length sequences forward: no varlen "
                                  "cu_seqlens, no reverse scan")


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, scale: float | None,
         initial_state: torch.Tensor | None, output_final_state: bool,
         state_v_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op on fla's layout; the state in and out in fla's (``[N,H,K,V]``, ``[N,H,V,K]`` if v first)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    h0 = None
    if initial_state is not None:
        h0 = initial_state.transpose(-1, -2) if state_v_first else initial_state
        h0 = h0.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    o, ht = linear_attention(q, k, v, g=g, initial_state=h0, rule="linear" if g is None else "gated",
                             scale=float(scale))
    if not output_final_state:
        return o.to(v.dtype), None
    return o.to(v.dtype), ht.transpose(-1, -2) if state_v_first else ht


def _state_layout(state_v_first: bool, kwargs: dict) -> bool:
    """fla's deprecated alias ``transpose_state_layout`` for ``state_v_first``."""
    return bool(kwargs.pop("transpose_state_layout", state_v_first))


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    _unsupported(cu_seqlens)
    return _run(q, k, v, g, scale, initial_state, output_final_state, state_v_first)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
    _unsupported(cu_seqlens, reverse)
    if gv is not None:
        raise NotImplementedError("lrexport's fla patch has no value-side decay (gv)")
    return _run(q, k, v, gk, scale, initial_state, output_final_state, _state_layout(state_v_first, kwargs))


def _head_decay(q: torch.Tensor, g: torch.Tensor | None, g_gamma: torch.Tensor | None) -> torch.Tensor | None:
    """simple GLA's decay as the op's per-head ``g`` (B, T, H): ``g`` itself, or ``g_gamma`` (H,) at every
    position."""
    if g is not None:
        return g
    if g_gamma is None:
        return None
    return g_gamma.float().reshape(1, 1, -1).expand(q.shape[0], q.shape[1], -1)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    _unsupported(cu_seqlens)
    return _run(q, k, v, _head_decay(q, g, g_gamma), scale, initial_state, output_final_state, state_v_first)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
                               **kwargs):
    _unsupported(cu_seqlens, reverse)
    return _run(q, k, v, _head_decay(q, g, g_gamma), scale, initial_state, output_final_state,
                _state_layout(state_v_first, kwargs))


def fused_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None):
    _unsupported(cu_seqlens)
    return _run(q, k, v, _head_decay(q, g, g_gamma), scale, initial_state, output_final_state, False)


def parallel_simple_gla(q, k, v, g=None, scale=None, output_attentions=False, cu_seqlens=None,
                        cu_seqlens_cpu=None):
    """(o, the decayed causal scores ``[B, H, T, T]`` when ``output_attentions``)."""
    _unsupported(cu_seqlens)
    o, _ = _run(q, k, v, g, scale, None, False, False)
    if not output_attentions:
        return o, None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        c = g.float().cumsum(1).transpose(1, 2)  # (B, H, T)
        a = a * torch.exp((c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")))
    return o, a.masked_fill(~causal, 0.0)


def _retention_decay(q: torch.Tensor) -> torch.Tensor:
    """RetNet's fixed decay per head, log(1 - 2^(-5-h)), as fla's retention ops compute it."""
    return (1 - 2.0 ** (-5.0 - torch.arange(q.shape[2], dtype=torch.float, device=q.device))).log()


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    _unsupported(cu_seqlens)
    return _run(q, k, v, _head_decay(q, None, _retention_decay(q)), scale, initial_state, output_final_state,
                False)


def fused_chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    return chunk_retention(q, k, v, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None, **kwargs):
    _unsupported(cu_seqlens, reverse)
    return _run(q, k, v, _head_decay(q, None, _retention_decay(q)), scale, initial_state, output_final_state,
                _state_layout(state_v_first, kwargs))


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    return parallel_simple_gla(q, k, v, _head_decay(q, None, _retention_decay(q)), scale, output_attentions,
                               cu_seqlens)


# fla's ops module -> {function name: its torch form}
_OPS: dict[str, dict[str, Callable[..., Any]]] = {
    "fla.ops.gla": {"chunk_gla": chunk_gla, "fused_recurrent_gla": fused_recurrent_gla},
    "fla.ops.simple_gla": {"chunk_simple_gla": chunk_simple_gla,
                           "fused_recurrent_simple_gla": fused_recurrent_simple_gla,
                           "fused_chunk_simple_gla": fused_chunk_simple_gla,
                           "parallel_simple_gla": parallel_simple_gla},
    "fla.ops.retention": {"chunk_retention": chunk_retention, "fused_chunk_retention": fused_chunk_retention,
                          "fused_recurrent_retention": fused_recurrent_retention,
                          "parallel_retention": parallel_retention},
}


def _op_table() -> dict[int, tuple[str, Callable[..., Any]]]:
    """id of each fla op function the process loaded -> (name, its replacement)."""
    table = {}
    for mod_name, forms in _OPS.items():
        mod = loaded_module(mod_name)
        for name, form in forms.items():
            fn = getattr(mod, name, None) if mod is not None else None
            if fn is not None:
                table[id(fn)] = (name, form)
    return table


def _classes(pairs) -> list[type]:
    found = []
    for mod_name, cls_name in pairs:
        mod = loaded_module(mod_name)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        if cls is not None:
            found.append(cls)
    return found


def _layers(model: nn.Module) -> list[nn.Module]:
    classes = tuple(_classes(_LAYERS))
    return [m for m in model.modules() if classes and isinstance(m, classes)]


def _mode_blind_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward, its kernel choice by length made without a guard
    (:func:`exporter.patches.fla.modules.own_frame_unguarded`): ``_find`` swaps every kernel the layer can
    choose for the same op. Bound to the instance (a deep copy of the model, e.g. parity's float64 reference,
    rebinds it to the copy)."""
    forward = type(layer).forward
    call = inspect.signature(forward).bind(layer, *args, **kwargs).arguments
    given = [n for n in ("attention_mask", "cu_seqlens") if call.get(n, (call.get("kwargs") or {}).get(n)) is not None]
    if given:
        raise LrexportError(
            f"fla {type(layer).__name__} is called with {given[0]}: fla then unpads the batch into variable-length "
            "sequences (cu_seqlens), which lrexport's linear-attention op cannot run (one state per batch row, "
            "from its first position)",
            "call the layer without it for export (the recurrence is causal: right-padded rows need no mask), or "
            "export with --no-patches to see fla's own error")
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    with fla_modules.own_frame_unguarded(forward.__code__, tensors):
        return forward(layer, *args, **kwargs)


def _find(model: nn.Module) -> list[Swap]:
    """For each layer: the fla functions its module imported and it stored on itself (ops, activations, norms:
    by identity) -> their torch forms, and its forward -> :func:`_mode_blind_forward`."""
    layers = _layers(model)
    if not layers:
        return []
    table = {**_op_table(), **fla_modules.torch_functions()}
    swaps: dict[tuple[int, str], Swap] = {}
    for layer in layers:
        for s in fla_modules.function_swaps(layer, table):
            swaps.setdefault((id(s.owner), s.name), s)
        swaps[(id(layer), "forward")] = Swap(layer, "forward", types.MethodType(_mode_blind_forward, layer))
    return list(swaps.values())


def refusals(model: nn.Module) -> list[str]:
    found = []
    for (mod_name, cls_name), reason in _REFUSED.items():
        for path, _ in instances(model, next(iter(_classes([(mod_name, cls_name)])), None)):
            found.append(f"fla {cls_name} in module {path!r} has no export patch: {reason}")
    return found


PATCHES = [
    Patch("fla-core", "gla / simple_gla / retention ops and activations (Triton)", "lrexport linear_attention op", _find,
          fla_modules.triton_unusable),
]
