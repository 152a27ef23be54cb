"""The user-facing error type, defined below both packages: ``graph_passes`` raises it and ``exporter``
(which imports ``graph_passes``, never the other way round) re-exports it from ``exporter.errors``."""

from __future__ import annotations


class LrexportError(Exception):
    """A problem the user can fix: ``str(err)`` is one line naming it and what to do."""

    exit_code = 2

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}: {hint}" if hint else problem)
