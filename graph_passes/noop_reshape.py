# mypy: disable-error-code="override"
"""No-op Reshapes: ``Reshape(x, shape)`` whose output has the shape of ``x`` becomes ``Identity(x)``
(which the cleanup's identity elimination then removes).

Such Reshapes sit between the factors of a low-rank pair built from Hugging Face ``Conv1D`` layers:
each layer flattens its input to ``[-1, in]`` and views its output back, so the exported graph reads
``Gemm -> Reshape([-1, r]) -> Gemm`` once the two views are folded into one. The Reshape hides the
pair from the ``lowrank`` rules; it does nothing, since the Gemm already yields ``[N, r]``.

The decision uses onnx-ir's shapes only:

- a constant target of the input's rank, each entry equal to the input's known dim, a ``0`` that
  copies the input dim (``allowzero=0``), and at most one ``-1``: the remaining dim is then the
  input's, since a Reshape keeps the element count. This covers ``[N, r] -> [-1, r]`` with ``N``
  symbolic;
- otherwise (a computed target) input and output shapes that are both fully known and equal dim for
  dim, a symbolic dim counting only where both carry the same name.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from graph_passes._base import Match, record
from graph_passes._util import const_ints, node_label, prepare, shape_dims


def _known(dims: list[Any] | None) -> bool:
    return dims is not None and all(isinstance(d, int) or (isinstance(d, str) and d) for d in dims)


def noop_reason(in_dims: list[Any] | None, target: list[int] | None, out_dims: list[Any] | None,
                allowzero: bool) -> str | None:
    """None when a Reshape with these shapes is a no-op, else why it is not (or cannot be shown to be)."""
    if target is not None:
        if in_dims is None:
            return "the input's rank is unknown"
        if len(target) != len(in_dims):
            return f"it changes the rank ({len(in_dims)} -> {len(target)})"
        free = 0
        for i, (t, d) in enumerate(zip(target, in_dims)):
            if t == -1:
                free += 1
            elif t == 0 and not allowzero:
                continue
            elif not isinstance(d, int):
                return f"dim {i} of the input is symbolic ({d}) and the target gives {t}"
            elif t != d:
                return f"dim {i} changes ({d} -> {t})"
        return None if free <= 1 else "the target has more than one -1"
    if not _known(in_dims) or not _known(out_dims):
        return "the target is computed and the shapes are not fully known"
    assert in_dims is not None and out_dims is not None
    if in_dims != out_dims:
        return f"the shape changes ({in_dims} -> {out_dims})"
    return None


def reshape_noop_reason(node: ir.Node) -> str | None:
    """:func:`noop_reason` for a Reshape node."""
    return noop_reason(shape_dims(node.inputs[0]), const_ints(node.inputs[1]), shape_dims(node.outputs[0]),
                       bool(node.attributes.get_int("allowzero", 0)))


class NoOpReshapeRule(orp.RewriteRuleClassBase):
    """Reshape(x, shape) -> Identity(x) when the output shape equals the input shape."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, shape, y, **_):
        check = orp.MatchResult()
        why = reshape_noop_reason(y.producer())
        if why is not None:
            return check.fail(f"not a no-op: {why}")
        return check

    def rewrite(self, op, x, shape, y, **_):
        node = y.producer()
        record(Match("noop-reshape", "removed", [node_label(node)], rewritten=True,
                     info={"shape": shape_dims(x)}))
        return op.Identity(x)


NOOP_RESHAPE_RULES = orp.RewriteRuleSet([NoOpReshapeRule.rule()])


def remove_noop_reshapes(model: ir.Model) -> int:
    """Apply :data:`NOOP_RESHAPE_RULES` after a best-effort shape inference; how many were replaced."""
    prepare(model)
    return NOOP_RESHAPE_RULES.apply_to_model(model)
