"""flash-linear-attention / fla-core (0.6.0): the delta-rule layers ``DeltaNet``, ``GatedDeltaNet`` and
``KimiDeltaAttention`` on lrexport's linear-attention op.

Their forwards call Triton ops that each layer module imported by name (``chunk_delta_rule``,
``fused_recurrent_delta_rule``, ``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``,
``chunk_kda``, ``fused_recurrent_kda``, and ``causal_conv1d`` for GatedDeltaNet's fused q/k/v convolution).
Those names are swapped, in the layer's module, for torch forms with the same signature that do what the
kernels do around the recurrence in plain torch (l2 norm of q and k with eps 1e-6, ``sigmoid(beta)``
(x2 with ``allow_neg_eigval``), the decay ``-exp(A_log) * softplus(g + dt_bias)`` or KDA's
``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``, the ``[V, K]`` state of ``state_v_first``) and
run the recurrence as ONE ``lrexport::linear_attention`` node (rule ``delta`` / ``gated_delta``, decay per
head or per key dim, more value heads than q/k heads): torch.export keeps it a single node with no guard
on the sequence length, which the graph passes then lower. ``initial_state`` goes through the op and the
final state comes back when asked (``use_cache``), so a decoder can carry it.

The layers also run Triton modules: every ``ShortConvolution`` gets a torch forward (a depthwise causal
``conv1d`` over the cache's last W-1 inputs or zeros, activation, residual; with ``output_final_state`` the
last W inputs as the new cache, as fla's step kernel returns it; the cache is not updated in place), every
``L2Norm`` one in float32. fla's ``RMSNorm`` and ``FusedRMSNormGated`` are patched by
:mod:`exporter.patches.fla.linear_attn` and :mod:`exporter.patches.fla.modules`. Instance forwards are bound methods, not
closures over the instance: parity's float64 reference is a deep copy made while the patches are applied,
and a bound method is rebound to the copy (a closure would keep running the float32 original).

The layers pick their op by length (``mode = 'fused_recurrent' if q_len <= 64``), which under torch.export
would guard the sequence length at 64; both ops are the same recurrence, so each layer's forward runs with
that length test answered without a guard (:func:`_unguarded_length`): the only change to the layer's own
code path is which of two equal torch forms it calls.

What the op cannot run is refused: a layer called with ``attention_mask`` (fla unpads the batch into
variable-length sequences) is one ``error:`` line naming the layer; the torch forms raise on ``cu_seqlens``,
a per-value decay ``gv``, a per-value-dim ``beta`` and ``return_intermediate_states``.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from exporter.errors import LrexportError
from exporter.linear_attention import linear_attention
from exporter.patches import Patch, Swap, instances, loaded_module
from exporter.patches.fla.modules import own_frame_unguarded, triton_unusable

_LAYERS = {"fla.layers.delta_net": "DeltaNet", "fla.layers.gated_deltanet": "GatedDeltaNet",
           "fla.layers.kda": "KimiDeltaAttention"}
L2_EPS = 1e-6  # fla's l2norm_fwd and the fused_recurrent kernels' q/k normalization


def _compute(x: torch.Tensor) -> torch.Tensor:
    """float32 math as the kernels do it; float64 (parity's reference) stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """fla's ``l2norm`` / ``use_qk_l2norm_in_kernel``: ``x / sqrt(sum(x^2) + eps)`` over the last dim."""
    xc = _compute(x)
    return (xc * torch.rsqrt((xc * xc).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _unsupported(what: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"lrexport's export patch for fla's {what} cannot run {why}: lrexport's "
                               "linear-attention op runs whole sequences from one state")


def _check_common(name: str, a: dict[str, Any]) -> None:
    if a.get("cu_seqlens") is not None:
        raise _unsupported(name, "variable-length packing (cu_seqlens, also what an attention_mask unpads into)")
    if a.get("cp_context") is not None:
        raise _unsupported(name, "context parallelism (cp_context)")
    if a.get("return_intermediate_states"):
        raise _unsupported(name, "return_intermediate_states")
    if a.get("allow_neg_eigval") and not a.get("use_beta_sigmoid_in_kernel"):  # as fla refuses it
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")


def _beta(beta: torch.Tensor, sigmoid: bool, neg_eigval: bool) -> torch.Tensor:
    if not sigmoid:
        return beta
    return torch.sigmoid(_compute(beta)) * (2.0 if neg_eigval else 1.0)


def gdn_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """GatedDeltaNet's in-kernel decay: ``-exp(A_log) * softplus(g + dt_bias)`` per value head."""
    g = _compute(g)
    if dt_bias is not None:
        g = g + dt_bias.to(g.dtype)
    return -A_log.to(g.dtype).exp() * F.softplus(g)


def kda_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
             lower_bound: float | None) -> torch.Tensor:
    """KDA's in-kernel per-key decay (g: [..., HV, K]): ``-exp(A_log) * softplus(g + dt_bias)``, or with
    ``lower_bound`` ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``A_log`` optional there)."""
    h = g.shape[-2]
    g = _compute(g)
    if dt_bias is not None:
        g = g + dt_bias.to(g.dtype).view(h, -1)
    if lower_bound is None:
        if A_log is None:
            raise NotImplementedError("KDA's decay gate without A_log needs a lower_bound")
        return -A_log.to(g.dtype).view(h, 1).exp() * F.softplus(g)
    if A_log is not None:
        g = A_log.to(g.dtype).view(h, 1).exp() * g
    return lower_bound * torch.sigmoid(g)


def run_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
              scale: float | None, initial_state: torch.Tensor | None, output_final_state: bool,
              l2: bool, state_v_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence on the op: q, k (B,T,H,K), v (B,T,HV,V), g log decay (B,T,HV[,K]) or None, beta
    (B,T,HV); state (N,HV,K,V), or (N,HV,V,K) with ``state_v_first``. Output in v's dtype."""
    if beta.dim() != 3:
        raise _unsupported("delta rule", f"a beta of shape {tuple(beta.shape)} (one beta per value dim)")
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    if l2:
        q, k = l2norm(q), l2norm(k)
    h0 = initial_state
    if h0 is not None:
        h0 = _compute(h0.transpose(-1, -2) if state_v_first else h0)
    out_dtype = v.dtype
    dt = torch.promote_types(_compute(q).dtype, v.dtype)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    if h0 is not None:
        h0 = h0.to(dt)
    rule = "delta" if g is None else "gated_delta"
    o, state = linear_attention(q, k, v, g=None if g is None else g.to(dt), beta=beta, initial_state=h0,
                                rule=rule, scale=scale)
    o = o.to(out_dtype)
    if not output_final_state:
        return o, None
    return o, (state.transpose(-1, -2) if state_v_first else state).contiguous()


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The library function's own arguments, by name, with its defaults and its ``**kwargs`` merged in."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}) or {})
    return named


def _like(fn: Callable) -> Callable[[Callable[[dict], Any]], Callable]:
    """A torch form with ``fn``'s signature: it binds the call as ``fn`` would and gets the arguments by name."""
    def wrap(body: Callable[[dict], Any]) -> Callable:
        @functools.wraps(fn)
        def form(*args: Any, **kwargs: Any) -> Any:
            return body(_bind(fn, args, kwargs))
        return form
    return wrap


def delta_rule_form(fn: Callable) -> Callable:
    """``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` (beta None: ones, as fused_recurrent does)."""
    def body(a: dict) -> Any:
        _check_common(fn.__name__, a)
        q, k, v, beta = a["q"], a["k"], a["v"], a["beta"]
        if beta is None:
            beta = torch.ones_like(q[..., 0])
        return run_delta(q, k, v, None, beta, a["scale"], a["initial_state"], a["output_final_state"],
                         a["use_qk_l2norm_in_kernel"], False)
    return _like(fn)(body)


def gated_delta_rule_form(fn: Callable) -> Callable:
    """``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule``: g (B,T,HV) log decay, or the raw
    gate with ``use_gate_in_kernel``; ``gk`` (B,T,HV,K) adds a per-key decay; ``gv`` is refused."""
    def body(a: dict) -> Any:
        _check_common(fn.__name__, a)
        if a.get("gv") is not None:
            raise _unsupported(fn.__name__, "a per-value-dim decay gv")
        g = a.get("g")
        if g is not None and a.get("use_gate_in_kernel"):
            g = gdn_gate(g, a["A_log"], a.get("dt_bias"))
        if a.get("gk") is not None:
            g = a["gk"] if g is None else g.unsqueeze(-1) + a["gk"]
        beta = a["beta"]
        if beta is None:
            beta = torch.ones_like(a["v"][..., 0])
        beta = _beta(beta, a.get("use_beta_sigmoid_in_kernel", False), a.get("allow_neg_eigval", False))
        return run_delta(a["q"], a["k"], a["v"], g, beta, a["scale"], a["initial_state"], a["output_final_state"],
                         a["use_qk_l2norm_in_kernel"], a.get("state_v_first", False))
    return _like(fn)(body)


def kda_form(fn: Callable) -> Callable:
    """``chunk_kda`` / ``fused_recurrent_kda``: per-key decay g (B,T,HV,K), raw with ``use_gate_in_kernel``."""
    def body(a: dict) -> Any:
        _check_common(fn.__name__, a)
        g = a["g"]
        if a.get("use_gate_in_kernel"):
            if a.get("A_log") is None and a.get("lower_bound") is None:
                raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True` and `lower_bound` is "
                                 "not set.")
            g = kda_gate(g, a.get("A_log"), a.get("dt_bias"), a.get("lower_bound"))
        beta = _beta(a["beta"], a.get("use_beta_sigmoid_in_kernel", False), a.get("allow_neg_eigval", False))
        return run_delta(a["q"], a["k"], a["v"], g, beta, a["scale"], a["initial_state"], a["output_final_state"],
                         a["use_qk_l2norm_in_kernel"], a.get("state_v_first", False))
    return _like(fn)(body)


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, activation: str | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's depthwise causal conv: x (B,T,D), weight (D,W); output position t reads inputs t-W+1..t, those
    before the sequence from the cache's last W-1 columns (``initial_state`` (B,D,W)) or zeros; bias, then
    silu (``activation`` silu/swish), then ``residual``. The final state is the last W inputs (cache first)."""
    b, _, d = x.shape
    w = weight.shape[1] if weight is not None else (initial_state.shape[-1] if initial_state is not None else 1)
    xt = _compute(x).transpose(1, 2)  # (B, D, T)
    kernel = (_compute(weight).to(xt.dtype) if weight is not None else xt.new_ones(d, w)).unsqueeze(1)
    bias_c = None if bias is None else _compute(bias).to(xt.dtype)
    if initial_state is not None:
        full = torch.cat([_compute(initial_state).to(xt.dtype), xt], dim=-1)  # (B, D, W + T)
        y = F.conv1d(full[..., 1:], kernel, bias_c, groups=d)
    else:  # zeros in front as the conv's own padding: the causal Conv that export-step gives a window state
        full = F.pad(xt, (w, 0))
        y = F.conv1d(xt, kernel, bias_c, padding=w - 1, groups=d)[..., :xt.shape[-1]]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    y = y.transpose(1, 2)
    if residual is not None:
        y = y + residual
    final = full[..., -w:].to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final


def causal_conv1d_form(fn: Callable) -> Callable:
    """fla's ``causal_conv1d`` function (GatedDeltaNet's fused q/k/v convolution), any backend."""
    def body(a: dict) -> Any:
        _check_common(fn.__name__, a)
        return causal_conv1d_torch(a["x"], a["weight"], a["bias"], a["residual"], a["initial_state"],
                                   bool(a["output_final_state"]), a["activation"])
    return _like(fn)(body)


def _short_conv_forward(conv: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, cache: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        chunk_indices: torch.Tensor | None = None, **kwargs: Any,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ShortConvolution.forward`` in torch: every length (one token too) through the same causal conv."""
    if cu_seqlens is not None:
        raise _unsupported("ShortConvolution", "variable-length packing (cu_seqlens)")
    if mask is not None:
        x = x * mask.unsqueeze(-1)
    return causal_conv1d_torch(x, conv.weight[:, 0], conv.bias, residual, cache, output_final_state,
                               conv.activation)


def _l2norm_forward(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``L2Norm.forward``."""
    y = l2norm(x, mod.eps)
    return y if mod.output_dtype is None else y.to(mod.output_dtype)


# --- finders ---------------------------------------------------------------------------------------------

def _layer_classes() -> list[tuple[type, Any]]:
    """(layer class, the module that defines it) for the delta layers the process imported."""
    found = []
    for mod_name, cls_name in _LAYERS.items():
        mod = loaded_module(mod_name)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        if isinstance(cls, type):
            found.append((cls, mod))
    return found


def _triton_ops() -> dict[int, Callable[[Callable], Callable]]:
    """id of each Triton op function of fla -> the maker of its torch form."""
    table: dict[int, Callable[[Callable], Callable]] = {}
    for mod_name, names, maker in (
            ("fla.ops.delta_rule", ("chunk_delta_rule", "fused_recurrent_delta_rule"), delta_rule_form),
            ("fla.ops.gated_delta_rule", ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
             gated_delta_rule_form),
            ("fla.ops.kda", ("chunk_kda", "fused_recurrent_kda"), kda_form),
            ("fla.modules.causal_conv1d", ("causal_conv1d",), causal_conv1d_form)):
        mod = loaded_module(mod_name)
        for name in names:
            fn = getattr(mod, name, None) if mod is not None else None
            if callable(fn):
                table[id(fn)] = maker
    return table


def _find_ops(model: nn.Module) -> list[Swap]:
    """In the module of each delta layer class the model uses: every name bound to one of fla's Triton ops
    (by identity) -> its torch form; and each such layer's length test without a guard."""
    table = _triton_ops()
    swaps: list[Swap] = []
    for cls, mod in _layer_classes():
        layers = instances(model, cls)
        if not layers:
            continue
        for name, value in sorted(vars(mod).items()):
            maker = table.get(id(value))
            if maker is not None:
                swaps.append(Swap(mod, name, maker(value)))
        swaps += [Swap(layer, "forward", types.MethodType(functools.partial(_unguarded_length, path=path), layer))
                  for path, layer in layers]
    return swaps


def _unguarded_length(layer: nn.Module, *args: Any, path: str, **kwargs: Any) -> Any:
    """The layer's own forward, with the tests its own code makes on tensor sizes answered without a guard.

    fla's delta layers choose their op by length (``mode = 'fused_recurrent' if q_len <= 64 else
    self.mode``). Both ops are the same torch form here, so the answer cannot change the graph, but under
    torch.export the test would record the guard ``T <= 64`` and pin the exported sequence range to one
    side of 64. Only comparisons evaluated directly in the forward's own frame are answered guard-free
    (by their example value); every guard raised in a function it calls (einops, torch, the op) stays.

    A call with an ``attention_mask`` (or ``cu_seqlens``) is refused here, naming the layer: fla unpads the
    batch into variable-length sequences, which the op (one state per batch row, from position 0) cannot run."""
    forward = type(layer).forward
    call = inspect.signature(forward).bind(layer, *args, **kwargs).arguments
    given = [n for n in ("attention_mask", "cu_seqlens")
             if call.get(n, (call.get("kwargs") or {}).get(n)) is not None]
    if given:
        raise LrexportError(
            f"fla {type(layer).__name__} in module {path!r} is called with {given[0]}: fla then unpacks the batch "
            "into variable-length sequences (cu_seqlens), which lrexport's linear-attention op cannot run (one "
            "state per batch row, from its first position)",
            "call the layer without it for export (the recurrence is causal, so right-padded rows need no mask), "
            "or export with --no-patches to see fla's own error")
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    with own_frame_unguarded(forward.__code__, tensors):
        return forward(layer, *args, **kwargs)



def _find_modules(model: nn.Module) -> list[Swap]:
    swaps: list[Swap] = []
    for mod_name, cls_name, make in (("fla.modules.causal_conv1d", "ShortConvolution", _short_conv_forward),
                                     ("fla.modules.norm", "L2Norm", _l2norm_forward)):
        mod = loaded_module(mod_name)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        cls = cls if isinstance(cls, type) else None
        swaps += [Swap(m, "forward", types.MethodType(make, m)) for _, m in instances(model, cls)]
    return swaps


PATCHES = [
    Patch("fla-core", "delta-rule ops of DeltaNet / GatedDeltaNet / KimiDeltaAttention (Triton)",
          "lrexport linear-attention op", _find_ops, triton_unusable),
    Patch("fla-core", "ShortConvolution / L2Norm (Triton)", "torch conv1d / l2 norm",
          _find_modules, triton_unusable),
]
