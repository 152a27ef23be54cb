"""``linear-attention``: lower every ``lrexport.LinearAttention`` node for the backend that will run it.

Export writes each recurrence as one custom-domain node (``exporter/linear_attention``); no runtime runs
that domain, so the default pipeline always lowers it. ``PassOptions.linear_attention`` names the form:
``portable`` (standard ops at opset <= 25, which every runtime and TensorRT parses) or ``onnxruntime``
(ONNX Runtime's ``com.microsoft.LinearAttention`` contrib op, fastest on its CPU). A model without the node
is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from graph_passes._base import GraphPass, PassOptions
from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE, LinearAttentionOrtPass
from graph_passes.linear_attention_portable import LinearAttentionPortablePass

LOWERINGS: dict[str, type[GraphPass]] = {
    "portable": LinearAttentionPortablePass,
    "onnxruntime": LinearAttentionOrtPass,
}


class LinearAttentionPass(GraphPass):
    """Dispatch to the lowering that ``options.linear_attention`` names."""

    name = "linear-attention"
    min_opset = 0

    def run(self, model: ir.Model) -> bool:
        if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.all_nodes()):
            return False
        target = self.options.linear_attention
        if target not in LOWERINGS:
            raise ValueError(f"unknown linear-attention lowering {target!r}; choose from: {', '.join(LOWERINGS)}")
        lowering = LOWERINGS[target](self.options)
        return lowering.run(model)


def has_linear_attention(model: ir.Model) -> bool:
    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.all_nodes())


def runnable_copy(onnx_path: str | Path, folder: str | Path, lowering: str = "portable") -> Path:
    """``onnx_path`` itself when no runtime needs anything lowered, else a copy in ``folder`` with its
    ``lrexport.LinearAttention`` nodes lowered: for the checks that run what export wrote (the served range)."""
    model = ir.load(str(onnx_path))
    if not has_linear_attention(model):
        return Path(onnx_path)
    LinearAttentionPass(PassOptions(linear_attention=lowering))(model)
    out = Path(folder) / "lowered.onnx"
    ir.save(model, str(out), external_data="lowered.onnx.data" if _nbytes(model) > 1 << 30 else None)
    return out


def _nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
