"""xLSTM's mLSTM (transformers' ``wrap_chunkwise_arbitrary_sequence_length``, the inference backend of
``xLSTMBackend``) as a ``torch`` scan over positions.

transformers runs the mLSTM as a Python loop over chunks of ``chunk_size`` (``mlstm_chunkwise_native_autograd``),
then a per-token loop over the remainder (``mlstm_recurrent_sequence_native``), and a third kernel at
``T == 1``: torch.export keeps one branch and one remainder, so the export serves one length or a few. The
recurrence, per head, with ``f~ = logsigmoid(f)``, ``q`` scaled by ``dk**-0.5`` and ``m_0 = 0``,

    m_t = max(f~_t + m_{t-1}, i_t)
    C_t = exp(f~_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise with k_t)
    h_t = q_t C_t / (max(|q_t n_t|, exp(-m_t)) + eps)

is not a rule of the linear-attention op: unstabilized, ``C_t = exp(m_t) C~_t`` for a gated sum ``C~_t``, and
the output is ``q C~ / (max(|q n~|, 1) + eps exp(m_t))``, where the stabilizer ``m_t`` (a running max) enters
the denominator and ``exp(m_t)`` / ``C~_t`` overflow float32 once the input gates pass ~88. The step above,
written once as the body of ``torch._higher_order_ops.scan``, keeps the stabilizer exactly and exports as one
ONNX ``Scan`` whose trip count is the sequence length. The chunkwise kernels compute the same function (their
chunk max equals ``m_t``), so the scan stands for all three. The backend's ``_inference_fn`` (a partial of
that function, found by identity) is swapped on each instance during export only: transformers' kernels are
the reference for parity. The ``train`` modes (chunkwise only, whole chunks) are left as they are.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn
from torch._higher_order_ops.scan import scan
from torch.nn import functional as F

from exporter.patches import Patch, Swap
from exporter.patches.transformers.common import MODELS

_NAME = "wrap_chunkwise_arbitrary_sequence_length"
_ATTR = "_inference_fn"


def mlstm_scan(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, igate: torch.Tensor,
               fgate: torch.Tensor, c_initial: torch.Tensor | None = None, n_initial: torch.Tensor | None = None,
               m_initial: torch.Tensor | None = None, eps: float = 1e-6, dtype_state: torch.dtype = torch.float32,
               **kwargs: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The mLSTM (``query, key: (B, NH, T, DK)``, ``value: (B, NH, T, DV)``, gates ``(B, NH, T)``) by a scan
    over positions; returns ``(h: (B, NH, T, DV) in query's dtype, (C, n, m) last states)``."""
    b, nh, _, dk = key.shape
    dv = value.shape[-1]
    c = key.new_zeros(b, nh, dk, dv, dtype=dtype_state) if c_initial is None else c_initial.to(dtype_state)
    n = key.new_zeros(b, nh, dk, dtype=dtype_state) if n_initial is None else n_initial.to(dtype_state)
    m = key.new_zeros(b, nh, 1, dtype=dtype_state) if m_initial is None else m_initial.to(dtype_state)

    def step(carry: tuple[torch.Tensor, ...], xs: tuple[torch.Tensor, ...]
             ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        c_old, n_old, m_old = carry
        q, k, v, i, f = xs  # (B, NH, DK), (B, NH, DK), (B, NH, DV), (B, NH, 1), (B, NH, 1)
        log_f = F.logsigmoid(f)
        m_new = torch.maximum(log_f + m_old, i)
        f_act, i_act = torch.exp(log_f + m_old - m_new), torch.exp(i - m_new)
        c_new = f_act[..., None] * c_old + i_act[..., None] * (k[..., :, None] * v[..., None, :])
        n_new = f_act * n_old + i_act * k
        q = q * dk ** -0.5
        num = (q[..., None] * c_new).sum(-2)
        qn = (q * n_new).sum(-1, keepdim=True)
        h = num / (torch.maximum(qn.abs(), torch.exp(-m_new)) + eps)
        return (c_new, n_new, m_new), h

    def seq_first(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype_state).movedim(2, 0)

    xs = (seq_first(query), seq_first(key), seq_first(value), seq_first(igate)[..., None],
          seq_first(fgate)[..., None])
    (c, n, m), h = scan(step, (c, n, m), xs)
    return h.movedim(0, 2).to(query.dtype), (c, n, m)


def _scan_fn(partial: functools.partial) -> functools.partial:
    """``mlstm_scan`` with the eps and state dtype the backend's partial was built with."""
    step = partial.keywords.get("mlstm_step_kernel")
    dtype_state = getattr(step, "keywords", {}).get("dtype_state", torch.float32)
    return functools.partial(mlstm_scan, eps=partial.keywords.get("eps", 1e-6), dtype_state=dtype_state)


def _find(model: nn.Module) -> list[Swap]:
    """Modules of transformers' modeling modules whose ``_inference_fn`` is a partial of that module's
    ``wrap_chunkwise_arbitrary_sequence_length`` (by identity)."""
    swaps = []
    for m in model.modules():
        fn = vars(m).get(_ATTR)
        mod = sys.modules.get(type(m).__module__)
        target = getattr(mod, _NAME, None)
        if type(m).__module__.startswith(MODELS) and isinstance(fn, functools.partial) and target is not None \
                and fn.func is target:
            swaps.append(Swap(m, _ATTR, _scan_fn(fn)))
    return swaps


PATCHES = [Patch("transformers", "mLSTM wrap_chunkwise_arbitrary_sequence_length (loops over chunks and "
                 "positions: xLSTM)", "scan over positions (ONNX Scan)", _find)]
