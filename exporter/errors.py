"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero.

:class:`LrexportError` lives in :mod:`graph_passes.errors` (the passes raise it too and must not import
``exporter``); it is re-exported here so exporter code keeps one import."""

from __future__ import annotations

from graph_passes.errors import LrexportError

__all__ = ["LrexportError", "ParityFailure"]


class ParityFailure(LrexportError):
    """Outputs of a backend drifted past tolerance (the report says which and where)."""

    exit_code = 1
