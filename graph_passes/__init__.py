"""Graph passes for lrexport: fuse low-rank pairs, chunk causal linear attention, lower Einsum.

Each rule is an onnxscript pattern rewrite (pattern / check / rewrite) wrapped in an onnx-ir pass;
:func:`run_passes` runs them in order and checks ONNX Runtime parity after each one.
"""

from graph_passes._base import GraphPass, PassOptions
from graph_passes.pass_manager import (
    DEFAULT_PASSES,
    PASS_NAMES,
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
    "PassOptions",
    "PassParityError",
    "PassReport",
    "PipelineReport",
    "make_pass",
    "run_passes",
]
