"""RWKV-4's WKV recurrence (transformers' ``rwkv_linear_attention``: RWKV) as a ``torch`` scan over positions.

transformers' CPU path (``rwkv_linear_attention_cpu``; the CUDA kernel computes the same) is a Python loop
over positions carrying, per channel, ``(numerator, denominator, running max)``: the running max keeps
``exp(key)`` in range. Exported as it is, the loop unrolls and pins the sequence to the example's length. The
linear-attention op cannot take it: a plain gated sum of ``exp(k_i) v_i`` overflows float32 once keys pass
~88, and one stabilizer for the whole sequence underflows its recent terms. The same step, written once as the
body of ``torch._higher_order_ops.scan``, keeps the running max exactly and exports as one ONNX ``Scan`` whose
trip count is the sequence length: dynamic from 1, and a graph that does not grow with it. The function is
found in each modeling module of the model's own classes that defines it (by its signature) and swapped only
during export: transformers' loop is the reference for parity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._higher_order_ops.scan import scan

from exporter.patches import Patch, Swap
from exporter.patches.transformers.common import model_modules, takes_params

_NAME = "rwkv_linear_attention"
_PARAMS = ("time_decay", "time_first", "key", "value", "state", "return_state")


def wkv_scan(time_decay: torch.Tensor, time_first: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             state: Any = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
    """``rwkv_linear_attention`` (``key, value: (B, T, C)``, state ``[num, den, max]`` each ``(B, C)``) with the
    loop as one scan step; returns ``(output in key's dtype, state or None)`` as transformers does."""
    decay = -torch.exp(time_decay.float())
    first = time_first.float()
    if state is None:
        zeros = torch.zeros_like(key[:, 0], dtype=torch.float32)
        init = (zeros, zeros.clone(), zeros - 1e38)
    else:
        init = tuple(s.float() for s in state)

    def step(carry: tuple[torch.Tensor, ...], xs: tuple[torch.Tensor, ...]
             ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        num, den, run_max = carry
        k, v = xs
        out_max = torch.maximum(run_max, k + first)
        e1, e2 = torch.exp(run_max - out_max), torch.exp(k + first - out_max)
        out = (e1 * num + e2 * v) / (e1 * den + e2)
        new_max = torch.maximum(run_max + decay, k)
        e1, e2 = torch.exp(run_max + decay - new_max), torch.exp(k - new_max)
        return (e1 * num + e2 * v, e1 * den + e2, new_max), out

    (num, den, run_max), out = scan(step, init, (key.float().transpose(0, 1), value.float().transpose(0, 1)))
    out = out.transpose(0, 1).to(key.dtype)
    return out, ([num, den, run_max] if return_state or state is not None else state)


def _find(model: nn.Module) -> list[Swap]:
    """The model's own modeling modules that define transformers' WKV dispatch with its signature."""
    return [Swap(mod, _NAME, wkv_scan) for mod in model_modules(model)
            if takes_params(getattr(mod, _NAME, None), _PARAMS)]


PATCHES = [Patch("transformers", "rwkv_linear_attention (RWKV-4 WKV, a Python loop over positions with a running "
                 "max)", "scan over positions (ONNX Scan)", _find)]
