"""flash-linear-attention / fla-core (0.6.0): torch forms of the Triton building blocks fla's layers share.

Norms (``FusedRMSNormGated``, ``rms_norm_linear``), rotary embeddings and the Triton activations of
``fla.modules.activations`` (``swish``, ``sigmoid``, ``logsigmoid``: what ``ACT2FN`` hands a layer) have no
CPU path and cannot be traced. Each torch form computes what the kernel computes (float32 statistics, output
in the input's dtype) with the kernel's signature. They are found by identity: instances of fla's classes,
and functions that *are* fla's (a layer's module globals, attributes a layer stored, e.g. ``feature_map_fn``).
``RMSNorm`` itself is patched with ``LinearAttention`` (``linear_attn.py``).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from exporter.patches import Patch, Swap, instances, loaded_module


def up(x: torch.Tensor) -> torch.Tensor:
    """x in float32 for the statistics, as fla's kernels compute them; float64 stays (parity's reference)."""
    return x if x.dtype == torch.float64 else x.float()


def triton_unusable() -> bool:
    """Without a CUDA GPU fla's Triton code cannot run at all, so the PyTorch reference needs the patch too."""
    return not torch.cuda.is_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None, residual_in_fp32: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's RMSNorm with its residual: ``(rms_norm(x + residual) * weight + bias`` in float32 (float64 stays),
    ``x + residual``) -- the second is what fla's norms return with ``prenorm``."""
    if residual is not None:
        x = up(x) + up(residual) if residual_in_fp32 else x + residual
    y = F.rms_norm(up(x), (x.shape[-1],), None, eps)
    if weight is not None:
        y = y * up(weight)
    if bias is not None:
        y = y + up(bias)
    return y, x


def rms_norm_gated(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   activation: str = "swish", residual: torch.Tensor | None = None, prenorm: bool = False,
                   residual_in_fp32: bool = False, eps: float = 1e-6) -> Any:
    """``fla.modules.fused_norm_gate.rms_norm_gated``: RMSNorm of x (plus residual), times the gate
    ``g * sigmoid(g)`` (swish/silu) or ``sigmoid(g)``."""
    dtype = x.dtype
    y, x = rms_norm(x, weight, bias, eps, residual, residual_in_fp32)
    gf = up(g)
    y = y * (F.silu(gf) if activation in ("swish", "silu") else torch.sigmoid(gf))
    return (y.to(dtype), x) if prenorm else y.to(dtype)


def _fused_rms_norm_gated_forward(norm: nn.Module, x: torch.Tensor, g: torch.Tensor,
                                  residual: torch.Tensor | None = None, prenorm: bool = False,
                                  residual_in_fp32: bool = False) -> Any:
    """``FusedRMSNormGated.forward``; bound to the instance (a bound method: a deep copy of the model, e.g.
    parity's float64 reference, rebinds it to the copy's weights)."""
    return rms_norm_gated(x, g, norm.weight, norm.bias, norm.activation, residual, prenorm, residual_in_fp32,
                          norm.eps)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                    linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
                    residual: torch.Tensor | None = None, eps: float = 1e-5, prenorm: bool = False,
                    residual_in_fp32: bool = False) -> Any:
    """``fla.modules.layernorm.rms_norm_linear``: RMSNorm (float32 statistics), then ``F.linear``."""
    y, x = rms_norm(x, norm_weight, norm_bias, eps, residual, residual_in_fp32)
    out = F.linear(y.to(linear_weight.dtype), linear_weight, linear_bias)
    return (out, x) if prenorm else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    r = cos.shape[-1] * 2
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    xr = x[..., :r]
    if interleaved:
        x1, x2 = xr[..., ::2], xr[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((y, x[..., r:]), dim=-1) if r < x.shape[-1] else y


def _rotary_forward(rot: nn.Module, q: torch.Tensor, k: torch.Tensor, seqlen_offset: int | torch.Tensor = 0,
                    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                    chunk_indices: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``RotaryEmbedding.forward`` without its cos/sin cache, which is resized by a Python comparison with the
    sequence length (a guard on it when exported): the table is computed for the positions at hand,
    ``seqlen_offset .. seqlen_offset + T``, as the cache holds them (positions in float32, cos/sin in q's
    dtype). Bound to the instance like the norms."""
    if cu_seqlens is not None or not isinstance(seqlen_offset, int):
        raise NotImplementedError("lrexport's fla rotary patch takes one shared integer seqlen_offset "
                                  "(no varlen cu_seqlens or per-sequence offsets)")
    inv_freq = rot.inv_freq.float() if rot.pos_idx_in_fp32 else rot.inv_freq
    t = torch.arange(q.shape[1], device=q.device, dtype=inv_freq.dtype) + seqlen_offset
    freqs = torch.outer(t, inv_freq)
    cos, sin = torch.cos(freqs).to(q.dtype), torch.sin(freqs).to(q.dtype)
    return _rotate(q, cos, sin, rot.interleaved), _rotate(k, cos, sin, rot.interleaved)


def _logsigmoid(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.logsigmoid(x) / temperature


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def torch_functions() -> dict[int, tuple[str, Callable[..., Any]]]:
    """id of each fla Triton function with a torch form here -> (its name, the torch form)."""
    table: dict[int, tuple[str, Callable[..., Any]]] = {}
    act = loaded_module("fla.modules.activations.ops")
    for name, form in (("swish", _silu), ("sigmoid", _sigmoid), ("logsigmoid", _logsigmoid)):
        fn = getattr(act, name, None) if act is not None else None
        if fn is not None:
            table[id(fn)] = (name, form)
    ln = loaded_module("fla.modules.norm.layernorm")
    if ln is not None and getattr(ln, "rms_norm_linear", None) is not None:
        table[id(ln.rms_norm_linear)] = ("rms_norm_linear", rms_norm_linear)
    fng = loaded_module("fla.modules.norm.fused_norm_gate")
    if fng is not None and getattr(fng, "rms_norm_gated", None) is not None:
        table[id(fng.rms_norm_gated)] = ("rms_norm_gated", rms_norm_gated)
    return table


def function_swaps(layer: nn.Module, table: dict[int, tuple[str, Callable[..., Any]]]) -> list[Swap]:
    """Swaps for the functions in ``table`` that ``layer`` reaches: globals of the module its class is defined
    in (what it imported by name) and attributes it stored on itself (``ACT2FN[...]`` entries)."""
    swaps = []
    mod = sys.modules.get(type(layer).__module__)
    if mod is not None:
        swaps += [Swap(mod, name, table[id(val)][1]) for name, val in vars(mod).items() if id(val) in table]
    swaps += [Swap(layer, name, table[id(val)][1]) for name, val in vars(layer).items()
              if not name.startswith("_") and id(val) in table]
    return swaps


def _in_torch(frame: Any) -> bool:
    name = str(frame.f_globals.get("__name__", ""))
    return name in ("torch", "sympy") or name.startswith(("torch.", "sympy."))


@contextlib.contextmanager
def own_frame_unguarded(code: Any, tensors: list[torch.Tensor]) -> Iterator[None]:
    """While torch traces with symbolic sizes: a size comparison made directly in the frame running ``code``
    (the first caller outside torch) is answered by its example value without recording a guard; every guard
    raised in a function it calls (einops, torch, the op) stays. For fla's layers, which choose a kernel by
    length (``mode = 'fused_recurrent' if q_len <= 64 else self.mode``) among kernels the patches make one and
    the same op: the answer cannot change the graph, and the guard would pin the exported range to one side
    of 64."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(tensors) if tensors else None
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        yield
        return
    evaluate = shape_env.evaluate_expr

    def evaluate_expr(*a: Any, **k: Any) -> Any:
        frame: Any = sys._getframe(1)
        while frame is not None and _in_torch(frame):
            frame = frame.f_back
        if frame is not None and frame.f_code is code:
            with shape_env.suppress_guards():
                return evaluate(*a, **k)
        return evaluate(*a, **k)

    before = shape_env.__dict__.get("evaluate_expr")  # another layer's, when one forward calls another
    shape_env.evaluate_expr = evaluate_expr
    try:
        yield
    finally:
        if before is None:
            del shape_env.evaluate_expr
        else:
            shape_env.evaluate_expr = before


def _find_fused_norms(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.modules.norm.fused_norm_gate")
    cls = getattr(mod, "FusedRMSNormGated", None) if mod is not None else None
    return [Swap(m, "forward", types.MethodType(_fused_rms_norm_gated_forward, m)) for _, m in instances(model, cls)]


def _find_rotary(model: nn.Module) -> list[Swap]:
    mod = loaded_module("fla.modules.rotary.ops")
    cls = getattr(mod, "RotaryEmbedding", None) if mod is not None else None
    return [Swap(m, "forward", types.MethodType(_rotary_forward, m)) for _, m in instances(model, cls) if m.scale_base is None]


def refusals(model: nn.Module) -> list[str]:
    """XPos rotary (``scale_base``) scales by the cached table's length, not by position: no torch form."""
    mod = loaded_module("fla.modules.rotary.ops")
    cls = getattr(mod, "RotaryEmbedding", None) if mod is not None else None
    return [f"fla RotaryEmbedding in module {path!r} has no export patch: its XPos scaling (scale_base) depends "
            "on the length of its cached table, not on the position" for path, m in instances(model, cls)
            if m.scale_base is not None]


PATCHES = [
    Patch("fla-core", "FusedRMSNormGated (Triton)", "torch RMSNorm * gate", _find_fused_norms, triton_unusable),
    Patch("fla-core", "RotaryEmbedding (Triton)", "torch rotation", _find_rotary, triton_unusable),
]
