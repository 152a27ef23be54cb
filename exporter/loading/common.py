"""What every loader returns (``LoadedModel``) and the small helpers they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from torch import nn

from exporter.specs import InputSpec


@dataclass
class LoadedModel:
    module: nn.Module
    kind: str
    source: str
    exported_program: Any = None  # torch.export.ExportedProgram when loaded from .pt2
    inferred_specs: list[InputSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # defaults taken while reading the file, shown as warnings
    limits: dict[tuple[str, int], tuple[int, int | None]] = field(default_factory=dict)  # archive's real ranges
    spec_notes: list[str] = field(default_factory=list)  # about inferred_specs: warnings only where those are used

    @property
    def parameter_count(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        if self.exported_program is not None:
            tensors = list(self.exported_program.state_dict.values())
        for t in tensors:
            if id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                total += t.numel()
        return total


@contextlib.contextmanager
def _source(p: Path) -> Iterator[str | BinaryIO]:
    """What torch's loaders take for ``p``: its path, or an open file where the name is not UTF-8 (torch's
    C++ reader cannot take such a path, and fails with an error that blames the file)."""
    name = str(p)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with open(p, "rb") as f:
            yield f
        return
    yield name


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
