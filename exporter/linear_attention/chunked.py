"""Eager math of ``lrexport::linear_attention``: a chunked form with no Python loop over positions.

Why chunked: a per-token loop is O(T) Python steps (slow in eager and, if traced, thousands of nodes).
Here the sequence is cut into chunks of ``C`` positions; everything inside a chunk is a few batched
matmuls over *all* chunks at once, and only the (dk x dv) state is carried by a loop over chunks.

One formulation serves every rule. With the log decay ``g`` taken per key dim (a per-head decay is
broadcast, ``linear``/``delta`` use ``g = 0``) and ``b_i`` its cumulative sum inside a chunk,
``S_i = exp(b_i) * S_0 + sum_{j<=i} (exp(b_i - b_j) * k_j) u_j^T`` where ``u_j = v_j`` for the plain
rules and, for the delta rules, ``u = (I + diag(beta) KK)^-1 diag(beta) (V - (exp(b) * K) S_0)`` with
``KK_ij = sum_d k_id k_jd exp(b_id - b_jd)`` strictly lower triangular (the UT / WY transform; the
triangular solve is fine here because the op is opaque to export). Every exponent taken is <= 0 when
``g <= 0`` (log-space decay, as fla and transformers use): exponents of masked pairs are set to -inf
*before* ``exp``, so no inf/NaN appears at any length or decay strength.

The arithmetic runs in float32 (float64 if the inputs are float64); zero padding to a whole number of
chunks leaves the state unchanged (k = 0, beta = 0, g = 0), so the final state is exact at every length.
"""

from __future__ import annotations

import torch

RULES = ("linear", "gated", "delta", "gated_delta")
DEFAULT_CHUNK = 64


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat the head axis (dim 2) of ``x`` to ``n`` heads, each head serving ``n // h`` consecutive
    heads (``repeat_interleave``: transformers' Qwen3-Next grouping and the usual GQA grouping)."""
    h = x.shape[2]
    return x if h == n else x.repeat_interleave(n // h, dim=2)


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                             beta: torch.Tensor | None, rule: str, scale: float,
                             initial_state: torch.Tensor | None, chunk: int = DEFAULT_CHUNK,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B,T,Hq,dk), k (B,T,Hk,dk), v (B,T,Hv,dv); g (B,T,Hs) or (B,T,Hs,dk); beta (B,T,Hs);
    initial_state (B,Hs,dk,dv) with Hs = max(Hk, Hv). Returns out (B,T,max(Hq,Hs),dv) in q's dtype and
    the final state (B,Hs,dk,dv) in the compute dtype."""
    B, T, Hq, dk = q.shape
    Hs = max(k.shape[2], v.shape[2])
    H = max(Hq, Hs)
    dv = v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the state lives on the Hs state heads; output heads H >= Hs share a state when Hq > Hs
    k = _heads(k.to(cdt), Hs)
    v = _heads(v.to(cdt), Hs)
    delta = rule in ("delta", "gated_delta")
    if g is None:
        gk = torch.zeros(B, T, Hs, 1, dtype=cdt, device=q.device)
    else:
        gk = g.to(cdt) if g.dim() == 4 else g.to(cdt).unsqueeze(-1)
    per_key = gk.shape[-1] != 1
    bt = beta.to(cdt) if delta and beta is not None else torch.ones(B, T, Hs, dtype=cdt, device=q.device)
    S0 = (torch.zeros(B, Hs, dk, dv, dtype=cdt, device=q.device) if initial_state is None
          else initial_state.to(cdt))

    C = max(1, min(chunk, T))
    nc = -(-T // C)
    pad = nc * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B,T,Hs,...) -> (B,Hs,nc,C,...)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(B, nc, C, *x.shape[2:]).movedim(3, 1)

    # q on the state heads: with Hq > Hs, each state head carries Hq/Hs query "rows"; fold them in as a
    # group axis so one state serves them all
    r = H // Hs
    qh = _heads(q.to(cdt), H)  # (B,T,H,dk)
    qh = qh.reshape(B, T, Hs, r, dk)
    Qc = chunks(qh.reshape(B, T, Hs, r * dk)).reshape(B, Hs, nc, C, r, dk)
    Kc, Vc = chunks(k), chunks(v)  # (B,Hs,nc,C,dk|dv)
    Gc = chunks(gk)  # (B,Hs,nc,C,dk|1)
    Bc = chunks(bt.unsqueeze(-1)).squeeze(-1)  # (B,Hs,nc,C)
    b = Gc.cumsum(3)  # inclusive cumulative log decay inside each chunk
    b_last = b[:, :, :, -1:]  # (B,Hs,nc,1,dk|1)
    eye = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl = torch.tril(eye)  # j <= i
    strict = torch.tril(eye, -1)  # j < i

    def decayed_products(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P[i, j] = sum_d a_id k_jd exp(b_id - b_jd) for masked (i, j), else 0. a: (B,Hs,nc,C,R,dk)."""
        if per_key:
            diff = b.unsqueeze(4) - b.unsqueeze(3)  # (B,Hs,nc,C_i,C_j,dk)
            diff = diff.masked_fill(~mask[:, :, None], float("-inf"))
            return torch.einsum("bhnird,bhnjd,bhnijd->bhnirj", a, Kc, diff.exp())
        diff = (b[..., 0].unsqueeze(4) - b[..., 0].unsqueeze(3)).masked_fill(~mask, float("-inf"))
        return torch.einsum("bhnird,bhnjd->bhnirj", a, Kc) * diff.exp().unsqueeze(4)

    QK = decayed_products(Qc, incl)  # (B,Hs,nc,C,r,C)
    Qd = Qc * b.exp().unsqueeze(4)  # q_i * exp(b_i): reads the chunk's initial state
    Kd = Kc * (b_last - b).exp()  # k_j * exp(b_C - b_j): writes into the next chunk's state
    Kb = Kc * b.exp()  # k_i * exp(b_i): the delta rules' read of the initial state
    if delta:
        KK = decayed_products(Kc.unsqueeze(4), strict)[:, :, :, :, 0]  # (B,Hs,nc,C,C)
        A = torch.eye(C, dtype=cdt, device=q.device) + Bc.unsqueeze(-1) * KK
        # u = Wv - Wk S0 with Wv = A^-1 beta V and Wk = A^-1 beta (exp(b) K)
        rhs = torch.cat([Vc, Kb], dim=-1) * Bc.unsqueeze(-1)
        W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        Wv, Wk = W[..., :dv], W[..., dv:]
    decay_last = b_last.exp().squeeze(3).unsqueeze(-1)  # (B,Hs,nc,dk|1,1)

    S = S0
    outs = []
    for n in range(nc):  # a loop over chunks only: the state is the one thing carried
        U = Wv[:, :, n] - Wk[:, :, n] @ S if delta else Vc[:, :, n]  # (B,Hs,C,dv)
        o = torch.einsum("bhird,bhde->bhire", Qd[:, :, n], S)
        o = o + torch.einsum("bhirj,bhje->bhire", QK[:, :, n], U)
        outs.append(o)
        S = decay_last[:, :, n] * S + Kd[:, :, n].transpose(-1, -2) @ U
    out = torch.stack(outs, dim=2)  # (B,Hs,nc,C,r,dv)
    out = out.reshape(B, Hs, nc * C, r, dv)[:, :, :T].permute(0, 2, 1, 3, 4).reshape(B, T, H, dv)
    return (out * scale).to(q.dtype), S
