"""``linear-attention``: lower every ``lrexport.LinearAttention`` node for the backend that will run it.

Export writes each recurrence as one custom-domain node (``exporter/linear_attention``); no runtime runs
that domain, so the default pipeline always lowers it. ``PassOptions.linear_attention`` names the form:
``portable`` (standard ops at opset <= 25, which every runtime and TensorRT parses) or ``onnxruntime``
(ONNX Runtime's ``com.microsoft.LinearAttention`` contrib op, fastest on its CPU). A model without the node
is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes._base import GraphPass
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
