"""Export patches: swap an export-hostile function of a known library for an equal export-friendly one.

The role of optimum's ``ModelPatcher``: some libraries compute causal linear attention with a Python loop
over chunks (the export unrolls it and pins the sequence), a C++ kernel (torch.export cannot trace it) or
Triton (no CPU path). Each :class:`Patch` finds, by what the model's modules and bound functions *are*
(``isinstance`` of the library's class, identity of the function), the attributes to swap for a plain torch
form: the textbook running-sum (cumsum) form that the causal-chunk pass then chunks. The swaps are undone
when the context exits, so the user's module is unchanged after the export.

A library that is not imported cannot be in the model, so nothing here imports a library itself: each
finder looks it up in ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from exporter.errors import LrexportError

_MISSING = object()


@dataclass(frozen=True)
class Swap:
    """``setattr(owner, name, value)`` for the duration of a patch."""

    owner: Any
    name: str
    value: Any


@dataclass(frozen=True)
class Patch:
    """One export-hostile function of one library and its export-friendly equivalent.

    ``find`` returns the swaps for a model (none: the patch does not apply). ``eager`` marks patches the
    library also needs to run at all on this machine (Triton kernels without a GPU), so the PyTorch
    reference of parity runs with them too. Modules no patch can make exportable are refused by their
    library's ``refusals`` (with the reason) before any patch is chosen.
    """

    library: str
    target: str
    replacement: str
    find: Callable[[nn.Module], list[Swap]]
    eager: Callable[[], bool] = lambda: False

    @property
    def label(self) -> str:
        return f"{self.library} {self.target} -> {self.replacement}"


def loaded_module(name: str) -> ModuleType | None:
    """The library's module if the process imported it (a model using it must have)."""
    return sys.modules.get(name)


def instances(model: nn.Module, cls: type | None) -> list[tuple[str, nn.Module]]:
    """Named submodules of ``model`` that are instances of ``cls`` (none when the library is absent)."""
    if cls is None:
        return []
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, cls)]


def _libraries() -> list[ModuleType]:
    """One module per library; each has ``PATCHES`` and may have ``refusals(model)``. Imported here, not at
    the top, because they import this module's ``Patch``."""
    from exporter.patches import fast_transformers, fla, performer, transformers

    return [performer, fast_transformers, fla, transformers]


def _registry() -> list[Patch]:
    return [p for lib in _libraries() for p in lib.PATCHES]


def _refusals(model: nn.Module) -> list[str]:
    return [r for lib in _libraries() if hasattr(lib, "refusals") for r in lib.refusals(model)]


def select_patches(model: nn.Module) -> list[Patch]:
    """The patches that apply to ``model``; a module no patch can make exportable is a one-line error."""
    if not isinstance(model, nn.Module):
        return []
    refused = _refusals(model)
    if refused:
        raise LrexportError(refused[0], "replace that layer, or export with --no-patches to see torch's own error")
    return [p for p in _registry() if p.find(model)]


@contextlib.contextmanager
def _swapped(swaps: Sequence[Swap]) -> Iterator[None]:
    saved = []
    try:
        for s in swaps:
            own = s.owner.__dict__ if hasattr(s.owner, "__dict__") else {}
            saved.append((s, own.get(s.name, _MISSING)))
            setattr(s.owner, s.name, s.value)
        yield
    finally:
        for s, old in reversed(saved):
            if old is _MISSING:
                delattr(s.owner, s.name)
            else:
                setattr(s.owner, s.name, old)


@contextlib.contextmanager
def applied(model: nn.Module, patches: Sequence[Patch], eager_only: bool = False) -> Iterator[list[Patch]]:
    """Apply ``patches`` to ``model`` (only those needed for eager runs with ``eager_only``); undone on exit."""
    chosen = [p for p in patches if p.eager() or not eager_only]
    swaps = [s for p in chosen for s in p.find(model)]
    with _swapped(swaps):
        yield chosen


def patch_lines(labels: Sequence[str]) -> list[str]:
    """The report's ``patches:`` line (none when no patch applied)."""
    return [f"patches: {'; '.join(labels)}"] if labels else []


def reference_patches(model: Any, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Patches the model needs to run eagerly here (the parity reference): fla's Triton ops without a GPU."""
    if not enabled or not isinstance(model, nn.Module):
        return contextlib.nullcontext([])
    return applied(model, select_patches(model), eager_only=True)
