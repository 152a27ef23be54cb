"""Precision names (fp32, fp16, bf16), their aliases and ONNX element types: the one table that the
precision cast, the engine builder and the command line all read (graph_passes is the lower layer, so
both packages can import it).

``model_precision`` reads what a model *holds* from its tensor types, so the engine builder can say
truthfully what it was given instead of being told.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from graph_passes.errors import LrexportError

PRECISIONS = ("fp32", "fp16", "bf16")
LOW_PRECISIONS = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
DATA_TYPES = {"fp32": ir.DataType.FLOAT, **LOW_PRECISIONS}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
_BY_TYPE = {dtype: name for name, dtype in DATA_TYPES.items()}


def normalize_precision(precision: str) -> str:
    """``precision`` or one of its aliases as fp32, fp16 or bf16; anything else is a user error."""
    key = precision.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise LrexportError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return key


def normalize_low_precision(precision: str) -> str:
    """fp16 or bf16 (the precisions a cast can go to); fp32 and anything else are refused."""
    key = precision.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LOW_PRECISIONS:
        raise LrexportError(f"cannot cast to precision {precision!r}", "use fp16 or bf16 (fp32 needs no cast)")
    return key


def float_type_counts(model: ir.Model) -> Counter[str]:
    """How many graph inputs, initializers and node outputs (subgraphs included) hold each precision's
    float type; values without a known type are not counted."""
    values: list[ir.Value] = [*model.graph.inputs, *model.graph.initializers.values()]
    values += [out for node in ir.traversal.RecursiveGraphIterator(model.graph) for out in node.outputs]
    return Counter(_BY_TYPE[v.dtype] for v in values if v.dtype in _BY_TYPE)


def model_precision(counts: Counter[str]) -> str:
    """The precision a strongly typed network built from the model computes in: the low type it holds
    (``fp16+bf16`` when it holds both), else fp32 (float32 values beside a low type are the ones the
    cast kept)."""
    low = [name for name in LOW_PRECISIONS if counts.get(name)]
    return "+".join(low) if low else "fp32"
