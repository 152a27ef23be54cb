"""ONNX translation of ``lrexport::linear_attention``: ONE node ``lrexport.LinearAttention``.

Why one custom-domain node rather than ops: which form runs best depends on the backend (ONNX Runtime
has a native contrib kernel; TensorRT needs a portable chunked form at opset <= 25), so export keeps
the recurrence whole and a graph pass lowers it (``graph_passes/linear_attention_ort.py`` for ONNX Runtime,
``graph_passes/linear_attention_portable.py`` to standard ops). The node's
inputs are the op's, in (B, T, heads, dim) layout, empty names for absent optional inputs:
``q, k, v, g, beta, initial_state`` -> ``out, final_state``. Attributes: ``rule``, ``scale``,
``decay`` ("none" | "head" | "key"), ``normalize`` (0/1), ``eps``, and the head layout ``q_heads``,
``k_heads``, ``v_heads`` (static: a lowering must not have to infer them).

The schema is registered with ``onnx.defs`` so torch.onnx's builder knows the node has two outputs and
which inputs are optional; :data:`TRANSLATION_TABLE` is what ``torch.onnx.export(...,
custom_translation_table=...)`` takes.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch

import exporter.linear_attention.op  # noqa: F401  (registers torch.ops.lrexport.linear_attention)

DOMAIN = "lrexport"
OP_TYPE = "LinearAttention"
VERSION = 1


def _register_schema() -> None:
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc="lrexport's linear-attention recurrence (see exporter/linear_attention/op.py).",
        inputs=[P("q", "T"), P("k", "T"), P("v", "T"), P("g", "T", param_option=opt),
                P("beta", "T", param_option=opt), P("initial_state", "S", param_option=opt)],
        outputs=[P("out", "T"), P("final_state", "S")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                           "activations"),
                          ("S", ["tensor(float)"], "state")],
        attributes=[A("rule", AT.STRING, "linear | gated | delta | gated_delta"),
                    A("scale", AT.FLOAT, "output scale"),
                    A("decay", AT.STRING, "none | head | key"),
                    A("normalize", AT.INT, "Katharopoulos normalizer (state carries z as a last column)"),
                    A("eps", AT.FLOAT, "normalizer epsilon"),
                    A("q_heads", AT.INT, "query heads"), A("k_heads", AT.INT, "key heads"),
                    A("v_heads", AT.INT, "value heads")],
    )
    onnx.defs.register_schema(schema)


_register_schema()
_opset = onnxscript.values.Opset(DOMAIN, VERSION)


def _static(dim: object, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"linear_attention: {what} must be static for ONNX export, got {dim!r}")
    return dim


def linear_attention_to_onnx(q, k, v, g=None, beta=None, initial_state=None, *, rule: str = "linear",
                             scale: float = 1.0, normalize: bool = False, eps: float = 0.0):
    """The ``custom_translation_table`` entry: one ``lrexport.LinearAttention`` node."""
    decay = "none" if g is None else ("key" if len(g.shape) == 4 else "head")
    return _opset.LinearAttention(
        q, k, v, g, beta, initial_state, rule=rule, scale=float(scale), decay=decay,
        normalize=int(bool(normalize)), eps=float(eps), q_heads=_static(q.shape[2], "q heads"),
        k_heads=_static(k.shape[2], "k heads"), v_heads=_static(v.shape[2], "v heads"))


TRANSLATION_TABLE = {torch.ops.lrexport.linear_attention.default: linear_attention_to_onnx}
