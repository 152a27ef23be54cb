"""Graph passes for lrexport: fuse low-rank pairs, chunk causal linear attention, lower Einsum.

Each rule is an onnxscript pattern rewrite (pattern / check / rewrite) in a module-level rule set, run by
a :class:`GraphPass` that records a :class:`Match` per site (see ``graph_passes._base``);
:func:`run_passes` runs the passes in order and checks ONNX Runtime parity after each one.
"""

from graph_passes._base import GraphPass, GraphPassResult, Match, PassOptions, collecting, record, rule_options
from graph_passes.pass_manager import (
    DEFAULT_PASSES,
    PASS_NAMES,
    InputModelError,
    PassParityError,
    PassReport,
    PipelineReport,
    make_pass,
    run_passes,
)

__all__ = [
    "DEFAULT_PASSES",
    "PASS_NAMES",
    "GraphPass",
    "GraphPassResult",
    "InputModelError",
    "Match",
    "PassOptions",
    "PassParityError",
    "PassReport",
    "PipelineReport",
    "collecting",
    "make_pass",
    "record",
    "rule_options",
    "run_passes",
]
