"""Lower ``lrexport.LinearAttention`` nodes to the standard ``LinearAttention`` op (ai.onnx, opset 27).

Why it is only on request: ONNX Runtime 1.32 has no kernel for the standard op; it expands the op's
function body, a ``Scan`` with one step per position, measured 3-5x slower than its own
``com.microsoft.LinearAttention`` at n = 4096 on a CPU (``benchmarks/bench_linear_attention.py``, the
"per-token Scan" column), and TensorRT's parser stops at opset 25. It is the form to hand a runtime that
implements the standard op.

The op has the contrib op's signature (packed ``(B, T, H*D)`` inputs, ``past_state``, ``decay``, ``beta``;
``q_num_heads``, ``kv_num_heads``, ``update_rule``, ``scale``), so the rewrite is
``linear_attention_ort``'s, retargeted: the standard op takes ``q_num_heads`` a multiple of
``kv_num_heads`` only, so q with fewer heads than the state is repeated to the state heads first (each
query head serves consecutive state heads, ``repeat_interleave``: the same result).

The op needs opset 27 in the default domain: the model is converted with onnxscript's version converter
up to 25 (its adapters cover the revisions from 18 on), then the import is raised to 27. Between 25 and
27 the only revised op a model can already hold is ``Range`` (27 adds float16/bfloat16 and ``stash_type``,
which applies to those types only), so nothing else changes; a model already past 27 is left as it is.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from graph_passes.errors import LrexportError
from graph_passes.linear_attention_ort import (DOMAIN, OP_TYPE, LinearAttentionLowering, Lowered, _attr, _Builder,
                                               _lower, _refusal)

ONNX_OPSET = 27
_CONVERTER_MAX = 25  # onnxscript's version converter converts up to this opset
# Ops revised after _CONVERTER_MAX up to ONNX_OPSET whose revision only adds types / an attribute for them.
_COMPATIBLE_REVISIONS = frozenset({"Range"})


def missing_schema() -> str | None:
    """Why the standard op cannot be written with the installed onnx (None when it can)."""
    try:
        onnx.defs.get_schema("LinearAttention", ONNX_OPSET, "")
    except Exception:  # onnx.defs.SchemaError
        return (f"the installed onnx {onnx.__version__} does not define the standard LinearAttention op "
                f"(opset {ONNX_OPSET})")
    return None


def _raise_opset(model: ir.Model) -> str | None:
    """Bring the default-domain opset to ONNX_OPSET (module doc); the reason it cannot, else None."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if version >= ONNX_OPSET:
        return None
    if version < _CONVERTER_MAX:
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, _CONVERTER_MAX)
        except Exception as err:  # an op the converter has no adapter for
            return f"the model's opset {version} could not be converted to {_CONVERTER_MAX} ({err})"
    revised = sorted({n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")
                      and _revised_after(n.op_type, _CONVERTER_MAX) and n.op_type not in _COMPATIBLE_REVISIONS})
    if revised:
        return f"ops revised between opset {_CONVERTER_MAX} and {ONNX_OPSET}: {', '.join(revised)}"
    model.opset_imports.pop("ai.onnx", None)
    model.opset_imports[""] = ONNX_OPSET
    return None


def _revised_after(op_type: str, version: int) -> bool:
    try:
        return onnx.defs.get_schema(op_type, ONNX_OPSET, "").since_version > version
    except Exception:
        return False


class LinearAttentionOnnxPass(LinearAttentionLowering):
    """Rewrite every ``lrexport.LinearAttention`` node of the main graph to the standard ``LinearAttention``."""

    name = "linear-attention-onnx"
    min_opset = 0
    _opset_problem: str | None = None

    def run(self, model: ir.Model) -> bool:
        if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph):
            return False
        why = missing_schema()
        if why is not None:
            raise LrexportError(why, "upgrade onnx, or lower with --linear-attention onnxruntime or portable")
        before = dict(model.opset_imports)
        self._opset_problem = _raise_opset(model)
        return super().run(model) or dict(model.opset_imports) != before

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        if self._opset_problem:
            return self._opset_problem
        if _attr(node, "scale", 1.0) == 0.0:
            return "scale 0 means 1/sqrt(dk) to LinearAttention"
        reason = _refusal(node)
        if reason is not None:
            return reason
        new_nodes, outs = _lower(node, label)
        op = next(n for n in new_nodes if n.op_type == "LinearAttention")
        op.domain = ""
        hq = int(op.attributes["q_num_heads"].value)
        hs = int(op.attributes["kv_num_heads"].value)
        if hq < hs:  # one query head per group of state heads: repeat it to every state head of its group
            b = _Builder(f"{label}/q")
            q = b.op("Reshape", [op.inputs[0], b.const([0, 0, hq, -1])])
            op.replace_input_with(0, b.packed(b.repeat_heads(q, hq, hs // hq)))
            op.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", hs)
            at = new_nodes.index(op)
            new_nodes[at:at] = b.nodes
        return new_nodes, outs, "lowered (LinearAttention, opset 27)", {
            "rule": _attr(node, "rule"), "decay": _attr(node, "decay", "none"),
            "normalize": bool(_attr(node, "normalize", 0))}
