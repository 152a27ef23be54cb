"""Small, deterministic example models for lrexport, each with its input spec and shape ranges.

``python -m samples.make NAME --out model.pt2`` writes a model file plus ``<stem>.inputs.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from samples import models


@dataclass(frozen=True)
class Sample:
    name: str
    factory: Callable[[], nn.Module]
    inputs: tuple[str, ...]  # lrexport --input specs
    shapes: tuple[str, ...]  # lrexport --shapes ranges
    description: str

    @property
    def factory_path(self) -> str:
        return f"samples.models:{self.factory.__name__}"


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        Sample("lowrank_mlp", models.lowrank_mlp, ("x:2x128x512:float32",),
               ("x:min=1x1x512,opt=2x128x512,max=4x512x512",),
               "MLP with every Linear a rank-64 pair (factorization pays)"),
        Sample("lowrank_nopay", models.lowrank_nopay, ("x:2x128x512:float32",),
               ("x:min=1x1x512,opt=2x128x512,max=4x512x512",),
               "MLP with 512x512 Linears as rank-384 pairs (factorization does not pay)"),
        Sample("lowrank_block", models.lowrank_block, ("x:2x128x512:float32",),
               ("x:min=1x2x512,opt=2x128x512,max=4x512x512",),
               "pre-LN softmax-attention block, every Linear a rank-64 pair"),
        Sample("causal_block", models.causal_block, ("x:1x256x512:float32",),
               ("x:min=1x1x512,opt=1x256x512,max=2x1024x512",),
               "one causal linear-attention layer, naive Einsum->CumSum->Einsum (h=8, d=64)"),
        Sample("causal_lm", models.causal_lm, ("ids:2x128:int64:0..255",),
               ("ids:min=1x1,opt=2x128,max=4x512",),
               "causal linear-attention LM over token ids, low-rank projections"),
        Sample("noncausal_encoder", models.noncausal_encoder, ("x:2x128x128:float32",),
               ("x:min=1x2x128,opt=2x128x128,max=4x512x128",),
               "non-causal linear-attention encoder"),
        Sample("linformer_encoder", models.linformer_encoder, ("x:2x128x128:float32",),
               ("x:min=1x128x128,opt=2x128x128,max=8x128x128",),
               "Linformer encoder (sequence fixed at 128, batch dynamic)"),
        Sample("gain_square", models.gain_square, ("x:2x32x64:float32",),
               ("x:min=1x1x64,opt=2x32x64,max=4x256x64",),
               "gain-then-square feature whose intermediate overflows fp16 (keeps it float32)"),
    )
}


def get(name: str) -> Sample:
    try:
        return SAMPLES[name]
    except KeyError:
        raise KeyError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLES)}") from None
