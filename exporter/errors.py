"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""

from __future__ import annotations


class LrexportError(Exception):
    """A problem the user can fix: ``str(err)`` is one line naming it and what to do."""

    exit_code = 2

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}: {hint}" if hint else problem)


class ParityFailure(LrexportError):
    """Outputs of a backend drifted past tolerance (the report says which and where)."""

    exit_code = 1
