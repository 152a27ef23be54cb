"""``linear-attention``: lower every ``lrexport.LinearAttention`` node for the backend that will run it.

Export writes each recurrence as one custom-domain node (``exporter/linear_attention``); no runtime runs
that domain, so the default pipeline always lowers it. ``PassOptions.linear_attention`` names the form
(``lrexport build`` picks it from its backends, ``exporter/stages.py``):

* ``onnxruntime``: ONNX Runtime's ``com.microsoft.LinearAttention`` contrib op, the fastest on its CPU;
* ``portable``: standard ops at opset <= 25, which every runtime and TensorRT parses;
* ``ai.onnx``: the standard ``LinearAttention`` op of opset 27 (ONNX Runtime 1.32 runs it as a per-token
  Scan, 3-5x slower than its contrib op).

Every node a lowering writes is tagged to stay float32 under the precision cast
(``precision_cast.FLOAT32_TAG``): the recurrence's state and decays accumulate over the whole sequence
(the contrib op's CPU kernel is float32 only; the portable form's chunk-to-chunk state sums, its
``CumSum`` of log decays whose differences feed ``Exp``, and the delta rules' inverse would lose their
precision in fp16), so the cast runs them in float32 with Casts at the boundary, as it keeps the
causal-chunk pass's running sums. The output of a linear-rule node without normalizer grows with the
sequence (no decay bounds it): its new producer is also marked (``precision_cast.mark_growing``), so its
readers stay float32 up to the division that normalizes it, as a growing CumSum's do. A model without the
node is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes._base import GraphPass, PassOptions
from graph_passes.linear_attention_loopfree import LinearAttentionLoopFreePass
from graph_passes.linear_attention_onnx import LinearAttentionOnnxPass
from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE, LinearAttentionOrtPass
from graph_passes.linear_attention_portable import LinearAttentionPortablePass
from graph_passes._util import node_label
from graph_passes.name_scopes import SCOPES_KEY
from graph_passes.precision_cast import keep_float32, mark_growing

LOWERINGS: dict[str, type[GraphPass]] = {
    "portable": LinearAttentionPortablePass,
    "loop-free": LinearAttentionLoopFreePass,
    "onnxruntime": LinearAttentionOrtPass,
    "ai.onnx": LinearAttentionOnnxPass,
}
FLOAT32_WHY = "linear-attention recurrence (state and decays accumulate in float32)"


def has_linear_attention(model: ir.Model) -> bool:
    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.all_nodes())


class LinearAttentionPass(GraphPass):
    """Dispatch to the lowering that ``options.linear_attention`` names; tag what it wrote float32."""

    name = "linear-attention"
    min_opset = 0

    def run(self, model: ir.Model) -> bool:
        if not has_linear_attention(model):
            return False
        target = self.options.linear_attention
        if target not in LOWERINGS:
            raise ValueError(f"unknown linear-attention lowering {target!r}; choose from: {', '.join(LOWERINGS)}")
        before = set(model.graph)
        readers = _growing_readers(model)
        scopes = {node_label(n): n.metadata_props[SCOPES_KEY] for n in before
                  if n.domain == DOMAIN and n.op_type == OP_TYPE and SCOPES_KEY in n.metadata_props}
        changed = LOWERINGS[target](self.options).run(model)
        new_nodes = [n for n in model.graph if n not in before]
        keep_float32(new_nodes, FLOAT32_WHY)
        for n in new_nodes:  # the module a lowered node came from (the lowerings name them "<node>/...")
            owner = next((s for label, s in scopes.items() if (n.name or "").startswith(label + "/")), None)
            if owner is not None:
                n.metadata_props.setdefault(SCOPES_KEY, owner)
        for label, (reader, idx) in readers:
            producer = reader.inputs[idx].producer() if reader.inputs[idx] is not None else None
            if producer is not None and producer in new_nodes:
                mark_growing(producer, f"the output of {label} (linear rule: no decay, no normalizer)")
        return changed


def _growing_readers(model: ir.Model) -> list[tuple[str, tuple[ir.Node, int]]]:
    """Where the output of each linear-rule node without normalizer is read (node label, (reader, input)):
    that output grows with the sequence, and after the lowering its new producer is found from there."""
    found = []
    for node in model.graph:
        attr = node.attributes.get("rule")
        norm = node.attributes.get("normalize")
        if node.domain == DOMAIN and node.op_type == OP_TYPE and attr is not None and attr.value == "linear" \
                and not (norm is not None and norm.value):
            found += [(node.name or OP_TYPE, (u.node, u.idx)) for u in node.outputs[0].uses()]
    return found
