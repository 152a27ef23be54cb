"""``lrexport::linear_attention``: every linear-attention recurrence as ONE ``torch.library`` op.

Why an op: the chunked math (``chunked.py``) written inline is dozens of nodes whose chunk count guards
on the sequence length (``ceil(T/C)``), which narrows or breaks a dynamic ``Dim(T, 1..)``; a per-token
recurrence unrolls. As a custom op with a fake implementation, torch.export records one node whose
output shapes follow the inputs' symbolically, with no guard at all, and each backend lowers that one
node to what it runs best (``graph_passes/linear_attention_ort.py``: ONNX Runtime's contrib op).

Semantics (per state head, state ``S`` of shape dk x dv, ``g`` a log-space decay, <= 0):
``linear``  S_t = S_{t-1} + k_t v_t^T;
``gated``   S_t = exp(g_t) S_{t-1} + k_t v_t^T  (g per head ``(B,T,H)`` or per key dim ``(B,T,H,dk)``:
            ``diag(exp(g_t)) S_{t-1}``);
``delta``   S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T;
``gated_delta`` S_t = D_t S_{t-1} + beta_t k_t (v_t - (D_t S_{t-1})^T k_t)^T, D_t = diag(exp(g_t));
and ``o_t = scale * S_t^T q_t``. Layout (B, T, heads, dim) as fla and transformers.

Heads: ``k`` and ``v`` may have different head counts (Qwen3-Next has more value heads than key heads);
the state heads are ``Hs = max(Hk, Hv)``, and ``g``/``beta``/``initial_state`` have Hs heads. ``q`` may
have more heads than Hs (GQA: query heads share a state) or fewer (Qwen3-Next: a query head serves
several value heads). Fewer heads always serve consecutive heads (``repeat_interleave``), as in
transformers' Qwen3-Next and in GQA. The output has ``max(Hq, Hs)`` heads.

``normalize=True`` is the Katharopoulos normalizer ``o_t = (q_t^T S_t) / (q_t^T z_t + eps)`` with
``z_t = sum k`` scaled like the numerator (fla's ``normalize``): it is run as the ``linear`` rule on
``[v, 1]``, so the state (initial and final) carries ``z`` as its last column: ``(B, Hs, dk, dv + 1)``.
"""

from __future__ import annotations

import torch

from exporter.linear_attention.chunked import DEFAULT_CHUNK, RULES, chunked_linear_attention

OP_NAME = "lrexport::linear_attention"
KEY_DECAY_CHUNK = 16  # per-key decay builds a [C, C, dk] decay tensor per chunk: a smaller chunk bounds it


def chunk_size(g: torch.Tensor | None) -> int:
    """The eager chunk length: 64 positions, 16 with a per-key decay."""
    return KEY_DECAY_CHUNK if g is not None and g.dim() == 4 else DEFAULT_CHUNK


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                 beta: torch.Tensor | None, rule: str, initial_state: torch.Tensor | None,
                 normalize: bool) -> tuple[int, int, int]:
    """Validate shapes (static facts only, so the fake implementation adds no guard on T); returns
    (state heads, output heads, state value width)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, seq, heads, dim)")
    hq, hk, hv = q.shape[2], k.shape[2], v.shape[2]
    hs = max(hk, hv)
    h = max(hq, hs)
    for name, n in (("q", hq), ("k", hk), ("v", hv)):
        if h % n or (name != "q" and hs % n):
            raise ValueError(f"{name} has {n} heads, which do not divide {h}")
    if k.shape[3] != q.shape[3]:
        raise ValueError("q and k must have the same head dim")
    if rule in ("gated", "gated_delta") and g is None:
        raise ValueError(f"rule {rule!r} needs g")
    if rule in ("linear", "delta") and g is not None:
        raise ValueError(f"rule {rule!r} takes no g (use 'gated' / 'gated_delta')")
    if rule in ("delta", "gated_delta") and beta is None:
        raise ValueError(f"rule {rule!r} needs beta")
    if rule in ("linear", "gated") and beta is not None:
        raise ValueError(f"rule {rule!r} takes no beta")
    if g is not None and not (g.dim() == 3 or (g.dim() == 4 and g.shape[3] == q.shape[3])) \
            or g is not None and g.shape[2] != hs:
        raise ValueError("g must be (B, T, Hs) or (B, T, Hs, dk) with Hs = max(k heads, v heads)")
    if beta is not None and (beta.dim() != 3 or beta.shape[2] != hs):
        raise ValueError("beta must be (B, T, Hs)")
    if normalize and rule != "linear":
        raise ValueError("normalize applies to the 'linear' rule only")
    dvs = v.shape[3] + (1 if normalize else 0)
    if initial_state is not None and tuple(initial_state.shape[1:]) != (hs, q.shape[3], dvs):
        raise ValueError(f"initial_state must be (B, {hs}, {q.shape[3]}, {dvs})")
    return hs, h, dvs


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                     beta: torch.Tensor | None = None, initial_state: torch.Tensor | None = None, *,
                     rule: str = "linear", scale: float = 1.0, normalize: bool = False,
                     eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Call with keywords for g / beta / initial_state (``torch.library`` allows no keyword-only tensor).
    Returns ``(out (B,T,max(Hq,Hs),dv), final_state (B,Hs,dk,dv[+1]) float32)``."""
    check_inputs(q, k, v, g, beta, rule, initial_state, normalize)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    out, state = chunked_linear_attention(q, k, v, g, beta, rule, scale, initial_state, chunk_size(g))
    if normalize:
        out = (out[..., :-1].float() / (out[..., -1:].float() + eps)).to(q.dtype)
    return out.contiguous(), state.to(torch.float32).contiguous()


@linear_attention.register_fake
def _(q, k, v, g=None, beta=None, initial_state=None, *, rule="linear", scale=1.0, normalize=False, eps=0.0):
    hs, h, dvs = check_inputs(q, k, v, g, beta, rule, initial_state, normalize)
    b, t = q.shape[0], q.shape[1]
    out = q.new_empty((b, t, h, v.shape[3]))
    state = q.new_empty((b, hs, q.shape[3], dvs), dtype=torch.float32)
    return out, state
