"""Base class of lrexport's graph passes: an onnx-ir in-place pass that also keeps a match log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from graph_passes._util import cleanup_unused


@dataclass
class PassOptions:
    chunk_size: int = 64
    merge_threshold: float = 1.0  # merge a pair into one dense weight when r*(m+n) >= threshold*m*n
    check_atol: float = 1e-4
    check_rtol: float = 1e-3
    fold_inner_bias: bool = True  # fold the inner bias of a kept pair into the outer one
    sibling_min_group: int = 2  # concatenate first factors when at least this many pairs share an input
    flops_shapes: dict[str, tuple[int, ...]] | None = None  # input shapes to count FLOPs at
    extra: dict[str, Any] = field(default_factory=dict)


class GraphPass(ir.passes.InPlacePass):
    """One rewrite family. ``details`` lists one dict per match (what was done and why)."""

    name: str = "?"

    def __init__(self, options: PassOptions | None = None) -> None:
        super().__init__()
        self.options = options or PassOptions()
        self.details: list[dict[str, Any]] = []

    @property
    def matches(self) -> int:
        return sum(1 for d in self.details if d.get("counts", True))

    min_opset: int = 13  # rewrites emit ReduceSum/Squeeze/Split with axes as inputs

    def opset_too_old(self, model: ir.Model) -> bool:
        """True (and a detail saying so) when the default-domain opset predates what the rewrites emit."""
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if version < self.min_opset:
            self.details.append({"kind": "skipped", "action": f"opset {version} < {self.min_opset}",
                                 "counts": False, "nodes": []})
            return True
        return False

    def apply_rules(self, model: ir.Model, rules: list, commute: bool = False) -> int:
        """Apply a rule set; when anything matched, drop the nodes the rewrites left without users."""
        if not rules:
            return 0
        count = orp.RewriteRuleSet(rules, commute=commute).apply_to_model(model)
        if count:
            cleanup_unused(model)
        return count
