"""fla: placeholder."""

from __future__ import annotations

from torch import nn

from exporter.patches import Patch

PATCHES: list[Patch] = []


def refusals(model: nn.Module) -> list[str]:
    return []
