"""RWKV-4's WKV recurrence (transformers' ``rwkv_linear_attention_cpu``): no export form yet, so refused.

Its torch path is a Python loop over positions carrying ``(numerator, denominator, running max)`` per channel:
the running max keeps ``exp(k)`` in range, and it is what the linear-attention op cannot express (a plain
gated sum of ``exp(k_i) v_i`` overflows float32 once keys pass ~88, and one global stabilizer underflows the
recent terms of long sequences). Exported as it is, the loop unrolls and pins the sequence to the example's
length, so lrexport refuses the layer by name instead.
"""

from __future__ import annotations

import sys

from torch import nn

from exporter.patches.transformers.common import MODELS

_LOOP = "rwkv_linear_attention_cpu"
_CALL = "rwkv_linear_attention"  # what the layer's forward calls; it dispatches to the loop on a CPU


def refusals(model: nn.Module) -> list[str]:
    found = []
    for path, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        forward = getattr(type(m), "forward", None)
        if type(m).__module__.startswith(MODELS) and callable(getattr(mod, _LOOP, None)) \
                and _CALL in getattr(getattr(forward, "__code__", None), "co_names", ()):
            found.append(f"transformers {type(m).__name__} in module {path!r} has no export patch: its WKV "
                         "recurrence is a Python loop over positions with a running max per channel (for "
                         "exp(key)'s range), which lrexport's linear-attention op does not express; exported as "
                         "it is, the sequence would be pinned to the example's length")
    return found


PATCHES: list = []
